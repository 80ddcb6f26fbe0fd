//! The fuzz corpora replayed on stable: every committed input of each target in `fuzz/` (its
//! corpus, and the minimized crashers kept in `fuzz/regressions/`) goes through the check the
//! target runs (`tests::fuzz_checks`), so what the fuzzer once found stays fixed without nightly.
//! A missing or empty corpus fails, so that a moved folder cannot make this pass by testing
//! nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use tests::fuzz_checks;

/// A fuzz target's check: panics when an input breaks what must hold.
type Check = fn(&[u8]);

/// Every target, by the name of its file in `fuzz/fuzz_targets/`, with its check.
const TARGETS: &[(&str, Check)] = &[
    ("plan", fuzz_checks::plan),
    ("state", fuzz_checks::state),
    ("legacy", fuzz_checks::legacy),
    ("cmdline", fuzz_checks::cmdline),
    ("bundle", fuzz_checks::bundle),
    ("bundle_manifest", fuzz_checks::bundle_manifest),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files in `dir`, sorted, with their bytes; none when it does not exist.
fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, data)
        })
        .collect()
}

/// Runs `target`'s check on each of its inputs, and reports every one that fails, not only the
/// first.
fn replay(target: &str) {
    let check = TARGETS.iter().find(|(name, _)| *name == target).unwrap().1;
    let corpus = inputs(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is missing or empty; it holds the seeds and what fuzzing found \
         (scripts/fuzz {target} grows it)"
    );
    let regressions = inputs(&fuzz_dir().join("regressions").join(target));
    let mut failed = Vec::new();
    for (path, data) in corpus.iter().chain(&regressions) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(data))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failed.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {target} fail:\n{}",
        failed.len(),
        corpus.len() + regressions.len(),
        failed.join("\n")
    );
}

#[test]
fn fuzz_corpus_plan() {
    replay("plan");
}

#[test]
fn fuzz_corpus_state() {
    replay("state");
}

#[test]
fn fuzz_corpus_legacy() {
    replay("legacy");
}

#[test]
fn fuzz_corpus_cmdline() {
    replay("cmdline");
}

#[test]
fn fuzz_corpus_bundle() {
    replay("bundle");
}

#[test]
fn fuzz_corpus_bundle_manifest() {
    replay("bundle_manifest");
}

/// A target added to `fuzz/` without a replay here would never run on stable.
#[test]
fn fuzz_corpus_every_target_is_replayed() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| {
            let path = e.unwrap().path();
            path.file_stem().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    on_disk.sort();
    let mut here: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    here.sort();
    assert_eq!(on_disk, here);
}
