//! The boot kernel on the real root (docs/kernels.md): `/boot/strata/V/{vmlinuz,initrd.img}`
//! and the link `/boot/strata/default -> V` follow the next boot's default stack, so the
//! bootloader starts that stack's kernel and only a boot that mounts another stack restarts
//! into its own (the hook's kexec). Nothing happens unless `/boot/strata/` exists.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

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

/// Makes `kernel` the one `dir/default` names: copied into `dir/V/` unless there already, the
/// link moved, the one before kept as `previous`, and Strata's other versions removed. True
/// when it was copied.
pub fn install(dir: &Path, kernel: &StackKernel) -> Result<bool> {
    let target = dir.join(&kernel.version);
    let mut copied = false;
    if !target.join(MADE_BY_STRATA).exists() {
        if target.exists() {
            bail!(
                "{} exists and was not made by Strata; the boot kernel stays as it was",
                target.display()
            );
        }
        let scratch = dir.join(format!(".{}.{}", kernel.version, std::process::id()));
        let made = make_version_dir(&scratch, kernel).and_then(|()| {
            fs::rename(&scratch, &target)
                .with_context(|| format!("renaming {} into place", target.display()))
        });
        if made.is_err() {
            let _ = fs::remove_dir_all(&scratch);
        }
        made?;
        copied = true;
    }
    let link = dir.join(DEFAULT_LINK);
    let old = fs::read_link(&link).ok();
    if old.as_deref() != Some(Path::new(&kernel.version)) {
        point(dir, DEFAULT_LINK, &kernel.version)?;
        if let Some(old) = old.as_ref().and_then(|o| o.to_str()) {
            point(dir, PREVIOUS_LINK, old)?;
        }
    }
    sync_dir(dir)?;
    remove_unused(dir)?;
    Ok(copied)
}

/// Copies the kernel and its initramfs into a new directory, flushed, marked as Strata's.
fn make_version_dir(scratch: &Path, kernel: &StackKernel) -> Result<()> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    copy_synced(&kernel.vmlinuz, &scratch.join("vmlinuz"))?;
    copy_synced(&kernel.initrd, &scratch.join("initrd.img"))?;
    fs::write(scratch.join(MADE_BY_STRATA), "")?;
    sync_dir(scratch)
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
        if ours && !name.starts_with('.') && !kept.iter().any(|k| k == Path::new(name)) {
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

/// The kernel of the stack of `layers` (top first), by the hook's rule (docs/kernels.md).
pub fn stack_kernel(layers: &[PathBuf]) -> Option<StackKernel> {
    let names: Vec<String> = layers
        .iter()
        .filter_map(|layer| fs::read_dir(layer.join("boot")).ok())
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    layers_store::kernel::stack_kernel(|rel| lookup(layers, rel), names)
}

/// The file `rel` of the merged stack of `layers` (top first), as overlayfs shows it: the
/// topmost layer that has it, unless a whiteout, a non-directory on the way or an opaque
/// directory above hides the layers below. None when the stack has no such entry.
pub fn lookup(layers: &[PathBuf], rel: &Path) -> Option<PathBuf> {
    for layer in layers {
        let mut hidden_below = false;
        let mut dir = layer.clone();
        for (i, part) in rel.iter().enumerate() {
            dir.push(part);
            let meta = match fs::symlink_metadata(&dir) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(_) => return None,
            };
            let last = i + 1 == rel.iter().count();
            if is_whiteout(&meta) {
                return None;
            }
            if last {
                return Some(dir);
            }
            if !meta.is_dir() {
                // A file where the path needs a directory hides the path below.
                return None;
            }
            hidden_below |= is_opaque(&dir);
        }
        if hidden_below {
            return None;
        }
    }
    None
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| xattr::get(dir, name).ok().flatten().as_deref() == Some(b"y"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_follows_overlay_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, bottom) = (tmp.path().join("top"), tmp.path().join("bottom"));
        for (layer, file) in [(&bottom, "boot/a"), (&bottom, "boot/b"), (&top, "boot/c")] {
            fs::create_dir_all(layer.join(file).parent().unwrap()).unwrap();
            fs::write(layer.join(file), file).unwrap();
        }
        let layers = [top.clone(), bottom.clone()];
        assert_eq!(
            lookup(&layers, Path::new("boot/a")),
            Some(bottom.join("boot/a"))
        );
        assert_eq!(
            lookup(&layers, Path::new("boot/c")),
            Some(top.join("boot/c"))
        );
        assert_eq!(lookup(&layers, Path::new("boot/none")), None);
        // A file named boot in the top layer hides the directory below.
        let shadow = [tmp.path().join("shadow"), bottom.clone()];
        fs::create_dir_all(&shadow[0]).unwrap();
        fs::write(shadow[0].join("boot"), "x").unwrap();
        assert_eq!(lookup(&shadow, Path::new("boot/a")), None);
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
