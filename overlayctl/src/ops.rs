//! Store transactions that bring layers in: `init` (a new store around a base tree),
//! `add-layer` and `sync`. Each writes under `staging/`, flushes, renames into `layers/`, and only then
//! names the layer in the plan, so an interruption at any point leaves the old plan and at most
//! a leftover that the next command removes.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use layers_spec::{BootState, Layer as PlanLayer, LayerState, Plan, check_name};

use crate::engine::copy::CopyStats;
use crate::engine::delta::{Compare, DeltaStats, delta};
use crate::engine::{Kind, Layer, Manifest, MergedView, Node, XattrNs};
use crate::install::{Files, manifest_of, stage_and_install, write_synced};
use crate::store::{self, Store};
use crate::transaction::{Transaction, layer_index};

/// What a new layer is called and how the plan takes it.
#[derive(Debug, Clone)]
pub struct NewLayer {
    pub name: String,
    pub title: Option<String>,
    /// Defaults to the current top layer.
    pub parent: Option<String>,
    pub state: LayerState,
    pub known_good: bool,
    pub notes: Option<String>,
    /// The channel release it comes with (`overlayctl update`).
    pub release: Option<String>,
}

/// What was added.
#[derive(Debug, Clone)]
pub struct Added {
    pub name: String,
    pub digest: String,
    pub stats: CopyStats,
}

/// Reads a source tree and refuses anything a clean layer must not have.
pub fn read_clean(source: &Path, ns: XattrNs) -> Result<Layer> {
    let layer = Layer::read(source, ns).with_context(|| format!("reading {}", source.display()))?;
    if let Some(problem) = layer.unclean.first() {
        bail!(
            "{} is not a clean layer ({} problem{} in all); the first: {problem}",
            source.display(),
            layer.unclean.len(),
            if layer.unclean.len() == 1 { "" } else { "s" }
        );
    }
    Ok(layer)
}

/// Refuses a copy that would leave less than the plan's `min_free` on the store's filesystem.
/// Bytes free (for an unprivileged writer) on the store's filesystem.
pub fn free_bytes(store: &Store) -> Result<u64> {
    let stat = rustix::fs::statvfs(&store.root)
        .with_context(|| format!("checking free space on {}", store.root.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn check_room(store: &Store, plan: &Plan, needed: u64) -> Result<()> {
    let free = free_bytes(store)?;
    let min_free = plan.policy.min_free.0;
    if free < needed.saturating_add(min_free) {
        bail!(
            "not enough room in {}: the layer needs {} and policy.min_free keeps {} free, but only {} is free",
            store.root.display(),
            layers_spec::ByteSize(needed),
            plan.policy.min_free,
            layers_spec::ByteSize(free)
        );
    }
    Ok(())
}

/// Creates a store at `root` whose bottom layer is a copy of `base` (or `base` itself, renamed
/// into place, with `move_base`), active and known-good.
pub fn init(root: &Path, base: &Path, layer: &NewLayer, move_base: bool) -> Result<Added> {
    check_name(&layer.name)
        .map_err(|p| anyhow::anyhow!("layer name {:?} is not valid: {p}", layer.name))?;
    let source = read_clean(base, XattrNs::Trusted)?;
    let existed = root.exists();
    let store = Store::create(root)?;
    let result = init_store(&store, &source, base, layer, move_base);
    if result.is_err() {
        // A moved base goes back.
        let moved = store.layer_dir(&layer.name);
        if move_base && moved.exists() && !base.exists() {
            let _ = fs::rename(&moved, base);
        }
        clear_new_store(&store, root, existed);
    }
    result
}

/// Empties a store this command made (`Store::create` took a new or empty directory, so
/// everything in it is the command's), and removes its directory when the command made that
/// too: nothing half-made stays behind to block a retry.
pub(crate) fn clear_new_store(store: &Store, root: &Path, existed: bool) {
    clear_new_store_keeping(store, root, existed, false);
}

/// [`clear_new_store`], keeping `downloads/` (and the directory) when `keep_downloads`: a cut
/// `init --image` resumes its downloads the next time.
pub(crate) fn clear_new_store_keeping(
    store: &Store,
    root: &Path,
    existed: bool,
    keep_downloads: bool,
) {
    let top = store.handle().root();
    let downloads = crate::store::Folder::Downloads.name();
    let kept = keep_downloads
        && top
            .sub(downloads)
            .and_then(|d| d.names())
            .is_ok_and(|n| !n.is_empty());
    let existed = existed || kept;
    let cleared = top
        .names()
        .and_then(|names| {
            names
                .iter()
                .filter(|n| !(kept && *n == downloads))
                .try_for_each(|n| top.remove(n).map(drop))
        })
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            if existed {
                Ok(())
            } else {
                fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))
            }
        });
    if let Err(e) = cleared {
        log::warn!("could not clear the unfinished store: {e:#}");
    }
}

fn init_store(
    store: &Store,
    source: &Layer,
    base: &Path,
    layer: &NewLayer,
    move_base: bool,
) -> Result<Added> {
    let _lock = store.lock()?;
    let (digest, stats) = if move_base {
        let target = store.layer_dir(&layer.name);
        fs::rename(base, &target).with_context(|| {
            format!(
                "moving {} to {} (--move needs both on one filesystem; without it the base is copied)",
                base.display(),
                target.display()
            )
        })?;
        Store::sync_dir(&store.root.join(store::LAYERS))?;
        let (digest, text) = manifest_of(&target)?;
        let staged_manifest = store.staging_path(&format!("{}.manifest", layer.name))?;
        write_synced(&staged_manifest, text.as_bytes())?;
        fs::rename(&staged_manifest, store.manifest_path(&layer.name))
            .context("moving the manifest into place")?;
        Store::sync_dir(&store.root.join(store::MANIFESTS))?;
        (digest, CopyStats::default())
    } else {
        stage_and_install(store, source, &layer.name, Files::Copy)?
    };
    let mut base_layer = plan_layer(layer, &digest);
    base_layer.parent = None;
    base_layer.state = LayerState::Active;
    base_layer.known_good = true;
    let plan = Plan::new(vec![base_layer]);
    store.save_plan(&plan)?;
    crate::transaction::follow_kernel(store, &plan, &BootState::default());
    Ok(Added {
        name: layer.name.clone(),
        digest,
        stats,
    })
}

fn plan_layer(layer: &NewLayer, digest: &str) -> PlanLayer {
    let mut new = PlanLayer::new(layer.name.clone());
    new.title = layer.title.clone();
    new.state = layer.state;
    new.known_good = layer.known_good;
    new.parent = layer.parent.clone();
    new.created = Some(store::now());
    new.digest = Some(digest.to_owned());
    new.notes = layer.notes.clone();
    new.release = layer.release.clone();
    new
}

/// Adds a copy of `source` on top of the stack.
pub fn add_layer(store: &Store, source: &Path, ns: XattrNs, layer: &NewLayer) -> Result<Added> {
    add_built_layer(store, layer, Files::Copy, "add-layer", &mut |_, _, _| {
        read_clean(source, ns)
    })
}

/// Adds the layer `build` returns on top of the stack, in one transaction under the store's
/// lock. `build` sees the plan and boot state the layer goes on, and may set its parent.
pub fn add_built_layer(
    store: &Store,
    layer: &NewLayer,
    files: Files,
    by: &str,
    build: &mut dyn FnMut(&Plan, &BootState, &mut NewLayer) -> Result<Layer>,
) -> Result<Added> {
    let mut change = Transaction::begin(store)?;
    // Said before anything is read or copied.
    change.check_name_free(&layer.name)?;
    change.check_room_for_one()?;
    let mut layer = layer.clone();
    match &layer.parent {
        Some(parent) if change.plan.layer(parent).is_none() => {
            bail!("--parent {parent:?} is not a layer of the plan")
        }
        Some(_) => {}
        None => layer.parent = change.plan.layers.first().map(|l| l.name.clone()),
    }
    let source = build(&change.plan, &change.state, &mut layer)?;
    if files == Files::Copy {
        // Linked files are written already (their builder checked the room first).
        check_room(store, &change.plan, source.tree.content_bytes())?;
    }
    change.claim(&layer.name, by)?;
    let (digest, stats) = stage_and_install(store, &source, &layer.name, files)?;
    change.plan.layers.insert(0, plan_layer(&layer, &digest));
    change.commit()?;
    Ok(Added {
        name: layer.name.clone(),
        digest,
        stats,
    })
}

/// The next boot's stack (names, top first) and its layers, read from their directories:
/// what sync and bundles start from.
fn read_next_stack(
    store: &Store,
    plan: &Plan,
    state: &BootState,
) -> Result<(Vec<String>, Vec<Layer>)> {
    let stack = crate::status::next_boot(store, plan, state).stack;
    ensure!(
        !stack.is_empty(),
        "the next boot's stack is empty, so there is nothing to start from"
    );
    let layers = read_layers(store, &stack)?;
    Ok((stack, layers))
}

/// The next boot's stack (names, top first) and its tree digest, as bundles name trees: what a
/// channel's releases are recognised by. Files hash as their layers' manifests say (read only
/// where a manifest does not match the plan).
pub fn next_boot_tree(store: &Store) -> Result<(Vec<String>, String)> {
    let loaded = store.plan()?;
    if let Some(why) = loaded.fell_back {
        bail!(
            "the plan of {} cannot be read ({why})",
            store.root.display()
        );
    }
    let plan = loaded.value;
    let state = store.state()?;
    let (stack, layers) = read_next_stack(store, &plan, &state)?;
    let view = MergedView::new(&layers);
    let mut known = known_hashes(store, &plan, &stack, &layers);
    let digest = crate::bundle::tree_digest(&view, &mut |rel, node| {
        crate::bundle::hash_by_reading(&view, &mut known, rel, node)
    })?;
    Ok((stack, digest))
}

/// The tree digest of a directory, as bundles name trees.
pub fn tree_of_dir(dir: &Path) -> Result<String> {
    let layer = read_clean(dir, XattrNs::Trusted)?;
    let layers = [layer];
    let view = MergedView::new(&layers);
    let mut known = std::collections::HashMap::new();
    crate::bundle::tree_digest(&view, &mut |rel, node| {
        crate::bundle::hash_by_reading(&view, &mut known, rel, node)
    })
}

fn read_layers(store: &Store, stack: &[String]) -> Result<Vec<Layer>> {
    let roots: Vec<_> = stack.iter().map(|n| store.layer_dir(n)).collect();
    Layer::read_all(&roots, XattrNs::Trusted).context("reading the stack's layers")
}

/// The stack a device whose top layer is `top` runs: `top` and the enabled layers below it in
/// the plan (by default, the next boot's stack), names top first, with their layers read. What
/// a bundle made on a build server's store starts from.
pub fn read_stack_at(store: &Store, top: Option<&str>) -> Result<(Vec<String>, Vec<Layer>)> {
    let loaded = store.plan()?;
    if let Some(why) = loaded.fell_back {
        bail!(
            "the plan of {} cannot be read ({why})",
            store.root.display()
        );
    }
    let plan = loaded.value;
    let Some(top) = top else {
        return read_next_stack(store, &plan, &store.state()?);
    };
    let Some(at) = plan.layers.iter().position(|l| l.name == top) else {
        bail!(
            "the plan of {} has no layer {top:?} (it has: {})",
            store.root.display(),
            plan.layers
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    ensure!(
        plan.layers[at].state.is_enabled(),
        "layer {top:?} is disabled: no stack has it on top"
    );
    let stack: Vec<String> = plan.layers[at..]
        .iter()
        .filter(|l| l.state.is_enabled())
        .map(|l| l.name.clone())
        .collect();
    let layers = read_layers(store, &stack)?;
    Ok((stack, layers))
}

/// The content hashes the manifests of a stack's layers record, by file path on disk, for the
/// files whose size still matches (any other is hashed by reading, as without a manifest).
pub fn known_hashes(
    store: &Store,
    plan: &Plan,
    stack: &[String],
    layers: &[Layer],
) -> std::collections::HashMap<std::path::PathBuf, String> {
    let mut known = std::collections::HashMap::new();
    for (name, layer) in stack.iter().zip(layers) {
        let Some(text) = store.checked_manifest(plan, name) else {
            continue;
        };
        for (rel, (size, hash)) in (Manifest { text }).file_hashes() {
            let same_size = matches!(
                layer.get(&rel),
                Some(Node { kind: Kind::File { size: s, .. }, .. }) if *s == size
            );
            if same_size {
                known.insert(layer.root.join(&rel), hash);
            }
        }
    }
    known
}

/// What `sync` found between the stack and the target.
#[derive(Debug, Clone)]
pub struct Synced {
    /// The stack the layer goes on, top first.
    pub stack: Vec<String>,
    pub delta: DeltaStats,
    /// None when the target already equals the stack: nothing is added.
    pub added: Option<Added>,
}

/// Adds the layer that turns the next boot's stack (read from the layer directories, never
/// from a live root) into `target`, as a trial layer whose parent is that stack's top. With
/// `dry_run` it only compares: the store is not changed.
pub fn sync(
    store: &Store,
    target: &Path,
    compare: Compare,
    layer: &NewLayer,
    dry_run: bool,
) -> Result<Synced> {
    let mut found: Option<(Vec<String>, DeltaStats)> = None;
    let result = add_built_layer(
        store,
        layer,
        Files::Copy,
        "sync",
        &mut |plan, state, layer| {
            // The stack and the target are read at once: on a cold cache the disk serves both.
            let (stack, target_tree) = std::thread::scope(|scope| {
                let target = scope.spawn(|| read_clean(target, XattrNs::Trusted));
                let stack = read_next_stack(store, plan, state);
                (stack, target.join().expect("the target reader panicked"))
            });
            let ((stack, layers), target_tree) = (stack?, target_tree?);
            let view = MergedView::new(&layers);
            let (delta, stats) = delta(&view, &target_tree, compare)
                .with_context(|| format!("comparing {} with the stack", target.display()))?;
            layer.parent = stack.first().cloned();
            found = Some((stack, stats));
            if stats.is_empty() || dry_run {
                bail!(NotAdded);
            }
            Ok(delta)
        },
    );
    let (stack, delta) = found.clone().unwrap_or_default();
    match result {
        Ok(added) => Ok(Synced {
            stack,
            delta,
            added: Some(added),
        }),
        Err(e) if e.is::<NotAdded>() => Ok(Synced {
            stack,
            delta,
            added: None,
        }),
        Err(e) => Err(e),
    }
}

/// The target equals the stack, or this was a dry run.
#[derive(Debug, thiserror::Error)]
#[error("no layer to add")]
struct NotAdded;

/// What applying a bundle did.
#[derive(Debug, Clone)]
pub struct FromBundle {
    pub added: Added,
    /// Names of the trusted keys that signed it (empty: unsigned or unknown signer).
    pub signers: Vec<String>,
}

/// Adds the layer a bundle carries: checks its signature against `keys/` (required when
/// `keys/` holds keys, unless `allow_unsigned`) and its base against the next boot's stack,
/// rebuilds every file (deltas against the stack's files) checking each against its hash, and
/// only then adds the layer, as a trial layer on the stack's top.
pub fn add_bundle(
    store: &Store,
    file: &Path,
    allow_unsigned: bool,
    layer: &NewLayer,
) -> Result<FromBundle> {
    let trusted = crate::keys::trusted(store)?;
    let gate = (!trusted.is_empty() && !allow_unsigned).then_some(trusted.as_slice());
    let bundle = crate::bundle::Bundle::open(file, gate)?;
    ensure!(
        bundle.signatures_valid(),
        "{} has a signature that does not match its manifest: it was changed after signing; nothing was added",
        file.display()
    );
    let signers: Vec<String> = bundle
        .signed_by(&trusted)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if !trusted.is_empty() && signers.is_empty() && !allow_unsigned {
        bail!(
            "{} is not signed by a key in {} ({} trusted); nothing was added (--allow-unsigned to add it anyway)",
            file.display(),
            store.root.join(store::KEYS).display(),
            trusted.len()
        );
    }
    let scratch = store.staging_path("bundle")?;
    let result = add_built_layer(
        store,
        layer,
        Files::Link,
        "bundle",
        &mut |plan, state, layer| {
            let (stack, layers) = read_next_stack(store, plan, state)?;
            let view = MergedView::new(&layers);
            // The stack's files hash as their layers' manifests say (recorded when each layer came
            // in; `verify` checks them), so the base digest reads no file; a file a delta or patch
            // is applied to is checked against its own hash when read.
            let mut known = known_hashes(store, plan, &stack, &layers);
            let base = crate::bundle::tree_digest(&view, &mut |rel, node| {
                crate::bundle::hash_by_reading(&view, &mut known, rel, node)
            })?;
            ensure!(
                base == bundle.manifest.base,
                "{} applies to the tree {}, but the next boot's stack ({}) is {}; nothing was added",
                file.display(),
                bundle.manifest.base,
                stack.join(", "),
                base
            );
            layer.parent = stack.first().cloned();
            // Check the room before writing anything, not after (the rebuilt files are then linked
            // into the layer, not copied).
            let content: u64 = bundle
                .manifest
                .entries
                .iter()
                .filter(|e| e.data.is_some())
                .filter_map(|e| e.size)
                .fold(0, u64::saturating_add);
            check_room(store, plan, content)?;
            fs::create_dir_all(&scratch)
                .with_context(|| format!("creating {}", scratch.display()))?;
            let rebuilt = bundle
                .rebuild(&view, &scratch)
                .with_context(|| format!("rebuilding {}", file.display()))?;
            // Each rebuilt file was hashed as it was written and checked against its entry.
            for entry in &bundle.manifest.entries {
                if let (Some(hash), Some(_)) = (&entry.hash, &entry.data) {
                    let rel = <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                        crate::engine::manifest::unescape(&entry.path),
                    );
                    known.insert(scratch.join(rel), hash.clone());
                }
            }
            // The whole result, metadata included, must be the tree the bundle promises.
            let mut with = vec![rebuilt];
            with.extend(layers);
            let result = MergedView::new(&with);
            // The stack's files were hashed for the base digest, the rebuilt ones as they were
            // written: nothing is read again.
            let target = crate::bundle::tree_digest(&result, &mut |rel, node| {
                crate::bundle::hash_by_reading(&result, &mut known, rel, node)
            })?;
            ensure!(
                target == bundle.manifest.target,
                "{} rebuilt a tree ({target}) other than the one it promises ({}); nothing was added",
                file.display(),
                bundle.manifest.target
            );
            Ok(with.swap_remove(0))
        },
    );
    if let Err(e) = store.remove_staged(&scratch) {
        log::warn!("{e:#}");
    }
    Ok(FromBundle {
        added: result?,
        signers,
    })
}

/// Takes `layer` out of the plan and lets it go (deleted when the change commits and nothing
/// needs it). Never a layer in use, the plan's only layer or its last known-good one; layers
/// built on it, or an archived upper shown over it, stop it unless `force`.
pub fn remove_layer(
    change: &mut Transaction<'_>,
    layer: &str,
    force: bool,
    by: &str,
) -> Result<()> {
    let i = layer_index(&change.plan, layer)?;
    change.store.check_unmounted(layer)?;
    if change.store.in_use(layer)? {
        bail!(
            "can not remove a layer the running system is using: {} is in a mounted stack (the running boot's, or an `overlayctl mount`); disable it and reboot, or unmount it, then remove it",
            layer
        );
    }
    if change.plan.layers.len() == 1 {
        bail!(
            "{} is the only layer of the plan; a plan needs at least one",
            layer
        );
    }
    if change.plan.layers[i].known_good
        && !change
            .plan
            .layers
            .iter()
            .any(|l| l.known_good && l.name != layer)
    {
        bail!(
            "{layer} is the plan's only known-good layer, the fallback a boot reaches when everything else fails; it is never removed, --force or not. Mark another layer known-good first (`overlayctl known-good NAME`)"
        );
    }
    let built_on: Vec<String> = change.plan.layers[..i]
        .iter()
        .filter(|l| l.parent.as_deref() == Some(layer))
        .filter(|l| l.state != LayerState::Disabled)
        .map(|l| l.name.clone())
        .collect();
    let keeping: Vec<&str> = change
        .state
        .archived_uppers
        .iter()
        .filter(|a| {
            change
                .plan
                .current_names(&a.layers)
                .iter()
                .any(|n| n == layer)
        })
        .map(|a| a.id.as_str())
        .collect();
    if !keeping.is_empty() && !force {
        bail!(
            "archived upper {} was used over {layer} and is shown over it; remove it first (`overlayctl remove --upper ID`), or pass --force",
            keeping.join(", ")
        );
    }
    if !built_on.is_empty() && !force {
        bail!(
            "enabled layers were built on {}: {}; remove or disable them first, or pass --force",
            layer,
            built_on.join(", ")
        );
    }
    // Layers that named it as their parent now stand on their own.
    for above in &mut change.plan.layers {
        if above.parent.as_deref() == Some(layer) {
            above.parent = None;
        }
    }
    change.plan.layers.remove(i);
    change.state.last_good.retain(|name| name != layer);
    change.state.trial_tries.remove(layer);
    // Let go in the journal before the plan stops naming it; deleted once nothing needs it.
    change.release(layer, by);
    Ok(())
}

/// What `bundle create` made.
#[derive(Debug, serde::Serialize)]
pub struct BundleMade {
    pub bundle: std::path::PathBuf,
    pub bytes: u64,
    pub whole: u64,
    /// Files sent as binary diffs against a base file.
    pub bsdiff: u64,
    /// gzip files sent as their content, compressed again on the device.
    pub gzip: u64,
    pub unchanged: u64,
    /// zstd frames in the payload.
    pub parts: u64,
    pub added: u64,
    pub changed: u64,
    pub metadata: u64,
    pub deleted: u64,
    pub signed: bool,
}

/// Writes to `output` the bundle that turns `from` (a tree, or a store's stack topped by
/// `from_layer`) into the tree `to`, signed with the secret key in the file `sign`.
pub fn make_bundle(
    from: &Path,
    from_layer: Option<&str>,
    to: &Path,
    output: &Path,
    sign: Option<&Path>,
) -> Result<BundleMade> {
    let key = match sign {
        Some(path) => {
            let text =
                fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(
                crate::bundle::parse_secret(&text)
                    .with_context(|| format!("reading {}", path.display()))?,
            )
        }
        None => None,
    };
    let plan_file = layers_store::layout::PLAN_FILE;
    let from_store = from.join(plan_file).is_file();
    ensure!(
        from_store || from_layer.is_none(),
        "--from-layer needs --from to be a store (a directory with {plan_file}); {} is a tree",
        from.display()
    );
    ensure!(
        !to.join(plan_file).is_file(),
        "{} is a Strata store; --to takes the new system as a plain tree",
        to.display()
    );
    // The two trees are read at once.
    let (old, new) = std::thread::scope(|scope| {
        let new = scope.spawn(|| read_clean(to, XattrNs::Trusted));
        let old = if from_store {
            Store::open(from)
                .and_then(|store| read_stack_at(&store, from_layer))
                .map(|(_, layers)| layers)
        } else {
            read_clean(from, XattrNs::Trusted).map(|layer| vec![layer])
        };
        (old, new.join().expect("a tree reader panicked"))
    });
    let (old, new) = (old?, new?);
    let made = crate::bundle::create(&MergedView::new(&old), &new, output, key.as_ref())?;
    let d = made.delta;
    Ok(BundleMade {
        bundle: output.to_owned(),
        bytes: made.size,
        whole: made.whole,
        bsdiff: made.bsdiff,
        gzip: made.gzip,
        unchanged: made.unchanged,
        parts: made.parts,
        added: d.added,
        changed: d.changed,
        metadata: d.metadata,
        deleted: d.deleted,
        signed: key.is_some(),
    })
}

/// What `bundle info` and `bundle verify` show.
#[derive(Debug, serde::Serialize)]
pub struct BundleInfo {
    pub bundle: std::path::PathBuf,
    pub bytes: u64,
    pub base: String,
    pub target: String,
    pub entries: usize,
    pub files: usize,
    pub bsdiff: usize,
    pub gzip: usize,
    pub unchanged: usize,
    pub parts: usize,
    pub signatures: usize,
    /// The store's trusted keys that signed it.
    pub trusted_signers: Vec<String>,
}

/// Reads a bundle's head and checks its signatures against the store at `root` (when it is
/// one); with `whole`, every whole file's hash too.
pub fn describe_bundle(root: &Path, file: &Path, whole: bool) -> Result<BundleInfo> {
    let bundle = crate::bundle::Bundle::open(file, None)?;
    // Bundles are described on any machine; the signers are named when a store trusts them.
    let trusted = Store::open(root)
        .and_then(|store| crate::keys::trusted(&store))
        .unwrap_or_default();
    ensure!(
        bundle.signatures_valid(),
        "{}: a signature does not match the manifest (changed after signing)",
        file.display()
    );
    if whole {
        bundle.check_whole_files()?;
    }
    let m = &bundle.manifest;
    let encoded = |how: &str| {
        m.entries
            .iter()
            .filter(|e| e.data.as_ref().is_some_and(|d| d.encoding == how))
            .count()
    };
    Ok(BundleInfo {
        bundle: file.to_owned(),
        bytes: fs::metadata(file)
            .with_context(|| format!("reading {}", file.display()))?
            .len(),
        base: m.base.clone(),
        target: m.target.clone(),
        entries: m.entries.len(),
        files: m.entries.iter().filter(|e| e.data.is_some()).count(),
        bsdiff: encoded("bsdiff"),
        gzip: m
            .entries
            .iter()
            .filter(|e| e.data.as_ref().is_some_and(|d| d.gzip.is_some()))
            .count(),
        unchanged: encoded("basis"),
        parts: m.parts.len(),
        signatures: bundle.signatures.len(),
        trusted_signers: bundle
            .signed_by(&trusted)
            .into_iter()
            .map(str::to_owned)
            .collect(),
    })
}
