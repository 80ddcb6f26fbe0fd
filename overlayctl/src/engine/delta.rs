//! The layer that turns one tree into another: from the merged view of a stack ("where you
//! are") to a target tree ("where you want to go"). New and changed entries are taken from the
//! target, deleted ones become whiteouts, a directory whose every entry is new or replaced
//! becomes opaque instead of a list of whiteouts, and a directory whose metadata changed is
//! carried with the target's metadata. The result is a layer tree whose files are read from the
//! target's root, ready for [`super::copy::copy_layer`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use super::manifest::hash_file;
use super::merge::{MergedNode, MergedView};
use super::tree::{Kind, Layer, LayerError, Meta, Node};

/// What the delta holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeltaStats {
    /// Paths the stack does not have.
    pub added: u64,
    /// Paths whose content or type changed.
    pub changed: u64,
    /// Paths whose metadata alone changed (mode, owner, times, xattrs).
    pub metadata: u64,
    /// Whiteouts.
    pub deleted: u64,
    /// Directories carried as opaque instead of whiteouts for their old entries.
    pub opaque: u64,
    /// Bytes of file content the layer will hold (hard links once).
    pub bytes: u64,
}

impl DeltaStats {
    pub fn is_empty(&self) -> bool {
        self.added + self.changed + self.metadata + self.deleted + self.opaque == 0
    }
}

/// Problems with a target tree.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error(
        "{path}: the target has a 0/0 character device, which overlayfs treats as a deletion and cannot show as a file"
    )]
    WhiteoutInTarget { path: PathBuf },
    #[error(
        "{path}: the target has a directory marked overlay-opaque; it is a layer, not a full tree (sync takes the whole new system)"
    )]
    OpaqueInTarget { path: PathBuf },
    #[error(transparent)]
    Layer(#[from] LayerError),
}

/// How files are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compare {
    /// Size, times, mode, owner and xattrs equal means unchanged (as rsync's quick check).
    #[default]
    Quick,
    /// Also hash both contents.
    Checksum,
}

/// The layer tree that, on top of `from`, shows `target`. Its root is `target.root`, so a
/// copy of it reads file contents from the target.
pub fn delta(
    from: &MergedView<'_>,
    target: &Layer,
    compare: Compare,
) -> Result<(Layer, DeltaStats), DeltaError> {
    check_target(&target.tree, &mut PathBuf::new())?;
    let mut differ = Differ {
        from,
        target_root: &target.root,
        compare,
        stats: DeltaStats::default(),
        links: HashMap::new(),
    };
    let mut tree = differ.dir(Path::new(""), &from.root, &target.tree)?;
    // Hard links: a file copied into the layer takes every other name of its inode in the
    // target along, so the links stay links.
    let mut copied_inodes = HashSet::new();
    collect_linked(&tree, &mut copied_inodes);
    let extra: Vec<PathBuf> = differ
        .links
        .iter()
        .filter(|(inode, _)| copied_inodes.contains(*inode))
        .flat_map(|(_, paths)| paths.iter().cloned())
        .collect();
    for path in extra {
        if layer_get(&tree, &path).is_none() {
            let node = target_get(&target.tree, &path).expect("linked paths come from the target");
            differ.stats.changed += 1;
            insert(&mut tree, &target.tree, &path, node.clone());
        }
    }
    let stats = DeltaStats {
        bytes: content_bytes(&tree, &mut HashSet::new()),
        ..differ.stats
    };
    let layer = Layer {
        root: target.root.clone(),
        ns: target.ns,
        tree,
        unclean: Vec::new(),
    };
    Ok((layer, stats))
}

struct Differ<'a, 'b> {
    from: &'a MergedView<'b>,
    target_root: &'a Path,
    compare: Compare,
    stats: DeltaStats,
    /// Every name of each hard-linked inode of the target.
    links: HashMap<(u64, u64), Vec<PathBuf>>,
}

impl Differ<'_, '_> {
    /// The layer's version of a directory both trees have: the target's metadata, and only the
    /// children that differ. Always returned for the root (a layer needs one); for other paths
    /// the caller drops it when nothing differs.
    fn dir(&mut self, rel: &Path, old: &MergedNode<'_>, new: &Node) -> Result<Node, DeltaError> {
        let Kind::Dir {
            children: new_children,
            ..
        } = &new.kind
        else {
            unreachable!("dir() is called for directories");
        };
        let deleted: Vec<&OsStr> = old
            .children
            .keys()
            .filter(|name| !new_children.contains_key(**name))
            .copied()
            .collect();
        let mut children = BTreeMap::new();
        for (name, child) in new_children {
            let child_rel = rel.join(name);
            let before = old.children.get(name.as_os_str());
            if let Some(node) = self.entry(&child_rel, before, child)? {
                children.insert(name.clone(), node);
            }
        }
        self.stats.deleted += deleted.len() as u64;
        // Opaque instead of whiteouts when every entry of the target's directory is in the
        // layer whole anyway (new, changed, or replacing something of another type): then the
        // layer holds nothing more, and nothing of the old directory can show through.
        let whole = |name: &OsString, child: &Node| {
            children.contains_key(name)
                && !(child.kind.is_dir()
                    && old
                        .children
                        .get(name.as_os_str())
                        .is_some_and(|b| b.node.kind.is_dir()))
        };
        let opaque = !deleted.is_empty()
            && !rel.as_os_str().is_empty()
            && new_children.iter().all(|(name, child)| whole(name, child));
        if opaque {
            self.stats.opaque += 1;
        } else {
            for name in deleted {
                children.insert(name.to_owned(), whiteout());
            }
        }
        Ok(Node {
            meta: new.meta.clone(),
            kind: Kind::Dir { opaque, children },
        })
    }

    /// The layer's entry for one path of the target, or None when the stack shows it as is.
    fn entry(
        &mut self,
        rel: &Path,
        before: Option<&MergedNode<'_>>,
        new: &Node,
    ) -> Result<Option<Node>, DeltaError> {
        let Some(before) = before else {
            self.count_subtree(rel, new, None);
            return Ok(Some(new.clone()));
        };
        if new.kind.is_dir() && before.node.kind.is_dir() {
            let dir = self.dir(rel, before, new)?;
            let changed_meta = !same_dir_meta(&before.node.meta, &new.meta);
            if changed_meta {
                self.stats.metadata += 1;
            }
            let has_children = matches!(&dir.kind, Kind::Dir { children, opaque } if *opaque || !children.is_empty());
            return Ok((changed_meta || has_children).then_some(dir));
        }
        self.note_links(rel, new);
        match self.same(rel, before, new)? {
            Same::Yes => Ok(None),
            Same::MetadataOnly => {
                self.stats.metadata += 1;
                Ok(Some(new.clone()))
            }
            Same::No => {
                self.count_subtree(rel, new, Some(before));
                Ok(Some(new.clone()))
            }
        }
    }

    /// Counts a subtree the layer takes whole from the target: the path is changed (or added
    /// when the stack lacks it), everything under it added.
    fn count_subtree(&mut self, rel: &Path, node: &Node, before: Option<&MergedNode<'_>>) {
        if before.is_some() {
            self.stats.changed += 1;
        } else {
            self.stats.added += 1;
        }
        self.note_links(rel, node);
        if let Kind::Dir { children, .. } = &node.kind {
            for (name, child) in children {
                self.count_subtree(&rel.join(name), child, None);
            }
        }
    }

    fn note_links(&mut self, rel: &Path, node: &Node) {
        if let Kind::File { inode, nlink, .. } = &node.kind
            && *nlink > 1
        {
            let paths = self.links.entry(*inode).or_default();
            if !paths.iter().any(|p| p == rel) {
                paths.push(rel.to_owned());
            }
        }
    }

    fn same(&self, rel: &Path, before: &MergedNode<'_>, new: &Node) -> Result<Same, DeltaError> {
        let old = before.node;
        let same_data = match (&old.kind, &new.kind) {
            // Quick: a different mtime means the file is copied either way (the layer must carry
            // the new time), so hashing it would only cost time.
            (Kind::File { size: a, .. }, Kind::File { size: b, .. }) => {
                a == b
                    && match self.compare {
                        Compare::Quick => old.meta.mtime == new.meta.mtime,
                        Compare::Checksum => self.same_content(rel, before)?,
                    }
            }
            (Kind::Symlink { target: a }, Kind::Symlink { target: b }) => a == b,
            (Kind::CharDevice { rdev: a }, Kind::CharDevice { rdev: b })
            | (Kind::BlockDevice { rdev: a }, Kind::BlockDevice { rdev: b }) => a == b,
            (Kind::Fifo, Kind::Fifo) | (Kind::Socket, Kind::Socket) => true,
            _ => false,
        };
        Ok(if !same_data {
            Same::No
        } else if old.meta == new.meta {
            Same::Yes
        } else {
            Same::MetadataOnly
        })
    }

    fn same_content(&self, rel: &Path, before: &MergedNode<'_>) -> Result<bool, DeltaError> {
        let ours = self.from.source_path(rel, before);
        let theirs = self.target_root.join(rel);
        let hash = |path: &Path| {
            hash_file(path).map_err(|source| LayerError::Io {
                path: path.to_owned(),
                action: "hashing the file",
                source,
            })
        };
        Ok(hash(&ours)? == hash(&theirs)?)
    }
}

enum Same {
    Yes,
    MetadataOnly,
    No,
}

/// Directory metadata compared without the mtime, which any change inside moves.
fn same_dir_meta(a: &Meta, b: &Meta) -> bool {
    a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.xattrs == b.xattrs
}

fn whiteout() -> Node {
    Node {
        meta: Meta {
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
        },
        kind: Kind::Whiteout,
    }
}

fn check_target(node: &Node, path: &mut PathBuf) -> Result<(), DeltaError> {
    match &node.kind {
        Kind::Whiteout => Err(DeltaError::WhiteoutInTarget { path: path.clone() }),
        Kind::Dir { opaque: true, .. } if !path.as_os_str().is_empty() => {
            Err(DeltaError::OpaqueInTarget { path: path.clone() })
        }
        Kind::Dir { children, .. } => {
            for (name, child) in children {
                path.push(name);
                check_target(child, path)?;
                path.pop();
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn collect_linked(node: &Node, out: &mut HashSet<(u64, u64)>) {
    match &node.kind {
        Kind::File { inode, nlink, .. } if *nlink > 1 => {
            out.insert(*inode);
        }
        Kind::Dir { children, .. } => children.values().for_each(|c| collect_linked(c, out)),
        _ => {}
    }
}

fn content_bytes(node: &Node, seen: &mut HashSet<(u64, u64)>) -> u64 {
    match &node.kind {
        Kind::File { size, inode, nlink } => {
            if *nlink > 1 && !seen.insert(*inode) {
                0
            } else {
                *size
            }
        }
        Kind::Dir { children, .. } => children.values().map(|c| content_bytes(c, seen)).sum(),
        _ => 0,
    }
}

fn layer_get<'a>(tree: &'a Node, rel: &Path) -> Option<&'a Node> {
    let mut node = tree;
    for part in rel.iter() {
        match &node.kind {
            Kind::Dir { children, .. } => node = children.get(part)?,
            _ => return None,
        }
    }
    Some(node)
}

fn target_get<'a>(tree: &'a Node, rel: &Path) -> Option<&'a Node> {
    layer_get(tree, rel)
}

/// Puts `node` at `rel` in the layer tree, creating the directories on the way with the
/// target's metadata.
fn insert(tree: &mut Node, target: &Node, rel: &Path, node: Node) {
    let parts: Vec<&OsStr> = rel.iter().collect();
    let (last, dirs) = parts.split_last().expect("a path below the root");
    let mut here = tree;
    let mut there = target;
    for part in dirs {
        there = target_get(there, Path::new(part)).expect("the target has the parents");
        let Kind::Dir { children, .. } = &mut here.kind else {
            unreachable!("parents in the layer are directories");
        };
        here = children
            .entry(OsString::from(part))
            .or_insert_with(|| Node {
                meta: there.meta.clone(),
                kind: Kind::Dir {
                    opaque: false,
                    children: BTreeMap::new(),
                },
            });
    }
    if let Kind::Dir { children, .. } = &mut here.kind {
        children.insert(OsString::from(last), node);
    }
}
