//! `overlayctl` run as a user runs it: each test has its own store and one command builder.

use std::fs;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use tempfile::TempDir;

const XO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../layers-spec/tests/fixtures/xo.overlayplan"
);

/// A scratch store and a way to run `overlayctl` against it.
struct Store {
    dir: TempDir,
}

impl Store {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::cargo_bin("overlayctl").unwrap();
        cmd.env_remove("STRATA_STORE")
            .arg("--store")
            .arg(self.path())
            .args(args);
        cmd
    }

    fn plan(&self) -> PathBuf {
        self.path().join("overlayplan.toml")
    }
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.assert().success().get_output().stdout.clone();
    String::from_utf8(out).unwrap()
}

fn stderr_of_failure(cmd: &mut Command) -> String {
    let out = cmd.assert().failure().code(1).get_output().stderr.clone();
    String::from_utf8(out).unwrap()
}

#[test]
fn the_xo_example_imports_and_shows_top_first() {
    let store = Store::new();
    let said = stdout(&mut store.cmd(&["import-legacy", XO]));
    assert!(said.starts_with("imported 4 layers into "), "{said}");

    // No layer directories exist yet, so no row is marked for the next boot. Names are never
    // cut; titles too long for 80 columns get a line of their own.
    let table = stdout(&mut store.cmd(&[]));
    insta::assert_snapshot!("xo_status_without_layers", table);
    assert!(
        table.lines().all(|l| l.chars().count() <= 80),
        "fits 80 columns:\n{table}"
    );

    for name in ["basesystem", "upgrade-2007-05-18-nastystuff"] {
        fs::create_dir_all(store.path().join("layers").join(name)).unwrap();
    }
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&mut store.cmd(&["status", "--json"]))).unwrap();
    assert_eq!(
        json["next_boot"],
        serde_json::json!(["upgrade-2007-05-18-nastystuff", "basesystem"])
    );
    assert_eq!(json["layers"][1]["trial_tries_left"], 3);
    assert_eq!(json["layers"][3]["title"], "Core System Image");
    assert_eq!(json["layers"][0]["left_out"], "missing from the store");
}

#[test]
fn a_misspelt_key_fails_naming_line_and_column() {
    let store = Store::new();
    fs::write(
        store.plan(),
        "version = 1\n[[layer]]\nname = \"base\"\nstate = \"active\"\nknown_god = true\n",
    )
    .unwrap();
    let err = stderr_of_failure(&mut store.cmd(&["check"]));
    assert!(
        err.contains("overlayplan.toml:5:1: unknown key `known_god`, expected one of"),
        "{err}"
    );
    assert!(err.contains("`known_good`"), "{err}");
}

#[test]
fn check_accepts_a_good_plan() {
    let store = Store::new();
    stdout(&mut store.cmd(&["import-legacy", XO]));
    let said = stdout(&mut store.cmd(&["check"]));
    assert!(
        said.ends_with("overlayplan.toml: a valid plan of 4 layers\n"),
        "{said}"
    );
}

#[test]
fn bad_legacy_input_changes_nothing() {
    let store = Store::new();
    let bad = store.path().join("bad.overlayplan");
    fs::write(&bad, "[Layers]\nbase=\"Core\",ro\nnext=\"Oops\",rw\n").unwrap();
    let err = stderr_of_failure(&mut store.cmd(&["import-legacy", bad.to_str().unwrap()]));
    assert!(
        err.contains("bad.overlayplan:3:13: unknown flag \"rw\""),
        "{err}"
    );
    assert!(!store.plan().exists());
}

#[test]
fn import_does_not_replace_a_plan_unless_forced() {
    let store = Store::new();
    stdout(&mut store.cmd(&["import-legacy", XO]));
    let before = fs::read(store.plan()).unwrap();
    let err = stderr_of_failure(&mut store.cmd(&["import-legacy", XO]));
    assert!(err.contains("already exists; pass --force"), "{err}");
    assert_eq!(fs::read(store.plan()).unwrap(), before);
    stdout(&mut store.cmd(&["import-legacy", "--force", XO]));
    assert!(store.path().join("overlayplan.toml.prev").exists());
}

#[test]
fn a_store_without_a_plan_is_a_clear_error() {
    let store = Store::new();
    let err = stderr_of_failure(&mut store.cmd(&["status"]));
    assert!(err.contains("loading the plan of the store at"), "{err}");
    assert!(
        err.contains("overlayplan.toml.prev: reading: No such file"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let store = Store::new();
    store.cmd(&["frobnicate"]).assert().failure().code(2);
}
