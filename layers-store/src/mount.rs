//! Mounting an overlay stack, shared by the boot hook and `overlayctl mount`. The new mount API adds one lower layer per
//! `fsconfig("lowerdir+")` call, so stacks of hundreds of layers fit; kernels before 6.8 accept
//! `lowerdir+` and then fail at create with EINVAL, and take the classic option string instead,
//! with short paths relative to the layers directory so 200 layers fit in its one page.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount,
};

/// Options that keep an upper a clean, portable future layer, and lowers read as plain layers:
/// no redirects followed or made (`off` would still follow them, and the kernel refuses it next
/// to `userxattr`), no index (it pins an upper to its exact lowers), no metacopy, no xino.
pub const CLEAN_OPTIONS: [(&str, &str); 4] = [
    ("redirect_dir", "nofollow"),
    ("index", "off"),
    ("metacopy", "off"),
    ("xino", "off"),
];

/// The prefix of the source field of every overlay Strata mounts; how its own mounts are known.
pub const SOURCE_PREFIX: &str = "strata";

/// One overlay to mount.
#[derive(Debug, Clone)]
pub struct OverlaySpec {
    /// Absolute paths, top first.
    pub lowers: Vec<PathBuf>,
    /// `(upperdir, workdir)`; none for a read-only mount (which needs two lowers or more).
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Overlay's attributes are in `user.overlay.*`.
    pub userxattr: bool,
    pub read_only: bool,
    /// Shown as the mount's source; starts with [`SOURCE_PREFIX`].
    pub source: String,
}

/// Which interface made the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountApi {
    /// fsopen/fsconfig with `lowerdir+`.
    New,
    /// mount(2) with an option string.
    Classic,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting needs root (CAP_SYS_ADMIN): {0}")]
    NotPermitted(io::Error),
    #[error("the overlay of {layers} layers was refused by the kernel ({api:?} mount API): {error}{}", kernel_says(.messages))]
    Refused {
        layers: usize,
        api: MountApi,
        error: io::Error,
        messages: Vec<String>,
    },
    #[error(
        "{path}: the classic mount call cannot name a path with `,`, `:` or `\\` in it (this kernel has no new mount API for it)"
    )]
    UnsafePath { path: PathBuf },
    #[error(
        "the option string for {layers} layers is {len} bytes, more than the one page the classic mount call takes; this kernel has no lowerdir+ for longer stacks"
    )]
    TooLong { layers: usize, len: usize },
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
}

fn kernel_says(messages: &[String]) -> String {
    if messages.is_empty() {
        String::new()
    } else {
        format!("; the kernel said: {}", messages.join("; "))
    }
}

/// Mounts the overlay at `target`: the new API first, the classic call where the kernel lacks
/// `lowerdir+`. Lowers of one directory are named from inside it: the process's working
/// directory moves there for the call (and back), so no other thread may resolve relative
/// paths meanwhile, and a mount's source should name the store by its canonical path, by which
/// [`crate::Store::mounted_layers`] finds such names again.
pub fn mount_overlay(spec: &OverlaySpec, target: &Path) -> Result<MountApi, MountError> {
    let absolute = |p: &Path| {
        std::path::absolute(p).map_err(|source| MountError::Io {
            path: p.to_owned(),
            action: "resolving the path",
            source,
        })
    };
    let spec = OverlaySpec {
        lowers: spec
            .lowers
            .iter()
            .map(|l| absolute(l))
            .collect::<Result<_, _>>()?,
        upper: match &spec.upper {
            Some((upper, work)) => Some((absolute(upper)?, absolute(work)?)),
            None => None,
        },
        ..spec.clone()
    };
    let target = absolute(target)?;
    // Kernels before 6.8 have no `lowerdir+`: go straight to the classic call rather than make
    // the kernel log an "unrecognized mount option" at every boot. A kernel that says 6.8 but
    // lacks it (a backport's odd mix) still falls back on the error below.
    if !kernel_has_lowerdir_plus() {
        return mount_classic(&spec, &target).map(|()| MountApi::Classic);
    }
    match mount_new_api(&spec, &target) {
        Ok(()) => Ok(MountApi::New),
        Err(NewApiError::Unsupported { messages }) => match mount_classic(&spec, &target) {
            Ok(()) => Ok(MountApi::Classic),
            // What the kernel said to the new API is often the reason the classic call fails.
            Err(MountError::Refused {
                layers,
                api,
                error,
                messages: none,
            }) if none.is_empty() => Err(MountError::Refused {
                layers,
                api,
                error,
                messages,
            }),
            Err(e) => Err(e),
        },
        Err(NewApiError::Failed(e)) => Err(e),
    }
}

/// Whether the running kernel is 6.8 or later (from uname's release, "6.1.0-56-amd64").
fn kernel_has_lowerdir_plus() -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 8),
        _ => true,
    }
}

enum NewApiError {
    /// No fsopen, or no `lowerdir+`: try the classic call. Carries what the kernel said.
    Unsupported {
        messages: Vec<String>,
    },
    Failed(MountError),
}

fn refused(spec: &OverlaySpec, api: MountApi, errno: Errno, messages: Vec<String>) -> MountError {
    let source = io::Error::from(errno);
    if errno == Errno::PERM || (errno == Errno::ACCESS && messages.is_empty()) {
        return MountError::NotPermitted(source);
    }
    MountError::Refused {
        layers: spec.lowers.len(),
        api,
        error: source,
        messages,
    }
}

/// The messages the kernel logged on a filesystem context ("e overlayfs: …" lines).
fn context_messages(fd: &OwnedFd) -> Vec<String> {
    let mut file = std::fs::File::from(fd.try_clone().expect("duplicating a descriptor"));
    let mut messages = Vec::new();
    let mut buf = [0u8; 1024];
    // Each read returns one message; ENODATA ends the log.
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        messages.push(
            text.trim_start_matches(['e', 'w', 'i', ' '])
                .trim()
                .to_owned(),
        );
    }
    messages
}

fn mount_new_api(spec: &OverlaySpec, target: &Path) -> Result<(), NewApiError> {
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fd) => fd,
        Err(Errno::NOSYS) => {
            return Err(NewApiError::Unsupported {
                messages: Vec::new(),
            });
        }
        Err(e) => {
            return Err(NewApiError::Failed(refused(
                spec,
                MountApi::New,
                e,
                Vec::new(),
            )));
        }
    };
    let fail =
        |e: Errno| NewApiError::Failed(refused(spec, MountApi::New, e, context_messages(&fs)));
    let set = |key: &str, value: &Path| fsconfig_set_string(&fs, key, value);
    set("source", Path::new(&spec.source)).map_err(fail)?;
    // Lowers that share one directory (a store's layers) are named from there, so the kernel
    // looks up one name per layer rather than a whole path, as mount(8) run there does.
    let shared = shared_parent(&spec.lowers);
    let _inside = match shared {
        Some(dir) => Some(InDir::enter(dir).map_err(NewApiError::Failed)?),
        None => None,
    };
    for (i, lower) in spec.lowers.iter().enumerate() {
        let name = match shared {
            Some(_) => Path::new(lower.file_name().unwrap_or_default()),
            None => lower.as_path(),
        };
        match set("lowerdir+", name) {
            Ok(()) => {}
            // Before 6.5 the key itself is unknown.
            Err(Errno::INVAL) if i == 0 => {
                return Err(NewApiError::Unsupported {
                    messages: context_messages(&fs),
                });
            }
            Err(e) => return Err(fail(e)),
        }
    }
    if let Some((upper, work)) = &spec.upper {
        set("upperdir", upper).map_err(fail)?;
        set("workdir", work).map_err(fail)?;
    }
    for (key, value) in CLEAN_OPTIONS {
        set(key, Path::new(value)).map_err(fail)?;
    }
    if spec.userxattr {
        rustix::mount::fsconfig_set_flag(&fs, "userxattr").map_err(fail)?;
    }
    if let Err(e) = fsconfig_create(&fs) {
        let messages = context_messages(&fs);
        // 6.1 to 6.7 accept `lowerdir+` as a key and fail here, finding no lower layer (docs/overlayfs.md);
        // any other complaint is the real reason and is reported as it is.
        if e == Errno::INVAL
            && (messages.is_empty() || messages.iter().any(|m| m.contains("lowerdir")))
        {
            return Err(NewApiError::Unsupported { messages });
        }
        return Err(NewApiError::Failed(refused(
            spec,
            MountApi::New,
            e,
            messages,
        )));
    }
    let attrs = if spec.read_only {
        MountAttrFlags::MOUNT_ATTR_RDONLY
    } else {
        MountAttrFlags::empty()
    };
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(fail)?;
    move_mount(
        mnt.as_fd(),
        "",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| {
        NewApiError::Failed(MountError::Io {
            path: target.to_owned(),
            action: "attaching the overlay",
            source: e.into(),
        })
    })
}

/// The one directory all `lowers` are in, when they are; each then has a file name.
fn shared_parent(lowers: &[PathBuf]) -> Option<&Path> {
    let parent = lowers.first()?.parent()?;
    lowers
        .iter()
        .all(|l| l.parent() == Some(parent) && l.file_name().is_some())
        .then_some(parent)
}

/// The working directory moved into a directory for as long as this lives, and back after.
struct InDir {
    previous: OwnedFd,
}

impl InDir {
    fn enter(dir: &Path) -> Result<Self, MountError> {
        let io = |action| {
            move |e: Errno| MountError::Io {
                path: dir.to_owned(),
                action,
                source: e.into(),
            }
        };
        let previous = rustix::fs::open(
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("remembering the working directory"))?;
        rustix::process::chdir(dir).map_err(io("entering the layers directory"))?;
        Ok(Self { previous })
    }
}

impl Drop for InDir {
    fn drop(&mut self) {
        let _ = rustix::process::fchdir(&self.previous);
    }
}

/// The classic option string. Lowers that share one parent directory are named relative to it
/// (the call runs from there), which keeps 200 layers within a page.
fn classic_options(spec: &OverlaySpec) -> (Option<PathBuf>, String) {
    let shared = shared_parent(&spec.lowers).map(Path::to_owned);
    let shared = shared.as_ref();
    let names: Vec<String> = spec
        .lowers
        .iter()
        .map(|l| match shared {
            Some(_) => l
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            None => l.display().to_string(),
        })
        .collect();
    let mut options = format!("lowerdir={}", names.join(":"));
    if let Some((upper, work)) = &spec.upper {
        options += &format!(",upperdir={},workdir={}", upper.display(), work.display());
    }
    for (key, value) in CLEAN_OPTIONS {
        options += &format!(",{key}={value}");
    }
    if spec.userxattr {
        options += ",userxattr";
    }
    (shared.cloned(), options)
}

/// The most the classic call takes: one page, its terminating NUL included.
const PAGE: usize = 4096;

fn mount_classic(spec: &OverlaySpec, target: &Path) -> Result<(), MountError> {
    let upper_paths = spec.upper.iter().flat_map(|(u, w)| [u, w]);
    if let Some(path) = spec.lowers.iter().chain(upper_paths).find(|p| {
        p.as_os_str()
            .as_encoded_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':' | b'\\'))
    }) {
        return Err(MountError::UnsafePath { path: path.clone() });
    }
    let (cwd, options) = classic_options(spec);
    if options.len() >= PAGE {
        return Err(MountError::TooLong {
            layers: spec.lowers.len(),
            len: options.len(),
        });
    }
    let target = std::path::absolute(target).map_err(|source| MountError::Io {
        path: target.to_owned(),
        action: "resolving the mount point",
        source,
    })?;
    let _inside = match &cwd {
        Some(dir) => Some(InDir::enter(dir)?),
        None => None,
    };
    let data = CString::new(options).expect("paths have no NUL");
    let flags = if spec.read_only {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    let result = rustix::mount::mount(
        spec.source.as_str(),
        &target,
        "overlay",
        flags,
        data.as_c_str(),
    );
    result.map_err(|e| refused(spec, MountApi::Classic, e, Vec::new()))
}

/// Unmounts `target`.
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    rustix::mount::unmount(target, flags).map_err(Into::into)
}

/// A mount as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The filesystem's own options (`lowerdir+=…,redirect_dir=…` for an overlay).
    pub options: String,
}

impl MountEntry {
    /// An overlay's lower layers as its options name them (`lowerdir+=` entries, or the
    /// `lowerdir=` list, whose names may be relative to where it was mounted from).
    pub fn lowers(&self) -> Vec<String> {
        let mut lowers = Vec::new();
        for option in self.options.split(',') {
            if let Some(path) = option.strip_prefix("lowerdir+=") {
                lowers.push(path.to_owned());
            } else if let Some(list) = option.strip_prefix("lowerdir=") {
                lowers.extend(list.split(':').filter(|p| !p.is_empty()).map(str::to_owned));
            }
        }
        lowers
    }
}

/// The mounts of this process's namespace, from `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let target = unescape_mountinfo(fields.get(4)?);
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                target: PathBuf::from(target),
                fstype: fields.get(dash + 1)?.to_string(),
                source: unescape_mountinfo(fields.get(dash + 2)?),
                options: unescape_mountinfo(fields.get(dash + 3).unwrap_or(&"")),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Strata's overlay mounted at `target`, if there is one (the topmost mount there).
pub fn strata_mount_at(mountinfo: &str, target: &Path) -> Option<MountEntry> {
    parse_mountinfo(mountinfo)
        .into_iter()
        .rev()
        .find(|m| m.target == target)
        .filter(|m| m.fstype == "overlay" && m.source.starts_with(SOURCE_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(lowers: &[&str]) -> OverlaySpec {
        OverlaySpec {
            lowers: lowers.iter().map(PathBuf::from).collect(),
            upper: None,
            userxattr: false,
            read_only: true,
            source: "strata:/strata".into(),
        }
    }

    #[test]
    fn classic_options_use_short_names_from_a_shared_parent() {
        let (cwd, options) =
            classic_options(&spec(&["/strata/layers/up-1", "/strata/layers/base"]));
        assert_eq!(cwd.as_deref(), Some(Path::new("/strata/layers")));
        assert_eq!(
            options,
            "lowerdir=up-1:base,redirect_dir=nofollow,index=off,metacopy=off,xino=off"
        );
        let mut mixed = spec(&["/a/x", "/b/y"]);
        mixed.upper = Some(("/u/data".into(), "/u/work".into()));
        mixed.userxattr = true;
        let (cwd, options) = classic_options(&mixed);
        assert_eq!(cwd, None);
        assert_eq!(
            options,
            "lowerdir=/a/x:/b/y,upperdir=/u/data,workdir=/u/work,redirect_dir=nofollow,index=off,metacopy=off,xino=off,userxattr"
        );
    }

    #[test]
    fn two_hundred_layers_fit_in_a_page_with_short_names() {
        let names: Vec<String> = (0..200)
            .map(|i| format!("/strata/layers/upgrade-{i:03}"))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (_, options) = classic_options(&spec(&refs));
        assert!(options.len() < PAGE, "{}", options.len());
    }

    #[test]
    fn mountinfo_is_read_with_escapes() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - overlay strata:/strata rw,lowerdir=a\n\
                    37 35 98:0 / /mnt/plain rw - ext4 /dev/vda rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts[0].target, Path::new("/mnt/with space"));
        assert_eq!(
            (mounts[0].fstype.as_str(), mounts[0].source.as_str()),
            ("overlay", "strata:/strata")
        );
        assert!(strata_mount_at(text, Path::new("/mnt/with space")).is_some());
        assert!(strata_mount_at(text, Path::new("/mnt/plain")).is_none());
        assert!(strata_mount_at(text, Path::new("/elsewhere")).is_none());
        assert_eq!(mounts[0].lowers(), ["a"]);
        let new_api = "65 43 0:39 / /m ro - overlay strata:/s ro,lowerdir+=/s/layers/b,lowerdir+=/s/layers/base,redirect_dir=nofollow\n";
        assert_eq!(
            parse_mountinfo(new_api)[0].lowers(),
            ["/s/layers/b", "/s/layers/base"]
        );
    }
}
