//! A real Debian 12 for the VM tests: debootstrapped (minbase with systemd, udev, Debian's
//! kernel, initramfs-tools and GRUB's BIOS files; no busybox), cached under the VM cache;
//! Strata installed into it from its .deb; its store made with `overlayctl init --move`; and a
//! partitioned disk (an MBR, GRUB in the gap before the partition, one ext4 partition) that
//! QEMU's BIOS boots through GRUB, as a PC would.
//!
//! GRUB reads `/boot/grub/grub.cfg` on the real root, which boots the kernel `overlayctl` keeps
//! in `/boot/strata/default/` for the next boot's stack (docs/kernels.md); a test adds kernel arguments for one boot through
//! `/boot/grub/strata-test.cfg`. A unit in the guest prints what the boot found as `@@ NAME
//! VALUE` lines on the serial console and powers off.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::vm::{self, BootLog, Session, cache_dir, ensure_commands, run};

/// Debian's mirror, as this machine's apt uses it.
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// Where the partition starts on the disk: 1 MiB, the gap before it holding GRUB's core.
const PARTITION_START: u64 = 1 << 20;
/// The real root's filesystem label, which the kernel command line names.
pub const ROOT_LABEL: &str = "strata-root";
/// How long a systemd boot under TCG may take here (60 to 100 s measured).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest's apt sources: the release, its updates and security updates (where newer
/// kernels come from).
const SOURCES: &str = "deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
";

/// Prints what the boot found, then powers off (unless `test.stay` is on the command line).
const REPORT: &str = r#"#!/bin/sh
# Strata's VM tests: what this boot found, as "@@ NAME VALUE" lines on the serial console.
exec >/dev/ttyS0 2>&1
record=/run/strata/booted.toml
echo "@@ uname $(uname -r)"
echo "@@ stack $(tr -d '\n' <"$record" | sed -n 's/.*stack = \[\([^]]*\)\].*/\1/p' | tr -d '" ' | sed 's/,$//')"
echo "@@ root-fs $(findmnt -no FSTYPE /)"
echo "@@ modules-dir $(test -d "/lib/modules/$(uname -r)/kernel" && echo present || echo missing)"
echo "@@ overlay-module $(grep -q '^overlay ' /proc/modules && echo loaded || echo builtin-or-missing)"
echo "@@ busybox $(command -v busybox || echo none)"
echo "@@ failed-units $(systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
for f in /etc/strata-test/*; do [ -f "$f" ] && echo "@@ file-$(basename "$f") $(cat "$f")"; done
echo "@@ hello $(command -v hello || echo none)"
if overlayctl verify >/run/strata-test-verify 2>&1; then echo "@@ verify ok"; else
    echo "@@ verify failed"; echo "@@ verify-begin"; cat /run/strata-test-verify; echo "@@ verify-end"
fi
echo "@@ adopt-journal $(test -e /run/strata/store/adopt.toml && echo present || echo gone)"
if [ -e /run/strata/root/strata-test-release ]; then
    rm /run/strata/root/strata-test-release
    mkdir -p /etc/strata-test && echo "written over the stack" >/etc/strata-test/upper
    echo "@@ release-begin"; overlayctl release; echo "@@ release-rc $?"; echo "@@ release-end"
fi
echo "@@ kernel-package $(dpkg-query -W -f '${Version}' linux-image-amd64)"
echo "@@ file-tweak $(cat /etc/strata-tweak 2>/dev/null || echo none)"
if [ -e /run/strata/root/strata-test-run ]; then
    rm /run/strata/root/strata-test-run
    echo "@@ run-begin"
    overlayctl run --name tweak -- sh -c 'echo tweaked >/etc/strata-tweak'
    echo "@@ run-rc $?"; echo "@@ run-end"
fi
if [ -e /etc/strata-test-run/adopt ]; then
    rm /etc/strata-test-run/adopt
    echo "@@ adopt-begin"; overlayctl adopt; echo "@@ adopt-rc $?"; echo "@@ adopt-end"
fi
if [ -e /etc/strata-test-run/update-grub ]; then
    rm /etc/strata-test-run/update-grub
    update-grub >/dev/null 2>&1; echo "@@ update-grub-rc $?"
fi
echo "@@ status-begin"; overlayctl status; echo "@@ status-end"
echo "@@ hook-log-begin"; dmesg | sed -n 's/.*strata: //p'; echo "@@ hook-log-end"
echo "@@ done"
if [ -e /run/strata/root/strata-test-switch ]; then
    rm /run/strata/root/strata-test-switch
    overlayctl disable hello >/dev/null 2>&1
    echo "@@ switch-begin"; overlayctl switch; echo "@@ switch-rc $?"
    exit 0
fi
# (No D-Bus in minbase: systemctl says so, then asks systemd directly.)
grep -qw test.stay /proc/cmdline || systemctl --no-block poweroff 2>/dev/null
"#;

const REPORT_UNIT: &str = "[Unit]
Description=Strata VM test report
After=multi-user.target strata-accept.service strata-assess.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/strata-test-report

[Install]
WantedBy=multi-user.target
";

const GRUB_CFG: &str = r#"# Strata's VM tests: boot the kernel Strata put on the real root, over the serial console.
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
set strata_extra=""
if [ -f /boot/grub/strata-test.cfg ]; then source /boot/grub/strata-test.cfg; fi
menuentry "Strata" {
    linux /boot/strata/default/vmlinuz root=LABEL=strata-root ro console=ttyS0 panic=10 quiet $strata_extra
    initrd /boot/strata/default/initrd.img
}
"#;

/// What debootstrap installs beside minbase: systemd, Debian's kernel and initramfs-tools (with
/// zstd, as a standard install has it), and GRUB as an installed Debian has it (its kernel hook
/// and `update-grub` included).
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "linux-image-amd64",
    "initramfs-tools",
    "grub-pc",
    "zstd",
    "kmod",
    "e2fsprogs",
    "procps",
];

/// GRUB's modules in its core image: enough to find the partition, read ext4, the serial
/// console, and load the configuration and a Linux kernel.
const GRUB_MODULES: &[&str] = &[
    "biosdisk",
    "part_msdos",
    "ext2",
    "normal",
    "linux",
    "serial",
    "terminal",
    "configfile",
    "test",
    "echo",
    "search",
];

/// The cached Debian root, GRUB's boot images beside it. Built once (about two minutes);
/// `complete` marks a finished build.
#[derive(Debug, Clone)]
pub struct Base {
    pub dir: PathBuf,
}

impl Base {
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The kernel version the base root boots (its only `/lib/modules` entry).
    pub fn kernel_version(&self) -> String {
        kernel_versions(&self.root())
            .pop()
            .expect("the base root has a kernel")
    }
}

/// The kernel versions a root has modules for, oldest first.
pub fn kernel_versions(root: &Path) -> Vec<String> {
    let mut versions: Vec<String> = fs::read_dir(root.join("lib/modules"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|v| {
        v.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    versions
}

/// The Debian root for the VM tests, built when the cache lacks it.
pub fn base() -> Base {
    let recipe = format!(
        "debootstrap --variant=minbase --include={}; apt-get clean\n",
        PACKAGES.join(",")
    );
    cached("debian-12", &recipe, |dir, root| {
        ensure_commands(&[("debootstrap", "debootstrap"), ("sfdisk", "fdisk")]);
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "--include"])
            .arg(PACKAGES.join(","))
            .arg("bookworm")
            .arg(root)
            .arg(MIRROR));
        assert!(
            !root.join("bin/busybox").exists() && !root.join("usr/bin/busybox").exists(),
            "the base has no busybox"
        );
        fs::write(root.join("etc/apt/sources.list"), SOURCES).unwrap();
        // debootstrap leaves its packages in apt's cache: 190 MB on every test's disk otherwise.
        run(Command::new("chroot").arg(root).args(["apt-get", "clean"]));
        fs::write(root.join("etc/hostname"), "strata-debian\n").unwrap();
        fs::write(
            root.join("etc/fstab"),
            "# The root is Strata's overlay, mounted by the initramfs.\n",
        )
        .unwrap();
        // serial-getty hangs up ttyS0 and cuts off what the report unit writes there.
        std::os::unix::fs::symlink(
            "/dev/null",
            root.join("etc/systemd/system/serial-getty@ttyS0.service"),
        )
        .unwrap();
        // GRUB's core image and MBR code, made by the guest's own grub-mkimage.
        run(Command::new("chroot")
            .arg(root)
            .args(["grub-mkimage", "-O", "i386-pc", "-o", "/core.img", "-p"])
            .arg("(hd0,msdos1)/boot/grub")
            .args(GRUB_MODULES));
        fs::rename(root.join("core.img"), dir.join("core.img")).unwrap();
        fs::copy(
            root.join("usr/lib/grub/i386-pc/boot.img"),
            dir.join("boot.img"),
        )
        .unwrap();
    })
}

/// What the dracut flavour installs on the base: Debian's `dracut` (which replaces
/// initramfs-tools, so the kernel's hooks and Strata's package build the initramfs with dracut,
/// systemd inside, as Fedora's and RHEL's do) and Plymouth (its boot splash on the console).
const DRACUT_PACKAGES: &[&str] = &["dracut", "plymouth"];

/// The base with dracut in place of initramfs-tools, cached beside it. Must run in a private
/// mount namespace (apt runs chrooted with /proc, /sys and /dev).
pub fn dracut_base() -> Base {
    let base = base();
    let recipe = format!(
        "{}apt-get install --no-install-recommends {}; apt-get clean\n",
        fs::read_to_string(base.dir.join("complete")).unwrap(),
        DRACUT_PACKAGES.join(" ")
    );
    cached("debian-12-dracut", &recipe, |dir, root| {
        run(Command::new("cp").arg("-a").arg(base.root()).arg(root));
        for file in ["core.img", "boot.img"] {
            fs::copy(base.dir.join(file), dir.join(file)).unwrap();
        }
        in_chroot(root, &["apt-get", "update", "-qq"]);
        let mut install = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
        install.extend(DRACUT_PACKAGES);
        in_chroot(root, &install);
        in_chroot(root, &["apt-get", "clean"]);
        assert!(
            !root.join("usr/sbin/update-initramfs").exists(),
            "dracut replaced initramfs-tools"
        );
        // Plymouth's text splash (Debian's default theme comes with a desktop), and no
        // drivers for GPUs a VM lacks: the image as one made for this machine.
        fs::write(
            root.join("etc/plymouth/plymouthd.conf"),
            "[Daemon]\nTheme=tribar\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("etc/dracut.conf.d")).unwrap();
        fs::write(
            root.join("etc/dracut.conf.d/50-machine.conf"),
            "omit_drivers+=\" amdgpu radeon nouveau i915 xe \"\n",
        )
        .unwrap();
    })
}

/// The root cached as `name`, made by `build(dir, root)` when the cache lacks it or was made by
/// another recipe (`complete` holds the recipe of a finished build).
fn cached(name: &str, recipe: &str, build: impl FnOnce(&Path, &Path)) -> Base {
    let dir = cache_dir().join(name);
    let base = Base { dir: dir.clone() };
    let _building = vm::Lock::take(&format!("{name}.lock"));
    if fs::read_to_string(dir.join("complete")).is_ok_and(|done| done == recipe) {
        return base;
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    build(&dir, &base.root());
    fs::write(dir.join("complete"), recipe).unwrap();
    base
}

/// Runs `argv` chrooted in `root` with /proc, /sys and /dev mounted (in the calling thread's
/// private mount namespace; they are unmounted after).
pub fn in_chroot(root: &Path, argv: &[&str]) -> String {
    use nix::mount::{MsFlags, mount, umount};
    let mut mounted = Vec::new();
    for (what, fstype, flags) in [
        ("proc", Some("proc"), MsFlags::empty()),
        ("sys", Some("sysfs"), MsFlags::empty()),
        ("dev", None, MsFlags::MS_BIND | MsFlags::MS_REC),
    ] {
        let target = root.join(what);
        let source = if fstype.is_some() {
            PathBuf::from(what)
        } else {
            PathBuf::from("/dev")
        };
        mount(Some(&source), &target, fstype, flags, None::<&str>)
            .unwrap_or_else(|e| panic!("mounting {}: {e}", target.display()));
        mounted.push(target);
    }
    let out = Command::new("chroot")
        .arg(root)
        .args(argv)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output();
    for target in mounted.iter().rev() {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
        let _ = umount(target);
    }
    let out = out.unwrap_or_else(|e| panic!("running chroot: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} in {}:\n{}{}",
        root.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Which tool builds the machine's initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initramfs {
    /// initramfs-tools, Debian's default, without busybox.
    Tools,
    /// dracut, with systemd as the initramfs's init.
    Dracut,
}

/// A Debian machine for one test: its real root as a tree (the store at `strata/`, GRUB's
/// files and the boot kernel under `boot/`) and the disk made from it.
#[derive(Debug)]
pub struct Machine {
    pub dir: tempfile::TempDir,
    pub base: Base,
}

impl Machine {
    /// Copies the cached Debian root, installs Strata's package into it (its trigger builds
    /// the initramfs with the hook), and makes the store around it. `None` when the test
    /// cannot run.
    pub fn new(test: &str) -> Option<Self> {
        Self::with_store(test, Initramfs::Tools)
    }

    /// The same on the dracut flavour: the initramfs built by dracut with systemd inside, and
    /// Plymouth.
    pub fn new_dracut(test: &str) -> Option<Self> {
        Self::with_store(test, Initramfs::Dracut)
    }

    fn with_store(test: &str, initramfs: Initramfs) -> Option<Self> {
        let machine = Self::installed(test, initramfs)?;
        let (tree, real) = (machine.path("tree"), machine.real());
        machine.install_grub(&tree, GRUB_CFG);
        // overlayctl keeps the next boot's kernel here, from `init` on.
        fs::create_dir_all(real.join("boot/strata")).unwrap();
        let store = machine.store();
        machine.overlayctl(&["init", "--base", tree.to_str().unwrap(), "--move"]);
        assert!(store.join("layers/base/usr/sbin/overlayctl").exists());
        let version = machine.base.kernel_version();
        assert_eq!(machine.boot_kernel(), Some(version));
        Some(machine)
    }

    /// An installed Debian with Strata's package and no store, booted by GRUB from Debian's own
    /// `/vmlinuz` and `/initrd.img`: a system to adopt.
    pub fn plain(test: &str) -> Option<Self> {
        let machine = Self::installed(test, Initramfs::Tools)?;
        fs::rename(machine.path("tree"), machine.real()).unwrap();
        let plain = GRUB_CFG
            .replace("/boot/strata/default/vmlinuz", "/vmlinuz")
            .replace("/boot/strata/default/initrd.img", "/initrd.img");
        machine.install_grub(&machine.real(), &plain);
        // A machine with a serial console, as its GRUB settings say it for update-grub.
        fs::write(
            machine.real().join("etc/default/grub"),
            "GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_DISTRIBUTOR=Debian\n\
             GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n\
             GRUB_CMDLINE_LINUX=\"console=ttyS0 panic=10\"\n\
             GRUB_TERMINAL=serial\n\
             GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"\n",
        )
        .unwrap();
        // As an installer writes it: systemd remounts the root read-write from it.
        fs::write(
            machine.real().join("etc/fstab"),
            format!("LABEL={ROOT_LABEL} / ext4 errors=remount-ro 0 1\n"),
        )
        .unwrap();
        Some(machine)
    }

    /// A copy of the cached Debian root at `tree/`, Strata's package installed (its trigger
    /// builds the initramfs with the hook) and the report unit.
    fn installed(test: &str, initramfs: Initramfs) -> Option<Self> {
        let machine = Self::copied(test, initramfs)?;
        let tree = machine.path("tree");
        fs::copy(package(), tree.join("tmp/strata.deb")).unwrap();
        in_chroot(&tree, &["dpkg", "-i", "/tmp/strata.deb"]);
        fs::remove_file(tree.join("tmp/strata.deb")).unwrap();
        Some(machine)
    }

    /// A copy of the cached Debian root at `tree/` with the report unit.
    fn copied(test: &str, initramfs: Initramfs) -> Option<Self> {
        if !crate::have_root(test) {
            return None;
        }
        crate::private_mount_namespace();
        vm::ensure_packages();
        let base = match initramfs {
            Initramfs::Tools => base(),
            Initramfs::Dracut => dracut_base(),
        };
        let machine = Self {
            dir: tempfile::tempdir_in(cache_dir()).unwrap(),
            base,
        };
        let tree = machine.path("tree");
        run(Command::new("cp")
            .arg("-a")
            .arg(machine.base.root())
            .arg(&tree));
        install_report(&tree);
        Some(machine)
    }

    /// GRUB's modules (from the system in `system`) and `config` on the real root.
    fn install_grub(&self, system: &Path, config: &str) {
        let grub = self.real().join("boot/grub");
        fs::create_dir_all(grub.join("i386-pc")).unwrap();
        run(Command::new("cp")
            .arg("-a")
            .arg(system.join("usr/lib/grub/i386-pc/."))
            .arg(grub.join("i386-pc")));
        fs::write(grub.join("grub.cfg"), config).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The real root filesystem's tree.
    pub fn real(&self) -> PathBuf {
        self.path("real")
    }

    pub fn store(&self) -> PathBuf {
        self.real().join("strata")
    }

    pub fn disk(&self) -> PathBuf {
        self.path("disk.img")
    }

    /// This workspace's `overlayctl` on the machine's store (on the host, as an image builder
    /// would run it).
    pub fn overlayctl(&self, args: &[&str]) -> String {
        self.overlayctl_on(&self.store(), args)
    }

    /// The same on the store at `store` (the disk's, mounted with [`Self::with_real_root`]).
    pub fn overlayctl_on(&self, store: &Path, args: &[&str]) -> String {
        run(Command::new(assert_cmd::cargo::cargo_bin("overlayctl"))
            .env("STRATA_RUN_DIR", self.path("run"))
            .env_remove("STRATA_STORE")
            .arg("--store")
            .arg(store)
            .args(args))
    }

    /// The kernel version `/boot/strata/default` names on the real root's tree.
    pub fn boot_kernel(&self) -> Option<String> {
        let link = fs::read_link(self.real().join("boot/strata/default")).ok()?;
        Some(link.to_str()?.to_owned())
    }

    /// Makes the disk from the real root's tree: an MBR with one bootable ext4 partition at
    /// 1 MiB, GRUB's boot code in the MBR and its core image in the gap.
    pub fn make_disk(&self) {
        let part = self.path("part.img");
        vm::disk_image(&self.real(), &part, 4096);
        let disk = self.disk();
        let _ = fs::remove_file(&disk);
        let part_len = fs::metadata(&part).unwrap().len();
        let file = fs::File::create(&disk).unwrap();
        file.set_len(PARTITION_START + part_len).unwrap();
        drop(file);
        let mut sfdisk = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&disk)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let table = format!(
                "label: dos\nstart={}, type=83, bootable\n",
                PARTITION_START / 512
            );
            sfdisk
                .stdin
                .take()
                .unwrap()
                .write_all(table.as_bytes())
                .unwrap();
        }
        assert!(sfdisk.wait().unwrap().success(), "sfdisk");
        let write_at = |source: &Path, offset: u64, len: Option<usize>| {
            use std::io::{Seek, SeekFrom, Write};
            let mut bytes = fs::read(source).unwrap();
            if let Some(len) = len {
                bytes.truncate(len);
            }
            let mut out = fs::OpenOptions::new().write(true).open(&disk).unwrap();
            out.seek(SeekFrom::Start(offset)).unwrap();
            out.write_all(&bytes).unwrap();
        };
        // The MBR's code only (446 bytes would reach the partition table; GRUB's is 440).
        write_at(&self.base.dir.join("boot.img"), 0, Some(440));
        let core = self.base.dir.join("core.img");
        assert!(
            fs::metadata(&core).unwrap().len() < PARTITION_START - 512,
            "GRUB's core fits the gap"
        );
        write_at(&core, 512, None);
        // The partition's blocks, sparse: copied with dd so holes stay holes.
        run(Command::new("dd")
            .arg(format!("if={}", part.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"]));
        fs::remove_file(&part).unwrap();
    }

    /// The QEMU command that boots the disk through the BIOS and GRUB, the serial console on
    /// its standard input and output and no screen.
    pub fn qemu(&self) -> Command {
        self.qemu_with(&["-nographic"])
    }

    /// The same with `display` for the screen (`-nographic`: none at all).
    fn qemu_with(&self, display: &[&str]) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "1024", "-smp", "1"])
            .args(display)
            .args(["-no-reboot", "-nodefaults", "-serial", "stdio"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio",
                self.disk().display()
            ));
        cmd
    }

    /// Boots with `extra` added to the kernel command line (through GRUB) and waits for the
    /// report.
    pub fn boot(&self, extra: &str) -> BootLog {
        self.session(extra).finish()
    }

    /// Boots as [`Self::boot`] does, waiting up to `timeout` (a boot that upgrades the system
    /// under TCG takes minutes).
    pub fn boot_for(&self, extra: &str, timeout: Duration) -> BootLog {
        self.session_for(extra, timeout).finish()
    }

    /// Starts a boot with `extra` on the kernel command line.
    pub fn session(&self, extra: &str) -> Session {
        self.session_for(extra, BOOT_TIMEOUT)
    }

    fn session_for(&self, extra: &str, timeout: Duration) -> Session {
        self.set_extra(extra);
        Session::spawn(self.qemu(), timeout)
    }

    /// Starts a boot with `extra` on the kernel command line on a PC with a VGA screen (and
    /// the serial line beside it), and connects to QEMU's monitor: its keyboard and screen.
    pub fn vga_session(&self, extra: &str) -> (Session, vm::Monitor) {
        self.set_extra(extra);
        let socket = self.path("monitor.sock");
        let _ = fs::remove_file(&socket);
        let mut qemu = self.qemu_with(&["-display", "none", "-vga", "std"]);
        qemu.args(vm::Monitor::args(&socket))
            .current_dir(socket.parent().unwrap());
        let session = Session::spawn(qemu, BOOT_TIMEOUT);
        (session, vm::Monitor::connect(&socket))
    }

    /// Kernel arguments for the next boot, through GRUB.
    fn set_extra(&self, extra: &str) {
        self.with_real_root(|real| {
            fs::write(
                real.join("boot/grub/strata-test.cfg"),
                format!("set strata_extra=\"{extra}\"\n"),
            )
            .unwrap();
        });
    }

    /// Runs `f` on the disk's real root, mounted (a loop device at the partition's offset, in
    /// this thread's private mount namespace).
    pub fn with_real_root<T>(&self, f: impl FnOnce(&Path) -> T) -> T {
        let mnt = self.path("mnt");
        fs::create_dir_all(&mnt).unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg(format!("loop,offset={PARTITION_START}"))
            .arg(self.disk())
            .arg(&mnt));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mnt)));
        run(Command::new("umount").arg("-d").arg(&mnt));
        match result {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// The unit that prints the boot's report and powers off.
fn install_report(root: &Path) {
    let report = root.join("usr/local/sbin/strata-test-report");
    fs::create_dir_all(report.parent().unwrap()).unwrap();
    fs::write(&report, REPORT).unwrap();
    fs::set_permissions(&report, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::write(
        root.join("etc/systemd/system/strata-test-report.service"),
        REPORT_UNIT,
    )
    .unwrap();
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/strata-test-report.service",
        wants.join("strata-test-report.service"),
    )
    .unwrap();
}

/// The version of `package` dpkg has installed in `root`.
pub fn package_version(root: &Path, package: &str) -> String {
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    status
        .split("\n\n")
        .find(|stanza| stanza.lines().any(|l| l == format!("Package: {package}")))
        .and_then(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Version: ")))
        .unwrap_or_else(|| panic!("{package} is not installed in {}", root.display()))
        .to_owned()
}

/// The package, made by `scripts/package` (once per test process).
pub fn package() -> PathBuf {
    static DEB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DEB.get_or_init(|| {
        let workspace = vm::workspace();
        let out = run(Command::new(workspace.join("scripts/package")).current_dir(&workspace));
        workspace.join(out.trim())
    })
    .clone()
}
