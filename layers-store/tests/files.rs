//! The plan and boot state on disk: atomic saves, `.prev` kept and used.

use std::fs;
use std::path::Path;

use layers_spec::{BootState, Layer, LayerState, OneShot, Plan, PlanError};
use layers_store::Store;
use layers_store::layout::PLAN_FILE;

fn plan(names: &[&str]) -> Plan {
    Plan::new(names.iter().map(|n| Layer::new(*n)).collect())
}

fn open(dir: &Path) -> Store {
    Store::open(dir).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn save_then_load_is_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Plan::parse(
        include_str!("../../layers-spec/tests/fixtures/full-plan.toml"),
        "full-plan.toml",
    )
    .unwrap();
    open(dir.path()).save_plan(&p).unwrap();
    let loaded = open(dir.path()).load_plan().unwrap();
    assert_eq!(loaded.value, p);
    assert!(loaded.fell_back.is_none());
    assert_eq!(loaded.path, dir.path().join(PLAN_FILE));

    p.layers[0].state = LayerState::Active;
    open(dir.path()).save_plan(&p).unwrap();
    assert_eq!(open(dir.path()).load_plan().unwrap().value, p);
    // Only the plan and the copy it replaced: no temporary files left behind.
    assert_eq!(
        files(dir.path()),
        ["overlayplan.toml", "overlayplan.toml.prev"]
    );
}

#[test]
fn the_previous_plan_is_kept_and_used_when_the_plan_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).save_plan(&plan(&["one"])).unwrap();
    assert!(
        !dir.path().join("overlayplan.toml.prev").exists(),
        "nothing to keep on the first save"
    );
    open(dir.path()).save_plan(&plan(&["two", "one"])).unwrap();
    let prev = fs::read_to_string(dir.path().join("overlayplan.toml.prev")).unwrap();
    assert_eq!(Plan::parse(&prev, "prev").unwrap(), plan(&["one"]));

    fs::write(
        dir.path().join(PLAN_FILE),
        "version = 1\n[[layer]]\nnme = \"x\"\n",
    )
    .unwrap();
    let loaded = open(dir.path()).load_plan().unwrap();
    assert_eq!(loaded.value, plan(&["one"]));
    assert_eq!(loaded.path, dir.path().join("overlayplan.toml.prev"));
    let why = loaded
        .fell_back
        .expect("the fallback is reported")
        .to_string();
    assert!(
        why.contains("overlayplan.toml:3:1: unknown key `nme`"),
        "{why}"
    );

    // Saving over a broken plan does not push the good previous copy out.
    open(dir.path())
        .save_plan(&plan(&["three", "one"]))
        .unwrap();
    let prev = fs::read_to_string(dir.path().join("overlayplan.toml.prev")).unwrap();
    assert_eq!(Plan::parse(&prev, "prev").unwrap(), plan(&["one"]));
}

#[test]
fn a_missing_plan_falls_back_too() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).save_plan(&plan(&["one"])).unwrap();
    open(dir.path()).save_plan(&plan(&["two", "one"])).unwrap();
    fs::remove_file(dir.path().join(PLAN_FILE)).unwrap();
    let loaded = open(dir.path()).load_plan().unwrap();
    assert_eq!(loaded.value, plan(&["one"]));
    assert!(matches!(loaded.fell_back, Some(PlanError::Io { .. })));
}

#[test]
fn no_usable_plan_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = open(dir.path()).load_plan().unwrap_err().to_string();
    assert!(
        err.contains("overlayplan.toml: reading: No such file"),
        "{err}"
    );
    assert!(
        err.contains("overlayplan.toml.prev: reading: No such file"),
        "{err}"
    );

    fs::write(dir.path().join(PLAN_FILE), "version = 7\n").unwrap();
    fs::write(dir.path().join("overlayplan.toml.prev"), "garbage =\n").unwrap();
    let err = open(dir.path()).load_plan().unwrap_err().to_string();
    assert!(
        err.contains("overlayplan.toml:1:11: version 7 is not supported"),
        "{err}"
    );
    assert!(
        err.contains("the previous copy could not be used either"),
        "{err}"
    );
    assert!(err.contains("overlayplan.toml.prev:1:"), "{err}");
}

#[test]
fn an_invalid_plan_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).save_plan(&plan(&["one"])).unwrap();
    let before = fs::read(dir.path().join(PLAN_FILE)).unwrap();
    let err = open(dir.path())
        .save_plan(&plan(&["one", "one"]))
        .unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    assert_eq!(fs::read(dir.path().join(PLAN_FILE)).unwrap(), before);
    assert_eq!(files(dir.path()), ["overlayplan.toml"]);
}

#[test]
fn a_missing_store_is_said_and_not_made() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-store");
    let err = Store::open(&missing).unwrap_err().to_string();
    assert!(err.contains("there is no store at"), "{err}");
    assert!(err.contains("no-such-store"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn a_symlinked_plan_or_state_folder_is_not_read_through() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let store = dir.path().join("store");
    fs::create_dir(&store).unwrap();
    open(&elsewhere).save_plan(&plan(&["one"])).unwrap();
    std::os::unix::fs::symlink(elsewhere.join(PLAN_FILE), store.join(PLAN_FILE)).unwrap();
    let err = open(&store).load_plan().unwrap_err().to_string();
    assert!(err.contains("it is a symlink"), "{err}");
    std::os::unix::fs::symlink(&elsewhere, store.join("state")).unwrap();
    let err = open(&store)
        .save_state(&BootState::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("state: opening: it is a symlink"), "{err}");
    assert_eq!(files(&elsewhere), [PLAN_FILE]);
}

#[test]
fn bad_boot_state_is_not_written_and_no_store_is_made_up() {
    let dir = tempfile::tempdir().unwrap();
    let state = BootState {
        last_good: vec!["../etc".into()],
        ..BootState::default()
    };
    let err = open(dir.path()).save_state(&state).unwrap_err().to_string();
    assert!(err.contains("layer name \"../etc\" is not valid"), "{err}");
    assert!(files(dir.path()).is_empty());
}

#[test]
fn boot_state_is_default_until_saved_and_then_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = open(dir.path()).load_state().unwrap();
    assert_eq!(loaded.value, BootState::default());

    let mut state = BootState::default();
    state.trial_tries.insert("upgrade-1".into(), 1);
    state.once = Some(OneShot {
        layers: vec!["base".into()],
        upper: None,
    });
    open(dir.path()).save_state(&state).unwrap();
    state.trial_tries.insert("upgrade-1".into(), 2);
    open(dir.path()).save_state(&state).unwrap();
    assert_eq!(open(dir.path()).load_state().unwrap().value, state);

    fs::write(dir.path().join("state/boot.toml"), "version = 1\nbroken").unwrap();
    let loaded = open(dir.path()).load_state().unwrap();
    assert_eq!(
        loaded.value.tries("upgrade-1"),
        1,
        "the previous state stands in"
    );
    assert!(loaded.fell_back.is_some());
}
