//! `overlayctl policy`: the plan's `[policy]` applied, as a list of actions decided from the
//! plan alone (a pure function, table-tested) and then carried out one transaction at a time
//! (`apply`), through the same operations as the commands.
//!
//! In order: disabled layers older than `drop_disabled_after` are removed; while free space is
//! below `min_free`, the other disabled layers are removed, oldest first, then the uppers
//! rollbacks archived (`on_rollback = "fresh"`), oldest first; while the plan has
//! more than `max_layers` layers, the lowest run of accepted layers is compacted, as few of its
//! bottom layers as bring the count down (newer layers stay separate, for finer rollback).
//! Known-good layers (with `keep_known_good`) are never removed or merged, trial layers are
//! never merged, and layers a mounted stack uses are never removed (compacting them is safe:
//! they stay until unused).

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use layers_spec::{LayerState, Plan, size::human};
use serde::Serialize;

use crate::store::Store;
use crate::transaction::Transaction;

/// One step the policy takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Record today as when these layers were disabled (the boot disabled them, without a
    /// date): their age counts from now.
    Date {
        layers: Vec<String>,
    },
    Remove {
        layer: String,
        why: String,
    },
    /// Remove an upper a rollback archived.
    RemoveUpper {
        id: String,
        why: String,
    },
    /// Merge the run from `from` (bottom) to `to` (top).
    Compact {
        from: String,
        to: String,
        layers: usize,
    },
}

/// What the policy decided: the actions in order, and what it could not do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub notes: Vec<String>,
}

/// What the decision needs besides the plan.
#[allow(missing_debug_implementations)]
pub struct Facts<'a> {
    /// Seconds since the epoch.
    pub now: u64,
    /// Bytes free on the store's filesystem.
    pub free: u64,
    /// Layers a mounted stack uses.
    pub in_use: &'a BTreeSet<String>,
    /// What removing a layer would free.
    pub frees: &'a dyn Fn(&str) -> u64,
    /// Archived uppers, oldest first.
    pub archived_uppers: &'a [Archived],
}

/// An archived upper as the policy sees it.
#[derive(Debug, Clone)]
pub struct Archived {
    pub id: String,
    /// Bytes of content it holds.
    pub bytes: u64,
    /// The stack it was used over: layers it keeps (its changes only make sense over them).
    pub layers: Vec<String>,
}

/// Decides the actions for `plan` (layers top first).
pub fn decide(plan: &Plan, facts: &Facts<'_>) -> Decision {
    let policy = &plan.policy;
    let mut decision = Decision::default();
    let mut layers: Vec<&layers_spec::Layer> = plan.layers.iter().collect();
    let protected = |l: &layers_spec::Layer| l.known_good && policy.keep_known_good;
    // Archived uppers not (yet) removed; each keeps the layers it was used over.
    let mut archives: Vec<&Archived> = facts.archived_uppers.iter().collect();
    let removable = |l: &layers_spec::Layer, archives: &[&Archived]| {
        l.state == LayerState::Disabled
            && !protected(l)
            && !facts.in_use.contains(&l.name)
            && !archives.iter().any(|a| a.layers.contains(&l.name))
    };
    let remove = |decision: &mut Decision,
                  layers: &mut Vec<&layers_spec::Layer>,
                  name: &str,
                  why: String| {
        layers.retain(|l| l.name != name);
        decision.actions.push(Action::Remove {
            layer: name.to_owned(),
            why,
        });
    };

    // Disabled layers past their age, counted from when they were disabled.
    if let Some(limit) = policy.drop_disabled_after {
        let undated: Vec<String> = layers
            .iter()
            .filter(|l| l.state == LayerState::Disabled && l.disabled_at.is_none())
            .map(|l| l.name.clone())
            .collect();
        if !undated.is_empty() {
            decision.actions.push(Action::Date { layers: undated });
        }
        let old: Vec<(String, u64)> = layers
            .iter()
            .filter(|l| removable(l, &archives))
            .filter_map(|l| {
                let disabled = l.disabled_at.as_ref().and_then(crate::store::epoch_secs)?;
                let age = facts.now.saturating_sub(disabled);
                (age > limit.0).then(|| (l.name.clone(), age))
            })
            .collect();
        for (name, age) in old {
            let why = format!(
                "disabled {} ago (policy.drop_disabled_after = {limit})",
                layers_spec::Age(age - age % 60)
            );
            remove(&mut decision, &mut layers, &name, why);
        }
    }

    // The free-space floor: other disabled layers, oldest first (no date counts as oldest).
    let mut free = facts.free;
    for action in &decision.actions {
        if let Action::Remove { layer, .. } = action {
            free = free.saturating_add((facts.frees)(layer));
        }
    }
    while free < policy.min_free.0 {
        let mut candidates: Vec<&layers_spec::Layer> = layers
            .iter()
            .copied()
            .filter(|l| removable(l, &archives))
            .collect();
        candidates.sort_by_key(|l| l.created.as_ref().and_then(crate::store::epoch_secs));
        for layer in candidates {
            if free >= policy.min_free.0 {
                break;
            }
            let frees = (facts.frees)(&layer.name);
            free = free.saturating_add(frees);
            let why = format!(
                "disabled, and free space is below policy.min_free = {} (frees {})",
                policy.min_free,
                human(frees)
            );
            remove(&mut decision, &mut layers, &layer.name, why);
        }
        // Changes people made before a rollback go only after every layer that may; each
        // upper removed lets go of the layers it kept, which the next round may remove.
        if free >= policy.min_free.0 || archives.is_empty() {
            break;
        }
        let archived = archives.remove(0);
        free = free.saturating_add(archived.bytes);
        decision.actions.push(Action::RemoveUpper {
            id: archived.id.clone(),
            why: format!(
                "archived by a rollback, and free space is below policy.min_free = {} (frees {})",
                policy.min_free,
                human(archived.bytes)
            ),
        });
    }
    if free < policy.min_free.0 {
        decision.notes.push(format!(
            "free space stays below policy.min_free = {}: {} free after the removals, and no other disabled layer or archived upper may go",
            policy.min_free,
            human(free)
        ));
    }

    // At most max_layers: merge the lowest runs of accepted layers, bottom layers first.
    let max = policy.max_layers as usize;
    // A layer another stands in for is never merged: what it holds would show again.
    let superseded: std::collections::HashSet<&str> = plan
        .layers
        .iter()
        .flat_map(|l| l.supersedes.iter().map(String::as_str))
        .collect();
    let mergeable = |l: &layers_spec::Layer| {
        l.state == LayerState::Active && !l.known_good && !superseded.contains(l.name.as_str())
    };
    while layers.len() > max {
        // Runs of mergeable layers, as index ranges top..=bottom; the lowest first.
        let mut runs = Vec::new();
        let mut i = 0;
        while i < layers.len() {
            if !mergeable(layers[i]) {
                i += 1;
                continue;
            }
            let top = i;
            while i + 1 < layers.len() && mergeable(layers[i + 1]) {
                i += 1;
            }
            if i > top {
                runs.push((top, i));
            }
            i += 1;
        }
        let Some(&(top, bottom)) = runs.last() else {
            decision.notes.push(format!(
                "{} layers stay, more than policy.max_layers = {max}: known-good, trial, disabled and superseded layers are never merged",
                layers.len()
            ));
            break;
        };
        // Merging n layers removes n - 1.
        let n = (layers.len() - max + 1).min(bottom - top + 1);
        let from = layers[bottom].name.clone();
        let to = layers[bottom + 1 - n].name.clone();
        decision.actions.push(Action::Compact {
            from: from.clone(),
            to: to.clone(),
            layers: n,
        });
        // The merged layer takes the place of the merged part's top. A whole run merged is a
        // run of one, which the next round passes over.
        layers.drain(bottom + 2 - n..=bottom);
    }
    decision
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Date { layers } => write!(
                f,
                "record today as when {} {} disabled (by the boot, which has no trusted clock)",
                layers.join(", "),
                if layers.len() == 1 { "was" } else { "were" }
            ),
            Action::Remove { layer, why } => write!(f, "remove {layer}: {why}"),
            Action::RemoveUpper { id, why } => write!(f, "remove upper {id}: {why}"),
            Action::Compact { from, to, layers } => {
                write!(f, "compact {layers} layers, {to} down to {from}, into one")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layers_spec::{Age, ByteSize, Layer};

    const DAY: u64 = 86_400;
    const NOW: u64 = 1_800_000_000;

    /// A layer from a short description: name, state (a active, t trial, d disabled), known-good,
    /// age in days.
    fn layer(name: &str, state: char, known_good: bool, days: u64) -> Layer {
        let mut l = Layer::new(name);
        l.state = match state {
            't' => LayerState::Trial,
            'd' => LayerState::Disabled,
            _ => LayerState::Active,
        };
        l.known_good = known_good;
        l.created = Some(crate::store::utc_datetime(NOW - days * DAY));
        // Disabled that long ago, too.
        l.disabled_at = (l.state == LayerState::Disabled)
            .then_some(l.created)
            .flatten();
        l
    }

    fn decide_for(layers: Vec<Layer>, edit: impl FnOnce(&mut Plan), free: u64) -> Decision {
        let mut plan = Plan::new(layers);
        plan.policy.min_free = ByteSize(0);
        edit(&mut plan);
        decide_at(&plan, free, &[])
    }

    /// The decision at NOW with `free` bytes free, every layer freeing 300 MiB, and the layer
    /// named "in-use" mounted.
    fn decide_at(plan: &Plan, free: u64, archived_uppers: &[Archived]) -> Decision {
        let in_use: BTreeSet<String> = ["in-use".to_owned()].into();
        decide(
            plan,
            &Facts {
                now: NOW,
                free,
                in_use: &in_use,
                frees: &|_| 300 << 20,
                archived_uppers,
            },
        )
    }

    fn removed(d: &Decision) -> Vec<&str> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Remove { layer, .. } => Some(layer.as_str()),
                Action::Compact { .. } | Action::Date { .. } | Action::RemoveUpper { .. } => None,
            })
            .collect()
    }

    fn compacted(d: &Decision) -> Vec<(&str, &str, usize)> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Compact { from, to, layers } => Some((from.as_str(), to.as_str(), *layers)),
                Action::Remove { .. } | Action::Date { .. } | Action::RemoveUpper { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_small_plan_needs_nothing() {
        let d = decide_for(
            vec![layer("a", 'a', false, 1), layer("base", 'a', true, 9)],
            |_| {},
            1 << 40,
        );
        assert_eq!(d, Decision::default());
    }

    #[test]
    fn old_disabled_layers_go_unless_known_good_or_in_use() {
        let d = decide_for(
            vec![
                layer("new-off", 'd', false, 10),
                layer("old-off", 'd', false, 40),
                layer("in-use", 'd', false, 40),
                layer("kept-good", 'd', true, 40),
                layer("old-on", 'a', false, 40),
                layer("base", 'a', true, 90),
            ],
            |p| p.policy.drop_disabled_after = Some(Age(30 * DAY)),
            1 << 40,
        );
        assert_eq!(removed(&d), ["old-off"]);
        assert!(
            d.actions[0].to_string().contains("disabled 40d ago"),
            "{}",
            d.actions[0]
        );
        // A layer disabled long after it was made is as old as its disabling; one the boot
        // disabled (no date) gets today's date first, and stays.
        let mut rolled_back = layer("rolled-back", 'd', false, 400);
        rolled_back.disabled_at = Some(crate::store::utc_datetime(NOW - DAY));
        let mut by_boot = layer("by-boot", 'd', false, 400);
        by_boot.disabled_at = None;
        let d = decide_for(
            vec![rolled_back, by_boot, layer("base", 'a', true, 900)],
            |p| p.policy.drop_disabled_after = Some(Age(30 * DAY)),
            1 << 40,
        );
        assert_eq!(
            d.actions,
            [Action::Date {
                layers: vec!["by-boot".into()]
            }]
        );
        // Without the setting, age removes nothing.
        let d = decide_for(
            vec![
                layer("old-off", 'd', false, 400),
                layer("base", 'a', true, 900),
            ],
            |_| {},
            1 << 40,
        );
        assert_eq!(d, Decision::default());
    }

    #[test]
    fn archived_uppers_go_after_disabled_layers_and_keep_their_layers() {
        let plan = {
            let mut p = Plan::new(vec![
                layer("off", 'd', false, 5),
                layer("kept-off", 'd', false, 9),
                layer("base", 'a', true, 9),
            ]);
            p.policy.min_free = ByteSize(1 << 30);
            p
        };
        let archived = |id: &str, over: &str| Archived {
            id: id.into(),
            bytes: 400 << 20,
            layers: vec![over.into(), "base".into()],
        };
        let archived = [archived("1", "kept-off"), archived("3", "base")];
        let decide_with = |free: u64| decide_at(&plan, free, &archived);
        let shown = |d: &Decision| {
            d.actions
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        // 400 MiB free, 1 GiB wanted: the disabled layer no upper keeps (300 MiB), then the
        // oldest upper (400 MiB) is enough; kept-off, which upper 1 kept, could go next.
        let d = decide_with(400 << 20);
        assert_eq!(removed(&d), ["off"], "{:?}", shown(&d));
        assert!(
            d.actions[1]
                .to_string()
                .starts_with("remove upper 1: archived by a rollback"),
            "{:?}",
            shown(&d)
        );
        assert_eq!(d.actions.len(), 2);
        // Less room: upper 1 gone, kept-off is free to go before upper 3.
        let d = decide_with(0);
        assert_eq!(removed(&d), ["off", "kept-off"], "{:?}", shown(&d));
        assert!(
            d.actions[3].to_string().starts_with("remove upper 3"),
            "{:?}",
            shown(&d)
        );
        assert_eq!(d.actions.len(), 4);
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        // Enough room: the uppers and the layers they keep stay.
        assert_eq!(decide_with(2 << 30), Decision::default());
    }

    #[test]
    fn below_the_free_floor_disabled_layers_go_oldest_first() {
        let layers = || {
            vec![
                layer("newer", 'd', false, 2),
                layer("older", 'd', false, 5),
                layer("on", 'a', false, 9),
                layer("base", 'a', true, 9),
            ]
        };
        // 100 MiB free, 512 MiB wanted: each removal frees 300 MiB; two are needed.
        let floor = |p: &mut Plan| p.policy.min_free = ByteSize(512 << 20);
        let d = decide_for(layers(), floor, 100 << 20);
        assert_eq!(removed(&d), ["older", "newer"]);
        assert!(d.notes.is_empty());
        // 300 MiB free: one is enough.
        assert_eq!(removed(&decide_for(layers(), floor, 300 << 20)), ["older"]);
        // Not enough to remove: said so.
        let d = decide_for(layers(), |p| p.policy.min_free = ByteSize(2 << 30), 0);
        assert_eq!(removed(&d), ["older", "newer"]);
        assert!(
            d.notes[0].contains("stays below policy.min_free = 2GiB"),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn too_many_layers_merge_the_lowest_accepted_ones() {
        let max = |n: u32| move |p: &mut Plan| p.policy.max_layers = n;
        // A trial on top, six accepted layers, a known-good base: 8 layers, 4 allowed. The five
        // lowest accepted layers become one; the newest accepted one stays apart.
        let layers: Vec<Layer> = [("t", 't', false)]
            .into_iter()
            .chain(
                (1..=6)
                    .rev()
                    .map(|i| (["a1", "a2", "a3", "a4", "a5", "a6"][i - 1], 'a', false)),
            )
            .chain([("base", 'a', true)])
            .map(|(n, s, k)| layer(n, s, k, 1))
            .collect();
        let d = decide_for(layers.clone(), max(4), 1 << 40);
        assert_eq!(compacted(&d), [("a1", "a5", 5)]);
        assert!(d.notes.is_empty());
        // 2 allowed: all six accepted layers merge, and the trial and the base stay: 3 left.
        let d = decide_for(layers, max(2), 1 << 40);
        assert_eq!(compacted(&d), [("a1", "a6", 6)]);
        assert!(d.notes[0].starts_with("3 layers stay"), "{:?}", d.notes);
    }

    #[test]
    fn runs_stop_at_trial_disabled_and_known_good_layers() {
        let d = decide_for(
            vec![
                layer("a5", 'a', false, 1),
                layer("a4", 'a', false, 1),
                layer("good", 'a', true, 1),
                layer("a3", 'a', false, 1),
                layer("t", 't', false, 1),
                layer("a2", 'a', false, 1),
                layer("a1", 'a', false, 1),
                layer("base", 'a', true, 1),
            ],
            |p| p.policy.max_layers = 3,
            1 << 40,
        );
        // The lowest run (a2, a1) first, then (a5, a4); a3 is a run of one.
        assert_eq!(compacted(&d), [("a1", "a2", 2), ("a4", "a5", 2)]);
        assert!(d.notes[0].starts_with("6 layers stay"), "{:?}", d.notes);
    }
}

/// What `policy` did (or, dry, would do).
#[derive(Debug, Serialize)]
pub struct Applied {
    pub dry_run: bool,
    /// Asked to act only when space is low, and it was not: nothing was decided.
    pub space_fine: bool,
    /// The actions decided, in order; all carried out unless `dry_run`.
    pub actions: Vec<Action>,
    pub notes: Vec<String>,
}

/// Decides from the store's plan and facts, and (unless `dry_run`) carries the actions out, one
/// transaction each; with `if_space_low`, only when free space is below `min_free`. When one fails, the error names it and the ones done before it.
pub fn apply(store: &Store, dry_run: bool, if_space_low: bool) -> Result<Applied> {
    let loaded = store.plan()?;
    if let Some(why) = loaded.fell_back {
        bail!("the plan cannot be read ({why}); the policy does nothing");
    }
    let plan = loaded.value;
    if if_space_low && crate::ops::free_bytes(store)? >= plan.policy.min_free.0 {
        return Ok(Applied {
            dry_run,
            space_fine: true,
            actions: Vec::new(),
            notes: Vec::new(),
        });
    }
    let spaces = crate::status::spaces(store, &plan, &[]);
    let in_use = store.layers_in_use()?;
    let archived: Vec<Archived> = store
        .state()?
        .archived_uppers
        .iter()
        .map(|a| Archived {
            id: a.id.clone(),
            bytes: crate::uppers::size(store, &a.id).unwrap_or(0),
            layers: plan.current_names(&a.layers),
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let decision = decide(
        &plan,
        &Facts {
            now,
            free: crate::ops::free_bytes(store)?,
            in_use: &in_use,
            frees: &|name| spaces.get(name).map_or(0, |s| s.frees),
            archived_uppers: &archived,
        },
    );
    if !dry_run {
        for (i, action) in decision.actions.iter().enumerate() {
            carry_out(store, action).with_context(|| {
                let done: Vec<String> = decision.actions[..i]
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                match done.is_empty() {
                    true => format!("policy: {action}"),
                    false => format!("policy: {action} (done before it: {})", done.join("; ")),
                }
            })?;
        }
    }
    Ok(Applied {
        dry_run,
        space_fine: false,
        actions: decision.actions,
        notes: decision.notes,
    })
}

/// One action, as one transaction, through the same operations as the commands.
fn carry_out(store: &Store, action: &Action) -> Result<()> {
    match action {
        Action::Date { layers } => {
            let mut change = Transaction::begin(store)?;
            for name in layers {
                if let Some(layer) = change.plan.layer_mut(name)
                    && layer.state == LayerState::Disabled
                    && layer.disabled_at.is_none()
                {
                    layer.disabled_at = Some(crate::store::now());
                }
            }
            change.commit().map(drop)
        }
        Action::Remove { layer, .. } => {
            let mut change = Transaction::begin(store)?;
            crate::ops::remove_layer(&mut change, layer, true, "policy")?;
            change.commit().map(drop)
        }
        Action::RemoveUpper { id, .. } => {
            let mut change = Transaction::begin(store)?;
            crate::uppers::remove(change.store, &mut change.state, id)
        }
        Action::Compact { from, to, .. } => {
            let request = crate::compaction::Request {
                from: Some(from.clone()),
                to: Some(to.clone()),
                ..Default::default()
            };
            crate::compaction::run(store, &request).map(drop)
        }
    }
}
