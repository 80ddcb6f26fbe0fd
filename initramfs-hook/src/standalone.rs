//! Standalone mode: this binary as `/init` of a minimal initramfs. Mounts the early
//! filesystems, loads the modules the image carries, waits (bounded) for the root device, mounts
//! it, runs the boot flow, and switch_roots into the overlay. Any failure ends in a clear message
//! and an emergency shell where the image has one, else a reboot: never a hang.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, mount, mount_move};

use crate::flow::{self, BootEnv, BootError, Log};
use crate::mkinitramfs::{MODULES_DIR, MODULES_LIST};

/// The real root's mount point in the initramfs, and where it lives on under the new root.
const SYSROOT: &str = "/sysroot";
const NEWROOT: &str = "/newroot";
const KEPT_ROOT: &str = "/run/strata/root";
/// How long to wait for the root device unless `rootdelay=` says otherwise.
const ROOT_WAIT: Duration = Duration::from_secs(30);

/// The root= family of kernel parameters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RootParams {
    pub root: Option<String>,
    pub fstype: Option<String>,
    pub flags: Option<String>,
    pub init: Option<String>,
    pub wait: Option<Duration>,
}

impl RootParams {
    pub fn parse(cmdline: &str) -> Self {
        let mut p = Self::default();
        for word in cmdline.split_whitespace() {
            if word == "--" {
                break;
            }
            match word.split_once('=') {
                Some(("root", v)) => p.root = Some(v.to_owned()),
                Some(("rootfstype", v)) => p.fstype = Some(v.to_owned()),
                Some(("rootflags", v)) => p.flags = Some(v.to_owned()),
                Some(("init", v)) => p.init = Some(v.to_owned()),
                Some(("rootdelay", v)) => p.wait = v.parse().ok().map(Duration::from_secs),
                _ => {}
            }
        }
        p
    }
}

/// Runs as PID 1; returns only by exec'ing the real init or a shell, or by rebooting.
pub fn main() -> ! {
    let mut log = Log::default();
    if let Err(message) = early_mounts() {
        emergency(&mut log, &message);
    }
    log.kmsg = true;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    log.say(format!(
        "starting (initramfs-hook {})",
        env!("CARGO_PKG_VERSION")
    ));
    load_modules(&mut log);
    let params = RootParams::parse(&cmdline);
    if let Err(message) = mount_root(&params, &mut log) {
        emergency(&mut log, &message);
    }
    let env = BootEnv {
        sysroot: SYSROOT.into(),
        newroot: NEWROOT.into(),
        run: "/run".into(),
        cmdline,
        may_restart: true,
    };
    // A panic in process 1 would panic the kernel: catch it and take the emergency path.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        flow::boot(&env, &mut log, &mut crate::console::Terminal::default())
    }));
    let result = match result {
        Ok(result) => result,
        Err(_) => emergency(
            &mut Log::default(),
            "the boot flow failed unexpectedly (a bug: see the message above)",
        ),
    };
    let newroot = match result {
        Ok(_) => PathBuf::from(NEWROOT),
        Err(e @ BootError::Released(_)) => {
            log.say(e.to_string());
            PathBuf::from(SYSROOT)
        }
        Err(BootError::NoStore(store)) => {
            log.say(format!(
                "no store at {}: booting the root filesystem as it is, without layers",
                store.display()
            ));
            PathBuf::from(SYSROOT)
        }
        Err(e) => emergency(&mut log, &e.to_string()),
    };
    if newroot == Path::new(NEWROOT) {
        // Keep the real root reachable under the new one: the store and the upper live on it.
        let kept = fs::create_dir_all(KEPT_ROOT)
            .map_err(|e| e.to_string())
            .and_then(|()| mount_move(SYSROOT, KEPT_ROOT).map_err(|e| e.to_string()));
        if let Err(e) = kept {
            log.say(format!("could not keep the real root at {KEPT_ROOT}: {e}"));
        }
    }
    let init = params.init.clone().unwrap_or_else(|| "/sbin/init".into());
    let error = switch_root(&newroot, &init, &mut log);
    emergency(
        &mut log,
        &format!("switch_root into {} failed: {error}", newroot.display()),
    )
}

fn early_mounts() -> Result<(), String> {
    let none = MountFlags::empty();
    let nosuid = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    for (source, target, fstype, flags, data) in [
        ("proc", "/proc", "proc", nosuid, c""),
        ("sysfs", "/sys", "sysfs", nosuid, c""),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            c"mode=0755",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"mode=0755",
        ),
    ] {
        let _ = fs::create_dir_all(target);
        mount(source, target, fstype, flags | none, data)
            .map_err(|e| format!("mounting {target}: {e}"))?;
    }
    Ok(())
}

fn load_modules(log: &mut Log) {
    let Ok(list) = fs::read_to_string(format!("/{MODULES_LIST}")) else {
        return;
    };
    for file in list.lines().filter(|l| !l.is_empty()) {
        let path = format!("/{MODULES_DIR}/{file}");
        let loaded = rustix::fs::open(&path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .and_then(|fd| rustix::system::finit_module(&fd, c"", 0));
        match loaded {
            Ok(()) | Err(rustix::io::Errno::EXIST) => log.debug(format!("loaded {file}")),
            Err(e) => log.say(format!("could not load {file}: {e}")),
        }
    }
}

/// The device `root=` names: a path, `UUID=` or `LABEL=` (ext2/3/4 superblocks are read).
fn find_root_device(spec: &str) -> Option<PathBuf> {
    if let Some(path) = spec.strip_prefix("/dev/").map(|_| PathBuf::from(spec)) {
        return path.exists().then_some(path);
    }
    let (key, want) = spec.split_once('=')?;
    for entry in fs::read_dir("/sys/class/block").ok()?.flatten() {
        let dev = Path::new("/dev").join(entry.file_name());
        let Some((uuid, label)) = ext_identity(&dev) else {
            continue;
        };
        let matches = match key {
            "UUID" => uuid.eq_ignore_ascii_case(want),
            "LABEL" => label == want,
            _ => false,
        };
        if matches {
            return Some(dev);
        }
    }
    None
}

/// The UUID and label of an ext2/3/4 filesystem, from its superblock.
pub fn ext_identity(dev: &Path) -> Option<(String, String)> {
    let mut block = [0u8; 2048];
    fs::File::open(dev).ok()?.read_exact(&mut block).ok()?;
    parse_ext_superblock(&block)
}

/// The superblock starts at byte 1024: magic 0xEF53 at 0x38, UUID at 0x68, label at 0x78.
pub fn parse_ext_superblock(block: &[u8]) -> Option<(String, String)> {
    let sb = block.get(1024..2048)?;
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return None;
    }
    let u = &sb[0x68..0x78];
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let label = String::from_utf8_lossy(&sb[0x78..0x88])
        .trim_end_matches('\0')
        .to_owned();
    Some((uuid, label))
}

fn mount_root(params: &RootParams, log: &mut Log) -> Result<(), String> {
    let spec = params
        .root
        .as_deref()
        .ok_or("the kernel command line has no root=")?;
    let wait = params.wait.unwrap_or(ROOT_WAIT);
    let start = Instant::now();
    let device = loop {
        if let Some(device) = find_root_device(spec) {
            break device;
        }
        if start.elapsed() > wait {
            return Err(format!(
                "the root device {spec} did not appear within {} s",
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let fstypes: Vec<String> = match &params.fstype {
        Some(t) => vec![t.clone()],
        None => ["ext4", "btrfs", "xfs", "f2fs", "ext3", "ext2"]
            .map(str::to_owned)
            .to_vec(),
    };
    let data = CString::new(params.flags.clone().unwrap_or_default())
        .map_err(|_| "rootflags has a NUL byte")?;
    fs::create_dir_all(SYSROOT).map_err(|e| format!("creating {SYSROOT}: {e}"))?;
    let mut last = String::new();
    for fstype in &fstypes {
        // Read-write even with `ro`: the store, its state and the persistent upper live here,
        // and the real root is hidden under the overlay, so nothing later remounts it.
        match mount(
            &device,
            SYSROOT,
            fstype.as_str(),
            MountFlags::empty(),
            data.as_c_str(),
        ) {
            Ok(()) => {
                log.debug(format!(
                    "mounted {} ({fstype}) at {SYSROOT}",
                    device.display()
                ));
                return Ok(());
            }
            Err(rustix::io::Errno::ROFS | rustix::io::Errno::ACCESS) => {
                if mount(
                    &device,
                    SYSROOT,
                    fstype.as_str(),
                    MountFlags::RDONLY,
                    data.as_c_str(),
                )
                .is_ok()
                {
                    log.say("the root filesystem is read-only: changes go to a tmpfs upper");
                    return Ok(());
                }
            }
            Err(e) => last = format!("{fstype}: {e}"),
        }
    }
    Err(format!(
        "could not mount {} at {SYSROOT} ({last})",
        device.display()
    ))
}

/// Moves the early mounts into `newroot`, deletes the initramfs's files, makes `newroot` the
/// root and execs `init`. Returns only on failure.
fn switch_root(newroot: &Path, init: &str, log: &mut Log) -> String {
    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let target = newroot.join(dir.trim_start_matches('/'));
        let _ = fs::create_dir_all(&target);
        if let Err(e) = mount_move(dir, &target) {
            log.say(format!("moving {dir} into the new root: {e}"));
        }
    }
    // Free the initramfs's memory: delete its files, staying on its own filesystem.
    if let Ok(root) = rustix::fs::stat("/") {
        delete_tree(Path::new("/"), root.st_dev, newroot);
    }
    let steps = || -> rustix::io::Result<()> {
        rustix::process::chdir(newroot)?;
        mount_move(".", "/")?;
        rustix::process::chroot(".")?;
        rustix::process::chdir("/")
    };
    if let Err(e) = steps() {
        return format!("{e}");
    }
    log.say(format!("handing over to {init}"));
    let error = std::process::Command::new(init).exec();
    format!("executing {init}: {error}")
}

fn delete_tree(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == keep {
            continue;
        }
        let Ok(st) = rustix::fs::lstat(&path) else {
            continue;
        };
        if st.st_dev != dev {
            continue; // another filesystem mounted here: not ours to delete
        }
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
            delete_tree(&path, dev, keep);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Says what went wrong, then opens a shell when the image has one, else reboots after a pause.
fn emergency(log: &mut Log, message: &str) -> ! {
    log.say(format!("cannot boot: {message}"));
    if Path::new("/bin/sh").exists() {
        log.say("starting an emergency shell; leave it to reboot");
        let _ = std::process::Command::new("/bin/sh").status();
    } else {
        log.say("no emergency shell in this image; rebooting in 10 seconds");
        std::thread::sleep(Duration::from_secs(10));
    }
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_parameters() {
        let p = RootParams::parse(
            "BOOT_IMAGE=/vmlinuz root=UUID=abcd rootfstype=ext4 rootflags=noatime init=/bin/sh rootdelay=5 ro -- init=/not",
        );
        assert_eq!(
            p,
            RootParams {
                root: Some("UUID=abcd".into()),
                fstype: Some("ext4".into()),
                flags: Some("noatime".into()),
                init: Some("/bin/sh".into()),
                wait: Some(Duration::from_secs(5)),
            }
        );
    }

    #[test]
    fn ext_superblocks_give_uuid_and_label() {
        let mut block = vec![0u8; 2048];
        block[1024 + 0x38] = 0x53;
        block[1024 + 0x39] = 0xef;
        block[1024 + 0x68..1024 + 0x78].copy_from_slice(&[
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8,
        ]);
        block[1024 + 0x78..1024 + 0x7e].copy_from_slice(b"strata");
        assert_eq!(
            parse_ext_superblock(&block),
            Some((
                "12345678-9abc-def0-0102-030405060708".into(),
                "strata".into()
            ))
        );
        block[1024 + 0x38] = 0;
        assert_eq!(parse_ext_superblock(&block), None);
    }
}
