//! The boot kernel on the real root (docs/kernels.md): `/boot/strata/V/{vmlinuz,initrd.img}`
//! and the link `/boot/strata/default -> V` follow the next boot's default stack, so the
//! bootloader starts that stack's kernel and only a boot that mounts another stack restarts
//! into its own (the hook's kexec). Nothing happens unless `/boot/strata/` exists.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use layers_spec::{BootState, Plan};

use layers_store::kernel::StackKernel;

use crate::store::Store;

/// The link the bootloader's entry follows.
pub const DEFAULT_LINK: &str = "default";
/// The kernel the default link named before, for a bootloader's fallback entry.
pub const PREVIOUS_LINK: &str = "previous";
/// Marks a version directory as Strata's (only those are ever deleted).
const MADE_BY_STRATA: &str = ".made-by-strata";

/// `/boot/strata` on the real root of `store`, when it exists as a real directory: beside the
/// store when it is not booted, or under the running system's kept real root.
pub fn boot_dir(store: &Store) -> Option<PathBuf> {
    let run_dir = crate::store::booted_record_path()
        .parent()
        .map(Path::to_owned)?;
    let real_root = if store.root == Path::new(crate::BOOTED_STORE)
        || store.root == run_dir.join(layers_store::layout::STORE_BIND)
    {
        run_dir.join(layers_store::layout::REAL_ROOT)
    } else {
        store.root.parent()?.to_owned()
    };
    let dir = real_root.join("boot/strata");
    fs::symlink_metadata(&dir)
        .is_ok_and(|m| m.is_dir())
        .then_some(dir)
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Synced {
    /// The kernel the next boot starts.
    pub version: String,
    /// Whether it was copied now (else it was there already).
    pub copied: bool,
}

/// Puts the kernel of the next boot's stack where the bootloader starts it. None when the store
/// has no boot directory or the stack has no kernel.
pub fn sync(store: &Store, plan: &Plan, state: &BootState) -> Result<Option<Synced>> {
    let Some(dir) = boot_dir(store) else {
        return Ok(None);
    };
    let stack = crate::status::next_boot(store, plan, state).stack;
    let layers: Vec<PathBuf> = stack.iter().map(|n| store.layer_dir(n)).collect();
    let Some(kernel) = stack_kernel(&layers) else {
        return Ok(None);
    };
    let copied = install(&dir, &kernel)?;
    Ok(Some(Synced {
        version: kernel.version,
        copied,
    }))
}

/// Makes `kernel` the one `dir/default` names: copied into `dir/V/` unless the same files are
/// there already (an initramfs rebuilt for the same version is copied again), the link moved,
/// the one before kept as `previous`, and Strata's other versions removed. True when it was
/// copied. Refused, with the boot kernel left as it was, when the files are not regular files
/// or the initramfs lacks Strata's hook (it would boot the real root as it is).
pub fn install(dir: &Path, kernel: &StackKernel) -> Result<bool> {
    let version = &kernel.version;
    if [DEFAULT_LINK, PREVIOUS_LINK].contains(&version.as_str())
        || version.starts_with('.')
        || version.contains('/')
    {
        bail!(
            "kernel version {version:?} cannot name a boot kernel directory; the boot kernel stays as it was"
        );
    }
    let stamp = source_stamp(kernel)?;
    let target = dir.join(version);
    let mut copied = false;
    let made_by_strata = target.join(MADE_BY_STRATA);
    if fs::read_to_string(&made_by_strata).ok().as_deref() != Some(stamp.as_str()) {
        if target.exists() && !made_by_strata.exists() {
            bail!(
                "{} exists and was not made by Strata; the boot kernel stays as it was",
                target.display()
            );
        }
        check_initramfs_has_hook(&kernel.initrd)?;
        let scratch = dir.join(format!(".{version}.{}", std::process::id()));
        let made = make_version_dir(&scratch, kernel, &stamp).and_then(|()| {
            if target.exists() {
                // The same version with other files: swapped in at once, the old one removed.
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &scratch,
                    rustix::fs::CWD,
                    &target,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .with_context(|| format!("swapping {} into place", target.display()))?;
                fs::remove_dir_all(&scratch)
                    .with_context(|| format!("removing {}", scratch.display()))
            } else {
                fs::rename(&scratch, &target)
                    .with_context(|| format!("renaming {} into place", target.display()))
            }
        });
        if made.is_err() {
            let _ = fs::remove_dir_all(&scratch);
        }
        made?;
        copied = true;
    }
    let link = dir.join(DEFAULT_LINK);
    let old = fs::read_link(&link).ok();
    if old.as_deref() != Some(Path::new(version)) {
        point(dir, DEFAULT_LINK, version)?;
        if let Some(old) = old.as_ref().and_then(|o| o.to_str()) {
            point(dir, PREVIOUS_LINK, old)?;
        }
    }
    sync_dir(dir)?;
    remove_unused(dir)?;
    Ok(copied)
}

/// What the kernel's two files are (size and modification time each), recorded in the
/// directory made from them: a rebuilt initramfs differs. Both must be regular files (a
/// symlink would be followed out of the stack).
fn source_stamp(kernel: &StackKernel) -> Result<String> {
    let mut stamp = String::new();
    for (name, file) in [("vmlinuz", &kernel.vmlinuz), ("initrd.img", &kernel.initrd)] {
        let meta =
            fs::symlink_metadata(file).with_context(|| format!("reading {}", file.display()))?;
        if !meta.is_file() {
            bail!(
                "{} is not a regular file; the boot kernel stays as it was",
                file.display()
            );
        }
        stamp.push_str(&format!(
            "{name} {} {}.{:09}\n",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        ));
    }
    Ok(stamp)
}

/// Copies the kernel and its initramfs into a new directory, flushed, marked as Strata's with
/// the files' stamp.
fn make_version_dir(scratch: &Path, kernel: &StackKernel, stamp: &str) -> Result<()> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    copy_synced(&kernel.vmlinuz, &scratch.join("vmlinuz"))?;
    copy_synced(&kernel.initrd, &scratch.join("initrd.img"))?;
    fs::write(scratch.join(MADE_BY_STRATA), stamp)?;
    fs::File::open(scratch.join(MADE_BY_STRATA))?.sync_all()?;
    sync_dir(scratch)
}

/// An initramfs without the hook would boot the real root as it is (an adopted one holds no
/// system): refused. Listed with initramfs-tools' `lsinitramfs` or dracut's `lsinitrd`,
/// whichever is installed; with neither, the package's trigger is trusted to have put it there.
pub fn check_initramfs_has_hook(initrd: &Path) -> Result<()> {
    let Some((lister, listed)) = ["lsinitramfs", "lsinitrd"]
        .into_iter()
        .find_map(|lister| Some((lister, Command::new(lister).arg(initrd).output().ok()?)))
    else {
        return Ok(());
    };
    if !listed.status.success() {
        bail!(
            "{lister} {}: {}",
            initrd.display(),
            String::from_utf8_lossy(&listed.stderr).trim()
        );
    }
    let listed = String::from_utf8_lossy(&listed.stdout);
    if !listed.lines().any(|l| l.ends_with("initramfs-hook")) {
        let rebuild = if lister == "lsinitrd" {
            "dracut --force --regenerate-all"
        } else {
            "update-initramfs -u -k all"
        };
        bail!(
            "{} does not hold Strata's hook, so it would boot the real root as it is; the boot kernel stays as it was (rebuild it: `{rebuild}`, in `overlayctl run` on a store)",
            initrd.display()
        );
    }
    Ok(())
}

/// Points the link `name` in `dir` at `version`: a new link renamed over the old one.
fn point(dir: &Path, name: &str, version: &str) -> Result<()> {
    let link = dir.join(name);
    let new_link = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_file(&new_link);
    std::os::unix::fs::symlink(version, &new_link)?;
    fs::rename(&new_link, &link)
        .with_context(|| format!("pointing {} at {version}", link.display()))
}

/// Deletes the version directories Strata made that neither link names.
fn remove_unused(dir: &Path) -> Result<()> {
    let kept: Vec<PathBuf> = [DEFAULT_LINK, PREVIOUS_LINK]
        .iter()
        .filter_map(|l| fs::read_link(dir.join(l)).ok())
        .collect();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let ours = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir())
            && path.join(MADE_BY_STRATA).exists();
        // (A dot name is a copy a cut interrupted, or the old one of a swap.)
        if ours && !kept.iter().any(|k| k == Path::new(name)) {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .and_then(|_| fs::File::open(to)?.sync_all())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

pub use layers_store::kernel::layers_kernel as stack_kernel;

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzipped cpio archive at `path` holding `names` (as initramfs-tools makes one).
    fn initrd(path: &Path, names: &[&str]) {
        let work = tempfile::tempdir().unwrap();
        for name in names {
            fs::create_dir_all(work.path().join(name).parent().unwrap()).unwrap();
            fs::write(work.path().join(name), name).unwrap();
        }
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && printf '%s\\n' {} | cpio -o -H newc --quiet | gzip > {}",
                work.path().display(),
                names.join(" "),
                path.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn install_copies_again_what_changed_and_refuses_what_would_not_boot() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, src) = (tmp.path().join("boot-strata"), tmp.path().join("src"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&src).unwrap();
        let kernel = |version: &str| StackKernel {
            version: version.into(),
            vmlinuz: src.join(format!("vmlinuz-{version}")),
            initrd: src.join(format!("initrd.img-{version}")),
        };
        fs::write(src.join("vmlinuz-1"), "kernel 1").unwrap();
        initrd(&src.join("initrd.img-1"), &["usr/sbin/initramfs-hook"]);
        assert!(install(&dir, &kernel("1")).unwrap());
        assert_eq!(fs::read_link(dir.join("default")).unwrap(), Path::new("1"));
        assert!(!install(&dir, &kernel("1")).unwrap(), "the same files");

        // The initramfs rebuilt for the same version (a new hook, say): copied again.
        initrd(
            &src.join("initrd.img-1"),
            &["usr/sbin/initramfs-hook", "etc/crypttab"],
        );
        assert!(install(&dir, &kernel("1")).unwrap());
        assert_eq!(
            fs::read(dir.join("1/initrd.img")).unwrap(),
            fs::read(src.join("initrd.img-1")).unwrap()
        );
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left.len(),
            2,
            "1 and default, no swapped-out copy: {left:?}"
        );

        // An initramfs without the hook, a symlinked kernel, a version named like a link: each
        // refused, the boot kernel as it was.
        fs::write(src.join("vmlinuz-2"), "kernel 2").unwrap();
        initrd(&src.join("initrd.img-2"), &["usr/sbin/other"]);
        let err = install(&dir, &kernel("2")).unwrap_err().to_string();
        assert!(err.contains("does not hold Strata's hook"), "{err}");
        fs::write(src.join("elsewhere"), "secret").unwrap();
        fs::remove_file(src.join("vmlinuz-2")).unwrap();
        std::os::unix::fs::symlink(src.join("elsewhere"), src.join("vmlinuz-2")).unwrap();
        initrd(&src.join("initrd.img-2"), &["usr/sbin/initramfs-hook"]);
        let err = install(&dir, &kernel("2")).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        fs::write(src.join("vmlinuz-previous"), "kernel").unwrap();
        fs::copy(src.join("initrd.img-2"), src.join("initrd.img-previous")).unwrap();
        let err = install(&dir, &kernel("previous")).unwrap_err().to_string();
        assert!(err.contains("cannot name"), "{err}");
        assert_eq!(fs::read_link(dir.join("default")).unwrap(), Path::new("1"));
        assert!(!dir.join("2").exists() && !dir.join("previous").exists());
    }
}

/// What `switch` loads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Switch {
    /// The next boot's stack, top first.
    pub stack: Vec<String>,
    /// Its kernel.
    pub kernel: String,
}

/// Loads the next boot's kernel for kexec, with this boot's command line (less any
/// `strata.stack=`, so the next boot chooses as a cold one would): `overlayctl switch`, which
/// then asks systemd for the kexec, skipping the firmware and the bootloader.
pub fn load_next_boot(store: &Store, plan: &Plan, state: &BootState, load: bool) -> Result<Switch> {
    let stack = crate::status::next_boot(store, plan, state).stack;
    let layers: Vec<PathBuf> = stack.iter().map(|n| store.layer_dir(n)).collect();
    let kernel = stack_kernel(&layers).ok_or_else(|| {
        anyhow::anyhow!(
            "the next boot's stack ({}) has no kernel of its own (/boot/vmlinuz-V with its initrd.img-V); restart the machine instead",
            stack.join(", ")
        )
    })?;
    if load {
        let cmdline = fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
        let cmdline = layers_store::kernel::carried_cmdline(cmdline.trim(), None);
        layers_store::kernel::load_for_kexec(&kernel, &cmdline).map_err(anyhow::Error::msg)?;
    }
    Ok(Switch {
        stack,
        kernel: kernel.version,
    })
}
