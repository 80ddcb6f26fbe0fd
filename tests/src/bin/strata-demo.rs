//! The demo (`scripts/demo`, as root): a store with a busybox base, a good upgrade and a broken
//! one, booted in QEMU on a Debian kernel with the hook as `/init`; then the same disk booted
//! with `strata.top=` to roll the broken upgrade back, and once more with the boot menu, where
//! the person rolls back with keys (on a terminal) or the demo types them (in a script). The
//! serial console is shown as it comes.

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;

use tests::vm;

/// The demo system's init: shows what it is running on and powers off.
const DEMO_INIT: &str = r#"#!/bin/sh
echo
echo "================ the demo system is up ================"
echo "/etc/motd:       $(cat /etc/motd)"
echo "kiosk app:       $(cat /usr/share/kiosk/status)"
echo "layers mounted:  $(sed -n '/^stack/,/]/p' /run/strata/booted.toml | grep -o '"[^"]*"' | tr '\n' ' ')"
echo "store:           /run/strata/store: $(ls /run/strata/store | tr '\n' ' ')"
echo "========================================================"
echo
sync
poweroff -f
"#;

fn layer(dir: &Path, motd: &str, status: &str) {
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("usr/share/kiosk")).unwrap();
    fs::write(dir.join("etc/motd"), format!("{motd}\n")).unwrap();
    fs::write(dir.join("usr/share/kiosk/status"), format!("{status}\n")).unwrap();
}

fn overlayctl(bin: &Path, store: &Path, args: &[&str]) {
    let status = Command::new(bin)
        .arg("--store")
        .arg(store)
        .args(args)
        .env("STRATA_RUN_DIR", "/nonexistent")
        .status()
        .unwrap();
    assert!(status.success(), "overlayctl {args:?} failed");
}

fn say(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the demo builds layers with owners and devices: run it as root"
    );
    let overlayctl_bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: strata-demo PATH-TO-overlayctl"),
    );
    let work = tempfile::Builder::new()
        .prefix("strata-demo.")
        .tempdir_in(vm::cache_dir().parent().unwrap())
        .unwrap();
    let store = work.path().join("disk/strata");

    say("Getting QEMU, busybox and a Debian kernel if they are missing, and the static hook");
    vm::ensure_packages();
    let kernel = vm::kernel();
    let initrd = work.path().join("initrd.img");
    vm::initramfs(&kernel, &vm::static_hook(), &initrd);

    say("A store: a busybox base, a good upgrade, a broken upgrade");
    let base = work.path().join("base");
    vm::busybox_root_with_init(&base, "base", DEMO_INIT);
    layer(&base, "Core System Image", "version 1.0: working");
    overlayctl(
        &overlayctl_bin,
        &store,
        &[
            "init",
            "--base",
            base.to_str().unwrap(),
            "--name",
            "basesystem",
            "--title",
            "Core System Image",
        ],
    );
    let good = work.path().join("upgrade-2007-05-19");
    layer(&good, "It'll work this time!", "version 1.1: working");
    overlayctl(
        &overlayctl_bin,
        &store,
        &[
            "add-layer",
            good.to_str().unwrap(),
            "--title",
            "It'll work this time!",
            "--active",
        ],
    );
    let broken = work.path().join("upgrade-2007-05-20");
    layer(
        &broken,
        "Finally Fixed X Problem",
        "version 1.2: CRASHES AT START",
    );
    overlayctl(
        &overlayctl_bin,
        &store,
        &[
            "add-layer",
            broken.to_str().unwrap(),
            "--title",
            "Finally Fixed X Problem",
        ],
    );
    overlayctl(&overlayctl_bin, &store, &["status"]);
    vm::disk_image(&work.path().join("disk"), &work.path().join("disk.img"), 64);

    let boot = |extra: &str| {
        let status = vm::qemu(&kernel, &initrd, &work.path().join("disk.img"), extra)
            .status()
            .expect("running QEMU");
        assert!(status.success(), "QEMU failed");
    };
    say("Booting the default stack (the broken upgrade is on top, on trial)");
    boot("");
    say("Rolling back at boot: strata.top=upgrade-2007-05-19 on the kernel command line");
    boot("strata.top=upgrade-2007-05-19");
    say("The boot menu (strata.menu): the same rollback with keys, on the serial console");
    let disk = work.path().join("disk.img");
    if std::io::stdin().is_terminal() {
        println!("j/k or the arrows move, t makes the highlighted layer the top, Enter boots it");
        println!("once, s saves it to the plan, Esc boots the default, ? shows the keys.");
        boot("strata.menu");
    } else {
        // No person at a terminal: the demo types the keys and shows the screens.
        let mut session = vm::Session::start(&kernel, &initrd, &disk, "strata.menu");
        let screen = session.wait_for_screen("Layers, top first");
        println!("{}", screen.expect("the menu came up"));
        say("Typing j (down to the good upgrade), then t (make it the top)");
        session.send(b"j");
        std::thread::sleep(std::time::Duration::from_millis(300));
        session.send(b"t");
        let screen = session.wait_for_screen("[ ] upgrade-2007-05-20");
        println!("{}", screen.expect("the rollback on screen"));
        say("Typing Enter: boot this selection once");
        session.send(b"\r");
        let log = session.finish();
        let after = log.serial.rfind("strata: menu:").unwrap_or(0);
        println!("{}", &log.serial[after..]);
    }
    say("Done. The broken layer's trial boots count down; unaccepted, it drops out by itself.");
}
