//! `overlayctl compact`: a run of adjacent accepted layers merged into one, as a transaction.
//! The new layer is built in `staging/` with its files hard-linked from the run (so the cost
//! grows with entries, not bytes), its manifest written from the run's manifests, then renamed
//! into `layers/`; the plan then names it in the run's place (recording what it replaced), the
//! boot state follows with the replaced layers released in its journal, and only then are they
//! deleted: those a mounted stack uses (the running boot's) stay, no longer named by the plan,
//! until the next command or boot after they are unused deletes them (`layers_store`'s sweep,
//! the one rule for that).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use layers_spec::{LayerState, Plan, check_name};

use crate::engine::compact::{Below, CompactStats, compact};
use crate::engine::copy::{Linking, link_layer};
use crate::engine::manifest::hash_file;
use crate::engine::{Layer, Manifest, XattrNs};
use crate::install::{install, write_synced};
use crate::store::Store;
use crate::transaction::Transaction;

/// What to compact and what to call the result.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The run's bottom layer [default: the lowest accepted layer above the highest known-good
    /// one].
    pub from: Option<String>,
    /// The run's top layer [default: the highest accepted layer above `from` with only
    /// accepted layers between].
    pub to: Option<String>,
    pub name: Option<String>,
    pub title: Option<String>,
}

/// What compaction did.
#[derive(Debug, Clone)]
pub struct Compacted {
    pub name: String,
    pub digest: String,
    /// The layers merged, top first.
    pub replaced: Vec<String>,
    /// Those deleted now.
    pub deleted: Vec<String>,
    /// Those left until unused (a mounted stack, or the last good stack, has them).
    pub pending: Vec<String>,
    pub stats: CompactStats,
    /// Files hard-linked from the run, and bytes copied (across filesystems only).
    pub linked: u64,
    pub copied_bytes: u64,
}

/// The run `request` names in `plan`, as plan indices (top, bottom), checked.
pub fn resolve_run(plan: &Plan, request: &Request) -> Result<(usize, usize)> {
    let index = |name: &str| crate::transaction::layer_index(plan, name);
    // The default run stops at a layer another stands in for (never merged; see `run`).
    let superseded: std::collections::HashSet<&str> = plan
        .layers
        .iter()
        .flat_map(|l| l.supersedes.iter().map(String::as_str))
        .collect();
    let mergeable = |i: usize| {
        let l = &plan.layers[i];
        l.state == LayerState::Active && !l.known_good && !superseded.contains(l.name.as_str())
    };
    let bottom = match &request.from {
        Some(name) => index(name)?,
        None => {
            // Just above the highest known-good layer (or the bottom, when none is).
            let above_known_good = plan
                .layers
                .iter()
                .position(|l| l.known_good)
                .unwrap_or(plan.layers.len());
            match (0..above_known_good).rev().find(|&i| mergeable(i)) {
                Some(i) => i,
                None => bail!(
                    "there are no accepted layers above the known-good ones to compact; name a run with --from and --to"
                ),
            }
        }
    };
    let top = match &request.to {
        Some(name) => index(name)?,
        None => {
            let mut top = bottom;
            while top > 0 && mergeable(top - 1) {
                top -= 1;
            }
            top
        }
    };
    ensure!(
        top <= bottom,
        "--to {:?} is below --from {:?} in the plan (layers are listed top first: --from names the run's bottom layer, --to its top)",
        plan.layers[top].name,
        plan.layers[bottom].name
    );
    ensure!(
        top < bottom,
        "the run is one layer ({}): compaction merges two or more",
        plan.layers[top].name
    );
    for layer in &plan.layers[top..=bottom] {
        match layer.state {
            LayerState::Disabled => bail!(
                "{} is disabled: compaction would bring it back; remove it or choose a run without it",
                layer.name
            ),
            LayerState::Trial => bail!(
                "{} is a trial layer: accept it first (merging would make it impossible to leave out)",
                layer.name
            ),
            LayerState::Active => {}
        }
        ensure!(
            !layer.known_good,
            "{} is known-good, a fallback that compaction must not merge away; unmark it with `overlayctl known-good {} --unset` first",
            layer.name,
            layer.name
        );
    }
    Ok((top, bottom))
}

/// Compacts the run `request` names, in one transaction under the store's lock.
pub fn run(store: &Store, request: &Request) -> Result<Compacted> {
    let mut change = Transaction::begin(store)?;
    let (top, bottom) = resolve_run(&change.plan, request)?;
    let replaced: Vec<String> = change.plan.layers[top..=bottom]
        .iter()
        .map(|l| l.name.clone())
        .collect();
    // A layer another stands in for (a pulled image's) is never merged, from inside the run or
    // out: merged, what it holds would show again, or could no longer be left out alone.
    if let Some((by, of)) = change.plan.layers.iter().find_map(|l| {
        let of = l.supersedes.iter().find(|s| replaced.contains(s))?;
        Some((&l.name, of))
    }) {
        bail!(
            "{by:?} supersedes {of:?}, which is in the run {}..{}: merged, what {of:?} holds would show again; nothing was changed",
            replaced[0],
            replaced[replaced.len() - 1]
        );
    }
    // The new layer stands in for what its layers stood in for.
    let supersedes: Vec<String> = change.plan.layers[top..=bottom]
        .iter()
        .flat_map(|l| &l.supersedes)
        .filter(|s| !replaced.contains(s))
        .fold(Vec::new(), |mut all, s| {
            if !all.contains(s) {
                all.push(s.clone());
            }
            all
        });
    let layers = store.folder(crate::store::Folder::Layers)?;
    let taken = |name: &str| {
        change.plan.layer(name).is_some()
            || layers.kind(name).map_or(true, |k| k.is_some())
            || change
                .state
                .checkpoint
                .as_ref()
                .is_some_and(|c| c.layer == name)
    };
    let name = match &request.name {
        Some(name) => {
            check_name(name).map_err(|p| {
                anyhow::anyhow!("layer name {name:?} is not valid: {p}; choose one with --name")
            })?;
            ensure!(
                !taken(name),
                "a layer named {name:?} exists; choose another --name"
            );
            name.clone()
        }
        None => default_name(&replaced[0], &replaced[replaced.len() - 1], &taken),
    };

    // The run, read whole, and everything below it, looked up where needed (disabled layers
    // too: whiteouts they need must stay).
    let dirs: Vec<PathBuf> = change.plan.layers[top..]
        .iter()
        .map(|l| store.layer_dir(&l.name))
        .collect();
    let (run_dirs, below_dirs) = dirs.split_at(bottom - top + 1);
    let (run_layers, hashes): (Vec<Layer>, Vec<_>) =
        read_run(store, &change.plan, &replaced, run_dirs)?
            .into_iter()
            .map(|r| (r.layer, r.hashes))
            .unzip();
    let below = Below::open(below_dirs, XattrNs::Trusted).context("opening the layers below")?;
    let made = compact(&run_layers, &below);

    let staged = store.staging_path(&name)?;
    let linked = link_layer(
        &made.tree,
        run_dirs,
        &|rel| made.sources[rel],
        Linking::Checked,
        staged.parent().expect("staging paths have a parent"),
        staged.file_name().expect("staging paths have a name"),
    );
    // A run that cannot be linked (a layer changed on disk since its manifest was written, say)
    // leaves nothing behind.
    let copy = match linked {
        Ok(copy) => copy,
        Err(e) => {
            if let Err(cleanup) = store.remove_staged(&staged) {
                log::warn!("{cleanup:#}");
            }
            return Err(anyhow::Error::new(e).context(format!(
                "writing the compacted layer into {}; nothing was changed",
                staged.display()
            )));
        }
    };
    layers_spec::fault::point("compact-staged");
    // The manifest from the run's manifests: the files are the run's, so their hashes are known.
    // The manifest of the tree just written (links keep the run's files as they were, and
    // directories, whiteouts and copies got the tree's metadata), not of a second walk of it.
    let written = Layer {
        root: staged.clone(),
        ns: XattrNs::Trusted,
        tree: made.tree,
        unclean: Vec::new(),
    };
    let manifest = Manifest::of_layer_with(&written, &mut |rel: &Path| match made
        .sources
        .get(rel)
        .and_then(|&i| hashes[i].get(rel))
    {
        Some((_, hash)) => Ok(hash.clone()),
        None => hash_file(&staged.join(rel)),
    })
    .with_context(|| format!("hashing {}", staged.display()))?;
    let staged_manifest = staged.with_extension("manifest");
    write_synced(&staged_manifest, manifest.text.as_bytes())?;
    // The journal first: the new layer claimed (deleted if the plan never comes to name it),
    // the run let go (deleted once the plan no longer names it and nothing needs it).
    for old in &replaced {
        change.state.release(old, "compact");
    }
    change.claim(&name, "compact")?;
    install(store, &staged, &staged_manifest, &name)?;
    layers_spec::fault::point("compact-installed");

    // A one-shot selection of part of the run cannot be said with the new layer: dropped
    // before the plan changes (else a crash between the two could boot the rest of it).
    if let Some(once) = &change.state.once
        && replace_run(&mut once.layers.clone(), &replaced, &name) == Named::Part
    {
        log::warn!("the one-shot selection for the next boot named part of the run; it is dropped");
        change.state.once = None;
        change.save_state()?;
    }

    // The plan: the new layer in the run's place, on the run's parent; layers built on one of
    // the run are built on it.
    let (top_layer, bottom_layer) = (&change.plan.layers[top], &change.plan.layers[bottom]);
    let mut layer = layers_spec::Layer::new(name.clone());
    layer.title = request.title.clone().or_else(|| top_layer.title.clone());
    layer.notes = top_layer.notes.clone();
    layer.parent = bottom_layer.parent.clone();
    layer.created = Some(crate::store::now());
    layer.digest = Some(manifest.digest());
    layer.replaces = replaced.clone();
    layer.supersedes = supersedes;
    change.plan.layers.splice(top..=bottom, [layer]);
    for l in &mut change.plan.layers {
        if l.parent.as_ref().is_some_and(|p| replaced.contains(p)) {
            l.parent = Some(name.clone());
        }
    }
    change.save_plan()?;
    layers_spec::fault::point("compact-planned");

    // The boot state: a stack that named the whole run names the new layer instead (until
    // then, the plan's `replaces` lets the hook read the old names). A last good stack with
    // part of the run keeps those layers until the next good boot replaces it.
    // The plan names the new layer: its claim is done.
    change.state.claimed.retain(|r| r.layer != name);
    replace_run(&mut change.state.last_good, &replaced, &name);
    if let Some(once) = &mut change.state.once {
        replace_run(&mut once.layers, &replaced, &name);
    }
    // The stack the upper was used over (what a rollback is judged by) names the new layer
    // for any of the run it has: merging is never a rollback, however many times it happens.
    change.state.upper_stack = rename_run(&change.state.upper_stack, &replaced, &name);
    change.save_state()?;
    layers_spec::fault::point("compact-state");

    // The old layers go by the journal (which also refreshes the previous change.plan, the fallback,
    // first): unless a mounted stack, the last good stack or a one-shot selection has them;
    // then the next command or boot that finds them unused deletes them.
    change.commit()?;
    let (pending, deleted): (Vec<String>, Vec<String>) = replaced
        .iter()
        .cloned()
        .partition(|old| store.layer_dir(old).exists());
    Ok(Compacted {
        name,
        digest: manifest.digest(),
        replaced,
        deleted,
        pending,
        stats: made.stats,
        linked: copy.linked,
        copied_bytes: copy.bytes,
    })
}

/// The run's layers: each from its manifest where the plan's digest vouches for it, so that
/// the disk is touched only to link the files, with its files' hashes (by path in the layer);
/// walked, without hashes, where it does not (a layer without a manifest or digest, or whose
/// manifest does not match). The manifests are read on a few threads.
fn read_run(
    store: &Store,
    plan: &Plan,
    names: &[String],
    dirs: &[PathBuf],
) -> Result<Vec<RunLayer>> {
    let describe = |i: usize| -> Option<RunLayer> {
        let (name, dir) = (&names[i], &dirs[i]);
        let manifest = Manifest {
            text: store.checked_manifest(plan, name)?,
        };
        // Inode numbers made up per layer, on no real device, so links never mix layers.
        let dev = u64::MAX - i as u64;
        match manifest.to_layer(dir, XattrNs::Trusted, dev) {
            Ok(layer) => Some(RunLayer {
                layer,
                hashes: manifest.file_hashes(),
            }),
            Err(why) => {
                log::warn!("the manifest of {name} cannot be read ({why}); the layer is walked");
                None
            }
        }
    };
    // A few threads, each a share of the layers (a run may have hundreds).
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get() * 2)
        .clamp(1, names.len().max(1));
    let indices: Vec<usize> = (0..names.len()).collect();
    let described: Vec<Option<RunLayer>> = std::thread::scope(|scope| {
        let readers: Vec<_> = indices
            .chunks(names.len().div_ceil(threads).max(1))
            .map(|part| {
                let describe = &describe;
                scope.spawn(move || part.iter().map(|&i| describe(i)).collect::<Vec<_>>())
            })
            .collect();
        readers
            .into_iter()
            .flat_map(|r| r.join().expect("a manifest reader panicked"))
            .collect()
    });
    let walk: Vec<PathBuf> = described
        .iter()
        .zip(dirs)
        .filter(|(layer, _)| layer.is_none())
        .map(|(_, dir)| dir.clone())
        .collect();
    let mut walked = Layer::read_all(&walk, XattrNs::Trusted)
        .context("reading the layers")?
        .into_iter();
    Ok(described
        .into_iter()
        .map(|layer| {
            layer.unwrap_or_else(|| RunLayer {
                layer: walked.next().expect("one walked layer for each without"),
                hashes: Default::default(),
            })
        })
        .collect())
}

/// A layer of the run, and the size and hash of its files as its manifest records them.
struct RunLayer {
    layer: Layer,
    hashes: std::collections::HashMap<PathBuf, (u64, String)>,
}

/// `TOP+BOTTOM` from the first part of the top's name and the last part of the bottom's, so
/// that merging a merged layer again does not make names grow (`u3` over `u2+u1` gives `u3+u1`);
/// then a number where that is taken, or a dated name where it would be too long: never a name
/// the policy job cannot use.
fn default_name(top: &str, bottom: &str, taken: &dyn Fn(&str) -> bool) -> String {
    let first = top.split('+').next().unwrap_or(top);
    let last = bottom.rsplit('+').next().unwrap_or(bottom);
    let stem = format!("{first}+{last}");
    let stem = if check_name(&stem).is_ok() && stem.len() <= 120 {
        stem
    } else {
        crate::store::stamped_name("compacted")
    };
    std::iter::once(stem.clone())
        .chain((2..).map(|n| format!("{stem}.{n}")))
        .find(|name| check_name(name).is_ok() && !taken(name))
        .expect("some numbered name is free")
}

#[derive(Debug, PartialEq, Eq)]
enum Named {
    Whole,
    Part,
    Nothing,
}

/// Replaces the run in a stack (top first) by `with` where the stack has the whole run, in
/// order; says how much of the run it had.
fn replace_run(stack: &mut Vec<String>, run: &[String], with: &str) -> Named {
    if let Some(at) = stack.iter().position(|n| n == &run[0])
        && stack.get(at..at + run.len()) == Some(run)
    {
        stack.splice(at..at + run.len(), [with.to_owned()]);
        return Named::Whole;
    }
    if stack.iter().any(|n| run.contains(n)) {
        Named::Part
    } else {
        Named::Nothing
    }
}

/// `stack` with every name of `run` it has given as `with`, once.
fn rename_run(stack: &[String], run: &[String], with: &str) -> Vec<String> {
    let mut renamed: Vec<String> = Vec::with_capacity(stack.len());
    for name in stack {
        let name = if run.contains(name) { with } else { name };
        if renamed.last().is_none_or(|last| last != name) {
            renamed.push(name.to_owned());
        }
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn default_names_do_not_grow() {
        let free = |_: &str| false;
        assert_eq!(default_name("u3", "u1", &free), "u3+u1");
        assert_eq!(default_name("u3", "u2+u1", &free), "u3+u1");
        assert_eq!(default_name("u9+u4", "u3+u1", &free), "u9+u1");
        let taken = |n: &str| n == "u3+u1" || n == "u3+u1.2";
        assert_eq!(default_name("u3", "u1", &taken), "u3+u1.3");
        let long = "x".repeat(100);
        let name = default_name(&long, &long, &free);
        assert!(name.starts_with("compacted-2"), "{name}");
        assert!(check_name(&name).is_ok(), "{name}");
    }

    #[test]
    fn a_stack_with_the_whole_run_names_the_new_layer() {
        let run = names(&["c", "b"]);
        let mut stack = names(&["d", "c", "b", "a"]);
        assert_eq!(replace_run(&mut stack, &run, "c+b"), Named::Whole);
        assert_eq!(stack, names(&["d", "c+b", "a"]));
        let mut part = names(&["b", "a"]);
        assert_eq!(replace_run(&mut part, &run, "c+b"), Named::Part);
        assert_eq!(part, names(&["b", "a"]));
        let mut none = names(&["a"]);
        assert_eq!(replace_run(&mut none, &run, "c+b"), Named::Nothing);
        assert_eq!(
            rename_run(&names(&["x", "b", "a"]), &run, "c+b"),
            ["x", "c+b", "a"]
        );
        assert_eq!(
            rename_run(&names(&["c", "b", "a"]), &run, "c+b"),
            ["c+b", "a"]
        );
    }
}
