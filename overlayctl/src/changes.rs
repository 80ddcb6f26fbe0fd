//! Operations that change which layers boot, not their contents: enable, disable, accept,
//! known-good, rollback, the menu lock, remove, checkpoint. Each takes plain inputs, runs as one
//! [`Transaction`], and returns a typed report; the CLI (`commands`) only prints it, as text or
//! JSON.

use anyhow::{Result, anyhow, bail};
use layers_spec::{LayerState, UpperMode};
use serde::Serialize;

use crate::status::next_boot;
use crate::store::Store;
use crate::transaction::{Transaction, layer_index};

/// What a change did, and what the next boot mounts after it.
#[derive(Debug, Serialize)]
pub struct Changed {
    /// The layers it changed.
    pub changed: Vec<String>,
    /// One line for a person.
    #[serde(skip)]
    pub summary: String,
    /// The next boot's stack, top first.
    pub next_boot: Vec<String>,
    /// What resolving the next boot noted (a layer left out whose parent is missing, …).
    pub notes: Vec<String>,
}

/// Commits `change` and reports it.
fn commit(change: Transaction<'_>, changed: Vec<String>, summary: String) -> Result<Changed> {
    let store = change.store;
    let done = change.commit()?;
    let next = next_boot(store, &done.plan, &done.state);
    Ok(Changed {
        changed,
        summary,
        notes: next.notes.iter().map(ToString::to_string).collect(),
        next_boot: next.stack,
    })
}

/// Sets the state of `names` (each must be in the plan); their trial counters are forgotten.
pub fn set_state(store: &Store, names: &[String], state: LayerState) -> Result<Changed> {
    let mut change = Transaction::begin(store)?;
    for name in names {
        layer_index(&change.plan, name)?;
    }
    for name in names {
        change
            .plan
            .layer_mut(name)
            .expect("checked above")
            .set_state(state, Some(crate::store::now()));
    }
    // The state is written before the plan: a failure between leaves only reset counters.
    change
        .state
        .trial_tries
        .retain(|name, _| !names.contains(name));
    let verb = match state {
        LayerState::Active => "enabled",
        LayerState::Disabled => "disabled",
        LayerState::Trial => "made trial",
    };
    let summary = format!("{verb}: {}", names.join(", "));
    commit(change, names.to_vec(), summary)
}

/// Accepts trial layers: `names`, or without names the running boot's trial layers (and that
/// stack becomes the last good one).
pub fn accept(store: &Store, names: &[String]) -> Result<Changed> {
    let mut change = Transaction::begin(store)?;
    let chosen: Vec<String> = if names.is_empty() {
        let booted = store.booted()?.ok_or_else(|| {
            anyhow!(
                "this system was not booted from {}; name the layers to accept",
                store.root.display()
            )
        })?;
        // The running stack booted well enough to accept: it is the new last good stack.
        // In the plan's terms: a compaction since the boot replaced some of its layers.
        change.state.last_good = change.plan.current_names(&booted.stack);
        booted
            .stack
            .iter()
            .filter(|n| {
                change
                    .plan
                    .layer(n)
                    .is_some_and(|l| l.state == LayerState::Trial)
            })
            .cloned()
            .collect()
    } else {
        for name in names {
            let i = layer_index(&change.plan, name)?;
            if change.plan.layers[i].state == LayerState::Disabled {
                bail!("layer {name:?} is disabled; enable it, boot it, then accept it");
            }
        }
        names.to_vec()
    };
    for name in &chosen {
        change
            .plan
            .layer_mut(name)
            .expect("names were checked")
            .set_state(LayerState::Active, None);
    }
    change
        .state
        .trial_tries
        .retain(|name, _| !chosen.contains(name));
    let summary = if chosen.is_empty() {
        "no trial layers to accept".to_owned()
    } else {
        format!("accepted: {}", chosen.join(", "))
    };
    commit(change, chosen, summary)
}

/// Marks `layer` known-good, or (`unset`) no longer.
pub fn known_good(store: &Store, layer: &str, unset: bool) -> Result<Changed> {
    let mut change = Transaction::begin(store)?;
    let i = layer_index(&change.plan, layer)?;
    let others = change
        .plan
        .layers
        .iter()
        .filter(|l| l.known_good && l.name != layer);
    if unset && change.plan.layers[i].known_good && others.count() == 0 {
        bail!(
            "{layer} is the plan's only known-good layer, the fallback a boot reaches when everything else fails; mark another layer known-good first (`overlayctl known-good NAME`)"
        );
    }
    change.plan.layers[i].known_good = !unset;
    let summary = format!(
        "{layer} is {}known-good",
        if unset { "no longer " } else { "" }
    );
    commit(change, vec![layer.to_owned()], summary)
}

/// Sets the boot menu's lock (an argon2id hash), or clears it.
pub fn menu_lock(store: &Store, hash: Option<String>) -> Result<Changed> {
    let mut change = Transaction::begin(store)?;
    let summary = match &hash {
        Some(_) => "the boot menu now asks for the password before any change",
        None => "the boot menu is no longer locked",
    };
    change.plan.boot.menu_lock = hash;
    commit(change, Vec::new(), summary.to_owned())
}

/// Leaves out every layer above `to` (by default the highest known-good layer), and enables
/// `to` itself.
pub fn rollback(store: &Store, to: Option<&str>) -> Result<Changed> {
    let mut change = Transaction::begin(store)?;
    let plan = &mut change.plan;
    let target = match to {
        Some(name) => layer_index(plan, name)?,
        None => plan.layers.iter().position(|l| l.known_good).ok_or_else(|| {
            anyhow!("no layer is known-good, so there is nothing to roll back to; name one with --to")
        })?,
    };
    let mut changed = Vec::new();
    for layer in &mut plan.layers[..target] {
        if layer.state != LayerState::Disabled {
            layer.set_state(LayerState::Disabled, Some(crate::store::now()));
            changed.push(layer.name.clone());
        }
    }
    let top = &mut plan.layers[target];
    if top.state == LayerState::Disabled {
        top.set_state(LayerState::Active, None);
        changed.push(top.name.clone());
    }
    let summary = format!(
        "rolled back to {}; disabled: {}",
        plan.layers[target].name,
        if changed.is_empty() {
            "nothing".into()
        } else {
            changed.join(", ")
        }
    );
    commit(change, changed, summary)
}

/// What `remove` did.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Removed {
    /// A layer of the plan, let go (deleted once nothing needs it).
    Layer(Changed),
    /// A directory in `layers/` the plan did not name and nobody recorded.
    Unplanned {
        removed_unplanned: String,
        #[serde(skip)]
        path: std::path::PathBuf,
    },
}

/// Removes the layer `name` from the plan and lets it go (see `ops::remove_layer`); a
/// directory in `layers/` that the plan does not name and nobody recorded is deleted.
pub fn remove(store: &Store, name: &str, force: bool) -> Result<Removed> {
    let mut change = Transaction::begin(store)?;
    let unplanned = change.plan.layer(name).is_none()
        && store
            .unaccounted_layers(&change.plan, &change.state)
            .iter()
            .any(|(n, _)| n == name);
    if unplanned {
        if store.in_use(name)? {
            bail!("{name} is in a mounted stack; unmount it (or reboot without it) first");
        }
        store.check_unmounted(name)?;
        change.release(name, "remove");
        change.commit()?;
        return Ok(Removed::Unplanned {
            removed_unplanned: name.to_owned(),
            path: store.layer_dir(name),
        });
    }
    crate::ops::remove_layer(&mut change, name, force, "remove")?;
    commit(change, vec![name.to_owned()], format!("removed {name}")).map(Removed::Layer)
}

/// What `checkpoint` recorded.
#[derive(Debug, Serialize)]
pub struct Checkpointed {
    pub layer: String,
    pub upper: String,
    /// The pending checkpoint this one replaces.
    #[serde(skip)]
    pub replaced: Option<String>,
}

/// Records that the next boot freezes the running persistent upper into the layer `name` (by
/// default `checkpoint-` and the time).
pub fn checkpoint(store: &Store, name: Option<&str>, title: Option<&str>) -> Result<Checkpointed> {
    let mut change = Transaction::begin(store)?;
    let booted = store.booted()?.ok_or_else(|| {
        anyhow!(
            "this system was not booted from {}: there is no running upper to freeze",
            store.root.display()
        )
    })?;
    let Some(upper) = booted
        .upper_id
        .clone()
        .filter(|_| booted.upper == UpperMode::Persistent)
    else {
        bail!(
            "the running system's upper is a tmpfs: it is gone at the next boot, so there is nothing to freeze"
        );
    };
    let name = name.map_or_else(|| crate::store::stamped_name("checkpoint"), str::to_owned);
    // finish_pending sealed a frozen one; one still pending is replaced, with the same upper.
    let replaced = change.state.checkpoint.take().map(|c| c.layer);
    change.check_name_free(&name)?;
    change.check_room_for_one()?;
    // What the system wrote so far reaches the disk before the checkpoint is recorded: the
    // upper is on the store's filesystem, and a power cut must not freeze files whose data
    // was still only in memory (ext4's delayed allocation leaves them empty).
    store.handle().root().sync_filesystem()?;
    change.state.checkpoint = Some(layers_spec::Checkpoint {
        layer: name.clone(),
        title: title.map(str::to_owned),
        upper: upper.clone(),
        parent: booted.stack.first().cloned(),
        frozen: false,
    });
    change.commit()?;
    Ok(Checkpointed {
        layer: name,
        upper,
        replaced,
    })
}

/// What `assess` found about the running boot.
#[derive(Debug, Serialize)]
pub struct Assessed {
    /// Whether `boot-complete.target` was reached (every health check passed).
    pub healthy: bool,
    /// The running boot's trial layers.
    pub trials: Vec<String>,
    /// Whether a restart was asked for (unhealthy, with trial layers whose tries will run out).
    pub restart: bool,
}

/// After the boot's health checks: a boot that did not reach `boot-complete.target` and runs
/// trial layers is restarted, so their tries run out and the hook boots without them (the
/// unattended rollback). A boot without trial layers is left running: restarting it would
/// bring back the same stack.
pub fn assess(store: &Store, healthy: bool) -> Result<Assessed> {
    let booted = store.booted()?.ok_or_else(|| {
        anyhow!(
            "this system was not booted from {}; there is no boot to assess",
            store.root.display()
        )
    })?;
    let plan = store.plan()?.value;
    let trials: Vec<String> = booted
        .stack
        .iter()
        .filter(|n| plan.layer(n).is_some_and(|l| l.state == LayerState::Trial))
        .cloned()
        .collect();
    Ok(Assessed {
        healthy,
        restart: !healthy && !trials.is_empty(),
        trials,
    })
}
