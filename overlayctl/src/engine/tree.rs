//! Reading one layer directory in overlayfs lower format into a tree: every entry with its
//! metadata, whiteouts and opaque directories recognised as the kernel recognises them.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Which xattr namespace overlayfs keeps its own attributes in for a layer: `trusted.overlay.*`
/// (the default, needs root to read) or `user.overlay.*` (the `userxattr` mount option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum XattrNs {
    #[default]
    Trusted,
    User,
}

impl XattrNs {
    /// `trusted.overlay.` or `user.overlay.`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Trusted => "trusted.overlay.",
            Self::User => "user.overlay.",
        }
    }

    /// The full name of one of overlay's attributes, such as `trusted.overlay.opaque`.
    pub fn name(self, attr: &str) -> String {
        format!("{}{attr}", self.prefix())
    }

    /// Whether an xattr is overlayfs's own: hidden by the kernel in a merged view, and never part
    /// of a layer's content.
    pub fn is_private(self, name: &OsStr) -> bool {
        name.as_bytes().starts_with(self.prefix().as_bytes())
    }
}

/// What every entry has, whiteouts aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Extended attributes other than overlayfs's own, by name.
    pub xattrs: Xattrs,
}

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub meta: Meta,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File {
        size: u64,
        /// (device, inode): equal for hard links within a layer.
        inode: (u64, u64),
        nlink: u64,
    },
    Dir {
        /// `overlay.opaque = "y"`: nothing of lower layers shows through.
        opaque: bool,
        children: BTreeMap<OsString, Node>,
    },
    Symlink {
        target: OsString,
    },
    CharDevice {
        rdev: u64,
    },
    BlockDevice {
        rdev: u64,
    },
    Fifo,
    Socket,
    /// Hides the same path in lower layers: a 0/0 character device, or a zero-size file with
    /// `overlay.whiteout` in a directory marked `overlay.opaque = "x"`.
    Whiteout,
}

impl Kind {
    pub fn is_dir(&self) -> bool {
        matches!(self, Self::Dir { .. })
    }

    /// A short name for messages and manifests.
    pub fn name(&self) -> &'static str {
        match self {
            Self::File { .. } => "file",
            Self::Dir { .. } => "dir",
            Self::Symlink { .. } => "symlink",
            Self::CharDevice { .. } => "char",
            Self::BlockDevice { .. } => "block",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
            Self::Whiteout => "whiteout",
        }
    }
}

/// Problems reading a layer, each naming the path.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "{path}: has `{attr}`, which a plain layer never has (it comes from an overlay mounted with redirect_dir or metacopy on); layers must be made with redirect_dir=off,metacopy=off"
    )]
    NotPlain { path: PathBuf, attr: String },
    #[error(
        "{path}: has `{attr}` but is {what}, so overlayfs does not take it for a whiteout; a whiteout is a 0/0 character device or an empty file"
    )]
    MalformedWhiteout {
        path: PathBuf,
        attr: String,
        what: String,
    },
    #[error(
        "{path}: an xattr whiteout (`{attr}`) in a directory not marked `{marker}` = \"x\"; kernels before 6.8 show it as an empty file and newer ones list it but cannot open it"
    )]
    UnmarkedXattrWhiteout {
        path: PathBuf,
        attr: String,
        marker: String,
    },
    #[error(
        "{path}: `{attr}` is {value:?}; overlayfs knows \"y\" (opaque) and \"x\" (holds xattr whiteouts)"
    )]
    BadOpaque {
        path: PathBuf,
        attr: String,
        value: String,
    },
    #[error("{path}: the layer's top is not a directory")]
    NotADirectory { path: PathBuf },
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// A layer read into memory, with the path it was read from (file contents stay on disk).
#[derive(Debug)]
pub struct Layer {
    pub root: PathBuf,
    pub ns: XattrNs,
    pub tree: Node,
    /// What the kernel copes with but a clean layer must not have; `add-layer` refuses these.
    pub unclean: Vec<LayerError>,
}

impl Layer {
    /// Reads the layer at `root`. Symlinks are never followed. Layers made by an overlay with
    /// redirects or metacopy are refused, as are malformed whiteouts.
    pub fn read(root: &Path, ns: XattrNs) -> Result<Self, LayerError> {
        let meta = fs::symlink_metadata(root).map_err(io_err(root, "reading the layer"))?;
        if !meta.is_dir() {
            return Err(LayerError::NotADirectory {
                path: root.to_owned(),
            });
        }
        let mut unclean = Vec::new();
        let tree = read_node(root, &meta, ns, false, &mut unclean)?;
        Ok(Self {
            root: root.to_owned(),
            ns,
            tree,
            unclean,
        })
    }

    /// The node at a relative path, if the layer has one.
    pub fn get(&self, rel: &Path) -> Option<&Node> {
        let mut node = &self.tree;
        for part in rel.iter() {
            match &node.kind {
                Kind::Dir { children, .. } => node = children.get(part)?,
                _ => return None,
            }
        }
        Some(node)
    }
}

/// Extended attributes by name.
pub type Xattrs = BTreeMap<OsString, Vec<u8>>;

/// An entry's xattrs: the plain ones, and overlayfs's own by their short name (`opaque`, …).
fn read_xattrs(
    path: &Path,
    ns: XattrNs,
) -> Result<(Xattrs, BTreeMap<String, Vec<u8>>), LayerError> {
    let mut plain = BTreeMap::new();
    let mut private = BTreeMap::new();
    let names = xattr::list(path).map_err(io_err(path, "listing extended attributes"))?;
    for name in names {
        // An attribute removed between list and get is simply gone.
        let Some(value) =
            xattr::get(path, &name).map_err(io_err(path, "reading an extended attribute"))?
        else {
            continue;
        };
        if ns.is_private(&name) {
            private.insert(
                name.to_string_lossy()[ns.prefix().len()..].to_owned(),
                value,
            );
        } else {
            plain.insert(name, value);
        }
    }
    Ok((plain, private))
}

/// Reads one entry as the kernel (6.8 and later) looks it up: an empty regular file with
/// `overlay.whiteout` is a whiteout wherever it is. Only a parent marked `opaque = "x"` makes the
/// kernel's readdir hide it too, so one elsewhere is noted in `unclean`.
fn read_node(
    path: &Path,
    meta: &fs::Metadata,
    ns: XattrNs,
    in_x_dir: bool,
    unclean: &mut Vec<LayerError>,
) -> Result<Node, LayerError> {
    let file_type = meta.file_type();
    let (xattrs, private) = read_xattrs(path, ns)?;
    for attr in ["redirect", "metacopy"] {
        if private.contains_key(attr) {
            return Err(LayerError::NotPlain {
                path: path.to_owned(),
                attr: ns.name(attr),
            });
        }
    }
    let node_meta = Meta {
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: (meta.mtime(), meta.mtime_nsec() as u32),
        xattrs,
    };
    let whiteout_attr = private.contains_key("whiteout");
    let xattr_whiteout = whiteout_attr && file_type.is_file() && meta.len() == 0;
    if whiteout_attr && !xattr_whiteout {
        unclean.push(LayerError::MalformedWhiteout {
            path: path.to_owned(),
            attr: ns.name("whiteout"),
            what: if file_type.is_file() {
                format!("a file of {} bytes", meta.len())
            } else {
                "not a regular file".to_owned()
            },
        });
    } else if xattr_whiteout && !in_x_dir {
        unclean.push(LayerError::UnmarkedXattrWhiteout {
            path: path.to_owned(),
            attr: ns.name("whiteout"),
            marker: ns.name("opaque"),
        });
    }
    let kind = if file_type.is_dir() {
        let (opaque, x_dir) = match private.get("opaque").map(Vec::as_slice) {
            None => (false, false),
            Some(b"y") => (true, false),
            Some(b"x") => (false, true),
            Some(other) => {
                return Err(LayerError::BadOpaque {
                    path: path.to_owned(),
                    attr: ns.name("opaque"),
                    value: String::from_utf8_lossy(other).into_owned(),
                });
            }
        };
        let mut children = BTreeMap::new();
        let entries = fs::read_dir(path).map_err(io_err(path, "reading the directory"))?;
        for entry in entries {
            let entry = entry.map_err(io_err(path, "reading the directory"))?;
            let child = entry.path();
            let child_meta =
                fs::symlink_metadata(&child).map_err(io_err(&child, "reading metadata"))?;
            let node = read_node(&child, &child_meta, ns, x_dir, unclean)?;
            children.insert(entry.file_name(), node);
        }
        Kind::Dir { opaque, children }
    } else if file_type.is_file() {
        if xattr_whiteout {
            Kind::Whiteout
        } else {
            Kind::File {
                size: meta.len(),
                inode: (meta.dev(), meta.ino()),
                nlink: meta.nlink(),
            }
        }
    } else if file_type.is_symlink() {
        Kind::Symlink {
            target: fs::read_link(path)
                .map_err(io_err(path, "reading the link"))?
                .into_os_string(),
        }
    } else if file_type.is_char_device() {
        if meta.rdev() == 0 {
            Kind::Whiteout
        } else {
            Kind::CharDevice { rdev: meta.rdev() }
        }
    } else if file_type.is_block_device() {
        Kind::BlockDevice { rdev: meta.rdev() }
    } else if file_type.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    Ok(Node {
        meta: node_meta,
        kind,
    })
}
