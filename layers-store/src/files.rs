//! The plan and the boot state on disk: replaced atomically, with the previous good copy kept
//! as `<file>.prev` and used when the current one cannot be read. Read and written through the
//! store's handles, never through a symlink.

use std::sync::atomic::{AtomicU64, Ordering};

use layers_spec::{BootState, Plan, PlanError};

use crate::dir::{Dir, DirError};
use crate::layout::PREV_SUFFIX;

/// A file read from the store, and whether the previous copy had to stand in for it.
#[derive(Debug)]
pub struct Loaded<T> {
    pub value: T,
    /// The file that was read.
    pub path: std::path::PathBuf,
    /// Set when the current file was unreadable or invalid and `.prev` was read instead: why.
    pub fell_back: Option<PlanError>,
}

pub(crate) fn prev_name(name: &str) -> String {
    format!("{name}{PREV_SUFFIX}")
}

/// A directory error as a plan or state file's error.
pub(crate) fn to_plan_error(e: DirError) -> PlanError {
    match e {
        DirError::Io {
            path,
            action,
            error,
        } => PlanError::io(path, action, error),
        DirError::NotARealDirectory { path, found } => PlanError::io(
            path,
            "opening",
            std::io::Error::other(format!(
                "it is {found}, not a real directory inside the store; Strata never works through it"
            )),
        ),
    }
}

/// Reads `name` in `dir`, falling back to `name.prev`.
pub(crate) fn load_with_prev<T>(
    dir: &Dir,
    name: &str,
    parse: fn(&str, &str) -> Result<T, PlanError>,
) -> Result<Loaded<T>, PlanError> {
    let read = |name: &str| -> Result<T, PlanError> {
        let path = dir.child_path(name);
        let bytes = dir
            .read(name)
            .map_err(to_plan_error)?
            .ok_or_else(|| PlanError::io(&path, "reading", std::io::Error::from_raw_os_error(2)))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            PlanError::io(
                &path,
                "reading",
                std::io::Error::other("it is not UTF-8 text"),
            )
        })?;
        parse(&text, &path.display().to_string())
    };
    match read(name) {
        Ok(value) => Ok(Loaded {
            value,
            path: dir.child_path(name),
            fell_back: None,
        }),
        Err(primary) => {
            let prev = prev_name(name);
            match read(&prev) {
                Ok(value) => Ok(Loaded {
                    value,
                    path: dir.child_path(&prev),
                    fell_back: Some(primary),
                }),
                Err(prev) => Err(PlanError::NoUsableCopy {
                    primary: Box::new(primary),
                    prev: Box::new(prev),
                }),
            }
        }
    }
}

/// The plan's layer names in `name` of `dir`, when it can be read.
pub(crate) fn plan_names(dir: &Dir, name: &str) -> Vec<String> {
    dir.read(name)
        .ok()
        .flatten()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| Plan::parse(&text, name).ok())
        .map(|plan| plan.layers.into_iter().map(|l| l.name).collect())
        .unwrap_or_default()
}

/// A name for a temporary file beside `name`, unique within this process and across processes.
/// Leftovers from a crash start with `.` and end in `.tmp`.
fn temp_name(name: &str, purpose: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.{purpose}.{}.{n}.tmp", std::process::id())
}

/// Replaces `name` in `dir` with `contents` so that a crash at any point leaves either the old or
/// the new file: write a temporary file beside it, fsync it, keep the old file as `.prev` (a
/// hard link, so no copy and no moment without a file; a copy where the filesystem has no hard
/// links) when it is valid, rename over, fsync the directory.
pub(crate) fn replace_keeping_prev(
    dir: &Dir,
    name: &str,
    contents: &[u8],
    is_valid: impl Fn(&str, &str) -> bool,
) -> Result<(), PlanError> {
    if layers_spec::fault::fails("store-write") {
        return Err(PlanError::io(
            dir.child_path(name),
            "writing the new copy",
            std::io::Error::from_raw_os_error(28),
        ));
    }
    let tmp = temp_name(name, "new");
    let cleanup = |n: &str| {
        let _ = dir.remove(n);
    };
    dir.write_new(&tmp, contents, 0o644).map_err(|e| {
        cleanup(&tmp);
        to_plan_error(e)
    })?;

    let old = dir
        .read(name)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok());
    let path = dir.child_path(name).display().to_string();
    if let Some(old) = old.filter(|old| is_valid(old, &path)) {
        let prev = prev_name(name);
        let prev_tmp = temp_name(name, "prev");
        let kept = match dir.link(name, &prev_tmp) {
            Err(e) if [Some(EPERM), Some(EOPNOTSUPP)].contains(&e.raw_os_error()) => {
                dir.write_new(&prev_tmp, old.as_bytes(), 0o644)
            }
            Err(e) => Err(DirError::io(dir.child_path(&prev_tmp), "linking", e)),
            Ok(()) => Ok(()),
        }
        .and_then(|()| dir.rename_over(&prev_tmp, dir, &prev));
        if let Err(e) = kept {
            cleanup(&prev_tmp);
            cleanup(&tmp);
            return Err(PlanError::io(
                dir.child_path(&prev),
                "keeping the previous copy",
                std::io::Error::other(e.to_string()),
            ));
        }
    }
    dir.rename_over(&tmp, dir, name).map_err(|e| {
        cleanup(&tmp);
        to_plan_error(e)
    })?;
    dir.sync().map_err(to_plan_error)
}

/// Without hard links (vfat, some FUSE filesystems) `link(2)` fails with one of these.
const EPERM: i32 = 1;
const EOPNOTSUPP: i32 = 95;

/// Checks and writes a plan.
pub(crate) fn save_plan(dir: &Dir, name: &str, plan: &Plan) -> Result<(), PlanError> {
    let text = plan.check()?;
    replace_keeping_prev(dir, name, text.as_bytes(), |text, file| {
        Plan::parse(text, file).is_ok()
    })
}

/// Checks and writes a boot state.
pub(crate) fn save_state(dir: &Dir, name: &str, state: &BootState) -> Result<(), PlanError> {
    let text = state.check()?;
    replace_keeping_prev(dir, name, text.as_bytes(), |text, file| {
        BootState::parse(text, file).is_ok()
    })
}
