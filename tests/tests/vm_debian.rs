//! A real Debian 12 with systemd, booted in QEMU from a partitioned disk through GRUB, Strata
//! installed from its .deb and its initramfs made by Debian's initramfs-tools without busybox:
//! the default stack with a layer `apt-get` made, a rollback by the command line, and one from
//! the boot menu over the serial console.

use tests::debian::Machine;

fn stack(log: &tests::vm::BootLog) -> Vec<String> {
    log.marker("stack")
        .unwrap_or_else(|| panic!("no stack in the report:\n{}", log.serial))
        .split(',')
        .map(str::to_owned)
        .collect()
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
    machine.boot_kernel_from("base", &version);
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

    // strata.top=base leaves the layer out for one boot: hello is gone.
    let log = machine.boot("strata.top=base");
    assert_eq!(stack(&log), ["base"], "{}", log.serial);
    assert_eq!(log.marker("hello"), Some("none"));

    // The menu over the serial console: Down, t (boot once), Enter.
    let mut session = machine.session("strata.menu");
    let screen = session.wait_for_screen("Strata boot menu");
    assert!(screen.is_some(), "no menu:\n{}", session.serial());
    for key in [&b"\x1b[B"[..], b"t", b"\r"] {
        session.send(key);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let log = session.finish();
    assert_eq!(stack(&log), ["base"], "{}", log.serial);
}
