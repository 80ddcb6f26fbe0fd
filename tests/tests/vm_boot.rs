//! Real boots in QEMU: a Debian kernel, the hook as `/init` of its own initramfs, and a disk whose
//! store holds a busybox base layer with a test init. Each scenario boots, reads the serial
//! console's markers, and checks what the hook did. The VM tests run one at a time (see
//! `.config/nextest.toml`); a failing boot prints its serial log.

use std::fs;
use std::path::PathBuf;
use std::sync::Once;

use layers_spec::{BootState, Booted, UpperMode};
use tempfile::TempDir;
use tests::have_root;
use tests::vm::{self, BootLog, Kernel};

struct Vm {
    dir: TempDir,
    kernel: Kernel,
    initrd: PathBuf,
}

static PACKAGES: Once = Once::new();

impl Vm {
    /// A disk whose store has `base` and the upgrade layers given (bottom to top), each
    /// setting /etc/version to its name.
    fn new(test: &str, upgrades: &[&str]) -> Option<Self> {
        let machine = Self::without_store(test)?;
        vm::busybox_root(&machine.path("base"), "base");
        machine.ctl(&["init", "--base", machine.path("base").to_str().unwrap()]);
        for name in upgrades {
            machine.add(name);
        }
        Some(machine)
    }

    /// The kernel and the hook's initramfs, and no store yet.
    fn without_store(test: &str) -> Option<Self> {
        if !have_root(test) {
            return None;
        }
        PACKAGES.call_once(vm::ensure_packages);
        let kernel = vm::kernel();
        let dir = tempfile::tempdir_in(vm::cache_dir().parent().unwrap()).unwrap();
        let initrd = dir.path().join("initrd.img");
        vm::initramfs(&kernel, &vm::static_hook(), &initrd);
        Some(Self {
            dir,
            kernel,
            initrd,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.path("disk/strata")
    }

    fn ctl(&self, args: &[&str]) -> String {
        tests::overlayctl(&self.store(), args)
    }

    /// An upgrade layer whose /etc/version is its name.
    fn add(&self, name: &str) {
        let src = self.path(&format!("src-{name}"));
        fs::create_dir_all(src.join("etc")).unwrap();
        fs::write(src.join("etc/version"), format!("{name}\n")).unwrap();
        self.ctl(&[
            "add-layer",
            src.to_str().unwrap(),
            "--name",
            name,
            "--active",
        ]);
    }

    fn image(&self) -> PathBuf {
        self.path("disk.img")
    }

    /// Writes the disk image from the store as it is now.
    fn make_disk(&self) {
        vm::disk_image(&self.path("disk"), &self.image(), 96);
    }

    /// Boots the current disk image; panics with the serial log unless the test init finished.
    fn boot(&self, cmdline: &str) -> Boot {
        Self::finished(vm::boot(&self.kernel, &self.initrd, &self.image(), cmdline))
    }

    /// Starts a boot whose console the test reads and types into.
    fn session(&self, cmdline: &str) -> vm::Session {
        vm::Session::start(&self.kernel, &self.initrd, &self.image(), cmdline)
    }

    /// The boot a log shows; panics with the log unless the test init finished.
    fn finished(log: BootLog) -> Boot {
        assert!(
            !log.timed_out,
            "the boot timed out after {:?}; serial log:\n{}",
            vm::BOOT_TIMEOUT,
            log.serial
        );
        assert!(
            log.done(),
            "the test init did not finish; serial log:\n{}",
            log.serial
        );
        let booted = log
            .block("booted")
            .and_then(|t| Booted::parse(&t, "booted.toml").ok());
        let booted = booted.unwrap_or_else(|| {
            panic!("no booted.toml on the console; serial log:\n{}", log.serial)
        });
        let state = log
            .block("state")
            .and_then(|t| BootState::parse(&t, "state").ok())
            .unwrap_or_default();
        Boot { log, booted, state }
    }
}

struct Boot {
    log: BootLog,
    booted: Booted,
    state: BootState,
}

impl Boot {
    fn version(&self) -> &str {
        self.log.marker("version").unwrap_or("?")
    }

    fn stack(&self) -> Vec<&str> {
        self.booted.stack.iter().map(String::as_str).collect()
    }
}

#[test]
fn vm_default_stack_boots_and_rollbacks_work() {
    let Some(vm) = Vm::new(
        "vm_default_stack_boots_and_rollbacks_work",
        &["upgrade-1", "upgrade-2"],
    ) else {
        return;
    };
    vm.make_disk();
    let boot = vm.boot("");
    assert_eq!(
        boot.stack(),
        ["upgrade-2", "upgrade-1", "base"],
        "{}",
        boot.log.serial
    );
    assert_eq!(boot.version(), "upgrade-2", "the top layer's files win");
    assert_eq!(boot.booted.upper, UpperMode::Persistent);
    assert!(
        boot.log
            .serial
            .contains("strata: booting upgrade-2, upgrade-1, base"),
        "{}",
        boot.log.serial
    );

    let boot = vm.boot("strata.top=upgrade-1");
    assert_eq!(
        (boot.stack(), boot.version()),
        (vec!["upgrade-1", "base"], "upgrade-1")
    );
    let boot = vm.boot("strata.disable=upgrade-2,upgrade-1");
    assert_eq!((boot.stack(), boot.version()), (vec!["base"], "base"));

    // The root device by label and by UUID (read from the ext4 superblock).
    let boot = vm.boot("root=LABEL=strata-root");
    assert_eq!(boot.version(), "upgrade-2");
    let uuid = vm::image_uuid(&vm.image());
    assert_eq!(vm.boot(&format!("root=UUID={uuid}")).version(), "upgrade-2");
}

#[test]
fn vm_nothing_to_mount_never_hangs() {
    let Some(vm) = Vm::new("vm_nothing_to_mount_never_hangs", &["upgrade-1"]) else {
        return;
    };
    // Every layer gone: no stack can mount. The hook says so and reboots (QEMU then exits).
    fs::rename(vm.store().join("layers"), vm.path("gone")).unwrap();
    fs::create_dir(vm.store().join("layers")).unwrap();
    vm.make_disk();
    let log = vm::boot(&vm.kernel, &vm.initrd, &vm.image(), "");
    assert!(!log.timed_out, "the boot hung; serial log:\n{}", log.serial);
    assert!(
        log.serial
            .contains("strata: cannot boot: every stack failed to mount"),
        "{}",
        log.serial
    );
    assert!(
        log.serial.contains("rebooting in 10 seconds"),
        "{}",
        log.serial
    );

    // With busybox in the image the same failure opens a shell on the console; leaving it
    // reboots.
    let initrd = vm.path("initrd-shell.img");
    vm::initramfs_with_shell(&vm.kernel, &vm::static_hook(), &initrd);
    let mut session = vm::Session::start(&vm.kernel, &initrd, &vm.image(), "");
    let prompt = session.wait_for("starting an emergency shell; leave it to reboot");
    assert!(prompt.is_some(), "no shell offered:\n{}", session.serial());
    session.send(b"echo \"@@ shell $((6 * 7))\"\n");
    let answered = session.wait_for("@@ shell 42");
    assert!(
        answered.is_some(),
        "the shell did not answer:\n{}",
        session.serial()
    );
    session.send(b"exit\n");
    let log = session.finish();
    assert!(
        !log.timed_out,
        "leaving the shell did not reboot:\n{}",
        log.serial
    );

    // No store at all: not a Strata root; it boots as it is, and says so.
    fs::remove_dir_all(vm.store()).unwrap();
    vm::busybox_root(&vm.path("disk"), "plain");
    vm.make_disk();
    let log = vm::boot(&vm.kernel, &vm.initrd, &vm.image(), "");
    assert!(
        log.serial.contains("booting the root filesystem as it is"),
        "{}",
        log.serial
    );
    assert_eq!(log.marker("version"), Some("plain"), "{}", log.serial);
}

#[test]
fn vm_persistent_upper_keeps_files_and_tmpfs_does_not() {
    let Some(vm) = Vm::new(
        "vm_persistent_upper_keeps_files_and_tmpfs_does_not",
        &["upgrade-1"],
    ) else {
        return;
    };
    vm.make_disk();
    assert_eq!(vm.boot("test.write").log.marker("persist"), Some("none"));
    assert_eq!(
        vm.boot("").log.marker("persist"),
        Some("kept"),
        "the persistent upper kept it across a reboot"
    );
    let boot = vm.boot("strata.upper=tmpfs test.write");
    assert_eq!(boot.booted.upper, UpperMode::Tmpfs);
    assert_eq!(
        boot.log.marker("persist"),
        Some("none"),
        "a tmpfs upper starts empty"
    );
    // What the tmpfs boot wrote is gone; the persistent upper still has its own file.
    assert_eq!(vm.boot("").log.marker("persist"), Some("kept"));
    let upper_file = vm::read_from_image(&vm.image(), "/strata/uppers/1/data/var/persist");
    assert_eq!(upper_file, "kept\n");
}

#[test]
fn vm_checkpoint_freezes_the_running_upper_across_a_reboot() {
    let Some(vm) = Vm::new(
        "vm_checkpoint_freezes_the_running_upper_across_a_reboot",
        &["upgrade-1"],
    ) else {
        return;
    };
    // overlayctl for the running system, in a layer of its own.
    let tools = vm.path("src-tools");
    fs::create_dir_all(tools.join("bin")).unwrap();
    fs::copy(vm::static_overlayctl(), tools.join("bin/overlayctl")).unwrap();
    vm.ctl(&[
        "add-layer",
        tools.to_str().unwrap(),
        "--name",
        "tools",
        "--active",
    ]);
    vm.make_disk();

    // The running system writes a file and asks for a checkpoint.
    let first = vm.boot("test.checkpoint");
    assert_eq!(
        first.log.marker("checkpoint"),
        Some("asked"),
        "{}",
        first.log.serial
    );
    assert_eq!(first.booted.upper_id.as_deref(), Some("1"));
    assert_eq!(first.log.marker("note"), Some("none"));

    // The reboot freezes upper 1 into cp1 before mounting; writes go to a fresh upper 2. The
    // accept unit's command then writes the layer's manifest.
    let second = vm.boot("test.accept");
    assert_eq!(
        second.stack(),
        ["cp1", "tools", "upgrade-1", "base"],
        "{}",
        second.log.serial
    );
    assert_eq!(second.booted.upper_id.as_deref(), Some("2"));
    assert_eq!(second.log.marker("note"), Some("made while running"));
    let frozen = second
        .state
        .checkpoint
        .as_ref()
        .expect("frozen, not sealed yet");
    assert!(frozen.frozen && frozen.layer == "cp1", "{frozen:?}");
    assert_eq!(
        second.log.marker("accepted"),
        Some("yes"),
        "{}",
        second.log.serial
    );
    let plan = layers_spec::Plan::parse(&second.log.block("plan").unwrap(), "plan").unwrap();
    let layer = plan.layer("cp1").unwrap();
    assert_eq!(layer.title.as_deref(), Some("Before the upgrade"));
    assert!(layer.digest.is_some(), "sealed by accept");
    assert_eq!(
        vm::read_from_image(&vm.image(), "/strata/layers/cp1/etc/note"),
        "made while running\n"
    );
    assert!(
        !vm::image_has(&vm.image(), "/strata/uppers/1"),
        "the frozen upper is gone"
    );
    assert!(vm::image_has(&vm.image(), "/strata/uppers/2/data"));
    assert!(vm::image_has(&vm.image(), "/strata/manifests/cp1"));

    // And it stays: the next boot has the file from the layer, with upper 2 still.
    let third = vm.boot("");
    assert_eq!(third.stack()[0], "cp1");
    assert_eq!(third.booted.upper_id.as_deref(), Some("2"));
    assert_eq!(third.log.marker("note"), Some("made while running"));
    assert!(third.state.checkpoint.is_none());
}

#[test]
fn vm_trial_layer_is_left_out_after_its_boots() {
    let Some(vm) = Vm::new("vm_trial_layer_is_left_out_after_its_boots", &["upgrade-1"]) else {
        return;
    };
    let src = vm.path("src-trial");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/version"), "trial\n").unwrap();
    vm.ctl(&["add-layer", src.to_str().unwrap(), "--name", "trial"]);
    let plan = fs::read_to_string(vm.store().join("overlayplan.toml")).unwrap();
    fs::write(
        vm.store().join("overlayplan.toml"),
        plan.replace("trial_boots = 3", "trial_boots = 2"),
    )
    .unwrap();
    vm.make_disk();
    for n in 1..=2 {
        let boot = vm.boot("");
        assert_eq!(boot.version(), "trial", "try {n}");
        assert_eq!(boot.state.tries("trial"), n);
    }
    let boot = vm.boot("");
    assert_eq!(
        (boot.stack(), boot.version()),
        (vec!["upgrade-1", "base"], "upgrade-1"),
        "{}",
        boot.log.serial
    );
    assert!(
        boot.log
            .serial
            .contains("trial layer trial was never accepted; it is disabled now")
    );
    let plan = vm::read_from_image(&vm.image(), "/strata/overlayplan.toml");
    assert!(
        plan.contains("name = \"trial\"\nstate = \"disabled\""),
        "{plan}"
    );
}

#[test]
fn vm_missing_layer_and_corrupt_plan_fall_back() {
    let Some(vm) = Vm::new(
        "vm_missing_layer_and_corrupt_plan_fall_back",
        &["upgrade-1", "upgrade-2"],
    ) else {
        return;
    };
    // A missing layer: the known-good base boots, and booted.toml says why.
    fs::rename(vm.store().join("layers/upgrade-1"), vm.path("hidden")).unwrap();
    vm.make_disk();
    let boot = vm.boot("");
    assert_eq!(boot.stack(), ["base"]);
    let why = boot.booted.fallback.clone().unwrap_or_default();
    assert!(
        why.contains("layer upgrade-1 is missing from the store"),
        "{}",
        boot.log.serial
    );
    fs::rename(vm.path("hidden"), vm.store().join("layers/upgrade-1")).unwrap();

    // A corrupt plan: its previous copy (before upgrade-2 was disabled) boots.
    vm.ctl(&["disable", "upgrade-2"]);
    fs::write(
        vm.store().join("overlayplan.toml"),
        "version = 1\n[[layer]]\nnam = \"x\"\n",
    )
    .unwrap();
    vm.make_disk();
    let boot = vm.boot("");
    assert_eq!(
        boot.stack(),
        ["upgrade-2", "upgrade-1", "base"],
        "{}",
        boot.log.serial
    );
    assert!(
        boot.booted
            .fallback
            .clone()
            .unwrap_or_default()
            .contains("the plan is unusable")
    );
}

#[test]
fn vm_hundred_layer_stack_boots_on_the_6_1_kernel() {
    let names: Vec<String> = (0..99).map(|i| format!("u{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let Some(vm) = Vm::new("vm_hundred_layer_stack_boots_on_the_6_1_kernel", &refs) else {
        return;
    };
    vm.make_disk();
    let boot = vm.boot("strata.debug");
    assert_eq!(boot.booted.stack.len(), 100, "{}", boot.log.serial);
    assert_eq!(boot.version(), "u98");
    // 6.1 takes `lowerdir+` and then refuses the mount; the classic call carries the stack.
    assert!(
        boot.log
            .serial
            .contains("mounted 100 layers with the Classic mount API"),
        "{}",
        boot.log.serial
    );
}

#[test]
fn vm_initramfs_tools_boots_the_layered_root() {
    let Some(vm) = Vm::new("vm_initramfs_tools_boots_the_layered_root", &["upgrade-1"]) else {
        return;
    };
    let initrd = vm::initramfs_tools_image(&vm.kernel, &vm::static_hook(), vm.dir.path());
    vm.make_disk();
    framework_boots(&vm, &initrd, "");
}

/// Boots an image an initramfs framework built: the layered root comes up, and the real root
/// was made writable for the persistent upper (a file written on one boot is there on the next).
fn framework_boots(vm: &Vm, initrd: &std::path::Path, cmdline: &str) {
    let log = vm::boot(
        &vm.kernel,
        initrd,
        &vm.image(),
        &format!("test.write {cmdline}"),
    );
    let boot = Vm::finished(log);
    assert_eq!(boot.version(), "upgrade-1", "{}", boot.log.serial);
    assert_eq!(boot.stack(), ["upgrade-1", "base"]);
    let boot = Vm::finished(vm::boot(&vm.kernel, initrd, &vm.image(), cmdline));
    assert_eq!(
        boot.log.marker("persist"),
        Some("kept"),
        "{}",
        boot.log.serial
    );
}

/// dracut's two inits: its shell init runs the module's mount hook, systemd its unit
/// (strata-root.service). And with systemd, a console the unit cannot open: the unit after it
/// mounts the layered root without the console.
#[test]
fn vm_dracut_boots_the_layered_root() {
    let Some(vm) = Vm::new("vm_dracut_boots_the_layered_root", &["upgrade-1"]) else {
        return;
    };
    vm.make_disk();
    // A failure powers off at once instead of waiting in dracut's emergency shell.
    let cmdline = "rd.shell=0 rd.emergency=poweroff";
    for systemd in [true, false] {
        let initrd = vm::dracut_image(&vm.kernel, &vm::static_hook(), vm.dir.path(), systemd);
        eprintln!("dracut with systemd: {systemd}");
        framework_boots(&vm, &initrd, cmdline);
    }

    let no_console = vm.path("no-console.conf");
    fs::write(&no_console, "[Service]\nTTYPath=/dev/no-such-console\n").unwrap();
    let initrd = vm::dracut_image_with(
        &vm.kernel,
        &vm::static_hook(),
        vm.dir.path(),
        true,
        &[(
            &no_console,
            "/etc/systemd/system/strata-root.service.d/no-console.conf",
        )],
    );
    let boot = Vm::finished(vm::boot(&vm.kernel, &initrd, &vm.image(), cmdline));
    assert_eq!(boot.stack(), ["upgrade-1", "base"], "{}", boot.log.serial);
    assert!(
        // systemd cuts the unit's name to fit the line.
        boot.log
            .serial
            .lines()
            .any(|l| l.contains("Failed to start") && l.contains("strata-roo")),
        "the console was not refused:\n{}",
        boot.log.serial
    );
}

/// Types keys into the boot menu over the serial console, one at a time as a person would.
fn type_keys(session: &mut vm::Session, keys: &[u8]) {
    for key in keys {
        session.send(&[*key]);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// The boot menu on the serial console: a rollback chosen with keys boots once and leaves the
/// plan alone; saved with `s`, it holds on the next boot without the menu.
#[test]
fn vm_menu_rolls_back_over_the_serial_console() {
    let Some(vm) = Vm::new(
        "vm_menu_rolls_back_over_the_serial_console",
        &["good", "broken"],
    ) else {
        return;
    };
    vm.make_disk();
    let plan_before = vm::read_from_image(&vm.image(), "/strata/overlayplan.toml");

    let mut session = vm.session("strata.menu");
    // The menu is drawn top to bottom over a slow serial line: wait for its last line, the
    // keys' list, which ends with `? help`.
    let screen = session.wait_for_screen("? help");
    let screen = screen.unwrap_or_else(|| panic!("no menu:\n{}", session.serial()));
    assert!(screen.contains("Strata boot menu"), "{screen}");
    assert!(
        screen.contains("+ Layers, top first ---"),
        "not drawn in ASCII on a serial console:\n{screen}"
    );
    assert!(screen.contains("|> [x] broken "), "{screen}");
    // The cursor is on broken, the top: j moves to good, t makes it the top, Enter boots once.
    type_keys(&mut session, b"jt\r");
    let boot = Vm::finished(session.finish());
    assert_eq!(boot.version(), "good", "{}", boot.log.serial);
    assert_eq!(boot.stack(), ["good", "base"]);
    assert!(boot.booted.one_shot);
    assert!(
        boot.log
            .serial
            .contains("strata: menu: booting good, base once"),
        "{}",
        boot.log.serial
    );
    assert_eq!(
        vm::read_from_image(&vm.image(), "/strata/overlayplan.toml"),
        plan_before,
        "booting once leaves the plan alone"
    );
    // The next boot is the default again. The plan's menu is "on-key": the hook waits for a
    // key with one line, and a key opens the menu.
    let boot = vm.boot("");
    assert_eq!(boot.version(), "broken");
    assert!(
        boot.log
            .serial
            .contains("strata: press any key for the boot menu (3)"),
        "{}",
        boot.log.serial
    );
    let mut session = vm.session("");
    assert!(
        session
            .wait_for("press any key for the boot menu")
            .is_some(),
        "{}",
        session.serial()
    );
    session.send(b" ");
    let screen = session.wait_for_screen("+ Layers, top first");
    assert!(
        screen.is_some(),
        "a key did not open the menu:\n{}",
        session.serial()
    );
    type_keys(&mut session, b"\x1b");
    let boot = Vm::finished(session.finish());
    assert_eq!(boot.version(), "broken", "Esc boots the default");
    assert!(
        boot.log
            .serial
            .contains("strata: menu: booting the default")
    );

    let mut session = vm.session("strata.menu");
    let screen = session.wait_for_screen("+ Layers, top first");
    assert!(screen.is_some(), "{}", session.serial());
    type_keys(&mut session, b"jt");
    let screen = session.wait_for_screen("|  [ ] broken ");
    assert!(
        screen
            .as_deref()
            .is_some_and(|s| s.contains("|> [x] good ")),
        "the rollback is not on screen:\n{}",
        session.screen()
    );
    type_keys(&mut session, b"s");
    let boot = Vm::finished(session.finish());
    assert_eq!(boot.version(), "good", "{}", boot.log.serial);
    let boot = vm.boot("");
    assert_eq!(
        boot.version(),
        "good",
        "the saved choice holds: {}",
        boot.log.serial
    );
    assert_eq!(boot.stack(), ["good", "base"]);
    let plan = layers_spec::Plan::parse(
        &vm::read_from_image(&vm.image(), "/strata/overlayplan.toml"),
        "plan",
    )
    .unwrap();
    assert_eq!(
        plan.layer("broken").unwrap().state,
        layers_spec::LayerState::Disabled
    );
}

/// An OCI image built with umoci (a busybox system, an app layer, a config layer) becomes the
/// store with `init --image`; it boots as the image, and the menu leaves out its middle layer
/// for one boot: the app's file is gone, the config layer above it still there.
#[test]
fn vm_an_image_boots_and_the_menu_leaves_out_one_of_its_layers() {
    let Some(vm) = Vm::without_store("vm_an_image_boots_and_the_menu_leaves_out_one_of_its_layers")
    else {
        return;
    };
    let layout = tests::oci::Layout::new(&vm.path("layout"), &vm.path("umoci"));
    layout.layer(None, "base", "ADD busybox system", |root| {
        vm::busybox_root(root, "base")
    });
    layout.layer(Some("base"), "app", "RUN install app", |root| {
        fs::write(root.join("etc/version"), "app\n").unwrap()
    });
    layout.layer(Some("app"), "os", "RUN configure", |root| {
        fs::write(root.join("etc/configured"), "yes\n").unwrap()
    });
    let image = format!("oci:{}:os", layout.dir.display());
    vm.ctl(&["init", "--image", &image]);
    let plan = layers_spec::Plan::parse(
        &fs::read_to_string(vm.store().join("overlayplan.toml")).unwrap(),
        "plan",
    )
    .unwrap();
    let names: Vec<String> = plan.layers.iter().map(|l| l.name.clone()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(
        plan.layers[1].title.as_deref(),
        Some("RUN install app"),
        "titled from the image's history"
    );
    vm.make_disk();

    let boot = vm.boot("");
    assert_eq!(boot.version(), "app", "{}", boot.log.serial);
    assert_eq!(
        boot.stack(),
        names.iter().map(String::as_str).collect::<Vec<_>>()
    );

    // The menu: down to the app layer, Space leaves it out, Enter boots once.
    let mut session = vm.session("strata.menu");
    let screen = session.wait_for_screen("? help");
    let screen = screen.unwrap_or_else(|| panic!("no menu:\n{}", session.serial()));
    assert!(screen.contains("RUN install app"), "{screen}");
    type_keys(&mut session, b"j ");
    let screen = session.wait_for_screen("[ ] ");
    assert!(
        screen.is_some(),
        "the layer was not left out:\n{}",
        session.screen()
    );
    type_keys(&mut session, b"\r");
    let boot = Vm::finished(session.finish());
    assert_eq!(
        boot.version(),
        "base",
        "the app layer's /etc/version is gone: {}",
        boot.log.serial
    );
    assert_eq!(boot.stack(), [names[0].as_str(), names[2].as_str()]);
    assert!(boot.booted.one_shot);
}

/// `menu = "on-failure"`: after a boot that fell back, the next one shows the menu and why.
#[test]
fn vm_menu_shows_after_a_failed_boot() {
    let Some(vm) = Vm::new("vm_menu_shows_after_a_failed_boot", &["good", "broken"]) else {
        return;
    };
    let plan_path = vm.store().join("overlayplan.toml");
    let text = fs::read_to_string(&plan_path).unwrap();
    let mut plan = layers_spec::Plan::parse(&text, "plan").unwrap();
    plan.boot.menu = layers_spec::MenuMode::OnFailure;
    fs::write(&plan_path, plan.to_toml().unwrap()).unwrap();
    vm.make_disk();
    let boot = vm.boot("");
    assert!(
        !boot.log.serial.contains("Strata boot menu"),
        "a good boot shows no menu:\n{}",
        boot.log.serial
    );
    // A layer of the stack goes missing: this boot falls back...
    fs::rename(vm.store().join("layers/broken"), vm.path("away")).unwrap();
    vm.make_disk();
    let boot = vm.boot("");
    assert!(boot.booted.fallback.is_some(), "{}", boot.log.serial);
    // ...and the next one shows the menu with the reason, and boots the default on Enter.
    let mut session = vm.session("");
    let screen = session.wait_for_screen("The last boot fell back: layer broken is missing");
    assert!(screen.is_some(), "{}", session.screen());
    type_keys(&mut session, b"\r");
    let boot = Vm::finished(session.finish());
    assert!(
        boot.log
            .serial
            .contains("strata: menu: booting the default"),
        "{}",
        boot.log.serial
    );
}

/// The harness's eyes and hands on a PC screen: QEMU's monitor reads the VGA text buffer (the
/// firmware's own message on a machine with no disk), takes a PNG picture of the screen, and
/// types on the PC keyboard.
#[test]
fn vm_monitor_reads_the_vga_screen() {
    PACKAGES.call_once(vm::ensure_packages);
    let dir = tempfile::tempdir_in(vm::cache_dir().parent().unwrap()).unwrap();
    let socket = dir.path().join("monitor.sock");
    let mut qemu = std::process::Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel", "tcg", "-m", "64", "-display", "none", "-vga", "std",
    ])
    .args(["-nodefaults", "-no-reboot", "-serial", "stdio"])
    .args(vm::Monitor::args(&socket))
    .current_dir(dir.path());
    let _session = vm::Session::spawn(qemu, std::time::Duration::from_secs(60));
    let mut monitor = vm::Monitor::connect(&socket);
    // SeaBIOS writes its banner on the VGA text screen, then finds nothing to boot.
    let screen = monitor.wait_for_vga_text("SeaBIOS", std::time::Duration::from_secs(30));
    let screen = screen.unwrap_or_else(|| panic!("no banner:\n{}", monitor.vga_text()));
    assert!(
        screen.lines().any(|l| l.starts_with("SeaBIOS (version")),
        "{screen}"
    );
    monitor.send_key("spc");
    let picture = dir.path().join("screen.png");
    monitor.screendump_png(&picture);
    let png = fs::read(&picture).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 1000, "an empty picture: {} bytes", png.len());
}
