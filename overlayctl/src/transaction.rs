//! One change to the store. [`Transaction::begin`] takes the lock, reads the plan (never its
//! `.prev`: a change written over a fallback would silently drop what the plan said) and the
//! boot state, and finishes what the last boot and interrupted changes left (`recover`). A
//! change claims the names of the layers it brings in (recorded before their directories
//! exist) and releases those it lets go; [`Transaction::commit`] writes the boot state (the
//! journal first), then the plan, then deletes what was let go that nothing needs.

use anyhow::{Result, anyhow, bail, ensure};
use layers_spec::{BootState, Plan, StoreRecord, check_name};

use crate::store::{Store, StoreLock};

/// An open change: the store, locked, with its plan and boot state.
#[derive(Debug)]
pub struct Transaction<'s> {
    pub store: &'s Store,
    _lock: StoreLock,
    pub plan: Plan,
    pub state: BootState,
    /// As read (after recovery): what commit compares with, to write only what changed.
    plan_before: Plan,
    state_before: BootState,
}

impl<'s> Transaction<'s> {
    /// Opens a change of `store`.
    pub fn begin(store: &'s Store) -> Result<Self> {
        // No lock file is made in a directory that is not a store.
        let plan = layers_store::layout::PLAN_FILE;
        let top = store.handle().root();
        if top.kind(plan)?.is_none() && top.kind(format!("{plan}.prev"))?.is_none() {
            bail!(
                "there is no store at {} (it has no {plan}); create one with `overlayctl init --base DIR`, or name another with --store",
                store.root.display()
            );
        }
        let lock = store.lock()?;
        let loaded = store.plan()?;
        if let Some(why) = loaded.fell_back {
            bail!(
                "the plan cannot be read ({why}); nothing was changed. Repair {} or copy overlayplan.toml.prev over it",
                store.root.join(layers_store::layout::PLAN_FILE).display()
            );
        }
        let mut plan = loaded.value;
        let mut state = store.state()?;
        crate::recover::finish_pending(store, &mut plan, &mut state)?;
        Ok(Self {
            store,
            _lock: lock,
            plan_before: plan.clone(),
            state_before: state.clone(),
            plan,
            state,
        })
    }

    /// Claims `name` for a layer this change brings in: refused unless it is a valid name that
    /// no layer, pending checkpoint, mounted stack or directory in `layers/` has. Recorded in the journal at once, before the layer's
    /// directory is made: a change cut short after that loses it at the next change or boot.
    pub fn claim(&mut self, name: &str, by: &str) -> Result<()> {
        self.check_name_free(name)?;
        self.state.claimed.retain(|c| c.layer != name);
        self.state.claimed.push(StoreRecord::new(name, by));
        self.save_state()
    }

    /// The checks of [`Self::claim`], for a change that has more to do before it claims.
    pub fn check_name_free(&self, name: &str) -> Result<()> {
        check_name(name).map_err(|p| anyhow!("layer name {name:?} is not valid: {p}"))?;
        ensure!(
            self.plan.layer(name).is_none(),
            "the plan already has a layer named {name:?}; choose another --name"
        );
        ensure!(
            self.state
                .checkpoint
                .as_ref()
                .is_none_or(|c| c.layer != name),
            "{name:?} is the name of the pending checkpoint; choose another --name"
        );
        ensure!(
            !self.store.in_use(name)?,
            "a layer named {name:?} is in use (mounted) though the plan no longer names it; choose another --name"
        );
        let layers = self.store.folder(crate::store::Folder::Layers)?;
        ensure!(
            layers.kind(name)?.is_none(),
            "{} exists (a layer let go but still needed, or a directory the plan does not name); choose another --name",
            layers.child_path(name).display()
        );
        // The manifests' folder too must be a real one before anything is copied.
        self.store.folder(crate::store::Folder::Manifests)?;
        Ok(())
    }

    /// Refuses a layer more when the plan has as many as a stack can have.
    pub fn check_room_for_one(&self) -> Result<()> {
        ensure!(
            self.plan.layers.len() < layers_spec::plan::MAX_STACK as usize,
            "the plan has {} layers, the most a stack can have; compact some (`overlayctl compact`) or remove some first; nothing was added",
            self.plan.layers.len()
        );
        Ok(())
    }

    /// Saves the plan now (a change whose steps must reach the disk in its own order).
    pub fn save_plan(&mut self) -> Result<()> {
        self.store.save_plan(&self.plan)?;
        self.plan_before = self.plan.clone();
        Ok(())
    }

    /// Saves the boot state now.
    pub fn save_state(&mut self) -> Result<()> {
        self.store.save_state(&self.state)?;
        self.state_before = self.state.clone();
        Ok(())
    }

    /// Lets the layer `name` go: deleted once the committed plan no longer names it and
    /// nothing needs it.
    pub fn release(&mut self, name: &str, by: &str) {
        self.state.release(name, by);
    }

    /// Writes what changed, the boot state first (the journal's releases before the plan stops
    /// naming the layers), then the plan; drops the claims the plan now names, and deletes
    /// what was let go that nothing needs.
    pub fn commit(mut self) -> Result<Committed> {
        if self.state != self.state_before {
            self.store.save_state(&self.state)?;
        }
        if self.plan != self.plan_before {
            self.store.save_plan(&self.plan)?;
        }
        let plan = &self.plan;
        let claims = self.state.claimed.len();
        self.state
            .claimed
            .retain(|c| plan.layer(&c.layer).is_none());
        if self.state.claimed.len() != claims {
            self.store.save_state(&self.state)?;
        }
        self.store.sweep(&self.plan, &mut self.state)?;
        follow_kernel(self.store, &self.plan, &self.state);
        Ok(Committed {
            plan: self.plan,
            state: self.state,
        })
    }
}

/// Puts the next boot's kernel where the bootloader starts it (docs/kernels.md). The change is
/// made whatever happens here: a failure is a warning, and the hook's restart into the stack's
/// kernel covers the difference.
pub fn follow_kernel(store: &Store, plan: &Plan, state: &BootState) {
    match crate::bootkernel::sync(store, plan, state) {
        Ok(Some(synced)) if synced.copied => eprintln!(
            "note: the next boot starts kernel {} (copied to the real root's /boot/strata)",
            synced.version
        ),
        Ok(_) => {}
        Err(e) => eprintln!("overlayctl: warning: the boot kernel was not updated: {e:#}"),
    }
}

/// The plan and boot state a committed change left.
#[derive(Debug)]
pub struct Committed {
    pub plan: Plan,
    pub state: BootState,
}

/// The index of the layer `name` in the plan, or an error listing the plan's layers.
pub fn layer_index(plan: &Plan, name: &str) -> Result<usize> {
    plan.position(name).ok_or_else(|| {
        let names: Vec<&str> = plan.layers.iter().map(|l| l.name.as_str()).collect();
        anyhow!(
            "there is no layer {name:?} in the plan; its layers are: {}",
            names.join(", ")
        )
    })
}
