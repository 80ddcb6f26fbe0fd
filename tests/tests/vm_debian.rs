//! A real Debian 12 with systemd, booted in QEMU from a partitioned disk through GRUB, Strata
//! installed from its .deb and its initramfs made by Debian's initramfs-tools without busybox:
//! the default stack with a layer `apt-get` made, `overlayctl switch`, and a failed health check
//! rolled back with nobody at the keys; the whole story on a plain installed Debian: adopt, a
//! dist-upgrade with a new kernel on the running system, a rollback from the boot menu over the
//! serial console to the old kernel and its modules, the new kernel booted, and release; and
//! the menu under dracut's systemd initramfs, over the serial line and on the VGA console.
//! (Command-line rollbacks such as `strata.top` are the same code on every initramfs: the
//! busybox VM tests and the privileged hook tests check them.)

use tests::debian::Machine;

fn stack(log: &tests::vm::BootLog) -> Vec<String> {
    log.marker("stack")
        .unwrap_or_else(|| panic!("no stack in the report:\n{}", log.serial))
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// In the menu: Down to the second layer, `t` (boot up to it, once), Enter.
fn boot_the_second_once(session: &mut tests::vm::Session) {
    for key in [&b"\x1b[B"[..], b"t", b"\r"] {
        session.send(key);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[test]
fn vm_debian_boots_through_grub_and_rolls_back() {
    let Some(machine) = Machine::new("vm_debian_boots_through_grub_and_rolls_back") else {
        return;
    };
    let version = machine.base.kernel_version();
    // An upgrade layer made by apt, in the stack, as a device would.
    machine.overlayctl(&[
        "run",
        "--name",
        "hello",
        "--",
        "sh",
        "-c",
        "apt-get update -qq && apt-get install -y -qq hello",
    ]);
    machine.make_disk();

    let log = machine.boot("");
    assert!(log.done(), "{}", log.serial);
    assert_eq!(stack(&log), ["hello", "base"], "{}", log.serial);
    assert_eq!(log.marker("hello"), Some("/usr/bin/hello"));
    assert_eq!(log.marker("uname"), Some(version.as_str()));
    assert_eq!(log.marker("root-fs"), Some("overlay"));
    assert_eq!(log.marker("modules-dir"), Some("present"));
    assert_eq!(log.marker("busybox"), Some("none"));
    let status = log.block("status").unwrap_or_default();
    assert!(status.contains("hello"), "{}", log.serial);

    // overlayctl switch: the layer disabled, the machine moves to the next boot's stack with a
    // kexec through systemd's shutdown: no firmware, no bootloader.
    machine.with_real_root(|real| std::fs::write(real.join("strata-test-switch"), "").unwrap());
    let started = std::time::Instant::now();
    let mut session = machine.session("");
    let at = session
        .wait_for("@@ switch-begin")
        .unwrap_or_else(|| panic!("no switch:\n{}", session.serial()));
    let cold = started.elapsed();
    let switching = std::time::Instant::now();
    let after = session.wait_for_after(at, "@@ done");
    let switched = switching.elapsed();
    let log = session.finish();
    assert!(
        after.is_some(),
        "no report after the switch:\n{}",
        log.serial
    );
    let tail = &log.serial[log.serial.find("@@ switch-begin").unwrap()..];
    let second = tests::vm::BootLog {
        serial: tail.to_owned(),
        timed_out: false,
    };
    assert_eq!(stack(&second), ["base"], "{}", log.serial);
    assert_eq!(second.marker("hello"), Some("none"));
    eprintln!(
        "from power-on to the report: {:.1} s; from overlayctl switch to the next stack's report: {:.1} s",
        cold.as_secs_f64(),
        switched.as_secs_f64()
    );

    // Boot assessment on systemd, with nobody at the keys: a trial layer whose health check (a
    // unit boot-complete.target requires) fails is not accepted, strata-assess restarts the
    // machine, and once its one try is used the hook boots the stack before, which is healthy.
    let unit = "[Unit]\\nDescription=A health check that fails\\nBefore=boot-complete.target\\n\
                [Service]\\nType=oneshot\\nExecStart=/bin/false\\n";
    machine.with_real_root(|real| {
        let store = real.join("strata");
        machine.overlayctl_on(
            &store,
            &[
                "run",
                "--name",
                "broken",
                "--",
                "sh",
                "-c",
                &format!(
                    "printf '{unit}' >/etc/systemd/system/health-check.service && \
                     mkdir -p /etc/systemd/system/boot-complete.target.requires && \
                     ln -s ../health-check.service /etc/systemd/system/boot-complete.target.requires/"
                ),
            ],
        );
        let plan_file = store.join("overlayplan.toml");
        let text = std::fs::read_to_string(&plan_file).unwrap();
        let mut plan = layers_spec::Plan::parse(&text, "plan").unwrap();
        plan.boot.trial_boots = 1;
        std::fs::write(&plan_file, plan.to_toml().unwrap()).unwrap();
    });
    let log = machine.boot("");
    assert!(
        log.serial
            .contains("strata: the health checks failed on trial layer broken; restarting"),
        "{}",
        log.serial
    );
    let log = machine.boot("");
    assert!(log.done(), "{}", log.serial);
    assert!(
        log.serial
            .contains("trial layer broken was never accepted; it is disabled now"),
        "{}",
        log.serial
    );
    assert_eq!(stack(&log), ["base"], "{}", log.serial);
    assert_eq!(log.marker("failed-units"), Some(""), "{}", log.serial);
    let status = log.block("status").unwrap_or_default();
    assert!(status.contains("broken disabled"), "{status}");
}

/// The whole story, as a person with a Debian machine lives it: the package installed (`dpkg
/// -i`, its trigger putting the hook in the initramfs), `overlayctl adopt` on the running
/// system, `update-grub` before the restart (as a kernel upgrade would run it), the restart into
/// the adopted stack, a change made by `overlayctl run` on the running system, then `overlayctl
/// run -- apt-get dist-upgrade` (a new kernel from bookworm-security included, GRUB's own
/// package installed as on any installed Debian), at the next boot a rollback from the boot
/// menu (a key pressed in its short wait, then Down, `t`, Enter) that restarts (kexec) from the
/// new kernel into the old one with the old packages, the boot after on the new kernel with its
/// modules, and at last `overlayctl release`: the upgraded stack becomes the plain root again. (The package is
/// installed on the host before the first boot, and the dist-upgrade run there on the disk's
/// store: under TCG building an initramfs takes the guest many minutes, and it has no network.)
#[test]
fn vm_debian_installs_adopts_upgrades_and_rolls_back() {
    let Some(machine) = Machine::plain("vm_debian_installs_adopts_upgrades_and_rolls_back") else {
        return;
    };
    let old = machine.base.kernel_version();
    let old_package = tests::debian::package_version(&machine.real(), "linux-image-amd64");
    let asks = machine.real().join("etc/strata-test-run");
    std::fs::create_dir_all(&asks).unwrap();
    std::fs::write(asks.join("adopt"), "").unwrap();
    std::fs::write(asks.join("update-grub"), "").unwrap();
    machine.make_disk();

    // The plain system, the package installed: adopt prepares the next boot; then `update-grub` (as a kernel upgrade before the restart
    // would run it) writes Debian's own GRUB configuration over adopt's.
    let log = machine.boot("");
    assert!(log.done(), "{}", log.serial);
    assert_eq!(log.marker("root-fs"), Some("ext4"), "{}", log.serial);
    assert_eq!(log.marker("adopt-rc"), Some("0"), "{}", log.serial);
    let said = log.block("adopt").unwrap();
    assert!(said.contains("become layer base"), "{said}");
    assert_eq!(log.marker("update-grub-rc"), Some("0"), "{}", log.serial);
    machine.with_real_root(|real| {
        let config = std::fs::read_to_string(real.join("boot/grub/grub.cfg")).unwrap();
        assert!(
            config.contains(&format!("/boot/vmlinuz-{old}")),
            "Debian's own: {config}"
        );
    });

    // Adopted at this boot (GRUB started Debian's entry; the hook put adopt's back), by rename,
    // and booted as a stack with the same kernel; then a change made with `overlayctl run` on
    // the running system.
    machine.with_real_root(|real| std::fs::write(real.join("strata-test-run"), "").unwrap());
    let log = machine.boot("");
    assert!(log.done(), "{}", log.serial);
    assert!(
        log.serial
            .contains("adopted the installed system: it is layer base now"),
        "{}",
        log.serial
    );
    assert_eq!(stack(&log), ["base"], "{}", log.serial);
    assert_eq!(log.marker("root-fs"), Some("overlay"));
    assert_eq!(log.marker("uname"), Some(old.as_str()));
    assert_eq!(log.marker("run-rc"), Some("0"), "{}", log.serial);
    assert_eq!(log.marker("file-tweak"), Some("none"));
    // The accept unit's change sealed the adopted base: a digest, and the journal gone.
    assert_eq!(log.marker("verify"), Some("ok"), "{}", log.serial);
    assert_eq!(log.marker("adopt-journal"), Some("gone"));

    // The upgrade: `overlayctl run -- apt-get dist-upgrade`, a new kernel from bookworm-security
    // among its packages. (Made on the host, on the disk's store: under TCG the guest would
    // take half an hour to unpack it and build the new kernel's initramfs, and it has no
    // network. The same code runs it; the guest's run above shows it on a running system.)
    let new = machine.with_real_root(|real| {
        let mut top: Vec<String> = std::fs::read_dir(real)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["boot", "lost+found", "strata"]);
        assert!(real.join("strata/layers/base/usr/bin").is_dir());
        assert!(
            real.join(format!("strata/layers/base/boot/vmlinuz-{old}"))
                .is_file()
        );
        assert!(real.join("boot/grub/grub.cfg.before-strata").is_file());
        assert!(real.join("boot/grub/grub.cfg.after-adopt").is_file());
        let config = std::fs::read_to_string(real.join("boot/grub/grub.cfg")).unwrap();
        assert!(config.contains("/boot/strata/default/vmlinuz"), "{config}");
        let fstab = std::fs::read_to_string(real.join("strata/layers/base/etc/fstab")).unwrap();
        assert!(fstab.starts_with("#strata: / is the overlay"), "{fstab}");

        machine.overlayctl_on(
            &real.join("strata"),
            &[
                "run",
                "--name",
                "upgrade",
                "--",
                "sh",
                "-c",
                "apt-get update -qq && apt-get dist-upgrade -y -qq",
            ],
        );
        let new = std::fs::read_link(real.join("boot/strata/default"))
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(new, old, "the upgrade brought a newer kernel to boot");
        let layer = real.join("strata/layers/upgrade");
        assert!(layer.join(format!("boot/initrd.img-{new}")).is_file());
        assert!(layer.join(format!("usr/lib/modules/{new}/kernel")).is_dir());
        new
    });

    // The upgrade went bad, say: at the first boot after it the person presses a key in the
    // menu's short wait, and boots the layer below it once (with the base). GRUB starts the
    // new kernel; the hook restarts into the old one, which that stack has.
    let started = std::time::Instant::now();
    let mut session = machine.session("");
    assert!(
        session
            .wait_for("press any key for the boot menu")
            .is_some(),
        "no wait for a key:\n{}",
        session.serial()
    );
    session.send(b" ");
    // The whole menu, down to its last line, before the keys go in.
    let screen = session.wait_for_screen("? help");
    assert!(screen.is_some(), "no menu:\n{}", session.serial());
    boot_the_second_once(&mut session);
    let log = session.finish();
    let restarted = started.elapsed();
    assert_eq!(stack(&log), ["tweak", "base"], "{}", log.serial);
    assert_eq!(log.marker("file-tweak"), Some("tweaked"));
    assert_eq!(log.marker("uname"), Some(old.as_str()), "{}", log.serial);
    assert!(
        log.serial
            .contains(&format!("restarting into kernel {old}")),
        "{}",
        log.serial
    );
    assert_eq!(log.marker("modules-dir"), Some("present"));
    assert_eq!(
        log.marker("kernel-package"),
        Some(old_package.as_str()),
        "{}",
        log.serial
    );

    // The next boot, the default again: GRUB starts the new kernel, the stack is the upgraded
    // one. Release is asked for from it (with a file written over it)...
    machine.with_real_root(|real| std::fs::write(real.join("strata-test-release"), "").unwrap());
    let started = std::time::Instant::now();
    let log = machine.boot("");
    let plain = started.elapsed();
    assert!(log.done(), "{}", log.serial);
    assert_eq!(stack(&log), ["upgrade", "tweak", "base"], "{}", log.serial);
    assert_eq!(log.marker("uname"), Some(new.as_str()), "{}", log.serial);
    assert_eq!(log.marker("file-tweak"), Some("tweaked"));
    assert_eq!(log.marker("modules-dir"), Some("present"));
    assert_eq!(log.marker("failed-units"), Some(""), "{}", log.serial);
    let upgraded = log.marker("kernel-package").unwrap_or_default().to_owned();
    assert_ne!(upgraded, old_package, "{}", log.serial);
    assert_eq!(log.marker("release-rc"), Some("0"), "{}", log.serial);
    // What the restart costs, for the README (not asserted: timing is no test's business; the
    // menu's keys add about a second, and the release request a moment).
    eprintln!(
        "power-on to the report and power-off: {:.1} s on the stack's kernel, {:.1} s through the menu and a kexec into the base's",
        plain.as_secs_f64(),
        restarted.as_secs_f64()
    );
    // ...and done at the next boot: the plain system on the new kernel, the file kept, the
    // store aside.
    let log = machine.boot("");
    assert!(log.done(), "{}", log.serial);
    assert!(log.serial.contains("released: upgrade"), "{}", log.serial);
    assert_eq!(log.marker("root-fs"), Some("ext4"), "{}", log.serial);
    assert_eq!(log.marker("uname"), Some(new.as_str()));
    assert_eq!(log.marker("modules-dir"), Some("present"));
    assert_eq!(log.marker("kernel-package"), Some(upgraded.as_str()));
    assert_eq!(log.marker("file-upper"), Some("written over the stack"));
    assert_eq!(log.marker("file-tweak"), Some("tweaked"));
    machine.with_real_root(|real| {
        assert!(real.join("usr/bin").is_dir() && real.join("etc/hostname").is_file());
        assert!(real.join("strata.released/layers/base").is_dir());
        assert!(!real.join("strata").exists());
        let fstab = std::fs::read_to_string(real.join("etc/fstab")).unwrap();
        assert!(fstab.starts_with("LABEL=strata-root / ext4"), "{fstab}");
    });
}

/// The boot menu under dracut's systemd initramfs (Fedora's, RHEL's and Arch's usual mode) on
/// Debian's own dracut, systemd and Plymouth: strata-root.service owns the console. Nobody at
/// the keys: the short wait passes and the default boots. Over the serial console with
/// `strata.menu` the menu shows and Down, `t`, Enter boots the base once. On the VGA console
/// with Plymouth's splash up: the wait and the menu drawn on the kernel's VT (read from the VGA
/// text buffer), a key in the wait and the menu's keys typed on the PC keyboard, the splash
/// hidden while the menu is up and shown after. `STRATA_SCREENSHOT_DIR` keeps the VGA screen as
/// `menu-vga.png` and the serial one as `menu-serial.txt` (scripts/screenshot).
#[test]
fn vm_debian_dracut_systemd_menu_on_serial_and_vga() {
    let Some(machine) = Machine::new_dracut("vm_debian_dracut_systemd_menu_on_serial_and_vga")
    else {
        return;
    };
    // The package's trigger built the initramfs with dracut: systemd is its init, Strata's
    // unit is in it, and Plymouth.
    let initrd = machine.real().join("boot/strata/default/initrd.img");
    tests::vm::ensure_commands(&[("lsinitrd", "dracut-core")]);
    let listed = tests::vm::run(std::process::Command::new("lsinitrd").arg(&initrd));
    for wanted in [
        "initrd-root-fs.target.wants/strata-root.service",
        "usr/bin/initramfs-hook",
        "usr/lib/systemd/systemd",
        "usr/bin/plymouth",
    ] {
        assert!(
            listed.contains(wanted),
            "{wanted} not in the initramfs:\n{listed}"
        );
    }
    machine.overlayctl(&[
        "run",
        "--name",
        "upgrade",
        "--title",
        "Security updates (December)",
        "--",
        "sh",
        "-c",
        "mkdir -p /etc/strata-test && echo upgrade >/etc/strata-test/version",
    ]);
    machine.make_disk();

    // Nobody at the keys: the wait for a key (the plan's default, 3 s) passes, the default
    // boots.
    let log = machine.boot("");
    assert!(log.done(), "{}", log.serial);
    assert_eq!(stack(&log), ["upgrade", "base"], "{}", log.serial);
    assert_eq!(log.marker("file-version"), Some("upgrade"));
    assert_eq!(log.marker("verify"), Some("ok"), "{}", log.serial);
    assert!(
        log.serial.contains("press any key for the boot menu (3)"),
        "{}",
        log.serial
    );
    assert_eq!(log.marker("failed-units"), Some(""), "{}", log.serial);

    // strata.menu over the serial console.
    let mut session = machine.session("strata.menu");
    // The menu is drawn top to bottom over a slow serial line: wait for its last line, the
    // keys' list, which ends with `? help`.
    let screen = session
        .wait_for_screen("? help")
        .unwrap_or_else(|| panic!("no menu:\n{}", session.serial()));
    assert!(screen.contains("Strata boot menu"), "{screen}");
    assert!(screen.contains("|> [x] upgrade "), "{screen}");
    assert!(screen.contains("base"), "{screen}");
    if let Some(dir) = std::env::var_os("STRATA_SCREENSHOT_DIR") {
        std::fs::write(std::path::Path::new(&dir).join("menu-serial.txt"), &screen).unwrap();
    }
    boot_the_second_once(&mut session);
    let log = session.finish();
    assert_eq!(stack(&log), ["base"], "{}", log.serial);
    assert_eq!(log.marker("file-version"), None, "{}", log.serial);
    let hook_log = log.block("hook-log").unwrap_or_default();
    assert!(
        hook_log.contains("menu: booting base once"),
        "{}",
        log.serial
    );

    // The VGA console (vgacon: `nomodeset` keeps the text mode) with Plymouth's splash, and the
    // PC keyboard: a key in the wait opens the menu.
    let (session, mut monitor) = machine.vga_session("nomodeset splash console=tty0");
    let long = std::time::Duration::from_secs(240);
    let waited = monitor.wait_for_vga_text("press any key for the boot menu", long);
    assert!(
        waited.is_some(),
        "no wait for a key on the VGA console:\n{}\n{}",
        monitor.vga_text(),
        session.serial()
    );
    monitor.send_key("spc");
    let screen = monitor
        .wait_for_vga_text("Strata boot menu", long)
        .unwrap_or_else(|| {
            panic!(
                "no menu on the VGA console:\n{}\n{}",
                monitor.vga_text(),
                session.serial()
            )
        });
    assert!(screen.contains("|> [x] upgrade "), "{screen}");
    // Down, t: the upgrade is off, and the screen says so.
    for key in ["down", "t"] {
        monitor.send_key(key);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let screen = monitor
        .wait_for_vga_text("(selection changed)", long)
        .unwrap_or_else(|| panic!("the keys did not reach the menu:\n{}", monitor.vga_text()));
    assert!(screen.contains("|  [ ] upgrade "), "{screen}");
    if let Some(dir) = std::env::var_os("STRATA_SCREENSHOT_DIR") {
        monitor.screendump_png(&std::path::Path::new(&dir).join("menu-vga.png"));
    }
    monitor.send_key("ret");
    let log = session.finish();
    assert_eq!(stack(&log), ["base"], "{}", log.serial);
    let hook_log = log.block("hook-log").unwrap_or_default();
    for said in [
        "Plymouth's splash is hidden while the boot menu has the console",
        "menu: booting base once",
        "Plymouth's splash is shown again",
    ] {
        assert!(hook_log.contains(said), "{said:?} not in:\n{}", log.serial);
    }
    assert_eq!(log.marker("failed-units"), Some(""), "{}", log.serial);
}
