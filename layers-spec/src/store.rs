//! Reading and writing the plan and boot state in a store: atomic replacement, with the previous
//! good copy kept as `<file>.prev` and used when the current one cannot be read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::PlanError;
use crate::plan::Plan;
use crate::state::BootState;

/// The plan's file name in the store.
pub const PLAN_FILE: &str = "overlayplan.toml";
/// The boot state's directory and file name in the store.
pub const STATE_DIR: &str = "state";
pub const STATE_FILE: &str = "boot.toml";
/// Appended to a file name for the previous copy.
pub const PREV_SUFFIX: &str = ".prev";
/// Under the store: one canonical manifest per layer, named as the layer.
pub const MANIFESTS_DIR: &str = "manifests";

/// A file read from the store, and whether the previous copy had to stand in for it.
#[derive(Debug)]
pub struct Loaded<T> {
    pub value: T,
    /// The file that was read.
    pub path: PathBuf,
    /// Set when the current file was unreadable or invalid and `.prev` was read instead: why.
    pub fell_back: Option<PlanError>,
}

pub fn plan_path(store: &Path) -> PathBuf {
    store.join(PLAN_FILE)
}

pub fn state_path(store: &Path) -> PathBuf {
    store.join(STATE_DIR).join(STATE_FILE)
}

fn prev_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(PREV_SUFFIX);
    path.with_file_name(name)
}

/// Bytes of file content in a layer, summed from its manifest's `size=` fields (no walk of
/// the layer itself); `None` when the layer has no readable manifest.
pub fn layer_content_size(store: &Path, name: &str) -> Option<u64> {
    let text = fs::read_to_string(store.join(MANIFESTS_DIR).join(name)).ok()?;
    Some(
        text.split(' ')
            .filter_map(|field| field.strip_prefix("size="))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum(),
    )
}

/// Loads the store's plan, falling back to `overlayplan.toml.prev`.
pub fn load_plan(store: &Path) -> Result<Loaded<Plan>, PlanError> {
    load_with_prev(&plan_path(store), Plan::parse)
}

/// The layers the previous plan (`overlayplan.toml.prev`, the fallback when the plan cannot be
/// read) names, when it can be read: they are kept on disk.
pub fn prev_plan_layers(store: &Path) -> Vec<String> {
    let path = prev_path(&plan_path(store));
    fs::read_to_string(&path)
        .ok()
        .and_then(|text| Plan::parse(&text, &path.display().to_string()).ok())
        .map(|plan| plan.layers.into_iter().map(|l| l.name).collect())
        .unwrap_or_default()
}

/// Saves the plan atomically after checking it; the plan it replaces is kept as `.prev` when it
/// was valid (an invalid one never pushes out the last good copy).
pub fn save_plan(store: &Path, plan: &Plan) -> Result<(), PlanError> {
    let text = plan.check()?;
    replace_keeping_prev(&plan_path(store), text.as_bytes(), |text, file| {
        Plan::parse(text, file).is_ok()
    })
}

/// Loads the boot state; a store that has none yet has the default state.
pub fn load_state(store: &Path) -> Result<Loaded<BootState>, PlanError> {
    let path = state_path(store);
    if !path.exists() && !prev_path(&path).exists() {
        return Ok(Loaded {
            value: BootState::default(),
            path,
            fell_back: None,
        });
    }
    load_with_prev(&path, BootState::parse)
}

/// Saves the boot state atomically after checking it, creating `state/` in an existing store.
pub fn save_state(store: &Path, state: &BootState) -> Result<(), PlanError> {
    let text = state.check()?;
    let path = state_path(store);
    let dir = store.join(STATE_DIR);
    match fs::create_dir(&dir) {
        Ok(()) => sync_dir(store)?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(PlanError::io(dir, "creating the state directory", e)),
    }
    replace_keeping_prev(&path, text.as_bytes(), |text, file| {
        BootState::parse(text, file).is_ok()
    })
}

fn load_with_prev<T>(
    path: &Path,
    parse: fn(&str, &str) -> Result<T, PlanError>,
) -> Result<Loaded<T>, PlanError> {
    let read = |path: &Path| -> Result<T, PlanError> {
        let text = fs::read_to_string(path).map_err(|e| PlanError::io(path, "reading", e))?;
        parse(&text, &path.display().to_string())
    };
    match read(path) {
        Ok(value) => Ok(Loaded {
            value,
            path: path.to_owned(),
            fell_back: None,
        }),
        Err(primary) => {
            let prev = prev_path(path);
            match read(&prev) {
                Ok(value) => Ok(Loaded {
                    value,
                    path: prev,
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

/// A name for a temporary file beside `name`, unique within this process and across processes.
/// Leftovers from a crash start with `.` and end in `.tmp`, for whoever cleans the store.
fn temp_name(name: &str, purpose: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.{purpose}.{}.{n}.tmp", std::process::id())
}

/// Replaces `path` with `contents` so that a crash at any point leaves either the old or the new
/// file: write a temporary file in the same directory, fsync it, keep the old file as `.prev`
/// (a hard link, so no copy and no moment without a plan; a copy where the filesystem has no
/// hard links), rename over, fsync the directory.
fn replace_keeping_prev(
    path: &Path,
    contents: &[u8],
    is_valid: impl Fn(&str, &str) -> bool,
) -> Result<(), PlanError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(temp_name(&name, "new"));
    write_synced(&tmp, contents).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PlanError::io(&tmp, "writing the new copy", e)
    })?;

    let old = fs::read_to_string(path).ok();
    if let Some(old) = old.filter(|old| is_valid(old, &path.display().to_string())) {
        let prev = prev_path(path);
        let prev_tmp = dir.join(temp_name(&name, "prev"));
        let kept = match fs::hard_link(path, &prev_tmp) {
            Err(e) if [Some(EPERM), Some(EOPNOTSUPP)].contains(&e.raw_os_error()) => {
                write_synced(&prev_tmp, old.as_bytes())
            }
            other => other,
        }
        .and_then(|()| fs::rename(&prev_tmp, &prev));
        if let Err(e) = kept {
            let _ = fs::remove_file(&prev_tmp);
            let _ = fs::remove_file(&tmp);
            return Err(PlanError::io(prev, "keeping the previous copy", e));
        }
    }

    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PlanError::io(path, "replacing", e)
    })?;
    sync_dir(dir)
}

/// Without hard links (vfat, some FUSE filesystems) `link(2)` fails with one of these.
const EPERM: i32 = 1;
const EOPNOTSUPP: i32 = 95;

fn sync_dir(dir: &Path) -> Result<(), PlanError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PlanError::io(dir, "syncing the directory", e))
}

fn write_synced(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true) // never through a symlink or over someone else's file
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
