//! Progress bars of long CLI work (`produce FILE`, `ship` catching up,
//! `consume --until-idle`), on stderr, only when stderr is a terminal: a
//! pipe or a log file gets the final summary line and nothing else.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a bar is redrawn at most.
const REDRAW_HZ: u8 = 5;

/// A bar of bytes with lines per second beside it.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    lines: u64,
    last_message: Instant,
}

impl Progress {
    /// A bar for `what`, out of `total` bytes when known (then with a
    /// percentage and an ETA). Hidden unless stderr is a terminal and
    /// `show` (e.g. "stdout is not the terminal the bar would garble").
    pub fn new(what: &str, total: Option<u64>, show: bool) -> Self {
        let target = if show && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr_with_hz(REDRAW_HZ)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(total, target);
        let template = if total.is_some() {
            "{prefix} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} {msg} ETA {eta}"
        } else {
            "{prefix} {spinner} {bytes} {bytes_per_sec} {msg}"
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            bar,
            started: Instant::now(),
            lines: 0,
            last_message: Instant::now(),
        }
    }

    /// `bytes` holding `lines` lines are done.
    pub fn add(&mut self, bytes: u64, lines: u64) {
        self.bar.inc(bytes);
        self.lines += lines;
        if self.last_message.elapsed() >= Duration::from_millis(200) {
            self.last_message = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            self.bar
                .set_message(format!("{:.0} lines/s", self.lines as f64 / secs));
        }
    }

    /// The total became known or changed (work found while going).
    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.bar.position()
    }

    /// Removes the bar (the caller prints its own summary).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
