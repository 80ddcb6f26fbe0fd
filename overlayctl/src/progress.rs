//! Progress for long jobs, on a terminal only: a spinner line on stderr saying what is being
//! done, with counters the engine bumps as it goes (entries read, bytes copied or hashed; one
//! relaxed atomic add each), and a summary line when it is done. Nothing is drawn when stderr is
//! not a terminal (scripts, units) or with `--json`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use layers_spec::size::human;

static ENABLED: AtomicBool = AtomicBool::new(false);
static ENTRIES: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Turns progress on for this process when stderr is a terminal and `quiet` is not asked.
pub fn enable(quiet: bool) {
    ENABLED.store(!quiet && std::io::stderr().is_terminal(), Ordering::Relaxed);
}

/// `n` more entries read or written.
pub fn entries(n: u64) {
    ENTRIES.fetch_add(n, Ordering::Relaxed);
}

/// `n` more bytes copied or hashed.
pub fn bytes(n: u64) {
    BYTES.fetch_add(n, Ordering::Relaxed);
}

/// One long job's line, from `start` until dropped.
#[derive(Debug)]
pub struct Phase {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    started: Instant,
}

impl Phase {
    /// Starts showing `what` (a phrase: "adding layer up-1").
    pub fn start(what: impl Into<String>) -> Self {
        let what = what.into();
        let started = Instant::now();
        if !ENABLED.load(Ordering::Relaxed) {
            return Self {
                bar: None,
                what,
                started,
            };
        }
        ENTRIES.store(0, Ordering::Relaxed);
        BYTES.store(0, Ordering::Relaxed);
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(what.clone());
        bar.enable_steady_tick(Duration::from_millis(100));
        // The message follows the counters; the thread ends with the bar.
        let shown = bar.downgrade();
        let label = what.clone();
        std::thread::spawn(move || {
            while let Some(bar) = shown.upgrade() {
                if bar.is_finished() {
                    break;
                }
                bar.set_message(format!("{label}: {}", counters()));
                drop(bar);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            bar: Some(bar),
            what,
            started,
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            eprintln!(
                "{}: {} in {:.1} s",
                self.what,
                counters(),
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

fn counters() -> String {
    let (entries, bytes) = (
        ENTRIES.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    format!("{entries} entries, {} of content", human(bytes))
}
