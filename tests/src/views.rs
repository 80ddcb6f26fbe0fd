//! Trees as a list of what each path shows (kind, metadata, content hash), read from a mounted
//! or plain directory or from the engine's merged view, and the first difference between two.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use overlayctl::engine::manifest::hash_file;
use overlayctl::engine::{Kind, Layer, MergedView};

/// What is compared for each path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// Files: size and content hash. Symlinks: the target. Devices: rdev.
    pub content: String,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Walks the kernel's mount.
pub fn kernel_view(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn go(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        let path = root.join(rel);
        // A whiteout that hides nothing, in a directory only one layer has, is passed through by
        // the kernel's readdir but fails lookup: it is not there, and the engine agrees.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return;
        };
        let ft = meta.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_file() {
            (
                "file",
                format!("{} {}", meta.len(), hash_file(&path).unwrap()),
            )
        } else if ft.is_symlink() {
            (
                "symlink",
                fs::read_link(&path).unwrap().display().to_string(),
            )
        } else if ft.is_char_device() {
            ("char", meta.rdev().to_string())
        } else if ft.is_block_device() {
            ("block", meta.rdev().to_string())
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("socket", String::new())
        };
        let xattrs = xattr::list(&path)
            .unwrap()
            .map(|n| {
                (
                    n.as_bytes().to_vec(),
                    xattr::get(&path, &n).unwrap().unwrap_or_default(),
                )
            })
            .collect();
        out.insert(
            rel.to_owned(),
            Seen {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: meta.mtime(),
                content,
                xattrs,
            },
        );
        if ft.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                go(root, &rel.join(entry.unwrap().file_name()), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, Path::new(""), &mut out);
    out
}

/// Walks the engine's merged view of the same layers.
pub fn engine_view(layers: &[Layer]) -> BTreeMap<PathBuf, Seen> {
    let view = MergedView::new(layers);
    let mut out = BTreeMap::new();
    view.walk(&mut |rel, node| {
        let n = node.node;
        let content = match &n.kind {
            Kind::File { size, .. } => format!(
                "{size} {}",
                hash_file(&view.source_path(rel, node)).unwrap()
            ),
            Kind::Symlink { target } => Path::new(target).display().to_string(),
            Kind::CharDevice { rdev } | Kind::BlockDevice { rdev } => rdev.to_string(),
            _ => String::new(),
        };
        let xattrs = n
            .meta
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect();
        out.insert(
            rel.to_owned(),
            Seen {
                kind: n.kind.name(),
                mode: n.meta.mode,
                uid: n.meta.uid,
                gid: n.meta.gid,
                mtime: n.meta.mtime.0,
                content,
                xattrs,
            },
        );
    });
    out
}

/// The first difference between the two views, described for a person.
pub fn first_difference(
    kernel: &BTreeMap<PathBuf, Seen>,
    engine: &BTreeMap<PathBuf, Seen>,
) -> Option<String> {
    for (path, seen) in kernel {
        match engine.get(path) {
            None => {
                return Some(format!(
                    "{}: the kernel shows {seen:?}, the engine nothing",
                    path.display()
                ));
            }
            Some(ours) if ours != seen => {
                return Some(format!(
                    "{}:\n  kernel: {seen:?}\n  engine: {ours:?}",
                    path.display()
                ));
            }
            _ => {}
        }
    }
    engine
        .iter()
        .find(|(path, _)| !kernel.contains_key(*path))
        .map(|(path, ours)| {
            format!(
                "{}: the engine shows {ours:?}, the kernel nothing",
                path.display()
            )
        })
}

/// A view with directory mtimes set to 0: they move with any change inside a directory, and
/// sync and bundles carry them only where something changed.
pub fn without_dir_mtimes(mut view: BTreeMap<PathBuf, Seen>) -> BTreeMap<PathBuf, Seen> {
    for seen in view.values_mut() {
        if seen.kind == "dir" {
            seen.mtime = 0;
        }
    }
    view
}

/// What a directory (a mount or a plain tree) shows below its root, directory mtimes aside:
/// for checking that a stack shows a target tree.
pub fn shown_tree(root: &Path) -> BTreeMap<PathBuf, Seen> {
    let mut view = without_dir_mtimes(kernel_view(root));
    view.remove(Path::new(""));
    view
}
