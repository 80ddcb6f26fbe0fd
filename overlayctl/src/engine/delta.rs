//! The layer that turns one tree into another: from the merged view of a stack ("where you
//! are") to a target tree ("where you want to go"). New and changed entries are taken from the
//! target, deleted ones become whiteouts, a directory whose every entry is new or replaced
//! becomes opaque instead of a list of whiteouts, and a directory whose metadata changed is
//! carried with the target's metadata. The result is a layer tree whose files are read from the
//! target's root, ready for [`super::copy::copy_layer`].

use std::collections::{BTreeMap, HashMap};
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
    let mut links = HashMap::new();
    target_links(&target.tree, &mut PathBuf::new(), &mut links);
    let mut stack_links: HashMap<(usize, (u64, u64)), Vec<PathBuf>> = HashMap::new();
    from.walk(&mut |rel, node| {
        if let Kind::File { inode, nlink, .. } = &node.node.kind
            && *nlink > 1
        {
            stack_links
                .entry((node.layer, *inode))
                .or_default()
                .push(rel.to_owned());
        }
    });
    let mut differ = Differ {
        from,
        target_root: &target.root,
        compare,
        stats: DeltaStats::default(),
        links,
        stack_links,
    };
    // Hard links need nothing more: a file whose names differ between the stack and the
    // target (as one inode) is copied, so every name of a copied inode is in the layer.
    let tree = differ.dir(Path::new(""), &from.root, &target.tree)?;
    // The layer's root always carries the target root's metadata; count a change of it.
    if !same_dir_meta(&from.root.node.meta, &target.tree.meta) {
        differ.stats.metadata += 1;
    }
    let stats = DeltaStats {
        bytes: tree.content_bytes(),
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
    /// Every visible name of each hard-linked inode of the stack, by layer.
    stack_links: HashMap<(usize, (u64, u64)), Vec<PathBuf>>,
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
        if let Kind::Dir { children, .. } = &node.kind {
            for (name, child) in children {
                self.count_subtree(&rel.join(name), child, None);
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
        // Names that are one file must stay one file, and separate files separate.
        let same_links = self.stack_partners(rel, before) == self.target_partners(rel, new);
        Ok(if !same_data || !same_links {
            Same::No
        } else if old.meta == new.meta {
            Same::Yes
        } else {
            Same::MetadataOnly
        })
    }

    /// The other names of a stack file's inode, sorted.
    fn stack_partners(&self, rel: &Path, before: &MergedNode<'_>) -> Vec<&Path> {
        match &before.node.kind {
            Kind::File { inode, nlink, .. } if *nlink > 1 => {
                partners(self.stack_links.get(&(before.layer, *inode)), rel)
            }
            _ => Vec::new(),
        }
    }

    /// The other names of a target file's inode, sorted.
    fn target_partners(&self, rel: &Path, new: &Node) -> Vec<&Path> {
        match &new.kind {
            Kind::File { inode, nlink, .. } if *nlink > 1 => partners(self.links.get(inode), rel),
            _ => Vec::new(),
        }
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

fn partners<'a>(group: Option<&'a Vec<PathBuf>>, rel: &Path) -> Vec<&'a Path> {
    let mut names: Vec<&Path> = group
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .filter(|p| *p != rel)
        .collect();
    names.sort();
    names
}

/// Every name of each hard-linked file of the target.
fn target_links(node: &Node, path: &mut PathBuf, out: &mut HashMap<(u64, u64), Vec<PathBuf>>) {
    match &node.kind {
        Kind::File { inode, nlink, .. } if *nlink > 1 => {
            out.entry(*inode).or_default().push(path.clone());
        }
        Kind::Dir { children, .. } => {
            for (name, child) in children {
                path.push(name);
                target_links(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mtime: i64) -> Meta {
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: (mtime, 0),
            xattrs: BTreeMap::new(),
        }
    }

    fn file(size: u64, mtime: i64, inode: u64, nlink: u64) -> Node {
        Node {
            meta: meta(mtime),
            kind: Kind::File {
                size,
                inode: (1, inode),
                nlink,
            },
        }
    }

    fn dir(children: Vec<(&str, Node)>) -> Node {
        Node {
            meta: meta(0),
            kind: Kind::Dir {
                opaque: false,
                children: children
                    .into_iter()
                    .map(|(n, c)| (OsString::from(n), c))
                    .collect(),
            },
        }
    }

    fn layer(root: &str, children: Vec<(&str, Node)>) -> Layer {
        Layer {
            root: PathBuf::from(root),
            ns: super::super::tree::XattrNs::Trusted,
            tree: dir(children),
            unclean: Vec::new(),
        }
    }

    fn names(node: &Node) -> Vec<String> {
        let mut out = Vec::new();
        fn go(node: &Node, path: String, out: &mut Vec<String>) {
            if let Kind::Dir { children, opaque } = &node.kind {
                if *opaque {
                    out.push(format!("{path}/ (opaque)"));
                }
                for (name, child) in children {
                    let p = format!("{path}/{}", name.to_string_lossy());
                    if matches!(child.kind, Kind::Whiteout) {
                        out.push(format!("{p} (whiteout)"));
                    } else {
                        out.push(p.clone());
                    }
                    go(child, p, out);
                }
            }
        }
        go(node, String::new(), &mut out);
        out
    }

    fn run(stack: &[Layer], target: &Layer) -> (Vec<String>, DeltaStats) {
        let view = MergedView::new(stack);
        let (layer, stats) = delta(&view, target, Compare::Quick).unwrap();
        (names(&layer.tree), stats)
    }

    #[test]
    fn unchanged_changed_new_deleted() {
        let stack = [layer(
            "/a",
            vec![
                ("same", file(1, 1, 1, 1)),
                ("grown", file(1, 1, 2, 1)),
                ("touched", file(1, 1, 3, 1)),
                ("gone", file(1, 1, 4, 1)),
            ],
        )];
        let mut chmod = file(1, 1, 13, 1);
        chmod.meta.mode = 0o600;
        let target = layer(
            "/t",
            vec![
                ("same", file(1, 1, 11, 1)),
                ("grown", file(2, 1, 12, 1)),
                ("touched", chmod),
                ("new", file(1, 1, 14, 1)),
            ],
        );
        let (names, stats) = run(&stack, &target);
        assert_eq!(names, ["/gone (whiteout)", "/grown", "/new", "/touched"]);
        assert_eq!(
            (stats.added, stats.changed, stats.metadata, stats.deleted),
            (1, 1, 1, 1)
        );
        assert_eq!(stats.bytes, 4);
    }

    #[test]
    fn a_directory_whose_entries_are_all_new_becomes_opaque() {
        let stack = [layer(
            "/a",
            vec![(
                "lib",
                dir(vec![("old1", file(1, 1, 1, 1)), ("old2", file(1, 1, 2, 1))]),
            )],
        )];
        let target = layer("/t", vec![("lib", dir(vec![("new", file(1, 1, 3, 1))]))]);
        let (names, stats) = run(&stack, &target);
        assert_eq!(names, ["/lib", "/lib/ (opaque)", "/lib/new"]);
        assert_eq!((stats.opaque, stats.deleted), (1, 2));
        // One entry kept: whiteouts instead, and the kept entry is not copied.
        let target = layer(
            "/t",
            vec![(
                "lib",
                dir(vec![("old1", file(1, 1, 1, 1)), ("new", file(1, 1, 3, 1))]),
            )],
        );
        let (names, _) = run(&stack, &target);
        assert_eq!(names, ["/lib", "/lib/new", "/lib/old2 (whiteout)"]);
    }

    #[test]
    fn names_of_one_file_stay_together_and_apart() {
        // The target links x and y; the stack has them apart, y already equal: y is copied too,
        // so the layer holds both names of the one file.
        let stack = [layer(
            "/a",
            vec![("x", file(1, 1, 1, 1)), ("y", file(2, 2, 2, 1))],
        )];
        let target = layer("/t", vec![("x", file(2, 2, 9, 2)), ("y", file(2, 2, 9, 2))]);
        assert_eq!(run(&stack, &target).0, ["/x", "/y"]);
        // The stack links them and the target separates them, equal in content and metadata:
        // both are copied as separate files.
        let stack = [layer(
            "/a",
            vec![("x", file(2, 2, 5, 2)), ("y", file(2, 2, 5, 2))],
        )];
        let target = layer("/t", vec![("x", file(2, 2, 6, 1)), ("y", file(2, 2, 7, 1))]);
        assert_eq!(run(&stack, &target).0, ["/x", "/y"]);
        // Linked the same way in both: nothing to do.
        let target = layer("/t", vec![("x", file(2, 2, 8, 2)), ("y", file(2, 2, 8, 2))]);
        assert!(run(&stack, &target).1.is_empty());
    }

    #[test]
    fn a_change_of_the_root_alone_is_a_change() {
        let stack = [layer("/a", vec![("x", file(1, 1, 1, 1))])];
        let mut target = layer("/t", vec![("x", file(1, 1, 2, 1))]);
        target.tree.meta.mode = 0o700;
        let (names, stats) = run(&stack, &target);
        assert!(names.is_empty());
        assert_eq!(stats.metadata, 1);
        assert!(!stats.is_empty());
    }

    #[test]
    fn a_target_with_whiteouts_is_refused() {
        let stack = [layer("/a", vec![("x", file(1, 1, 1, 1))])];
        let mut wh = file(0, 0, 0, 1);
        wh.kind = Kind::Whiteout;
        let target = layer("/t", vec![("etc", dir(vec![("x", wh)]))]);
        let view = MergedView::new(&stack);
        let e = delta(&view, &target, Compare::Quick).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("etc/x: the target has a 0/0 character device"),
            "{e}"
        );
    }
}
