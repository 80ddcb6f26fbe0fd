//! `verify`: recompute each layer's digest and compare it with the plan, and list what
//! `layers/` holds that the plan does not name. A report only; nothing is changed.

use std::fs;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::engine::{Layer, Manifest, XattrNs};
use crate::store::{Folder, Store};
use crate::transaction::layer_index;

/// What `verify` found.
#[derive(Debug, Serialize)]
pub struct Verification {
    pub layers: Vec<Verified>,
    /// Directories in `layers/` that neither the plan nor the journal accounts for (only when
    /// every layer was verified).
    pub not_in_plan: Vec<NotInPlan>,
}

#[derive(Debug, Serialize)]
pub struct Verified {
    pub layer: String,
    pub ok: bool,
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct NotInPlan {
    pub name: String,
    /// What it is, when it is not a directory.
    pub what: Option<&'static str>,
}

impl Verification {
    /// The layers that failed, by name.
    pub fn failed(&self) -> Vec<&str> {
        self.layers
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.layer.as_str())
            .collect()
    }
}

/// Verifies `only` that layer, or every layer of the plan.
pub fn verify(store: &Store, only: Option<&str>) -> Result<Verification> {
    let plan = store.plan()?.value;
    let layers: Vec<&layers_spec::Layer> = match only {
        Some(name) => vec![&plan.layers[layer_index(&plan, name)?]],
        None => plan.layers.iter().collect(),
    };
    let mut verified = Vec::new();
    for layer in layers {
        let problem = verify_layer(store, layer)?;
        verified.push(Verified {
            layer: layer.name.clone(),
            ok: problem.is_none(),
            problem,
        });
    }
    let not_in_plan = match only {
        Some(_) => Vec::new(),
        None => {
            let (state, _) = store.state_for_report();
            store
                .unaccounted_layers(&plan, &state)
                .into_iter()
                .map(|(name, what)| NotInPlan { name, what })
                .collect()
        }
    };
    Ok(Verification {
        layers: verified,
        not_in_plan,
    })
}

/// `None` when the layer matches its recorded digest.
fn verify_layer(store: &Store, layer: &layers_spec::Layer) -> Result<Option<String>> {
    let dir = store.layer_dir(&layer.name);
    if !store.layer_present(&layer.name) {
        let layers = store.folder(Folder::Layers)?;
        return Ok(Some(match layers.sub(&layer.name) {
            Err(e) if layers.kind(&layer.name)?.is_some() => {
                format!("{e}; the boot does not mount it")
            }
            _ => format!("missing: {} does not exist", dir.display()),
        }));
    }
    let Some(recorded) = &layer.digest else {
        return Ok(Some(
            "the plan records no digest for it, so it cannot be verified".into(),
        ));
    };
    let read = Layer::read(&dir, XattrNs::Trusted)
        .with_context(|| format!("reading {}", dir.display()))?;
    let manifest =
        Manifest::of_layer(&read).with_context(|| format!("hashing {}", dir.display()))?;
    if &manifest.digest() == recorded {
        return Ok(None);
    }
    let stored = fs::read_to_string(store.manifest_path(&layer.name))
        .ok()
        .map(|text| Manifest { text });
    Ok(match stored.filter(|m| &m.digest() == recorded) {
        // Copied by a tool that keeps no sub-second times: the same files, contents, owners,
        // modes and xattrs.
        Some(stored) if stored.same_but_whole_second_mtimes(&manifest) => None,
        Some(stored) => Some(match stored.first_difference(&manifest) {
            Some(path) => format!("differs from its recorded manifest, first at {path}"),
            None => "differs from its recorded digest".into(),
        }),
        None => Some(format!(
            "digest {} differs from the recorded {recorded}",
            manifest.digest()
        )),
    })
}
