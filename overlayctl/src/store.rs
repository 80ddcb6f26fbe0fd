//! The store on disk: its directories, the lock that makes changes one at a time, the plan and
//! boot state, manifests, and what the running boot is using.
//!
//! Every change is a transaction (DESIGN): new content is written under `staging/`, flushed,
//! renamed into place, and only then does the plan name it. Anything found in `staging/` by the
//! next command that holds the lock is a leftover of an interrupted one and is deleted, as is a
//! layer directory the plan does not name.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use layers_spec::store::{self as spec_store, Loaded};
use layers_spec::{BootState, Booted, Datetime, Plan};
use rustix::fs::{FlockOperation, flock};

/// The directories a store has.
pub const LAYERS: &str = "layers";
pub const STAGING: &str = "staging";
pub const UPPERS: &str = "uppers";
pub const MANIFESTS: &str = layers_spec::store::MANIFESTS_DIR;
pub const KEYS: &str = "keys";
const LOCK_FILE: &str = ".lock";

/// Where the hook leaves its record of the running boot; `STRATA_RUN_DIR` overrides it (tests).
pub fn booted_record_path() -> PathBuf {
    std::env::var_os("STRATA_RUN_DIR")
        .map(|d| PathBuf::from(d).join("booted.toml"))
        .unwrap_or_else(|| PathBuf::from(layers_spec::booted::BOOTED_RECORD))
}

#[derive(Debug)]
pub struct Store {
    pub root: PathBuf,
}

/// Held while a command changes the store; released when dropped.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// A store that exists: a directory with a plan (or its `.prev`).
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            bail!(
                "there is no store at {}; create one with `overlayctl init --base DIR`, or name another with --store",
                root.display()
            );
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Creates the directories of a new store at `root`, which must not exist or be empty.
    pub fn create(root: &Path) -> Result<Self> {
        if root.exists() {
            let empty = fs::read_dir(root)
                .with_context(|| format!("reading {}", root.display()))?
                .next()
                .is_none();
            if !empty {
                bail!(
                    "{} exists and is not empty; a new store needs an empty or new directory",
                    root.display()
                );
            }
        }
        for dir in [
            "",
            LAYERS,
            STAGING,
            UPPERS,
            MANIFESTS,
            KEYS,
            spec_store::STATE_DIR,
        ] {
            let path = root.join(dir);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Takes the store's lock, or says who holds it; then clears what an interrupted command
    /// left in `staging/`.
    pub fn lock(&self) -> Result<StoreLock> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the lock {}", path.display()))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => bail!(
                "another overlayctl is changing the store {} (it holds {}); try again when it is done",
                self.root.display(),
                path.display()
            ),
            Err(e) => {
                return Err(io::Error::from(e))
                    .with_context(|| format!("locking {}", path.display()));
            }
        }
        self.clear_staging()?;
        Ok(StoreLock { _file: file })
    }

    fn clear_staging(&self) -> Result<()> {
        let staging = self.root.join(STAGING);
        let entries = match fs::read_dir(&staging) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&staging)
                    .with_context(|| format!("creating {}", staging.display()))?;
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", staging.display())),
        };
        for entry in entries {
            let path = entry
                .with_context(|| format!("reading {}", staging.display()))?
                .path();
            log::info!(
                "removing {}, left by an interrupted command",
                path.display()
            );
            remove_path(&path)?;
        }
        Ok(())
    }

    pub fn layer_dir(&self, name: &str) -> PathBuf {
        self.root.join(LAYERS).join(name)
    }

    pub fn manifest_path(&self, name: &str) -> PathBuf {
        self.root.join(MANIFESTS).join(name)
    }

    /// A fresh path under `staging/` for work in progress.
    pub fn staging_path(&self, what: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.root
            .join(STAGING)
            .join(format!("{what}.{}.{nanos}", std::process::id()))
    }

    pub fn plan(&self) -> Result<Loaded<Plan>> {
        let loaded = spec_store::load_plan(&self.root)
            .with_context(|| format!("loading the plan of the store at {}", self.root.display()))?;
        if let Some(why) = &loaded.fell_back {
            log::warn!("using {} because {why}", loaded.path.display());
        }
        Ok(loaded)
    }

    pub fn save_plan(&self, plan: &Plan) -> Result<()> {
        spec_store::save_plan(&self.root, plan)
            .with_context(|| format!("writing the plan of {}", self.root.display()))
    }

    pub fn state(&self) -> Result<BootState> {
        Ok(spec_store::load_state(&self.root)
            .with_context(|| format!("loading the boot state of {}", self.root.display()))?
            .value)
    }

    pub fn save_state(&self, state: &BootState) -> Result<()> {
        spec_store::save_state(&self.root, state)
            .with_context(|| format!("writing the boot state of {}", self.root.display()))
    }

    /// The running boot's record, when the running system was booted from this store.
    pub fn booted(&self) -> Result<Option<Booted>> {
        let path = booted_record_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let booted = Booted::parse(&text, &path.display().to_string())?;
        // The same directory, by whichever path (the hook's bind mount, or the real root
        // mounted somewhere).
        let same = match (fs::metadata(&booted.store), fs::metadata(&self.root)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        Ok(same.then_some(booted))
    }

    /// Layers in use: in the stack the running system booted from this store, or a lower layer
    /// of an overlay mounted from it (`overlayctl mount`).
    pub fn layers_in_use(&self) -> Result<BTreeSet<String>> {
        let mut used: BTreeSet<String> = self
            .booted()?
            .map(|b| b.stack.into_iter().collect())
            .unwrap_or_default();
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        let root = fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        let ours = |source: &str| {
            source
                .strip_prefix(layers_spec::mount::SOURCE_PREFIX)
                .and_then(|s| s.strip_prefix(':'))
                .is_some_and(|path| fs::canonicalize(path).is_ok_and(|p| p == root))
        };
        for mount in layers_spec::mount::parse_mountinfo(&mountinfo) {
            if mount.fstype == "overlay" && ours(&mount.source) {
                used.extend(
                    mount
                        .lowers()
                        .iter()
                        .filter_map(|l| Path::new(l).file_name())
                        .map(|n| n.to_string_lossy().into_owned()),
                );
            }
        }
        Ok(used)
    }

    /// Whether a layer is in use (see [`Self::layers_in_use`]).
    pub fn in_use(&self, name: &str) -> Result<bool> {
        Ok(self.layers_in_use()?.contains(name))
    }

    /// Deletes layer directories and manifests the plan does not name: what an add killed after
    /// its rename and before its plan write left, or what compaction replaced. Layers in use, in
    /// the last good stack or a one-shot selection are kept whatever the plan says; a previous
    /// plan that names others is replaced by a copy of this one first. Call only with a plan read from its own file.
    pub fn clean_orphans(&self, plan: &Plan, state: &BootState) -> Result<()> {
        let in_use = self.layers_in_use()?;
        // The previous plan (the fallback when the plan cannot be read) must not name what goes:
        // it becomes a copy of this one, which was just read whole.
        if spec_store::prev_plan_layers(&self.root)
            .iter()
            .any(|name| plan.layer(name).is_none())
        {
            self.save_plan(plan)?;
        }
        let once: &[String] = state.once.as_ref().map_or(&[], |o| o.layers.as_slice());
        for dir in [LAYERS, MANIFESTS] {
            let path = self.root.join(dir);
            let Ok(entries) = fs::read_dir(&path) else {
                continue;
            };
            for entry in entries {
                let entry = entry.with_context(|| format!("reading {}", path.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if plan.layer(&name).is_none()
                    && !in_use.contains(&name)
                    && !state.last_good.contains(&name)
                    && !once.contains(&name)
                    && state.checkpoint.as_ref().is_none_or(|c| c.layer != name)
                {
                    log::info!(
                        "removing {}, which the plan no longer names",
                        entry.path().display()
                    );
                    remove_path(&entry.path())?;
                    layers_spec::fault::point("orphan-deleted");
                }
            }
        }
        Ok(())
    }

    /// Makes a path renamed into the store durable: fsync its parent directory.
    pub fn sync_dir(path: &Path) -> Result<()> {
        File::open(path)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", path.display()))
    }
}

/// Deletes a file or a whole tree, whatever its permissions.
pub fn remove_path(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.with_context(|| format!("removing {}", path.display()))
}

/// The current time as a TOML date-time in UTC, to the second.
pub fn now() -> Datetime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_datetime(secs)
}

/// `PREFIX-` and the time now (`run-2026-11-30-19-23-00`): a default name for a layer.
pub fn stamped_name(prefix: &str) -> String {
    format!("{prefix}-{}", now())
        .replace([':', 'T'], "-")
        .trim_end_matches('Z')
        .to_owned()
}

/// A plan date-time as seconds since the epoch (a date alone is its midnight UTC; an offset
/// is applied); None for a time without a date, or a date before 1970.
pub fn epoch_secs(at: &Datetime) -> Option<u64> {
    let date = at.date?;
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m, d) = (
        i64::from(date.year) - i64::from(date.month <= 2),
        i64::from(date.month),
        i64::from(date.day),
    );
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = days * 86_400;
    if let Some(time) = at.time {
        secs += i64::from(time.hour) * 3600
            + i64::from(time.minute) * 60
            + i64::from(time.second.unwrap_or(0));
    }
    if let Some(toml::value::Offset::Custom { minutes }) = at.offset {
        secs -= i64::from(minutes) * 60;
    }
    u64::try_from(secs).ok()
}

/// Seconds since the epoch as a UTC date-time (the civil-from-days algorithm).
pub fn utc_datetime(secs: u64) -> Datetime {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    text.parse().expect("a formatted date-time parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_secs_inverts_utc_datetime() {
        for secs in [0, 86_399, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(epoch_secs(&utc_datetime(secs)), Some(secs), "{secs}");
        }
        let with_offset: Datetime = "2026-11-30T12:00:00+01:00".parse().unwrap();
        assert_eq!(
            epoch_secs(&with_offset),
            epoch_secs(&"2026-11-30T11:00:00Z".parse().unwrap())
        );
    }

    #[test]
    fn utc_dates_are_right() {
        assert_eq!(utc_datetime(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            utc_datetime(951_782_400).to_string(),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            utc_datetime(1_179_655_200).to_string(),
            "2007-05-20T10:00:00Z"
        );
        assert_eq!(
            utc_datetime(1_795_316_399).to_string(),
            "2026-11-22T02:59:59Z"
        );
    }
}
