//! Archived uppers: what `[upper] on_rollback = "fresh"` set aside at a rollback (recorded in
//! the boot state with the stack each was used over). They are measured for `status` and the
//! policy, and removed by `remove --upper ID` or the policy's free-space step.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use layers_spec::BootState;

use crate::store::{Folder, Store, UPPERS};
use layers_store::layout::UPPER_DATA;

/// Bytes of file content in `uppers/<id>/data`.
pub fn size(store: &Store, id: &str) -> Option<u64> {
    let data = format!("{id}/data");
    crate::space::layer_space(&store.root.join(UPPERS), &[&data])
        .get(&data)
        .map(|s| s.size)
}

/// Removes the archived upper `id`: renamed into `staging/` (one step), dropped from the
/// state, then deleted; a crash in between leaves a staged leftover the next command removes.
/// Never the current upper.
pub fn remove(store: &Store, state: &mut BootState, id: &str) -> Result<()> {
    if state.current_upper.as_deref() == Some(id) {
        bail!(
            "upper {id} is the current upper, which the next boot mounts; only archived uppers can be removed"
        );
    }
    if !state.archived_uppers.iter().any(|a| a.id == id) {
        let archived: Vec<&str> = state
            .archived_uppers
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        bail!(
            "there is no archived upper {id}; archived uppers: {}",
            if archived.is_empty() {
                "none".to_owned()
            } else {
                archived.join(", ")
            }
        );
    }
    let uppers = store.folder(Folder::Uppers)?;
    let dir = uppers.child_path(id);
    if mounted(&dir.join(UPPER_DATA))? {
        bail!("upper {id} is mounted (by `overlayctl mount --upper {id}`?); unmount it first");
    }
    // Let go in one rename into `staging/`, whose Strata-named entries the next change removes.
    let staging = store.folder(Folder::Staging)?;
    let staged = layers_store::layout::scratch_name(&format!("upper-{id}"));
    if uppers.kind(id)?.is_some() {
        uppers.rename_to(id, &staging, &staged)?;
        staging.sync()?;
    }
    state.archived_uppers.retain(|a| a.id != id);
    store.save_state(state)?;
    staging.remove(&staged)?;
    Ok(())
}

/// Whether an overlay mounted now has `data` as its upper directory.
fn mounted(data: &Path) -> Result<bool> {
    let Ok(data) = fs::canonicalize(data) else {
        return Ok(false);
    };
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(layers_store::mount::parse_mountinfo(&mountinfo)
        .iter()
        .filter(|m| m.fstype == "overlay")
        .flat_map(|m| m.options.split(',').map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|o| o.strip_prefix("upperdir=").map(PathBuf::from))
        .any(|upper| fs::canonicalize(upper).is_ok_and(|u| u == data)))
}

/// Drops the records of archived uppers whose directory is gone (removed by hand, or by a
/// removal cut short after its rename). True when it dropped any.
pub fn forget_missing(store: &Store, state: &mut BootState) -> bool {
    let before = state.archived_uppers.len();
    state.archived_uppers.retain(|a| {
        store
            .root
            .join(UPPERS)
            .join(&a.id)
            .join(UPPER_DATA)
            .is_dir()
    });
    state.archived_uppers.len() != before
}
