//! Fault injection for the crash tests: with the `fault-injection` feature (which only the
//! tests turn on, through overlayctl's feature of that name), `STRATA_FAULT=NAME` makes the
//! process abort at the point called NAME, as a crash or power cut there would stop it, and
//! `STRATA_FAIL=NAME` makes the step called NAME fail as an I/O error would. Without the
//! feature the points are empty.

/// Aborts here when `STRATA_FAULT` names this point (test builds only).
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    if std::env::var("STRATA_FAULT").is_ok_and(|v| v == name) {
        eprintln!("fault injected at {name}: aborting");
        std::process::abort();
    }
}

/// A fault-injection point; empty in this build.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// True when `STRATA_FAIL` names this step, which should then fail (test builds only).
#[cfg(feature = "fault-injection")]
pub fn fails(name: &str) -> bool {
    std::env::var("STRATA_FAIL").is_ok_and(|v| v == name)
}

/// A step that fails on request; never in this build.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fails(_name: &str) -> bool {
    false
}
