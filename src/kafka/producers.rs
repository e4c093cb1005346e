//! Idempotent producers: the sequence numbers a partition's owner has seen
//! from each producer, so that a batch a producer sends again (its answer
//! was lost, the connection broke) is stored once.
//!
//! As in Kafka, the owner keeps per (producer id, topic) the epoch and the
//! last [`KEPT_BATCHES`] batches' sequence ranges with the line number each
//! was stored at; a producer has at most that many requests in flight. A
//! batch equal to a kept one is answered with the offset it got the first
//! time, without storing it again; the batch after the last is stored; any
//! other sequence is refused. The state here is in memory; each batch is
//! also recorded with its lines in the category's producer log
//! (`storage::producers`), from which the broker restores a producer it
//! does not know (forgotten after [`MAX_PRODUCERS`] others, or from before
//! the owner restarted) before checking its batch. A producer neither
//! knows is accepted at any sequence, which is also what Kafka does when
//! it no longer has a producer's state (docs/kafka.md).
//!
//! Producer ids are random 63-bit numbers drawn by whichever node answers
//! InitProducerId: nodes need not agree on anything to hand them out.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Batches remembered per producer and topic (Kafka clients keep at most
/// five requests in flight when idempotent).
pub const KEPT_BATCHES: usize = 5;
/// Producers remembered by a node; past it, those unused longest are
/// forgotten (a tenth at a time).
pub const MAX_PRODUCERS: usize = 50_000;

/// The idempotence fields of a produced batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    pub producer_id: i64,
    pub epoch: i16,
    pub first: i32,
    /// The sequence of the batch's last record.
    pub last: i32,
}

impl Sequence {
    /// The sequence of a batch of `count` records starting at `first`
    /// (sequences wrap from `i32::MAX` to 0).
    pub fn of_batch(producer_id: i64, epoch: i16, first: i32, count: u64) -> Self {
        let last = ((first as i64 + count as i64 - 1) % (i32::MAX as i64 + 1)) as i32;
        Self {
            producer_id,
            epoch,
            first,
            last,
        }
    }
}

/// What to do with a produced batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Store it.
    Append,
    /// Stored before, at this line number: answer with it, store nothing.
    Duplicate(u64),
    /// Older than the batches kept: stored before, offset unknown.
    OldDuplicate,
    /// A gap or a sequence from another run of the producer.
    OutOfOrder { expected: i32 },
    /// An epoch older than the one seen last.
    Fenced { current: i16 },
}

/// One producer's state for one topic.
#[derive(Debug, Default)]
pub struct State {
    epoch: Option<i16>,
    /// (first sequence, last sequence, first line), oldest first.
    batches: VecDeque<(i32, i32, u64)>,
}

impl State {
    pub fn check(&self, s: &Sequence) -> Check {
        let Some(epoch) = self.epoch else {
            return Check::Append;
        };
        if s.epoch < epoch {
            return Check::Fenced { current: epoch };
        }
        if s.epoch > epoch {
            // A new epoch starts its sequences at 0.
            return match s.first {
                0 => Check::Append,
                _ => Check::OutOfOrder { expected: 0 },
            };
        }
        if let Some(&(_, _, line)) = self
            .batches
            .iter()
            .find(|&&(first, last, _)| first == s.first && last == s.last)
        {
            return Check::Duplicate(line);
        }
        let Some(&(_, last, _)) = self.batches.back() else {
            return Check::Append;
        };
        let expected = next(last);
        if s.first == expected {
            return Check::Append;
        }
        // Behind what was stored last (within half the sequence space):
        // an old retry.
        let behind = (last as i64 - s.first as i64).rem_euclid(i32::MAX as i64 + 1);
        if behind < (1 << 30) {
            Check::OldDuplicate
        } else {
            Check::OutOfOrder { expected }
        }
    }

    /// Whether this node has seen the producer (since it started).
    pub fn known(&self) -> bool {
        self.epoch.is_some()
    }

    /// Records a batch stored at line `line`.
    pub fn stored(&mut self, s: &Sequence, line: u64) {
        if self.epoch != Some(s.epoch) {
            self.batches.clear();
        }
        self.epoch = Some(s.epoch);
        if self.batches.len() == KEPT_BATCHES {
            self.batches.pop_front();
        }
        self.batches.push_back((s.first, s.last, line));
    }
}

fn next(seq: i32) -> i32 {
    if seq == i32::MAX { 0 } else { seq + 1 }
}

/// Every producer's state on this node, per (producer id, topic). A
/// producer's state is locked while its batch is checked and stored.
#[derive(Debug, Default)]
pub struct Producers {
    map: Mutex<HashMap<(i64, String), Slot>>,
}

#[derive(Debug)]
struct Slot {
    state: Arc<tokio::sync::Mutex<State>>,
    used: Instant,
}

impl Producers {
    /// The state of `producer_id` for `topic`, created when unknown.
    pub fn state(&self, producer_id: i64, topic: &str) -> Arc<tokio::sync::Mutex<State>> {
        let mut map = self.map.lock().unwrap();
        let now = Instant::now();
        if let Some(slot) = map.get_mut(&(producer_id, topic.to_owned())) {
            slot.used = now;
            return slot.state.clone();
        }
        if map.len() >= MAX_PRODUCERS {
            let mut used: Vec<Instant> = map.values().map(|s| s.used).collect();
            let cut = MAX_PRODUCERS / 10;
            used.select_nth_unstable(cut);
            let before = used[cut];
            map.retain(|_, s| s.used > before);
        }
        let state = Arc::new(tokio::sync::Mutex::new(State::default()));
        map.insert(
            (producer_id, topic.to_owned()),
            Slot {
                state: state.clone(),
                used: now,
            },
        );
        state
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

/// A new producer id: random, non-negative.
pub fn new_producer_id() -> i64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded from the OS's random source.
    let r = std::collections::hash_map::RandomState::new().hash_one((n, std::process::id()));
    (r >> 1) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(epoch: i16, first: i32, count: u64) -> Sequence {
        Sequence::of_batch(7, epoch, first, count)
    }

    #[test]
    fn a_retried_batch_is_answered_with_its_first_offset() {
        let mut s = State::default();
        assert_eq!(s.check(&seq(0, 0, 3)), Check::Append);
        s.stored(&seq(0, 0, 3), 100);
        assert_eq!(s.check(&seq(0, 3, 2)), Check::Append);
        s.stored(&seq(0, 3, 2), 103);
        assert_eq!(s.check(&seq(0, 0, 3)), Check::Duplicate(100));
        assert_eq!(s.check(&seq(0, 3, 2)), Check::Duplicate(103));
        assert_eq!(s.check(&seq(0, 6, 1)), Check::OutOfOrder { expected: 5 });
        assert_eq!(s.check(&seq(0, 5, 1)), Check::Append);
    }

    #[test]
    fn only_the_last_five_batches_are_answered_with_offsets() {
        let mut s = State::default();
        for i in 0..7 {
            s.stored(&seq(0, i, 1), i as u64 * 10);
        }
        assert_eq!(s.check(&seq(0, 1, 1)), Check::OldDuplicate);
        assert_eq!(s.check(&seq(0, 2, 1)), Check::Duplicate(20));
        assert_eq!(s.check(&seq(0, 7, 1)), Check::Append);
    }

    #[test]
    fn epochs_fence_older_runs_and_restart_sequences() {
        let mut s = State::default();
        s.stored(&seq(1, 0, 4), 0);
        assert_eq!(s.check(&seq(0, 4, 1)), Check::Fenced { current: 1 });
        assert_eq!(s.check(&seq(2, 4, 1)), Check::OutOfOrder { expected: 0 });
        assert_eq!(s.check(&seq(2, 0, 1)), Check::Append);
        s.stored(&seq(2, 0, 1), 4);
        assert_eq!(s.check(&seq(2, 0, 1)), Check::Duplicate(4));
    }

    #[test]
    fn sequences_wrap_at_the_top_of_the_int32_range() {
        let a = seq(0, i32::MAX - 1, 4);
        assert_eq!(a.last, 1);
        let mut s = State::default();
        s.stored(&a, 0);
        assert_eq!(s.check(&seq(0, 2, 1)), Check::Append);
        assert_eq!(s.check(&seq(0, 0, 1)), Check::OldDuplicate);
    }

    #[test]
    fn an_unknown_producer_is_accepted_at_any_sequence() {
        assert_eq!(State::default().check(&seq(3, 12345, 1)), Check::Append);
    }

    #[test]
    fn the_producers_kept_are_bounded() {
        let p = Producers::default();
        for id in 0..(MAX_PRODUCERS as i64 + 10) {
            p.state(id, "t");
        }
        assert!(p.len() <= MAX_PRODUCERS, "{}", p.len());
        assert!(new_producer_id() >= 0 && new_producer_id() != new_producer_id());
    }
}
