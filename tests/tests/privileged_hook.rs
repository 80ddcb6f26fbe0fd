//! The boot flow of `initramfs-hook` run for real on this machine's kernel, through its test
//! flags (`boot --sysroot --newroot --run --cmdline`): a store made by `overlayctl`, real overlay
//! mounts in a private mount namespace, and the record, state and plan the hook leaves. The same
//! flow booting in QEMU is the VM tests' job.

use std::fs;
use std::path::PathBuf;

use assert_cmd::Command;
use layers_spec::{BootState, Booted, LayerState, MenuMode, Plan, UpperMode};
use std::os::unix::fs::MetadataExt;
use tempfile::TempDir;

use tests::{dir_names, have_root, private_mount_namespace};

struct Machine {
    dir: TempDir,
}

impl Machine {
    /// A root filesystem with a store of base, upgrade-1 and upgrade-2 (a trial layer).
    fn new(test: &str) -> Option<Self> {
        if !have_root(test) {
            return None;
        }
        private_mount_namespace();
        let machine = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        for dir in ["sysroot", "newroot", "run"] {
            fs::create_dir(machine.path(dir)).unwrap();
        }
        let tree = |name: &str, files: &[(&str, &str)]| {
            for (path, text) in files {
                let path = machine.path(name).join(path);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(path, text).unwrap();
            }
        };
        tree(
            "base",
            &[("etc/version", "base\n"), ("etc/only-in-base", "x\n")],
        );
        tree("upgrade-1", &[("etc/version", "1\n")]);
        tree(
            "upgrade-2",
            &[("etc/version", "2\n"), ("usr/bin/new", "new\n")],
        );
        machine.ctl(&["init", "--base", machine.path("base").to_str().unwrap()]);
        machine.ctl(&[
            "add-layer",
            machine.path("upgrade-1").to_str().unwrap(),
            "--active",
        ]);
        machine.ctl(&["add-layer", machine.path("upgrade-2").to_str().unwrap()]);
        Some(machine)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.path("sysroot/strata")
    }

    fn ctl(&self, args: &[&str]) -> String {
        tests::overlayctl(&self.store(), args)
    }

    /// Boots: runs the hook, returns its record; the stack stays mounted until `shutdown`.
    fn boot(&self, cmdline: &str) -> Booted {
        self.boot_with_keys(cmdline, None).0
    }

    /// Boots with keys for the menu (`--menu-keys`); returns the record and the hook's log.
    fn boot_with_keys(&self, cmdline: &str, keys: Option<&str>) -> (Booted, String) {
        self.boot_command(self.hook(cmdline), keys)
    }

    /// The hook's `boot` command for this machine, to run as it is or with more set.
    fn hook(&self, cmdline: &str) -> Command {
        let mut cmd = Command::cargo_bin("initramfs-hook").unwrap();
        cmd.args(["boot", "--sysroot"])
            .arg(self.path("sysroot"))
            .arg("--newroot")
            .arg(self.path("newroot"))
            .arg("--run")
            .arg(self.path("run"))
            .args(["--cmdline", cmdline]);
        cmd
    }

    /// Runs a boot command, which must succeed; returns the record and the hook's log.
    fn boot_command(&self, mut cmd: Command, keys: Option<&str>) -> (Booted, String) {
        if let Some(keys) = keys {
            cmd.args(["--menu-keys", keys]);
        }
        let out = cmd.assert().success().get_output().clone();
        let text = fs::read_to_string(self.path("run/strata/booted.toml")).unwrap();
        let booted = Booted::parse(&text, "booted.toml").unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            text,
            "the hook prints what it records"
        );
        (booted, String::from_utf8(out.stderr).unwrap())
    }

    fn set_plan(&self, edit: impl FnOnce(&mut Plan)) {
        let mut plan = self.plan();
        edit(&mut plan);
        fs::write(
            self.store().join("overlayplan.toml"),
            plan.to_toml().unwrap(),
        )
        .unwrap();
    }

    /// Unmounts what a boot mounted, as a reboot would.
    fn shutdown(&self) {
        for target in ["newroot", "run/strata/store", "run/strata/upper"] {
            let path = self.path(target);
            while nix::mount::umount(&path).is_ok() {}
        }
        let _ = fs::remove_dir_all(self.path("run/strata"));
    }

    fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.path("newroot").join(rel)).ok()
    }

    fn state(&self) -> BootState {
        BootState::parse(
            &fs::read_to_string(self.store().join("state/boot.toml")).unwrap(),
            "state",
        )
        .unwrap()
    }

    fn plan(&self) -> Plan {
        Plan::parse(
            &fs::read_to_string(self.store().join("overlayplan.toml")).unwrap(),
            "plan",
        )
        .unwrap()
    }
}

fn stack(booted: &Booted) -> Vec<&str> {
    booted.stack.iter().map(String::as_str).collect()
}

#[test]
fn privileged_hook_default_stack_and_rollbacks() {
    let Some(m) = Machine::new("privileged_hook_default_stack_and_rollbacks") else {
        return;
    };
    let booted = m.boot("root=/dev/vda ro quiet");
    assert_eq!(stack(&booted), ["upgrade-2", "upgrade-1", "base"]);
    assert_eq!(
        (
            booted.upper,
            booted.upper_id.as_deref(),
            booted.fallback.as_deref()
        ),
        (UpperMode::Persistent, Some("1"), None)
    );
    assert_eq!(
        m.read("etc/version").as_deref(),
        Some("2\n"),
        "the top layer's files win"
    );
    assert_eq!(m.read("usr/bin/new").as_deref(), Some("new\n"));
    // The store is visible to the new root, and its state counted the trial layer's boot.
    assert!(m.path("run/strata/store/overlayplan.toml").is_file());
    assert_eq!(m.state().tries("upgrade-2"), 1);
    assert_eq!(m.state().last_boot.unwrap().layers, booted.stack);
    m.shutdown();

    let booted = m.boot("strata.top=upgrade-1");
    assert_eq!(stack(&booted), ["upgrade-1", "base"]);
    assert_eq!(m.read("etc/version").as_deref(), Some("1\n"));
    assert_eq!(m.read("usr/bin/new"), None);
    m.shutdown();

    let booted = m.boot("strata.disable=upgrade-2,upgrade-1");
    assert_eq!(stack(&booted), ["base"]);
    assert_eq!(m.read("etc/version").as_deref(), Some("base\n"));
    m.shutdown();
}

#[test]
fn privileged_hook_trial_layers_run_out_unless_accepted() {
    let Some(m) = Machine::new("privileged_hook_trial_layers_run_out_unless_accepted") else {
        return;
    };
    for boot in 1..=3 {
        let booted = m.boot("");
        assert_eq!(stack(&booted)[0], "upgrade-2", "boot {boot} of 3 tries it");
        m.shutdown();
    }
    let booted = m.boot("");
    assert_eq!(
        stack(&booted),
        ["upgrade-1", "base"],
        "its tries are used up"
    );
    assert_eq!(
        m.plan().layer("upgrade-2").unwrap().state,
        LayerState::Disabled,
        "and the plan says so"
    );
    m.shutdown();

    // Accepted after its first boot, a trial layer stays.
    m.ctl(&["enable", "upgrade-2"]);
    let plan = fs::read_to_string(m.store().join("overlayplan.toml")).unwrap();
    fs::write(
        m.store().join("overlayplan.toml"),
        plan.replacen("state = \"active\"", "state = \"trial\"", 1),
    )
    .unwrap();
    m.boot("");
    m.shutdown();
    m.ctl(&["accept", "upgrade-2"]);
    for _ in 0..4 {
        assert_eq!(stack(&m.boot(""))[0], "upgrade-2");
        m.shutdown();
    }
    assert_eq!(
        m.plan().layer("upgrade-2").unwrap().state,
        LayerState::Active
    );
}

#[test]
fn privileged_hook_uppers_persist_or_not() {
    let Some(m) = Machine::new("privileged_hook_uppers_persist_or_not") else {
        return;
    };
    m.boot("");
    fs::write(m.path("newroot/etc/written"), "kept\n").unwrap();
    m.shutdown();
    m.boot("");
    assert_eq!(
        m.read("etc/written").as_deref(),
        Some("kept\n"),
        "the persistent upper keeps it"
    );
    m.shutdown();

    let booted = m.boot("strata.upper=tmpfs");
    assert_eq!(
        (booted.upper, booted.upper_id.as_deref()),
        (UpperMode::Tmpfs, None)
    );
    assert_eq!(m.read("etc/written"), None, "a tmpfs upper starts empty");
    fs::write(m.path("newroot/etc/scratch"), "gone\n").unwrap();
    m.shutdown();
    m.boot("strata.upper=tmpfs");
    assert_eq!(m.read("etc/scratch"), None, "and forgets");
    m.shutdown();
}

#[test]
fn privileged_hook_rollback_carries_the_upper_or_archives_it() {
    let Some(m) = Machine::new("privileged_hook_rollback_carries_the_upper_or_archives_it") else {
        return;
    };
    // Accepted, so its tries do not run out (which would be a rollback too).
    m.set_plan(|p| p.layer_mut("upgrade-2").unwrap().state = LayerState::Active);
    // carry (the default): the rollback keeps the same upper.
    m.boot("");
    fs::write(m.path("newroot/etc/note"), "on 2\n").unwrap();
    m.shutdown();
    let booted = m.boot("strata.top=upgrade-1");
    assert_eq!(booted.upper_id.as_deref(), Some("1"));
    assert_eq!(m.read("etc/note").as_deref(), Some("on 2\n"));
    m.shutdown();

    // fresh: a boot that leaves out what the last one had archives the upper.
    m.set_plan(|p| p.upper.on_rollback = layers_spec::OnRollback::Fresh);
    m.boot("");
    m.shutdown();
    // A tmpfs boot of the older stack in between: the persistent upper was still last used
    // over upgrade-2, so the next persistent boot of the older stack is the rollback.
    let booted = m.boot("strata.upper=tmpfs strata.top=upgrade-1");
    assert_eq!(booted.upper, UpperMode::Tmpfs);
    m.shutdown();
    let (booted, log) = m.boot_with_keys("strata.top=upgrade-1", None);
    assert_eq!(stack(&booted), ["upgrade-1", "base"]);
    assert_eq!(booted.upper_id.as_deref(), Some("2"), "{log}");
    assert!(
        log.contains("rolled back from upgrade-2: upper 1 is archived"),
        "{log}"
    );
    assert_eq!(m.read("etc/note"), None, "the fresh upper starts empty");
    assert_eq!(
        m.state().archived_uppers,
        [layers_spec::ArchivedUpper {
            id: "1".into(),
            layers: vec!["upgrade-2".into(), "upgrade-1".into(), "base".into()],
        }]
    );
    fs::write(m.path("newroot/etc/note"), "on 1\n").unwrap();
    m.shutdown();
    // The same stack again, or an upgrade on top: no rollback, the upper stays.
    for cmdline in ["strata.top=upgrade-1", ""] {
        let booted = m.boot(cmdline);
        assert_eq!(booted.upper_id.as_deref(), Some("2"), "{cmdline}");
        assert_eq!(m.read("etc/note").as_deref(), Some("on 1\n"));
        m.shutdown();
    }
    assert_eq!(m.state().archived_uppers.len(), 1);
    assert_eq!(dir_names(&m.store().join("uppers")), ["1", "2"]);

    // The archived upper mounts over the stack it was used over, to recover what it holds.
    m.boot("");
    let mnt = m.path("recover");
    fs::create_dir(&mnt).unwrap();
    let ctl = |args: &[&str]| m.ctl_at(&m.store(), args);
    let status = String::from_utf8(ctl(&["status"]).stdout).unwrap();
    assert!(status.contains("  1: 5, used over upgrade-2"), "{status}");
    let out = ctl(&["mount", mnt.to_str().unwrap(), "--upper", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_to_string(mnt.join("etc/note")).unwrap(), "on 2\n");
    assert_eq!(fs::read_to_string(mnt.join("etc/version")).unwrap(), "2\n");
    let out = ctl(&["remove", "--upper", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upper 1 is mounted"), "{stderr}");
    assert!(ctl(&["umount", mnt.to_str().unwrap()]).status.success());
    // The running upper is refused.
    let out = ctl(&["mount", mnt.to_str().unwrap(), "--upper", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the running system's upper"), "{stderr}");

    // Removing: never the current upper, nor one that is not archived.
    for (id, error) in [
        ("2", "upper 2 is the current upper"),
        ("7", "there is no archived upper 7; archived uppers: 1"),
    ] {
        let out = ctl(&["remove", "--upper", id]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(error), "{stderr}");
    }
    m.shutdown();

    // Another rollback archives upper 2; the fresh upper takes an id no record names.
    let booted = m.boot("strata.top=upgrade-1");
    assert_eq!(booted.upper_id.as_deref(), Some("3"));
    m.shutdown();
    let ids: Vec<String> = m
        .state()
        .archived_uppers
        .iter()
        .map(|a| a.id.clone())
        .collect();
    assert_eq!(ids, ["1", "2"]);
    // A layer an archived upper was used over is kept for it unless forced.
    let out = ctl(&["remove", "upgrade-2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("archived upper 1, 2 was used over upgrade-2"),
        "{stderr}"
    );
    let out = ctl(&["remove", "--upper", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed archived upper 2"));
    // The policy removes archived uppers when free space is short, after disabled layers.
    m.set_plan(|p| p.policy.min_free = layers_spec::ByteSize(u64::MAX / 2));
    let out = ctl(&["policy", "--dry-run"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("would remove upper 1: archived by a rollback"),
        "{said}"
    );
    assert!(
        m.store().join("uppers/1").exists(),
        "a dry run changes nothing"
    );
    let out = ctl(&["policy"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("done: remove upper 1"), "{said}");
    assert!(m.state().archived_uppers.is_empty());
    assert_eq!(dir_names(&m.store().join("uppers")), ["3"]);

    // An id the state still names is never taken again, even with its directory gone (removed
    // by hand, here).
    let mut state = m.state();
    state.archived_uppers.push(layers_spec::ArchivedUpper {
        id: "1".into(),
        layers: vec!["upgrade-1".into(), "base".into()],
    });
    layers_store::Store::open(&m.store())
        .unwrap()
        .save_state(&state)
        .unwrap();
    m.boot("strata.top=upgrade-1");
    fs::write(m.path("newroot/etc/note"), "on 1 again\n").unwrap();
    m.shutdown();
    let booted = m.boot("strata.top=base");
    assert_eq!(booted.upper_id.as_deref(), Some("2"));
    m.shutdown();
}

#[test]
fn privileged_hook_falls_back_and_says_why() {
    let Some(m) = Machine::new("privileged_hook_falls_back_and_says_why") else {
        return;
    };
    // A first good boot, accepted: the last good stack.
    m.boot("");
    m.shutdown();
    m.ctl(&["accept", "upgrade-2"]);
    let mut state = m.state();
    state.last_good = vec!["upgrade-2".into(), "upgrade-1".into(), "base".into()];
    fs::write(m.store().join("state/boot.toml"), state.to_toml().unwrap()).unwrap();

    // A missing layer: the fallbacks, with the reason recorded.
    fs::rename(m.store().join("layers/upgrade-1"), m.path("hidden")).unwrap();
    let booted = m.boot("");
    assert_eq!(stack(&booted), ["base"]);
    let why = booted.fallback.unwrap();
    assert!(
        why.contains("layer upgrade-1 is missing from the store"),
        "{why}"
    );
    m.shutdown();
    // Nor is a symlink to it a layer of the store, nor a directory with something mounted on
    // it (the store is read in one pass at boot; these are what that pass must still see).
    std::os::unix::fs::symlink(m.path("hidden"), m.store().join("layers/upgrade-1")).unwrap();
    let booted = m.boot("");
    assert_eq!(stack(&booted), ["base"], "a symlinked layer");
    m.shutdown();
    fs::remove_file(m.store().join("layers/upgrade-1")).unwrap();
    fs::rename(m.path("hidden"), m.store().join("layers/upgrade-1")).unwrap();
    let layer = m.store().join("layers/upgrade-1");
    nix::mount::mount(
        Some(&layer),
        &layer,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let booted = m.boot("");
    assert_eq!(stack(&booted), ["base"], "a layer mounted over");
    assert!(
        booted
            .fallback
            .unwrap()
            .contains("layer upgrade-1 is missing from the store")
    );
    m.shutdown();
    nix::mount::umount(&layer).unwrap();

    // A corrupt plan: its previous copy boots.
    m.ctl(&["disable", "upgrade-2"]);
    fs::write(
        m.store().join("overlayplan.toml"),
        "version = 1\n[[layer]]\nname = \"broken\n",
    )
    .unwrap();
    let booted = m.boot("");
    assert_eq!(
        stack(&booted),
        ["upgrade-2", "upgrade-1", "base"],
        "the plan before the disable"
    );
    assert!(booted.fallback.unwrap().contains("the plan is unusable"));
    m.shutdown();
    m.ctl(&[
        "import-legacy",
        "--force",
        write_legacy(&m).to_str().unwrap(),
    ]);

    // A persistent upper that cannot be used (its work dir is another filesystem mounted
    // there, which the store never works through): the stack boots with a tmpfs upper.
    let work = m.store().join("uppers/1/work");
    nix::mount::mount(
        Some("tmpfs"),
        &work,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let booted = m.boot("");
    assert_eq!(
        (stack(&booted), booted.upper),
        (vec!["upgrade-2", "upgrade-1", "base"], UpperMode::Tmpfs)
    );
    let why = booted.fallback.unwrap();
    assert!(why.contains("uppers/1/work is a mount point"), "{why}");
    assert!(why.contains("booted with a tmpfs upper"), "{why}");
    m.shutdown();
    nix::mount::umount(&work).unwrap();
}

/// A legacy plan naming the three layers, to repair the store after the corrupt-plan test.
fn write_legacy(m: &Machine) -> PathBuf {
    let path = m.path("plan.overlayplan");
    fs::write(
        &path,
        "[Layers]\nupgrade-2=\"Two\",ro\nupgrade-1=\"One\",ro\nbase=\"Base\",ro\n",
    )
    .unwrap();
    path
}

#[test]
fn privileged_hook_mounts_two_hundred_layers() {
    let Some(m) = Machine::new("privileged_hook_mounts_two_hundred_layers") else {
        return;
    };
    let mut plan = m.plan();
    for i in 0..200 {
        let name = format!("extra-{i:03}");
        let dir = m.store().join("layers").join(&name);
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/version"), format!("{i}\n")).unwrap();
        plan.layers.insert(0, layers_spec::Layer::new(name));
    }
    fs::write(m.store().join("overlayplan.toml"), plan.to_toml().unwrap()).unwrap();
    let booted = m.boot("");
    assert_eq!(booted.stack.len(), 203);
    assert_eq!(m.read("etc/version").as_deref(), Some("199\n"));
    m.shutdown();
}

#[test]
fn privileged_hook_with_nothing_to_mount_fails_cleanly() {
    let Some(m) = Machine::new("privileged_hook_with_nothing_to_mount_fails_cleanly") else {
        return;
    };
    fs::rename(m.store().join("layers"), m.path("gone")).unwrap();
    fs::create_dir(m.store().join("layers")).unwrap();
    let out = Command::cargo_bin("initramfs-hook")
        .unwrap()
        .args(["boot", "--cmdline", "", "--sysroot"])
        .arg(m.path("sysroot"))
        .arg("--newroot")
        .arg(m.path("newroot"))
        .arg("--run")
        .arg(m.path("run"))
        .assert()
        .failure()
        .code(1)
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8(out).unwrap();
    assert!(
        err.contains("strata: error: every stack failed to mount"),
        "{err}"
    );
    assert!(
        !m.path("run/strata/booted.toml").exists(),
        "no record of a boot that did not happen"
    );
}

#[test]
fn privileged_hook_menu_boots_a_choice_once_or_saves_it() {
    let Some(m) = Machine::new("privileged_hook_menu_boots_a_choice_once_or_saves_it") else {
        return;
    };
    // Saving the default as it is keeps upgrade-2's trial counting: its tries are not reset.
    m.shutdown();
    m.boot("");
    m.shutdown();
    let (booted, log) = m.boot_with_keys("strata.menu", Some("s"));
    assert_eq!(stack(&booted), ["upgrade-2", "upgrade-1", "base"], "{log}");
    assert_eq!(m.state().tries("upgrade-2"), 2);
    m.shutdown();
    m.ctl(&["accept", "upgrade-2"]);
    m.ctl(&["disable", "upgrade-2"]);
    m.ctl(&["enable", "upgrade-2"]);

    let plan_before = m.plan();
    // The cursor starts on the top layer: down, t makes upgrade-1 the top, Enter boots once.
    let (booted, log) = m.boot_with_keys("strata.menu", Some("down t enter"));
    assert_eq!(stack(&booted), ["upgrade-1", "base"], "{log}");
    assert!(booted.one_shot);
    assert!(
        log.contains("strata: menu: booting upgrade-1, base once; the plan is unchanged"),
        "{log}"
    );
    assert_eq!(m.read("etc/version").as_deref(), Some("1\n"));
    assert_eq!(m.plan(), plan_before, "booting once leaves the plan alone");
    assert_eq!(m.state().once, None, "the one-shot selection is used up");
    m.shutdown();
    let booted = m.boot("");
    assert_eq!(stack(&booted), ["upgrade-2", "upgrade-1", "base"]);
    m.shutdown();

    // s saves: upgrade-2 is disabled in the plan, the old plan kept as .prev.
    let (booted, log) = m.boot_with_keys("strata.menu", Some("down t s"));
    assert_eq!(stack(&booted), ["upgrade-1", "base"], "{log}");
    assert!(!booted.one_shot);
    assert!(
        log.contains("strata: menu: saved upgrade-1, base to the plan; booting it"),
        "{log}"
    );
    assert_eq!(
        m.plan().layer("upgrade-2").unwrap().state,
        LayerState::Disabled
    );
    let prev = fs::read_to_string(m.store().join("overlayplan.toml.prev")).unwrap();
    assert_eq!(Plan::parse(&prev, "prev").unwrap(), plan_before);
    m.shutdown();
    let booted = m.boot("");
    assert_eq!(
        stack(&booted),
        ["upgrade-1", "base"],
        "the saved choice holds"
    );
    m.shutdown();

    // Switched back on by hand (the cursor starts on the default top, upgrade-1), it is active.
    let (booted, log) = m.boot_with_keys("strata.menu", Some("home space s"));
    assert_eq!(stack(&booted), ["upgrade-2", "upgrade-1", "base"], "{log}");
    assert_eq!(
        m.plan().layer("upgrade-2").unwrap().state,
        LayerState::Active
    );
    m.shutdown();

    // A one-shot selection waiting in the state does not outrank what the menu saves.
    let mut state = m.state();
    state.once = Some(layers_spec::OneShot {
        layers: vec!["upgrade-1".into(), "base".into()],
        upper: None,
    });
    fs::write(m.store().join("state/boot.toml"), state.to_toml().unwrap()).unwrap();
    let (booted, log) = m.boot_with_keys("strata.menu", Some("end t s"));
    assert_eq!(stack(&booted), ["base"], "{log}");
    assert_eq!(m.state().once, None);
    m.shutdown();
    m.ctl(&["enable", "upgrade-1", "upgrade-2"]);

    // Esc (and keys running out) boot the default; the command line's own choice stays.
    let (booted, log) = m.boot_with_keys("strata.menu strata.top=upgrade-1", Some("esc"));
    assert_eq!(stack(&booted), ["upgrade-1", "base"], "{log}");
    assert!(log.contains("strata: menu: booting the default"), "{log}");
    m.shutdown();
}

#[test]
fn privileged_hook_menu_modes_decide_when_it_shows() {
    let Some(m) = Machine::new("privileged_hook_menu_modes_decide_when_it_shows") else {
        return;
    };
    // Accepted, so that the many boots below do not run out upgrade-2's trial (on-failure
    // counts that as a failed upgrade).
    m.ctl(&["accept", "upgrade-2"]);
    // on-key: a key during the wait opens it (that key is swallowed); none, and it boots.
    m.set_plan(|p| p.boot.menu = MenuMode::OnKey);
    let (booted, log) = m.boot_with_keys("", Some("x down t enter"));
    assert_eq!(stack(&booted), ["upgrade-1", "base"], "{log}");
    m.shutdown();
    let (booted, log) = m.boot_with_keys("", Some(""));
    assert_eq!(stack(&booted), ["upgrade-2", "upgrade-1", "base"], "{log}");
    assert!(!log.contains("menu:"), "{log}");
    m.shutdown();

    // never: not even a key opens it; strata.menu still does.
    m.set_plan(|p| p.boot.menu = MenuMode::Never);
    let (_, log) = m.boot_with_keys("", Some("x esc"));
    assert!(!log.contains("menu:"), "{log}");
    m.shutdown();
    let (_, log) = m.boot_with_keys("strata.menu", Some("esc"));
    assert!(log.contains("menu: booting the default"), "{log}");
    m.shutdown();

    // on-failure: only after a boot that fell back.
    m.set_plan(|p| p.boot.menu = MenuMode::OnFailure);
    let (_, log) = m.boot_with_keys("", Some("esc"));
    assert!(!log.contains("menu:"), "{log}");
    m.shutdown();
    fs::rename(m.store().join("layers/upgrade-1"), m.path("away")).unwrap();
    let (booted, _) = m.boot_with_keys("", Some("esc"));
    assert!(booted.fallback.is_some());
    m.shutdown();
    fs::rename(m.path("away"), m.store().join("layers/upgrade-1")).unwrap();
    let (_, log) = m.boot_with_keys("", Some("esc"));
    assert!(log.contains("menu: booting the default"), "{log}");
    m.shutdown();

    // No terminal (standard input is not one): the menu is skipped and the default boots.
    m.set_plan(|p| p.boot.menu = MenuMode::Always);
    let (booted, log) = m.boot_with_keys("", None);
    assert!(
        log.contains("no terminal for the boot menu; booting the default"),
        "{log}"
    );
    assert_eq!(stack(&booted), ["upgrade-2", "upgrade-1", "base"]);
    m.shutdown();
}

#[test]
fn privileged_hook_locked_menu_needs_the_password() {
    let Some(m) = Machine::new("privileged_hook_locked_menu_needs_the_password") else {
        return;
    };
    // An empty password is refused and changes nothing.
    let plan_before = m.plan();
    let refused = Command::cargo_bin("overlayctl")
        .unwrap()
        .arg("--store")
        .arg(m.store())
        .arg("menu-lock")
        .write_stdin("\n")
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(
        String::from_utf8(refused)
            .unwrap()
            .contains("the password on standard input is empty; nothing was changed")
    );
    assert_eq!(m.plan(), plan_before);
    let locked = Command::cargo_bin("overlayctl")
        .unwrap()
        .env("STRATA_RUN_DIR", "/nonexistent/strata-run")
        .arg("--store")
        .arg(m.store())
        .arg("menu-lock")
        .write_stdin("kiosk\n")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(
        String::from_utf8(locked)
            .unwrap()
            .contains("the boot menu now asks for the password before any change")
    );
    let hash = m.plan().boot.menu_lock.expect("a lock in the plan");
    assert!(boot_ui::verify_password(&hash, "kiosk"), "{hash}");
    // A wrong password, then giving up: the default boots.
    let (booted, log) = m.boot_with_keys("strata.menu", Some("down t n o enter esc esc"));
    assert_eq!(stack(&booted), ["upgrade-2", "upgrade-1", "base"], "{log}");
    m.shutdown();
    // The right one lets the rollback through.
    let (booted, log) = m.boot_with_keys("strata.menu", Some("down t k i o s k enter enter"));
    assert_eq!(stack(&booted), ["upgrade-1", "base"], "{log}");
    m.shutdown();
    // Unlocked again: the menu asks for nothing.
    m.ctl(&["menu-lock", "--clear"]);
    assert_eq!(m.plan().boot.menu_lock, None);
    let (booted, log) = m.boot_with_keys("strata.menu", Some("down t enter"));
    assert_eq!(stack(&booted), ["upgrade-1", "base"], "{log}");
    m.shutdown();
}

impl Machine {
    /// overlayctl as the running system runs it: the store where the hook bound it, its record.
    fn booted_ctl(&self, args: &[&str]) -> std::process::Output {
        self.ctl_at(&self.path("run/strata/store"), args)
    }

    /// overlayctl on `store`, with the running boot's record (none after `shutdown`), whatever
    /// it exits with.
    fn ctl_at(&self, store: &std::path::Path, args: &[&str]) -> std::process::Output {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("overlayctl"))
            .env("STRATA_RUN_DIR", self.path("run/strata"))
            .arg("--store")
            .arg(store)
            .args(args)
            .output()
            .unwrap()
    }

    /// Boots, changes the running root, asks for a checkpoint `cp1` and shuts down.
    fn change_and_checkpoint(&self) {
        let first = self.boot("");
        assert_eq!(first.upper_id.as_deref(), Some("1"));
        fs::write(self.path("newroot/etc/note"), "made while running\n").unwrap();
        // Two deletions (whiteouts overlayfs links to one inode), copied-up directories
        // (bookkeeping xattrs), a directory deleted and made again (opaque).
        fs::remove_file(self.path("newroot/etc/only-in-base")).unwrap();
        fs::remove_file(self.path("newroot/etc/version")).unwrap();
        fs::remove_dir_all(self.path("newroot/usr/bin")).unwrap();
        fs::create_dir(self.path("newroot/usr/bin")).unwrap();
        fs::write(self.path("newroot/usr/bin/tool"), "tool\n").unwrap();
        let upper = self.store().join("uppers/1/data");
        assert!(
            fs::symlink_metadata(upper.join("etc/only-in-base"))
                .unwrap()
                .nlink()
                > 1,
            "overlayfs shares one whiteout inode, which the freeze must undo"
        );
        assert!(
            !overlay_xattrs(&upper).is_empty(),
            "the upper has bookkeeping xattrs to strip"
        );
        let out = self.booted_ctl(&[
            "checkpoint",
            "--name",
            "cp1",
            "--title",
            "Before the upgrade",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .contains("upper 1 becomes the read-only layer cp1")
        );
        self.shutdown();
    }

    /// The boot after the checkpoint: cp1 on top, clean, its files; a fresh upper 2.
    fn assert_frozen(&self, booted: &Booted) {
        assert_eq!(stack(booted)[0], "cp1", "{booted:?}");
        assert_eq!(booted.upper_id.as_deref(), Some("2"));
        assert_eq!(
            self.read("etc/note").as_deref(),
            Some("made while running\n")
        );
        assert_eq!(self.read("etc/version"), None);
        assert_eq!(self.read("etc/only-in-base"), None);
        assert_eq!(dir_names(&self.path("newroot/usr/bin")), ["tool"]);
        let plan = self.plan();
        assert_eq!(plan.layers.iter().filter(|l| l.name == "cp1").count(), 1);
        let layer = plan.layer("cp1").unwrap();
        assert_eq!(layer.title.as_deref(), Some("Before the upgrade"));
        assert_eq!(layer.parent.as_deref(), Some("upgrade-2"));
        assert_eq!(layer.digest, None, "the hook hashes nothing");
        assert!(
            !self.store().join("uppers/1").exists(),
            "the frozen upper is gone"
        );
        // A plain lower layer: each whiteout its own node, only `opaque` left of overlay's
        // xattrs, nothing of the freeze's own.
        let dir = self.store().join("layers/cp1");
        assert_eq!(
            dir_names(&dir.join("etc")),
            ["note", "only-in-base", "version"]
        );
        for whiteout in ["etc/only-in-base", "etc/version"] {
            let meta = fs::symlink_metadata(dir.join(whiteout));
            assert!(
                meta.as_ref().is_ok_and(|m| m.nlink() == 1),
                "{whiteout}: {meta:?}"
            );
        }
        assert_eq!(
            overlay_xattrs(&dir),
            [("usr/bin".to_owned(), "trusted.overlay.opaque".to_owned())]
        );
        let frozen = self
            .state()
            .checkpoint
            .expect("kept until overlayctl seals it");
        assert!(frozen.frozen, "{frozen:?}");
    }
}

#[test]
fn privileged_hook_checkpoint_freezes_the_upper_at_the_next_boot() {
    let Some(m) = Machine::new("privileged_hook_checkpoint_freezes_the_upper_at_the_next_boot")
    else {
        return;
    };
    // Not booted: nothing to freeze.
    let out = m.ctl_at(&m.store(), &["checkpoint"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not booted from"));
    assert_eq!(m.state().checkpoint, None, "nothing recorded");

    m.change_and_checkpoint();
    // The pending checkpoint's name is taken.
    let out = m.ctl_at(
        &m.store(),
        &[
            "add-layer",
            m.path("base").to_str().unwrap(),
            "--name",
            "cp1",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("\"cp1\" is the name of the pending checkpoint"),
        "{stderr}"
    );
    // A layer added before the reboot goes below the checkpoint, which keeps the parent the
    // upper was used over.
    fs::create_dir_all(m.path("later/opt")).unwrap();
    fs::write(m.path("later/opt/later"), "later\n").unwrap();
    m.ctl(&["add-layer", m.path("later").to_str().unwrap(), "--active"]);
    let second = m.boot("");
    m.assert_frozen(&second);
    assert_eq!(stack(&second)[..2], ["cp1", "later"]);
    assert_eq!(m.read("opt/later").as_deref(), Some("later\n"));
    // Writes now go to the fresh upper, not the frozen layer.
    fs::write(m.path("newroot/etc/note"), "after\n").unwrap();
    assert_eq!(
        fs::read_to_string(m.store().join("layers/cp1/etc/note")).unwrap(),
        "made while running\n"
    );
    // The next change (the accept unit's, here) writes the layer's manifest and digest.
    let out = m.booted_ctl(&["accept"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(m.state().checkpoint, None);
    assert!(m.plan().layer("cp1").unwrap().digest.is_some());
    assert!(m.store().join("manifests/cp1").is_file());
    let out = m.booted_ctl(&["verify"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cp1: ok"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    m.shutdown();
}

/// A boot cut short at each step of the freeze (STRATA_FAULT aborts the hook there, as a power
/// cut would) leaves a store whose next boot finishes the checkpoint.
#[test]
fn privileged_hook_checkpoint_crash_at_every_step_finishes_at_the_next_boot() {
    for point in [
        "checkpoint-renamed",
        "checkpoint-whiteout",
        "checkpoint-planned",
        "checkpoint-upper-removed",
        // After the freeze and the mount, before the boot's own state save: the state saved
        // right after the freeze keeps the fresh upper (else the next boot would start another).
        "boot-mounted",
    ] {
        let Some(m) = Machine::new(
            "privileged_hook_checkpoint_crash_at_every_step_finishes_at_the_next_boot",
        ) else {
            return;
        };
        m.change_and_checkpoint();
        let out = m.hook("").env("STRATA_FAULT", point).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&format!("fault injected at {point}")),
            "{point}: the hook did not stop there: {stderr}"
        );
        m.shutdown();
        let booted = m.boot("");
        m.assert_frozen(&booted);
        m.shutdown();
    }
}

/// A checkpoint frozen at a boot that also rolls back (on_rollback = "fresh"): the layer is
/// disabled with the layer rolled back, and the fresh upper, empty, is not archived.
#[test]
fn privileged_hook_checkpoint_then_rollback_keeps_the_changes_off_the_older_stack() {
    let Some(m) = Machine::new(
        "privileged_hook_checkpoint_then_rollback_keeps_the_changes_off_the_older_stack",
    ) else {
        return;
    };
    m.set_plan(|p| p.upper.on_rollback = layers_spec::OnRollback::Fresh);
    m.change_and_checkpoint();
    m.ctl(&["rollback", "--to", "upgrade-1"]);
    let (booted, log) = m.boot_with_keys("", None);
    assert_eq!(stack(&booted), ["upgrade-1", "base"], "{log}");
    assert_eq!(booted.upper_id.as_deref(), Some("2"));
    let plan = m.plan();
    assert_eq!(plan.layers[0].name, "cp1");
    assert_eq!(plan.layers[0].state, LayerState::Disabled, "{log}");
    assert!(
        log.contains("checkpoint cp1 is disabled like upgrade-2"),
        "{log}"
    );
    assert!(m.state().archived_uppers.is_empty(), "{log}");
    assert_eq!(m.read("etc/note"), None);
    assert_eq!(m.read("etc/version").as_deref(), Some("1\n"));
    m.shutdown();
}

/// A freeze that fails without a crash (cleaning the layer, writing the plan) puts the upper
/// back: the boot runs on it with its data, and the next boot freezes it, later writes too.
#[test]
fn privileged_hook_checkpoint_that_fails_keeps_the_upper_and_tries_again() {
    for step in ["checkpoint-clean", "checkpoint-plan"] {
        let Some(m) =
            Machine::new("privileged_hook_checkpoint_that_fails_keeps_the_upper_and_tries_again")
        else {
            return;
        };
        m.change_and_checkpoint();
        let mut failing = m.hook("");
        failing.env("STRATA_FAIL", step);
        let (booted, log) = m.boot_command(failing, None);
        assert_eq!(booted.upper_id.as_deref(), Some("1"), "{step}: {log}");
        assert!(
            log.contains("the checkpoint cp1 cannot be made"),
            "{step}: {log}"
        );
        assert!(log.contains("upper 1 stays in use"), "{step}: {log}");
        assert_eq!(m.read("etc/note").as_deref(), Some("made while running\n"));
        assert_eq!(stack(&booted)[0], "upgrade-2");
        assert!(m.plan().layer("cp1").is_none());
        assert!(!m.store().join("layers/cp1").exists());
        let pending = m.state().checkpoint.expect("still pending");
        assert!(!pending.frozen);
        fs::create_dir(m.path("newroot/var")).unwrap();
        fs::write(m.path("newroot/var/later"), "later\n").unwrap();
        m.shutdown();
        let booted = m.boot("");
        m.assert_frozen(&booted);
        assert!(m.store().join("layers/cp1/var/later").is_file(), "{step}");
        m.shutdown();
    }
}

/// Every `trusted.overlay.*` xattr under `root` (itself included), as (path, name), in order.
fn overlay_xattrs(root: &std::path::Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut paths = vec![root.to_owned()];
    while let Some(path) = paths.pop() {
        for name in xattr::list(&path).into_iter().flatten() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("trusted.overlay.") {
                let rel = path.strip_prefix(root).unwrap();
                found.push((rel.display().to_string(), name));
            }
        }
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            paths.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found.sort();
    found
}

/// `take-root`, the whole initramfs-tools and dracut glue: with a store on the real root
/// (mounted read-only at ROOT, as initramfs-tools leaves it), it moves the real root aside,
/// makes it writable and mounts the stack at ROOT; without a store, or when nothing mounts, the
/// real root stays (or goes back) at ROOT.
#[test]
fn privileged_hook_take_root_puts_the_stack_where_the_root_was() {
    use nix::mount::{MsFlags, mount, umount};
    let Some(m) = Machine::new("privileged_hook_take_root_puts_the_stack_where_the_root_was")
    else {
        return;
    };
    let rootmnt = m.path("rootmnt");
    // A real root of its own (a tmpfs) holding the machine's store, mounted read-only.
    let real_root = |with_store: bool| {
        fs::create_dir_all(&rootmnt).unwrap();
        mount(
            Some("tmpfs"),
            &rootmnt,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        if with_store {
            let copied = std::process::Command::new("cp")
                .arg("-a")
                .arg(m.store())
                .arg(rootmnt.join("strata"))
                .status()
                .unwrap();
            assert!(copied.success());
        }
        fs::write(rootmnt.join("on-the-real-root"), "yes").unwrap();
        let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, &rootmnt, None::<&str>, ro, None::<&str>).unwrap();
    };
    let take_root = || {
        let out = Command::cargo_bin("initramfs-hook")
            .unwrap()
            .args(["take-root", "--root"])
            .arg(&rootmnt)
            .arg("--run")
            .arg(m.path("run"))
            .args(["--cmdline", "root=/dev/vda ro"])
            .assert()
            .success()
            .get_output()
            .clone();
        String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap()
    };
    let kept = m.path("run/strata/root");
    let unmount_all = || {
        for path in [&rootmnt, &m.path("run/strata/store"), &kept] {
            while umount(path).is_ok() {}
        }
        let _ = fs::remove_dir_all(m.path("run/strata"));
    };

    real_root(true);
    let said = take_root();
    assert!(said.contains("the layered root is mounted"), "{said}");
    assert_eq!(
        fs::read_to_string(rootmnt.join("etc/version")).unwrap(),
        "2\n"
    );
    assert!(!rootmnt.join("on-the-real-root").exists(), "{said}");
    // The real root lives on under /run, writable: the boot state counted the trial's boot.
    assert!(kept.join("on-the-real-root").exists());
    let state = fs::read_to_string(kept.join("strata/state/boot.toml")).unwrap();
    assert!(state.contains("upgrade-2"), "{state}");
    fs::write(kept.join("writable"), "yes").unwrap();
    // A second call (a unit restarted, or two glues in one image) leaves it alone.
    let said = take_root();
    assert!(said.contains("already taken"), "{said}");
    assert!(rootmnt.join("etc/version").exists());
    unmount_all();

    // No store: the real root is left as it is.
    real_root(false);
    let said = take_root();
    assert!(said.contains("no store at /strata"), "{said}");
    assert!(rootmnt.join("on-the-real-root").exists());
    assert!(!m.path("run/strata/booted.toml").exists());
    unmount_all();

    // A store whose layers are all gone: nothing mounts, and the real root goes back.
    real_root(true);
    let rw = MsFlags::MS_REMOUNT;
    mount(None::<&str>, &rootmnt, None::<&str>, rw, None::<&str>).unwrap();
    fs::remove_dir_all(rootmnt.join("strata/layers")).unwrap();
    fs::create_dir(rootmnt.join("strata/layers")).unwrap();
    let said = take_root();
    assert!(said.contains("booting the real root as it is"), "{said}");
    assert!(rootmnt.join("on-the-real-root").exists(), "{said}");
    assert!(!kept.join("on-the-real-root").exists());
    // A second call this boot (systemd's fallback unit runs after the console's) does not run
    // the boot again: the boot state is not written twice.
    let state_file = rootmnt.join("strata/state/boot.toml");
    let state = fs::read_to_string(&state_file).unwrap_or_default();
    let said = take_root();
    assert!(said.contains("already taken"), "{said}");
    assert_eq!(fs::read_to_string(&state_file).unwrap_or_default(), state);
    assert!(rootmnt.join("on-the-real-root").exists(), "{said}");
    unmount_all();

    // A first call killed halfway: the real root set aside under /run, nothing at the root.
    // The next call puts it back.
    real_root(true);
    fs::create_dir_all(&kept).unwrap();
    mount(
        Some(&rootmnt),
        &kept,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .unwrap();
    fs::write(m.path("run/strata/take-root.started"), "").unwrap();
    let said = take_root();
    assert!(said.contains("stopped halfway"), "{said}");
    assert!(rootmnt.join("on-the-real-root").exists(), "{said}");
    unmount_all();
}
