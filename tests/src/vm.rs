//! The QEMU boot harness: a Debian kernel, the static hook in a minimal initramfs, and a raw
//! ext4 disk holding a store whose base layer is a busybox root with a test init that prints
//! markers on the serial console and powers off. Everything it needs it fetches when missing:
//! packages with apt-get, the kernel with `apt-get download` and `dpkg -x`, into a cache under
//! `target/strata-vm` (or `$STRATA_VM_CACHE`).

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace this test binary was built from.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("STRATA_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/strata-vm"))
}

/// An exclusive lock on `cache_dir()/name`, held until the value is dropped: one QEMU at a
/// time on the whole machine ([`Session`] holds `boot.lock` while its VM runs), one builder per
/// cached image.
#[derive(Debug)]
pub struct Lock {
    _held: nix::fcntl::Flock<fs::File>,
}

impl Lock {
    pub fn take(name: &str) -> Self {
        let dir = cache_dir();
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("locking {}: {e}", path.display()));
        Self { _held: lock }
    }
}

/// Runs a command that must succeed; its standard output.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs the Debian packages the harness uses, when their commands are missing.
pub fn ensure_packages() {
    ensure_commands(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("depmod", "kmod"),
        ("mkfs.ext4", "e2fsprogs"),
        ("dpkg-deb", "dpkg"),
    ]);
}

/// Installs with apt-get the package of each (command, package) whose command is missing.
pub fn ensure_commands(wanted: &[(&str, &str)]) {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| {
            Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]));
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
}

/// A Debian kernel and its modules, unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

/// The Debian 12 kernel (`linux-image-amd64`'s image package), downloaded once.
pub fn kernel() -> Kernel {
    let dir = cache_dir().join("kernel");
    let _fetching = Lock::take("kernel.lock");
    let find = || -> Option<Kernel> {
        let boot = fs::read_dir(dir.join("root/boot")).ok()?;
        let vmlinuz = boot.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })?;
        let version = vmlinuz
            .file_name()?
            .to_string_lossy()
            .trim_start_matches("vmlinuz-")
            .to_owned();
        let modules_dir = dir.join("root/lib/modules").join(&version);
        modules_dir.join("modules.dep").exists().then_some(Kernel {
            vmlinuz,
            modules_dir,
        })
    };
    if let Some(kernel) = find() {
        return kernel;
    }
    fs::create_dir_all(&dir).unwrap();
    let depends = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]));
    let image = depends
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| p.starts_with("linux-image-"))
        })
        .unwrap_or_else(|| panic!("linux-image-amd64 names no image package:\n{depends}"))
        .to_owned();
    run(Command::new("apt-get")
        .args(["download", &image])
        .current_dir(&dir));
    let deb = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the downloaded package");
    run(Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")));
    let _ = fs::remove_file(&deb);
    let version = image.trim_start_matches("linux-image-").to_owned();
    run(Command::new("depmod")
        .arg("-b")
        .arg(dir.join("root"))
        .arg(&version));
    find().expect("the kernel was unpacked")
}

/// The hook built as a static binary (the initramfs has no libraries).
pub fn static_hook() -> PathBuf {
    static_binary("initramfs-hook")
}

/// overlayctl built as a static binary, to run inside the test VMs' busybox roots.
pub fn static_overlayctl() -> PathBuf {
    static_binary("overlayctl")
}

/// A workspace binary built static, in release mode, without the tests' fault injection, into
/// `target/static`.
pub fn static_binary(package: &str) -> PathBuf {
    let target_dir = workspace().join("target/static");
    run(cargo()
        .args(["build", "--release", "--locked", "-p", package])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(workspace()));
    target_dir.join(format!("x86_64-unknown-linux-gnu/release/{package}"))
}

/// The cargo this program was built with, made to use its own toolchain's `rustc`. Run by its
/// full path, rustup's cargo calls `rustc` through the proxy, which would honour a dependency's
/// own `rust-toolchain.toml` and ask for a toolchain that is not installed.
pub fn cargo() -> Command {
    let cargo = Path::new(env!("CARGO"));
    let mut cmd = Command::new(cargo);
    let rustc = cargo.with_file_name("rustc");
    if rustc.is_file() {
        cmd.env("RUSTC", rustc);
    }
    cmd
}

/// The modules a virtio disk with ext4 and overlay need (crc32c_generic: ext4's soft dependency).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "overlay",
];

/// Builds the initramfs with the hook's own `mkinitramfs`.
pub fn initramfs(kernel: &Kernel, hook: &Path, out: &Path) {
    run(&mut mkinitramfs(kernel, hook, out));
}

/// The same image with a static busybox for the emergency shell.
pub fn initramfs_with_shell(kernel: &Kernel, hook: &Path, out: &Path) {
    let busybox = run(Command::new("sh").args(["-c", "command -v busybox"]));
    run(mkinitramfs(kernel, hook, out).args(["--busybox", busybox.trim()]));
}

fn mkinitramfs(kernel: &Kernel, hook: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(hook);
    cmd.arg("mkinitramfs")
        .arg("-o")
        .arg(out)
        .arg("--modules-dir")
        .arg(&kernel.modules_dir);
    for module in MODULES {
        cmd.args(["--module", module]);
    }
    cmd
}

/// An initramfs built by Debian's initramfs-tools with Strata's hook and local-bottom script and
/// no busybox, from a private copy of /etc/initramfs-tools (the host's configuration is not touched; its
/// /lib/modules gets a link to the kernel's modules while the image is built, as mkinitramfs
/// reads them from there only).
pub fn initramfs_tools_image(kernel: &Kernel, hook: &Path, work: &Path) -> PathBuf {
    ensure_commands(&[("mkinitramfs", "initramfs-tools")]);
    let conf = work.join("initramfs-tools");
    run(Command::new("cp")
        .args(["-r", "/etc/initramfs-tools"])
        .arg(&conf));
    let glue = workspace().join("initramfs-hook/initramfs-tools");
    fs::copy(glue.join("hooks/strata"), conf.join("hooks/strata")).unwrap();
    fs::create_dir_all(conf.join("scripts/local-bottom")).unwrap();
    fs::copy(
        glue.join("scripts/local-bottom/strata"),
        conf.join("scripts/local-bottom/strata"),
    )
    .unwrap();
    let settings = fs::read_to_string(conf.join("initramfs.conf"))
        .unwrap()
        .replace("MODULES=most", "MODULES=list")
        // klibc's tools only, as on a system without busybox (a Recommends): the glue must
        // need nothing but the hook.
        .replace("BUSYBOX=auto", "BUSYBOX=n");
    fs::write(conf.join("initramfs.conf"), settings).unwrap();
    fs::write(conf.join("modules"), MODULES.join("\n") + "\n").unwrap();

    let version = kernel.modules_dir.file_name().unwrap().to_owned();
    let link = Path::new("/lib/modules").join(&version);
    let made_link = !link.exists();
    if made_link {
        fs::create_dir_all("/lib/modules").unwrap();
        std::os::unix::fs::symlink(&kernel.modules_dir, &link).unwrap();
    }
    // mkinitramfs checks the kernel's config for the compressors it may use.
    let config = Path::new("/boot").join(format!("config-{}", version.to_string_lossy()));
    let made_config = !config.exists();
    if made_config {
        let boot = kernel.vmlinuz.parent().unwrap();
        fs::create_dir_all("/boot").unwrap();
        fs::copy(boot.join(config.file_name().unwrap()), &config).unwrap();
    }
    let image = work.join("initrd-initramfs-tools.img");
    let built = Command::new("mkinitramfs")
        .arg("-d")
        .arg(&conf)
        .arg("-o")
        .arg(&image)
        .arg(&version)
        .env("STRATA_HOOK_BINARY", hook)
        .output();
    if made_link {
        let _ = fs::remove_file(&link);
    }
    if made_config {
        let _ = fs::remove_file(&config);
    }
    let built = built.expect("running mkinitramfs");
    assert!(
        built.status.success(),
        "mkinitramfs failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let listed = Command::new("lsinitramfs").arg(&image).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("sbin/initramfs-hook") && !listed.contains("bin/busybox"),
        "the image holds the hook and no busybox:\n{listed}"
    );
    image
}

/// An initramfs built by dracut with Strata's module, from a private copy of dracut's module
/// tree (the host's /usr/lib/dracut is not touched): with `systemd`, systemd is the
/// initramfs's init (Fedora's and RHEL's default); without, dracut's own shell init.
pub fn dracut_image(kernel: &Kernel, hook: &Path, work: &Path, systemd: bool) -> PathBuf {
    dracut_image_with(kernel, hook, work, systemd, &[])
}

/// The same with files added to the image: (a file here, where it goes in the image).
pub fn dracut_image_with(
    kernel: &Kernel,
    hook: &Path,
    work: &Path,
    systemd: bool,
    includes: &[(&Path, &str)],
) -> PathBuf {
    ensure_commands(&[("dracut", "dracut-core")]);
    let base = work.join("dracut");
    let _ = fs::remove_dir_all(&base);
    run(Command::new("cp")
        .args(["-r", "/usr/lib/dracut"])
        .arg(&base));
    run(Command::new("cp")
        .arg("-r")
        .arg(workspace().join("initramfs-hook/dracut/90strata"))
        .arg(base.join("modules.d/")));
    let confdir = work.join("dracut.conf.d");
    fs::create_dir_all(&confdir).unwrap();
    let version = kernel.modules_dir.file_name().unwrap().to_owned();
    let (modules, image) = if systemd {
        (
            "systemd systemd-initrd dracut-systemd base rootfs-block kernel-modules strata",
            work.join("initrd-dracut-systemd.img"),
        )
    } else {
        (
            "base rootfs-block kernel-modules strata",
            work.join("initrd-dracut.img"),
        )
    };
    run(Command::new("dracut")
        .args([
            "--force",
            "--quiet",
            "--no-hostonly",
            "--no-early-microcode",
        ])
        .args(["--conf", "/dev/null", "--confdir"])
        .arg(&confdir)
        .args(["-m", modules])
        .args(["--drivers", &MODULES.join(" ")])
        .arg("--kmoddir")
        .arg(&kernel.modules_dir)
        .arg("--kver")
        .arg(&version)
        .args(includes.iter().flat_map(|(from, to)| {
            [
                std::ffi::OsStr::new("--include"),
                from.as_os_str(),
                std::ffi::OsStr::new(to),
            ]
        }))
        .arg(&image)
        .env("dracutbasedir", &base)
        .env("STRATA_HOOK_BINARY", hook));
    image
}

/// The test init: prints markers (`@@ …`) and powers off. On the command line, `test.write`
/// makes it write /var/persist; `test.checkpoint` writes /etc/note and runs `overlayctl
/// checkpoint`, `test.accept` runs `overlayctl accept` (both need overlayctl in the root).
pub const TEST_INIT: &str = r#"#!/bin/sh
echo "@@ version $(cat /etc/version)"
echo "@@ booted-begin"; cat /run/strata/booted.toml; echo "@@ booted-end"
echo "@@ state-begin"; cat /run/strata/store/state/boot.toml; echo "@@ state-end"
echo "@@ persist $(cat /var/persist 2>/dev/null || echo none)"
echo "@@ note $(cat /etc/note 2>/dev/null || echo none)"
case " $(cat /proc/cmdline) " in *" test.write "*) echo kept > /var/persist ;; esac
case " $(cat /proc/cmdline) " in *" test.checkpoint "*)
  echo "made while running" > /etc/note
  /bin/overlayctl checkpoint --name cp1 --title "Before the upgrade" && echo "@@ checkpoint asked" ;;
esac
case " $(cat /proc/cmdline) " in *" test.accept "*)
  /bin/overlayctl accept && echo "@@ accepted yes"
  echo "@@ plan-begin"; cat /run/strata/store/overlayplan.toml; echo "@@ plan-end" ;;
esac
sync
echo "@@ done"
poweroff -f
"#;

/// A busybox root with the test init, as a base layer's source tree.
pub fn busybox_root(dir: &Path, version: &str) {
    busybox_root_with_init(dir, version, TEST_INIT);
}

/// A busybox root whose /sbin/init is `init` (a shell script).
pub fn busybox_root_with_init(dir: &Path, version: &str, init: &str) {
    for sub in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "var",
    ] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let busybox = run(Command::new("sh").args(["-c", "command -v busybox"]))
        .trim()
        .to_owned();
    fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "sync", "poweroff", "ls", "mount", "sleep", "grep", "sed", "tr",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    fs::write(dir.join("sbin/init"), init).unwrap();
    fs::set_permissions(dir.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("etc/version"), format!("{version}\n")).unwrap();
    // systemd's switch-root wants an OS tree: one with os-release.
    fs::write(
        dir.join("etc/os-release"),
        "ID=strata-test\nNAME=\"Strata test\"\n",
    )
    .unwrap();
}

/// A raw ext4 image of `size_mib` holding `root`, made without loop mounts.
pub fn disk_image(root: &Path, image: &Path, size_mib: u32) {
    let _ = fs::remove_file(image);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "strata-root", "-d"])
        .arg(root)
        .arg(image)
        .arg(format!("{size_mib}M")));
}

/// The filesystem UUID of an ext4 image.
pub fn image_uuid(image: &Path) -> String {
    let out = run(Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .stderr(Stdio::null()));
    out.lines()
        .find_map(|l| l.strip_prefix("Filesystem UUID:"))
        .map(|u| u.trim().to_owned())
        .expect("dumpe2fs names the UUID")
}

/// A file from inside an ext4 image, read with debugfs.
pub fn read_from_image(image: &Path, path: &str) -> String {
    run(Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .stderr(Stdio::null()))
}

/// Whether a path exists inside an ext4 image (debugfs `stat`, which says "File not found"
/// for one that does not).
pub fn image_has(image: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("running debugfs: {e}"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "debugfs failed: {said}");
    if said.contains("File not found") {
        return false;
    }
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Inode:"),
        "debugfs stat {path}: {said}"
    );
    true
}

/// What a boot printed on its serial console.
#[derive(Debug)]
pub struct BootLog {
    pub serial: String,
    pub timed_out: bool,
}

impl BootLog {
    /// The text after `@@ NAME ` on its line.
    pub fn marker(&self, name: &str) -> Option<&str> {
        let prefix = format!("@@ {name} ");
        self.serial
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix))
    }

    /// The lines between `@@ NAME-begin` and `@@ NAME-end`.
    pub fn block(&self, name: &str) -> Option<String> {
        let text = self.serial.replace('\r', "");
        let start = text.find(&format!("@@ {name}-begin\n"))? + name.len() + 10;
        let end = text[start..].find(&format!("@@ {name}-end"))? + start;
        Some(text[start..end].to_owned())
    }

    pub fn done(&self) -> bool {
        self.serial.contains("@@ done")
    }
}

/// How long one boot may take under TCG on a loaded two-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The QEMU command that boots `kernel` with `initrd` and `disk` (virtio /dev/vda) under TCG,
/// its serial console on standard output.
pub fn qemu(kernel: &Kernel, initrd: &Path, disk: &Path, extra_cmdline: &str) -> Command {
    let append = format!("console=ttyS0 root=/dev/vda panic=-1 quiet loglevel=4 {extra_cmdline}");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "512",
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-drive")
    .arg(format!("file={},format=raw,if=virtio", disk.display()))
    .args(["-append", &append]);
    cmd
}

/// A running VM whose serial console can be read while it runs and typed into.
#[derive(Debug)]
pub struct Session {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    serial: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    start: Instant,
    timeout: Duration,
    /// The machine's one QEMU: other tests make their disks and images meanwhile, and boot
    /// after this VM has ended.
    _boot: Lock,
}

impl Session {
    /// Starts the VM; the console is collected from the first byte.
    pub fn start(kernel: &Kernel, initrd: &Path, disk: &Path, extra_cmdline: &str) -> Self {
        Self::spawn(qemu(kernel, initrd, disk, extra_cmdline), BOOT_TIMEOUT)
    }

    /// Starts a QEMU command whose serial console is its standard input and output; the boot
    /// may take `timeout`.
    /// Waits first for any other test's VM to end: a boot under TCG takes a whole core.
    pub fn spawn(mut qemu: Command, timeout: Duration) -> Self {
        let boot = Lock::take("boot.lock");
        let mut child = qemu
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let mut stdout = child.stdout.take().expect("piped");
        let serial = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = serial.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            serial,
            reader: Some(reader),
            start: Instant::now(),
            timeout,
            _boot: boot,
        }
    }

    /// The console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&self.serial.lock().unwrap()).into_owned()
    }

    /// Waits until the console shows `text` after byte `from`; returns the offset just past it,
    /// or None when the VM exited or the boot's time ran out first.
    pub fn wait_for_after(&mut self, from: usize, text: &str) -> Option<usize> {
        loop {
            let seen = {
                let serial = self.serial.lock().unwrap();
                let tail = &serial[from.min(serial.len())..];
                tail.windows(text.len())
                    .position(|w| w == text.as_bytes())
                    .map(|at| from + at + text.len())
            };
            if seen.is_some() {
                return seen;
            }
            let exited = self.child.try_wait().expect("waiting for qemu").is_some();
            if exited || self.start.elapsed() > self.timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the console shows `text` anywhere.
    pub fn wait_for(&mut self, text: &str) -> Option<usize> {
        self.wait_for_after(0, text)
    }

    /// What an 80x24 terminal on this serial line shows now, escape sequences applied.
    pub fn screen(&self) -> String {
        let mut parser = vt100::Parser::default();
        parser.process(&self.serial.lock().unwrap());
        parser.screen().contents()
    }

    /// Waits until the 80x24 screen shows `text`; returns the screen, or None when the VM
    /// exited or the boot's time ran out first.
    pub fn wait_for_screen(&mut self, text: &str) -> Option<String> {
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return Some(screen);
            }
            let exited = self.child.try_wait().expect("waiting for qemu").is_some();
            if exited || self.start.elapsed() > self.timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `bytes` on the serial console.
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("the console is open");
        stdin
            .write_all(bytes)
            .expect("writing to the serial console");
        stdin.flush().expect("writing to the serial console");
    }

    /// Waits for the VM to end (killing it when the boot's time runs out) and returns its log.
    pub fn finish(mut self) -> BootLog {
        let mut timed_out = false;
        loop {
            if self.child.try_wait().expect("waiting for qemu").is_some() {
                break;
            }
            if self.start.elapsed() > self.timeout {
                timed_out = true;
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(self.stdin.take());
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        BootLog {
            serial: self.serial(),
            timed_out,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots and collects the serial console, within [`BOOT_TIMEOUT`].
pub fn boot(kernel: &Kernel, initrd: &Path, disk: &Path, extra_cmdline: &str) -> BootLog {
    Session::start(kernel, initrd, disk, extra_cmdline).finish()
}

/// QEMU's human monitor on a unix socket (`-monitor unix:PATH,server=on,wait=off`): the
/// emulated PC keyboard, the VGA text buffer and pictures of the screen.
#[derive(Debug)]
pub struct Monitor {
    stream: std::os::unix::net::UnixStream,
    /// QEMU's working directory, where the socket is: files the monitor writes are named
    /// relative to it (its expressions would read `/` in a path as a division).
    dir: PathBuf,
}

/// The VGA text buffer: 32 KiB at 0xb8000, two bytes a cell (character, colour). vgacon scrolls
/// by moving the start of the screen within it, so the whole of it is read.
const VGA_TEXT: (u64, usize) = (0xb8000, 0x8000);
/// A text-mode row: 80 cells.
const VGA_ROW: usize = 160;

impl Monitor {
    /// The QEMU arguments for a monitor at `socket`.
    pub fn args(socket: &Path) -> [String; 2] {
        [
            "-monitor".to_owned(),
            format!("unix:{},server=on,wait=off", socket.display()),
        ]
    }

    /// Connects to the monitor QEMU opens at `socket` (it may still be starting); QEMU runs in
    /// the socket's directory.
    pub fn connect(socket: &Path) -> Self {
        let started = Instant::now();
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    panic!("QEMU's monitor at {}: {e}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let dir = socket
            .parent()
            .expect("the socket is in a directory")
            .to_owned();
        let mut monitor = Self { stream, dir };
        monitor.until_prompt();
        monitor
    }

    /// Reads what the monitor says up to its next prompt.
    fn until_prompt(&mut self) -> String {
        let mut said = Vec::new();
        let mut buf = [0u8; 4096];
        while !said.ends_with(b"(qemu) ") {
            let n = self.stream.read(&mut buf).expect("reading QEMU's monitor");
            assert!(n > 0, "QEMU's monitor closed");
            said.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&said).into_owned()
    }

    /// Runs one monitor command; what it answered.
    pub fn command(&mut self, line: &str) -> String {
        use std::io::Write;
        writeln!(self.stream, "{line}").expect("writing to QEMU's monitor");
        self.until_prompt()
    }

    /// Presses and releases a key of the PC keyboard (QEMU's names: `down`, `t`, `ret`, `spc`).
    pub fn send_key(&mut self, key: &str) {
        self.command(&format!("sendkey {key}"));
    }

    /// The VGA text buffer as lines of 80 characters (printable ASCII; anything else a space).
    pub fn vga_text(&mut self) -> String {
        const FILE: &str = "vga-text.bin";
        let (at, len) = VGA_TEXT;
        // A save that failed must not leave the last one to be read again.
        let _ = fs::remove_file(self.dir.join(FILE));
        let said = self.command(&format!("pmemsave {at:#x} {len} {FILE}"));
        let cells = fs::read(self.dir.join(FILE))
            .unwrap_or_else(|e| panic!("reading the saved VGA text buffer ({e}): {said}"));
        cells
            .chunks(VGA_ROW)
            .map(|row| {
                let line: String = row
                    .chunks(2)
                    .map(|cell| match cell[0] {
                        c @ 0x20..=0x7e => c as char,
                        _ => ' ',
                    })
                    .collect();
                line.trim_end().to_owned()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits up to `within` until the VGA text buffer holds `text`; the buffer then.
    pub fn wait_for_vga_text(&mut self, text: &str, within: Duration) -> Option<String> {
        let started = Instant::now();
        while started.elapsed() < within {
            let screen = self.vga_text();
            if screen.contains(text) {
                return Some(screen);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        None
    }

    /// A picture of the screen as QEMU shows it, as PNG.
    pub fn screendump_png(&mut self, out: &Path) {
        let said = self.command(&format!("screendump {} -f png", out.display()));
        assert!(out.exists(), "screendump made no {}: {said}", out.display());
    }
}
