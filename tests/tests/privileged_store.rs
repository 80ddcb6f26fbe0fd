//! The store holds against hostile hands: symlinked folders, directories nobody recorded,
//! edited manifests, damaged state, a full disk, escape sequences in titles. As root, on real
//! directories, in a private mount namespace.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use layers_spec::{Layer, Plan};
use tests::Scratch;

/// A store with a base and two upgrades (`up1`, `up2`), made with `overlayctl`.
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
    fn new(test: &str) -> Option<Self> {
        let env = Self {
            scratch: Scratch::new(test)?,
        };
        for (tree, file) in [("base", "etc/os"), ("t1", "usr/one"), ("t2", "usr/two")] {
            let path = env.path(tree).join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, format!("{tree}\n").repeat(100)).unwrap();
        }
        let base = env.path("base");
        env.ok(&["init", "--base", base.to_str().unwrap()]);
        for (tree, name) in [("t1", "up1"), ("t2", "up2")] {
            let tree = env.path(tree);
            env.ok(&["add-layer", tree.to_str().unwrap(), "--name", name]);
        }
        Some(env)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = self.overlayctl(&self.store(), args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "{args:?}: {text}");
        text
    }

    fn fails(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(!ok, "{args:?} succeeded: {text}");
        text
    }

    fn plan_text(&self) -> String {
        fs::read_to_string(self.store().join("overlayplan.toml")).unwrap()
    }
}

/// Files under `dir`, with their contents, sorted.
fn contents(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in walk(dir) {
        let text = fs::read_to_string(&entry).unwrap_or_default();
        out.push((entry.display().to_string(), text));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn privileged_store_never_deletes_through_a_symlinked_folder() {
    let Some(env) = Env::new("privileged_store_never_deletes_through_a_symlinked_folder") else {
        return;
    };
    // A folder elsewhere whose names look like what each store folder would let go.
    let victim = env.path("victim");
    fs::create_dir_all(victim.join("strata.1.2.x/deep")).unwrap();
    fs::write(victim.join("strata.1.2.x/deep/file"), "precious").unwrap();
    fs::create_dir_all(victim.join("up1/usr")).unwrap();
    fs::write(victim.join("up1/usr/one"), "precious").unwrap();
    fs::write(victim.join("lock"), "").unwrap();
    let before = contents(&victim);
    for folder in ["staging", "runs", "manifests", "layers", "uppers", "state"] {
        let real = env.store().join(folder);
        let aside = env.path(&format!("aside-{folder}"));
        if real.exists() {
            fs::rename(&real, &aside).unwrap();
        }
        symlink(&victim, &real).unwrap();
        let (ok, text) = env.run(&["disable", "up2"]);
        if !ok {
            assert!(text.contains("is a symlink"), "{folder}: {text}");
        }
        assert_eq!(contents(&victim), before, "{folder}: {text}");
        fs::remove_file(&real).unwrap();
        if aside.exists() {
            fs::rename(&aside, &real).unwrap();
        }
        env.ok(&["enable", "up2"]);
    }
    // `staging -> .` would make the store its own scratch folder.
    fs::remove_dir(env.store().join("staging")).unwrap();
    symlink(".", env.store().join("staging")).unwrap();
    let text = env.fails(&["disable", "up2"]);
    assert!(text.contains("staging is a symlink (to .)"), "{text}");
    for kept in [
        "overlayplan.toml",
        "layers/base/etc/os",
        "layers/up1/usr/one",
        "state/boot.toml",
    ] {
        assert!(env.store().join(kept).exists(), "{kept}");
    }
    fs::remove_file(env.store().join("staging")).unwrap();

    // keys/ as a symlink: no key is trusted, written or removed through it.
    fs::write(victim.join("signer.pub"), "precious").unwrap();
    let before = contents(&victim);
    let _ = fs::remove_dir_all(env.store().join("keys"));
    symlink(&victim, env.store().join("keys")).unwrap();
    let generated = env.path("k");
    env.ok(&["keys", "generate", "--output", generated.to_str().unwrap()]);
    let public = env.path("k.pub");
    for args in [
        &["keys", "add", public.to_str().unwrap()][..],
        &["keys", "remove", "signer"],
        &["keys", "list"],
    ] {
        let text = env.fails(args);
        assert!(text.contains("keys is a symlink"), "{args:?}: {text}");
        assert_eq!(contents(&victim), before, "{args:?}");
    }
}

#[test]
fn privileged_store_keeps_what_nobody_recorded() {
    let Some(env) = Env::new("privileged_store_keeps_what_nobody_recorded") else {
        return;
    };
    // A layer renamed in the plan by hand: the old directory is nobody's to delete.
    let edited = env.plan_text().replace("\"up1\"", "\"up1x\"");
    fs::write(env.store().join("overlayplan.toml"), edited).unwrap();
    env.ok(&["check"]);
    env.ok(&["known-good", "base"]);
    assert!(env.store().join("layers/up1/usr/one").exists());
    let status = env.ok(&["status"]);
    assert!(
        status.contains("Not in the plan: layers/up1, kept"),
        "{status}"
    );
    // `verify --json` lists it too, and a name made of escape sequences is shown escaped.
    // (up1x, which the plan names, is missing: verify fails, and says so in JSON too.)
    let text = env.fails(&["verify", "--json"]);
    let verify: serde_json::Value = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(verify["not_in_plan"][0]["name"], "up1", "{verify}");
    let up1x = verify["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["layer"] == "up1x");
    assert_eq!(up1x.unwrap()["ok"], false, "{verify}");
    let evil = "evil\u{1b}]0;pwned\u{7}";
    fs::create_dir(env.store().join("layers").join(evil)).unwrap();
    for args in [&["status"][..], &["verify"]] {
        let (_, text) = env.run(args);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(text.contains("evil\\u{1b}]0;pwned"), "{text}");
        assert!(
            text.contains("not a layer name, so only a hand deletes it"),
            "{text}"
        );
    }
    // Removing a layer the plan names lets it go through the journal.
    env.ok(&["remove", "up2", "--force"]);
    assert!(!env.store().join("layers/up2").exists());
    assert!(env.store().join("layers/up1").exists());
}

#[test]
fn privileged_store_trusts_no_edited_manifest() {
    let Some(env) = Env::new("privileged_store_trusts_no_edited_manifest") else {
        return;
    };
    let manifest = env.store().join("manifests/up1");
    let text = fs::read_to_string(&manifest).unwrap();
    let hash_at = text.find("blake3=").expect("a hashed file") + 7;
    let mut bytes = text.into_bytes();
    bytes[hash_at] = if bytes[hash_at] == b'0' { b'1' } else { b'0' };
    fs::write(&manifest, bytes).unwrap();
    env.ok(&["accept", "up1", "up2"]);
    env.ok(&[
        "compact", "--from", "up1", "--to", "up2", "--name", "merged",
    ]);
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("merged: ok"), "{verify}");
}

#[test]
fn privileged_store_keeps_the_last_known_good_layer() {
    let Some(env) = Env::new("privileged_store_keeps_the_last_known_good_layer") else {
        return;
    };
    let before = env.plan_text();
    let text = env.fails(&["remove", "base", "--force"]);
    assert!(text.contains("only known-good layer"), "{text}");
    // Nor can it be unmarked first, to remove it then.
    let text = env.fails(&["known-good", "--unset", "base"]);
    assert!(text.contains("only known-good layer"), "{text}");
    assert_eq!(env.plan_text(), before);
    assert!(env.store().join("layers/base/etc/os").exists());
    // With another known-good layer, it may be.
    env.ok(&["known-good", "up1"]);
    env.ok(&["known-good", "--unset", "base"]);
}

#[test]
fn privileged_store_damaged_state_is_reported_and_says_how_out() {
    let Some(env) = Env::new("privileged_store_damaged_state_is_reported_and_says_how_out") else {
        return;
    };
    let state = env.store().join("state/boot.toml");
    fs::remove_file(env.store().join("state/boot.toml.prev")).ok();
    fs::write(&state, "version = 1\ngarbage").unwrap();
    let status = env.ok(&["status"]);
    assert!(
        status.contains("warning: the boot state cannot be read"),
        "{status}"
    );
    assert!(status.contains("up2"), "{status}");
    let text = env.fails(&["disable", "up2"]);
    assert!(text.contains("move it aside (mv "), "{text}");
    fs::rename(&state, env.store().join("state/boot.toml.damaged")).unwrap();
    env.ok(&["disable", "up2"]);

    fs::write(env.path("run/booted.toml"), "version = 1\nstack = [").unwrap();
    let status = env.ok(&["status"]);
    assert!(
        status.contains("the record of the running boot is damaged"),
        "{status}"
    );
    let text = env.fails(&["enable", "up2"]);
    assert!(text.contains("Reboot"), "{text}");
}

#[test]
fn privileged_store_symlinked_layers_are_not_layers() {
    let Some(env) = Env::new("privileged_store_symlinked_layers_are_not_layers") else {
        return;
    };
    let layer = env.store().join("layers/up2");
    fs::rename(&layer, env.path("elsewhere")).unwrap();
    symlink(env.path("elsewhere"), &layer).unwrap();
    let verify = env.fails(&["verify"]);
    assert!(
        verify.contains("up2: ") && verify.contains("is a symlink"),
        "{verify}"
    );
    let sysroot = env.path("sysroot");
    fs::create_dir(&sysroot).unwrap();
    fs::rename(env.store(), sysroot.join("strata")).unwrap();
    let (_, text) = hook_resolve(&sysroot);
    assert!(text.contains("stack (top first): up1:base"), "{text}");
}

#[test]
fn privileged_store_absolute_store_links_resolve_inside_the_sysroot() {
    let Some(env) = Env::new("privileged_store_absolute_store_links_resolve_inside_the_sysroot")
    else {
        return;
    };
    let sysroot = env.path("sysroot");
    fs::create_dir_all(sysroot.join("data")).unwrap();
    fs::rename(env.store(), sysroot.join("data/strata")).unwrap();
    // Absolute, as it would be on the device: /strata -> /data/strata.
    symlink("/data/strata", sysroot.join("strata")).unwrap();
    let (ok, text) = hook_resolve(&sysroot);
    assert!(ok, "{text}");
    assert!(text.contains("stack (top first): up2:up1:base"), "{text}");
}

#[test]
fn privileged_store_titles_never_reach_the_terminal_raw() {
    let Some(env) = Env::new("privileged_store_titles_never_reach_the_terminal_raw") else {
        return;
    };
    let evil = "X\u{1b}]0;pwned\u{7}\u{1b}[2J";
    let tree = env.path("t1");
    let text = env.fails(&[
        "add-layer",
        tree.to_str().unwrap(),
        "--name",
        "up3",
        "--title",
        evil,
    ]);
    assert!(text.contains("control character"), "{text}");
    // One written into the plan by hand is shown escaped.
    let edited = env.plan_text().replace(
        "name = \"up1\"",
        "name = \"up1\"\ntitle = \"X\\u001b]0;pwned\\u0007\\u001b[2J\"",
    );
    fs::write(env.store().join("overlayplan.toml"), edited).unwrap();
    let status = env.ok(&["status"]);
    assert!(
        !status.contains('\u{1b}') && !status.contains('\u{7}'),
        "{status:?}"
    );
    assert!(status.contains("X\\u{1b}]0;pwned"), "{status}");
}

#[test]
fn privileged_store_the_501st_layer_is_refused_before_it_is_copied() {
    let Some(env) = Env::new("privileged_store_the_501st_layer_is_refused_before_it_is_copied")
    else {
        return;
    };
    let mut plan = Plan::parse(&env.plan_text(), "plan").unwrap();
    while plan.layers.len() < 500 {
        plan.layers
            .insert(1, Layer::new(format!("pad-{}", plan.layers.len())));
    }
    layers_store::Store::open(&env.store())
        .unwrap()
        .save_plan(&plan)
        .unwrap();
    let tree = env.path("t1");
    let text = env.fails(&["add-layer", tree.to_str().unwrap(), "--name", "up501"]);
    assert!(text.contains("the most a stack can have"), "{text}");
    assert!(
        fs::read_dir(env.store().join("staging"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(!env.store().join("layers/up501").exists());
}

#[test]
fn privileged_store_a_trial_whose_try_cannot_be_recorded_is_left_out() {
    let Some(env) = Env::new("privileged_store_a_trial_whose_try_cannot_be_recorded_is_left_out")
    else {
        return;
    };
    env.ok(&["accept", "up1"]);
    // The root filesystem: a small tmpfs holding the store, then filled to the last byte.
    let sysroot = env.path("sysroot");
    fs::create_dir(&sysroot).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sysroot,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )
    .unwrap();
    let store = sysroot.join("strata");
    fs::create_dir(&store).unwrap();
    for entry in fs::read_dir(env.store()).unwrap().flatten() {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(entry.path())
            .arg(&store)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let plan = fs::read_to_string(store.join("overlayplan.toml")).unwrap();
    assert_eq!(
        plan.matches("state = \"trial\"").count(),
        1,
        "up2 alone is a trial layer: {plan}"
    );
    // Everything the boot needs exists already: the upper, the run directory.
    fs::create_dir_all(store.join("uppers/1/data")).unwrap();
    fs::create_dir_all(store.join("uppers/1/work")).unwrap();
    let fill = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", sysroot.join("fill").display()))
        .output()
        .unwrap();
    assert!(!fill.status.success(), "the disk filled");
    let (ok, booted, log) = hook_boot(&env, &sysroot);
    assert!(ok, "{log}");
    assert!(log.contains("trial layer up2 cannot be recorded"), "{log}");
    assert!(
        booted.contains("stack = [\"up1\", \"base\"]") || booted.contains("\"up1\",\n    \"base\""),
        "{booted}"
    );
    nix::mount::umount2(&sysroot, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

#[test]
fn privileged_store_paths_past_path_max_are_layers_too() {
    let Some(env) = Env::new("privileged_store_paths_past_path_max_are_layers_too") else {
        return;
    };
    use rustix::fs::{Mode, OFlags};
    // 20 levels of 250-byte names (5,000 bytes), made one directory at a time.
    let tree = env.path("deep");
    fs::create_dir(&tree).unwrap();
    let mut fd = rustix::fs::open(&tree, OFlags::DIRECTORY, Mode::empty()).unwrap();
    let part = "d".repeat(250);
    for _ in 0..20 {
        rustix::fs::mkdirat(&fd, part.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(&fd, part.as_str(), OFlags::DIRECTORY, Mode::empty()).unwrap();
    }
    let file = rustix::fs::openat(
        &fd,
        "deep",
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&file, b"deep\n").unwrap();
    rustix::fs::symlinkat("deep", &fd, "link").unwrap();
    env.ok(&["add-layer", tree.to_str().unwrap(), "--name", "deep"]);
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("deep: ok"), "{verify}");
    env.ok(&["accept", "up1", "up2", "deep"]);
    env.ok(&[
        "compact", "--from", "up2", "--to", "deep", "--name", "merged",
    ]);
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("merged: ok"), "{verify}");
    let manifest = fs::read_to_string(env.store().join("manifests/merged")).unwrap();
    assert!(
        manifest
            .lines()
            .any(|l| l.len() > 5000 && l.contains("/deep file")),
        "the deep file is in the merged layer"
    );
}

/// Runs `initramfs-hook resolve` on `sysroot`; returns (success, stdout and stderr).
fn hook_resolve(sysroot: &Path) -> (bool, String) {
    let out = Command::cargo_bin("initramfs-hook")
        .unwrap()
        .args(["resolve", "--cmdline", "quiet", "--sysroot"])
        .arg(sysroot)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Runs `initramfs-hook boot` on `sysroot`; returns (success, stdout, log).
fn hook_boot(env: &Env, sysroot: &Path) -> (bool, String, String) {
    let (newroot, run) = (env.path("newroot"), env.path("bootrun"));
    fs::create_dir_all(&newroot).unwrap();
    fs::create_dir_all(&run).unwrap();
    let out = Command::cargo_bin("initramfs-hook")
        .unwrap()
        .args(["boot", "--cmdline", "quiet", "--sysroot"])
        .arg(sysroot)
        .arg("--newroot")
        .arg(&newroot)
        .arg("--run")
        .arg(&run)
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    let _ = nix::mount::umount2(&newroot, nix::mount::MntFlags::MNT_DETACH);
    let _ = nix::mount::umount2(&run.join("strata/store"), nix::mount::MntFlags::MNT_DETACH);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn privileged_store_boots_through_an_absolute_store_link() {
    let Some(env) = Env::new("privileged_store_boots_through_an_absolute_store_link") else {
        return;
    };
    env.ok(&["accept", "up1", "up2"]);
    let sysroot = env.path("sysroot");
    fs::create_dir_all(sysroot.join("data")).unwrap();
    fs::rename(env.store(), sysroot.join("data/strata")).unwrap();
    symlink("/data/strata", sysroot.join("strata")).unwrap();
    let (ok, booted, log) = hook_boot(&env, &sysroot);
    assert!(ok, "{log}");
    assert!(
        booted.contains("up2") && booted.contains("base"),
        "{booted}"
    );
    assert!(!log.contains("fell back"), "{log}");
    assert!(sysroot.join("data/strata/uppers/1/data").is_dir(), "{log}");
}

#[test]
fn privileged_store_fifos_and_symlinked_folders_never_hang_or_leak() {
    let Some(env) = Env::new("privileged_store_fifos_and_symlinked_folders_never_hang_or_leak")
    else {
        return;
    };
    // A fifo where the boot state is: every reader says so at once.
    let state = env.store().join("state/boot.toml");
    fs::rename(&state, env.path("boot.toml.saved")).unwrap();
    nix::unistd::mkfifo(&state, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let out = Command::cargo_bin("overlayctl")
        .unwrap()
        .env("STRATA_RUN_DIR", env.path("run"))
        .arg("--store")
        .arg(env.store())
        .arg("disable")
        .arg("up2")
        .timeout(std::time::Duration::from_secs(20))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("it is a fifo"),
        "{err}"
    );
    fs::remove_file(&state).unwrap();
    fs::rename(env.path("boot.toml.saved"), &state).unwrap();

    // A symlinked layers/ is refused before anything is copied: nothing lands outside.
    let outside = env.path("outside");
    fs::rename(env.store().join("layers"), &outside).unwrap();
    symlink(&outside, env.store().join("layers")).unwrap();
    let before = contents(&outside);
    let tree = env.path("t1");
    let text = env.fails(&["add-layer", tree.to_str().unwrap(), "--name", "up3"]);
    assert!(text.contains("layers is a symlink"), "{text}");
    assert_eq!(contents(&outside), before);
    fs::remove_file(env.store().join("layers")).unwrap();
    fs::rename(&outside, env.store().join("layers")).unwrap();

    // A damaged state whose previous copy is good: read with a warning, never written over.
    env.ok(&["disable", "up2"]);
    env.ok(&["enable", "up2"]);
    assert!(env.store().join("state/boot.toml.prev").exists());
    fs::write(&state, "garbage = [").unwrap();
    let status = env.ok(&["status"]);
    assert!(
        status.contains("warning: the boot state cannot be read"),
        "{status}"
    );
    let text = env.fails(&["disable", "up2"]);
    assert!(
        text.contains("copy") && text.contains("boot.toml.prev over it"),
        "{text}"
    );
    assert_eq!(fs::read_to_string(&state).unwrap(), "garbage = [");
}

#[test]
fn privileged_store_a_mount_inside_a_layer_stops_its_removal_cleanly() {
    let Some(env) = Env::new("privileged_store_a_mount_inside_a_layer_stops_its_removal_cleanly")
    else {
        return;
    };
    let elsewhere = env.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("precious"), "keep").unwrap();
    let inside = env.store().join("layers/up2/usr");
    nix::mount::mount(
        Some(&elsewhere),
        &inside,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let before = env.plan_text();
    let text = env.fails(&["remove", "up2", "--force"]);
    assert!(text.contains("is mounted on, inside layer up2"), "{text}");
    assert_eq!(env.plan_text(), before);
    nix::mount::umount(&inside).unwrap();
    assert_eq!(
        fs::read_to_string(elsewhere.join("precious")).unwrap(),
        "keep"
    );
    env.ok(&["remove", "up2", "--force"]);
    assert!(!env.store().join("layers/up2").exists());
}
