//! Bringing a built layer into the store: its files copied or linked under `staging/`, its
//! manifest written beside it, both renamed into `layers/` and `manifests/` and flushed.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::engine::copy::{CopyStats, Linking, copy_layer, link_layer};
use crate::engine::{Layer, Manifest, XattrNs};
use crate::store::{Folder, Store};

/// How a built layer's files reach the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    /// Copied from the layer's root (a tree outside the store).
    Copy,
    /// Hard-linked from the layer's root: work of ours under `staging/` whose files already
    /// carry their metadata (a rebuilt bundle), so nothing is written twice.
    Link,
}

/// Copies (or links) `layer` into `staging/`, writes its manifest beside it, and renames both
/// into place. Returns the digest.
pub(crate) fn stage_and_install(
    store: &Store,
    layer: &Layer,
    name: &str,
    files: Files,
) -> Result<(String, CopyStats)> {
    let staged = store.staging_path(name)?;
    let staging = staged.parent().expect("staging paths have a parent");
    let staged_name = staged.file_name().expect("staging paths have a name");
    let stats = match files {
        Files::Copy => copy_layer(layer, staging, staged_name),
        Files::Link => link_layer(
            &layer.tree,
            std::slice::from_ref(&layer.root),
            &|_| 0,
            Linking::Files,
            staging,
            staged_name,
        ),
    }
    .with_context(|| format!("copying {} into the store", layer.root.display()))?;
    let (digest, manifest_text) = manifest_of(&staged)?;
    let staged_manifest = staged.with_extension("manifest");
    write_synced(&staged_manifest, manifest_text.as_bytes())?;
    install(store, &staged, &staged_manifest, name)?;
    Ok((digest, stats))
}

pub(crate) fn manifest_of(dir: &Path) -> Result<(String, String)> {
    let copy = Layer::read(dir, XattrNs::Trusted)
        .with_context(|| format!("reading back {}", dir.display()))?;
    let manifest =
        Manifest::of_layer(&copy).with_context(|| format!("hashing {}", dir.display()))?;
    Ok((manifest.digest(), manifest.text))
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file =
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Renames a staged layer and its manifest into `layers/` and `manifests/`, durably.
pub(crate) fn install(
    store: &Store,
    staged: &Path,
    staged_manifest: &Path,
    name: &str,
) -> Result<()> {
    install_manifest(store, staged_manifest, name)?;
    move_in(store, staged, Folder::Layers, name)
}

/// Renames `staged` (an entry of `staging/`) to `name` in `folder`, through both folders'
/// handles (each a real directory of the store), never over something there; flushed.
fn move_in(store: &Store, staged: &Path, folder: Folder, name: &str) -> Result<()> {
    let staging = store.folder(Folder::Staging)?;
    let to = store.folder(folder)?;
    let staged_name = staged
        .file_name()
        .filter(|_| staged.parent() == Some(staging.path()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not in {}",
                staged.display(),
                staging.path().display()
            )
        })?;
    staging
        .rename_to(staged_name, &to, name)
        .with_context(|| format!("moving it to {}", to.child_path(name).display()))?;
    to.sync()?;
    Ok(())
}

/// Renames a staged manifest into `manifests/`, durably.
pub(crate) fn install_manifest(store: &Store, staged_manifest: &Path, name: &str) -> Result<()> {
    move_in(store, staged_manifest, Folder::Manifests, name)
}
