//! Writing a layer tree into a new directory, preserving everything a root filesystem needs:
//! hard links, owners, modes (setuid included), times, xattrs, devices, fifos, sockets, sparse
//! files. Every write goes through directory handles opened with `O_NOFOLLOW`, so a symlink in
//! the source can never make the copy write outside the destination. Whiteouts are written as
//! 0/0 character devices and opaque directories as `trusted.overlay.opaque = "y"`, the form every
//! kernel reads.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, SeekFrom, Timespec, Timestamps, Uid, XattrFlags, chownat,
    copy_file_range, fchmod, fchown, fsetxattr, fstat, ftruncate, futimens, linkat, lsetxattr,
    mkdirat, mknodat, openat, seek, statat, symlinkat, syncfs, utimensat,
};
use rustix::io::Errno;

use super::tree::{Kind, Layer, LayerError, Meta, Node, XattrNs, io_at, open_dir};

/// What a copy wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub entries: u64,
    /// Bytes of file content copied (hard links counted once).
    pub bytes: u64,
    /// Files linked rather than copied ([`link_layer`]).
    pub linked: u64,
}

/// Copies `layer` into a new directory `name` inside the directory `parent` (which must exist
/// and not contain `name`), then flushes the filesystem. The new layer keeps overlay's
/// attributes in the `trusted.` namespace, whatever the source used.
pub fn copy_layer(layer: &Layer, parent: &Path, name: &OsStr) -> Result<CopyStats, LayerError> {
    write_tree(&layer.tree, Source::Root(&layer.root), parent, name)
}

/// What [`link_layer`] links from the source layers; the rest is made from the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linking {
    /// Regular files only: for a tree whose other entries exist only in memory (a rebuilt
    /// bundle's symlinks, say).
    Files,
    /// Every entry but directories and whiteouts (symlinks and devices too: no inode is made),
    /// each first checked to be what the tree says it is (type, owner, mode, size, mtime): for
    /// a tree planned from manifests rather than read from the disk.
    Checked,
}

/// Writes `tree` as a new layer `name` inside `parent`, as [`copy_layer`] does, except that
/// what `linking` says is a new hard link to the same path in the layer `roots[source(path)]`
/// (no data is copied or metadata changed; the tree's metadata for it must be that entry's).
/// Sources are reached through directory handles that never follow a symlink or leave their
/// layer. Where a link cannot be made (another filesystem, the link count at its limit), the
/// entry is copied. Then flushes the filesystem.
pub fn link_layer(
    tree: &Node,
    roots: &[PathBuf],
    source: &dyn Fn(&Path) -> usize,
    linking: Linking,
    parent: &Path,
    name: &OsStr,
) -> Result<CopyStats, LayerError> {
    raise_open_file_limit();
    let fds = roots
        .iter()
        .map(|root| open_dir(rustix::fs::CWD, root).map_err(io_at(root, "opening the layer")))
        .collect::<Result<Vec<_>, _>>()?;
    // What the links will look up, in the order they will: on a cold cache, readers ahead of
    // the writer bring the source directories and inodes in several at a time, as the disk
    // can serve them, where the writer alone would wait for each in turn.
    let mut wanted = Vec::new();
    linked_entries(tree, &mut PathBuf::new(), source, linking, &mut wanted);
    let fds = &fds;
    let done = &std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let chunk = wanted.len().div_ceil(PREFETCHERS).max(1);
        for part in wanted.chunks(chunk) {
            scope.spawn(move || {
                for (i, rel) in part {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    // Best effort, and as the writer looks: what cannot be reached here is the
                    // writer's to report.
                    let _ = rustix::fs::openat2(
                        &fds[*i],
                        rel,
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                        rustix::fs::ResolveFlags::BENEATH
                            | rustix::fs::ResolveFlags::NO_SYMLINKS
                            | rustix::fs::ResolveFlags::NO_XDEV,
                    );
                }
            });
        }
        let source = Source::Linked {
            roots,
            fds,
            source,
            linking,
        };
        let written = write_tree(tree, source, parent, name);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        written
    })
}

/// A linked copy keeps a handle open on each source layer's directory at every level of the
/// path being written: hundreds of layers need more than the usual soft limit of 1,024, so it
/// is raised to the hard limit, as far as that goes.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

/// Threads looking up a linked tree's sources ahead of the writer.
const PREFETCHERS: usize = 4;

/// Every entry of `tree` a linked copy links, with the layer `source` gives it, in tree order.
fn linked_entries(
    node: &Node,
    rel: &mut PathBuf,
    source: &dyn Fn(&Path) -> usize,
    linking: Linking,
    out: &mut Vec<(usize, PathBuf)>,
) {
    match &node.kind {
        Kind::Dir { children, .. } => {
            for (name, child) in children {
                rel.push(name);
                linked_entries(child, rel, source, linking, out);
                rel.pop();
            }
        }
        kind if is_linked(kind, linking) => out.push((source(rel), rel.clone())),
        _ => {}
    }
}

/// Whether a linked copy links an entry of this kind.
fn is_linked(kind: &Kind, linking: Linking) -> bool {
    match linking {
        Linking::Files => matches!(kind, Kind::File { .. }),
        Linking::Checked => !matches!(kind, Kind::Dir { .. } | Kind::Whiteout),
    }
}

/// Where the entry at `at` in `dir` differs from what `node` says it is, in words; None when it
/// is what the tree says.
fn drift(dir: &OwnedFd, at: &OsStr, node: &Node) -> Option<String> {
    let st = match statat(dir, at, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(e) => return Some(format!("cannot be read ({e})")),
    };
    let found = FileType::from_raw_mode(st.st_mode);
    let (want, size) = match &node.kind {
        Kind::File { size, .. } => (FileType::RegularFile, Some(*size)),
        Kind::Symlink { .. } => (FileType::Symlink, None),
        Kind::CharDevice { .. } => (FileType::CharacterDevice, None),
        Kind::BlockDevice { .. } => (FileType::BlockDevice, None),
        Kind::Fifo => (FileType::Fifo, None),
        Kind::Socket => (FileType::Socket, None),
        Kind::Dir { .. } | Kind::Whiteout => return None,
    };
    let m = &node.meta;
    if found != want {
        return Some(format!("is a {found:?}, not a {want:?}"));
    }
    let mode = st.st_mode & 0o7777;
    let mtime = (st.st_mtime, st.st_mtime_nsec as u32);
    if want != FileType::Symlink && mode != m.mode {
        return Some(format!("has mode {mode:04o}, not {:04o}", m.mode));
    }
    if (st.st_uid, st.st_gid) != (m.uid, m.gid) {
        return Some(format!(
            "is owned by {}:{}, not {}:{}",
            st.st_uid, st.st_gid, m.uid, m.gid
        ));
    }
    if size.is_some_and(|size| size != st.st_size as u64) {
        return Some(format!(
            "has {} bytes, not {}",
            st.st_size,
            size.unwrap_or(0)
        ));
    }
    if mtime != m.mtime {
        return Some(format!(
            "was modified at {}.{:09}, not {}.{:09}",
            mtime.0, mtime.1, m.mtime.0, m.mtime.1
        ));
    }
    None
}

fn write_tree(
    tree: &Node,
    source: Source<'_>,
    parent: &Path,
    name: &OsStr,
) -> Result<CopyStats, LayerError> {
    let parent_fd = open_dir(rustix::fs::CWD, parent)
        .map_err(io_at(parent, "opening the destination directory"))?;
    let layers = match source {
        Source::Linked { roots, .. } => roots.len(),
        Source::Root(_) => 0,
    };
    let mut copier = Copier {
        source,
        sources: SourceDirs::new(layers),
        dest_root: parent.join(name),
        links: HashMap::new(),
        stats: CopyStats::default(),
    };
    copier.dir(&parent_fd, name, Path::new(""), tree)?;
    syncfs(&parent_fd).map_err(io_at(parent, "flushing the filesystem"))?;
    Ok(copier.stats)
}

/// Where file contents come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The same relative path under this root, copied.
    Root(&'a Path),
    /// The same relative path in the layer `source` picks, hard-linked as `linking` says.
    Linked {
        roots: &'a [PathBuf],
        /// The roots, open.
        fds: &'a [OwnedFd],
        source: &'a dyn Fn(&Path) -> usize,
        linking: Linking,
    },
}

/// For the directory being written and each one above it, the same directory in each source
/// layer, opened when an entry first needs it: one name at a time from the one above, without
/// following a symlink or crossing a mount, so any depth is reached (paths past `PATH_MAX`
/// included) and no source path is walked twice.
struct SourceDirs {
    /// From the layers' roots down: each level's name and its handle in each layer.
    levels: Vec<(OsString, Vec<Option<OwnedFd>>)>,
}

impl SourceDirs {
    fn new(layers: usize) -> Self {
        Self {
            levels: vec![(OsString::new(), (0..layers).map(|_| None).collect())],
        }
    }

    fn enter(&mut self, name: &OsStr) {
        let layers = self.levels[0].1.len();
        self.levels
            .push((name.to_owned(), (0..layers).map(|_| None).collect()));
    }

    fn leave(&mut self) {
        self.levels.pop();
    }

    /// The current directory in layer `i` (`roots[i]`, open as `fds[i]`); `rel` names it.
    fn get(
        &mut self,
        fds: &[OwnedFd],
        roots: &[PathBuf],
        i: usize,
        rel: &Path,
    ) -> Result<&OwnedFd, LayerError> {
        let level = self.levels.len() - 1;
        self.open(level, fds, i)
            .map_err(io_at(&roots[i].join(rel), "opening the source directory"))?;
        Ok(self.levels[level].1[i].as_ref().expect("opened above"))
    }

    fn open(&mut self, level: usize, fds: &[OwnedFd], i: usize) -> rustix::io::Result<()> {
        if self.levels[level].1[i].is_some() {
            return Ok(());
        }
        let fd = if level == 0 {
            rustix::io::fcntl_dupfd_cloexec(&fds[i], 0)?
        } else {
            self.open(level - 1, fds, i)?;
            let parent = self.levels[level - 1].1[i].as_ref().expect("opened above");
            rustix::fs::openat2(
                parent,
                self.levels[level].0.as_os_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                rustix::fs::ResolveFlags::BENEATH
                    | rustix::fs::ResolveFlags::NO_SYMLINKS
                    | rustix::fs::ResolveFlags::NO_XDEV,
            )?
        };
        self.levels[level].1[i] = Some(fd);
        Ok(())
    }
}

struct Copier<'a> {
    source: Source<'a>,
    /// Where a linked tree's entries come from, for the directory being written.
    sources: SourceDirs,
    dest_root: PathBuf,
    /// Source inode → where its first copy is, relative to the destination root.
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
}

impl Copier<'_> {
    fn dest(&self, rel: &Path) -> PathBuf {
        self.dest_root.join(rel)
    }

    fn dir(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        rel: &Path,
        node: &Node,
    ) -> Result<(), LayerError> {
        let dest = self.dest(rel);
        mkdirat(parent, name, Mode::from_raw_mode(0o700))
            .map_err(io_at(&dest, "creating the directory"))?;
        let fd = open_dir(parent, name).map_err(io_at(&dest, "opening the new directory"))?;
        self.stats.entries += 1;
        let Kind::Dir { opaque, children } = &node.kind else {
            unreachable!("dir() is called for directories");
        };
        let below_root = !rel.as_os_str().is_empty();
        if below_root {
            self.sources.enter(name);
        }
        for (child_name, child) in children {
            let child_rel = rel.join(child_name);
            self.entry(&fd, rel, child_name, &child_rel, child)?;
        }
        if below_root {
            self.sources.leave();
        }
        if *opaque {
            fsetxattr(
                &fd,
                XattrNs::Trusted.name("opaque").as_str(),
                b"y",
                XattrFlags::empty(),
            )
            .map_err(io_at(&dest, "marking the directory opaque"))?;
        }
        // Metadata last: creating children changes the directory's times.
        set_fd_meta(&fd, &node.meta).map_err(io_at(&dest, "setting metadata"))
    }

    fn entry(
        &mut self,
        dir: &OwnedFd,
        parent_rel: &Path,
        name: &OsString,
        rel: &Path,
        node: &Node,
    ) -> Result<(), LayerError> {
        let dest = self.dest(rel);
        // Another name of a file written already: a link to it, in the new layer.
        if let Kind::File { inode, nlink, .. } = &node.kind
            && *nlink > 1
        {
            if let Some(first) = self.links.get(inode) {
                let root = self.dest_root.clone();
                let first = super::longpath::short(&root.join(first))
                    .map_err(io_at(&dest, "making a hard link"))?;
                linkat(
                    rustix::fs::CWD,
                    &*first,
                    dir,
                    name.as_os_str(),
                    AtFlags::empty(),
                )
                .map_err(io_at(&dest, "making a hard link"))?;
                self.stats.entries += 1;
                return Ok(());
            }
            self.links.insert(*inode, rel.to_owned());
        }
        // Linked: everything but a directory or a whiteout is the source's own inode, with its
        // metadata (a symlink or a device too: no inode to make).
        let mut from = None;
        if let Source::Linked {
            roots,
            fds,
            source,
            linking,
        } = self.source
            && is_linked(&node.kind, linking)
        {
            let layer = source(rel);
            let dir_from = self.sources.get(fds, roots, layer, parent_rel)?;
            if linking == Linking::Checked
                && let Some(found) = drift(dir_from, name, node)
            {
                return Err(LayerError::Changed {
                    path: roots[layer].join(rel),
                    found,
                });
            }
            match linkat(
                dir_from,
                name.as_os_str(),
                dir,
                name.as_os_str(),
                AtFlags::empty(),
            ) {
                Ok(()) => {
                    if matches!(node.kind, Kind::File { .. }) {
                        self.stats.linked += 1;
                    }
                    self.stats.entries += 1;
                    return Ok(());
                }
                // Another filesystem, or the link count at its limit: a copy.
                Err(Errno::XDEV | Errno::MLINK) => {
                    from = Some(
                        rustix::io::fcntl_dupfd_cloexec(dir_from, 0)
                            .map_err(io_at(&dest, "opening the source of"))?,
                    );
                }
                Err(e) => {
                    return Err(io_at(
                        &roots[layer].join(rel),
                        "linking it into the new layer",
                    )(e));
                }
            }
        }
        match &node.kind {
            Kind::Dir { .. } => return self.dir(dir, name, rel, node),
            Kind::File { size, .. } => self.file(dir, from.as_ref(), name, rel, node, *size)?,
            Kind::Symlink { target } => {
                symlinkat(target.as_os_str(), dir, name.as_os_str())
                    .map_err(io_at(&dest, "creating the symlink"))?;
                self.set_path_meta(dir, name, &dest, &node.meta, false)?;
            }
            Kind::Whiteout => {
                mknodat(
                    dir,
                    name.as_os_str(),
                    FileType::CharacterDevice,
                    Mode::empty(),
                    0,
                )
                .map_err(io_at(&dest, "creating the whiteout"))?;
            }
            Kind::CharDevice { rdev } | Kind::BlockDevice { rdev } => {
                let kind = if matches!(node.kind, Kind::CharDevice { .. }) {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                mknodat(
                    dir,
                    name.as_os_str(),
                    kind,
                    Mode::from_raw_mode(0o600),
                    *rdev,
                )
                .map_err(io_at(&dest, "creating the device node"))?;
                self.set_path_meta(dir, name, &dest, &node.meta, true)?;
            }
            Kind::Fifo | Kind::Socket => {
                let kind = if matches!(node.kind, Kind::Fifo) {
                    FileType::Fifo
                } else {
                    FileType::Socket
                };
                mknodat(dir, name.as_os_str(), kind, Mode::from_raw_mode(0o600), 0)
                    .map_err(io_at(&dest, "creating the special file"))?;
                self.set_path_meta(dir, name, &dest, &node.meta, true)?;
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Copies a file's content from the same path under the source root, or, for a linked
    /// tree whose link failed, from `from` (the source directory holding it).
    fn file(
        &mut self,
        dir: &OwnedFd,
        from: Option<&OwnedFd>,
        name: &OsStr,
        rel: &Path,
        node: &Node,
        size: u64,
    ) -> Result<(), LayerError> {
        let dest = self.dest(rel);
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let src = File::from(match (from, self.source) {
            (Some(from), _) => openat(from, name, flags, Mode::empty())
                .map_err(io_at(&dest, "opening the file to copy into"))?,
            (None, Source::Root(root)) => {
                let source = root.join(rel);
                let short = super::longpath::short(&source).map_err(io_at(&source, "opening"))?;
                openat(rustix::fs::CWD, &*short, flags, Mode::empty())
                    .map_err(io_at(&source, "opening"))?
            }
            (None, Source::Linked { .. }) => {
                unreachable!("a linked file is copied from its directory")
            }
        });
        let dst = openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_at(&dest, "creating"))?;
        let dst = File::from(dst);
        let sparse = fstat(&src)
            .map(|st| (st.st_blocks as u64) * 512 < size)
            .unwrap_or(false);
        copy_data(&src, &dst, size, sparse).map_err(|source| LayerError::Io {
            path: dest.clone(),
            action: "copying the content",
            source,
        })?;
        self.stats.bytes += size;
        set_fd_meta(&dst, &node.meta).map_err(io_at(&dest, "setting metadata"))
    }

    fn set_path_meta(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        dest: &Path,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), LayerError> {
        set_meta_at(dir, name, meta, chmod).map_err(|(action, e)| io_at(dest, action)(e))
    }
}

/// Metadata of an entry that cannot be opened for writing (symlinks, devices, fifos, sockets):
/// by name in its directory, never following a symlink; `chmod` is false for symlinks. An error
/// says which step failed.
pub(crate) fn set_meta_at(
    dir: &OwnedFd,
    name: &OsStr,
    meta: &Meta,
    chmod: bool,
) -> Result<(), (&'static str, Errno)> {
    // Owner first: a chown clears `security.capability`.
    chownat(
        dir,
        name,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ("setting the owner", e))?;
    // The directory's handle, seen through /proc, pins the parent; the last component is not
    // followed by lsetxattr.
    let via_proc = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    for (key, value) in &meta.xattrs {
        lsetxattr(&via_proc, key.as_os_str(), value, XattrFlags::empty())
            .map_err(|e| ("setting an extended attribute", e))?;
    }
    if chmod {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())
            .map_err(|e| ("setting the mode", e))?;
    }
    utimensat(dir, name, &timestamps(meta), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| ("setting the times", e))
}

fn timestamps(meta: &Meta) -> Timestamps {
    let t = Timespec {
        tv_sec: meta.mtime.0,
        tv_nsec: meta.mtime.1 as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Owner first (a chown clears setuid bits and `security.capability`), then xattrs, then mode,
/// then times, on an open file or directory.
pub fn set_fd_meta(fd: impl AsFd, meta: &Meta) -> rustix::io::Result<()> {
    fchown(
        &fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )?;
    for (key, value) in &meta.xattrs {
        fsetxattr(&fd, key.as_os_str(), value, XattrFlags::empty())?;
    }
    fchmod(&fd, Mode::from_raw_mode(meta.mode))?;
    futimens(&fd, &timestamps(meta))
}

/// Copies `size` bytes in the kernel (`copy_file_range`, which reflinks where the filesystem
/// can); a sparse source keeps its holes.
fn copy_data(src: &File, dst: &File, size: u64, sparse: bool) -> io::Result<()> {
    if !sparse {
        return copy_range(src, dst, 0, size);
    }
    let mut offset = 0;
    while offset < size {
        let data = match seek(src, SeekFrom::Data(offset)) {
            Ok(at) => at,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let hole = seek(src, SeekFrom::Hole(data))?.min(size);
        copy_range(src, dst, data, hole - data)?;
        offset = hole;
    }
    ftruncate(dst, size)?;
    Ok(())
}

fn copy_range(src: &File, dst: &File, start: u64, len: u64) -> io::Result<()> {
    let (mut from, mut to) = (start, start);
    let end = start + len;
    while from < end {
        let chunk = usize::try_from(end - from)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match copy_file_range(src, Some(&mut from), dst, Some(&mut to), chunk) {
            Ok(0) => break, // the source shrank under us; the manifest will tell
            Ok(n) => crate::progress::bytes(n as u64),
            Err(rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => {
                return copy_range_by_hand(src, dst, from, end - from, to);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// For filesystems without `copy_file_range` between them.
fn copy_range_by_hand(src: &File, dst: &File, from: u64, len: u64, to: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = src.read_at(&mut buf[..want], from + done)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}
