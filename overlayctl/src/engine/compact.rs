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
use std::path::{Path, PathBuf};

use super::tree::{Kind, Layer, Node};

/// What compaction made: the layer's tree, and where each of its files comes from.
#[derive(Debug)]
pub struct Compacted {
    pub tree: Node,
    /// For each file, the index in the run (0 is the top) of the layer that holds it.
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

/// Compacts `run` (top first) over `below` (the layers under it, top first; may be empty).
pub fn compact(run: &[Layer], below: &[Layer]) -> Compacted {
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
    below: &'a [Layer],
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
    /// Whether some layer below the run has an entry other than a whiteout at `rel`.
    fn below_has(&self, rel: &Path) -> bool {
        self.below.iter().any(|l| {
            l.get(rel)
                .is_some_and(|n| !matches!(n.kind, Kind::Whiteout))
        })
    }

    /// Whether some layer below the run has a directory at `rel` with an entry in it other than
    /// a whiteout: what an opaque mark at `rel` keeps hidden.
    fn below_has_content(&self, rel: &Path) -> bool {
        self.below.iter().any(|l| {
            l.get(rel)
                .and_then(children)
                .is_some_and(|c| c.values().any(|n| !matches!(n.kind, Kind::Whiteout)))
        })
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
                if matches!(top.kind, Kind::File { .. }) {
                    self.sources.insert(rel.clone(), layer);
                }
                self.stats.entries += 1;
                Some(top.clone())
            }
        }
    }
}
