//! Progress of long operations on stderr: count, total, rate and time left, drawn only
//! when stderr is a terminal (quiet in scripts and logs).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::{
    io::IsTerminal,
    sync::atomic::{AtomicUsize, Ordering},
};

/// Test hook: after this many dead letters are done, the tool stops making progress
/// (without exiting) so a test can kill it mid-replay. Not for operators.
const STALL_ENV: &str = "STEADFAST_TEST_STALL_AFTER";

/// A progress bar over `total` items (an upper bound when a filter selects fewer).
pub(super) struct Progress {
    bar: ProgressBar,
    stall_after: Option<usize>,
    count: AtomicUsize,
}

impl Progress {
    pub(super) fn new(verb: &str, total: u64) -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        if let Ok(style) = ProgressStyle::with_template(&format!(
            "{verb} {{pos}}/{{len}} [{{bar:30}}] {{per_sec}}, {{eta}} left"
        )) {
            bar.set_style(style.progress_chars("=> "));
        }
        Self {
            bar,
            stall_after: std::env::var(STALL_ENV).ok().and_then(|v| v.parse().ok()),
            count: AtomicUsize::new(0),
        }
    }

    pub(super) fn tick(&self) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar.inc(1);
        if self.stall_after == Some(n) {
            eprintln!("\nstalled after {n} ({STALL_ENV})");
            // Test hook only: block this thread for good, so a test can SIGKILL the
            // process with some dead letters done and others in flight.
            loop {
                std::thread::park();
            }
        }
    }

    pub(super) fn done(&self) {
        self.bar.finish_and_clear();
    }
}
