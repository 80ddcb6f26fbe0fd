//! `overlayctl diff A B [--packages]`: what changes from one stack to another, file by file
//! (added, removed, changed, with sizes) and, with `--packages`, package by package from the
//! dpkg database each holds (added, removed, upgraded, downgraded, with versions), as
//! rpm-ostree's `db diff` does for RPMs.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::engine::manifest::hash_file;
use crate::engine::{Kind, MergedNode, MergedView, Node};
use crate::store::Store;

/// What changes from one stack to another: files, or (asked for) packages.
#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Diff {
    Files(Vec<FileChange>),
    Packages(Vec<PackageChange>),
}

/// Compares the stack topped by `from` with the one topped by `to`.
pub fn between(store: &Store, from: &str, to: &str, packages: bool) -> Result<Diff> {
    let (a_names, a_layers) = crate::ops::read_stack_at(store, Some(from))?;
    let (b_names, b_layers) = crate::ops::read_stack_at(store, Some(to))?;
    let (a, b) = (MergedView::new(&a_layers), MergedView::new(&b_layers));
    if packages {
        let status = |view: &MergedView<'_>, names: &[String]| -> Result<String> {
            let rel = Path::new("var/lib/dpkg/status");
            let node = view.get(rel).ok_or_else(|| {
                anyhow::anyhow!(
                    "the stack {} has no var/lib/dpkg/status (not a Debian system)",
                    names.join(", ")
                )
            })?;
            let path = view.source_path(rel, node);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let before = status(&a, &a_names)?;
        return Ok(Diff::Packages(self::packages(
            &before,
            &status(&b, &b_names)?,
        )));
    }
    let plan = store.plan()?.value;
    let known = crate::ops::known_hashes(store, &plan, &a_names, &a_layers)
        .into_iter()
        .chain(crate::ops::known_hashes(store, &plan, &b_names, &b_layers))
        .collect();
    files(&a, &b, &known).map(Diff::Files)
}

/// How one path differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    Added,
    Removed,
    Changed,
}

/// One path that differs, with its file sizes on each side (files only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    pub how: How,
    pub before: Option<u64>,
    pub after: Option<u64>,
}

/// Compares two merged views path by path. Files are compared by size, then content (hashes
/// from `known`, by path on disk, or by reading), and every entry by kind and metadata;
/// directories only by kind, owner, mode and xattrs (their mtimes move with any change inside).
/// A path whose entry comes from the same layer file on both sides is the same.
pub fn files(
    a: &MergedView<'_>,
    b: &MergedView<'_>,
    known: &HashMap<PathBuf, String>,
) -> Result<Vec<FileChange>> {
    let mut out = Vec::new();
    let mut differ = Differ {
        a,
        b,
        known,
        out: &mut out,
    };
    differ.dir(&mut PathBuf::new(), Some(&a.root), Some(&b.root))?;
    Ok(out)
}

struct Differ<'v, 'a> {
    a: &'v MergedView<'a>,
    b: &'v MergedView<'a>,
    known: &'v HashMap<PathBuf, String>,
    out: &'v mut Vec<FileChange>,
}

fn file_size(node: &Node) -> Option<u64> {
    match node.kind {
        Kind::File { size, .. } => Some(size),
        _ => None,
    }
}

impl Differ<'_, '_> {
    fn hash(&self, view: &MergedView<'_>, rel: &Path, node: &MergedNode<'_>) -> Result<String> {
        let path = view.source_path(rel, node);
        match self.known.get(&path) {
            Some(hash) => Ok(hash.clone()),
            None => hash_file(&path).with_context(|| format!("hashing {}", path.display())),
        }
    }

    fn same(&self, rel: &Path, x: &MergedNode<'_>, y: &MergedNode<'_>) -> Result<bool> {
        if self.a.source_path(rel, x) == self.b.source_path(rel, y) {
            return Ok(true);
        }
        let (p, q) = (&x.node.meta, &y.node.meta);
        let same_meta =
            p.mode == q.mode && p.uid == q.uid && p.gid == q.gid && p.xattrs == q.xattrs;
        Ok(match (&x.node.kind, &y.node.kind) {
            (Kind::Dir { .. }, Kind::Dir { .. }) => same_meta,
            (Kind::File { size: s, .. }, Kind::File { size: t, .. }) => {
                same_meta
                    && s == t
                    && p.mtime == q.mtime
                    && self.hash(self.a, rel, x)? == self.hash(self.b, rel, y)?
            }
            (k, l) => same_meta && p.mtime == q.mtime && k == l,
        })
    }

    fn push(
        &mut self,
        rel: &Path,
        how: How,
        x: Option<&MergedNode<'_>>,
        y: Option<&MergedNode<'_>>,
    ) {
        self.out.push(FileChange {
            path: rel.display().to_string(),
            how,
            before: x.and_then(|n| file_size(n.node)),
            after: y.and_then(|n| file_size(n.node)),
        });
    }

    /// Every path below (and at) `rel`, on one side only: added or removed whole.
    fn whole(&mut self, rel: &mut PathBuf, node: &MergedNode<'_>, how: How) {
        let (x, y) = match how {
            How::Removed => (Some(node), None),
            _ => (None, Some(node)),
        };
        self.push(rel, how, x, y);
        for (name, child) in &node.children {
            rel.push(name);
            self.whole(rel, child, how);
            rel.pop();
        }
    }

    fn dir(
        &mut self,
        rel: &mut PathBuf,
        x: Option<&MergedNode<'_>>,
        y: Option<&MergedNode<'_>>,
    ) -> Result<()> {
        let (x, y) = match (x, y) {
            (Some(x), Some(y)) => (x, y),
            (Some(x), None) => {
                self.whole(rel, x, How::Removed);
                return Ok(());
            }
            (None, Some(y)) => {
                self.whole(rel, y, How::Added);
                return Ok(());
            }
            (None, None) => return Ok(()),
        };
        let both_dirs = x.node.kind.is_dir() && y.node.kind.is_dir();
        if !both_dirs {
            // A file became a directory, or the other way: gone, and new.
            if !self.same(rel, x, y)? {
                if x.node.kind.is_dir() || y.node.kind.is_dir() {
                    self.whole(rel, x, How::Removed);
                    self.whole(rel, y, How::Added);
                } else {
                    self.push(rel, How::Changed, Some(x), Some(y));
                }
            }
            return Ok(());
        }
        if !rel.as_os_str().is_empty() && !self.same(rel, x, y)? {
            self.push(rel, How::Changed, Some(x), Some(y));
        }
        let names: std::collections::BTreeSet<&OsStr> = x
            .children
            .keys()
            .chain(y.children.keys())
            .copied()
            .collect();
        for name in names {
            rel.push(name);
            self.dir(rel, x.children.get(name), y.children.get(name))?;
            rel.pop();
        }
        Ok(())
    }
}

/// Installed packages from a dpkg status file: (name, architecture) → version.
pub fn installed_packages(status: &str) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for paragraph in status.split("\n\n") {
        let field = |name: &str| {
            paragraph
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let (Some(package), Some(state), Some(version)) =
            (field("Package"), field("Status"), field("Version"))
        else {
            continue;
        };
        // "install ok installed", "hold ok installed": the package's files are there.
        if state.split_whitespace().last() != Some("installed") {
            continue;
        }
        let arch = field("Architecture").unwrap_or("all");
        out.insert((package.to_owned(), arch.to_owned()), version.to_owned());
    }
    out
}

/// How one package differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    pub package: String,
    pub arch: String,
    /// added, removed, upgraded, downgraded, or changed (a version dpkg would not parse).
    pub how: &'static str,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// The package-level difference between two dpkg status files' installed packages.
pub fn packages(before: &str, after: &str) -> Vec<PackageChange> {
    let (a, b) = (installed_packages(before), installed_packages(after));
    let keys: std::collections::BTreeSet<&(String, String)> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let (x, y) = (a.get(key), b.get(key));
            let how = match (x, y) {
                (None, Some(_)) => "added",
                (Some(_), None) => "removed",
                (Some(x), Some(y)) if x == y => return None,
                (Some(x), Some(y)) => {
                    match (
                        debversion::Version::from_str(x),
                        debversion::Version::from_str(y),
                    ) {
                        (Ok(x), Ok(y)) if y > x => "upgraded",
                        (Ok(x), Ok(y)) if y < x => "downgraded",
                        _ => "changed",
                    }
                }
                (None, None) => return None,
            };
            Some(PackageChange {
                package: key.0.clone(),
                arch: key.1.clone(),
                how,
                before: x.cloned(),
                after: y.cloned(),
            })
        })
        .collect()
}

/// Where a stack's `var/lib/dpkg/status` is (layer directories top first), looked up as
/// overlayfs would: the topmost layer with the file wins; a whiteout, a non-directory on the
/// way, or an opaque directory on the way ends the search below it.
pub fn dpkg_status_in(layers: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    const PARTS: [&str; 4] = ["var", "lib", "dpkg", "status"];
    for layer in layers {
        let mut path = layer.clone();
        // An opaque directory on the way: the layers below do not show through it.
        let mut sealed = false;
        for (i, part) in PARTS.iter().enumerate() {
            path.push(part);
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                if sealed {
                    return None;
                }
                break;
            };
            if meta.file_type().is_char_device() && meta.rdev() == 0 {
                return None;
            }
            if i == PARTS.len() - 1 {
                return meta.is_file().then_some(path);
            }
            if !meta.is_dir() {
                return None;
            }
            sealed |= xattr::get(&path, "trusted.overlay.opaque")
                .ok()
                .flatten()
                .is_some_and(|v| v == b"y");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\n\
        Version: 2.36-9+deb12u7\nDescription: GNU C Library\n continued line\n\n\
        Package: gone\nStatus: install ok installed\nArchitecture: all\nVersion: 1.0\n\n\
        Package: held\nStatus: hold ok installed\nArchitecture: amd64\nVersion: 1:2.0~rc1-1\n\n\
        Package: removed-but-configs\nStatus: deinstall ok config-files\nVersion: 3\n\n\
        Package: same\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5\n";

    #[test]
    fn dpkg_status_lists_installed_packages_only() {
        let installed = installed_packages(BEFORE);
        assert_eq!(installed.len(), 4, "{installed:?}");
        assert_eq!(
            installed[&("held".to_owned(), "amd64".to_owned())],
            "1:2.0~rc1-1"
        );
        assert!(!installed.keys().any(|(p, _)| p == "removed-but-configs"));
    }

    #[test]
    fn package_changes_follow_debian_version_order() {
        let after = BEFORE
            .replace("2.36-9+deb12u7", "2.36-9+deb12u14")
            .replace("1:2.0~rc1-1", "1:2.0~beta1-1")
            .replace("Package: gone", "Package: new");
        let changes = packages(BEFORE, &after);
        let shown: Vec<(&str, &str)> = changes
            .iter()
            .map(|c| (c.package.as_str(), c.how))
            .collect();
        assert_eq!(
            shown,
            [
                ("gone", "removed"),
                ("held", "downgraded"),
                ("libc6", "upgraded"),
                ("new", "added")
            ]
        );
        assert_eq!(changes[2].before.as_deref(), Some("2.36-9+deb12u7"));
        assert_eq!(changes[2].after.as_deref(), Some("2.36-9+deb12u14"));
    }
}
