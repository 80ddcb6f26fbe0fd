//! `overlayctl` as a user runs it, as root, against temporary stores and real overlay mounts in a
//! private mount namespace. Each test has its own directory and command builder.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Duration;

use assert_cmd::Command;
use layers_spec::{Layer, LayerState, Plan};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use tests::Scratch;

/// A scratch directory holding a store, a run directory (for `booted.toml`) and source trees.
struct Env {
    scratch: Scratch,
}

impl std::ops::Deref for Env {
    type Target = Scratch;

    fn deref(&self) -> &Scratch {
        &self.scratch
    }
}

impl Env {
    /// `None` when the test cannot run (no root, outside CI).
    fn new(test: &str) -> Option<Self> {
        Some(Self {
            scratch: Scratch::new(test)?,
        })
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        self.overlayctl(&self.store(), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self
            .cmd(args)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        String::from_utf8(out).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self
            .cmd(args)
            .assert()
            .failure()
            .code(1)
            .get_output()
            .stderr
            .clone();
        String::from_utf8(out).unwrap()
    }

    fn plan(&self) -> Plan {
        Plan::parse(
            &fs::read_to_string(self.store().join("overlayplan.toml")).unwrap(),
            "plan",
        )
        .unwrap()
    }

    /// Everything in the store, for "nothing changed" checks.
    fn snapshot(&self) -> Vec<(PathBuf, u64, u64)> {
        let mut out = Vec::new();
        fn go(dir: &Path, out: &mut Vec<(PathBuf, u64, u64)>) {
            let mut entries: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for path in entries {
                let meta = fs::symlink_metadata(&path).unwrap();
                out.push((path.clone(), meta.len(), meta.ino()));
                if meta.is_dir() {
                    go(&path, out);
                }
            }
        }
        go(&self.store(), &mut out);
        out.retain(|(p, _, _)| !p.ends_with(".lock"));
        out
    }

    fn write_booted(&self, stack: &[&str], upper_id: Option<&str>) {
        let booted = layers_spec::Booted {
            version: 1,
            stack: stack.iter().map(|s| s.to_string()).collect(),
            upper: layers_spec::UpperMode::Persistent,
            upper_id: upper_id.map(str::to_owned),
            store: self.store().display().to_string(),
            one_shot: false,
            fallback: None,
            notes: vec![],
            at: None,
        };
        fs::write(self.path("run/booted.toml"), booted.to_toml().unwrap()).unwrap();
    }
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// `cap_net_raw+ep` as a VFS_CAP_REVISION_2 `security.capability` value.
const CAP_NET_RAW: &[u8] = &[
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A base system with the awkward things a real root has.
fn base_tree(root: &Path) {
    write(&root.join("etc/motd"), "base\n");
    write(&root.join("etc/old.conf"), "old\n");
    write(&root.join("usr/bin/tool"), "#!/bin/sh\necho tool\n");
    fs::set_permissions(
        root.join("usr/bin/tool"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-alias")).unwrap();
    std::os::unix::fs::symlink("tool", root.join("usr/bin/link")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    mknod(
        &root.join("dev/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    nix::unistd::mkfifo(&root.join("dev/fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    xattr::set(root.join("etc/motd"), "user.origin", b"base").unwrap();
    write(&root.join("usr/bin/ping"), "ping\n");
    xattr::set(
        root.join("usr/bin/ping"),
        "security.capability",
        CAP_NET_RAW,
    )
    .unwrap();
    write(&root.join("var/lib/app/data"), "v1\n");
}

/// An upgrade: changes motd, deletes old.conf (whiteout), replaces var/lib/app (opaque).
fn upgrade_tree(root: &Path) {
    write(&root.join("etc/motd"), "upgrade 1\n");
    mknod(
        &root.join("etc/old.conf"),
        SFlag::S_IFCHR,
        Mode::empty(),
        makedev(0, 0),
    )
    .unwrap();
    write(&root.join("var/lib/app/new"), "v2\n");
    xattr::set(root.join("var/lib/app"), "trusted.overlay.opaque", b"y").unwrap();
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("<{e}>"))
}

#[test]
fn privileged_init_add_status_verify() {
    let Some(env) = Env::new("privileged_init_add_status_verify") else {
        return;
    };
    base_tree(&env.path("base"));
    upgrade_tree(&env.path("up-1"));

    let said = env.ok(&[
        "init",
        "--base",
        env.path("base").to_str().unwrap(),
        "--title",
        "Core System Image",
    ]);
    assert!(
        said.starts_with("added layer base (17 entries, 37 of content)"),
        "{said}"
    );
    let said = env.ok(&[
        "add-layer",
        env.path("up-1").to_str().unwrap(),
        "--title",
        "First upgrade",
    ]);
    assert!(said.starts_with("added layer up-1 "), "{said}");

    let plan = env.plan();
    assert_eq!(
        plan.layers
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>(),
        ["up-1", "base"]
    );
    assert_eq!(
        (plan.layers[0].state, plan.layers[0].parent.as_deref()),
        (LayerState::Trial, Some("base"))
    );
    assert!(plan.layers[1].known_good && plan.layers[1].state == LayerState::Active);
    for layer in &plan.layers {
        assert!(
            layer
                .digest
                .as_deref()
                .is_some_and(|d| d.starts_with("blake3:"))
        );
        assert!(layer.created.is_some());
    }
    // The copy kept the setuid bit, the hard link and the device.
    let tool = fs::metadata(env.store().join("layers/base/usr/bin/tool")).unwrap();
    assert_eq!((tool.mode() & 0o7777, tool.nlink()), (0o4755, 2));
    let ping = env.store().join("layers/base/usr/bin/ping");
    assert_eq!(
        xattr::get(&ping, "security.capability").unwrap().as_deref(),
        Some(CAP_NET_RAW),
        "file capabilities survive the copy"
    );
    let null = fs::symlink_metadata(env.store().join("layers/base/dev/null")).unwrap();
    assert_eq!(null.rdev(), makedev(1, 3));

    env.write_booted(&["up-1", "base"], Some("1"));
    let table = env.ok(&[]);
    insta::with_settings!({ filters => vec![(r"\d{4}-\d{2}-\d{2}", "[date]")] }, {
        insta::assert_snapshot!("status_booted", table);
    });
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(json["current_boot"], serde_json::json!(["up-1", "base"]));
    assert_eq!(
        json["layers"][1]["size"],
        5 + 4 + 20 + 3 + 5,
        "a hard link counts once"
    );

    assert_eq!(env.ok(&["verify"]), "up-1: ok\nbase: ok\n");
    // A store copied by a tool that keeps whole seconds only (mkfs.ext4 -d, tar's ustar): the
    // same layer. Another second is not.
    let cut = |layer: &std::path::Path, script: &str| {
        let status = std::process::Command::new("find")
            .arg(layer)
            .args(["-exec", "sh", "-c", script, "_", "{}", ";"])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let up = env.store().join("layers/up-1");
    cut(&up, r#"touch -h -d "@$(stat -c %Y "$1")" "$1""#);
    let times = std::process::Command::new("find")
        .arg(&up)
        .args(["-printf", "%T@\n"])
        .output()
        .unwrap();
    let times = String::from_utf8(times.stdout).unwrap();
    assert!(times.lines().all(|t| t.ends_with(".0000000000")), "{times}");
    assert_eq!(env.ok(&["verify"]), "up-1: ok\nbase: ok\n");
    cut(&up, r#"touch -h -d "@$(( $(stat -c %Y "$1") + 1 ))" "$1""#);
    let out = env
        .cmd(&["verify", "up-1"])
        .assert()
        .failure()
        .get_output()
        .clone();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("up-1: differs from its recorded manifest"),
        "{stdout}"
    );
    cut(&up, r#"touch -h -d "@$(( $(stat -c %Y "$1") - 1 ))" "$1""#);
    assert_eq!(env.ok(&["verify", "up-1"]), "up-1: ok\n");
    fs::write(
        env.store().join("layers/base/var/lib/app/data"),
        "tampered\n",
    )
    .unwrap();
    let out = env
        .cmd(&["verify"])
        .assert()
        .failure()
        .code(1)
        .get_output()
        .clone();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("base: differs from its recorded manifest, first at var/lib/app/data"),
        "{stdout}"
    );
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("1 layer failed verification: base")
    );
}

#[test]
fn privileged_init_moves_the_base_in() {
    let Some(env) = Env::new("privileged_init_moves_the_base_in") else {
        return;
    };
    base_tree(&env.path("base"));
    let inode = fs::metadata(env.path("base/etc/motd")).unwrap().ino();
    env.ok(&[
        "init",
        "--move",
        "--base",
        env.path("base").to_str().unwrap(),
        "--name",
        "core",
    ]);
    assert!(
        !env.path("base").exists(),
        "the tree was renamed into the store"
    );
    let moved = env.store().join("layers/core/etc/motd");
    assert_eq!(
        fs::metadata(&moved).unwrap().ino(),
        inode,
        "renamed, not copied"
    );
    assert_eq!(env.ok(&["verify"]), "core: ok\n");
    let plan = env.plan();
    assert!(plan.layers[0].known_good && plan.layers[0].state == LayerState::Active);
    // A base that is not a clean layer is refused before anything is created.
    write(&env.path("dirty/etc/x"), "x");
    xattr::set(env.path("dirty/etc"), "trusted.overlay.metacopy", b"").unwrap();
    let err = Command::cargo_bin("overlayctl")
        .unwrap()
        .arg("--store")
        .arg(env.path("store2"))
        .args(["init", "--base", env.path("dirty").to_str().unwrap()])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(
        String::from_utf8(err)
            .unwrap()
            .contains("has `trusted.overlay.metacopy`")
    );
    assert!(!env.path("store2").exists());
}

#[test]
fn privileged_a_failed_init_leaves_nothing_behind() {
    let Some(env) = Env::new("privileged_a_failed_init_leaves_nothing_behind") else {
        return;
    };
    // The base on another filesystem: --move cannot rename it into the store.
    let other = env.path("other-fs");
    fs::create_dir(&other).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &other,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    write(&other.join("base/etc/motd"), "base\n");
    let err = env.fails(&[
        "init",
        "--move",
        "--base",
        other.join("base").to_str().unwrap(),
    ]);
    assert!(err.contains("--move needs both on one filesystem"), "{err}");
    assert!(!env.store().exists(), "no half-made store");
    assert_eq!(read(&other.join("base/etc/motd")), "base\n");
    // So the retry the message suggests works.
    env.ok(&["init", "--base", other.join("base").to_str().unwrap()]);
    nix::mount::umount(&other).unwrap();
}

#[test]
fn privileged_mount_selections_and_uppers() {
    let Some(env) = Env::new("privileged_mount_selections_and_uppers") else {
        return;
    };
    base_tree(&env.path("base"));
    upgrade_tree(&env.path("up-1"));
    env.ok(&["init", "--base", env.path("base").to_str().unwrap()]);
    env.ok(&["add-layer", env.path("up-1").to_str().unwrap()]);
    let mnt = env.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.to_str().unwrap();

    let said = env.ok(&["mount", m]);
    assert!(said.contains("(read-only): up-1, base"), "{said}");
    assert_eq!(read(&mnt.join("etc/motd")), "upgrade 1\n");
    assert!(!mnt.join("etc/old.conf").exists(), "the whiteout hides it");
    let app: Vec<_> = fs::read_dir(mnt.join("var/lib/app"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(app, ["new"], "the opaque directory hides the base's files");
    assert!(fs::write(mnt.join("etc/motd"), "x").is_err(), "read-only");
    env.ok(&["umount", m]);

    env.ok(&["mount", "--top", "base", m]);
    assert_eq!(read(&mnt.join("etc/old.conf")), "old\n");
    env.ok(&["umount", m]);

    // A throw-away upper: writes work and vanish with the mount.
    env.ok(&["mount", "--tmpfs-upper", m]);
    fs::write(mnt.join("etc/motd"), "scratch\n").unwrap();
    env.ok(&["umount", m]);
    env.ok(&["mount", m]);
    assert_eq!(read(&mnt.join("etc/motd")), "upgrade 1\n");
    env.ok(&["umount", m]);

    // An archived upper keeps what is written through it.
    fs::create_dir_all(env.store().join("uppers/7/data")).unwrap();
    fs::create_dir_all(env.store().join("uppers/7/work")).unwrap();
    env.ok(&["mount", "--upper", "7", "--layers", "base", m]);
    fs::write(mnt.join("etc/new-file"), "kept\n").unwrap();
    env.ok(&["umount", m]);
    assert_eq!(
        read(&env.store().join("uppers/7/data/etc/new-file")),
        "kept\n"
    );

    // A layer under a live `overlayctl mount` is in use: not removed, even with --force.
    env.ok(&["mount", "--layers", "up-1,base", m]);
    let err = env.fails(&["remove", "--force", "up-1"]);
    assert!(
        err.contains("can not remove a layer the running system is using"),
        "{err}"
    );
    assert!(env.store().join("layers/up-1").is_dir());
    env.ok(&["umount", m]);
    // Mounted through a relative --store from another directory (the mount names its layers
    // relative to layers/), and asked about from here: still in use.
    let (parent, relative) = (
        env.store().parent().unwrap().to_owned(),
        env.store().file_name().unwrap().to_owned(),
    );
    env.overlayctl(Path::new(&relative), &["mount", "--layers", "up-1,base", m])
        .current_dir(&parent)
        .assert()
        .success();
    let err = env.fails(&["remove", "--force", "up-1"]);
    assert!(
        err.contains("can not remove a layer the running system is using"),
        "{err}"
    );
    env.ok(&["umount", m]);

    // umount touches only overlayctl's own mounts.
    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let err = env.fails(&["umount", m]);
    assert!(
        err.contains("is not an overlay that overlayctl mounted"),
        "{err}"
    );
    nix::mount::umount(&mnt).unwrap();

    // The running system's upper is not mounted twice.
    env.write_booted(&["up-1", "base"], Some("7"));
    let err = env.fails(&["mount", "--upper", "7", m]);
    assert!(
        err.contains("upper 7 is the running system's upper"),
        "{err}"
    );
    for (args, want) in [
        (
            vec!["mount", "--top", "nope", m],
            "--top \"nope\" is not a layer of the plan",
        ),
        (
            vec!["mount", "--layers", "base,ghost", m],
            "--layers names \"ghost\"",
        ),
        (vec!["mount", "--upper", "9", m], "there is no upper 9"),
        (
            vec!["mount", "/no/such/dir"],
            "the mount point /no/such/dir is not a directory",
        ),
    ] {
        let err = env.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn privileged_hundreds_of_layers_mount_through_the_new_api() {
    let Some(env) = Env::new("privileged_hundreds_of_layers_mount_through_the_new_api") else {
        return;
    };
    let layers_dir = env.store().join("layers");
    let count = 300;
    let mut layers = Vec::new();
    for i in (0..count).rev() {
        let name = format!("layer-with-a-rather-long-name-{i:04}");
        write(
            &layers_dir.join(&name).join(format!("file-{i}")),
            &i.to_string(),
        );
        write(&layers_dir.join(&name).join("top"), &i.to_string());
        layers.push(Layer::new(name));
    }
    fs::write(
        env.store().join("overlayplan.toml"),
        Plan::new(layers).to_toml().unwrap(),
    )
    .unwrap();
    let mnt = env.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let said = env.ok(&["mount", "--json", mnt.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(
        json["api"], "new",
        "a classic option string cannot hold {count} long names"
    );
    assert_eq!(read(&mnt.join("top")), (count - 1).to_string());
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), count + 1);
    env.ok(&["umount", mnt.to_str().unwrap()]);
}

#[test]
fn privileged_state_commands_and_remove() {
    let Some(env) = Env::new("privileged_state_commands_and_remove") else {
        return;
    };
    base_tree(&env.path("base"));
    upgrade_tree(&env.path("up-1"));
    write(&env.path("up-2/etc/motd"), "upgrade 2\n");
    env.ok(&["init", "--base", env.path("base").to_str().unwrap()]);
    env.ok(&["add-layer", env.path("up-1").to_str().unwrap(), "--active"]);
    env.ok(&["add-layer", env.path("up-2").to_str().unwrap()]);

    let said = env.ok(&["disable", "up-1"]);
    assert!(said.contains("next boot: up-2, base"), "{said}");
    assert!(
        said.contains("warning: layer \"up-2\" was built on \"up-1\", which is left out"),
        "{said}"
    );
    env.ok(&["enable", "up-1"]);
    assert_eq!(env.plan().layers[1].state, LayerState::Active);

    let said = env.ok(&["rollback"]);
    assert!(
        said.starts_with("rolled back to base; disabled: up-2, up-1"),
        "{said}"
    );
    env.ok(&["rollback", "--to", "up-2"]);
    assert_eq!(
        env.plan().layers[0].state,
        LayerState::Active,
        "--to enables the chosen top"
    );
    env.ok(&["known-good", "up-1"]);
    assert!(env.plan().layers[1].known_good);
    env.ok(&["known-good", "--unset", "up-1"]);
    assert!(!env.plan().layers[1].known_good);

    // accept without names: the running boot's trial layers, and it becomes the last good stack.
    env.ok(&["disable", "up-2"]);
    env.ok(&["enable", "up-2"]);
    let plan_text = fs::read_to_string(env.store().join("overlayplan.toml")).unwrap();
    fs::write(
        env.store().join("overlayplan.toml"),
        plan_text.replacen("state = \"active\"", "state = \"trial\"", 1),
    )
    .unwrap();
    env.write_booted(&["up-2", "up-1", "base"], None);
    let said = env.ok(&["accept"]);
    assert!(said.starts_with("accepted: up-2"), "{said}");
    let state = fs::read_to_string(env.store().join("state/boot.toml")).unwrap();
    assert!(
        state.contains("last_good = [\n    \"up-2\",\n    \"up-1\",\n    \"base\",\n]"),
        "{state}"
    );

    let before = env.snapshot();
    for (args, want) in [
        (
            vec!["remove", "up-1"],
            "can not remove a layer the running system is using",
        ),
        (
            vec!["disable", "ghost"],
            "there is no layer \"ghost\" in the plan; its layers are: up-2, up-1, base",
        ),
        (
            vec!["rollback", "--to", "ghost"],
            "there is no layer \"ghost\"",
        ),
    ] {
        let err = env.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(env.snapshot(), before, "refused commands change nothing");

    fs::remove_file(env.path("run/booted.toml")).unwrap();
    let err = env.fails(&["remove", "up-1"]);
    assert!(
        err.contains("enabled layers were built on up-1: up-2"),
        "{err}"
    );
    let said = env.ok(&["remove", "--force", "up-1"]);
    assert!(said.starts_with("removed up-1"), "{said}");
    assert!(
        !env.store().join("layers/up-1").exists() && !env.store().join("manifests/up-1").exists()
    );
    assert_eq!(
        env.plan().layers[0].parent,
        None,
        "up-2 no longer names a parent that is gone"
    );
}

#[test]
fn privileged_bad_input_changes_nothing() {
    let Some(env) = Env::new("privileged_bad_input_changes_nothing") else {
        return;
    };
    base_tree(&env.path("base"));
    env.ok(&["init", "--base", env.path("base").to_str().unwrap()]);
    write(&env.path("redirected/etc/x"), "x");
    xattr::set(
        env.path("redirected/etc"),
        "trusted.overlay.redirect",
        b"/elsewhere",
    )
    .unwrap();
    write(&env.path("fine/etc/y"), "y");
    write(&env.path("odd name/etc/y"), "y");

    let before = env.snapshot();
    let p = |rel: &str| env.path(rel).display().to_string();
    for (args, want) in [
        (
            vec!["add-layer".to_owned(), p("redirected")],
            "redirected/etc: has `trusted.overlay.redirect`",
        ),
        (
            vec!["add-layer".into(), p("missing")],
            "missing: reading the layer: No such file or directory",
        ),
        (
            vec!["add-layer".into(), p("odd name")],
            "is not usable as a layer name; give one with --name",
        ),
        (
            vec![
                "add-layer".into(),
                p("fine"),
                "--name".into(),
                "../x".into(),
            ],
            "layer name \"../x\" is not valid",
        ),
        (
            vec![
                "add-layer".into(),
                p("fine"),
                "--name".into(),
                "base".into(),
            ],
            "already has a layer named \"base\"",
        ),
        (
            vec![
                "add-layer".into(),
                p("fine"),
                "--parent".into(),
                "ghost".into(),
            ],
            "--parent \"ghost\" is not a layer",
        ),
        (
            vec!["init".into(), "--base".into(), p("fine")],
            "is not empty; a new store needs an empty or new directory",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = env.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(env.snapshot(), before);

    // Boot state that cannot be read stops a change before the plan is written.
    let state_file = env.store().join("state/boot.toml");
    fs::write(&state_file, "version = 1\ngarbage").unwrap();
    let plan_before = fs::read(env.store().join("overlayplan.toml")).unwrap();
    let err = env.fails(&["known-good", "--unset", "base"]);
    assert!(err.contains("the boot state cannot be read"), "{err}");
    assert!(err.contains("move it aside"), "{err}");
    assert_eq!(
        fs::read(env.store().join("overlayplan.toml")).unwrap(),
        plan_before
    );
    fs::remove_file(&state_file).unwrap();

    // Layer directories the plan does not name and nobody recorded (a hand edit, an import)
    // are kept: shown as not in the plan, deleted only by an explicit `remove NAME`.
    write(&env.store().join("layers/orphan/x"), "x");
    write(&env.store().join("manifests/orphan"), ". dir\n");
    env.ok(&["known-good", "base"]);
    assert!(
        env.store().join("layers/orphan/x").exists()
            && env.store().join("manifests/orphan").exists()
    );
    let status = env.ok(&["status"]);
    assert!(
        status.contains("Not in the plan: layers/orphan, kept"),
        "{status}"
    );
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("orphan: not in the plan"), "{verify}");
    let removed = env.ok(&["remove", "orphan"]);
    assert!(removed.contains("which the plan did not name"), "{removed}");
    assert!(!env.store().join("layers/orphan").exists());

    // A plan that cannot be read: changes are refused rather than written over it, even when
    // its previous copy could stand in for reading (two changes: one that changes nothing
    // writes nothing, so it leaves no previous copy).
    let err = env.fails(&["known-good", "base", "--unset"]);
    assert!(err.contains("the plan's only known-good layer"), "{err}");
    env.ok(&["add-layer", &p("fine"), "--name", "fine-0"]);
    env.ok(&["remove", "fine-0"]);
    let plan = env.store().join("overlayplan.toml");
    fs::write(&plan, "version = 1\n[[layer]]\nnaem = \"x\"\n").unwrap();
    let err = env.fails(&["add-layer", &p("fine")]);
    assert!(err.contains("the plan cannot be read"), "{err}");
    let err = env.fails(&["disable", "base"]);
    assert!(
        err.contains("the plan cannot be read")
            && err.contains("overlayplan.toml:3:1: unknown key `naem`"),
        "{err}"
    );
}

#[test]
fn privileged_interrupted_adds_never_reach_the_plan() {
    let Some(env) = Env::new("privileged_interrupted_adds_never_reach_the_plan") else {
        return;
    };
    write(&env.path("base/etc/motd"), "base\n");
    env.ok(&["init", "--base", env.path("base").to_str().unwrap()]);
    // Enough content that a kill lands in the middle of the copy or the hashing.
    for i in 0..40 {
        fs::create_dir_all(env.path("big/data")).unwrap();
        fs::write(env.path(&format!("big/data/{i}")), vec![i as u8; 1 << 20]).unwrap();
    }
    let plan_before = fs::read(env.store().join("overlayplan.toml")).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("overlayctl");
    for delay_ms in [1, 5, 20, 60] {
        let mut child = StdCommand::new(&bin)
            .env("STRATA_RUN_DIR", env.path("run"))
            .arg("--store")
            .arg(env.store())
            .args(["add-layer", env.path("big").to_str().unwrap()])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let finished = child.wait().unwrap().success();
        let plan_now = fs::read(env.store().join("overlayplan.toml")).unwrap();
        if finished {
            // It won the race: the layer is whole and named. Take it out for the next round.
            env.ok(&["verify", "big"]);
            env.ok(&["remove", "big"]);
        } else {
            assert_eq!(
                plan_now, plan_before,
                "a killed add (after {delay_ms} ms) left the plan as it was"
            );
            assert_eq!(env.ok(&["verify"]), "base: ok\n");
        }
    }
    // The next command clears what the killed ones left, and the add goes through.
    env.ok(&["add-layer", env.path("big").to_str().unwrap()]);
    assert_eq!(
        fs::read_dir(env.store().join("staging")).unwrap().count(),
        0
    );
    assert_eq!(env.ok(&["verify", "big"]), "big: ok\n");
}

#[test]
fn privileged_sync_adds_the_layer_to_the_target() {
    let Some(env) = Env::new("privileged_sync_adds_the_layer_to_the_target") else {
        return;
    };
    base_tree(&env.path("base"));
    env.ok(&["init", "--base", env.path("base").to_str().unwrap()]);
    // The new system: the base as a plain copy, then changed as a package manager would.
    let target = env.path("release-2");
    let copied = StdCommand::new("cp")
        .arg("-a")
        .arg(env.path("base"))
        .arg(&target)
        .status()
        .unwrap();
    assert!(copied.success());
    write(&target.join("etc/motd"), "release 2\n");
    fs::remove_file(target.join("etc/old.conf")).unwrap();
    fs::remove_dir_all(target.join("var/lib/app")).unwrap();
    write(&target.join("var/lib/app/new"), "v2\n");
    fs::set_permissions(
        target.join("usr/bin/ping"),
        fs::Permissions::from_mode(0o4711),
    )
    .unwrap();
    write(&target.join("usr/share/doc/new"), "docs\n");

    // A dry run reports the same counts and changes nothing.
    let before = env.snapshot();
    let report = env.ok(&["sync", "--dry-run", target.to_str().unwrap()]);
    assert!(
        report.contains(
            "4 added, 1 changed, 1 with new metadata, 2 deleted (2 as opaque directories)"
        ) && report.contains("dry run: would add trial layer release-2 on base"),
        "{report}"
    );
    assert_eq!(env.snapshot(), before);

    let report = env.ok(&["sync", target.to_str().unwrap(), "--title", "Release 2"]);
    assert!(
        // usr/share, its doc and doc/new, var/lib/app/new; motd; ping's mode; old.conf and
        // app/data gone, etc and var/lib/app opaque (every entry left in them is new).
        report.contains(
            "4 added, 1 changed, 1 with new metadata, 2 deleted (2 as opaque directories)"
        ),
        "{report}"
    );
    assert!(
        report.contains("added trial layer release-2 on base"),
        "{report}"
    );
    let plan = env.plan();
    let layer = plan.layer("release-2").unwrap();
    assert_eq!(layer.state, LayerState::Trial);
    assert_eq!(layer.parent.as_deref(), Some("base"));
    assert_eq!(layer.title.as_deref(), Some("Release 2"));
    // Only what changed is in the layer: the unchanged tool is not.
    assert!(!env.store().join("layers/release-2/usr/bin/tool").exists());

    // The stack with the new layer shows exactly the target.
    let mnt = env.path("mnt");
    fs::create_dir(&mnt).unwrap();
    env.ok(&["mount", mnt.to_str().unwrap(), "--read-only"]);
    let (shown, wanted) = (
        tests::views::shown_tree(&mnt),
        tests::views::shown_tree(&target),
    );
    assert_eq!(
        tests::views::first_difference(&wanted, &shown),
        None,
        "the stack does not show the target"
    );
    assert_eq!(shown.len(), wanted.len());
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&mnt.join("usr/bin/ping")), 0o4711);
    assert_eq!(
        xattr::get(mnt.join("usr/bin/ping"), "security.capability")
            .unwrap()
            .as_deref(),
        Some(CAP_NET_RAW)
    );
    assert_eq!(
        fs::metadata(mnt.join("usr/bin/tool")).unwrap().ino(),
        fs::metadata(mnt.join("usr/bin/tool-alias")).unwrap().ino(),
        "hard links stay links"
    );
    env.ok(&["umount", mnt.to_str().unwrap()]);

    // Again: nothing to add, and the store is as it was.
    let before = env.snapshot();
    let report = env.ok(&["sync", target.to_str().unwrap(), "--name", "again"]);
    assert!(
        report.contains("already equals the stack (release-2, base): nothing to add"),
        "{report}"
    );
    assert_eq!(env.snapshot(), before);

    // Bad input changes nothing: a missing target; a target holding a whiteout.
    let e = env.fails(&["sync", env.path("nowhere").to_str().unwrap(), "--name", "x"]);
    assert!(e.contains("nowhere"), "{e}");
    let odd = env.path("odd");
    fs::create_dir_all(odd.join("etc")).unwrap();
    mknod(
        &odd.join("etc/gone"),
        SFlag::S_IFCHR,
        Mode::empty(),
        makedev(0, 0),
    )
    .unwrap();
    let e = env.fails(&["sync", odd.to_str().unwrap()]);
    assert!(
        e.contains("etc/gone: the target has a 0/0 character device"),
        "{e}"
    );
    assert_eq!(env.snapshot(), before);
    // Another filesystem mounted inside the target is not part of it.
    let mounted = target.join("mnt");
    fs::create_dir(&mounted).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &mounted,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    write(&mounted.join("file"), "elsewhere\n");
    let e = env.fails(&["sync", target.to_str().unwrap(), "--name", "y"]);
    assert!(
        e.contains("is on another filesystem (a mount point)"),
        "{e}"
    );
    nix::mount::umount(&mounted).unwrap();
    assert_eq!(env.snapshot(), before);
}

#[test]
fn privileged_status_works_for_a_user_who_cannot_read_every_layer() {
    if !tests::have_root("privileged_status_works_for_a_user_who_cannot_read_every_layer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let base = dir.path().join("base");
    write(&base.join("etc/motd"), "hi\n");
    write(&base.join("secret/key"), "s\n");
    fs::set_permissions(base.join("secret"), fs::Permissions::from_mode(0o700)).unwrap();
    let store = dir.path().join("store");
    tests::overlayctl(&store, &["init", "--base", base.to_str().unwrap()]);
    let out = StdCommand::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(assert_cmd::cargo::cargo_bin("overlayctl"))
        .arg("--store")
        .arg(&store)
        .arg("status")
        .env("STRATA_RUN_DIR", "/nonexistent/strata-run")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The size from the manifest; what removing it frees needs the walk it may not make.
    let row = table.lines().nth(1).unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[..5], ["A", "K", "base", "active", "5"], "{table}");
    assert_eq!(fields[5], "-", "{table}");
}

#[test]
fn privileged_diff_files_and_packages_between_stacks() {
    let Some(env) = Env::new("privileged_diff_files_and_packages_between_stacks") else {
        return;
    };
    // This machine's dpkg database, and an edited copy: one package upgraded, one downgraded,
    // one removed, one added.
    let status = fs::read_to_string("/var/lib/dpkg/status").unwrap();
    let installed = overlayctl::diff::installed_packages(&status);
    assert!(
        installed.len() > 10,
        "this machine's dpkg database lists packages"
    );
    let mut picks = installed.iter();
    let mut pick = || {
        picks
            .next()
            .map(|((p, _), v)| (p.clone(), v.clone()))
            .unwrap()
    };
    let ((up, up_v), (down, down_v), (gone, _)) = (pick(), pick(), pick());
    let paragraph_of = |name: &str| {
        status
            .split("\n\n")
            .find(|p| p.lines().next() == Some(&format!("Package: {name}")))
            .unwrap()
            .to_owned()
    };
    let edit = |p: String, from: &str, to: &str| {
        p.replace(&format!("Version: {from}"), &format!("Version: {to}"))
    };
    let mut edited: Vec<String> = status
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(str::to_owned)
        .collect();
    for p in &mut edited {
        if *p == paragraph_of(&up) {
            *p = edit(p.clone(), &up_v, &format!("{up_v}+strata1"));
        } else if *p == paragraph_of(&down) {
            *p = edit(p.clone(), &down_v, &format!("{down_v}~older"));
        }
    }
    edited.retain(|p| *p != paragraph_of(&gone));
    edited.push(
        "Package: strata-new\nStatus: install ok installed\nArchitecture: all\nVersion: 1.0-1\n"
            .to_owned(),
    );
    let base = env.path("base");
    write(&base.join("etc/motd"), "release 1\n");
    write(&base.join("usr/bin/tool"), "tool\n");
    write(&base.join("var/lib/dpkg/status"), &status);
    env.ok(&["init", "--base", base.to_str().unwrap()]);
    let target = env.path("release-2");
    let copied = StdCommand::new("cp")
        .arg("-a")
        .arg(&base)
        .arg(&target)
        .status();
    assert!(copied.unwrap().success());
    write(&target.join("etc/motd"), "release 2, longer\n");
    fs::remove_file(target.join("usr/bin/tool")).unwrap();
    write(&target.join("usr/share/doc/new"), "docs\n");
    write(
        &target.join("var/lib/dpkg/status"),
        &(edited.join("\n\n") + "\n"),
    );
    env.ok(&["sync", target.to_str().unwrap(), "--name", "r2"]);

    let files: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "diff", "base", "r2"])).unwrap();
    let shown: Vec<(String, String)> = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_owned(),
                c["how"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(p, h)| ((*p).to_owned(), (*h).to_owned()))
            .collect()
    };
    assert_eq!(
        shown,
        want(&[
            ("etc/motd", "changed"),
            ("usr/bin/tool", "removed"),
            ("usr/share", "added"),
            ("usr/share/doc", "added"),
            ("usr/share/doc/new", "added"),
            ("var/lib/dpkg/status", "changed"),
        ]),
        "{files}"
    );
    assert_eq!(files["files"][0]["before"], 10);
    assert_eq!(files["files"][0]["after"], 18);
    // Same stack: nothing.
    assert!(
        env.ok(&["diff", "r2", "r2"])
            .starts_with("files: 0 added, 0 removed, 0 changed")
    );

    let text = env.ok(&["diff", "base", "r2", "--packages"]);
    assert!(
        text.ends_with("packages: 1 upgraded, 1 downgraded, 1 added, 1 removed, 0 changed\n"),
        "{text}"
    );
    assert!(text.contains(&format!("upgraded   {up}:")), "{text}");
    assert!(
        text.contains(&format!("{up_v} -> {up_v}+strata1")),
        "{text}"
    );
    assert!(text.contains(&format!("downgraded {down}:")), "{text}");
    assert!(text.contains(&format!("removed    {gone}:")), "{text}");
    assert!(text.contains("added      strata-new:all 1.0-1"), "{text}");
    // status --verbose: the packages each layer brings.
    let table = env.ok(&["--verbose", "status"]);
    let r2_line = table
        .lines()
        .skip_while(|l| !l.contains(" r2 "))
        .find(|l| l.trim_start().starts_with("packages:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        r2_line.contains(&format!("1 upgraded ({up} {up_v} -> {up_v}+strata1)"))
            && r2_line.contains("1 added (strata-new 1.0-1)")
            && r2_line.contains(&format!("1 removed ({gone} "))
            && r2_line.contains(&format!("1 downgraded ({down} ")),
        "{table}"
    );
    assert!(!env.ok(&["status"]).contains("packages:"));
    // Bad input: a layer the plan lacks; a stack without a dpkg database.
    let e = env.fails(&["diff", "base", "nope"]);
    assert!(e.contains("has no layer \"nope\""), "{e}");
    fs::remove_file(target.join("var/lib/dpkg/status")).unwrap();
    env.ok(&["sync", target.to_str().unwrap(), "--name", "r3"]);
    let e = env.fails(&["diff", "r2", "r3", "--packages"]);
    assert!(
        e.contains("the stack r3, r2, base has no var/lib/dpkg/status"),
        "{e}"
    );
}
