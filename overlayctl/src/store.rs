//! The store as `overlayctl` uses it: `layers-store`'s handle with the context a command's
//! errors need, the running boot's record, and what is mounted from it.
//!
//! Every change is a transaction (docs/design.md): new content is written under `staging/`, flushed,
//! renamed into place, and only then does the plan name it. Layers leave the store only through
//! the journal in the boot state ([`Store::sweep`]); a directory nobody recorded is kept.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use layers_spec::{BootState, Booted, Datetime, Plan};
pub use layers_store::Folder;
use layers_store::Loaded;
use layers_store::layout::{self, BOOTED_FILE, RUN_DIR, STATE_FILE};

/// The directories a store has, by name (for messages and paths).
pub const LAYERS: &str = Folder::Layers.name();
pub const STAGING: &str = Folder::Staging.name();
pub const UPPERS: &str = Folder::Uppers.name();
pub const MANIFESTS: &str = Folder::Manifests.name();
pub const KEYS: &str = Folder::Keys.name();

/// Where the hook leaves its record of the running boot; `STRATA_RUN_DIR` overrides it (tests).
pub fn booted_record_path() -> PathBuf {
    std::env::var_os("STRATA_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
        .join(BOOTED_FILE)
}

#[derive(Debug)]
pub struct Store {
    /// The store's path, as given (for messages and for the engine's paths).
    pub root: PathBuf,
    inner: layers_store::Store,
}

pub use layers_store::StoreLock;

impl Store {
    /// A store that exists.
    pub fn open(root: &Path) -> Result<Self> {
        Ok(Self {
            root: root.to_owned(),
            inner: layers_store::Store::open(root)?,
        })
    }

    /// Creates the directories of a new store at `root`, which must not exist or be empty.
    pub fn create(root: &Path) -> Result<Self> {
        Ok(Self {
            root: root.to_owned(),
            inner: layers_store::Store::create(root)?,
        })
    }

    /// The handle underneath.
    pub fn handle(&self) -> &layers_store::Store {
        &self.inner
    }

    /// A folder of the store (made when missing), refused when it is not a real directory.
    pub fn folder(&self, folder: Folder) -> Result<layers_store::Dir> {
        Ok(self.inner.folder(folder)?)
    }

    /// Takes the store's lock, or says who holds it; then clears what an interrupted command
    /// left (only what Strata named: anything else in `staging/` is kept and said).
    pub fn lock(&self) -> Result<StoreLock> {
        let lock = self.inner.lock()?;
        let left = self.inner.clear_leftovers()?;
        for path in left.removed {
            log::info!("removed {}, left by an interrupted command", path.display());
        }
        for (path, why) in left.kept {
            log::warn!("{} is kept: {why}", path.display());
        }
        Ok(lock)
    }

    pub fn layer_dir(&self, name: &str) -> PathBuf {
        self.inner.layer_path(name)
    }

    /// Whether the layer's directory is there, a real directory in the store.
    pub fn layer_present(&self, name: &str) -> bool {
        self.inner.layer_present(name)
    }

    pub fn manifest_path(&self, name: &str) -> PathBuf {
        self.inner.path_of(Folder::Manifests, name)
    }

    /// The manifest of a layer of `plan`, only when it matches the digest the plan records:
    /// a manifest edited, damaged or left from another layer of that name is never trusted.
    pub fn checked_manifest(&self, plan: &Plan, name: &str) -> Option<String> {
        let digest = plan.layer(name)?.digest.as_deref()?;
        let text = self.inner.manifest_text(name)?;
        let manifest = crate::engine::Manifest { text };
        if manifest.digest() == digest {
            Some(manifest.text)
        } else {
            log::warn!(
                "the manifest of {name} does not match the plan's digest; it is not used (`overlayctl verify` checks the layer)"
            );
            None
        }
    }

    /// A fresh path under `staging/` for work in progress (`staging/` checked to be a real
    /// directory of the store).
    pub fn staging_path(&self, what: &str) -> Result<PathBuf> {
        let staging = self.folder(Folder::Staging)?;
        Ok(staging.child_path(layout::scratch_name(what)))
    }

    pub fn plan(&self) -> Result<Loaded<Plan>> {
        let loaded = self
            .inner
            .load_plan()
            .with_context(|| format!("loading the plan of the store at {}", self.root.display()))?;
        if let Some(why) = &loaded.fell_back {
            log::warn!("using {} because {why}", loaded.path.display());
        }
        Ok(loaded)
    }

    pub fn save_plan(&self, plan: &Plan) -> Result<()> {
        self.inner
            .save_plan(plan)
            .with_context(|| format!("writing the plan of {}", self.root.display()))
    }

    /// The boot state; one that cannot be read (nor its `.prev`) stops a change, saying how
    /// to get out.
    pub fn state(&self) -> Result<BootState> {
        let loaded = self.inner.load_state();
        // A change written over a damaged state from its `.prev` would silently drop what the
        // damaged one said (trial tries, the journal): refused, as for the plan.
        if let Ok(Loaded {
            fell_back: Some(why),
            ..
        }) = &loaded
        {
            let path = self.inner.path_of(Folder::State, STATE_FILE);
            bail!(
                "the boot state cannot be read ({why}); nothing was changed. Repair {0}, or copy {0}.prev over it",
                path.display()
            );
        }
        loaded.map(|l| l.value).map_err(|e| {
            let path = self.inner.path_of(Folder::State, STATE_FILE);
            anyhow!(
                "the boot state cannot be read: {e}; nothing was changed. To start a fresh state, move it aside (mv {0} {0}.damaged; mv {0}.prev {0}.prev.damaged): trial counts, the last good stack, the pending checkpoint and the record of uppers and released layers are then forgotten (the next boot starts them again)",
                path.display()
            )
        })
    }

    /// The boot state for reports: a damaged one reads as the default, with a warning.
    pub fn state_for_report(&self) -> (BootState, Option<String>) {
        match self.inner.load_state() {
            Ok(Loaded {
                value,
                fell_back: None,
                ..
            }) => (value, None),
            Ok(Loaded {
                value,
                fell_back: Some(_),
                ..
            }) => (value, self.state().err().map(|e| format!("{e:#}"))),
            Err(_) => (
                BootState::default(),
                self.state().err().map(|e| format!("{e:#}")),
            ),
        }
    }

    pub fn save_state(&self, state: &BootState) -> Result<()> {
        self.inner
            .save_state(state)
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
        let booted = Booted::parse(&text, &path.display().to_string()).map_err(|e| {
            anyhow!(
                "{e}: the record of the running boot is damaged, so which layers are in use is unknown and nothing was changed. Reboot (the boot writes it again), or when no Strata stack is running from this store, remove {}",
                path.display()
            )
        })?;
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
        let booted = self.booted()?.map(|b| b.stack).unwrap_or_default();
        Ok(self.inner.mounted_layers(&booted))
    }

    /// Whether a layer is in use (see [`Self::layers_in_use`]).
    pub fn in_use(&self, name: &str) -> Result<bool> {
        Ok(self.layers_in_use()?.contains(name))
    }

    /// Deletes the layers the journal lets go that nothing needs any more (see
    /// `layers_store::sweep`). Call only with a plan read from its own file.
    /// What cannot be deleted now stays recorded, and is said: it never fails the change that
    /// asked (the change committed before).
    pub fn sweep(&self, plan: &Plan, state: &mut BootState) -> Result<()> {
        let in_use = self.layers_in_use()?;
        let swept = match self.inner.sweep(plan, state, &in_use) {
            Ok(swept) => swept,
            Err(e) => {
                log::warn!(
                    "the layers let go are not deleted yet: {e}; the next change tries again"
                );
                return Ok(());
            }
        };
        for (name, by) in &swept.deleted {
            log::info!(
                "deleted layer {name} (let go by {})",
                layers_spec::printable(by)
            );
        }
        for (name, why) in &swept.waiting {
            log::info!("layer {name} is let go and kept until {why} no longer needs it");
        }
        for (name, why) in &swept.failed {
            log::warn!(
                "layer {name} is let go but cannot be deleted now ({why}); the next change tries again"
            );
        }
        Ok(())
    }

    /// Refuses to let `name` go while something is mounted on its directory or inside it:
    /// deleting it would have to cross that mount.
    pub fn check_unmounted(&self, name: &str) -> Result<()> {
        let mounts = self.inner.mounts_under(Folder::Layers, name);
        if let Some(first) = mounts.first() {
            bail!(
                "{} is mounted on, inside layer {name}; unmount it first (nothing was changed)",
                first.display()
            );
        }
        Ok(())
    }

    /// Deletes `path`, an entry of `staging/` (work of this command), through the folder's
    /// handle.
    pub fn remove_staged(&self, path: &Path) -> Result<()> {
        let staging = self.folder(Folder::Staging)?;
        let name = path
            .file_name()
            .filter(|_| path.parent() == Some(staging.path()))
            .ok_or_else(|| anyhow!("{} is not in {}", path.display(), staging.path().display()))?;
        staging.remove(name)?;
        Ok(())
    }

    /// Layer directories the plan does not name and nobody recorded: kept; `remove` deletes one.
    pub fn unaccounted_layers(
        &self,
        plan: &Plan,
        state: &BootState,
    ) -> Vec<(String, Option<&'static str>)> {
        self.inner.unaccounted_layers(plan, state)
    }

    /// Makes a path renamed into the store durable: fsync its parent directory.
    pub fn sync_dir(path: &Path) -> Result<()> {
        File::open(path)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", path.display()))
    }
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
