//! Freezing a persistent upper into a read-only layer (`overlayctl checkpoint`), before anything
//! is mounted: the upper's data directory is renamed into `layers/` (one rename on one
//! filesystem), cleaned into a plain lower layer, put on top of the plan, and a fresh upper
//! takes its place. Each step can be redone, so a boot cut short anywhere finishes it next time.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use layers_spec::{BootState, Checkpoint, Layer, LayerState, Plan};
use layers_store::Store;
use layers_store::layout::{Folder, UPPER_DATA};
use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, mknodat, renameat, statat, unlinkat};

use crate::log::Log;

/// The overlay xattrs a lower layer uses; every other `trusted.overlay.*` in an upper is the
/// kernel's bookkeeping for that upper (origin, impure, uuid, …) and means nothing below it.
const KEPT_OVERLAY_XATTRS: &[&str] = &["opaque", "whiteout"];
const OVERLAY_PREFIX: &str = "trusted.overlay.";
/// What a whiteout is rewritten through: made beside it, then renamed over it, so a crash
/// never leaves the path without its whiteout. One left by a crash is removed by the next pass.
const WHITEOUT_TEMP: &str = ".strata-freeze-whiteout";
/// An upper mounted with these is not a plain layer and cannot be one (docs/overlayfs.md): it says so.
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
/// `overlayctl` writes the layer's manifest. The upper's data is never lost: what fails after
/// the rename is undone (the upper boots as before and the next boot tries again), and the
/// upper is only removed once its data is the layer the plan names.
pub fn freeze_checkpoint(store: &Store, plan: &mut Plan, state: &mut BootState, log: &mut Log) {
    let Some(checkpoint) = state.checkpoint.clone().filter(|c| !c.frozen) else {
        return;
    };
    let name = checkpoint.layer.as_str();
    // Each a real directory of the store, or the checkpoint waits (nothing is moved through a
    // symlink).
    let (layers, uppers) = match (store.folder(Folder::Layers), store.folder(Folder::Uppers)) {
        (Ok(layers), Ok(uppers)) => (layers, uppers),
        (Err(e), _) | (_, Err(e)) => {
            log.say(format!("the checkpoint {name} waits: {e}"));
            return;
        }
    };
    let upper = uppers.sub(&checkpoint.upper).ok();
    let layer_dir = layers.child_path(name);
    let data = uppers.child_path(&checkpoint.upper).join(UPPER_DATA);
    let data_there = upper.as_ref().is_some_and(|u| u.has_dir(UPPER_DATA));
    let layer_there = layers.kind(name).ok().flatten().is_some();
    if layer_there && !layers.has_dir(name) {
        // Not what a freeze makes (a symlink, a file, a mount): never worked through.
        log.say(format!(
            "the checkpoint {name} waits: {} is not a real directory of the store; move it aside",
            layer_dir.display()
        ));
        return;
    }
    if data_there && plan.layer(name).is_some() {
        // Only a hand edit can put that name in the plan meanwhile: the upper is left alone.
        log.say(format!(
            "the checkpoint {name} cannot be made: the plan has a layer of that name; upper {} stays in use",
            checkpoint.upper
        ));
        state.checkpoint = None;
        return;
    }
    if data_there && state.current_upper.as_deref() != Some(checkpoint.upper.as_str()) {
        log.say(format!(
            "the checkpoint {name} is dropped: upper {} is no longer the current upper",
            checkpoint.upper
        ));
        state.checkpoint = None;
        return;
    }
    if data_there && layer_there {
        // A freeze cut short whose move back failed, then a boot that made the upper again:
        // data in both. Both are kept (the record keeps the layer from orphan cleaning).
        log.say(format!(
            "the checkpoint {name} waits: both {} and {} exist; move one aside",
            data.display(),
            layer_dir.display()
        ));
        return;
    }
    if plan.layer(name).is_none() {
        if !data_there && !layer_there {
            log.say(format!(
                "the checkpoint {name} cannot be made: upper {} has no data; it is dropped",
                checkpoint.upper
            ));
            state.checkpoint = None;
            return;
        }
        let Some(upper) = upper.as_ref() else {
            log.say(format!(
                "the checkpoint {name} waits: {} is missing or not a real directory",
                uppers.child_path(&checkpoint.upper).display()
            ));
            return;
        };
        if data_there && let Err(e) = upper.rename_to(UPPER_DATA, &layers, name) {
            log.say(format!(
                "the checkpoint {name} cannot be made ({e}); it is dropped, upper {} stays in use",
                checkpoint.upper
            ));
            state.checkpoint = None;
            return;
        }
        layers_spec::fault::point("checkpoint-renamed");
        let undo = |why: String, log: &mut Log| {
            let back = layers
                .rename_to(name, upper, UPPER_DATA)
                .map(|()| format!("upper {} stays in use", checkpoint.upper))
                .unwrap_or_else(|e| format!("and moving it back failed too ({e})"));
            log.say(format!(
                "the checkpoint {name} cannot be made ({why}); {back}; trying again at the next boot"
            ));
        };
        let cleaned = match clean_upper(&layer_dir).and_then(|c| {
            if layers_spec::fault::fails("checkpoint-clean") {
                return Err(io::Error::other("injected failure"));
            }
            Ok(c)
        }) {
            Ok(cleaned) => cleaned,
            Err(e) => return undo(format!("cleaning it: {e}"), log),
        };
        log.debug(format!(
            "checkpoint {name}: {} whiteouts rewritten, {} overlay xattrs removed",
            cleaned.whiteouts, cleaned.xattrs
        ));
        if !cleaned.unusable.is_empty() {
            log.say(format!(
                "checkpoint {name}: {} has overlay redirects or metacopy; overlayctl cannot read this layer",
                cleaned.unusable.join(", ")
            ));
        }
        // The renames and rewrites reach the disk before the plan names the layer.
        if let Ok(dir) = fs::File::open(&layer_dir) {
            let _ = rustix::fs::syncfs(&dir);
        }
        plan.layers
            .insert(0, checkpoint_layer(&checkpoint, plan, log));
        let saved = if layers_spec::fault::fails("checkpoint-plan") {
            Err("injected failure".to_owned())
        } else {
            store.save_plan(plan).map_err(|e| e.to_string())
        };
        // A save can fail after the new plan is in place (flushing its directory): then the
        // layer stays, as the plan names it.
        let in_place = || {
            store
                .load_plan()
                .is_ok_and(|p| p.fell_back.is_none() && p.value.layer(name).is_some())
        };
        if let Err(e) = saved
            && !in_place()
        {
            plan.layers.remove(0);
            return undo(format!("writing the plan: {e}"), log);
        }
        layers_spec::fault::point("checkpoint-planned");
    }
    // The data is the plan's layer now: the rest of the upper (its work directory) goes, and
    // a fresh upper starts under an id nothing records.
    let fresh = first_free_upper(store, state);
    log.say(format!(
        "froze upper {} into layer {name}; a fresh upper {fresh} starts",
        checkpoint.upper
    ));
    if let Err(e) = uppers.remove(&checkpoint.upper) {
        log.say(format!(
            "could not remove the rest of upper {}: {e}",
            checkpoint.upper
        ));
    }
    layers_spec::fault::point("checkpoint-upper-removed");
    state.current_upper = Some(fresh);
    state.upper_stack.clear();
    state.checkpoint = Some(layers_spec::Checkpoint {
        frozen: true,
        ..checkpoint
    });
    // Now, not after the mount: a boot that fails later must not pick yet another upper.
    if let Err(e) = store.save_state(state) {
        log.say(format!("could not save the boot state: {e}"));
    }
}

/// With a plan read from its previous copy (the freeze cannot write the plan): a freeze cut
/// short after its rename is moved back into the upper, so this boot runs on the upper's data
/// and the checkpoint stays pending.
pub fn undo_half_done(store: &Store, state: &BootState, log: &mut Log) {
    let Some(checkpoint) = state.checkpoint.as_ref().filter(|c| !c.frozen) else {
        return;
    };
    let open = |f| store.existing_folder(f).ok().flatten();
    let (Some(layers), Some(uppers)) = (open(Folder::Layers), open(Folder::Uppers)) else {
        return;
    };
    let Some(upper) = uppers.sub(&checkpoint.upper).ok() else {
        return;
    };
    if upper.kind(UPPER_DATA).ok().flatten().is_none() && layers.has_dir(&checkpoint.layer) {
        match layers.rename_to(&checkpoint.layer, &upper, UPPER_DATA) {
            Ok(()) => log.say(format!(
                "the checkpoint {} waits for a readable plan; upper {} is back in use",
                checkpoint.layer, checkpoint.upper
            )),
            Err(e) => log.say(format!(
                "the checkpoint {} cannot be moved back into upper {} ({e})",
                checkpoint.layer, checkpoint.upper
            )),
        }
    }
}

/// The plan entry of a frozen checkpoint: on top, built on the top of the stack the upper was
/// used over; disabled when that layer is (rolled back since), so the upper's changes do not
/// land on an older system.
fn checkpoint_layer(checkpoint: &Checkpoint, plan: &Plan, log: &mut Log) -> Layer {
    let mut layer = Layer::new(checkpoint.layer.clone());
    layer.title = checkpoint.title.clone();
    layer.notes = Some(format!("checkpoint of upper {}", checkpoint.upper));
    // Merged by a compaction since: the layer that replaced it.
    let parent = checkpoint.parent.as_deref().and_then(|p| {
        plan.layer(p).or_else(|| {
            plan.layers
                .iter()
                .find(|l| l.replaces.iter().any(|r| r == p))
        })
    });
    layer.parent = parent
        .map(|p| p.name.clone())
        .or_else(|| plan.layers.first().map(|l| l.name.clone()));
    if let Some(parent) = parent.filter(|p| p.state == LayerState::Disabled) {
        log.say(format!(
            "checkpoint {} is disabled like {}, the layer its upper was used over",
            layer.name, parent.name
        ));
        // No date: an early-boot clock may be wrong; the policy job records it.
        layer.set_state(LayerState::Disabled, None);
    }
    layer
}

/// The lowest upper number with no directory in `uppers/` that the state does not name
/// (current, archived, or being frozen).
pub fn first_free_upper(store: &Store, state: &BootState) -> String {
    let named = |id: &str| {
        state.current_upper.as_deref() == Some(id)
            || state.checkpoint.as_ref().is_some_and(|c| c.upper == id)
            || state.archived_uppers.iter().any(|a| a.id == id)
    };
    (1..)
        .map(|n: u32| n.to_string())
        .find(|id| !named(id) && fs::symlink_metadata(store.path_of(Folder::Uppers, id)).is_err())
        .expect("some number is free")
}

/// Makes a frozen upper a plain lower layer, in place (docs/overlayfs.md): each whiteout its
/// own 0/0 device (overlayfs links them all to one inode in `work/`), and no overlay xattrs but
/// `opaque` and `whiteout`. Walks through directory handles (paths of any length), never
/// following a symlink; running it again changes nothing more.
pub fn clean_upper(root: &Path) -> io::Result<Cleaned> {
    let fd = rustix::fs::openat(CWD, root, DIR_FLAGS, Mode::empty())?;
    let mut cleaner = Cleaner {
        root,
        // The largest list the kernel returns (XATTR_LIST_MAX), allocated once.
        names: vec![0u8; 65536],
        cleaned: Cleaned::default(),
    };
    cleaner.dir(&fd, root)?;
    Ok(cleaner.cleaned)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// An entry named through its directory's handle: a short path whatever the real one's length
/// (the last component is not followed by the `l*xattr` calls).
fn via(dir: &OwnedFd, name: &OsStr) -> PathBuf {
    Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name)
}

/// What xattrs are read from: a directory by its own handle, any other entry by [`via`].
#[derive(Clone, Copy)]
enum At<'a> {
    Dir(&'a OwnedFd),
    Entry(&'a Path),
}

struct Cleaner<'a> {
    root: &'a Path,
    names: Vec<u8>,
    cleaned: Cleaned,
}

impl Cleaner<'_> {
    /// A directory and everything in it. Entry types come from the directory listing; only
    /// character devices (whiteouts or not) are stat'ed. `path` names it in messages.
    fn dir(&mut self, fd: &OwnedFd, path: &Path) -> io::Result<()> {
        self.strip_xattrs(At::Dir(fd), path)?;
        if statat(fd, WHITEOUT_TEMP, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| is_whiteout(st.st_mode, st.st_rdev))
        {
            unlinkat(fd, WHITEOUT_TEMP, AtFlags::empty())?;
        }
        for entry in rustix::fs::Dir::read_from(fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
            if name == "." || name == ".." {
                continue;
            }
            let child = path.join(&name);
            let mut kind = entry.file_type();
            if kind == FileType::Unknown {
                kind =
                    FileType::from_raw_mode(statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW)?.st_mode);
            }
            if kind == FileType::Directory {
                let sub = rustix::fs::openat(fd, &name, DIR_FLAGS, Mode::empty())?;
                self.dir(&sub, &child)?;
                continue;
            }
            if kind == FileType::CharacterDevice {
                let st = statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW)?;
                if is_whiteout(st.st_mode, st.st_rdev) {
                    if st.st_nlink > 1 {
                        mknodat(
                            fd,
                            WHITEOUT_TEMP,
                            FileType::CharacterDevice,
                            Mode::empty(),
                            0,
                        )?;
                        layers_spec::fault::point("checkpoint-whiteout");
                        renameat(fd, WHITEOUT_TEMP, fd, &name)?;
                        self.cleaned.whiteouts += 1;
                    }
                    continue;
                }
            }
            self.strip_xattrs(At::Entry(&via(fd, &name)), &child)?;
        }
        Ok(())
    }

    /// `at` reaches the entry; `path` names it.
    fn strip_xattrs(&mut self, at: At<'_>, path: &Path) -> io::Result<()> {
        let listed = match at {
            At::Dir(fd) => rustix::fs::flistxattr(fd, &mut self.names[..]),
            At::Entry(entry) => rustix::fs::llistxattr(entry, &mut self.names[..]),
        };
        let len = match listed {
            Ok(len) => len,
            Err(rustix::io::Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for name in self.names[..len]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
        {
            let Some(attr) = name.strip_prefix(OVERLAY_PREFIX.as_bytes()) else {
                continue;
            };
            let attr = String::from_utf8_lossy(attr);
            if KEPT_OVERLAY_XATTRS.contains(&attr.as_ref()) {
                continue;
            }
            if UNUSABLE_XATTRS.contains(&attr.as_ref()) {
                let rel = path.strip_prefix(self.root).unwrap_or(path);
                self.cleaned.unusable.push(format!("/{}", rel.display()));
                continue;
            }
            let name = OsStr::from_bytes(name);
            match at {
                At::Dir(fd) => rustix::fs::fremovexattr(fd, name)?,
                At::Entry(entry) => rustix::fs::lremovexattr(entry, name)?,
            }
            self.cleaned.xattrs += 1;
        }
        Ok(())
    }
}

fn is_whiteout(mode: u32, rdev: u64) -> bool {
    FileType::from_raw_mode(mode) == FileType::CharacterDevice && rdev == 0
}
