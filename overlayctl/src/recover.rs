//! Recovery, in one place: what the last boot and interrupted changes left, finished by the
//! next change before it does anything (a frozen checkpoint sealed, records of uppers that are
//! gone dropped, stopped runs cleaned, the journal carried out).

use anyhow::Result;
use layers_spec::{BootState, Plan};
use layers_store::layout::{RUN_KEPT, RUN_LOCK};
use rustix::fs::{FlockOperation, Mode, OFlags, flock};

use crate::install::{install_manifest, manifest_of, write_synced};
use crate::store::Store;

/// What the boot left for the next command that holds the lock, what a stopped `run` left,
/// then the layers the journal lets go (Store::sweep). A checkpoint the hook
/// froze gets its manifest and digest here, read from the layer (the hook hashes nothing); a
/// layer that cannot be read is left without one, with a warning, rather than blocking every
/// change.
pub(crate) fn finish_pending(store: &Store, plan: &mut Plan, state: &mut BootState) -> Result<()> {
    finish_adoption(store, plan)?;
    if layers_store::release::Release::read(store.handle())
        .map_err(anyhow::Error::msg)?
        .is_some()
    {
        anyhow::bail!(
            "the running stack becomes the plain root at the next boot (`overlayctl release`); restart first, or remove {} to call the release off",
            store
                .root
                .join(layers_store::release::RELEASE_FILE)
                .display()
        );
    }
    if let Some(checkpoint) = state.checkpoint.clone().filter(|c| c.frozen) {
        let name = &checkpoint.layer;
        if plan.layer(name).is_some_and(|l| l.digest.is_none()) {
            match seal(store, name) {
                Ok(digest) => {
                    if let Some(layer) = plan.layer_mut(name) {
                        layer.digest = Some(digest);
                    }
                    store.save_plan(plan)?;
                }
                Err(e) => log::warn!("checkpoint {name} gets no manifest: {e:#}"),
            }
        }
        state.checkpoint = None;
        store.save_state(state)?;
    }
    if crate::uppers::forget_missing(store, state) {
        store.save_state(state)?;
    }
    clean_stale_runs(store)?;
    store.sweep(plan, state)
}

/// An adoption the hook carried out gets its layer's manifest and digest, and its journal goes;
/// one still pending (no boot since `adopt`) stops every change until the machine restarts.
fn finish_adoption(store: &Store, plan: &mut Plan) -> Result<()> {
    use layers_store::adopt::{Adoption, Phase};
    let Some(adoption) = Adoption::read(store.handle()).map_err(anyhow::Error::msg)? else {
        return Ok(());
    };
    match adoption.phase {
        Phase::Pending => anyhow::bail!(
            "the installed system becomes layer {} at the next boot (`overlayctl adopt`); restart first",
            adoption.layer
        ),
        Phase::Moved => {
            let name = &adoption.layer;
            if plan.layer(name).is_some_and(|l| l.digest.is_none()) {
                let digest = seal(store, name)?;
                if let Some(layer) = plan.layer_mut(name) {
                    layer.digest = Some(digest);
                }
                store.save_plan(plan)?;
            }
            Adoption::remove(store.handle())?;
        }
    }
    Ok(())
}

/// Writes the manifest of a layer already in `layers/`; returns its digest.
fn seal(store: &Store, name: &str) -> Result<String> {
    let (digest, text) = manifest_of(&store.layer_dir(name))?;
    let staged = store.staging_path(&format!("{name}.manifest"))?;
    write_synced(&staged, text.as_bytes())?;
    install_manifest(store, &staged, name)?;
    Ok(digest)
}

/// Removes what runs whose processes are all gone (killed, or a power cut) left in `runs/`;
/// runs kept with `--keep-on-failure` stay, and so does anything without a run's lock file
/// (not made by a run).
pub(crate) fn clean_stale_runs(store: &Store) -> Result<()> {
    let Some(runs) = store.handle().existing_folder(crate::store::Folder::Runs)? else {
        return Ok(());
    };
    for name in runs.names()? {
        let dir = runs.child_path(&name);
        let Ok(run) = runs.sub(&name) else {
            log::warn!("{} is not a run's directory; it is kept", dir.display());
            continue;
        };
        if run.kind(RUN_KEPT)?.is_some() {
            continue;
        }
        if run.kind(RUN_LOCK)? != Some(rustix::fs::FileType::RegularFile) {
            log::warn!(
                "{} was not made by `overlayctl run`; it is kept",
                dir.display()
            );
            continue;
        }
        let alive = rustix::fs::open(
            dir.join(RUN_LOCK),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .is_ok_and(|fd| flock(&fd, FlockOperation::NonBlockingLockShared).is_err());
        if !alive {
            log::info!("removing {}, left by a run that was stopped", dir.display());
            // Never in the way of the change that called this.
            if let Err(e) = runs.remove(&name) {
                log::warn!("{e:#}");
            }
        }
    }
    Ok(())
}
