//! `overlayctl pull`: an image's layers into the store, each a layer in image order (or all
//! merged into one with `--squash`), so that the next boot's stack is the image.
//!
//! Layers the store already holds (a layer whose plan entry records the same `diff_id`, in the
//! same order from the bottom) are kept and not fetched again. The new layers go on top as one
//! change: unpacked under `staging/`, each checked against its digests, and only when all are
//! good claimed, moved into `layers/` and named in the plan. Each new layer supersedes the
//! layers of the next boot's stack the image does not have, so leaving the new layers out
//! (trial boots that ran out, the menu) brings the old stack back whole (docs/oci.md).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use layers_spec::{BootState, Layer as PlanLayer, LayerState, Plan};

use super::image::{Image, ImageLayer, Source};
use super::layer::{Unpacked, unpack};
use crate::engine::compact::{Below, compact};
use crate::engine::copy::{Linking, link_layer};
use crate::engine::{Layer, XattrNs};
use crate::install::{install, write_synced};
use crate::store::{self, Store};
use crate::transaction::Transaction;

/// How the pulled layers are named and taken.
#[derive(Debug, Clone)]
pub struct Request {
    /// The new layer's name (with `--squash`, or an image of one new layer); `NAME-K` for the
    /// image's K-th layer otherwise. Default: the image's short name and the layer's digest.
    pub name: Option<String>,
    /// What names start with when no name is given: the repository's last part, say.
    pub short_name: String,
    pub title: Option<String>,
    pub squash: bool,
    pub state: LayerState,
    pub notes: Option<String>,
    /// The channel release the layers come with (`overlayctl update`).
    pub release: Option<String>,
}

/// One layer the pull brought in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Added {
    pub name: String,
    pub diff_id: Option<String>,
    pub title: Option<String>,
    pub digest: String,
    /// Bytes read from the source (compressed).
    pub blob_bytes: u64,
    pub file_bytes: u64,
    pub entries: u64,
}

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    pub source: String,
    /// The image manifest's digest, when it has one.
    pub image: Option<String>,
    /// The image's layers the store held already, bottom first.
    pub held: Vec<String>,
    /// The layers added, bottom first.
    pub added: Vec<Added>,
    /// The layers of the stack before that the image's new layers stand in for.
    pub superseded: Vec<String>,
    /// The next boot's stack, top first.
    pub stack: Vec<String>,
}

/// The image layers the plan holds, bottom first: the longest run from the image's bottom
/// whose layers are in the plan in image order (each above the one before), present on disk.
pub fn held(store: &Store, plan: &Plan, image: &Image) -> Vec<String> {
    let mut held = Vec::new();
    // Plan index of the last match; the next must be above it (a smaller index).
    let mut below = plan.layers.len();
    for layer in &image.layers {
        let found = plan.layers[..below]
            .iter()
            .enumerate()
            .rev()
            .find(|(_, l)| l.diff_id.as_deref() == Some(&layer.diff_id));
        match found {
            Some((i, l)) if store.layer_present(&l.name) => {
                held.push(l.name.clone());
                below = i;
            }
            _ => break,
        }
    }
    held
}

/// The manifest of an unpacked layer (digest and text), its files' hashes taken from the
/// unpacking where it gave them.
fn manifest_known(
    dir: &Path,
    known: &std::collections::HashMap<PathBuf, String>,
) -> Result<(String, String)> {
    let layer = Layer::read(dir, XattrNs::Trusted)
        .with_context(|| format!("reading back {}", dir.display()))?;
    let manifest =
        crate::engine::Manifest::of_layer_with(&layer, &mut |rel| match known.get(rel) {
            Some(hash) => Ok(hash.clone()),
            None => crate::engine::manifest::hash_file(&dir.join(rel)),
        })
        .with_context(|| format!("hashing {}", dir.display()))?;
    Ok((manifest.digest(), manifest.text))
}

/// A layer unpacked under `staging/`, not yet in the store.
struct Staged {
    dir: PathBuf,
    unpacked: Unpacked,
}

/// Removes what a failed pull left under `staging/`.
fn clean(store: &Store, staged: &[PathBuf]) {
    for dir in staged {
        if dir.exists()
            && let Err(e) = store.remove_staged(dir)
        {
            log::warn!("{e:#}");
        }
    }
}

/// Unpacks `layer` from `source` to a fresh directory under `staging/` over `lowers` (top
/// first), checking its digests. The directory is pushed to `made` before anything is written.
fn unpack_layer(
    store: &Store,
    plan: &Plan,
    source: &mut dyn Source,
    layer: &ImageLayer,
    position: usize,
    lowers: &[PathBuf],
    made: &mut Vec<PathBuf>,
) -> Result<Staged> {
    let dir = store.staging_path(&format!("oci-{position}"))?;
    made.push(dir.clone());
    let what = format!("layer {position} ({})", layer.diff_id);
    let min_free = plan.policy.min_free;
    let mut room = |_written: u64| -> Result<()> {
        let free = crate::ops::free_bytes(store)?;
        ensure!(
            free >= min_free.0,
            "not enough room in {}: {} free, and policy.min_free keeps {min_free}",
            store.root.display(),
            layers_spec::ByteSize(free)
        );
        Ok(())
    };
    // A blob is parsed only once it is known to be the one the manifest names.
    if let Some(descriptor) = layer.blob.as_ref().filter(|_| !source.checks_blobs()) {
        let blob = source
            .open_layer(layer)
            .with_context(|| format!("reading {what}"))?;
        let (size, digest) = super::registry::hash_stream(blob, descriptor.size)
            .with_context(|| format!("reading {what}"))?;
        ensure!(
            size == descriptor.size && digest == descriptor.digest,
            "{what}: the blob is {}{size} bytes with digest {digest}, not {} bytes with digest {} as the manifest says: it was changed or damaged; nothing was added",
            if size > descriptor.size { "over " } else { "" },
            descriptor.size,
            descriptor.digest
        );
    }
    let blob = source
        .open_layer(layer)
        .with_context(|| format!("reading {what}"))?;
    let unpacked =
        unpack(blob, &dir, lowers, &mut room).with_context(|| format!("unpacking {what}"))?;
    if let Some(descriptor) = &layer.blob {
        ensure!(
            unpacked.blob_bytes == descriptor.size && unpacked.blob_digest == descriptor.digest,
            "{what}: the blob read is {} bytes with digest {}, not {} bytes with digest {} as the manifest says: it was changed or damaged",
            unpacked.blob_bytes,
            unpacked.blob_digest,
            descriptor.size,
            descriptor.digest
        );
    }
    ensure!(
        unpacked.diff_id == layer.diff_id,
        "{what}: its tar has the digest {}, not the diff_id {} the image's config says: it was changed or damaged",
        unpacked.diff_id,
        layer.diff_id
    );
    Ok(Staged { dir, unpacked })
}

/// The layers of `image` the plan does not hold, unpacked (or, with `squash`, all of them
/// merged into one) under `staging/`, bottom first; `below` are the held layers' directories,
/// top first. On failure everything staged is removed.
fn stage(
    store: &Store,
    plan: &Plan,
    source: &mut dyn Source,
    image: &Image,
    held: &[String],
    squash: bool,
) -> Result<Vec<Staged>> {
    let below: Vec<PathBuf> = held.iter().rev().map(|n| store.layer_dir(n)).collect();
    let mut made = Vec::new();
    let result = (|| {
        let mut staged: Vec<Staged> = Vec::new();
        for (i, layer) in image.layers.iter().enumerate().skip(held.len()) {
            let mut lowers: Vec<PathBuf> = staged.iter().rev().map(|s| s.dir.clone()).collect();
            lowers.extend(below.iter().cloned());
            let one = unpack_layer(store, plan, source, layer, i + 1, &lowers, &mut made)?;
            staged.push(one);
        }
        if squash {
            staged = vec![merge(store, staged, &mut made)?];
        }
        Ok(staged)
    })();
    if result.is_err() {
        clean(store, &made);
    }
    result
}

/// The image's layers (bottom first) merged into one, as its merged view shows it: no
/// whiteouts, nothing below. The files are hard-linked from the unpacked layers, which are
/// then removed.
fn merge(store: &Store, staged: Vec<Staged>, made: &mut Vec<PathBuf>) -> Result<Staged> {
    let roots: Vec<PathBuf> = staged.iter().rev().map(|s| s.dir.clone()).collect();
    let layers =
        Layer::read_all(&roots, XattrNs::Trusted).context("reading the unpacked layers")?;
    let below = Below::open(&[], XattrNs::Trusted).context("opening nothing below")?;
    let merged = compact(&layers, &below);
    let dir = store.staging_path("oci-image")?;
    made.push(dir.clone());
    link_layer(
        &merged.tree,
        &roots,
        &|rel| merged.sources[rel],
        Linking::Checked,
        dir.parent().expect("staging paths have a parent"),
        dir.file_name().expect("staging paths have a name"),
    )
    .context("merging the image's layers into one")?;
    let mut unpacked = Unpacked::default();
    for one in &staged {
        unpacked.blob_bytes += one.unpacked.blob_bytes;
        unpacked.tar_bytes += one.unpacked.tar_bytes;
    }
    unpacked.entries = merged.stats.entries;
    unpacked.file_bytes = merged.tree.content_bytes();
    for one in staged {
        store.remove_staged(&one.dir)?;
    }
    Ok(Staged { dir, unpacked })
}

/// A name no layer, claim or directory has: `wanted`, or `wanted-2`, `wanted-3`, …
fn free_name(change: &Transaction<'_>, wanted: &str, taken: &HashSet<String>) -> Result<String> {
    for n in 1..1000 {
        let name = if n == 1 {
            wanted.to_owned()
        } else {
            format!("{wanted}-{n}")
        };
        if !taken.contains(&name) && change.check_name_free(&name).is_ok() {
            return Ok(name);
        }
    }
    bail!("no free layer name starting with {wanted:?}")
}

/// The short part of a digest for a name: its first 12 hex digits.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// Pulls `source`'s image into the store at `root`: see the module's comment.
pub fn pull(store: &Store, source: &mut dyn Source, request: &Request) -> Result<Pulled> {
    let image = source.image()?;
    ensure!(
        !image.layers.is_empty(),
        "{} has no layers",
        source.describe()
    );
    // Downloads before the store is locked (what is held is judged again under the lock).
    if let Ok(loaded) = store.plan()
        && loaded.fell_back.is_none()
    {
        let held = if request.squash {
            0
        } else {
            held(store, &loaded.value, &image).len()
        };
        source.prefetch(&image.layers[held..])?;
    }
    let mut change = Transaction::begin(store)?;
    let held = if request.squash {
        Vec::new()
    } else {
        held(store, &change.plan, &image)
    };
    let held_count = held.len();
    let before = crate::status::next_boot(store, &change.plan, &change.state).stack;
    if held_count == image.layers.len() {
        let wanted: Vec<String> = held.iter().rev().cloned().collect();
        if before == wanted {
            return Ok(Pulled {
                source: source.describe(),
                image: image.digest.clone(),
                held,
                added: Vec::new(),
                superseded: Vec::new(),
                stack: before,
            });
        }
        bail!(
            "the store holds all of the image's layers ({}), but the next boot's stack is {}; nothing was changed (choose it with `overlayctl rollback --to {}` or enable its layers)",
            held.join(", "),
            before.join(", "),
            held.last().expect("an image has layers")
        );
    }
    let new_count = if request.squash {
        1
    } else {
        image.layers.len() - held_count
    };
    ensure!(
        change.plan.layers.len() + new_count <= layers_spec::plan::MAX_STACK as usize,
        "the plan has {} layers and the image brings {new_count}: more than a stack can have ({}); compact or remove some first; nothing was changed",
        change.plan.layers.len(),
        layers_spec::plan::MAX_STACK
    );
    let staged = stage(store, &change.plan, source, &image, &held, request.squash)?;
    let dirs: Vec<PathBuf> = staged.iter().map(|s| s.dir.clone()).collect();
    let result = commit(&mut change, &image, &held, staged, &before, request);
    if result.is_err() {
        clean(store, &dirs);
    }
    let (added, superseded) = result?;
    let committed = change.commit()?;
    if let Err(e) = source.done() {
        log::warn!("{e:#}");
    }
    Ok(Pulled {
        source: source.describe(),
        image: image.digest,
        held,
        added,
        superseded,
        stack: crate::status::next_boot(store, &committed.plan, &committed.state).stack,
    })
}

/// Names, claims and installs the staged layers and puts them in the plan (bottom first, each
/// on the one before).
fn commit(
    change: &mut Transaction<'_>,
    image: &Image,
    held: &[String],
    staged: Vec<Staged>,
    before: &[String],
    request: &Request,
) -> Result<(Vec<Added>, Vec<String>)> {
    let store = change.store;
    let keep: HashSet<&str> = held.iter().map(String::as_str).collect();
    let superseded: Vec<String> = before
        .iter()
        .filter(|n| !keep.contains(n.as_str()))
        .cloned()
        .collect();
    let mut taken = HashSet::new();
    let mut names = Vec::new();
    for (k, _) in staged.iter().enumerate() {
        let position = held.len() + k;
        let wanted = match (&request.name, request.squash || staged.len() == 1) {
            (Some(name), true) => name.clone(),
            (Some(name), false) => format!("{name}-{}", position + 1),
            (None, _) if request.squash => format!(
                "{}-{}",
                request.short_name,
                short(
                    image
                        .digest
                        .as_deref()
                        .unwrap_or(&image.layers[image.layers.len() - 1].diff_id)
                )
            ),
            (None, _) => format!(
                "{}-{}",
                request.short_name,
                short(&image.layers[position].diff_id)
            ),
        };
        if request.name.is_some() {
            // A name asked for is that name or an error.
            change.check_name_free(&wanted)?;
            names.push(wanted.clone());
            taken.insert(wanted);
        } else {
            let name = free_name(change, &wanted, &taken)?;
            taken.insert(name.clone());
            names.push(name);
        }
    }

    let mut added = Vec::new();
    let mut parent = held.last().cloned();
    for (k, (one, name)) in staged.into_iter().zip(&names).enumerate() {
        let image_layer = (!request.squash).then(|| &image.layers[held.len() + k]);
        let (digest, text) = manifest_known(&one.dir, &one.unpacked.hashes)?;
        let staged_manifest = one.dir.with_extension("manifest");
        write_synced(&staged_manifest, text.as_bytes())?;
        change.claim(name, "pull")?;
        install(store, &one.dir, &staged_manifest, name)?;
        let mut layer = PlanLayer::new(name.clone());
        layer.title = request
            .title
            .clone()
            .filter(|_| request.squash || names.len() == 1)
            .or_else(|| image_layer.and_then(|l| l.title.clone()));
        layer.state = request.state;
        layer.parent = parent.clone();
        layer.created = Some(store::now());
        layer.digest = Some(digest.clone());
        layer.notes = request.notes.clone();
        layer.diff_id = image_layer.map(|l| l.diff_id.clone());
        layer.supersedes = superseded.clone();
        layer.release = request.release.clone();
        change.plan.layers.insert(0, layer);
        parent = Some(name.clone());
        added.push(Added {
            name: name.clone(),
            diff_id: image_layer.map(|l| l.diff_id.clone()),
            title: change.plan.layers[0].title.clone(),
            digest,
            blob_bytes: one.unpacked.blob_bytes,
            file_bytes: one.unpacked.file_bytes,
            entries: one.unpacked.entries,
        });
    }
    // A held layer left out (disabled, say) is part of the image: taken again.
    for name in held {
        if let Some(layer) = change.plan.layer_mut(name)
            && layer.state == LayerState::Disabled
        {
            layer.set_state(request.state, None);
            change.state.trial_tries.remove(name);
        }
    }
    Ok((added, superseded))
}

/// A new store at `root` from `source`'s image: each layer (or the image merged into one with
/// `squash`) a layer, active; the bottom one known-good.
pub fn init(root: &Path, source: &mut dyn Source, request: &Request) -> Result<Pulled> {
    let image = source.image()?;
    ensure!(
        !image.layers.is_empty(),
        "{} has no layers",
        source.describe()
    );
    ensure!(
        !root.join(layers_store::layout::PLAN_FILE).exists(),
        "{} is a store already; pull into it with `overlayctl pull`",
        root.display()
    );
    let existed = root.exists();
    // Downloads before the store is made (into its downloads/, which a failure keeps); only
    // into a directory that is new, empty, or holds only such downloads.
    if existed {
        let names: Vec<_> = std::fs::read_dir(root)
            .with_context(|| format!("reading {}", root.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", root.display()))?;
        ensure!(
            names.iter().all(|n| n == crate::fetch::DOWNLOADS),
            "{} exists and is not empty; a new store needs an empty or new directory",
            root.display()
        );
        let downloads = root.join(crate::fetch::DOWNLOADS);
        ensure!(
            std::fs::symlink_metadata(&downloads).map_or(true, |m| m.file_type().is_dir()),
            "{} is not a directory (a symlink?); nothing was done",
            downloads.display()
        );
    }
    source.prefetch(&image.layers)?;
    let store = Store::create(root)?;
    let result = (|| {
        // The plan must exist for a transaction: a base is needed first, so the store is made
        // here by hand, under its lock, as `init --base` does.
        let _lock = store.lock()?;
        let plan = Plan::new(Vec::new());
        let staged = stage(&store, &plan, source, &image, &[], request.squash)?;
        let count = staged.len();
        let mut layers = Vec::new();
        let mut added = Vec::new();
        let mut parent: Option<String> = None;
        for (k, one) in staged.into_iter().enumerate() {
            let image_layer = (!request.squash).then(|| &image.layers[k]);
            let name = match (&request.name, count) {
                (Some(name), 1) => name.clone(),
                (Some(name), _) => format!("{name}-{}", k + 1),
                (None, _) => format!(
                    "{}-{}",
                    request.short_name,
                    short(match image_layer {
                        Some(l) => &l.diff_id,
                        None => image.digest.as_deref().unwrap_or(&image.layers[0].diff_id),
                    })
                ),
            };
            layers_spec::check_name(&name)
                .map_err(|p| anyhow!("layer name {name:?} is not valid: {p}"))?;
            ensure!(
                !layers.iter().any(|l: &PlanLayer| l.name == name),
                "the image has two layers named {name:?}; give --name"
            );
            let (digest, text) = manifest_known(&one.dir, &one.unpacked.hashes)?;
            let staged_manifest = one.dir.with_extension("manifest");
            write_synced(&staged_manifest, text.as_bytes())?;
            install(&store, &one.dir, &staged_manifest, &name)?;
            let mut layer = PlanLayer::new(name.clone());
            layer.title = request
                .title
                .clone()
                .filter(|_| count == 1)
                .or_else(|| image_layer.and_then(|l| l.title.clone()));
            layer.parent = parent.clone();
            layer.created = Some(store::now());
            layer.digest = Some(digest.clone());
            layer.notes = request.notes.clone();
            layer.diff_id = image_layer.map(|l| l.diff_id.clone());
            layer.known_good = k == 0;
            added.push(Added {
                name: name.clone(),
                diff_id: layer.diff_id.clone(),
                title: layer.title.clone(),
                digest,
                blob_bytes: one.unpacked.blob_bytes,
                file_bytes: one.unpacked.file_bytes,
                entries: one.unpacked.entries,
            });
            layers.insert(0, layer);
            parent = Some(name);
        }
        let plan = Plan::new(layers);
        store.save_plan(&plan)?;
        crate::transaction::follow_kernel(&store, &plan, &BootState::default());
        Ok((added, plan))
    })();
    match result {
        Ok((added, plan)) => {
            if let Err(e) = source.done() {
                log::warn!("{e:#}");
            }
            Ok(Pulled {
                source: source.describe(),
                image: image.digest,
                held: Vec::new(),
                stack: plan.layers.iter().map(|l| l.name.clone()).collect(),
                added,
                superseded: Vec::new(),
            })
        }
        Err(e) => {
            // Everything in it is this command's: the directory was new or had no plan. What
            // was downloaded stays, for the next try to resume.
            crate::ops::clear_new_store_keeping(&store, root, existed, true);
            Err(e)
        }
    }
}
