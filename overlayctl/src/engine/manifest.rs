//! The canonical manifest of a layer and its digest: one line per entry in path order, with
//! metadata and a blake3 hash of each file's content. Equal layers have equal manifests, on any
//! machine; the digest (`blake3:` and the hash of the manifest) goes into the plan.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::tree::{Kind, Layer, LayerError, Node};

/// A layer's manifest text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub text: String,
}

impl Manifest {
    /// Builds the manifest of a layer, reading every file to hash it.
    pub fn of_layer(layer: &Layer) -> Result<Self, LayerError> {
        let mut text = String::new();
        let mut first_path_of_inode: HashMap<(u64, u64), PathBuf> = HashMap::new();
        let mut path = PathBuf::new();
        write_node(
            layer,
            &layer.tree,
            &mut path,
            &mut first_path_of_inode,
            &mut text,
        )?;
        Ok(Self { text })
    }

    /// `blake3:` and the hex hash of the text.
    pub fn digest(&self) -> String {
        format!("blake3:{}", blake3::hash(self.text.as_bytes()).to_hex())
    }

    /// The path of the first line where two manifests differ, as written in the manifest.
    pub fn first_difference(&self, other: &Manifest) -> Option<String> {
        let mut ours = self.text.lines();
        let mut theirs = other.text.lines();
        loop {
            match (ours.next(), theirs.next()) {
                (None, None) => return None,
                (Some(a), Some(b)) if a == b => continue,
                (a, b) => {
                    // The earlier path in manifest order is the one that differs first.
                    let path = |line: Option<&str>| {
                        line.and_then(|l| l.split(' ').next()).map(str::to_owned)
                    };
                    return match (path(a), path(b)) {
                        (Some(a), Some(b)) => {
                            Some(if Path::new(&a) <= Path::new(&b) { a } else { b })
                        }
                        (a, b) => a.or(b),
                    };
                }
            }
        }
    }
}

/// The blake3 hash of a file's content, in hex.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Bytes as they appear in a manifest: printable ASCII as is, everything else (and space,
/// backslash, `=`) as `\xNN`, so a line splits on spaces without ambiguity.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

fn write_node(
    layer: &Layer,
    node: &Node,
    path: &mut PathBuf,
    first_path_of_inode: &mut HashMap<(u64, u64), PathBuf>,
    out: &mut String,
) -> Result<(), LayerError> {
    let shown = if path.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        escape(path.as_os_str().as_bytes())
    };
    let _ = write!(out, "{shown} {}", node.kind.name());
    if !matches!(node.kind, Kind::Whiteout) {
        let m = &node.meta;
        let _ = write!(
            out,
            " mode={:04o} uid={} gid={} mtime={}.{:09}",
            m.mode, m.uid, m.gid, m.mtime.0, m.mtime.1
        );
    }
    match &node.kind {
        Kind::File { size, inode, nlink } => {
            let first = (*nlink > 1)
                .then(|| first_path_of_inode.get(inode))
                .flatten();
            if let Some(first) = first {
                let _ = write!(out, " link={}", escape(first.as_os_str().as_bytes()));
            } else {
                let full = layer.root.join(&*path);
                let hash = hash_file(&full).map_err(|source| LayerError::Io {
                    path: full,
                    action: "hashing",
                    source,
                })?;
                let _ = write!(out, " size={size} blake3={hash}");
                if *nlink > 1 {
                    first_path_of_inode.insert(*inode, path.clone());
                }
            }
        }
        Kind::Dir { opaque: true, .. } => out.push_str(" opaque"),
        Kind::Symlink { target } => {
            let _ = write!(out, " target={}", escape(target.as_bytes()));
        }
        Kind::CharDevice { rdev } | Kind::BlockDevice { rdev } => {
            let _ = write!(out, " rdev={rdev}");
        }
        _ => {}
    }
    for (name, value) in &node.meta.xattrs {
        let _ = write!(out, " xattr.{}={}", escape(name.as_bytes()), escape(value));
    }
    out.push('\n');
    if let Kind::Dir { children, .. } = &node.kind {
        for (name, child) in children {
            path.push(name);
            write_node(layer, child, path, first_path_of_inode, out)?;
            path.pop();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_would_break_a_line() {
        assert_eq!(escape(b"usr/lib/libc.so.6"), "usr/lib/libc.so.6");
        assert_eq!(escape(b"a b\\c=d\n\xff"), "a\\x20b\\x5cc\\x3dd\\x0a\\xff");
    }

    #[test]
    fn first_difference_names_the_earlier_path() {
        let a = Manifest {
            text: ". dir\na file x\nc file\n".into(),
        };
        let b = Manifest {
            text: ". dir\na file y\nc file\n".into(),
        };
        assert_eq!(a.first_difference(&b).as_deref(), Some("a"));
        let c = Manifest {
            text: ". dir\nb file\nc file\n".into(),
        };
        assert_eq!(a.first_difference(&c).as_deref(), Some("a"));
        assert_eq!(c.first_difference(&a).as_deref(), Some("a"));
        let d = Manifest {
            text: ". dir\na file x\n".into(),
        };
        assert_eq!(a.first_difference(&d).as_deref(), Some("c"));
        assert_eq!(a.first_difference(&a), None);
    }
}
