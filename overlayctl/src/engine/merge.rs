//! The merged view of a stack: the tree the kernel's overlayfs would show for the same layers,
//! computed from the layer trees alone, with no mount and no privilege.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::tree::{Kind, Layer, Node};

/// One path of the merged view: the layer that provides it and, for a directory, its merged
/// children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedNode<'a> {
    /// Index into the stack (0 is the top layer).
    pub layer: usize,
    /// The entry as that layer has it. For a directory only its metadata counts: the children
    /// are in `children`.
    pub node: &'a Node,
    pub children: BTreeMap<&'a OsStr, MergedNode<'a>>,
}

/// A stack's merged view.
#[derive(Debug)]
pub struct MergedView<'a> {
    pub layers: &'a [Layer],
    pub root: MergedNode<'a>,
}

impl<'a> MergedView<'a> {
    /// Merges `layers`, top first, as overlayfs does: the topmost entry of a path wins; a
    /// whiteout hides the path below it; a directory merges with the directories below it until
    /// one is opaque or something that is not a directory stands at that path (layer roots always
    /// merge). Panics on an empty stack, which has no root.
    pub fn new(layers: &'a [Layer]) -> Self {
        assert!(!layers.is_empty(), "a merged view needs at least one layer");
        // The kernel ignores `opaque` on a layer's root: every root merges.
        let sources: Vec<(usize, &Node)> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| (i, &l.tree))
            .collect();
        Self {
            layers,
            root: merge_dir(&sources),
        }
    }

    /// Visits every path, parents before children, children in name order. The root is the
    /// empty path.
    pub fn walk(&self, visit: &mut dyn FnMut(&Path, &MergedNode<'a>)) {
        fn go<'a>(
            path: &mut PathBuf,
            node: &MergedNode<'a>,
            visit: &mut dyn FnMut(&Path, &MergedNode<'a>),
        ) {
            visit(path, node);
            for (name, child) in &node.children {
                path.push(name);
                go(path, child, visit);
                path.pop();
            }
        }
        go(&mut PathBuf::new(), &self.root, visit);
    }

    /// Where the content of a merged path is on disk.
    pub fn source_path(&self, rel: &Path, node: &MergedNode<'_>) -> PathBuf {
        self.layers[node.layer].root.join(rel)
    }

    /// The merged node at a relative path.
    pub fn get(&self, rel: &Path) -> Option<&MergedNode<'a>> {
        let mut node = &self.root;
        for part in rel.iter() {
            node = node.children.get(part)?;
        }
        Some(node)
    }

    /// The number of paths, the root included.
    pub fn len(&self) -> usize {
        let mut count = 0;
        self.walk(&mut |_, _| count += 1);
        count
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Merges directories standing at the same path, top first; the first gives the metadata.
fn merge_dir<'a>(sources: &[(usize, &'a Node)]) -> MergedNode<'a> {
    let children_of = |node: &'a Node| match &node.kind {
        Kind::Dir { children, .. } => Some(children),
        _ => None,
    };
    let names: BTreeSet<&'a OsStr> = sources
        .iter()
        .filter_map(|(_, node)| children_of(node))
        .flat_map(|children| children.keys().map(|k| k.as_os_str()))
        .collect();

    let mut merged = BTreeMap::new();
    for name in names {
        let mut found = sources
            .iter()
            .enumerate()
            .filter_map(|(at, (layer, dir))| Some((at, *layer, children_of(dir)?.get(name)?)));
        let Some((at, layer, top)) = found.next() else {
            continue;
        };
        match &top.kind {
            Kind::Whiteout => {}
            Kind::Dir { opaque, .. } => {
                let mut dirs = vec![(layer, top)];
                if !opaque {
                    for (lower, dir) in &sources[at + 1..] {
                        match children_of(dir).and_then(|c| c.get(name)) {
                            None => continue,
                            Some(
                                node @ Node {
                                    kind: Kind::Dir { opaque, .. },
                                    ..
                                },
                            ) => {
                                dirs.push((*lower, node));
                                if *opaque {
                                    break;
                                }
                            }
                            // A whiteout or a non-directory ends the merge.
                            Some(_) => break,
                        }
                    }
                }
                merged.insert(name, merge_dir(&dirs));
            }
            _ => {
                merged.insert(
                    name,
                    MergedNode {
                        layer,
                        node: top,
                        children: BTreeMap::new(),
                    },
                );
            }
        }
    }
    let (layer, node) = sources[0];
    MergedNode {
        layer,
        node,
        children: merged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tree::{Meta, XattrNs};

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
        }
    }

    fn file(size: u64) -> Node {
        Node {
            meta: meta(0o644),
            kind: Kind::File {
                size,
                inode: (0, size),
                nlink: 1,
            },
        }
    }

    fn whiteout() -> Node {
        Node {
            meta: meta(0),
            kind: Kind::Whiteout,
        }
    }

    fn link(target: &str) -> Node {
        Node {
            meta: meta(0o777),
            kind: Kind::Symlink {
                target: target.into(),
            },
        }
    }

    fn dir(mode: u32, opaque: bool, children: Vec<(&str, Node)>) -> Node {
        Node {
            meta: meta(mode),
            kind: Kind::Dir {
                opaque,
                children: children.into_iter().map(|(n, c)| (n.into(), c)).collect(),
            },
        }
    }

    fn layer(children: Vec<(&str, Node)>) -> Layer {
        Layer {
            root: PathBuf::from("/nowhere"),
            ns: XattrNs::Trusted,
            tree: dir(0o755, false, children),
            unclean: Vec::new(),
        }
    }

    /// Every merged path with its kind and the layer it comes from.
    fn view(layers: &[Layer]) -> Vec<String> {
        let view = MergedView::new(layers);
        let mut out = Vec::new();
        view.walk(&mut |path, node| {
            if !path.as_os_str().is_empty() {
                out.push(format!(
                    "{} {} L{}",
                    path.display(),
                    node.node.kind.name(),
                    node.layer
                ));
            }
        });
        out
    }

    #[test]
    fn the_topmost_entry_wins_and_directories_merge() {
        let stack = [
            layer(vec![
                ("a", file(2)),
                ("d", dir(0o700, false, vec![("top", file(1))])),
            ]),
            layer(vec![
                ("a", file(1)),
                ("b", file(1)),
                ("d", dir(0o755, false, vec![("low", file(1))])),
            ]),
        ];
        assert_eq!(
            view(&stack),
            [
                "a file L0",
                "b file L1",
                "d dir L0",
                "d/low file L1",
                "d/top file L0"
            ]
        );
        let merged = MergedView::new(&stack);
        assert_eq!(
            merged.get(Path::new("d")).unwrap().node.meta.mode,
            0o700,
            "metadata from the top"
        );
        assert_eq!(merged.len(), 6);
    }

    /// (what the upper layer has at `x`, what the lower has at `x`, the merged result)
    #[test]
    fn whiteouts_opaque_directories_and_type_changes() {
        let lower_dir = || dir(0o755, false, vec![("old", file(1))]);
        let cases: Vec<(&str, Node, Node, Vec<&str>)> = vec![
            ("whiteout hides a file", whiteout(), file(1), vec![]),
            (
                "whiteout hides a directory and all below",
                whiteout(),
                lower_dir(),
                vec![],
            ),
            (
                "whiteout over nothing shows nothing",
                whiteout(),
                whiteout(),
                vec![],
            ),
            (
                "opaque directory hides the lower one's children",
                dir(0o755, true, vec![("new", file(1))]),
                lower_dir(),
                vec!["x dir L0", "x/new file L0"],
            ),
            (
                "plain directory merges",
                dir(0o755, false, vec![("new", file(1))]),
                lower_dir(),
                vec!["x dir L0", "x/new file L0", "x/old file L1"],
            ),
            (
                "directory replaces a file",
                dir(0o755, false, vec![]),
                file(1),
                vec!["x dir L0"],
            ),
            (
                "file replaces a directory",
                file(1),
                lower_dir(),
                vec!["x file L0"],
            ),
            (
                "symlink replaces a directory",
                link("old"),
                lower_dir(),
                vec!["x symlink L0"],
            ),
            (
                "directory replaces a symlink",
                dir(0o755, false, vec![]),
                link("elsewhere"),
                vec!["x dir L0"],
            ),
            (
                "whiteout inside a merged directory",
                dir(0o755, false, vec![("old", whiteout())]),
                lower_dir(),
                vec!["x dir L0"],
            ),
        ];
        for (what, upper, lower, want) in cases {
            let stack = [layer(vec![("x", upper)]), layer(vec![("x", lower)])];
            assert_eq!(view(&stack), want, "{what}");
        }
    }

    #[test]
    fn a_merge_stops_at_a_lower_non_directory_or_whiteout() {
        let stack = [
            layer(vec![("d", dir(0o755, false, vec![("a", file(1))]))]),
            layer(vec![("d", whiteout())]),
            layer(vec![("d", dir(0o755, false, vec![("hidden", file(1))]))]),
        ];
        assert_eq!(view(&stack), ["d dir L0", "d/a file L0"]);
        let stack = [
            layer(vec![("d", dir(0o755, false, vec![("a", file(1))]))]),
            layer(vec![("d", dir(0o755, true, vec![("b", file(1))]))]),
            layer(vec![("d", dir(0o755, false, vec![("hidden", file(1))]))]),
        ];
        assert_eq!(view(&stack), ["d dir L0", "d/a file L0", "d/b file L1"]);
        // A layer without the directory is passed over, not a stop.
        let stack = [
            layer(vec![("d", dir(0o755, false, vec![("a", file(1))]))]),
            layer(vec![]),
            layer(vec![("d", dir(0o755, false, vec![("c", file(1))]))]),
        ];
        assert_eq!(view(&stack), ["d dir L0", "d/a file L0", "d/c file L2"]);
    }

    #[test]
    fn an_opaque_layer_root_is_ignored_as_the_kernel_does() {
        let mut top = layer(vec![]);
        top.tree = dir(0o755, true, vec![("a", file(1))]);
        let stack = [top, layer(vec![("b", file(1))])];
        assert_eq!(view(&stack), ["a file L0", "b file L1"]);
    }
}
