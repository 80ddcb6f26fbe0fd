//! Update channels: a signed index of releases that a fleet follows with `overlayctl update`.
//!
//! The index (JSON, written by the build server and signed with `overlayctl channel sign`)
//! lists releases oldest first. Each names the tree it makes (the digest bundles name trees
//! by), the bundles that reach it from older trees, a full image for devices no bundle starts
//! from, the share of the fleet it is rolled out to, and whether it was pulled back. A device
//! finds its release by its next boot's tree, takes the newest release that is not pulled back
//! when a hash of its machine id falls within the rollout, by the bundle that starts from its
//! tree or else the image, as a trial layer; a device on a pulled-back release leaves that
//! release's layers out, which brings back what it had before (docs/oci.md).

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use layers_spec::LayerState;
use serde::{Deserialize, Serialize};

use crate::store::{Folder, Store};

/// The most a channel document may be.
const MAX_CHANNEL: u64 = 1 << 20;
/// What a channel signature signs, before the index's bytes.
const SIGNING_CONTEXT: &[u8] = b"strata-channel-v1\0";
/// The newest serial seen, kept in the store's `state/`.
const SEEN_FILE: &str = "channel.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// The channel's name (`stable`, `beta`).
    pub channel: String,
    /// Grows with every publication: a device refuses an index older than one it has seen.
    pub serial: u64,
    /// Oldest first.
    pub releases: Vec<Release>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Also the name of the layer it adds.
    pub name: String,
    /// The tree digest of the release's whole system (`blake3:…`, as `overlayctl channel
    /// tree` and a bundle's target give it).
    pub tree: String,
    /// Bundles that reach it, each from an older tree.
    #[serde(default)]
    pub bundles: Vec<BundleFrom>,
    /// The whole image, for a device no bundle starts from (as `overlayctl pull` names one).
    #[serde(default)]
    pub image: Option<String>,
    /// The share of devices that take it, in percent.
    #[serde(default = "all")]
    pub rollout: u8,
    /// Pulled back: devices leave it out.
    #[serde(default)]
    pub pulled: bool,
}

fn all() -> u8 {
    100
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleFrom {
    /// The tree digest the bundle applies to.
    pub from: String,
    /// A file, an http(s) URL or a registry's REGISTRY/REPO:TAG.
    pub bundle: String,
}

/// The signed document a channel is served as.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    /// The index's JSON, base64.
    index: String,
    signatures: Vec<SignatureEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureEntry {
    key: String,
    signature: String,
}

impl Index {
    /// Refuses an index a device could be misled by, naming the release.
    pub fn check(&self) -> Result<()> {
        let mut names = HashSet::new();
        for r in &self.releases {
            layers_spec::check_name(&r.name)
                .map_err(|p| anyhow!("release name {:?} is not valid: {p}", r.name))?;
            ensure!(
                names.insert(&r.name),
                "release {:?} is listed twice",
                r.name
            );
            ensure!(
                layers_spec::plan::is_valid_digest(&r.tree),
                "release {:?} has the tree {:?}; a tree is `blake3:` and 64 hex digits",
                r.name,
                r.tree
            );
            ensure!(
                r.rollout <= 100,
                "release {:?} has a rollout of {}%",
                r.name,
                r.rollout
            );
            for b in &r.bundles {
                ensure!(
                    layers_spec::plan::is_valid_digest(&b.from),
                    "release {:?} has a bundle from {:?}; a tree is `blake3:` and 64 hex digits",
                    r.name,
                    b.from
                );
            }
        }
        Ok(())
    }
}

/// Wraps the index in `index_file` (JSON) into a signed channel document.
pub fn sign(index_file: &Path, key_file: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(index_file).with_context(|| format!("reading {}", index_file.display()))?;
    let index: Index = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a channel index", index_file.display()))?;
    index
        .check()
        .with_context(|| format!("checking {}", index_file.display()))?;
    let key_text = std::fs::read_to_string(key_file)
        .with_context(|| format!("reading {}", key_file.display()))?;
    let key: SigningKey = crate::bundle::parse_secret(&key_text)
        .with_context(|| format!("reading the key {}", key_file.display()))?;
    let signature = key.sign(&[SIGNING_CONTEXT, &bytes].concat());
    let b64 = base64::engine::general_purpose::STANDARD;
    let envelope = Envelope {
        index: b64.encode(&bytes),
        signatures: vec![SignatureEntry {
            key: b64.encode(key.verifying_key().as_bytes()),
            signature: b64.encode(signature.to_bytes()),
        }],
    };
    Ok(serde_json::to_vec_pretty(&envelope)?)
}

/// A channel read and checked: its index and the trusted keys that signed it.
#[derive(Debug)]
pub struct Followed {
    pub index: Index,
    pub signers: Vec<String>,
}

/// Reads the channel at `location` (an http(s) URL, a registry's REGISTRY/REPO:TAG as `channel
/// push` stored it, or a file) and checks it is signed by a key in `trusted` (unless
/// `allow_unsigned`). A registry's download goes through `downloads`.
pub fn read(
    location: &str,
    trusted: &[(String, VerifyingKey)],
    allow_unsigned: bool,
    access: &crate::oci::registry::Access,
    downloads: &Path,
) -> Result<Followed> {
    let mut bytes = Vec::new();
    if let Some(reference) = crate::oci::registry::Reference::explicit(location) {
        let mut registry = crate::oci::registry::Registry::new(reference, access, downloads)?;
        let file = registry.pull_channel()?;
        let read = std::fs::read(&file).with_context(|| format!("reading {}", file.display()));
        crate::oci::image::Source::done(&mut registry)?;
        bytes = read?;
    } else if crate::fetch::is_url(location) {
        let response = ureq::get(location)
            .call()
            .with_context(|| format!("fetching the channel {location}"))?;
        response
            .into_body()
            .into_reader()
            .take(MAX_CHANNEL + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("fetching the channel {location}"))?;
    } else {
        std::fs::File::open(location)
            .and_then(|f| f.take(MAX_CHANNEL + 1).read_to_end(&mut bytes))
            .with_context(|| format!("reading the channel {location}"))?;
    }
    ensure!(
        bytes.len() as u64 <= MAX_CHANNEL,
        "the channel {location} is over {MAX_CHANNEL} bytes"
    );
    let envelope: Envelope = serde_json::from_slice(&bytes)
        .with_context(|| format!("{location} is not a signed channel document"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let index_bytes = b64
        .decode(&envelope.index)
        .with_context(|| format!("{location}: the index is not base64"))?;
    let message = [SIGNING_CONTEXT, &index_bytes].concat();
    let mut signers = Vec::new();
    for entry in &envelope.signatures {
        let key = b64
            .decode(&entry.key)
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .and_then(|k| VerifyingKey::from_bytes(&k).ok())
            .ok_or_else(|| anyhow!("{location}: a signature's key is not an ed25519 key"))?;
        let signature = b64
            .decode(&entry.signature)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
            .map(|s| Signature::from_bytes(&s))
            .ok_or_else(|| anyhow!("{location}: a signature is not an ed25519 signature"))?;
        ensure!(
            key.verify_strict(&message, &signature).is_ok(),
            "{location}: a signature does not match the index: it was changed after signing"
        );
        if let Some((name, _)) = trusted.iter().find(|(_, t)| *t == key) {
            signers.push(name.clone());
        }
    }
    ensure!(
        !signers.is_empty() || allow_unsigned,
        "{location} is not signed by a trusted key ({} trusted in keys/); nothing was changed",
        trusted.len()
    );
    let index: Index = serde_json::from_slice(&index_bytes)
        .with_context(|| format!("{location}: the index is not what it should be"))?;
    index
        .check()
        .with_context(|| format!("checking {location}"))?;
    Ok(Followed { index, signers })
}

/// Whether a device with this machine id takes `release` (rolled out to `rollout` percent):
/// the first 8 bytes of blake3 of `MACHINE-ID:CHANNEL:RELEASE`, little-endian, modulo 100, is
/// below the rollout. Stable for a device and a release, independent across releases.
pub fn in_rollout(machine_id: &str, channel: &str, release: &str, rollout: u8) -> bool {
    let hash = blake3::hash(format!("{machine_id}:{channel}:{release}").as_bytes());
    let bucket = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")) % 100;
    bucket < u64::from(rollout)
}

/// This machine's id (`/etc/machine-id`), checked.
pub fn machine_id(given: Option<&str>) -> Result<String> {
    let id = match given {
        Some(id) => id.to_owned(),
        None => std::fs::read_to_string("/etc/machine-id")
            .context("reading /etc/machine-id (give one with --machine-id)")?
            .trim()
            .to_owned(),
    };
    ensure!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "the machine id {id:?} is not 32 hex digits"
    );
    Ok(id.to_ascii_lowercase())
}

/// What `update` found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Updated {
    pub channel: String,
    pub serial: u64,
    /// The release the device ran (by its next boot's tree), if the channel knows it.
    pub from: Option<String>,
    /// Pulled-back releases whose layers were left out.
    pub rolled_back: Vec<String>,
    /// The release taken, or that would be with --check.
    pub to: Option<String>,
    /// `bundle` or `image`.
    pub by: Option<String>,
    /// What the device did (or would do), in a sentence.
    pub said: String,
    /// Whether the store changed.
    pub changed: bool,
}

/// How `update` runs.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    pub channel: &'a str,
    pub check: bool,
    pub machine_id: Option<&'a str>,
    pub allow_unsigned: bool,
    pub access: crate::oci::registry::Access,
}

/// The newest serial this store took, from `state/channel.json`.
fn seen_serial(store: &Store, channel: &str) -> Result<Option<u64>> {
    let dir = store.folder(Folder::State)?;
    let Some(bytes) = dir.read(SEEN_FILE)? else {
        return Ok(None);
    };
    let seen: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("reading {}", dir.child_path(SEEN_FILE).display()))?;
    Ok(seen[channel].as_u64())
}

fn record_serial(store: &Store, channel: &str, serial: u64) -> Result<()> {
    let dir = store.folder(Folder::State)?;
    let mut seen: serde_json::Map<String, serde_json::Value> = match dir.read(SEEN_FILE)? {
        Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        None => serde_json::Map::new(),
    };
    seen.insert(channel.to_owned(), serial.into());
    let temp = format!("{SEEN_FILE}.{}.new", std::process::id());
    let _ = dir.remove(&temp);
    dir.write_new(&temp, &serde_json::to_vec(&seen)?, 0o644)?;
    dir.rename_over(&temp, &dir, SEEN_FILE)?;
    dir.sync()?;
    Ok(())
}

/// Follows the channel once: see the module's comment.
pub fn update(store: &Store, options: &Options<'_>) -> Result<Updated> {
    let trusted = crate::keys::trusted(store)?;
    let downloads = store.folder(Folder::Downloads)?;
    let Followed { index, .. } = read(
        options.channel,
        &trusted,
        options.allow_unsigned,
        &options.access,
        downloads.path(),
    )?;
    if let Some(seen) = seen_serial(store, &index.channel)? {
        ensure!(
            index.serial >= seen,
            "the channel {} is at serial {}, older than serial {seen} this device took: an old index is being replayed; nothing was changed",
            index.channel,
            index.serial
        );
    }
    let mut updated = Updated {
        channel: index.channel.clone(),
        serial: index.serial,
        from: None,
        rolled_back: Vec::new(),
        to: None,
        by: None,
        said: String::new(),
        changed: false,
    };

    // Releases pulled back: their layers leave the stack.
    let pulled: HashSet<&str> = index
        .releases
        .iter()
        .filter(|r| r.pulled)
        .map(|r| r.name.as_str())
        .collect();
    let plan = store.plan()?.value;
    let to_leave: Vec<String> = plan
        .layers
        .iter()
        .filter(|l| l.state.is_enabled())
        .filter(|l| l.release.as_deref().is_some_and(|r| pulled.contains(r)))
        .map(|l| l.name.clone())
        .collect();
    if !to_leave.is_empty() {
        let mut releases: Vec<String> = plan
            .layers
            .iter()
            .filter(|l| to_leave.contains(&l.name))
            .filter_map(|l| l.release.clone())
            .collect();
        releases.dedup();
        updated.rolled_back = releases;
        if !options.check {
            let mut change = crate::transaction::Transaction::begin(store)?;
            for name in &to_leave {
                if let Some(layer) = change.plan.layer_mut(name) {
                    layer.set_state(LayerState::Disabled, Some(crate::store::now()));
                }
            }
            change.commit()?;
            updated.changed = true;
        }
    }

    let (_, tree) = if options.check && !to_leave.is_empty() {
        // What the stack would be is not computed: the roll back comes first.
        (Vec::new(), String::new())
    } else {
        crate::ops::next_boot_tree(store)?
    };
    updated.from = index
        .releases
        .iter()
        .find(|r| r.tree == tree)
        .map(|r| r.name.clone());
    let Some(target) = index.releases.iter().rev().find(|r| !r.pulled) else {
        updated.said = "the channel has no release that is not pulled back".into();
        return finish(store, &index, options, updated);
    };
    if target.tree == tree {
        updated.said = format!("up to date: {} is the next boot's system", target.name);
        return finish(store, &index, options, updated);
    }
    if !updated.rolled_back.is_empty() && options.check {
        updated.said = format!(
            "would leave out {} (pulled back), then look again",
            updated.rolled_back.join(", ")
        );
        return Ok(updated);
    }
    // A release whose layers this device already has, left out (a trial that ran out, a
    // person's choice), is not forced on it again.
    if let Some(layer) = plan
        .layers
        .iter()
        .find(|l| l.release.as_deref() == Some(&target.name) && !l.state.is_enabled())
    {
        updated.said = format!(
            "{} was tried here and left out ({} is disabled); it is not applied again",
            target.name, layer.name
        );
        return finish(store, &index, options, updated);
    }
    if let Some(layer) = plan
        .layers
        .iter()
        .find(|l| l.release.as_deref() == Some(&target.name))
    {
        updated.said = format!(
            "{} is in the next boot's stack already ({}), though the stack's tree is not the channel's: changed here since",
            target.name, layer.name
        );
        return finish(store, &index, options, updated);
    }
    let machine = machine_id(options.machine_id)?;
    if !in_rollout(&machine, &index.channel, &target.name, target.rollout) {
        updated.said = format!(
            "{} is rolled out to {}% of devices, and not yet to this one",
            target.name, target.rollout
        );
        return finish(store, &index, options, updated);
    }
    updated.to = Some(target.name.clone());
    let bundle = target.bundles.iter().find(|b| b.from == tree);
    let by = match (bundle, &target.image) {
        (Some(b), _) => format!("bundle {}", b.bundle),
        (None, Some(image)) => format!("image {image}"),
        (None, None) => bail!(
            "{} has no bundle from this device's tree {tree} and no image; nothing was changed",
            target.name
        ),
    };
    updated.by = Some(if bundle.is_some() { "bundle" } else { "image" }.to_owned());
    if options.check {
        updated.said = format!("would take {} by {by}", target.name);
        return Ok(updated);
    }
    match bundle {
        Some(b) => apply_bundle(store, target, &b.bundle, options)?,
        None => {
            let image = target.image.as_deref().expect("checked above");
            apply_image(store, target, image, options)?;
        }
    }
    updated.changed = true;
    updated.said = format!("took {} by {by}, as a trial layer", target.name);
    finish(store, &index, options, updated)
}

fn finish(
    store: &Store,
    index: &Index,
    options: &Options<'_>,
    updated: Updated,
) -> Result<Updated> {
    if !options.check {
        record_serial(store, &index.channel, index.serial)?;
    }
    Ok(updated)
}

fn new_layer(store: &Store, release: &Release) -> Result<crate::ops::NewLayer> {
    // The release's name, or the first free one after it.
    let plan = store.plan()?.value;
    let layers = store.folder(Folder::Layers)?;
    let free = |name: &str| plan.layer(name).is_none() && matches!(layers.kind(name), Ok(None));
    let name = std::iter::once(release.name.clone())
        .chain((2..100).map(|n| format!("{}-{n}", release.name)))
        .find(|n| free(n))
        .ok_or_else(|| anyhow!("no free layer name for {}", release.name))?;
    Ok(crate::ops::NewLayer {
        name,
        title: Some(format!("release {}", release.name)),
        parent: None,
        state: LayerState::Trial,
        known_good: false,
        notes: None,
        release: Some(release.name.clone()),
    })
}

fn apply_bundle(
    store: &Store,
    release: &Release,
    bundle: &str,
    options: &Options<'_>,
) -> Result<()> {
    let layer = new_layer(store, release)?;
    if let Some(reference) = crate::oci::registry::Reference::explicit(bundle) {
        let downloads = store.folder(Folder::Downloads)?;
        let mut registry =
            crate::oci::registry::Registry::new(reference, &options.access, downloads.path())?;
        let file = registry.pull_bundle()?;
        let applied = crate::ops::add_bundle(store, &file, false, &layer);
        crate::oci::image::Source::done(&mut registry)?;
        applied?;
    } else if crate::fetch::is_url(bundle) {
        let part = crate::fetch::download_path(&store.root, bundle);
        crate::fetch::fetch(bundle, &part)?;
        let applied = crate::ops::add_bundle(store, &part, false, &layer);
        let _ = std::fs::remove_file(&part);
        applied?;
    } else {
        crate::ops::add_bundle(store, Path::new(bundle), false, &layer)?;
    }
    Ok(())
}

fn apply_image(store: &Store, release: &Release, image: &str, options: &Options<'_>) -> Result<()> {
    let downloads = store.folder(Folder::Downloads)?;
    let (mut source, short_name) =
        crate::oci::open_source(image, &options.access, downloads.path())?;
    let layer = new_layer(store, release)?;
    let request = crate::oci::pull::Request {
        name: Some(layer.name),
        short_name,
        title: None,
        squash: false,
        state: LayerState::Trial,
        notes: None,
        release: Some(release.name.clone()),
    };
    crate::oci::pull::pull(store, source.as_mut(), &request)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollouts_take_about_their_share_and_stay_put() {
        let ids: Vec<String> = (0..2000u32).map(|i| format!("{:032x}", i * 7919)).collect();
        let taken = ids
            .iter()
            .filter(|id| in_rollout(id, "stable", "rel-2", 25))
            .count();
        assert!((400..600).contains(&taken), "{taken} of 2000 at 25%");
        assert_eq!(
            ids.iter()
                .filter(|id| in_rollout(id, "stable", "rel-2", 100))
                .count(),
            2000
        );
        assert_eq!(
            ids.iter()
                .filter(|id| in_rollout(id, "stable", "rel-2", 0))
                .count(),
            0
        );
        // A device in at 25% is still in at 50%.
        assert!(
            ids.iter()
                .filter(|id| in_rollout(id, "stable", "rel-2", 25))
                .all(|id| in_rollout(id, "stable", "rel-2", 50))
        );
    }
}
