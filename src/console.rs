//! What the operator's console (`/ui`, `GET /v1/console`, `chunkbus top`)
//! shows that no other part of the node keeps: rates over time, when each
//! consumer last moved, and the node's recent warnings and errors.
//!
//! A sampler task ([`Console::run`]) wakes every [`SAMPLE`], reads the
//! per-category counters and every consumer's lag, and keeps the last
//! [`HISTORY`] samples; it also builds the per-category part of the view
//! then, so that a console request only copies and filters it (a refresh
//! costs the node a few microseconds per category, whoever asks how often).
//! Warnings and errors reach [`RecentLayer`], a `tracing` layer installed
//! by the binary, which keeps the last [`RECENT_EVENTS`] of them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use chunkbus_client::console::{CategoryView, ChunkCounts, ConsumerView, LoggedEvent};
use chunkbus_client::{ChunkName, ChunkPosition};
use tokio_util::sync::CancellationToken;

use crate::consumers::{Consumers, Position, chunks_by_owner, lag_bytes, next_unread};
use crate::metrics::Metrics;
use crate::storage::Storage;

/// Time between two samples.
pub const SAMPLE: Duration = Duration::from_secs(2);
/// Samples kept (3 minutes of history).
pub const HISTORY: usize = 91;
/// Intervals the rates shown are averaged over (10 s).
const RATE_INTERVALS: usize = 5;
/// A consumer whose lag grew while it acked nothing for this long is
/// marked stalled.
pub const STALLED_AFTER: Duration = Duration::from_secs(10);
/// Warnings and errors kept.
pub const RECENT_EVENTS: usize = 100;

/// The sampled state of a node, shared by the sampler and the handlers.
#[derive(Debug)]
pub struct Console {
    storage: Storage,
    consumers: Arc<Consumers>,
    metrics: Arc<Metrics>,
    /// S3 is on: complete chunks are meant to be uploaded.
    s3: bool,
    /// The sampler's own state (only it takes this lock).
    sampled: Mutex<Sampled>,
    /// The per-category part of the view as of the last sample; replaced
    /// whole, so that a request never waits for a sample being taken.
    latest: RwLock<Arc<Vec<CategoryView>>>,
}

#[derive(Debug, Default)]
struct Sampled {
    /// When each sample was taken, oldest first.
    at: VecDeque<Instant>,
    /// Per category, (bytes, lines) in so far at each of the latest
    /// samples (aligned with the end of `at`).
    counters: HashMap<String, VecDeque<(u64, u64)>>,
    /// Per (category, consumer), what was seen of it.
    consumers: HashMap<(String, String), Seen>,
}

/// What the sampler knows of one consumer.
#[derive(Debug, Clone)]
struct Seen {
    positions: BTreeMap<String, Position>,
    /// When its position last moved (`None`: not since this node started).
    moved_at: Option<SystemTime>,
    /// When it last moved, or was first seen.
    since: Instant,
    /// Its lag then.
    lag_then: u64,
}

impl Console {
    /// A console over the node's parts; sampling starts with [`Console::run`].
    pub fn new(
        storage: Storage,
        consumers: Arc<Consumers>,
        metrics: Arc<Metrics>,
        s3: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            storage,
            consumers,
            metrics,
            s3,
            sampled: Mutex::new(Sampled::default()),
            latest: RwLock::default(),
        })
    }

    /// Samples every [`SAMPLE`] until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(Instant::now(), SystemTime::now()),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The per-category part of the view as of the last sample.
    pub fn categories(&self) -> Arc<Vec<CategoryView>> {
        self.latest.read().unwrap().clone()
    }

    /// Takes one sample at `now` (`wall`: the same instant on the clock).
    fn sample(&self, now: Instant, wall: SystemTime) {
        let names = self.storage.categories();
        let mut views = Vec::with_capacity(names.len());
        let mut guard = self.sampled.lock().unwrap();
        let s = &mut *guard;
        s.at.push_back(now);
        if s.at.len() > HISTORY {
            s.at.pop_front();
        }
        s.counters.retain(|c, _| names.binary_search(c).is_ok());
        s.consumers
            .retain(|(c, _), _| names.binary_search(c).is_ok());
        let wall_ms = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for name in names {
            let m = self.metrics.category(&name);
            let now_counts = (
                m.bytes_in.get() + m.bytes_replicated.get(),
                m.lines_in.get() + m.lines_replicated.get(),
            );
            let kept = s.at.len();
            let counts = s.counters.entry(name.clone()).or_insert_with(|| {
                // Counters live as long as the process: a category first
                // seen now had counted nothing at the previous sample.
                VecDeque::from_iter((kept > 1).then_some((0, 0)))
            });
            counts.push_back(now_counts);
            while counts.len() > kept {
                counts.pop_front();
            }
            let times: Vec<Instant> = s.at.iter().skip(kept - counts.len()).copied().collect();
            let counts: Vec<(u64, u64)> = counts.iter().copied().collect();
            let history = per_second(&times, &counts, |c| c.0);
            let recent = counts.len().saturating_sub(RATE_INTERVALS + 1);
            let bytes_per_second = average(&times[recent..], &counts[recent..], |c| c.0);
            let lines_per_second = average(&times[recent..], &counts[recent..], |c| c.1);

            let by_owner = chunks_by_owner(&self.storage, &name);
            let mut chunks = ChunkCounts::default();
            let mut oldest_not_uploaded: Option<u64> = None;
            for c in by_owner.values().flatten() {
                let m = &c.meta;
                chunks.total += 1;
                chunks.open += u64::from(!m.complete);
                chunks.local += u64::from(m.local);
                chunks.uploaded += u64::from(m.uploaded);
                chunks.evicted += u64::from(m.uploaded && !m.local);
                chunks.elsewhere += u64::from(m.elsewhere());
                chunks.bytes += m.size;
                if self.s3 && m.complete && !m.uploaded {
                    oldest_not_uploaded =
                        Some(oldest_not_uploaded.map_or(m.created_ms, |o| o.min(m.created_ms)));
                }
            }
            let mut consumers = Vec::new();
            for (consumer, entry) in self.consumers.list(&name) {
                let mut lag = 0;
                let mut oldest_unread: Option<u64> = None;
                for (owner, owned) in &by_owner {
                    let pos = entry.positions.get(owner);
                    lag += lag_bytes(pos, owned);
                    if let Some((c, _)) = next_unread(pos, owned) {
                        oldest_unread = Some(
                            oldest_unread.map_or(c.meta.created_ms, |o| o.min(c.meta.created_ms)),
                        );
                    }
                }
                let key = (name.clone(), consumer.clone());
                let seen = s.consumers.entry(key).or_insert_with(|| Seen {
                    positions: entry.positions.clone(),
                    moved_at: None,
                    since: now,
                    lag_then: lag,
                });
                if seen.positions != entry.positions {
                    seen.positions = entry.positions.clone();
                    seen.moved_at = Some(wall);
                    seen.since = now;
                    seen.lag_then = lag;
                }
                let stalled =
                    lag > seen.lag_then && now.duration_since(seen.since) >= STALLED_AFTER;
                consumers.push(ConsumerView {
                    positions: entry
                        .positions
                        .iter()
                        .map(|(owner, p)| {
                            let chunk = ChunkName::new(owner.clone(), p.index).to_string();
                            (
                                owner.clone(),
                                ChunkPosition {
                                    chunk,
                                    offset: p.offset,
                                },
                            )
                        })
                        .collect(),
                    name: consumer,
                    lag_bytes: lag,
                    lag_seconds: oldest_unread
                        .map_or(0.0, |t| wall_ms.saturating_sub(t) as f64 / 1000.0),
                    last_ack: seen
                        .moved_at
                        .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    last_ack_seconds: seen
                        .moved_at
                        .map(|t| wall.duration_since(t).unwrap_or_default().as_secs_f64()),
                    stalled,
                });
            }
            views.push(CategoryView {
                lines_per_second,
                bytes_per_second,
                history,
                chunks,
                oldest_not_uploaded_seconds: oldest_not_uploaded
                    .map(|t| wall_ms.saturating_sub(t) as f64 / 1000.0),
                max_consumer_lag_bytes: consumers.iter().map(|c| c.lag_bytes).max().unwrap_or(0),
                consumers,
                name,
            });
        }
        drop(guard);
        *self.latest.write().unwrap() = Arc::new(views);
    }
}

/// Per interval between consecutive samples, the rate of `value`.
fn per_second(times: &[Instant], counts: &[(u64, u64)], value: fn(&(u64, u64)) -> u64) -> Vec<f64> {
    times
        .windows(2)
        .zip(counts.windows(2))
        .map(|(t, c)| rate(t[0], t[1], value(&c[0]), value(&c[1])))
        .collect()
}

/// The rate of `value` from the first sample to the last (0 with fewer
/// than two).
fn average(times: &[Instant], counts: &[(u64, u64)], value: fn(&(u64, u64)) -> u64) -> f64 {
    match (times.first(), times.last(), counts.first(), counts.last()) {
        (Some(&t0), Some(&t1), Some(c0), Some(c1)) if times.len() > 1 => {
            rate(t0, t1, value(c0), value(c1))
        }
        _ => 0.0,
    }
}

fn rate(t0: Instant, t1: Instant, v0: u64, v1: u64) -> f64 {
    let dt = t1.duration_since(t0).as_secs_f64();
    if dt <= 0.0 {
        return 0.0;
    }
    v1.saturating_sub(v0) as f64 / dt
}

/// The node's last warnings and errors, and how many there were in each
/// of the last 30 ten-second buckets.
#[derive(Debug)]
struct Recent {
    events: VecDeque<LoggedEvent>,
    /// (bucket number: Unix seconds / 10, events in it), by bucket % 30.
    buckets: [(u64, u64); 30],
}

static RECENT: Mutex<Recent> = Mutex::new(Recent {
    events: VecDeque::new(),
    buckets: [(0, 0); 30],
});

/// This process's last warnings and errors, newest first.
pub fn recent_events() -> Vec<LoggedEvent> {
    RECENT
        .lock()
        .unwrap()
        .events
        .iter()
        .rev()
        .cloned()
        .collect()
}

/// Warnings and errors logged in the last 5 minutes (to 10 s).
pub fn events_last_5m(now: SystemTime) -> u64 {
    let bucket = unix_seconds(now) / 10;
    let r = RECENT.lock().unwrap();
    r.buckets
        .iter()
        .filter(|(b, _)| *b + 30 > bucket && *b <= bucket)
        .map(|(_, n)| n)
        .sum()
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record(event: LoggedEvent, at: SystemTime) {
    let bucket = unix_seconds(at) / 10;
    let mut r = RECENT.lock().unwrap();
    let slot = &mut r.buckets[(bucket % 30) as usize];
    if slot.0 != bucket {
        *slot = (bucket, 0);
    }
    slot.1 += 1;
    if r.events.len() == RECENT_EVENTS {
        r.events.pop_front();
    }
    r.events.push_back(event);
}

/// A `tracing` layer that keeps the process's warnings and errors for the
/// console (installed by the binary beside the log output).
#[derive(Debug, Default)]
pub struct RecentLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RecentLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if *meta.level() > tracing::Level::WARN {
            return;
        }
        let mut text = EventText::default();
        event.record(&mut text);
        let at = SystemTime::now();
        record(
            LoggedEvent {
                time: humantime::format_rfc3339_seconds(at).to_string(),
                level: meta.level().to_string(),
                target: meta.target().to_owned(),
                message: text.done(),
            },
            at,
        );
    }
}

/// An event's message followed by its fields as `key=value`.
#[derive(Default)]
struct EventText {
    message: String,
    fields: String,
}

impl EventText {
    fn done(self) -> String {
        let mut out = self.message;
        if !self.fields.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&self.fields);
        }
        out
    }
}

impl tracing::field::Visit for EventText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_between_samples() {
        let t0 = Instant::now();
        let times = [t0, t0 + Duration::from_secs(2), t0 + Duration::from_secs(4)];
        let counts = [(0, 0), (200, 10), (200, 30)];
        assert_eq!(per_second(&times, &counts, |c| c.0), vec![100.0, 0.0]);
        assert_eq!(per_second(&times, &counts, |c| c.1), vec![5.0, 10.0]);
        assert_eq!(average(&times, &counts, |c| c.1), 7.5);
        assert_eq!(average(&times[..1], &counts[..1], |c| c.1), 0.0);
        // A counter never goes back; if it did (a new registry), no
        // negative rate.
        assert_eq!(rate(t0, times[1], 10, 5), 0.0);
    }

    #[test]
    fn warnings_and_errors_are_kept_and_counted_by_time() {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(RecentLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            tracing::warn!(category = "app", n = 3, "disk is filling");
            tracing::error!("upload failed");
        });
        let events = recent_events();
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.target == module_path!())
            .collect();
        assert_eq!(mine.len(), 2, "{events:?}");
        assert_eq!(mine[0].level, "ERROR");
        assert_eq!(mine[0].message, "upload failed");
        assert_eq!(mine[1].level, "WARN");
        assert_eq!(mine[1].message, "disk is filling category=app n=3");
        let now = SystemTime::now();
        assert!(events_last_5m(now) >= 2);
        assert_eq!(events_last_5m(now + Duration::from_secs(600)), 0);
    }
}
