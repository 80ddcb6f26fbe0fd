//! Where everything of Strata is: the folders and files of a store, and the paths under
//! `/run/strata` that the boot hook leaves for the running system. Defined here once, for the
//! hook and `overlayctl` alike.

/// The store on the root filesystem unless `strata.store=` says otherwise.
pub const DEFAULT_STORE: &str = "/strata";
/// Where the hook binds the store in the running system.
pub const BOOTED_STORE: &str = "/run/strata/store";
/// What the hook leaves for the running system, in its `/run`.
pub const RUN_DIR: &str = "/run/strata";
/// [`RUN_DIR`] under any `/run` (the initramfs's, before the switch).
pub const RUN_SUBDIR: &str = "strata";
/// Under [`RUN_DIR`]: the record of the running boot.
pub const BOOTED_FILE: &str = "booted.toml";
/// Under [`RUN_DIR`]: the store's bind mount.
pub const STORE_BIND: &str = "store";
/// Under [`RUN_DIR`]: where the real root filesystem stays mounted under the layered root.
pub const REAL_ROOT: &str = "root";
/// Under [`RUN_DIR`]: the tmpfs a tmpfs upper lives on.
pub const TMPFS_UPPER: &str = "upper";

/// The plan, in the store's top directory.
pub const PLAN_FILE: &str = "overlayplan.toml";
/// The boot state, in [`Folder::State`].
pub const STATE_FILE: &str = "boot.toml";
/// Appended to a file name for its previous copy.
pub const PREV_SUFFIX: &str = ".prev";
/// The store's lock, in its top directory.
pub const LOCK_FILE: &str = ".lock";

/// The persistent upper a store starts with (`uppers/1`).
pub const FIRST_UPPER: &str = "1";

/// In an upper's directory (`uppers/<id>/`): the files, and overlayfs's work directory.
pub const UPPER_DATA: &str = "data";
pub const UPPER_WORK: &str = "work";

/// In a run's directory (`runs/<name>/`): locked while any process of the run lives (and the
/// mark of a directory a run made), and the mark of a run kept by `--keep-on-failure`.
pub const RUN_LOCK: &str = "lock";
pub const RUN_KEPT: &str = "kept";

/// The folders of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folder {
    /// One directory per layer, named as the layer.
    Layers,
    /// One manifest per layer (every path, its metadata and hash), named as the layer.
    Manifests,
    /// Work in progress and what is being deleted; only Strata puts things here.
    Staging,
    /// Persistent uppers, `uppers/<id>/{data,work}`.
    Uppers,
    /// `overlayctl run`: one directory per run while it lives.
    Runs,
    /// Public keys trusted for bundles.
    Keys,
    /// The boot state.
    State,
    /// Downloads (bundles, image blobs) kept across runs so a cut one resumes.
    Downloads,
}

impl Folder {
    pub const ALL: [Folder; 8] = [
        Folder::Layers,
        Folder::Manifests,
        Folder::Staging,
        Folder::Uppers,
        Folder::Runs,
        Folder::Keys,
        Folder::State,
        Folder::Downloads,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Folder::Layers => "layers",
            Folder::Manifests => "manifests",
            Folder::Staging => "staging",
            Folder::Uppers => "uppers",
            Folder::Runs => "runs",
            Folder::Keys => "keys",
            Folder::State => "state",
            Folder::Downloads => "downloads",
        }
    }
}

/// The prefix of every name Strata makes in `staging/`: `strata.PID.NANOS.WHAT`. Only such
/// names are removed from there.
const SCRATCH_PREFIX: &str = "strata";

/// A fresh name in `staging/` for `what` (a layer being made, a manifest, a layer let go).
pub fn scratch_name(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{SCRATCH_PREFIX}.{}.{}.{what}",
        std::process::id(),
        nanos + u128::from(n)
    )
}

/// Whether `name` in `staging/` is one [`scratch_name`] made (or one with its last part
/// replaced, as a staged manifest beside its layer).
pub fn is_scratch_name(name: &str) -> bool {
    let mut parts = name.splitn(4, '.');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    parts.next() == Some(SCRATCH_PREFIX)
        && digits(parts.next())
        && digits(parts.next())
        && parts.next().is_some_and(|rest| !rest.is_empty())
}

/// Whether `name` in the store's top directory or `state/` is a temporary copy of `file` that
/// an interrupted atomic write left (see `files`).
pub fn is_temp_of(name: &str, file: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_prefix(file))
        .is_some_and(|rest| rest.starts_with('.') && rest.ends_with(".tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_are_known_by_their_shape() {
        let name = scratch_name("up.1");
        assert!(is_scratch_name(&name), "{name}");
        let manifest = std::path::Path::new(&name).with_extension("manifest");
        assert!(is_scratch_name(manifest.to_str().unwrap()));
        for other in [
            "up1",
            "strata",
            "strata.1.2",
            "strata.x.2.up",
            "strata.1..up",
            "my-notes",
        ] {
            assert!(!is_scratch_name(other), "{other}");
        }
        assert!(is_temp_of(".overlayplan.toml.new.12.0.tmp", PLAN_FILE));
        assert!(!is_temp_of("overlayplan.toml.prev", PLAN_FILE));
        assert!(!is_temp_of(".overlayplan.toml", PLAN_FILE));
    }
}
