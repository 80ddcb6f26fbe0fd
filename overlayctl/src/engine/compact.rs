//! Compaction: the one layer that, over the layers below a run of adjacent layers, shows exactly
//! what the run showed. The topmost entry of each path wins, as in a merged view, but the result
//! is a layer, not a tree: a whiteout survives where it still hides something below the run, an
//! opaque directory stays opaque where something below would otherwise show through, and a
//! directory the run cut off from what is below (by a whiteout, a file or an opaque directory
//! under it in the run) becomes opaque where that matters. What hides nothing is dropped.
//!
//! "Below" is every layer under the run, disabled ones included: a whiteout is dropped only when
//! no layer below has anything at its path, so re-enabling a layer later cannot make a deleted
//! file reappear.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, ResolveFlags, fstat, openat2, statat};

use super::tree::{Kind, Layer, LayerError, Node, XattrNs, io_at, open_dir};

/// What compaction made: the layer's tree, and where each of its files comes from.
#[derive(Debug)]
pub struct Compacted {
    pub tree: Node,
    /// For each entry other than a directory or a whiteout, the index in the run (0 is the
    /// top) of the layer that holds it.
    pub sources: HashMap<PathBuf, usize>,
    pub stats: CompactStats,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactStats {
    /// Entries of the new layer, its root included.
    pub entries: u64,
    /// Whiteouts dropped because nothing below the run has their path.
    pub whiteouts_dropped: u64,
    /// Opaque directories left plain because nothing below would show through.
    pub opaque_dropped: u64,
}

/// The layers below a run, looked up path by path on disk where a whiteout or a cut-off
/// directory asks (never walked whole: a compaction over a large base reads only what it needs).
/// Lookups never pass through a symlink, as overlayfs's own lookup would not.
#[derive(Debug)]
pub struct Below {
    roots: Vec<(OwnedFd, PathBuf)>,
    ns: XattrNs,
}

/// What one layer has at a path.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Nothing,
    Whiteout,
    Dir,
    Other,
}

impl Below {
    /// Opens the layers (top first; may be none).
    pub fn open(roots: &[PathBuf], ns: XattrNs) -> Result<Self, LayerError> {
        let roots = roots
            .iter()
            .map(|root| {
                open_dir(CWD, root)
                    .map(|fd| (fd, root.clone()))
                    .map_err(io_at(root, "opening the layer"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { roots, ns })
    }

    fn is_xattr_whiteout(&self, path: &Path) -> bool {
        let mut buf = [0u8; 0];
        rustix::fs::lgetxattr(path, self.ns.name("whiteout").as_str(), &mut buf).is_ok()
    }

    fn found(&self, st: &rustix::fs::Stat, path: &Path) -> Found {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Found::Dir,
            FileType::CharacterDevice if st.st_rdev == 0 => Found::Whiteout,
            FileType::RegularFile if st.st_size == 0 && self.is_xattr_whiteout(path) => {
                Found::Whiteout
            }
            _ => Found::Other,
        }
    }

    fn lookup(&self, layer: usize, rel: &Path) -> Found {
        let (fd, root) = &self.roots[layer];
        let opened = openat2(
            fd,
            rel,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
        );
        match opened.and_then(|fd| fstat(&fd)) {
            Ok(st) => self.found(&st, &root.join(rel)),
            // Missing, or behind a symlink or a file: not in this layer.
            Err(_) => Found::Nothing,
        }
    }

    /// Whether some layer has an entry other than a whiteout at `rel`.
    fn has(&self, rel: &Path) -> bool {
        (0..self.roots.len()).any(|i| matches!(self.lookup(i, rel), Found::Dir | Found::Other))
    }

    /// Whether some layer has a directory at `rel` holding an entry other than a whiteout:
    /// what an opaque mark at `rel` keeps hidden.
    fn has_content(&self, rel: &Path) -> bool {
        (0..self.roots.len()).any(|i| {
            if self.lookup(i, rel) != Found::Dir {
                return false;
            }
            let (fd, root) = &self.roots[i];
            let Ok(dir) = openat2(
                fd,
                rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
            ) else {
                return false;
            };
            let Ok(entries) = Dir::read_from(&dir) else {
                return false;
            };
            entries.flatten().any(|entry| {
                let name = OsStr::from_bytes(entry.file_name().to_bytes());
                if name == "." || name == ".." {
                    return false;
                }
                statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| self.found(&st, &root.join(rel).join(name)) != Found::Whiteout)
            })
        })
    }
}

/// Compacts `run` (top first) over `below` (the layers under it).
pub fn compact(run: &[Layer], below: &Below) -> Compacted {
    assert!(!run.is_empty(), "compaction needs at least one layer");
    let mut merger = Merger {
        below,
        sources: HashMap::new(),
        stats: CompactStats::default(),
    };
    // Layer roots always merge, whatever their opaque marks say; the kernel ignores those.
    let roots: Vec<(usize, &Node)> = run.iter().enumerate().map(|(i, l)| (i, &l.tree)).collect();
    let tree = merger.dir(&mut PathBuf::new(), &roots, false, false);
    Compacted {
        tree,
        sources: merger.sources,
        stats: merger.stats,
    }
}

struct Merger<'a> {
    below: &'a Below,
    sources: HashMap<PathBuf, usize>,
    stats: CompactStats,
}

fn children(node: &Node) -> Option<&BTreeMap<OsString, Node>> {
    match &node.kind {
        Kind::Dir { children, .. } => Some(children),
        _ => None,
    }
}

impl Merger<'_> {
    fn below_has(&self, rel: &Path) -> bool {
        self.below.has(rel)
    }

    fn below_has_content(&self, rel: &Path) -> bool {
        self.below.has_content(rel)
    }

    /// Merges the directories standing at `rel` in the run, top first. `sealed`: something
    /// above (an ancestor cut off from below) already hides everything below at `rel`. `cut`:
    /// the run itself ends this directory's merge (an opaque directory, or anything else, under
    /// its topmost entry), so it shows nothing of what is below: it is marked opaque when
    /// something below would otherwise show through.
    fn dir(&mut self, rel: &mut PathBuf, dirs: &[(usize, &Node)], sealed: bool, cut: bool) -> Node {
        let names: BTreeSet<&OsStr> = dirs
            .iter()
            .filter_map(|(_, d)| children(d))
            .flat_map(|c| c.keys().map(OsString::as_os_str))
            .collect();
        let mut merged = BTreeMap::new();
        for name in names {
            rel.push(name);
            // This name's entries in the run, top first.
            let entries: Vec<(usize, &Node)> = dirs
                .iter()
                .filter_map(|(i, d)| Some((*i, children(d)?.get(name)?)))
                .collect();
            if let Some(node) = self.entry(rel, &entries, sealed || cut) {
                merged.insert(name.to_owned(), node);
            }
            rel.pop();
        }
        let (_, top) = dirs[0];
        let opaque = cut && !sealed && self.below_has_content(rel);
        if !opaque && matches!(top.kind, Kind::Dir { opaque: true, .. }) {
            self.stats.opaque_dropped += 1;
        }
        self.stats.entries += 1;
        Node {
            meta: top.meta.clone(),
            kind: Kind::Dir {
                opaque,
                children: merged,
            },
        }
    }

    /// The new layer's entry for one path, from the run's entries there (top first); None when
    /// it would be a whiteout hiding nothing. `sealed`: the directory holding it is cut off from
    /// below.
    fn entry(
        &mut self,
        rel: &mut PathBuf,
        entries: &[(usize, &Node)],
        sealed: bool,
    ) -> Option<Node> {
        let (layer, top) = entries[0];
        match &top.kind {
            Kind::Whiteout => {
                if sealed || !self.below_has(rel) {
                    self.stats.whiteouts_dropped += 1;
                    return None;
                }
                self.stats.entries += 1;
                Some(top.clone())
            }
            Kind::Dir { opaque, .. } => {
                // The directories that merge with the top one: down the run until an opaque
                // directory (included) or anything else (which ends the merge).
                let mut dirs = vec![(layer, top)];
                let mut cut = *opaque;
                for &(lower, node) in &entries[1..] {
                    if cut {
                        break;
                    }
                    match &node.kind {
                        Kind::Dir { opaque, .. } => {
                            dirs.push((lower, node));
                            cut = *opaque;
                        }
                        _ => cut = true,
                    }
                }
                Some(self.dir(rel, &dirs, sealed, cut))
            }
            _ => {
                self.sources.insert(rel.clone(), layer);
                self.stats.entries += 1;
                Some(top.clone())
            }
        }
    }
}
