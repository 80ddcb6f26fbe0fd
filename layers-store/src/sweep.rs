//! Deleting layers, the one way it is done: only what the journal in the boot state records
//! (a claim a change never committed, a layer a command let go), only once nothing needs it,
//! through the store's handles. [`decide`] is pure; [`Store::sweep`] carries it out. A layer
//! directory nobody recorded is never touched here.

use std::collections::BTreeSet;

use layers_spec::{BootState, Plan};

use crate::layout::{Folder, scratch_name};
use crate::store::{Store, StoreError};

/// What the journal's records come to, given what the plan names and what is needed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Layers to delete, each with its record's command.
    pub delete: Vec<(String, String)>,
    /// Records to drop without deleting: the plan names the layer (the change that wrote the
    /// record committed a claim, or never committed a release).
    pub forget: Vec<String>,
    /// Released layers kept for now, and what needs them.
    pub waiting: Vec<(String, &'static str)>,
}

/// What the journal comes to. `prev` is what the plan's previous copy names (the boot's
/// fallback); `in_use` the layers mounted now.
pub fn decide(
    plan: &Plan,
    prev: &[String],
    state: &BootState,
    in_use: &BTreeSet<String>,
) -> Decision {
    let mut decision = Decision::default();
    let needed_by = |name: &str| -> Option<&'static str> {
        if in_use.contains(name) {
            Some("mounted now")
        } else if state.last_good.iter().any(|n| n == name) {
            Some("the last good stack")
        } else if state
            .once
            .as_ref()
            .is_some_and(|o| o.layers.iter().any(|n| n == name))
        {
            Some("the one-shot selection")
        } else if state.checkpoint.as_ref().is_some_and(|c| c.layer == name) {
            Some("the pending checkpoint")
        } else if prev.iter().any(|n| n == name) {
            Some("the previous plan")
        } else {
            None
        }
    };
    for record in &state.claimed {
        if plan.layer(&record.layer).is_some() {
            decision.forget.push(record.layer.clone());
        } else if needed_by(&record.layer).is_none() {
            decision
                .delete
                .push((record.layer.clone(), record.by.clone()));
        }
    }
    for record in &state.released {
        if plan.layer(&record.layer).is_some() {
            decision.forget.push(record.layer.clone());
        } else if let Some(why) = needed_by(&record.layer) {
            decision.waiting.push((record.layer.clone(), why));
        } else if !decision.delete.iter().any(|(n, _)| n == &record.layer) {
            decision
                .delete
                .push((record.layer.clone(), record.by.clone()));
        }
    }
    decision
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Layers deleted, each with the command that let it go.
    pub deleted: Vec<(String, String)>,
    /// Released layers kept for now, and why.
    pub waiting: Vec<(String, &'static str)>,
    /// Layers that could not be moved out now (a mount on one, say), and why: their records
    /// stay, and the next change or boot tries again.
    pub failed: Vec<(String, String)>,
    /// Whether the boot state changed (and was saved).
    pub state_changed: bool,
}

impl Store {
    /// Carries out the journal against `plan` (read from its own file, never its `.prev`):
    /// layers it lets go are moved into `staging/` (one rename each, so `layers/` never holds
    /// a half-deleted layer), the state is saved without their records, then `staging/` is
    /// emptied. When only the previous plan still names a layer, the plan is saved again
    /// first so that the fallback no longer does.
    pub fn sweep(
        &self,
        plan: &Plan,
        state: &mut BootState,
        in_use: &BTreeSet<String>,
    ) -> Result<Swept, StoreError> {
        if state.claimed.is_empty() && state.released.is_empty() {
            return Ok(Swept::default());
        }
        let mut decision = decide(plan, &self.prev_plan_layers(), state, in_use);
        if decision
            .waiting
            .iter()
            .any(|(_, why)| *why == "the previous plan")
        {
            self.save_plan(plan)?;
            decision = decide(plan, &self.prev_plan_layers(), state, in_use);
        }
        let staging = self.folder(Folder::Staging)?;
        let mut failed = Vec::new();
        let move_out = |name: &str| -> Result<(), StoreError> {
            for folder in [Folder::Layers, Folder::Manifests] {
                let Some(dir) = self.existing_folder(folder)? else {
                    continue;
                };
                let ours = match (folder, dir.kind(name)?) {
                    (_, None) => false,
                    // A directory there is not a manifest Strata wrote: kept.
                    (Folder::Manifests, Some(kind)) => kind != rustix::fs::FileType::Directory,
                    (_, Some(_)) => true,
                };
                if ours {
                    dir.rename_to(name, &staging, scratch_name(&format!("released-{name}")))?;
                    layers_spec::fault::point("sweep-moved");
                }
            }
            Ok(())
        };
        decision.delete.retain(|(name, _)| match move_out(name) {
            Ok(()) => true,
            Err(e) => {
                failed.push((name.clone(), e.to_string()));
                false
            }
        });
        staging.sync()?;
        let gone = |name: &String| {
            decision.delete.iter().any(|(n, _)| n == name) || decision.forget.contains(name)
        };
        let before = (state.claimed.len(), state.released.len());
        state.claimed.retain(|r| !gone(&r.layer));
        state.released.retain(|r| !gone(&r.layer));
        let state_changed = before != (state.claimed.len(), state.released.len());
        if state_changed {
            self.save_state(state)?;
        }
        self.clear_leftovers()?;
        Ok(Swept {
            deleted: decision.delete,
            waiting: decision.waiting,
            failed,
            state_changed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layers_spec::{Layer, StoreRecord};

    fn plan(names: &[&str]) -> Plan {
        Plan::new(names.iter().map(|n| Layer::new(*n)).collect())
    }

    #[test]
    fn only_recorded_layers_nothing_needs_go() {
        let state = BootState {
            claimed: vec![
                StoreRecord::new("added", "add-layer"),
                StoreRecord::new("cut", "sync"),
            ],
            released: vec![
                StoreRecord::new("old", "remove"),
                StoreRecord::new("booted", "compact"),
                StoreRecord::new("good", "policy"),
                StoreRecord::new("back", "remove"),
                StoreRecord::new("fallback", "remove"),
            ],
            last_good: vec!["good".into()],
            ..BootState::default()
        };
        let in_use = BTreeSet::from(["booted".to_owned()]);
        let decision = decide(
            &plan(&["added", "back", "base"]),
            &["fallback".into()],
            &state,
            &in_use,
        );
        assert_eq!(
            decision.delete,
            [
                ("cut".to_owned(), "sync".to_owned()),
                ("old".to_owned(), "remove".to_owned())
            ]
        );
        assert_eq!(decision.forget, ["added", "back"]);
        assert_eq!(
            decision.waiting,
            [
                ("booted".to_owned(), "mounted now"),
                ("good".to_owned(), "the last good stack"),
                ("fallback".to_owned(), "the previous plan")
            ]
        );
    }
}
