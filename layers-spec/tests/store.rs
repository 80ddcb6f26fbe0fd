//! The plan and boot state on disk: atomic saves, `.prev` kept and used.

use std::fs;
use std::path::Path;

use layers_spec::store::{self, PLAN_FILE};
use layers_spec::{BootState, Layer, LayerState, OneShot, Plan, PlanError};

fn plan(names: &[&str]) -> Plan {
    Plan::new(names.iter().map(|n| Layer::new(*n)).collect())
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
    let mut p = Plan::parse(include_str!("fixtures/design.toml"), "design.toml").unwrap();
    store::save_plan(dir.path(), &p).unwrap();
    let loaded = store::load_plan(dir.path()).unwrap();
    assert_eq!(loaded.value, p);
    assert!(loaded.fell_back.is_none());
    assert_eq!(loaded.path, dir.path().join(PLAN_FILE));

    p.layers[0].state = LayerState::Active;
    store::save_plan(dir.path(), &p).unwrap();
    assert_eq!(store::load_plan(dir.path()).unwrap().value, p);
    // Only the plan and the copy it replaced: no temporary files left behind.
    assert_eq!(
        files(dir.path()),
        ["overlayplan.toml", "overlayplan.toml.prev"]
    );
}

#[test]
fn the_previous_plan_is_kept_and_used_when_the_plan_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    store::save_plan(dir.path(), &plan(&["one"])).unwrap();
    assert!(
        !dir.path().join("overlayplan.toml.prev").exists(),
        "nothing to keep on the first save"
    );
    store::save_plan(dir.path(), &plan(&["two", "one"])).unwrap();
    let prev = fs::read_to_string(dir.path().join("overlayplan.toml.prev")).unwrap();
    assert_eq!(Plan::parse(&prev, "prev").unwrap(), plan(&["one"]));

    fs::write(
        dir.path().join(PLAN_FILE),
        "version = 1\n[[layer]]\nnme = \"x\"\n",
    )
    .unwrap();
    let loaded = store::load_plan(dir.path()).unwrap();
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
    store::save_plan(dir.path(), &plan(&["three", "one"])).unwrap();
    let prev = fs::read_to_string(dir.path().join("overlayplan.toml.prev")).unwrap();
    assert_eq!(Plan::parse(&prev, "prev").unwrap(), plan(&["one"]));
}

#[test]
fn a_missing_plan_falls_back_too() {
    let dir = tempfile::tempdir().unwrap();
    store::save_plan(dir.path(), &plan(&["one"])).unwrap();
    store::save_plan(dir.path(), &plan(&["two", "one"])).unwrap();
    fs::remove_file(dir.path().join(PLAN_FILE)).unwrap();
    let loaded = store::load_plan(dir.path()).unwrap();
    assert_eq!(loaded.value, plan(&["one"]));
    assert!(matches!(loaded.fell_back, Some(PlanError::Io { .. })));
}

#[test]
fn no_usable_plan_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = store::load_plan(dir.path()).unwrap_err().to_string();
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
    let err = store::load_plan(dir.path()).unwrap_err().to_string();
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
    store::save_plan(dir.path(), &plan(&["one"])).unwrap();
    let before = fs::read(dir.path().join(PLAN_FILE)).unwrap();
    let err = store::save_plan(dir.path(), &plan(&["one", "one"])).unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    assert_eq!(fs::read(dir.path().join(PLAN_FILE)).unwrap(), before);
    assert_eq!(files(dir.path()), ["overlayplan.toml"]);
}

#[test]
fn a_store_that_cannot_be_written_reports_where() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-store");
    let err = store::save_plan(&missing, &plan(&["one"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-store/.overlayplan.toml.new."),
        "{err}"
    );
    assert!(err.contains("writing the new copy"), "{err}");
}

#[test]
fn bad_boot_state_is_not_written_and_no_store_is_made_up() {
    let dir = tempfile::tempdir().unwrap();
    let state = BootState {
        last_good: vec!["../etc".into()],
        ..BootState::default()
    };
    let err = store::save_state(dir.path(), &state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer name \"../etc\" is not valid"), "{err}");
    assert!(files(dir.path()).is_empty());

    let missing = dir.path().join("no-such-store");
    let err = store::save_state(&missing, &BootState::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("creating the state directory"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn boot_state_is_default_until_saved_and_then_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = store::load_state(dir.path()).unwrap();
    assert_eq!(loaded.value, BootState::default());

    let mut state = BootState::default();
    state.trial_tries.insert("upgrade-1".into(), 1);
    state.once = Some(OneShot {
        layers: vec!["base".into()],
        upper: None,
    });
    store::save_state(dir.path(), &state).unwrap();
    state.trial_tries.insert("upgrade-1".into(), 2);
    store::save_state(dir.path(), &state).unwrap();
    assert_eq!(store::load_state(dir.path()).unwrap().value, state);

    fs::write(store::state_path(dir.path()), "version = 1\nbroken").unwrap();
    let loaded = store::load_state(dir.path()).unwrap();
    assert_eq!(
        loaded.value.tries("upgrade-1"),
        1,
        "the previous state stands in"
    );
    assert!(loaded.fell_back.is_some());
}
