//! Paths longer than the kernel takes in one call (`PATH_MAX`, 4096 bytes): layers may hold
//! them (overlayfs shows them fine), so every call the engine makes by path goes through
//! [`short`], which opens the parent directory a piece at a time and names the entry through
//! `/proc/self/fd`. Paths that fit are used as they are.

use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{CWD, Mode, OFlags};

/// Paths up to this long are given to the kernel as they are (with room to spare below
/// `PATH_MAX` for the `/proc/self/fd/N/` prefix of the long form).
const DIRECT: usize = 3800;

/// A path the kernel takes in one call, and the handle that keeps it valid.
#[derive(Debug)]
pub(crate) struct Short {
    _dir: Option<OwnedFd>,
    path: PathBuf,
}

impl Deref for Short {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

/// `path` in a form the kernel takes in one call. Symlinks in the parent directories are
/// followed, as the kernel would follow them in the path itself; the last component is left
/// to the call (an `l*` call does not follow it).
pub(crate) fn short(path: &Path) -> io::Result<Short> {
    if path.as_os_str().len() <= DIRECT {
        return Ok(Short {
            _dir: None,
            path: path.to_owned(),
        });
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from_raw_os_error(36));
    };
    let mut dir: Option<OwnedFd> = None;
    let mut piece = PathBuf::new();
    let open = |at: &Option<OwnedFd>, piece: &Path| -> io::Result<OwnedFd> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        Ok(match at {
            Some(fd) => rustix::fs::openat(fd, piece, flags, Mode::empty())?,
            None => rustix::fs::openat(CWD, piece, flags, Mode::empty())?,
        })
    };
    for component in parent.components() {
        let part: &Path = match component {
            Component::RootDir => Path::new("/"),
            other => other.as_os_str().as_ref(),
        };
        if piece.as_os_str().len() + part.as_os_str().len() + 1 > DIRECT {
            dir = Some(open(&dir, &piece)?);
            piece = PathBuf::new();
        }
        piece.push(part);
    }
    if !piece.as_os_str().is_empty() {
        dir = Some(open(&dir, &piece)?);
    }
    let fd = dir.expect("a long path has a parent");
    let path = Path::new("/proc/self/fd")
        .join(fd.as_raw_fd().to_string())
        .join(name);
    Ok(Short {
        _dir: Some(fd),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_past_path_max_is_reached() {
        let tmp = tempfile::tempdir().unwrap();
        let mut path = tmp.path().to_owned();
        let part = "p".repeat(250);
        // Made one directory at a time, relative to the last.
        let mut fd = rustix::fs::open(tmp.path(), OFlags::DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..30 {
            rustix::fs::mkdirat(&fd, part.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, part.as_str(), OFlags::DIRECTORY, Mode::empty()).unwrap();
            path.push(&part);
        }
        let file = rustix::fs::openat(
            &fd,
            "f",
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&file, b"deep").unwrap();
        path.push("f");
        assert!(path.as_os_str().len() > 7000);
        assert!(std::fs::read(&path).is_err(), "too long for one call");
        assert_eq!(std::fs::read(&*short(&path).unwrap()).unwrap(), b"deep");
        let near = tmp.path().join("near");
        assert_eq!(&*short(&near).unwrap(), near.as_path());
    }
}
