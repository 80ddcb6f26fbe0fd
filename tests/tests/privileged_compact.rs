//! Compaction against the kernel: for random stacks and a random run of adjacent layers in
//! them, the run is compacted into one layer (files hard-linked from the run), and the stack
//! with that layer in the run's place must show exactly what the original stack showed, in the
//! engine's merged view and through a real overlay mount, hard-link groups included. Root only.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use overlayctl::engine::compact::{Below, compact};
use overlayctl::engine::copy::{Linking, link_layer};
use overlayctl::engine::{Layer, Manifest, XattrNs};
use proptest::prelude::*;
use tests::layergen::{LayerSpec, stack, write_layer};
use tests::views::{engine_view, first_difference, kernel_view};
use tests::{dir_names, have_root, mount_overlay, overlay_dirs, private_mount_namespace};

fn mounted_view(
    scratch: &Path,
    name: &str,
    lowers: &[PathBuf],
) -> (BTreeMap<PathBuf, tests::views::Seen>, Vec<Vec<PathBuf>>) {
    let (upper, work, merged) = overlay_dirs(&scratch.join(name));
    let lowers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount_overlay(&lowers, &upper, &work, &merged, "").expect("mounting a stack");
    let mut view = kernel_view(&merged);
    // The names of each file that has more than one.
    let mut groups: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for rel in view.keys() {
        if let Ok(meta) = fs::symlink_metadata(merged.join(rel))
            && meta.is_file()
            && meta.nlink() > 1
        {
            groups
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
    }
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
    // The mount's root takes its attributes from the (empty) upper.
    view.remove(Path::new(""));
    let groups = groups.into_values().filter(|g| g.len() > 1).collect();
    (view, groups)
}

fn check_compact(
    scratch: &Path,
    layers: &[LayerSpec],
    run_start: usize,
    run_len: usize,
) -> Result<(), TestCaseError> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    let dirs: Vec<PathBuf> = layers
        .iter()
        .enumerate()
        .map(|(i, (children, _))| {
            let dir = scratch.join(format!("l{i}"));
            fs::create_dir_all(&dir).unwrap();
            write_layer(&dir, children, XattrNs::Trusted);
            dir
        })
        .collect();
    let start = run_start % dirs.len();
    let end = (start + 1 + run_len % (dirs.len() - start)).min(dirs.len());
    let read = Layer::read_all(&dirs, XattrNs::Trusted).unwrap();
    let below = Below::open(&dirs[end..], XattrNs::Trusted).unwrap();
    let made = compact(&read[start..end], &below);
    let run_layers = &read[start..end];
    let run_dirs = &dirs[start..end];
    link_layer(
        &made.tree,
        run_dirs,
        &|rel| made.sources[rel],
        Linking::Checked,
        scratch,
        "c".as_ref(),
    )
    .unwrap();
    let mut compacted = dirs[..start].to_vec();
    compacted.push(scratch.join("c"));
    compacted.extend(dirs[end..].iter().cloned());

    let before = engine_view(&read);
    let after = engine_view(&Layer::read_all(&compacted, XattrNs::Trusted).unwrap());
    if let Some(diff) = first_difference(&before, &after) {
        return Err(TestCaseError::fail(format!(
            "engine, run {start}..{end} compacted: {diff}"
        )));
    }
    let (kernel_before, links_before) = mounted_view(scratch, "before", &dirs);
    let (kernel_after, links_after) = mounted_view(scratch, "after", &compacted);
    if let Some(diff) = first_difference(&kernel_before, &kernel_after) {
        return Err(TestCaseError::fail(format!(
            "kernel, run {start}..{end} compacted: {diff}"
        )));
    }
    if links_before != links_after {
        return Err(TestCaseError::fail(format!(
            "hard links differ: before {links_before:?}, after {links_after:?}"
        )));
    }

    // Planned from the run's manifests alone (as `overlayctl compact` does), the same layer.
    let described: Vec<Layer> = run_layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            Manifest::of_layer(l)
                .unwrap()
                .to_layer(&l.root, XattrNs::Trusted, u64::MAX - i as u64)
                .unwrap()
        })
        .collect();
    let planned = compact(&described, &below);
    link_layer(
        &planned.tree,
        run_dirs,
        &|rel| planned.sources[rel],
        Linking::Checked,
        scratch,
        "m".as_ref(),
    )
    .unwrap();
    let manifest = |dir: &str| {
        Manifest::of_layer(&Layer::read(&scratch.join(dir), XattrNs::Trusted).unwrap()).unwrap()
    };
    let (walked, from_manifests) = (manifest("c"), manifest("m"));
    if let Some(path) = walked.first_difference(&from_manifests) {
        return Err(TestCaseError::fail(format!(
            "run {start}..{end} compacted from its manifests differs at {path}\nwalked:\n{}\nfrom manifests:\n{}",
            walked.text, from_manifests.text
        )));
    }
    Ok(())
}

#[test]
fn privileged_compact_stack_shows_what_the_original_showed() {
    if !have_root("privileged_compact_stack_shows_what_the_original_showed") {
        return;
    }
    private_mount_namespace();
    let scratch = tempfile::tempdir().unwrap();
    let mut runner = tests::diff_runner();
    let strategy = (stack(), any::<usize>(), any::<usize>());
    let result = runner.run(&strategy, |((layers, _), start, len)| {
        check_compact(&scratch.path().join("case"), &layers, start, len)
    });
    if let Err(err) = result {
        panic!("the compacted stack differs from the original (shrunk case below)\n{err}");
    }
}

/// A device: a root filesystem holding a store of `base` (known-good) and three accepted
/// upgrades synced from full trees, the last of which (`release-3`) is what every stack here
/// must show; the hook boots it, `overlayctl` changes it.
struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    fn new() -> Self {
        let device = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        for dir in ["sysroot", "newroot", "run"] {
            fs::create_dir(device.path(dir)).unwrap();
        }
        let write = |tree: &str, rel: &str, text: &str| {
            let path = device.path(tree).join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write("release-0", "etc/version", "0\n");
        write("release-0", "etc/old.conf", "old\n");
        write("release-0", "usr/lib/app/data", "0\n");
        write("release-0", "usr/lib/app/extra", "0\n");
        write("release-0", "usr/share/doc/readme", "docs\n");
        std::os::unix::fs::symlink("version", device.path("release-0/etc/v")).unwrap();
        let copy = |from: &str, to: &str| {
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(device.path(from))
                .arg(device.path(to))
                .status()
                .unwrap();
            assert!(status.success());
        };
        copy("release-0", "release-1");
        write("release-1", "etc/version", "1\n");
        fs::remove_file(device.path("release-1/etc/old.conf")).unwrap();
        write("release-1", "usr/bin/tool", "tool 1\n");
        fs::hard_link(
            device.path("release-1/usr/bin/tool"),
            device.path("release-1/usr/bin/tool-alias"),
        )
        .unwrap();
        copy("release-1", "release-2");
        write("release-2", "etc/version", "2\n");
        fs::remove_dir_all(device.path("release-2/usr/lib/app")).unwrap();
        write("release-2", "usr/lib/app/data", "2\n");
        write("release-2", "etc/old.conf", "back\n");
        copy("release-2", "release-3");
        write("release-3", "etc/version", "3\n");
        fs::remove_dir_all(device.path("release-3/usr/share/doc")).unwrap();
        fs::set_permissions(
            device.path("release-3/usr/bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .unwrap();

        device.ok(&[
            "init",
            "--base",
            device.path("release-0").to_str().unwrap(),
            "--name",
            "base",
        ]);
        for n in 1..=3 {
            let tree = device.path(&format!("release-{n}"));
            let name = format!("r{n}");
            device.ok(&["sync", tree.to_str().unwrap(), "--name", &name]);
            device.ok(&["accept", &name]);
        }
        device
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.path("sysroot/strata")
    }

    /// `overlayctl` as the running system would run it: while booted, on the store where the
    /// hook bound it, with the hook's boot record.
    fn ctl(&self, args: &[&str], fault: Option<&str>) -> std::process::Output {
        let booted = self.path("run/strata/booted.toml").exists();
        let store = if booted {
            self.path("run/strata/store")
        } else {
            self.store()
        };
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("overlayctl"));
        cmd.env("STRATA_RUN_DIR", self.path("run/strata"))
            .arg("--store")
            .arg(store)
            .args(args);
        if let Some(point) = fault {
            cmd.env("STRATA_FAULT", point);
        }
        cmd.output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args, None);
        assert!(
            out.status.success(),
            "overlayctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.ctl(args, None);
        assert!(!out.status.success(), "overlayctl {args:?} succeeded");
        String::from_utf8(out.stderr).unwrap()
    }

    /// Boots with the hook; returns the mounted stack (top first). Mounted until `shutdown`.
    fn boot(&self) -> Vec<String> {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("initramfs-hook"))
            .args(["boot", "--cmdline", "", "--sysroot"])
            .arg(self.path("sysroot"))
            .arg("--newroot")
            .arg(self.path("newroot"))
            .arg("--run")
            .arg(self.path("run"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the hook failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = fs::read_to_string(self.path("run/strata/booted.toml")).unwrap();
        layers_spec::Booted::parse(&text, "booted.toml")
            .unwrap()
            .stack
    }

    fn shutdown(&self) {
        for target in ["newroot", "run/strata/store", "run/strata/upper"] {
            while nix::mount::umount(&self.path(target)).is_ok() {}
        }
        let _ = fs::remove_dir_all(self.path("run/strata"));
    }

    /// The booted root shows release 3 exactly.
    fn assert_shows_release_3(&self, what: &str) {
        let (shown, wanted) = (
            tests::views::shown_tree(&self.path("newroot")),
            tests::views::shown_tree(&self.path("release-3")),
        );
        assert_eq!(first_difference(&wanted, &shown), None, "{what}");
        assert_eq!(shown.len(), wanted.len(), "{what}");
    }

    fn plan_names(&self) -> Vec<String> {
        let text = fs::read_to_string(self.store().join("overlayplan.toml")).unwrap();
        let plan = layers_spec::Plan::parse(&text, "plan").unwrap();
        plan.layers.into_iter().map(|l| l.name).collect()
    }

    /// The directories of `layers/` and `manifests/`, and what `staging/` holds.
    fn dirs(&self) -> (Vec<String>, Vec<String>, usize) {
        let list = |dir: &str| tests::dir_names(&self.store().join(dir));
        (list("layers"), list("manifests"), list("staging").len())
    }
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    names.sort();
    names
}

#[test]
fn privileged_compact_cli_merges_and_waits_for_the_running_boot() {
    if !have_root("privileged_compact_cli_merges_and_waits_for_the_running_boot") {
        return;
    }
    private_mount_namespace();
    let device = Device::new();
    assert_eq!(device.boot(), ["r3", "r2", "r1", "base"]);
    device.assert_shows_release_3("before compaction");

    // Bad runs change nothing.
    let before = (device.plan_names(), device.dirs());
    for (args, error) in [
        (&["compact", "--from", "r9"][..], "there is no layer \"r9\""),
        (
            &["compact", "--from", "r1", "--to", "r1"],
            "the run is one layer (r1)",
        ),
        (
            &["compact", "--from", "r3", "--to", "r1"],
            "--to \"r1\" is below --from \"r3\"",
        ),
        (&["compact", "--from", "base"], "base is known-good"),
        (&["compact", "--name", "r2"], "a layer named \"r2\" exists"),
        (
            &["compact", "--name", "../x"],
            "layer name \"../x\" is not valid",
        ),
    ] {
        let e = device.fails(args);
        assert!(e.contains(error), "{args:?}: {e}");
        assert_eq!((device.plan_names(), device.dirs()), before, "{args:?}");
    }
    device.ok(&["disable", "r2"]);
    let e = device.fails(&["compact", "--from", "r1", "--to", "r3"]);
    assert!(e.contains("r2 is disabled"), "{e}");
    device.ok(&["enable", "r2"]);

    // A layer whose disk no longer has a file its manifest lists: refused, nothing changed, no
    // half-made layer left in staging/.
    let conf = device.store().join("layers/r2/etc/old.conf");
    fs::rename(&conf, device.path("old.conf")).unwrap();
    let e = device.fails(&["compact"]);
    assert!(
        e.contains("layers/r2/etc/old.conf: cannot be read (No such file or directory")
            && e.contains("not what the layer's manifest records"),
        "{e}"
    );
    assert_eq!((device.plan_names(), device.dirs()), before);
    assert_eq!(
        dir_names(&device.store().join("staging")),
        Vec::<String>::new()
    );
    fs::rename(device.path("old.conf"), &conf).unwrap();
    // Nor one whose file has another mode on disk than its manifest records (the link would
    // carry the new mode under the old record).
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o4777)).unwrap();
    let e = device.fails(&["compact"]);
    assert!(
        e.contains("layers/r2/etc/old.conf: has mode 4777, not 0644"),
        "{e}"
    );
    assert_eq!((device.plan_names(), device.dirs()), before);
    assert!(dir_names(&device.store().join("staging")).is_empty());
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();

    // The running boot uses r1..r3: they stay, out of the plan, until it is over. The run is
    // planned from the layers' manifests, but r2's no longer matches the plan's digest: r2 is
    // walked instead (its manifest put back after, for the checks below).
    let r2 = device.store().join("manifests/r2");
    let r2_manifest = fs::read(&r2).unwrap();
    fs::write(
        &r2,
        [&r2_manifest[..], b"usr/bin/ghost file size=1 blake3=00\n"].concat(),
    )
    .unwrap();
    let report = device.ok(&["--json", "compact"]);
    fs::write(&r2, r2_manifest).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["layer"], "r3+r1");
    assert_eq!(report["replaced"], serde_json::json!(["r3", "r2", "r1"]));
    assert_eq!(report["pending"], serde_json::json!(["r3", "r2", "r1"]));
    assert_eq!(report["copied_bytes"], 0, "files are linked, not copied");
    // etc/version, etc/old.conf, usr/lib/app/data and usr/bin/tool (tool-alias is its link).
    assert_eq!(report["linked"], 4, "{report}");
    assert_eq!(device.plan_names(), ["r3+r1", "base"]);
    let text = fs::read_to_string(device.store().join("overlayplan.toml")).unwrap();
    let plan = layers_spec::Plan::parse(&text, "plan").unwrap();
    let merged = plan.layer("r3+r1").unwrap();
    assert_eq!(merged.replaces, ["r3", "r2", "r1"]);
    assert_eq!(merged.parent.as_deref(), Some("base"));
    assert_eq!(
        device.dirs().0,
        sorted(&["base", "r1", "r2", "r3", "r3+r1"])
    );
    // Linked: the compacted layer's version file is release 3's inode.
    let ino = |p: PathBuf| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(device.store().join("layers/r3+r1/etc/version")),
        ino(device.store().join("layers/r3/etc/version"))
    );
    assert_eq!(device.ok(&["verify", "r3+r1"]), "r3+r1: ok\n");
    // Status shows the replaced layers as pending, and that removing the new one would free
    // nothing while they link its files.
    let status = |device: &Device| -> serde_json::Value {
        serde_json::from_str(&device.ok(&["--json", "status"])).unwrap()
    };
    let shown = status(&device);
    let pending: Vec<&str> = shown["pending_deletion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pending, ["r1", "r2", "r3"]);
    assert_eq!(shown["layers"][0]["name"], "r3+r1");
    let size = shown["layers"][0]["size"].as_u64().unwrap();
    assert_eq!(
        size,
        7 + 5 + 2 + 2,
        "version, old.conf, tool, data: {shown}"
    );
    assert_eq!(shown["layers"][0]["frees"], 0, "{shown}");
    assert!(
        device
            .ok(&["status"])
            .contains("Pending deletion once unused")
    );

    // Reboot: the hook mounts the compacted stack and deletes the layers nothing uses now.
    device.shutdown();
    assert_eq!(device.boot(), ["r3+r1", "base"]);
    device.assert_shows_release_3("after compaction");
    assert_eq!(
        device.dirs(),
        (sorted(&["base", "r3+r1"]), sorted(&["base", "r3+r1"]), 0)
    );
    let shown = status(&device);
    assert_eq!(shown["pending_deletion"], serde_json::json!([]));
    assert_eq!(shown["layers"][0]["frees"], size, "{shown}");
    let tool = device.path("newroot/usr/bin/tool");
    assert_eq!(
        ino(tool),
        ino(device.path("newroot/usr/bin/tool-alias")),
        "hard links stay links"
    );
    device.shutdown();
}

#[test]
fn privileged_compact_crash_at_every_step_leaves_a_bootable_store() {
    if !have_root("privileged_compact_crash_at_every_step_leaves_a_bootable_store") {
        return;
    }
    private_mount_namespace();
    for point in [
        "compact-staged",
        "compact-installed",
        "compact-planned",
        "compact-state",
        "sweep-moved",
    ] {
        let device = Device::new();
        let out = device.ctl(&["compact"], Some(point));
        assert!(!out.status.success(), "{point}: compact did not stop");
        let old = ["r3", "r2", "r1", "base"];
        let new = ["r3+r1", "base"];
        // The store loads, and boots the old or the new stack, whole.
        let names = device.plan_names();
        assert!(names == old || names == new, "{point}: plan {names:?}");
        device.ok(&["status"]);
        let booted = device.boot();
        assert_eq!(booted, names, "{point}");
        device.assert_shows_release_3(point);
        device.shutdown();
        // The next command finishes the job: what the plan does not name is gone.
        device.ok(&["known-good", "base"]);
        let (layers, manifests, staging) = device.dirs();
        let mut want = names.clone();
        want.sort();
        assert_eq!(
            (layers, manifests, staging),
            (want.clone(), want, 0),
            "{point}"
        );
        // And compaction, run again where it had not finished, completes.
        if names == old {
            device.ok(&["compact"]);
            assert_eq!(device.plan_names(), new, "{point}");
        }
        assert_eq!(device.boot(), new, "{point}");
        device.assert_shows_release_3(point);
        device.shutdown();
    }
}

#[test]
fn privileged_policy_removes_and_merges_as_the_plan_says() {
    if !have_root("privileged_policy_removes_and_merges_as_the_plan_says") {
        return;
    }
    private_mount_namespace();
    let device = Device::new();
    device.ok(&["disable", "r3"]);
    let path = device.store().join("overlayplan.toml");
    let mut plan = layers_spec::Plan::parse(&fs::read_to_string(&path).unwrap(), "plan").unwrap();
    plan.policy.max_layers = 2;
    // With space to spare, the five-minute check does nothing, over max_layers or not.
    plan.policy.min_free = layers_spec::ByteSize(1);
    fs::write(&path, plan.to_toml().unwrap()).unwrap();
    let before = (device.plan_names(), device.dirs());
    let report = device.ok(&["policy", "--if-space-low"]);
    assert!(
        report.starts_with("nothing to do: free space is above"),
        "{report}"
    );
    assert_eq!((device.plan_names(), device.dirs()), before);
    plan.policy.min_free = layers_spec::ByteSize(1 << 60);
    fs::write(&path, plan.to_toml().unwrap()).unwrap();

    let report = device.ok(&["policy", "--dry-run"]);
    assert_eq!(
        report.lines().collect::<Vec<_>>()[..2],
        [
            "would remove r3: disabled, and free space is below policy.min_free = 1024PiB (frees 9)"
                .replace("1024PiB", &layers_spec::ByteSize(1 << 60).to_string())
                .as_str(),
            "would compact 2 layers, r2 down to r1, into one",
        ],
        "{report}"
    );
    assert!(report.contains("note: free space stays below"), "{report}");
    assert_eq!(
        (device.plan_names(), device.dirs()),
        before,
        "a dry run changes nothing"
    );

    // Below min_free, it acts as the daily run does.
    let report = device.ok(&["policy", "--if-space-low"]);
    assert!(report.contains("done: remove r3"), "{report}");
    assert_eq!(device.plan_names(), ["r2+r1", "base"]);
    assert_eq!(
        device.dirs(),
        (sorted(&["base", "r2+r1"]), sorted(&["base", "r2+r1"]), 0)
    );
    // The stack now shows release 2.
    device.boot();
    let (shown, wanted) = (
        tests::views::shown_tree(&device.path("newroot")),
        tests::views::shown_tree(&device.path("release-2")),
    );
    assert_eq!(first_difference(&wanted, &shown), None);
    device.shutdown();
    // Done once, there is nothing more to merge; the floor is still out of reach.
    let report = device.ok(&["policy", "--dry-run"]);
    assert!(report.starts_with("nothing to do"), "{report}");
}
