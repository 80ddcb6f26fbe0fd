//! Directory handles that never leave the store: every folder and entry is reached from the
//! store's own handle one name at a time, without following a symlink or crossing a mount, and
//! deletion goes through `unlinkat` on those handles. A path is kept beside each handle only to
//! name it in messages and to give the kernel's mount call (whose options are paths).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

/// What went wrong with a directory or an entry of the store.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error(
        "{path} is {found}, not a real directory inside the store; Strata never works through it. Put the directory back (or remove what is there) and try again"
    )]
    NotARealDirectory { path: PathBuf, found: String },
    #[error("{path}: {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
}

impl DirError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        e: impl Into<io::Error>,
    ) -> Self {
        Self::Io {
            path: path.into(),
            action,
            error: e.into(),
        }
    }

    /// The error the system call gave, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Io { error, .. } => error.raw_os_error(),
            Self::NotARealDirectory { .. } => None,
        }
    }
}

/// An open directory and the path it was opened by (for messages and mount options).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Directories deeper than this under a tree being deleted are moved up to its top first, so a
/// deletion holds a bounded number of open handles however deep the tree is.
const MAX_OPEN_DEPTH: usize = 64;

/// How the entries of a folder are opened: one name, beneath, no symlink anywhere, no mount.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Dir {
    /// Opens a directory a person named (following symlinks in `path`: it is their choice).
    pub fn open(path: &Path) -> Result<Self, DirError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOTDIR => DirError::NotARealDirectory {
                path: path.to_owned(),
                found: "not a directory".into(),
            },
            e => DirError::io(path, "opening the directory", e),
        })?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// Opens `rel` inside `root` as if `root` were `/`: an absolute symlink on the way is
    /// resolved inside it, never against this machine's `/` (a root filesystem mounted for a
    /// boot, or inspected from another system).
    pub fn open_in_root(root: &Dir, rel: &Path) -> Result<Self, DirError> {
        let joined = root.path.join(rel.strip_prefix("/").unwrap_or(rel));
        let fd = rustix::fs::openat2(
            &root.fd,
            rel,
            DIR_FLAGS.difference(OFlags::NOFOLLOW),
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| match e {
            Errno::NOTDIR => DirError::NotARealDirectory {
                path: joined.clone(),
                found: "not a directory".into(),
            },
            e => DirError::io(&joined, "opening the directory", e),
        })?;
        // Its real place, as this process sees it: the path the mount call and everything
        // else given a path must use (a symlink on the way resolved inside `root`, not here).
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .ok()
            .filter(|p| p.is_absolute())
            .unwrap_or(joined);
        Ok(Self { fd, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of an entry, for messages and for the calls that only take paths.
    pub fn child_path(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    /// Opens the directory `name` in this one: refused, saying what is there instead, when it
    /// is a symlink, not a directory, or another filesystem mounted there.
    pub fn sub(&self, name: impl AsRef<OsStr>) -> Result<Self, DirError> {
        let name = name.as_ref();
        let path = self.child_path(name);
        match open_beneath(&self.fd, name) {
            Ok(fd) => Ok(Self { fd, path }),
            Err(e) => Err(self.refusal(name, e)),
        }
    }

    /// [`Self::sub`], creating the directory first when it is missing.
    pub fn sub_or_create(&self, name: impl AsRef<OsStr>) -> Result<Self, DirError> {
        let name = name.as_ref();
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => self.sync()?,
            Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(DirError::io(
                    self.child_path(name),
                    "creating the directory",
                    e,
                ));
            }
        }
        self.sub(name)
    }

    /// Why `name` could not be opened as a directory, in words.
    fn refusal(&self, name: &OsStr, e: Errno) -> DirError {
        let path = self.child_path(name);
        let found = match e {
            Errno::LOOP | Errno::NOTDIR => match self.kind(name) {
                Ok(Some(FileType::Symlink)) => {
                    let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_else(|_| "?".into());
                    format!("a symlink (to {target})")
                }
                Ok(Some(kind)) => format!("not a directory ({})", kind_name(kind)),
                _ => "not a directory".into(),
            },
            Errno::XDEV => "a mount point (another filesystem, or a bind mount)".into(),
            e => return DirError::io(path, "opening the directory", e),
        };
        DirError::NotARealDirectory { path, found }
    }

    /// What `name` is, without following it; None when there is nothing of that name.
    pub fn kind(&self, name: impl AsRef<OsStr>) -> Result<Option<FileType>, DirError> {
        let name = name.as_ref();
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(DirError::io(self.child_path(name), "reading metadata", e)),
        }
    }

    /// Whether `name` is something mounted on (another filesystem or a bind mount): a rename
    /// cannot move it.
    pub fn is_mount_point(&self, name: impl AsRef<OsStr>) -> Result<bool, DirError> {
        use rustix::fs::{StatxFlags, statx};
        let name = name.as_ref();
        let here = statx(&self.fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)
            .map_err(|e| DirError::io(&self.path, "reading metadata", e))?;
        let there = statx(
            &self.fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::MNT_ID,
        )
        .map_err(|e| DirError::io(self.child_path(name), "reading metadata", e))?;
        Ok(there.stx_mnt_id != here.stx_mnt_id
            || there.stx_dev_major != here.stx_dev_major
            || there.stx_dev_minor != here.stx_dev_minor)
    }

    /// Whether `name` is a real directory here (not a symlink to one, not a mount). One `statx`
    /// where the kernel says whether the entry is a mount's root (Linux 5.8 on), an open and a
    /// close before that.
    pub fn has_dir(&self, name: impl AsRef<OsStr>) -> bool {
        use rustix::fs::{StatxAttributes, StatxFlags, statx};
        let name = name.as_ref();
        if !is_plain_name(name) {
            return false;
        }
        let flags = AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT;
        match statx(&self.fd, name, flags, StatxFlags::TYPE) {
            Ok(st) if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
                FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory
                    && !st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
            }
            Ok(_) | Err(Errno::NOSYS) => open_beneath(&self.fd, name).is_ok(),
            Err(_) => false,
        }
    }

    /// The names of the real directories here, as [`Dir::has_dir`] would find them one by one:
    /// from a read of the directory (each entry's type) and of `/proc/self/mountinfo` (what is
    /// mounted here), rather than a lookup per name. Without `/proc`, or for an entry whose type
    /// the filesystem does not say, [`Dir::has_dir`] decides.
    pub fn real_dirs(&self) -> Result<HashSet<OsString>, DirError> {
        let entries =
            list(&self.fd).map_err(|e| DirError::io(&self.path, "reading the directory", e))?;
        let mounted = self.mounted_here();
        Ok(entries
            .into_iter()
            .filter(|(name, kind)| match (kind, &mounted) {
                (FileType::Directory, Some(mounted)) => !mounted.contains(name),
                (FileType::Directory | FileType::Unknown, _) => self.has_dir(name),
                _ => false,
            })
            .map(|(name, _)| name)
            .collect())
    }

    /// The names in this directory something is mounted on, from `/proc/self/mountinfo` (whose
    /// paths, like the descriptor's link in `/proc/self/fd`, are as this process sees them).
    /// None when `/proc` cannot say.
    fn mounted_here(&self) -> Option<HashSet<OsString>> {
        let here = std::fs::read_link(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).ok()?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        Some(
            crate::mount::parse_mountinfo(&mountinfo)
                .into_iter()
                .filter(|m| m.target.parent() == Some(here.as_path()))
                .filter_map(|m| m.target.file_name().map(OsStr::to_owned))
                .collect(),
        )
    }

    /// The names in this directory, sorted.
    pub fn names(&self) -> Result<Vec<OsString>, DirError> {
        let mut names: Vec<OsString> = list(&self.fd)
            .map_err(|e| DirError::io(&self.path, "reading the directory", e))?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Deletes `name` and, for a directory, everything in it: through handles, never following
    /// a symlink (a symlink is removed, not what it points to) and never entering a mount.
    /// True when something was there.
    pub fn remove(&self, name: impl AsRef<OsStr>) -> Result<bool, DirError> {
        let name = name.as_ref();
        let path = self.child_path(name);
        match self.kind(name)? {
            None => Ok(false),
            Some(FileType::Directory) => {
                let top = open_beneath(&self.fd, name).map_err(|e| self.refusal(name, e))?;
                empty_tree(&top, &path)?;
                unlink(&self.fd, name, AtFlags::REMOVEDIR, &path)?;
                Ok(true)
            }
            Some(_) => {
                unlink(&self.fd, name, AtFlags::empty(), &path)?;
                Ok(true)
            }
        }
    }

    /// Renames `name` to `to_name` in `to`, never over something already there.
    pub fn rename_to(
        &self,
        name: impl AsRef<OsStr>,
        to: &Dir,
        to_name: impl AsRef<OsStr>,
    ) -> Result<(), DirError> {
        let (name, to_name) = (name.as_ref(), to_name.as_ref());
        rustix::fs::renameat_with(&self.fd, name, &to.fd, to_name, RenameFlags::NOREPLACE)
            .map_err(|e| DirError::io(self.child_path(name), "moving it", e))
    }

    /// Renames `name` over `to_name` in `to` (an atomic replacement of a file).
    pub fn rename_over(
        &self,
        name: impl AsRef<OsStr>,
        to: &Dir,
        to_name: impl AsRef<OsStr>,
    ) -> Result<(), DirError> {
        let (name, to_name) = (name.as_ref(), to_name.as_ref());
        rustix::fs::renameat(&self.fd, name, &to.fd, to_name)
            .map_err(|e| DirError::io(to.child_path(to_name), "replacing it", e))
    }

    /// A hard link `to_name` in this directory to its `name`.
    pub fn link(&self, name: impl AsRef<OsStr>, to_name: impl AsRef<OsStr>) -> io::Result<()> {
        rustix::fs::linkat(
            &self.fd,
            name.as_ref(),
            &self.fd,
            to_name.as_ref(),
            AtFlags::empty(),
        )
        .map_err(Into::into)
    }

    /// The contents of the regular file `name` (not through a symlink, never blocking on a
    /// fifo); None when there is none.
    pub fn read(&self, name: impl AsRef<OsStr>) -> Result<Option<Vec<u8>>, DirError> {
        let name = name.as_ref();
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP) => {
                return Err(DirError::io(
                    self.child_path(name),
                    "reading",
                    io::Error::other("it is a symlink; Strata reads its own files only"),
                ));
            }
            Err(e) => return Err(DirError::io(self.child_path(name), "reading", e)),
        };
        let kind = rustix::fs::fstat(&fd)
            .map(|st| FileType::from_raw_mode(st.st_mode))
            .map_err(|e| DirError::io(self.child_path(name), "reading", e))?;
        if kind != FileType::RegularFile {
            return Err(DirError::io(
                self.child_path(name),
                "reading",
                io::Error::other(format!("it is {}, not a file", kind_name(kind))),
            ));
        }
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .read_to_end(&mut bytes)
            .map_err(|e| DirError::io(self.child_path(name), "reading", e))?;
        Ok(Some(bytes))
    }

    /// Writes a new file `name` (never over an existing one, never through a symlink) and
    /// flushes it to the disk.
    pub fn write_new(
        &self,
        name: impl AsRef<OsStr>,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), DirError> {
        let name = name.as_ref();
        let path = self.child_path(name);
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| DirError::io(&path, "creating", e))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| DirError::io(&path, "writing", e))
    }

    /// Opens (creating if needed) the file `name` for a lock; never through a symlink.
    pub fn open_lock_file(&self, name: impl AsRef<OsStr>) -> Result<OwnedFd, DirError> {
        let name = name.as_ref();
        rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| DirError::io(self.child_path(name), "opening the lock", e))
    }

    /// Flushes this directory's entries (a rename or creation in it) to the disk.
    pub fn sync(&self) -> Result<(), DirError> {
        rustix::fs::fsync(&self.fd)
            .map_err(|e| DirError::io(&self.path, "syncing the directory", e))
    }

    /// Flushes the whole filesystem this directory is on.
    pub fn sync_filesystem(&self) -> Result<(), DirError> {
        rustix::fs::syncfs(&self.fd)
            .map_err(|e| DirError::io(&self.path, "syncing the filesystem", e))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes free for an unprivileged writer on this directory's filesystem.
    pub fn free_bytes(&self) -> Result<u64, DirError> {
        let st = rustix::fs::fstatvfs(&self.fd)
            .map_err(|e| DirError::io(&self.path, "checking free space", e))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// Opens one name below `dir` as a directory: no symlink, no `..`, no mount crossed. Kernels
/// without openat2 (before 5.6) get `O_NOFOLLOW` and a device comparison instead.
pub(crate) fn open_beneath(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    if !is_plain_name(name) {
        return Err(Errno::INVAL);
    }
    match rustix::fs::openat2(dir, name, DIR_FLAGS, Mode::empty(), BENEATH) {
        Err(Errno::NOSYS) => {
            let fd = rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
            let (parent, child) = (rustix::fs::fstat(dir)?, rustix::fs::fstat(&fd)?);
            if parent.st_dev != child.st_dev {
                return Err(Errno::XDEV);
            }
            Ok(fd)
        }
        other => other,
    }
}

/// One entry's name: not empty, `.`, `..` or anything with a `/`.
fn is_plain_name(name: &OsStr) -> bool {
    !(name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/'))
}

fn list(fd: &OwnedFd) -> io::Result<Vec<(OsString, FileType)>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(fd)? {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            out.push((name.to_owned(), entry.file_type()));
        }
    }
    Ok(out)
}

fn unlink(dir: &OwnedFd, name: &OsStr, flags: AtFlags, path: &Path) -> Result<(), DirError> {
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(DirError::io(path, "removing", e)),
    }
}

/// Empties the directory `top` (at `path`). Subdirectories deeper than [`MAX_OPEN_DEPTH`] are
/// moved up to `top` and emptied from there on a later pass.
fn empty_tree(top: &OwnedFd, path: &Path) -> Result<(), DirError> {
    let mut moved = 0u64;
    loop {
        let more = empty_dir(top, top, path, 0, &mut moved)?;
        if !more {
            return Ok(());
        }
    }
}

/// One pass over `dir`; true when a deeper directory was moved up to `top` (another pass).
fn empty_dir(
    dir: &OwnedFd,
    top: &OwnedFd,
    path: &Path,
    depth: usize,
    moved: &mut u64,
) -> Result<bool, DirError> {
    let mut again = false;
    let entries = list(dir).map_err(|e| DirError::io(path, "reading the directory", e))?;
    for (name, kind) in entries {
        let child = path.join(&name);
        // Types the listing cannot give are asked for.
        let kind = match kind {
            FileType::Unknown => match rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => FileType::from_raw_mode(st.st_mode),
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(DirError::io(child, "reading metadata", e)),
            },
            kind => kind,
        };
        if kind != FileType::Directory {
            unlink(dir, &name, AtFlags::empty(), &child)?;
            continue;
        }
        if depth + 1 >= MAX_OPEN_DEPTH {
            *moved += 1;
            let up = format!(".strata-deep-{moved}");
            rustix::fs::renameat_with(dir, &name, top, up.as_str(), RenameFlags::NOREPLACE)
                .map_err(|e| DirError::io(&child, "moving a deep directory up to delete it", e))?;
            again = true;
            continue;
        }
        let sub = match open_beneath(dir, &name) {
            Ok(fd) => fd,
            Err(Errno::XDEV) => {
                return Err(DirError::NotARealDirectory {
                    path: child,
                    found: "a mount point (something is mounted there; unmount it first)".into(),
                });
            }
            Err(e) => return Err(DirError::io(child, "opening the directory", e)),
        };
        again |= empty_dir(&sub, top, &child, depth + 1, moved)?;
        unlink(dir, &name, AtFlags::REMOVEDIR, &child)?;
    }
    Ok(again)
}

/// A file type in words.
pub fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a fifo",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn removal_never_follows_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("keep")).unwrap();
        fs::write(outside.join("keep/file"), "precious").unwrap();
        let store = tmp.path().join("store");
        fs::create_dir_all(store.join("tree/sub")).unwrap();
        std::os::unix::fs::symlink(&outside, store.join("tree/sub/link")).unwrap();
        std::os::unix::fs::symlink(&outside, store.join("link")).unwrap();
        let dir = Dir::open(&store).unwrap();
        assert!(dir.remove("tree").unwrap());
        assert!(dir.remove("link").unwrap());
        assert!(!dir.remove("link").unwrap());
        assert_eq!(
            fs::read_to_string(outside.join("keep/file")).unwrap(),
            "precious"
        );
        assert!(fs::read_dir(&store).unwrap().next().is_none());
    }

    #[test]
    fn real_directories_are_found_alone_and_all_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let here = tmp.path().join("here");
        fs::create_dir_all(here.join("real")).unwrap();
        fs::create_dir_all(here.join("also real/inner")).unwrap();
        fs::write(here.join("file"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, here.join("link")).unwrap();
        std::os::unix::fs::symlink("nowhere", here.join("dangling")).unwrap();
        let dir = Dir::open(&here).unwrap();
        let mut all: Vec<OsString> = dir.real_dirs().unwrap().into_iter().collect();
        all.sort();
        assert_eq!(all, ["also real", "real"]);
        for name in ["real", "also real"] {
            assert!(dir.has_dir(name), "{name}");
        }
        for name in [
            "file",
            "link",
            "dangling",
            "missing",
            ".",
            "..",
            "",
            "real/..",
            "also real/inner",
        ] {
            assert!(!dir.has_dir(name), "{name}");
        }
    }

    #[test]
    fn a_symlinked_folder_is_refused_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
        fs::write(tmp.path().join("file"), "").unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert!(dir.sub("real").is_ok());
        let e = dir.sub("link").unwrap_err().to_string();
        assert!(e.contains("link is a symlink (to "), "{e}");
        let e = dir.sub("file").unwrap_err().to_string();
        assert!(e.contains("not a directory (a file)"), "{e}");
        assert!(dir.sub("..").is_err());
        assert!(dir.sub("real/..").is_err());
    }

    #[test]
    fn a_tree_deeper_than_the_open_handles_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        // 300 levels of 200-byte names: paths far past PATH_MAX, made through handles.
        let name = "d".repeat(200);
        let mut fd = rustix::fs::openat(&dir.fd, ".", DIR_FLAGS, Mode::empty()).unwrap();
        rustix::fs::mkdirat(&fd, "deep", Mode::from_raw_mode(0o755)).unwrap();
        fd = open_beneath(&fd, OsStr::new("deep")).unwrap();
        for _ in 0..300 {
            rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            rustix::fs::mkdirat(&fd, "side", Mode::from_raw_mode(0o755)).unwrap();
            fd = open_beneath(&fd, OsStr::new(&name)).unwrap();
        }
        assert!(dir.remove("deep").unwrap());
        assert_eq!(dir.kind("deep").unwrap(), None);
    }

    #[test]
    fn in_root_resolves_absolute_links_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("data/strata")).unwrap();
        std::os::unix::fs::symlink("/data/strata", root.join("strata")).unwrap();
        let root = Dir::open(&root).unwrap();
        let store = Dir::open_in_root(&root, Path::new("/strata")).unwrap();
        fs::write(tmp.path().join("root/data/strata/mark"), "x").unwrap();
        assert_eq!(store.read("mark").unwrap().as_deref(), Some(&b"x"[..]));
    }
}
