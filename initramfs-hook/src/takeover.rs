//! `initramfs-hook take-root`: the whole of the initramfs-tools and dracut glue. Another
//! initramfs has mounted the real root; this puts the layered root in its place, with no tool
//! but this program (a klibc-only initramfs has no `sed`, and its `mount` cannot remount).
//!
//! When the real root holds no store, nothing changes. Else the real root moves to
//! `/run/strata/root` (where it stays reachable under the new root), is made writable (the store,
//! its state and the upper are written), and the boot flow mounts the stack where the real root
//! was. When no stack can be mounted the real root goes back where it was, as it is: the machine
//! boots without layers rather than not at all.

use std::fs;
use std::path::{Path, PathBuf};

use layers_spec::BootOverrides;
use layers_store::layout::DEFAULT_STORE;
use rustix::fs::StatVfsMountFlags;
use rustix::mount::{MountFlags, MountPropagationFlags, mount_change, mount_move, mount_remount};

use crate::console::Console;
use crate::flow::{self, BootEnv, Log};

/// Where things are.
#[derive(Debug, Clone)]
pub struct Places {
    /// Where the next stage expects the root (initramfs-tools' `${rootmnt}`, dracut's
    /// `$NEWROOT`).
    pub root: PathBuf,
    /// Where the real root is mounted, when it is not at `root` (dracut's own mount of it).
    pub real: Option<PathBuf>,
    /// The directory that becomes the new root's `/run`.
    pub run: PathBuf,
    pub cmdline: String,
}

/// What happened, in words for the console.
#[derive(Debug, PartialEq, Eq)]
pub enum TookRoot {
    /// The stack is mounted at the root.
    Layered,
    /// The real root is at the root as it is: it has no store, or no stack could be mounted.
    Plain(String),
    /// An earlier call this boot did it (a boot record exists).
    Already(PathBuf),
}

/// Puts the layered root at `places.root`. Never leaves the root empty: any failure ends with
/// the real root there.
pub fn take_root(places: &Places, log: &mut Log, console: &mut dyn Console) -> TookRoot {
    let run = places.run.join(layers_store::layout::RUN_SUBDIR);
    let booted = run.join(layers_store::layout::BOOTED_FILE);
    if booted.exists() {
        return TookRoot::Already(booted);
    }
    let kept = run.join("root");
    // Once a boot: a second call (systemd's fallback unit after the console unit, say) must not
    // run the flow again (trial tries would count twice), only finish what a first call that
    // was killed halfway left: the real root set aside and nothing at the root.
    let started = run.join(STARTED_FILE);
    let _ = fs::create_dir_all(&run);
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&started)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if is_mount_point(&kept) && !is_mount_point(&places.root) {
                match mount_move(&kept, &places.root) {
                    Ok(()) => log.say(format!(
                        "an earlier call this boot stopped halfway; the real root is back at {}",
                        places.root.display()
                    )),
                    Err(e) => log.say(format!(
                        "an earlier call this boot stopped halfway, and the real root could not go back to {}: {e}",
                        places.root.display()
                    )),
                }
            }
            return TookRoot::Already(started);
        }
        // /run not writable: no second call can be told apart; go on.
        Err(_) => {}
    }
    // Keys and a hangup on the console the menu owns must not stop the boot halfway (the menu
    // reads Ctrl-C as Esc); the shell it opens gets them back.
    block_terminal_signals();
    let (overrides, _) = BootOverrides::parse(&places.cmdline);
    let store = overrides.store.as_deref().unwrap_or(DEFAULT_STORE);
    let real = places.real.clone().unwrap_or_else(|| places.root.clone());
    if !has_store(&real, store) {
        // Where dracut mounted the real root aside, it still has to reach the root.
        if let Some(real) = &places.real
            && let Err(e) = mount_move(real, &places.root)
        {
            log.say(format!(
                "could not move {} to {}: {e}",
                real.display(),
                places.root.display()
            ));
        }
        return TookRoot::Plain(format!(
            "no store at {store} on the real root; it boots as it is"
        ));
    }
    if let Err(e) = set_aside(&real, &kept) {
        log.say(format!(
            "could not move the real root from {} to {}: {e}; it boots as it is",
            real.display(),
            kept.display()
        ));
        return TookRoot::Plain(e);
    }
    if let Err(e) = make_writable(&kept) {
        log.say(format!(
            "the real root stays read-only ({e}): the boot state cannot be saved"
        ));
    }
    let env = BootEnv {
        sysroot: kept.clone(),
        newroot: places.root.clone(),
        run: places.run.clone(),
        cmdline: places.cmdline.clone(),
        may_restart: in_initramfs(),
    };
    // A panic in the flow must not leave the initramfs without a root: it counts as a failure,
    // and the real root goes back.
    let booted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        flow::boot(&env, log, console)
    }));
    let failed = match booted {
        Ok(Ok(_)) => return TookRoot::Layered,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the boot flow stopped on a bug (a panic)".to_owned(),
    };
    log.say(format!(
        "no layered root could be mounted ({failed}); booting the real root as it is"
    ));
    if let Err(e) = mount_move(&kept, &places.root) {
        log.say(format!(
            "could not put the real root back at {}: {e}",
            places.root.display()
        ));
    }
    TookRoot::Plain(failed)
}

/// Marks the first call this boot, in `/run/strata`.
const STARTED_FILE: &str = "take-root.started";

/// Blocks the signals a terminal sends (interrupt, quit, stop, hangup) for the rest of the
/// boot: blocked, not ignored, so what the menu spawns (its shell) starts without the mask.
fn block_terminal_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let signals = [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTSTP,
        Signal::SIGHUP,
    ];
    let _ = signals.into_iter().collect::<SigSet>().thread_block();
}

/// Whether `path` is the root of a mount.
fn is_mount_point(path: &Path) -> bool {
    rustix::fs::statx(
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        rustix::fs::StatxFlags::BASIC_STATS,
    )
    .is_ok_and(|st| {
        st.stx_attributes_mask
            .contains(rustix::fs::StatxAttributes::MOUNT_ROOT)
            && st
                .stx_attributes
                .contains(rustix::fs::StatxAttributes::MOUNT_ROOT)
    })
}

/// Whether `real` holds a store at `store` (a path on the real root; a symlink on the way
/// resolves inside it).
fn has_store(real: &Path, store: &str) -> bool {
    layers_store::Store::open_in_root(real, Path::new(store)).is_ok()
}

/// Moves the mount at `from` to `to`. Under systemd the mounts are shared, and a mount under a
/// shared mount cannot be moved: everything is made private first (systemd shares the new root
/// again after switching to it).
fn set_aside(from: &Path, to: &Path) -> Result<(), String> {
    if from == to {
        return Ok(());
    }
    fs::create_dir_all(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| format!("making the mounts private: {e}"))?;
    mount_move(from, to).map_err(|e| format!("moving the mount: {e}"))
}

/// Remounts `dir` read-write, keeping its other mount flags.
fn make_writable(dir: &Path) -> Result<(), String> {
    let stat = rustix::fs::statvfs(dir).map_err(|e| e.to_string())?;
    if !stat.f_flag.contains(StatVfsMountFlags::RDONLY) {
        return Ok(());
    }
    let kept = [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ];
    let flags = kept
        .iter()
        .filter(|(on, _)| stat.f_flag.contains(*on))
        .fold(MountFlags::empty(), |all, (_, flag)| all | *flag);
    mount_remount(dir, flags, "").map_err(|e| e.to_string())
}

/// Whether this runs in an initramfs (`/` is the kernel's rootfs, a ramfs or tmpfs), the only
/// place a restart into another kernel is the boot's to make.
fn in_initramfs() -> bool {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    rustix::fs::statfs("/").is_ok_and(|s| s.f_type == RAMFS_MAGIC || s.f_type == TMPFS_MAGIC)
        && Path::new("/init").exists()
}
