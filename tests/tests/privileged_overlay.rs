//! The plan's resolved stack, mounted by the kernel's own overlayfs: rollback with `strata.top`
//! really hides the upgrade, and whiteouts in a layer really delete files below. Root, in a
//! private mount namespace.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use layers_spec::{BootOverrides, BootState, Plan, resolve};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use tests::{have_root, mount_overlay, overlay_dirs, private_mount_namespace};

const PLAN: &str = r#"
version = 1

[[layer]]
name = "upgrade-2"
state = "trial"
parent = "upgrade-1"

[[layer]]
name = "upgrade-1"
parent = "base"

[[layer]]
name = "base"
known_good = true
"#;

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// Mounts the stack resolved for `cmdline` and returns (path, content) of every merged file.
fn boot(
    store: &Path,
    plan: &Plan,
    state: &BootState,
    cmdline: &str,
    scratch: &Path,
) -> Vec<(String, String)> {
    let (overrides, problems) = BootOverrides::parse(cmdline);
    assert!(problems.is_empty());
    let present = |name: &str| store.join("layers").join(name).is_dir();
    let stack = resolve(plan, state, &overrides, Some(&present)).stack;
    let lowers: Vec<_> = stack.iter().map(|n| store.join("layers").join(n)).collect();
    let lowers: Vec<&Path> = lowers.iter().map(|p| p.as_path()).collect();
    let (upper, work, merged) = overlay_dirs(scratch);
    mount_overlay(&lowers, &upper, &work, &merged, "").expect("overlay mount");
    let mut files: Vec<(String, String)> = fs::read_dir(&merged)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    nix::mount::umount(&merged).unwrap();
    files
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn privileged_resolved_stacks_mount_as_the_plan_says() {
    if !have_root("privileged_resolved_stacks_mount_as_the_plan_says") {
        return;
    }
    private_mount_namespace();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let layers = store.join("layers");
    write(&layers.join("base/motd"), "base\n");
    write(&layers.join("base/old-tool"), "old\n");
    write(&layers.join("upgrade-1/motd"), "upgrade 1\n");
    // upgrade-1 deletes old-tool: a whiteout, the 0/0 character device.
    mknod(
        &layers.join("upgrade-1/old-tool"),
        SFlag::S_IFCHR,
        Mode::empty(),
        makedev(0, 0),
    )
    .unwrap();
    assert!(
        fs::metadata(layers.join("upgrade-1/old-tool"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    write(&layers.join("upgrade-2/motd"), "upgrade 2\n");
    write(&layers.join("upgrade-2/new-tool"), "new\n");
    let plan = Plan::parse(PLAN, "plan").unwrap();

    let everything = boot(
        &store,
        &plan,
        &BootState::default(),
        "",
        &dir.path().join("a"),
    );
    assert_eq!(
        everything,
        pairs(&[("motd", "upgrade 2\n"), ("new-tool", "new\n")])
    );

    let rolled_back = boot(
        &store,
        &plan,
        &BootState::default(),
        "strata.top=upgrade-1",
        &dir.path().join("b"),
    );
    assert_eq!(rolled_back, pairs(&[("motd", "upgrade 1\n")]));

    let base_only = boot(
        &store,
        &plan,
        &BootState::default(),
        "strata.top=base",
        &dir.path().join("c"),
    );
    assert_eq!(
        base_only,
        pairs(&[("motd", "base\n"), ("old-tool", "old\n")])
    );

    // A trial layer that used its boots drops out by itself.
    let mut state = BootState::default();
    state
        .trial_tries
        .insert("upgrade-2".into(), plan.boot.trial_boots);
    let exhausted = boot(&store, &plan, &state, "", &dir.path().join("d"));
    assert_eq!(exhausted, rolled_back);
}
