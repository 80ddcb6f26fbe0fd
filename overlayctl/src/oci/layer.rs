//! One OCI image layer unpacked into a directory in overlayfs lower format.
//!
//! A layer is a tar (plain, gzip or zstd; told by its first bytes) of changes to the layers
//! below it. `.wh.NAME` hides NAME below and becomes a whiteout (a 0/0 character device);
//! `.wh..wh..opq` in a directory hides everything below it there and becomes
//! `trusted.overlay.opaque = "y"` (docs/oci.md). Owners, modes, times, extended attributes
//! (`SCHILY.xattr.*`), hard links, devices and fifos are kept.
//!
//! The tar is hostile until proven otherwise. Every entry is written through handles opened
//! beneath the destination without following a symlink, so nothing is written outside it; a
//! path that is absolute or has `..`, a hard link to anything but an earlier entry of the same
//! layer, an entry under something that is not a directory in this layer (a file, a symlink, a
//! whiteout), an entry twice, an overlayfs attribute, a device in whiteout form, an entry's
//! headers over [`HEADER_BUDGET`], data after the archive's end: each is refused naming the
//! entry. The digests of the compressed blob and of the tar are computed over every byte read.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, ResolveFlags, XattrFlags, fsetxattr, fstat, linkat, makedev,
    mkdirat, mknodat, openat2, symlinkat,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::engine::Meta;
use crate::engine::copy::{set_fd_meta, set_meta_at};

/// The most one entry's headers may take (its own, GNU long names, PAX records): a path or
/// a set of extended attributes larger than this is not a file system's.
pub const HEADER_BUDGET: u64 = 1 << 20;

/// The most that may follow the end of the archive (zero blocks: the record's padding).
const TRAILING_LIMIT: u64 = 1 << 20;

/// How often, in bytes written, the free space is checked.
const ROOM_CHECK_EVERY: u64 = 64 << 20;

/// What unpacking a layer read and wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:` of the blob as read (compressed).
    pub blob_digest: String,
    pub blob_bytes: u64,
    /// `sha256:` of the tar (uncompressed): the image config's `diff_id`.
    pub diff_id: String,
    pub tar_bytes: u64,
    /// Entries written, whiteouts included.
    pub entries: u64,
    /// Bytes of file content written.
    pub file_bytes: u64,
    /// Each file's blake3 (hex) by its path in the layer, hashed as it was written: the
    /// layer's manifest needs no second read.
    pub hashes: HashMap<PathBuf, String>,
}

/// A reader that hashes (sha256) and counts what passes through it.
#[derive(Debug)]
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// `sha256:` and the hex digest of everything read so far.
    pub fn digest(&self) -> String {
        format!("sha256:{:x}", self.hasher.clone().finalize())
    }

    pub fn count(&self) -> u64 {
        self.bytes
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The tar inside a blob, decompressed as its first bytes say.
enum Decoded<R: BufRead> {
    Plain(R),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decoded<R> {
    fn new(mut inner: R) -> io::Result<Self> {
        let head = inner.fill_buf()?;
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip(flate2::bufread::MultiGzDecoder::new(inner))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd(zstd::stream::read::Decoder::with_buffer(inner)?)
        } else {
            Self::Plain(inner)
        })
    }

    fn into_inner(self) -> R {
        match self {
            Self::Plain(r) => r,
            Self::Gzip(d) => d.into_inner(),
            Self::Zstd(d) => d.finish(),
        }
    }
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(r) => r.read(buf),
            Self::Gzip(d) => d.read(buf),
            Self::Zstd(d) => d.read(buf),
        }
    }
}

/// Caps what the tar reader may read while it reads an entry's headers: `budget` is set
/// before each header and cleared once the entry is handed over.
struct Budgeted<R> {
    inner: R,
    budget: Rc<Cell<Option<u64>>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.budget.get() else {
            return self.inner.read(buf);
        };
        if left == 0 {
            return Err(io::Error::other(format!(
                "an entry's headers (with its long names and PAX records) take more than {HEADER_BUDGET} bytes"
            )));
        }
        let len = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.budget.set(Some(left - n as u64));
        Ok(n)
    }
}

/// Unpacks the layer blob `blob` into `dest` (made here; it must not exist). `lowers` are the
/// layers it goes over, top first: a directory the tar implies without an entry of its own
/// takes their metadata, as the merged view showed it. `room` is called with the bytes written
/// so far every [`ROOM_CHECK_EVERY`] and at the end, and stops the unpacking with its error.
pub fn unpack(
    blob: impl Read,
    dest: &Path,
    lowers: &[PathBuf],
    room: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Unpacked> {
    let compressed = BufReader::with_capacity(1 << 16, Hashing::new(blob));
    let decoded = Decoded::new(compressed).context("reading the layer")?;
    let budget = Rc::new(Cell::new(None));
    let stream = Budgeted {
        inner: Hashing::new(decoded),
        budget: budget.clone(),
    };
    let mut archive = tar::Archive::new(stream);
    let mut writer = Writer::new(dest, lowers)?;
    let mut entries = archive.entries().context("reading the layer's tar")?;
    let mut index = 0u64;
    loop {
        budget.set(Some(HEADER_BUDGET));
        let next = entries.next();
        budget.set(None);
        let Some(entry) = next else { break };
        index += 1;
        let mut entry = entry.with_context(|| format!("reading the tar's entry {index}"))?;
        let path = entry.path_bytes().into_owned();
        writer
            .entry(&mut entry, &path, room)
            .with_context(|| format!("entry {index}, {:?}", String::from_utf8_lossy(&path)))?;
    }
    writer.finish()?;
    room(writer.file_bytes)?;

    // After the archive's end: its padding, zero blocks, and nothing else.
    let mut stream = archive.into_inner().inner;
    let mut tail = Vec::new();
    (&mut stream)
        .take(TRAILING_LIMIT + 1)
        .read_to_end(&mut tail)
        .context("reading the end of the layer's tar")?;
    ensure!(
        tail.len() as u64 <= TRAILING_LIMIT && tail.iter().all(|&b| b == 0),
        "the layer's tar has data after its end ({} bytes); such a layer is refused",
        tail.len()
    );
    let (diff_id, tar_bytes) = (stream.digest(), stream.count());
    let mut compressed = stream.into_inner().into_inner();
    let mut rest = Vec::new();
    (&mut compressed)
        .take(TRAILING_LIMIT + 1)
        .read_to_end(&mut rest)
        .context("reading the end of the layer")?;
    ensure!(
        rest.len() as u64 <= TRAILING_LIMIT,
        "the layer has more than {TRAILING_LIMIT} bytes after its compressed data"
    );
    let hashed = compressed.into_inner();
    Ok(Unpacked {
        blob_digest: hashed.digest(),
        blob_bytes: hashed.count(),
        diff_id,
        tar_bytes,
        entries: writer.entries,
        file_bytes: writer.file_bytes,
        hashes: writer.hashes,
    })
}

/// What this layer has at a path so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Dir,
    File,
    Symlink,
    Special,
    Whiteout,
}

impl Seen {
    fn name(self) -> &'static str {
        match self {
            Self::Dir => "a directory",
            Self::File => "a file",
            Self::Symlink => "a symlink",
            Self::Special => "a device or fifo",
            Self::Whiteout => "a whiteout",
        }
    }
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

struct Writer {
    dest: PathBuf,
    root: OwnedFd,
    lowers: Vec<OwnedFd>,
    /// Every path this layer wrote (relative, `/`-separated; the root is empty).
    seen: HashMap<Vec<u8>, Seen>,
    /// Directories' metadata, set once their entries are written.
    dirs: HashMap<Vec<u8>, Meta>,
    /// The last parent directory opened.
    parent: Option<(Vec<u8>, OwnedFd)>,
    buf: Vec<u8>,
    entries: u64,
    file_bytes: u64,
    next_room_check: u64,
    hashes: HashMap<PathBuf, String>,
}

impl Writer {
    fn new(dest: &Path, lowers: &[PathBuf]) -> Result<Self> {
        std::fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
        let open = |path: &Path| {
            rustix::fs::open(
                path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .with_context(|| format!("opening {}", path.display()))
        };
        let root = open(dest)?;
        let lowers = lowers.iter().map(|l| open(l)).collect::<Result<_>>()?;
        let mut seen = HashMap::new();
        seen.insert(Vec::new(), Seen::Dir);
        let mut dirs = HashMap::new();
        dirs.insert(Vec::new(), default_dir_meta());
        Ok(Self {
            dest: dest.to_owned(),
            root,
            lowers,
            seen,
            dirs,
            parent: None,
            buf: vec![0; 1 << 18],
            entries: 0,
            file_bytes: 0,
            next_room_check: ROOM_CHECK_EVERY,
            hashes: HashMap::new(),
        })
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        room: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if kind == T::XGlobalHeader {
            return Ok(());
        }
        let path = clean_path(raw)?;
        let size = entry.size();
        let has_data = matches!(kind, T::Regular | T::Continuous | T::GNUSparse);
        ensure!(
            has_data || size == 0,
            "a {kind:?} entry with {size} bytes of data"
        );
        let meta = meta_of(entry)?;
        let Some((name, parent)) = path.split_last() else {
            ensure!(
                kind == T::Directory,
                "the layer's root is a {kind:?}, not a directory"
            );
            self.dirs.insert(Vec::new(), meta);
            return Ok(());
        };
        let parent = join_all(parent);
        let rel = join(&parent, name);

        // Whiteouts and opaque markers.
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden == b".wh..opq" {
                return self.opaque(&parent);
            }
            ensure!(
                !hidden.starts_with(b".wh.")
                    && !hidden.is_empty()
                    && hidden != b"."
                    && hidden != b"..",
                "{:?} is not a whiteout name (`.wh.` and the name it hides)",
                String::from_utf8_lossy(name)
            );
            let hidden_rel = join(&parent, hidden);
            if let Some(was) = self.seen.get(&hidden_rel) {
                bail!(
                    "a whiteout of {:?}, which is {} in this same layer",
                    String::from_utf8_lossy(&hidden_rel),
                    was.name()
                );
            }
            let dir = self.parent_dir(&parent)?;
            mknodat(
                &dir,
                OsStr::from_bytes(hidden),
                FileType::CharacterDevice,
                Mode::empty(),
                makedev(0, 0),
            )
            .map_err(|e| anyhow!("making the whiteout: {e}"))?;
            self.seen.insert(hidden_rel, Seen::Whiteout);
            self.entries += 1;
            return Ok(());
        }

        if let Some(was) = self.seen.get(&rel).copied() {
            ensure!(
                was == Seen::Dir && kind == T::Directory,
                "the path is already {} in this layer{}",
                was.name(),
                if was == Seen::Whiteout {
                    " (an entry and a whiteout of it)"
                } else {
                    ""
                }
            );
            self.dirs.insert(rel, meta);
            return Ok(());
        }
        let dir = self.parent_dir(&parent)?;
        let at = OsStr::from_bytes(name);
        let step = |what: &'static str| move |e: Errno| anyhow!("{what}: {e}");
        let seen = match kind {
            T::Directory => {
                mkdirat(&dir, at, Mode::from_raw_mode(0o700)).map_err(step("making it"))?;
                self.dirs.insert(rel.clone(), meta);
                Seen::Dir
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let fd = openat2(
                    &dir,
                    at,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                    BENEATH,
                )
                .map_err(step("creating it"))?;
                let mut file = File::from(fd);
                let (written, hash) = self.copy_data(entry, &mut file, room)?;
                ensure!(
                    written == size,
                    "its data ended after {written} of {size} bytes"
                );
                self.hashes
                    .insert(PathBuf::from(OsStr::from_bytes(&rel)), hash);
                set_fd_meta(&file, &meta).map_err(step("setting its metadata"))?;
                Seen::File
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("a hard link without a target"))?;
                let target = join_all(&clean_path(&target)?);
                match self.seen.get(&target) {
                    Some(Seen::File | Seen::Symlink | Seen::Special) => {}
                    Some(other) => bail!(
                        "a hard link to {:?}, which is {} in this layer",
                        String::from_utf8_lossy(&target),
                        other.name()
                    ),
                    None => bail!(
                        "a hard link to {:?}, which is not an earlier entry of this layer",
                        String::from_utf8_lossy(&target)
                    ),
                }
                linkat(
                    &self.root,
                    OsStr::from_bytes(&target),
                    &dir,
                    at,
                    AtFlags::empty(),
                )
                .map_err(step("linking it"))?;
                self.seen[&target]
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("a symlink without a target"))?;
                ensure!(!target.is_empty(), "a symlink with an empty target");
                symlinkat(OsStr::from_bytes(&target), &dir, at).map_err(step("making it"))?;
                set_meta_at(&dir, at, &meta, false).map_err(|(what, e)| anyhow!("{what}: {e}"))?;
                Seen::Symlink
            }
            T::Char | T::Block | T::Fifo => {
                let header = entry.header();
                let major = header.device_major()?.unwrap_or(0);
                let minor = header.device_minor()?.unwrap_or(0);
                let file_type = match kind {
                    T::Char => {
                        ensure!(
                            (major, minor) != (0, 0),
                            "a 0/0 character device: an overlayfs whiteout, which an OCI layer writes as `.wh.NAME`"
                        );
                        FileType::CharacterDevice
                    }
                    T::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                mknodat(
                    &dir,
                    at,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    makedev(major, minor),
                )
                .map_err(step("making it"))?;
                set_meta_at(&dir, at, &meta, true).map_err(|(what, e)| anyhow!("{what}: {e}"))?;
                Seen::Special
            }
            other => bail!("a tar entry of type {other:?}, which a layer cannot hold"),
        };
        self.seen.insert(rel, seen);
        self.entries += 1;
        Ok(())
    }

    fn copy_data(
        &mut self,
        from: &mut impl Read,
        to: &mut File,
        room: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<(u64, String)> {
        let mut written = 0u64;
        let mut hasher = blake3::Hasher::new();
        loop {
            let n = match from.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow!(e).context("reading its data")),
            };
            to.write_all(&self.buf[..n]).context("writing it")?;
            hasher.update(&self.buf[..n]);
            written += n as u64;
            self.file_bytes += n as u64;
            if self.file_bytes >= self.next_room_check {
                self.next_room_check = self.file_bytes + ROOM_CHECK_EVERY;
                room(self.file_bytes)?;
            }
        }
        Ok((written, hasher.finalize().to_hex().to_string()))
    }

    /// `.wh..wh..opq` in `parent`: nothing below shows through it.
    fn opaque(&mut self, parent: &[u8]) -> Result<()> {
        if parent.is_empty() {
            // overlayfs does not take the root of a lower layer as opaque.
            ensure!(
                self.lowers.is_empty(),
                "an opaque marker at the layer's root, which overlayfs cannot honour over the layers below"
            );
            return Ok(());
        }
        let path = parent.to_vec();
        let (name, grand) = split_last(&path);
        let dir = self.parent_dir(grand)?;
        if !self.seen.contains_key(&path) {
            self.implied_dir(&dir, grand, name)?;
        }
        ensure!(
            self.seen[&path] == Seen::Dir,
            "an opaque marker in {:?}, which is {} in this layer",
            String::from_utf8_lossy(&path),
            self.seen[&path].name()
        );
        let fd = openat2(
            &dir,
            OsStr::from_bytes(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        )
        .map_err(|e| anyhow!("opening its directory: {e}"))?;
        fsetxattr(&fd, "trusted.overlay.opaque", b"y", XattrFlags::empty())
            .map_err(|e| anyhow!("marking its directory opaque: {e}"))?;
        Ok(())
    }

    /// The directory `parent` of this layer, opened; directories the tar implies without
    /// entries are made, with the metadata the layers below give them.
    fn parent_dir(&mut self, parent: &[u8]) -> Result<OwnedFd> {
        if parent.is_empty() {
            return self.root.try_clone().context("duplicating a handle");
        }
        if let Some((path, fd)) = &self.parent
            && path == parent
        {
            return fd.try_clone().context("duplicating a handle");
        }
        let mut fd = self.root.try_clone().context("duplicating a handle")?;
        let mut walked = Vec::new();
        for component in parent.split(|&b| b == b'/') {
            let here = join(&walked, component);
            match self.seen.get(&here) {
                Some(Seen::Dir) => {}
                Some(other) => bail!(
                    "it is under {:?}, which is {} in this layer, not a directory",
                    String::from_utf8_lossy(&here),
                    other.name()
                ),
                None => self.implied_dir(&fd, &walked, component)?,
            }
            fd = openat2(
                &fd,
                OsStr::from_bytes(component),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                BENEATH,
            )
            .map_err(|e| {
                anyhow!(
                    "opening {:?} in {}: {e}",
                    String::from_utf8_lossy(&here),
                    self.dest.display()
                )
            })?;
            walked = here;
        }
        self.parent = Some((parent.to_vec(), fd.try_clone()?));
        Ok(fd)
    }

    /// Makes the directory `name` in `parent` (opened as `dir`) that the tar implies.
    fn implied_dir(&mut self, dir: &OwnedFd, parent: &[u8], name: &[u8]) -> Result<()> {
        let rel = join(parent, name);
        mkdirat(dir, OsStr::from_bytes(name), Mode::from_raw_mode(0o700))
            .map_err(|e| anyhow!("making {:?}: {e}", String::from_utf8_lossy(&rel)))?;
        let meta = self.below(&rel).unwrap_or_else(default_dir_meta);
        self.dirs.insert(rel.clone(), meta);
        self.seen.insert(rel, Seen::Dir);
        Ok(())
    }

    /// The metadata of the directory at `rel` in the layers below, as a merged view shows it
    /// (the topmost layer that has it; none when a layer hides it or has something else there).
    fn below(&self, rel: &[u8]) -> Option<Meta> {
        for lower in &self.lowers {
            match openat2(
                lower,
                OsStr::from_bytes(rel),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                BENEATH,
            ) {
                Ok(fd) => {
                    let stat = fstat(&fd).ok()?;
                    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
                        return None;
                    }
                    return Some(Meta {
                        mode: stat.st_mode & 0o7777,
                        uid: stat.st_uid,
                        gid: stat.st_gid,
                        mtime: (stat.st_mtime, stat.st_mtime_nsec as u32),
                        xattrs: Default::default(),
                    });
                }
                Err(Errno::NOENT) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Sets the directories' metadata, deepest first (a directory's times after its entries).
    fn finish(&mut self) -> Result<()> {
        self.parent = None;
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.len()));
        for (rel, meta) in dirs {
            let what = || format!("{:?}", String::from_utf8_lossy(&rel));
            let fd = if rel.is_empty() {
                openat2(
                    &self.root,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    BENEATH,
                )
            } else {
                let (name, parent) = split_last(&rel);
                let dir = self.parent_dir(parent)?;
                openat2(
                    &dir,
                    OsStr::from_bytes(name),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    BENEATH,
                )
            }
            .map_err(|e| anyhow!("opening the directory {}: {e}", what()))?;
            set_fd_meta(&fd, &meta)
                .map_err(|e| anyhow!("setting the metadata of the directory {}: {e}", what()))?;
        }
        rustix::fs::syncfs(&self.root).context("flushing the unpacked layer")?;
        Ok(())
    }
}

fn default_dir_meta() -> Meta {
    Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        xattrs: Default::default(),
    }
}

/// An entry's owner, mode, time and extended attributes, checked.
fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta> {
    let header = entry.header();
    let mode = header.mode().context("reading its mode")? & 0o7777;
    let uid = header.uid().context("reading its owner")?;
    let gid = header.gid().context("reading its group")?;
    let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
        bail!("its owner {uid}:{gid} is out of range");
    };
    let mut mtime = (
        i64::try_from(header.mtime().context("reading its time")?).unwrap_or(i64::MAX),
        0u32,
    );
    let mut xattrs = crate::engine::tree::Xattrs::new();
    if let Some(pax) = entry.pax_extensions().context("reading its PAX records")? {
        for record in pax {
            let record = record.context("reading its PAX records")?;
            let key = record.key_bytes();
            let value = record.value_bytes();
            if key == b"mtime" {
                mtime = pax_time(value).ok_or_else(|| {
                    anyhow!(
                        "its PAX mtime {:?} is not a time",
                        String::from_utf8_lossy(value)
                    )
                })?;
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                check_xattr(name)?;
                xattrs.insert(OsStr::from_bytes(name).to_owned(), value.to_vec());
            } else if key.starts_with(b"LIBARCHIVE.xattr.") {
                bail!(
                    "it has extended attributes in libarchive's form (LIBARCHIVE.xattr), which are not read; write the layer with SCHILY.xattr records (GNU tar --xattrs, Go's archive/tar)"
                );
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// Extended attributes a layer may carry: never overlayfs's own, which would change what the
/// stack shows (redirects, metacopy, opaque directories out of their OCI form).
fn check_xattr(name: &[u8]) -> Result<()> {
    let shown = String::from_utf8_lossy(name);
    ensure!(
        !name.starts_with(b"trusted.overlay.") && !name.starts_with(b"user.overlay."),
        "it has the overlayfs attribute {shown:?}, which a layer's tar may not set"
    );
    ensure!(
        name.starts_with(b"user.")
            || name.starts_with(b"security.")
            || name.starts_with(b"trusted.")
            || name == b"system.posix_acl_access"
            || name == b"system.posix_acl_default",
        "it has the extended attribute {shown:?}, outside the user, security and trusted namespaces and POSIX ACLs"
    );
    Ok(())
}

/// A PAX time: seconds, optionally with a fraction.
fn pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    // A negative time with a fraction counts back from the second before.
    Some(if text.starts_with('-') && nanos > 0 {
        (secs - 1, 1_000_000_000 - nanos)
    } else {
        (secs, nanos)
    })
}

/// A tar path as its components: a leading `./` and a trailing `/` allowed, `.` components
/// skipped; absolute paths, `..` and empty components refused.
fn clean_path(raw: &[u8]) -> Result<Vec<&[u8]>> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    ensure!(!raw.starts_with(b"/"), "the path {:?} is absolute", shown());
    let trimmed = raw.strip_suffix(b"/").unwrap_or(raw);
    let mut components = Vec::new();
    if trimmed.is_empty() || trimmed == b"." {
        return Ok(components);
    }
    for component in trimmed.split(|&b| b == b'/') {
        match component {
            b"." => {}
            b".." => bail!("the path {:?} has `..`", shown()),
            b"" => bail!("the path {:?} has an empty component", shown()),
            c => components.push(c),
        }
    }
    Ok(components)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut rel = Vec::with_capacity(parent.len() + 1 + name.len());
    rel.extend_from_slice(parent);
    if !parent.is_empty() {
        rel.push(b'/');
    }
    rel.extend_from_slice(name);
    rel
}

fn join_all(components: &[&[u8]]) -> Vec<u8> {
    components.join(&b'/')
}

/// `a/b/c` as (`c`, `a/b`); `c` as (`c`, ``).
fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(at) => (&rel[at + 1..], &rel[..at]),
        None => (rel, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_paths_are_plain_or_refused() {
        let ok: &[(&[u8], &[&[u8]])] = &[
            (b"./", &[]),
            (b".", &[]),
            (b"etc/", &[b"etc"]),
            (b"./etc/passwd", &[b"etc", b"passwd"]),
            (b"a/./b", &[b"a", b"b"]),
        ];
        for (raw, want) in ok {
            assert_eq!(clean_path(raw).unwrap(), *want, "{raw:?}");
        }
        for bad in [&b"/etc"[..], b"../x", b"a/../../x", b"a//b", b"a/.."] {
            assert!(clean_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pax_times_keep_their_fraction() {
        assert_eq!(
            pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(pax_time(b"12"), Some((12, 0)));
        assert_eq!(pax_time(b"1.000000001"), Some((1, 1)));
        assert_eq!(pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(pax_time(b"-0.25"), Some((-1, 750_000_000)));
        assert_eq!(pax_time(b"x"), None);
        assert_eq!(pax_time(b"1.2e3"), None);
    }

    #[test]
    fn overlay_attributes_are_refused() {
        assert!(check_xattr(b"security.capability").is_ok());
        assert!(check_xattr(b"user.mime").is_ok());
        assert!(check_xattr(b"system.posix_acl_access").is_ok());
        for bad in [
            &b"trusted.overlay.redirect"[..],
            b"user.overlay.metacopy",
            b"system.nfs4_acl",
        ] {
            assert!(check_xattr(bad).is_err(), "{bad:?}");
        }
    }
}
