//! Freezing a persistent upper into a read-only layer (`overlayctl checkpoint`), before anything
//! is mounted: the upper's data directory is renamed into `layers/` (one rename on one
//! filesystem), cleaned into a plain lower layer, put on top of the plan, and a fresh upper
//! takes its place. Each step can be redone, so a boot cut short anywhere finishes it next time.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use layers_spec::store as spec_store;
use layers_spec::{BootState, Plan};
use rustix::fs::{CWD, FileType, Mode};

use crate::flow::{Log, remove_entry};

/// The overlay xattrs a lower layer uses; every other `trusted.overlay.*` in an upper is the
/// kernel's bookkeeping for that upper (origin, impure, uuid, …) and means nothing below it.
const KEPT_OVERLAY_XATTRS: &[&str] = &["opaque", "whiteout"];
const OVERLAY_PREFIX: &str = "trusted.overlay.";
/// What a whiteout is rewritten through: made beside it, then renamed over it, so a crash
/// never leaves the path without its whiteout. One left by a crash is removed by the next pass.
const WHITEOUT_TEMP: &str = ".strata-freeze-whiteout";
/// An upper mounted with these is not a plain layer and cannot be one (FACTS): it says so.
const UNUSABLE_XATTRS: &[&str] = &["redirect", "metacopy"];

/// What cleaning an upper changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    pub whiteouts: u64,
    pub xattrs: u64,
    /// Entries with a redirect or metacopy xattr (the layer still works in this stack's
    /// overlay; `overlayctl` refuses to read it).
    pub unusable: Vec<String>,
}

/// Freezes the upper a pending `[checkpoint]` names; afterwards the record says `frozen` until
/// `overlayctl` writes the layer's manifest.
pub fn freeze_checkpoint(store: &Path, plan: &mut Plan, state: &mut BootState, log: &mut Log) {
    let Some(checkpoint) = state.checkpoint.clone().filter(|c| !c.frozen) else {
        return;
    };
    let layer_dir = store.join("layers").join(&checkpoint.layer);
    let upper_dir = store.join("uppers").join(&checkpoint.upper);
    if plan.layer(&checkpoint.layer).is_none() {
        if !layer_dir.exists()
            && let Err(e) = fs::rename(upper_dir.join("data"), &layer_dir)
        {
            log.say(format!(
                "the checkpoint of upper {} cannot be made ({e}); it is dropped",
                checkpoint.upper
            ));
            state.checkpoint = None;
            return;
        }
        layers_spec::fault::point("checkpoint-renamed");
        match clean_upper(&layer_dir) {
            Ok(cleaned) => {
                log.debug(format!(
                    "checkpoint {}: {} whiteouts rewritten, {} overlay xattrs removed",
                    checkpoint.layer, cleaned.whiteouts, cleaned.xattrs
                ));
                if !cleaned.unusable.is_empty() {
                    log.say(format!(
                        "checkpoint {}: {} has overlay redirects or metacopy; overlayctl cannot read this layer",
                        checkpoint.layer,
                        cleaned.unusable.join(", ")
                    ));
                }
            }
            // Half-cleaned is still a working lower layer; the next boot tries again first.
            Err(e) => {
                log.say(format!(
                    "the checkpoint {} cannot be cleaned ({e}); trying again at the next boot",
                    checkpoint.layer
                ));
                return;
            }
        }
        // The renames and rewrites reach the disk before the plan names the layer.
        if let Ok(dir) = fs::File::open(&layer_dir) {
            let _ = rustix::fs::syncfs(&dir);
        }
        let mut layer = layers_spec::Layer::new(checkpoint.layer.clone());
        layer.title = checkpoint.title.clone();
        layer.parent = checkpoint
            .parent
            .clone()
            .filter(|p| plan.layer(p).is_some())
            .or_else(|| plan.layers.first().map(|l| l.name.clone()));
        layer.notes = Some(format!("checkpoint of upper {}", checkpoint.upper));
        plan.layers.insert(0, layer);
        if let Err(e) = spec_store::save_plan(store, plan) {
            log.say(format!("the checkpoint's plan cannot be written ({e})"));
            plan.layers.remove(0);
            return;
        }
        layers_spec::fault::point("checkpoint-planned");
    }
    // A fresh upper: the first free number, never the frozen one's (its directory may be
    // gone already when this is redone).
    let fresh = first_free_upper(store, &checkpoint.upper);
    log.say(format!(
        "froze upper {} into layer {}; a fresh upper {fresh} starts",
        checkpoint.upper, checkpoint.layer
    ));
    let _ = remove_entry(&upper_dir);
    layers_spec::fault::point("checkpoint-upper-removed");
    state.current_upper = Some(fresh);
    state.checkpoint = Some(layers_spec::Checkpoint {
        frozen: true,
        ..checkpoint
    });
}

/// The lowest upper number not taken in `uppers/`, other than `except`.
pub fn first_free_upper(store: &Path, except: &str) -> String {
    (1..)
        .map(|n: u32| n.to_string())
        .find(|id| id != except && !store.join("uppers").join(id).exists())
        .expect("some number is free")
}

/// Makes a frozen upper a plain lower layer, in place (FACTS): each whiteout its own 0/0
/// device (overlayfs links them all to one inode in `work/`), and no overlay xattrs but
/// `opaque` and `whiteout`. Never follows a symlink; running it again changes nothing more.
pub fn clean_upper(root: &Path) -> io::Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    clean_entry(root, root, &mut cleaned)?;
    Ok(cleaned)
}

fn clean_entry(root: &Path, path: &Path, cleaned: &mut Cleaned) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    strip_xattrs(root, path, cleaned)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let temp = path.join(WHITEOUT_TEMP);
    if fs::symlink_metadata(&temp).is_ok_and(|m| is_whiteout(&m)) {
        fs::remove_file(&temp)?;
    }
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let child = entry.path();
        let child_meta = fs::symlink_metadata(&child)?;
        if is_whiteout(&child_meta) {
            if std::os::unix::fs::MetadataExt::nlink(&child_meta) > 1 {
                rustix::fs::mknodat(CWD, &temp, FileType::CharacterDevice, Mode::empty(), 0)?;
                layers_spec::fault::point("checkpoint-whiteout");
                fs::rename(&temp, &child)?;
                cleaned.whiteouts += 1;
            }
            continue;
        }
        clean_entry(root, &child, cleaned)?;
    }
    Ok(())
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn strip_xattrs(root: &Path, path: &Path, cleaned: &mut Cleaned) -> io::Result<()> {
    // The largest list the kernel returns (XATTR_LIST_MAX).
    let mut names = vec![0u8; 65536];
    let len = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(len) => len,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Some(attr) = name.strip_prefix(OVERLAY_PREFIX.as_bytes()) else {
            continue;
        };
        let attr = String::from_utf8_lossy(attr);
        if KEPT_OVERLAY_XATTRS.contains(&attr.as_ref()) {
            continue;
        }
        if UNUSABLE_XATTRS.contains(&attr.as_ref()) {
            let rel = path.strip_prefix(root).unwrap_or(path);
            cleaned.unusable.push(format!("/{}", rel.display()));
            continue;
        }
        rustix::fs::lremovexattr(path, OsStr::from_bytes(name))?;
        cleaned.xattrs += 1;
    }
    Ok(())
}
