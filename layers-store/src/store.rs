//! A store opened as a directory handle: its folders (each a real directory inside it, or an
//! error that says what is there instead), the plan and the boot state, the lock, and the
//! leftovers of interrupted changes.

use std::collections::{BTreeSet, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use layers_spec::{BootState, Plan, PlanError};
use rustix::fs::{FileType, FlockOperation, flock};
use rustix::io::Errno;

use crate::dir::{Dir, DirError, kind_name};
use crate::files::{self, Loaded};
use crate::layout::{self, Folder, LOCK_FILE, PLAN_FILE, STATE_FILE};

/// [`Store::layer_present`] for many layers: `layers/` read once.
#[derive(Debug)]
pub struct LayerPresence {
    present: HashSet<OsString>,
}

impl LayerPresence {
    pub fn has(&self, name: &str) -> bool {
        self.present.contains(OsStr::new(name))
    }
}

/// What can go wrong with a store as a whole.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "there is no store at {0}; create one with `overlayctl init --base DIR`, or name another with --store"
    )]
    NoStore(PathBuf),
    #[error("{0} exists and is not empty; a new store needs an empty or new directory")]
    NotEmpty(PathBuf),
    #[error(
        "another overlayctl is changing the store {store} (it holds {lock}); try again when it is done"
    )]
    Locked { store: PathBuf, lock: PathBuf },
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// What [`Store::clear_leftovers`] did.
#[derive(Debug, Default)]
pub struct Leftovers {
    pub removed: Vec<PathBuf>,
    /// Kept, and why.
    pub kept: Vec<(PathBuf, String)>,
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    root: Dir,
}

/// Held while a change is made; released when dropped.
#[derive(Debug)]
pub struct StoreLock {
    _fd: OwnedFd,
}

impl Store {
    /// The store at `path` (a path a person gave: symlinks on the way are followed).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        match Dir::open(path) {
            Ok(root) => Ok(Self { root }),
            Err(e) if e.errno() == Some(libc_enoent()) => Err(StoreError::NoStore(path.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// The store at `rel` inside the root filesystem `sysroot`: symlinks on the way are resolved
    /// inside `sysroot`, as they will be once it is `/`.
    pub fn open_in_root(sysroot: &Path, rel: &Path) -> Result<Self, StoreError> {
        let root = Dir::open(sysroot)?;
        match Dir::open_in_root(&root, rel) {
            Ok(dir) => Ok(Self { root: dir }),
            Err(e) if e.errno() == Some(libc_enoent()) => Err(StoreError::NoStore(
                sysroot.join(rel.strip_prefix("/").unwrap_or(rel)),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a new store at `path`, which must not exist or be empty, with all its folders.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| DirError::io(path, "creating the store", e))?;
        let store = Self::open(path)?;
        // Only the downloads an earlier, failed `init --image` kept, to resume them.
        let downloads = Folder::Downloads.name();
        if store.root.names()?.iter().any(|n| n != downloads) {
            return Err(StoreError::NotEmpty(path.to_owned()));
        }
        for folder in Folder::ALL {
            store.folder(folder)?;
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// The store's top directory.
    pub fn root(&self) -> &Dir {
        &self.root
    }

    /// A folder of the store, made when missing; refused when it is not a real directory.
    pub fn folder(&self, folder: Folder) -> Result<Dir, StoreError> {
        Ok(self.root.sub_or_create(folder.name())?)
    }

    /// A folder of the store when it exists (a read-only root cannot make one).
    pub fn existing_folder(&self, folder: Folder) -> Result<Option<Dir>, StoreError> {
        match self.root.kind(folder.name())? {
            None => Ok(None),
            Some(_) => Ok(Some(self.root.sub(folder.name())?)),
        }
    }

    /// The path of an entry of a folder, for messages and for calls that take paths (the
    /// kernel's mount options, the layer engine working under `staging/`).
    pub fn path_of(&self, folder: Folder, name: &str) -> PathBuf {
        self.root.path().join(folder.name()).join(name)
    }

    pub fn layer_path(&self, name: &str) -> PathBuf {
        self.path_of(Folder::Layers, name)
    }

    /// Whether the layer's directory is there: a real directory in a real `layers/` (a symlink
    /// to a directory elsewhere is not a layer of this store).
    pub fn layer_present(&self, name: &str) -> bool {
        self.root
            .sub(Folder::Layers.name())
            .is_ok_and(|layers| layers.has_dir(name))
    }

    /// Which layers are present, from one read of `layers/` (the hook asks about every layer
    /// of the plan several times a boot). For a store that does not change meanwhile.
    pub fn layer_presence(&self) -> LayerPresence {
        let layers = self.root.sub(Folder::Layers.name());
        LayerPresence {
            present: layers.and_then(|l| l.real_dirs()).unwrap_or_default(),
        }
    }

    /// The layer's manifest text, when there is one.
    pub fn manifest_text(&self, name: &str) -> Option<String> {
        let manifests = self.root.sub(Folder::Manifests.name()).ok()?;
        String::from_utf8(manifests.read(name).ok()??).ok()
    }

    /// Bytes of file content in a layer, summed from its manifest's `size=` fields (no walk of
    /// the layer itself); None when the layer has no readable manifest.
    pub fn layer_content_size(&self, name: &str) -> Option<u64> {
        let text = self.manifest_text(name)?;
        Some(
            text.split(' ')
                .filter_map(|field| field.strip_prefix("size="))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum(),
        )
    }

    /// The plan, or its previous copy when the plan cannot be read.
    pub fn load_plan(&self) -> Result<Loaded<Plan>, PlanError> {
        files::load_with_prev(&self.root, PLAN_FILE, Plan::parse)
    }

    /// Checks and saves the plan, keeping the one it replaces as `.prev` when that was valid.
    pub fn save_plan(&self, plan: &Plan) -> Result<(), PlanError> {
        files::save_plan(&self.root, PLAN_FILE, plan)
    }

    /// The layers the previous plan (the fallback when the plan cannot be read) names.
    pub fn prev_plan_layers(&self) -> Vec<String> {
        files::plan_names(&self.root, &files::prev_name(PLAN_FILE))
    }

    /// The boot state; a store that has none yet has the default state.
    pub fn load_state(&self) -> Result<Loaded<BootState>, PlanError> {
        let default = || Loaded {
            value: BootState::default(),
            path: self.path_of(Folder::State, STATE_FILE),
            fell_back: None,
        };
        let dir = match self.root.kind(Folder::State.name()) {
            Ok(None) => return Ok(default()),
            _ => self
                .root
                .sub(Folder::State.name())
                .map_err(files::to_plan_error)?,
        };
        let prev = files::prev_name(STATE_FILE);
        if dir.kind(STATE_FILE).ok().flatten().is_none() && dir.kind(&prev).ok().flatten().is_none()
        {
            return Ok(default());
        }
        files::load_with_prev(&dir, STATE_FILE, BootState::parse)
    }

    /// Checks and saves the boot state.
    pub fn save_state(&self, state: &BootState) -> Result<(), PlanError> {
        // Nothing is made for a state that would not be written.
        state.check()?;
        let dir = self.folder(Folder::State).map_err(|e| match e {
            StoreError::Dir(e) => files::to_plan_error(e),
            StoreError::Plan(e) => e,
            other => PlanError::io(
                self.path(),
                "opening the state folder",
                io::Error::other(other.to_string()),
            ),
        })?;
        files::save_state(&dir, STATE_FILE, state)
    }

    /// Takes the store's lock, or says who holds it.
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        let fd = self.root.open_lock_file(LOCK_FILE)?;
        match flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(StoreLock { _fd: fd }),
            Err(Errno::WOULDBLOCK) => Err(StoreError::Locked {
                store: self.path().to_owned(),
                lock: self.root.child_path(LOCK_FILE),
            }),
            Err(e) => Err(DirError::io(self.root.child_path(LOCK_FILE), "locking", e).into()),
        }
    }

    /// Deletes what interrupted changes left: entries of `staging/` that Strata named (work in
    /// progress, layers let go), and temporary copies of the plan and state. Anything else there
    /// is kept, and so is what cannot be deleted now (a mount inside it, say): neither stops
    /// the change that asked. Returns (removed, kept with why), as paths.
    pub fn clear_leftovers(&self) -> Result<Leftovers, StoreError> {
        let mut left = Leftovers::default();
        let clear = |left: &mut Leftovers, dir: &Dir, name: &std::ffi::OsStr| match dir.remove(name)
        {
            Ok(_) => left.removed.push(dir.child_path(name)),
            Err(e) => left.kept.push((dir.child_path(name), e.to_string())),
        };
        if let Some(staging) = self.existing_folder(Folder::Staging)? {
            for name in staging.names()? {
                if name.to_str().is_some_and(layout::is_scratch_name) {
                    clear(&mut left, &staging, &name);
                } else {
                    let why =
                        "not made by Strata (staging/ is Strata's own folder: move it elsewhere)";
                    left.kept.push((staging.child_path(&name), why.to_owned()));
                }
            }
        }
        let state = self.existing_folder(Folder::State).ok().flatten();
        for (dir, file) in [(Some(&self.root), PLAN_FILE), (state.as_ref(), STATE_FILE)] {
            let Some(dir) = dir else { continue };
            for name in dir.names()? {
                if name.to_str().is_some_and(|n| layout::is_temp_of(n, file)) {
                    clear(&mut left, dir, &name);
                }
            }
        }
        Ok(left)
    }

    /// Entries of `layers/` that neither the plan nor the journal accounts for: kept, never
    /// deleted but by an explicit `remove`. Each with what it is when it is not a directory.
    pub fn unaccounted_layers(
        &self,
        plan: &Plan,
        state: &BootState,
    ) -> Vec<(String, Option<&'static str>)> {
        let Ok(Some(layers)) = self.existing_folder(Folder::Layers) else {
            return Vec::new();
        };
        let names = layers.names().unwrap_or_default();
        names
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| {
                plan.layer(n).is_none()
                    && !state.journals(n)
                    && state.checkpoint.as_ref().is_none_or(|c| &c.layer != n)
            })
            .map(|n| {
                let what = match layers.kind(&n) {
                    Ok(Some(FileType::Directory)) if layers.has_dir(&n) => None,
                    Ok(Some(FileType::Directory)) => Some("a mount point"),
                    Ok(Some(kind)) => Some(kind_name(kind)),
                    _ => Some("unreadable"),
                };
                (n, what)
            })
            .collect()
    }

    /// Mount points at or below `folder/name` (which deleting it would have to cross).
    pub fn mounts_under(&self, folder: Folder, name: &str) -> Vec<PathBuf> {
        let path = self.path_of(folder, name);
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return Vec::new();
        };
        crate::mount::parse_mountinfo(&mountinfo)
            .into_iter()
            .map(|m| m.target)
            .filter(|t| t.starts_with(&path))
            .collect()
    }

    /// Layers in use by overlays mounted from this store in this mount namespace (the
    /// `mountinfo` source names the store; their lowers are in its `layers/`), plus `booted`.
    pub fn mounted_layers(&self, booted: &[String]) -> BTreeSet<String> {
        let mut used: BTreeSet<String> = booted.iter().cloned().collect();
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return used;
        };
        let root = std::fs::canonicalize(self.path()).unwrap_or_else(|_| self.path().to_owned());
        let layers = root.join(Folder::Layers.name());
        for mount in crate::mount::parse_mountinfo(&mountinfo) {
            // Any overlay: one mounted by hand over the store's layers uses them too.
            if mount.fstype != "overlay" {
                continue;
            }
            let ours = mount
                .source
                .strip_prefix(crate::mount::SOURCE_PREFIX)
                .and_then(|s| s.strip_prefix(':'))
                .is_some_and(|p| std::fs::canonicalize(p).is_ok_and(|p| p == root));
            for lower in mount.lowers() {
                let lower = Path::new(&lower);
                // Relative names come from the classic call made in `layers/` of the source.
                let in_store = match lower.parent() {
                    Some(p) if p.is_absolute() => p == layers,
                    _ => ours,
                };
                if in_store && let Some(name) = lower.file_name() {
                    used.insert(name.to_string_lossy().into_owned());
                }
            }
        }
        used
    }
}

const fn libc_enoent() -> i32 {
    2
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn leftovers_are_only_what_strata_named() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::create(&tmp.path().join("s")).unwrap();
        let staging = store.folder(Folder::Staging).unwrap();
        let ours = layout::scratch_name("up1");
        fs::create_dir_all(staging.child_path(&ours).join("usr")).unwrap();
        fs::create_dir(staging.child_path("mine")).unwrap();
        fs::write(
            store.root().child_path(".overlayplan.toml.new.1.0.tmp"),
            "x",
        )
        .unwrap();
        let left = store.clear_leftovers().unwrap();
        assert_eq!(left.removed.len(), 2, "{left:?}");
        assert_eq!(left.kept.len(), 1, "{left:?}");
        assert_eq!(left.kept[0].0, staging.child_path("mine"));
        assert!(staging.has_dir("mine"));
    }

    #[test]
    fn a_symlinked_folder_is_never_used() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("strata.1.2.x"), "mine").unwrap();
        let store = Store::create(&tmp.path().join("s")).unwrap();
        fs::remove_dir(store.path().join("staging")).unwrap();
        std::os::unix::fs::symlink(&outside, store.path().join("staging")).unwrap();
        let e = store.clear_leftovers().unwrap_err().to_string();
        assert!(e.contains("staging is a symlink"), "{e}");
        assert!(outside.join("strata.1.2.x").exists());
    }
}
