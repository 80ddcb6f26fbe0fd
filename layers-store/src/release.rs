//! Releasing a store (docs/design.md, "Adopt and release"): `overlayctl release` writes the
//! journal `release.toml` naming the running stack and its upper; at the next boot, before
//! anything is mounted, the hook flattens them into one plain tree in `staging/released/` (files
//! hard-linked, nothing copied), moves its entries onto the real root by rename, and renames the
//! store to `NAME.released`: the machine boots the plain system from then on. Each step can be
//! run again after a cut; the store's rename is the last.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dir::Dir;
use crate::layout::{Folder, UPPER_DATA};
use crate::store::Store;

/// The journal's file name, in the store.
pub const RELEASE_FILE: &str = "release.toml";
/// The flattened tree, in `staging/`.
const FLATTENED: &str = "released";
/// What the store is renamed to, after its name.
pub const RELEASED_SUFFIX: &str = ".released";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Written by `overlayctl release`.
    Pending,
    /// `staging/released/` holds the whole tree; its entries move next.
    Flattened,
}

/// The journal of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: u32,
    pub phase: Phase,
    /// The layers, top first.
    pub stack: Vec<String>,
    /// The persistent upper used over them, whose changes the plain root keeps.
    pub upper: Option<String>,
}

impl Release {
    pub fn read(store: &Store) -> Result<Option<Self>, String> {
        let Some(bytes) = store.root().read(RELEASE_FILE).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let path = store.root().child_path(RELEASE_FILE);
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
        let release: Self =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        for name in release.stack.iter().chain(&release.upper) {
            layers_spec::check_name(name)
                .map_err(|p| format!("{}: {name:?}: {p}", path.display()))?;
        }
        if release.stack.is_empty() {
            return Err(format!("{}: the stack is empty", path.display()));
        }
        Ok(Some(release))
    }

    pub fn write(&self, store: &Store) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let root = store.root();
        let scratch = crate::layout::scratch_name(RELEASE_FILE);
        root.write_new(&scratch, text.as_bytes(), 0o644)
            .and_then(|()| root.rename_over(&scratch, root, RELEASE_FILE))
            .and_then(|()| root.sync())
            .map_err(|e| e.to_string())
    }

    /// The hook's part: flattens the stack into `staging/released/`, moves its entries onto the
    /// real root at `real_root`, and renames the store (at `store_rel` inside it) aside.
    /// The store's name now.
    pub fn carry_out(
        &mut self,
        real_root: &Path,
        store_rel: &Path,
        store: &Store,
    ) -> Result<String, String> {
        let staging = store.folder(Folder::Staging).map_err(|e| e.to_string())?;
        if self.phase == Phase::Pending {
            staging.remove(FLATTENED).map_err(|e| e.to_string())?;
            // Each source a real directory inside the store (never a symlink out of it).
            let layers = store.folder(Folder::Layers).map_err(|e| e.to_string())?;
            let mut sources: Vec<PathBuf> = Vec::new();
            if let Some(upper) = &self.upper {
                let data = store
                    .folder(Folder::Uppers)
                    .and_then(|uppers| Ok(uppers.sub(upper)?.sub(UPPER_DATA)?))
                    .map_err(|e| e.to_string())?;
                sources.push(data.path().to_owned());
            }
            for name in &self.stack {
                let layer = layers.sub(name).map_err(|e| e.to_string())?;
                sources.push(layer.path().to_owned());
            }
            let dest = staging.child_path(FLATTENED);
            flatten(&sources, &dest).map_err(|e| format!("flattening the stack: {e}"))?;
            let flattened = staging.sub(FLATTENED).map_err(|e| e.to_string())?;
            // The root filesystem's line as it was before the adoption.
            crate::adopt::rewrite_fstab(&flattened, true).map_err(|e| e.to_string())?;
            staging.sync().map_err(|e| e.to_string())?;
            self.phase = Phase::Flattened;
            self.write(store)?;
        }
        let flattened = staging.sub(FLATTENED).map_err(|e| e.to_string())?;
        let real = Dir::open(real_root).map_err(|e| e.to_string())?;
        move_entries(&flattened, &real).map_err(|e| e.to_string())?;
        // Last: the store goes aside (under a name nothing has: an earlier release's store
        // may be there still), and the next boots find none.
        let (parent, name) = split(real_root, store_rel)?;
        let parent = Dir::open(&parent).map_err(|e| e.to_string())?;
        let mut aside = format!("{name}{RELEASED_SUFFIX}");
        for n in 2.. {
            if parent.kind(&aside).map_err(|e| e.to_string())?.is_none() {
                break;
            }
            aside = format!("{name}{RELEASED_SUFFIX}.{n}");
        }
        parent
            .rename_to(&name, &parent, &aside)
            .and_then(|()| parent.sync())
            .map_err(|e| e.to_string())?;
        Ok(aside)
    }
}

/// The store's parent directory and name on the real root.
fn split(real_root: &Path, store_rel: &Path) -> Result<(PathBuf, String), String> {
    let rel = store_rel.strip_prefix("/").unwrap_or(store_rel);
    let name = rel
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} names no store", store_rel.display()))?;
    let parent = real_root.join(rel.parent().unwrap_or(Path::new("")));
    Ok((parent, name.to_owned()))
}

/// Moves what `from` holds onto `to`, entry by entry; `boot/`'s entries into `to`'s `boot/`.
/// What `to` has already stays (and its copy stays in `from`).
fn move_entries(from: &Dir, to: &Dir) -> Result<(), crate::DirError> {
    for name in from.names()? {
        if name.as_bytes() == b"boot" && to.kind("boot")?.is_some() {
            let (from_boot, to_boot) = (from.sub("boot")?, to.sub("boot")?);
            for entry in from_boot.names()? {
                if to_boot.kind(&entry)?.is_none() {
                    from_boot.rename_to(&entry, &to_boot, &entry)?;
                }
            }
            to_boot.sync()?;
            continue;
        }
        if to.kind(&name)?.is_none() {
            from.rename_to(&name, to, &name)?;
        }
    }
    to.sync()
}

/// Writes at `dest` the tree overlayfs shows for `sources` (top first): directories made with
/// the topmost one's owner, mode, times and extended attributes (overlayfs's own left out),
/// files hard-linked (same filesystem), symlinks and device nodes made anew; whiteouts and what
/// they or an opaque directory hide left out.
pub fn flatten(sources: &[PathBuf], dest: &Path) -> io::Result<()> {
    let live: Vec<PathBuf> = sources.iter().filter(|s| s.is_dir()).cloned().collect();
    if live.len() != sources.len() {
        return Err(io::Error::other(format!(
            "a layer of the stack is missing: {}",
            sources
                .iter()
                .filter(|s| !s.is_dir())
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    fs::create_dir(dest)?;
    flatten_dir(&live, dest)?;
    copy_dir_meta(&live[0], dest)
}

/// One directory: `live` are the sources whose directory here shows (top first).
fn flatten_dir(live: &[PathBuf], dest: &Path) -> io::Result<()> {
    // Each name from its topmost source; a whiteout hides it below.
    let mut entries: BTreeMap<OsString, (usize, fs::Metadata)> = BTreeMap::new();
    for (i, dir) in live.iter().enumerate() {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let std::collections::btree_map::Entry::Vacant(slot) =
                entries.entry(entry.file_name())
            {
                slot.insert((i, fs::symlink_metadata(entry.path())?));
            }
        }
        if is_opaque(dir) {
            break;
        }
    }
    for (name, (i, meta)) in entries {
        let source = live[i].join(&name);
        let target = dest.join(&name);
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            continue;
        }
        if kind.is_dir() {
            // The sources below whose entry is a directory too, down to the first that is not
            // or is opaque.
            let mut below = vec![source.clone()];
            if !is_opaque(&source) {
                for lower in &live[i + 1..] {
                    let path = lower.join(&name);
                    match fs::symlink_metadata(&path) {
                        Ok(m) if m.is_dir() => {
                            let opaque = is_opaque(&path);
                            below.push(path);
                            if opaque {
                                break;
                            }
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
            }
            fs::create_dir(&target)?;
            flatten_dir(&below, &target)?;
            copy_dir_meta(&source, &target)?;
        } else if kind.is_file() {
            fs::hard_link(&source, &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&source)?, &target)?;
            rustix::fs::chownat(
                rustix::fs::CWD,
                &target,
                Some(rustix::fs::Uid::from_raw(meta.uid())),
                Some(rustix::fs::Gid::from_raw(meta.gid())),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )?;
        } else {
            let file_type = rustix::fs::FileType::from_raw_mode(meta.mode());
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                file_type,
                rustix::fs::Mode::from_raw_mode(meta.mode() & 0o7777),
                meta.rdev(),
            )?;
            std::os::unix::fs::lchown(&target, Some(meta.uid()), Some(meta.gid()))?;
        }
    }
    Ok(())
}

/// Owner, mode, extended attributes (not overlayfs's) and times of a directory.
fn copy_dir_meta(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    let mut names = vec![0u8; 64 * 1024];
    let len = rustix::fs::listxattr(from, &mut names).unwrap_or(0);
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            continue;
        }
        let name = std::ffi::OsStr::from_bytes(name);
        let mut value = vec![0u8; 64 * 1024];
        if let Ok(n) = rustix::fs::getxattr(from, name, &mut value) {
            rustix::fs::setxattr(to, name, &value[..n], rustix::fs::XattrFlags::empty())?;
        }
    }
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec() as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec() as _,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, to, &times, rustix::fs::AtFlags::empty())?;
    Ok(())
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut value = [0u8; 4];
            rustix::fs::getxattr(dir, *name, &mut value).is_ok_and(|n| &value[..n] == b"y")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_as_overlayfs_shows_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, bottom) = (tmp.path().join("top"), tmp.path().join("bottom"));
        let write = |path: PathBuf, text: &str| {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write(bottom.join("etc/a"), "bottom a");
        write(bottom.join("etc/b"), "bottom b");
        write(bottom.join("usr/bin/tool"), "tool");
        write(top.join("etc/a"), "top a");
        write(top.join("etc/c"), "top c");
        std::os::unix::fs::symlink("tool", top.join("usr-link")).unwrap();
        let dest = tmp.path().join("flat");
        flatten(&[top.clone(), bottom.clone()], &dest).unwrap();
        let read = |rel: &str| fs::read_to_string(dest.join(rel)).ok();
        assert_eq!(read("etc/a").as_deref(), Some("top a"));
        assert_eq!(read("etc/b").as_deref(), Some("bottom b"));
        assert_eq!(read("etc/c").as_deref(), Some("top c"));
        assert_eq!(read("usr/bin/tool").as_deref(), Some("tool"));
        assert_eq!(
            fs::read_link(dest.join("usr-link")).unwrap(),
            Path::new("tool")
        );
        // Files are the layers' own, linked.
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&dest.join("etc/b")), ino(&bottom.join("etc/b")));
    }
}
