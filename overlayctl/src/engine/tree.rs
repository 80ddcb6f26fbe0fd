//! Reading one layer directory in overlayfs lower format into a tree: every entry with its
//! metadata, whiteouts and opaque directories recognised as the kernel recognises them.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, Stat, fstat, openat, statat};
use rustix::io::Errno;

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

impl Node {
    /// Bytes of file content in this subtree, each hard-linked file once.
    pub fn content_bytes(&self) -> u64 {
        fn go(node: &Node, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
            match &node.kind {
                Kind::File { size, inode, nlink } if *nlink <= 1 || seen.insert(*inode) => *size,
                Kind::Dir { children, .. } => children
                    .values()
                    .map(|c| go(c, seen))
                    .fold(0, u64::saturating_add),
                _ => 0,
            }
        }
        go(self, &mut std::collections::HashSet::new())
    }
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
    #[error(
        "{path}: {found}, not what the layer's manifest records: the layer changed on disk since it was added (`overlayctl verify` checks it)"
    )]
    Changed { path: PathBuf, found: String },
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
        "{path}: is on another filesystem (a mount point); a layer or a target tree is read from one filesystem"
    )]
    OtherFilesystem { path: PathBuf },
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
    #[error(
        "{path}: a whiteout inside an opaque directory hides nothing, and the kernel lists it as an entry that cannot be opened"
    )]
    WhiteoutInOpaque { path: PathBuf },
    #[error("{path}: the layer's top is not a directory")]
    NotADirectory { path: PathBuf },
}

/// Maps an I/O error or errno to a [`LayerError`] naming the path and what was being done.
pub(crate) fn io_at<'a, E: Into<io::Error>>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(E) -> LayerError + 'a {
    move |e| LayerError::Io {
        path: path.to_owned(),
        action,
        source: e.into(),
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
    /// Reads the layer at `root`, walking it through directory handles that never follow a
    /// symlink. Layers made by an overlay with redirects or metacopy are refused; entries a
    /// clean layer must not have are collected in `unclean`.
    pub fn read(root: &Path, ns: XattrNs) -> Result<Self, LayerError> {
        let fd = open_dir(CWD, root).map_err(|e| match e {
            Errno::NOTDIR | Errno::LOOP => LayerError::NotADirectory {
                path: root.to_owned(),
            },
            e => LayerError::Io {
                path: root.to_owned(),
                action: "reading the layer",
                source: e.into(),
            },
        })?;
        let st = fstat(&fd).map_err(io_at(root, "reading metadata"))?;
        let mut reader = Reader {
            ns,
            unclean: Vec::new(),
            dev: st.st_dev,
        };
        let tree = reader.node(root, &st, Some(fd), false)?;
        Ok(Self {
            root: root.to_owned(),
            ns,
            tree,
            unclean: reader.unclean,
        })
    }

    /// Reads several layers at once, one thread per layer, up to four per core: reading is
    /// mostly waiting for the disk on a cold cache, and a disk serves several readers at once.
    pub fn read_all(roots: &[PathBuf], ns: XattrNs) -> Result<Vec<Self>, LayerError> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get() * 4)
            .min(roots.len())
            .max(1);
        let chunk = roots.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = roots
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().map(|r| Self::read(r, ns)).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a layer reader panicked"))
                .collect()
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

/// Calls a list/get xattr function with a buffer that grows on ERANGE. Most entries have no
/// xattrs, so one call with a small buffer usually answers.
fn with_buffer(
    mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 16, 0),
            Err(e) => return Err(e),
        }
    }
}

/// An entry's xattrs: the plain ones, and overlayfs's own by their short name (`opaque`, …).
/// Reads through the path, never following a final symlink.
fn read_xattrs(
    path: &Path,
    ns: XattrNs,
) -> Result<(Xattrs, BTreeMap<String, Vec<u8>>), LayerError> {
    let mut plain = BTreeMap::new();
    let mut private = BTreeMap::new();
    let short = super::longpath::short(path).map_err(io_at(path, "reaching the entry"))?;
    let names = match with_buffer(|buf| rustix::fs::llistxattr(&*short, buf)) {
        Ok(names) => names,
        // Filesystems without xattrs have none to give.
        Err(Errno::NOTSUP) => return Ok((plain, private)),
        Err(e) => return Err(io_at(path, "listing extended attributes")(e)),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let value = match with_buffer(|buf| rustix::fs::lgetxattr(&*short, name, buf)) {
            Ok(value) => value,
            // Removed between list and get: simply gone.
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(io_at(path, "reading an extended attribute")(e)),
        };
        if ns.is_private(name) {
            private.insert(
                name.to_string_lossy()[ns.prefix().len()..].to_owned(),
                value,
            );
        } else {
            plain.insert(name.to_owned(), value);
        }
    }
    Ok((plain, private))
}

/// Opens a directory without following a symlink at its last component.
pub(crate) fn open_dir(at: impl AsFd, name: impl rustix::path::Arg) -> rustix::io::Result<OwnedFd> {
    openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

struct Reader {
    ns: XattrNs,
    unclean: Vec<LayerError>,
    /// The root's filesystem: a tree is read from one filesystem only.
    dev: u64,
}

impl Reader {
    /// Reads one entry as the kernel (6.8 and later) looks it up: an empty regular file with
    /// `overlay.whiteout` is a whiteout wherever it is. Only a parent marked `opaque = "x"` makes
    /// the kernel's readdir hide it too, so one elsewhere is noted in `unclean`. `dir_fd` is the
    /// entry's own handle when it is a directory.
    fn node(
        &mut self,
        path: &Path,
        st: &Stat,
        dir_fd: Option<OwnedFd>,
        in_x_dir: bool,
    ) -> Result<Node, LayerError> {
        let ns = self.ns;
        crate::progress::entries(1);
        let file_type = FileType::from_raw_mode(st.st_mode);
        if st.st_dev != self.dev {
            self.unclean.push(LayerError::OtherFilesystem {
                path: path.to_owned(),
            });
        }
        let (xattrs, private) = read_xattrs(path, ns)?;
        for attr in ["redirect", "metacopy"] {
            if private.contains_key(attr) {
                return Err(LayerError::NotPlain {
                    path: path.to_owned(),
                    attr: ns.name(attr),
                });
            }
        }
        let size = st.st_size as u64;
        let meta = Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            xattrs,
        };
        let whiteout_attr = private.contains_key("whiteout");
        let xattr_whiteout = whiteout_attr && file_type == FileType::RegularFile && size == 0;
        if whiteout_attr && !xattr_whiteout {
            self.unclean.push(LayerError::MalformedWhiteout {
                path: path.to_owned(),
                attr: ns.name("whiteout"),
                what: if file_type == FileType::RegularFile {
                    format!("a file of {size} bytes")
                } else {
                    "not a regular file".to_owned()
                },
            });
        } else if xattr_whiteout && !in_x_dir {
            self.unclean.push(LayerError::UnmarkedXattrWhiteout {
                path: path.to_owned(),
                attr: ns.name("whiteout"),
                marker: ns.name("opaque"),
            });
        }
        let kind = match file_type {
            FileType::Directory => {
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
                let fd = dir_fd.expect("directories come with their handle");
                let children = self.children(path, &fd, x_dir)?;
                if opaque {
                    for (name, child) in &children {
                        if matches!(child.kind, Kind::Whiteout) {
                            self.unclean.push(LayerError::WhiteoutInOpaque {
                                path: path.join(name),
                            });
                        }
                    }
                }
                Kind::Dir { opaque, children }
            }
            FileType::RegularFile if xattr_whiteout => Kind::Whiteout,
            FileType::RegularFile => Kind::File {
                size,
                inode: (st.st_dev, st.st_ino),
                nlink: st.st_nlink,
            },
            FileType::Symlink => Kind::Symlink {
                target: super::longpath::short(path)
                    .and_then(|short| fs::read_link(&*short))
                    .map_err(io_at(path, "reading the link"))?
                    .into_os_string(),
            },
            FileType::CharacterDevice if st.st_rdev == 0 => Kind::Whiteout,
            FileType::CharacterDevice => Kind::CharDevice { rdev: st.st_rdev },
            FileType::BlockDevice => Kind::BlockDevice { rdev: st.st_rdev },
            FileType::Fifo => Kind::Fifo,
            _ => Kind::Socket,
        };
        Ok(Node { meta, kind })
    }

    fn children(
        &mut self,
        path: &Path,
        fd: &OwnedFd,
        in_x_dir: bool,
    ) -> Result<BTreeMap<OsString, Node>, LayerError> {
        let mut children = BTreeMap::new();
        let dir = Dir::read_from(fd).map_err(io_at(path, "reading the directory"))?;
        for entry in dir {
            let entry = entry.map_err(io_at(path, "reading the directory"))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let child = path.join(name);
            let st = statat(fd, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_at(&child, "reading metadata"))?;
            let child_fd = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                Some(open_dir(fd, name).map_err(io_at(&child, "opening the directory"))?)
            } else {
                None
            };
            let node = self.node(&child, &st, child_fd, in_x_dir)?;
            children.insert(name.to_owned(), node);
        }
        Ok(children)
    }
}
