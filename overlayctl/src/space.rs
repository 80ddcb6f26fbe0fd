//! The space of layers: the bytes of file content each one holds and what removing it would
//! free. Files hard-linked between layers (a compacted layer and the layers it replaced, until
//! those are deleted) are counted once, and free nothing while another layer links them.
//! Content bytes, not allocated blocks: the same on every filesystem, and what dominates.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// One layer's space, in bytes of file content.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    /// Every file of the layer, each once.
    pub size: u64,
    /// The files whose every name is in this layer: what deleting it gives back.
    pub frees: u64,
}

/// Per inode (device, number) of one layer: its size, its links in all, its names in the layer.
type Inodes = HashMap<(u64, u64), (u64, u64, u64)>;

/// The space of each named layer directory (`layers/<name>`), from one walk of each. A layer
/// that cannot be walked (a directory only root may read, for another user) is left out.
pub fn layer_space(layers_dir: &Path, names: &[&str]) -> BTreeMap<String, Space> {
    let mut out = BTreeMap::new();
    for name in names {
        let mut inodes = Inodes::new();
        let root = layers_dir.join(name);
        if let Err(e) = walk(&root, &mut inodes) {
            log::info!("cannot measure {}: {e}", root.display());
            continue;
        }
        let mut space = Space::default();
        for &(bytes, nlink, names_here) in inodes.values() {
            space.size += bytes;
            if names_here >= nlink {
                space.frees += bytes;
            }
        }
        out.insert((*name).to_owned(), space);
    }
    out
}

fn walk(path: &Path, inodes: &mut Inodes) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for child in fs::read_dir(path)? {
            walk(&child?.path(), inodes)?;
        }
    } else if meta.is_file() {
        let entry = inodes
            .entry((meta.dev(), meta.ino()))
            .or_insert((meta.len(), meta.nlink(), 0));
        entry.2 += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_files_are_counted_once_and_free_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(a.join("d")).unwrap();
        fs::create_dir_all(&b).unwrap();
        let data = vec![7u8; 64 << 10];
        fs::write(a.join("d/own"), &data).unwrap();
        fs::write(a.join("shared"), &data).unwrap();
        fs::hard_link(a.join("d/own"), a.join("own-again")).unwrap();
        fs::hard_link(a.join("shared"), b.join("shared")).unwrap();
        let space = layer_space(dir.path(), &["a", "b", "missing"]);
        assert!(!space.contains_key("missing"));
        let file = data.len() as u64;
        // a: two files (own, with two names in a, counted once; shared).
        assert_eq!(space["a"].size, 2 * file);
        // Removing a frees its own file, not the one b links too.
        assert_eq!(space["a"].frees, file);
        assert_eq!(space["b"].size, file);
        assert_eq!(space["b"].frees, 0);
    }
}
