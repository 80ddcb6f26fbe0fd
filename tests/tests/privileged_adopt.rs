//! `overlayctl adopt` and `release` on a tree standing for an installed system (a tmpfs root
//! with usr/, etc/, a kernel's files in boot/), with the hook's `take-root` as the boot, as
//! root in a private mount namespace: adoption by rename finished after a cut, the store sealed
//! by the next change, then released into a plain root that keeps the upper's changes.

use std::fs;
use std::path::Path;
use std::process::Command as StdCommand;

use assert_cmd::Command;
use nix::mount::{MsFlags, mount, umount};
use tests::Scratch;

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// An initramfs image holding the hook, as `adopt` checks with lsinitramfs.
fn initrd_with_hook(path: &Path, work: &Path) {
    write(&work.join("sbin/initramfs-hook"), "hook");
    let mut cpio = StdCommand::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && echo sbin/initramfs-hook | cpio -o -H newc --quiet | gzip > {}",
            work.display(),
            path.display()
        ))
        .spawn()
        .unwrap();
    assert!(cpio.wait().unwrap().success());
}

/// A tmpfs at `scratch/rootmnt` standing for an installed system: a program in usr/, a
/// hostname, the running kernel's files in boot/ (its initramfs holding the hook). Returns the
/// root and the kernel version.
fn installed_system(scratch: &Scratch, hostname: &str) -> (std::path::PathBuf, String) {
    let root = scratch.path("rootmnt");
    fs::create_dir_all(&root).unwrap();
    mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let version = layers_store::kernel::running_release();
    write(&root.join("usr/bin/tool"), "tool 1\n");
    write(&root.join("etc/hostname"), hostname);
    write(&root.join(format!("boot/vmlinuz-{version}")), "kernel");
    initrd_with_hook(
        &root.join(format!("boot/initrd.img-{version}")),
        &scratch.path("initrd"),
    );
    (root, version)
}

/// The boot: the hook's `take-root` on `root`, with its run directory `run`; what it said.
fn take_root(root: &Path, run: &Path) -> String {
    let out = Command::cargo_bin("initramfs-hook")
        .unwrap()
        .args(["take-root", "--root"])
        .arg(root)
        .arg("--run")
        .arg(run)
        .args(["--cmdline", "root=/dev/vda ro"])
        .assert()
        .success()
        .get_output()
        .clone();
    String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap()
}

#[test]
fn privileged_adopt_then_release_round_trip() {
    let Some(scratch) = Scratch::new("privileged_adopt_then_release_round_trip") else {
        return;
    };
    let (root, version) = installed_system(&scratch, "adopted\n");
    let fstab = "/dev/vda / ext4 errors=remount-ro 0 1\n";
    write(&root.join("etc/fstab"), fstab);
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    fs::create_dir(root.join("lost+found")).unwrap();
    write(&root.join("boot/grub/grub.cfg"), "menuentry x {}\n");
    let run = scratch.path("run");
    let ctl = |args: &[&str]| {
        let mut cmd = Command::cargo_bin("overlayctl").unwrap();
        cmd.env("STRATA_RUN_DIR", run.join("strata"))
            .env_remove("STRATA_STORE")
            .args(args);
        cmd
    };
    let ok = |args: &[&str]| {
        let out = ctl(args).assert().success().get_output().clone();
        String::from_utf8(out.stdout).unwrap()
    };
    let fails = |args: &[&str]| {
        let out = ctl(args).assert().failure().get_output().clone();
        String::from_utf8(out.stderr).unwrap()
    };
    let root_arg = root.to_str().unwrap();

    // A tree that is no system, and a /boot that is a symlink, are refused, changing nothing.
    let empty = scratch.path("empty");
    fs::create_dir_all(empty.join("boot")).unwrap();
    let err = fails(&[
        "adopt",
        "--root",
        empty.to_str().unwrap(),
        "--no-bootloader",
    ]);
    assert!(
        err.contains("is missing") || err.contains("does not look like"),
        "{err}"
    );
    assert!(!empty.join("strata").exists());

    let said = ok(&["adopt", "--root", root_arg, "--no-bootloader"]);
    assert!(said.contains("become layer base"), "{said}");
    assert!(said.contains("bin, etc, usr"), "{said}");
    assert_eq!(
        fs::read_link(root.join("boot/strata/default")).unwrap(),
        Path::new(&version)
    );
    assert_eq!(
        fs::read(root.join(format!("boot/strata/{version}/vmlinuz"))).unwrap(),
        b"kernel"
    );
    // Nothing moved yet, fstab as it was (a cut now boots the plain system as always); a
    // second adopt is refused; changes wait for the restart.
    assert!(root.join("usr/bin/tool").exists());
    assert_eq!(fs::read_to_string(root.join("etc/fstab")).unwrap(), fstab);
    let err = fails(&["adopt", "--root", root_arg, "--no-bootloader"]);
    assert!(err.contains("exists"), "{err}");
    let store = root.join("strata");
    let err = fails(&["--store", store.to_str().unwrap(), "disable", "base"]);
    assert!(err.contains("restart first"), "{err}");

    // A power cut after the first rename: usr/ is in the gathering folder already.
    fs::create_dir_all(store.join("staging/adopting")).unwrap();
    fs::rename(root.join("usr"), store.join("staging/adopting/usr")).unwrap();
    mount(
        None::<&str>,
        &root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let take_root = || take_root(&root, &run);
    let said = take_root();
    assert!(said.contains("adopted the installed system"), "{said}");
    assert!(said.contains("the layered root is mounted"), "{said}");
    assert_eq!(
        fs::read_to_string(root.join("usr/bin/tool")).unwrap(),
        "tool 1\n"
    );
    let real = run.join("strata/root");
    let mut top: Vec<String> = fs::read_dir(&real)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["boot", "lost+found", "strata"]);
    assert!(
        real.join(format!("strata/layers/base/boot/vmlinuz-{version}"))
            .exists()
    );
    assert!(real.join("boot/grub/grub.cfg").exists() && real.join("boot/strata").exists());

    // The next change seals the layer: a digest, verified, and the journal gone.
    let booted_store = run.join("strata/store");
    let booted_arg = booted_store.to_str().unwrap();
    ok(&["--store", booted_arg, "accept"]);
    let verified = ok(&["--store", booted_arg, "verify"]);
    assert!(verified.contains("base: ok"), "{verified}");
    assert!(!real.join("strata/adopt.toml").exists());

    // A change over the stack, then release.
    write(&root.join("etc/motd"), "written over the stack\n");
    fs::remove_file(root.join("etc/hostname")).unwrap();
    assert!(
        fs::read_to_string(root.join("etc/fstab"))
            .unwrap()
            .starts_with("#strata: / is the overlay")
    );
    let said = ok(&["--store", booted_arg, "release"]);
    assert!(said.contains("becomes the plain root"), "{said}");
    // Until the restart, no change: the release would flatten a stack that is no more.
    let err = fails(&["--store", booted_arg, "disable", "base"]);
    assert!(err.contains("restart first"), "{err}");
    let err = fails(&["--store", booted_arg, "release"]);
    assert!(err.contains("restart first"), "{err}");
    // A reboot: everything unmounted, the real root mounted where the initramfs puts it.
    for path in [&root, &booted_store] {
        while umount(path.as_path()).is_ok() {}
    }
    mount(
        Some(&real),
        &root,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .unwrap();
    fs::remove_dir_all(run.join("strata")).unwrap();
    let said = take_root();
    assert!(said.contains("released: base"), "{said}");
    assert_eq!(
        fs::read_to_string(root.join("usr/bin/tool")).unwrap(),
        "tool 1\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/motd")).unwrap(),
        "written over the stack\n"
    );
    assert!(!root.join("etc/hostname").exists(), "the whiteout held");
    assert_eq!(
        fs::read_to_string(root.join("etc/fstab")).unwrap(),
        fstab,
        "the root's line is back"
    );
    assert!(root.join(format!("boot/vmlinuz-{version}")).exists());
    assert!(root.join("strata.released/layers/base").is_dir());
    assert!(!root.join("strata").exists());
    assert!(!run.join("strata/booted.toml").exists());
}

/// An adoption that cannot finish by rename (here a filesystem mounted on `/var`, as a separate
/// partition would be) moves nothing, or puts back what it moved: the boot goes on with the
/// plain system, whole, and says why. A journal that names what must stay is refused.
#[test]
fn privileged_adoption_that_cannot_finish_leaves_the_system_whole() {
    let Some(scratch) =
        Scratch::new("privileged_adoption_that_cannot_finish_leaves_the_system_whole")
    else {
        return;
    };
    let (root, version) = installed_system(&scratch, "plain\n");
    write(&root.join("var/lib/state"), "state\n");
    let run = scratch.path("run");
    let root_arg = root.to_str().unwrap();
    Command::cargo_bin("overlayctl")
        .unwrap()
        .env("STRATA_RUN_DIR", run.join("strata"))
        .args(["adopt", "--root", root_arg, "--no-bootloader"])
        .assert()
        .success();
    let listing = |dir: &Path| {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let before = listing(&root);
    // A filesystem on var/ (sorted after etc/ and boot/'s kernel files, so those move first).
    mount(
        Some("tmpfs"),
        &root.join("var"),
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    write(&root.join("var/lib/state"), "state\n");
    let take_root = || take_root(&root, &run);
    let said = take_root();
    assert!(
        said.contains("adopting the installed system failed"),
        "{said}"
    );
    assert!(said.contains("mount point"), "{said}");
    assert!(said.contains("booting the real root as it is"), "{said}");
    assert_eq!(listing(&root), before);
    assert_eq!(
        fs::read_to_string(root.join("usr/bin/tool")).unwrap(),
        "tool 1\n"
    );
    assert!(root.join(format!("boot/vmlinuz-{version}")).exists());
    assert!(!root.join("strata/layers/base").exists());
    assert!(
        root.join("strata/adopt.toml").exists(),
        "the next boot tries again"
    );

    // A journal edited to move what stays (GRUB's files, /boot itself) is refused whole.
    while umount(root.join("var").as_path()).is_ok() {}
    fs::remove_dir_all(run.join("strata")).unwrap();
    let journal = root.join("strata/adopt.toml");
    let text = fs::read_to_string(&journal).unwrap();
    fs::write(
        &journal,
        text.replacen("entries = [", "entries = [\"boot\", ", 1),
    )
    .unwrap();
    let said = take_root();
    assert!(said.contains("stays on the real root"), "{said}");
    assert_eq!(listing(&root), before);
}
