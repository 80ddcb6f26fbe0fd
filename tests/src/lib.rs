//! Helpers for Strata's integration tests: the rule for tests that need root, and a private mount
//! namespace for real overlay mounts.
//!
//! With `CI=true` no test may skip itself: a privileged test that cannot run fails.

pub mod debian;
pub mod fuzz_checks;
pub mod layergen;
pub mod oci;
pub mod powercut;
pub mod views;
pub mod vm;

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

/// A privileged test's scratch directory: a temporary directory holding `run/` (where
/// `overlayctl` looks for the boot record), in a private mount namespace.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// `None` when the test cannot run (no root, outside CI).
    pub fn new(test: &str) -> Option<Self> {
        if !have_root(test) {
            return None;
        }
        private_mount_namespace();
        let scratch = Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        std::fs::create_dir(scratch.path("run")).expect("creating run/");
        Some(scratch)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `overlayctl --store STORE ARGS`, with this scratch's run directory and no store from
    /// the environment.
    pub fn overlayctl(&self, store: &Path, args: &[&str]) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::cargo_bin("overlayctl").expect("overlayctl is built");
        cmd.env("STRATA_RUN_DIR", self.path("run"))
            .env_remove("STRATA_STORE")
            .arg("--store")
            .arg(store)
            .args(args);
        cmd
    }
}

/// True when running under CI, where skipping is forbidden.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether a privileged test can run. Without root it is skipped with a message on a developer
/// machine, and fails under CI.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test} needs root, and with CI=true no test may skip itself"
    );
    eprintln!("skipping {test}: it needs root (run the test command as root)");
    false
}

/// Moves the calling thread into a private mount namespace, so its mounts vanish with it and are
/// never seen by the rest of the system.
pub fn private_mount_namespace() {
    overlayctl::run::private_mount_namespace().expect("a private mount namespace");
}

/// The options that keep an upper a clean, portable future layer (see docs/overlayfs.md).
/// `redirect_dir=nofollow` rather than `off`: `off` still follows redirects found in lowers,
/// and the kernel refuses it together with `userxattr` ("conflicting options").
pub const CLEAN_UPPER_OPTIONS: &str = "redirect_dir=nofollow,index=off,metacopy=off,xino=off";

/// Creates `upper`, `work` and `merged` under `scratch`, for [`mount_overlay`].
pub fn overlay_dirs(
    scratch: &Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dirs = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("merged"),
    );
    for dir in [&dirs.0, &dirs.1, &dirs.2] {
        std::fs::create_dir_all(dir).expect("creating overlay scratch directories");
    }
    dirs
}

/// Mounts an overlay of `lowers` (top first) with a writable upper at `target`; `extra` is
/// appended to the options (such as `userxattr`).
pub fn mount_overlay(
    lowers: &[&Path],
    upper: &Path,
    work: &Path,
    target: &Path,
    extra: &str,
) -> nix::Result<()> {
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let mut options = format!(
        "lowerdir={},upperdir={},workdir={},{CLEAN_UPPER_OPTIONS}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    if !extra.is_empty() {
        options = format!("{options},{extra}");
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
}

/// Runs the workspace's `overlayctl` on `store`, as a system not booted by Strata (no boot
/// record), and returns what it printed; panics with its error output when it fails.
pub fn overlayctl(store: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("overlayctl"))
        .env("STRATA_RUN_DIR", "/nonexistent/strata-run")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("running overlayctl");
    assert!(
        out.status.success(),
        "overlayctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("overlayctl prints UTF-8")
}

/// A proptest runner for the differential tests against the kernel: 150 cases, or
/// `STRATA_DIFF_CASES`; failures are not persisted (each run draws afresh).
pub fn diff_runner() -> proptest::test_runner::TestRunner {
    let cases = std::env::var("STRATA_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })
}

/// The names in a directory, sorted; none when it does not exist.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
