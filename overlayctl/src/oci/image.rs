//! OCI images: the JSON documents (index, manifest, config) and where an image comes from: an
//! image layout directory, an `oci-archive` (a tar of one), a `docker-archive` (what
//! `docker save` writes) or a registry ([`super::registry`]).
//!
//! Every document and blob named by a digest is checked against it; documents are read up to
//! [`MAX_DOCUMENT`] bytes, blobs up to the size their descriptor gives.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The largest index, manifest or config read: real ones are a few KiB.
pub const MAX_DOCUMENT: u64 = 4 << 20;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub artifact_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub artifact_type: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    pub rootfs: RootFs,
    #[serde(default)]
    pub history: Vec<History>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct History {
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub empty_layer: bool,
}

/// One layer of an image, bottom first in [`Image::layers`].
#[derive(Debug, Clone)]
pub struct ImageLayer {
    /// The blob (compressed tar). A docker-archive's layers have no descriptor of their own:
    /// their digest is the diff_id, checked after unpacking.
    pub blob: Option<Descriptor>,
    /// Where a docker-archive keeps it.
    pub file: Option<String>,
    pub diff_id: String,
    /// From the history's `created_by`, cleaned for a menu line.
    pub title: Option<String>,
}

/// An image, resolved to one manifest for this machine.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest's digest (none for a docker-archive).
    pub digest: Option<String>,
    pub config: Config,
    pub layers: Vec<ImageLayer>,
}

/// Where an image comes from.
pub trait Source {
    /// For messages: the transport and the place.
    fn describe(&self) -> String;
    /// The image, resolved to one manifest for this machine.
    fn image(&mut self) -> Result<Image>;
    /// The layer's blob, to be read to its end (its size and digest are checked by the reader
    /// of it, or here).
    fn open_layer(&mut self, layer: &ImageLayer) -> Result<Box<dyn Read + '_>>;
    /// Fetches what `layers` need ahead of the change that adds them (a registry's downloads),
    /// so a slow line holds no lock.
    fn prefetch(&mut self, _layers: &[ImageLayer]) -> Result<()> {
        Ok(())
    }
    /// Whether [`Source::open_layer`] gives blobs already checked against their descriptors
    /// (downloaded and hashed); otherwise each is hashed before it is unpacked.
    fn checks_blobs(&self) -> bool {
        false
    }
    /// Forgets what a finished pull kept (downloads): called once the layers are in the store.
    fn done(&mut self) -> Result<()> {
        Ok(())
    }
}

/// `sha256:` and 64 lowercase hex digits; anything else is refused, naming where it was found.
pub fn check_digest(digest: &str, what: &str) -> Result<()> {
    ensure!(
        layers_spec::plan::is_valid_sha256(digest),
        "{what} has the digest {digest:?}; only `sha256:` and 64 lowercase hex digits is read"
    );
    Ok(())
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Checks a document against its descriptor: size and digest.
pub fn check_document(bytes: &[u8], descriptor: &Descriptor, what: &str) -> Result<()> {
    ensure!(
        bytes.len() as u64 == descriptor.size,
        "{what} is {} bytes, but its descriptor says {}",
        bytes.len(),
        descriptor.size
    );
    let got = sha256(bytes);
    ensure!(
        got == descriptor.digest,
        "{what} has the digest {got}, not {} as its descriptor says: it was changed or damaged",
        descriptor.digest
    );
    Ok(())
}

/// Reads at most [`MAX_DOCUMENT`] bytes of `from`, refusing more.
pub fn read_document(from: impl Read, what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    from.take(MAX_DOCUMENT + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what}"))?;
    ensure!(
        bytes.len() as u64 <= MAX_DOCUMENT,
        "{what} is over {MAX_DOCUMENT} bytes, which no index, manifest or config is"
    );
    Ok(bytes)
}

pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("{what} is not what it should be"))
}

/// This machine's architecture, as OCI names it.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The manifest of an index for this machine (linux, its architecture).
pub fn pick_platform<'a>(index: &'a Index, what: &str) -> Result<&'a Descriptor> {
    let arch = host_architecture();
    index
        .manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .ok_or_else(|| {
            let offered: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            anyhow!(
                "{what} has no image for linux/{arch} (it has: {})",
                if offered.is_empty() {
                    "no platforms named".to_owned()
                } else {
                    offered.join(", ")
                }
            )
        })
}

/// Whether a media type is an index (or a Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// Builds the image from its manifest and config: layers bottom first, checked one to one
/// against the config's diff_ids, titled from the history.
pub fn image_of(digest: Option<String>, manifest: &Manifest, config: Config) -> Result<Image> {
    ensure!(
        manifest.config.media_type.is_empty()
            || manifest.config.media_type == OCI_CONFIG
            || manifest.config.media_type == "application/vnd.docker.container.image.v1+json",
        "the manifest's config is a {:?}, not an image config: this is not a container image",
        manifest.config.media_type
    );
    ensure!(
        config.os.is_empty() || config.os == "linux",
        "the image is for {:?}, not linux",
        config.os
    );
    let arch = host_architecture();
    ensure!(
        config.architecture.is_empty() || config.architecture == arch,
        "the image is for {}, and this machine is {arch}",
        config.architecture
    );
    ensure!(
        manifest.layers.len() == config.rootfs.diff_ids.len(),
        "the manifest has {} layers and the config {} diff_ids",
        manifest.layers.len(),
        config.rootfs.diff_ids.len()
    );
    let titles = titles(&config.history, manifest.layers.len());
    let mut layers = Vec::new();
    for (i, (blob, diff_id)) in manifest
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .enumerate()
    {
        check_digest(&blob.digest, &format!("layer {}", i + 1))?;
        check_digest(diff_id, &format!("the config's diff_id {}", i + 1))?;
        ensure!(
            blob.urls.is_empty(),
            "layer {} is a foreign layer (downloaded from {}), which is not pulled",
            i + 1,
            blob.urls.join(", ")
        );
        ensure!(
            is_layer_type(&blob.media_type),
            "layer {} is a {:?}, not a layer tar",
            i + 1,
            blob.media_type
        );
        layers.push(ImageLayer {
            blob: Some(blob.clone()),
            file: None,
            diff_id: diff_id.clone(),
            title: titles[i].clone(),
        });
    }
    Ok(Image {
        digest,
        config,
        layers,
    })
}

fn is_layer_type(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
    )
}

/// One title per layer, from the history entries that made a layer (`empty_layer` ones did
/// not); none when the history does not line up with the layers.
fn titles(history: &[History], layers: usize) -> Vec<Option<String>> {
    let made: Vec<&History> = history.iter().filter(|h| !h.empty_layer).collect();
    if made.len() != layers {
        return vec![None; layers];
    }
    made.iter()
        .map(|h| {
            h.created_by
                .as_deref()
                .or(h.comment.as_deref())
                .and_then(title_of)
        })
        .collect()
}

/// A history line as a menu title: the shell wrapper, `#(nop)` and BuildKit's mark dropped, whitespace and
/// control characters made single spaces, at most 100 characters.
pub fn title_of(created_by: &str) -> Option<String> {
    let mut text = created_by.trim();
    for prefix in ["/bin/sh -c ", "|"] {
        if let Some(rest) = text.strip_prefix(prefix) {
            text = rest.trim_start();
        }
    }
    if let Some(rest) = text.strip_prefix("#(nop)") {
        text = rest.trim_start();
    }
    // BuildKit's `RUN /bin/sh -c CMD # buildkit`.
    let run;
    if let Some(rest) = text.strip_prefix("RUN /bin/sh -c ") {
        run = format!(
            "RUN {}",
            rest.trim_end().trim_end_matches("# buildkit").trim_end()
        );
        text = &run;
    }
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let mut title = words.join(" ");
    if title.is_empty() {
        return None;
    }
    if title.chars().count() > 100 {
        title = title.chars().take(99).collect::<String>() + "…";
    }
    Some(title)
}

/// Picks the manifest of a layout's (or an archive's) `index.json`: the one whose
/// `org.opencontainers.image.ref.name` is `reference` (or whose digest it is), or the only one.
fn pick_manifest<'a>(
    index: &'a Index,
    reference: Option<&str>,
    what: &str,
) -> Result<&'a Descriptor> {
    fn named(d: &Descriptor) -> Option<&str> {
        d.annotations.get(REF_NAME).map(String::as_str)
    }
    match reference {
        Some(reference) => index
            .manifests
            .iter()
            .find(|d| named(d) == Some(reference) || d.digest == reference)
            .ok_or_else(|| {
                let names: Vec<&str> = index.manifests.iter().filter_map(named).collect();
                anyhow!(
                    "{what} has no image named {reference:?} (it has: {})",
                    if names.is_empty() {
                        "none named".to_owned()
                    } else {
                        names.join(", ")
                    }
                )
            }),
        None => match index.manifests.as_slice() {
            [one] => Ok(one),
            [] => bail!("{what} has no image"),
            many => bail!(
                "{what} has {} images; name one (`:NAME` after the path): {}",
                many.len(),
                many.iter()
                    .map(|d| named(d).unwrap_or(&d.digest).to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// Reads blobs by digest from an image layout: a directory, or a tar of one.
trait Blobs {
    fn describe(&self) -> String;
    /// A file of the layout by its path inside it (`index.json`, `blobs/sha256/…`).
    fn open(&mut self, path: &str) -> Result<Option<Box<dyn Read + '_>>>;

    fn blob(&mut self, descriptor: &Descriptor) -> Result<Box<dyn Read + '_>> {
        check_digest(&descriptor.digest, "a descriptor")?;
        let path = blob_path(&descriptor.digest);
        let what = self.describe();
        self.open(&path)?
            .ok_or_else(|| anyhow!("{what} has no blob {}", descriptor.digest))
    }

    fn document(&mut self, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>> {
        ensure!(
            descriptor.size <= MAX_DOCUMENT,
            "{what} is {} bytes, over the {MAX_DOCUMENT} a document may be",
            descriptor.size
        );
        let bytes = read_document(self.blob(descriptor)?, what)?;
        check_document(&bytes, descriptor, what)?;
        Ok(bytes)
    }
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", &digest["sha256:".len()..])
}

/// An image from a layout (directory or archive): index.json, the manifest for `reference`
/// (through a nested index for this machine's platform), its config.
fn layout_image(blobs: &mut dyn Blobs, reference: Option<&str>) -> Result<Image> {
    let what = blobs.describe();
    let index_bytes = match blobs.open("index.json")? {
        Some(file) => read_document(file, "index.json")?,
        None => bail!("{what} has no index.json: it is not an OCI image layout"),
    };
    let index: Index = parse(&index_bytes, &format!("{what}'s index.json"))?;
    let mut descriptor = pick_manifest(&index, reference, &what)?.clone();
    for _ in 0..4 {
        if !is_index(&descriptor.media_type) {
            break;
        }
        let nested: Index = parse(&blobs.document(&descriptor, "an index")?, "an index")?;
        descriptor = pick_platform(&nested, &what)?.clone();
    }
    ensure!(
        descriptor.media_type.is_empty()
            || descriptor.media_type == OCI_MANIFEST
            || descriptor.media_type == DOCKER_MANIFEST,
        "{what}: {} is a {:?}, not an image manifest",
        descriptor.digest,
        descriptor.media_type
    );
    let manifest: Manifest = parse(
        &blobs.document(&descriptor, "the manifest")?,
        "the manifest",
    )?;
    let config: Config = parse(
        &blobs.document(&manifest.config, "the config")?,
        "the config",
    )?;
    image_of(Some(descriptor.digest.clone()), &manifest, config)
}

/// An OCI image layout directory (`oci:DIR[:REF]`).
#[derive(Debug)]
pub struct LayoutDir {
    dir: PathBuf,
    reference: Option<String>,
}

impl LayoutDir {
    pub fn new(dir: &Path, reference: Option<&str>) -> Self {
        Self {
            dir: dir.to_owned(),
            reference: reference.map(str::to_owned),
        }
    }
}

impl Blobs for LayoutDir {
    fn describe(&self) -> String {
        format!("the image layout {}", self.dir.display())
    }

    fn open(&mut self, path: &str) -> Result<Option<Box<dyn Read + '_>>> {
        let full = self.dir.join(path);
        match File::open(&full) {
            Ok(file) => Ok(Some(Box::new(file))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("opening {}", full.display()))),
        }
    }
}

impl Source for LayoutDir {
    fn describe(&self) -> String {
        Blobs::describe(self)
    }

    fn image(&mut self) -> Result<Image> {
        let reference = self.reference.clone();
        layout_image(self, reference.as_deref())
    }

    fn open_layer(&mut self, layer: &ImageLayer) -> Result<Box<dyn Read + '_>> {
        let blob = layer
            .blob
            .as_ref()
            .expect("a layout's layers have descriptors");
        self.blob(blob)
    }
}

/// A tar, its regular files indexed by path (a leading `./` dropped) and read in place.
#[derive(Debug)]
struct TarFiles {
    path: PathBuf,
    file: File,
    entries: HashMap<String, (u64, u64)>,
}

impl TarFiles {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(&file);
        let mut entries = HashMap::new();
        for entry in archive
            .entries()
            .with_context(|| format!("reading {}", path.display()))?
        {
            let entry =
                entry.with_context(|| format!("reading {} as a tar archive", path.display()))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let name = name.trim_start_matches("./").to_owned();
            entries.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            entries,
        })
    }

    fn read(&mut self, name: &str) -> Result<Option<Box<dyn Read + '_>>> {
        let Some(&(at, size)) = self.entries.get(name) else {
            return Ok(None);
        };
        self.file
            .seek(SeekFrom::Start(at))
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(Some(Box::new((&self.file).take(size))))
    }
}

/// An OCI image layout in a tar (`oci-archive:FILE[:REF]`).
#[derive(Debug)]
pub struct LayoutArchive {
    tar: TarFiles,
    reference: Option<String>,
}

impl LayoutArchive {
    pub fn open(path: &Path, reference: Option<&str>) -> Result<Self> {
        Ok(Self {
            tar: TarFiles::open(path)?,
            reference: reference.map(str::to_owned),
        })
    }
}

impl Blobs for LayoutArchive {
    fn describe(&self) -> String {
        format!("the OCI archive {}", self.tar.path.display())
    }

    fn open(&mut self, path: &str) -> Result<Option<Box<dyn Read + '_>>> {
        self.tar.read(path)
    }
}

impl Source for LayoutArchive {
    fn describe(&self) -> String {
        Blobs::describe(self)
    }

    fn image(&mut self) -> Result<Image> {
        let reference = self.reference.clone();
        layout_image(self, reference.as_deref())
    }

    fn open_layer(&mut self, layer: &ImageLayer) -> Result<Box<dyn Read + '_>> {
        let blob = layer
            .blob
            .as_ref()
            .expect("an archive's layers have descriptors");
        self.blob(blob)
    }
}

/// What `docker save` writes (`docker-archive:FILE[:REPO:TAG]`): `manifest.json` naming each
/// image's config and layer files.
#[derive(Debug)]
pub struct DockerArchive {
    tar: TarFiles,
    reference: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl DockerArchive {
    pub fn open(path: &Path, reference: Option<&str>) -> Result<Self> {
        Ok(Self {
            tar: TarFiles::open(path)?,
            reference: reference.map(str::to_owned),
        })
    }

    fn document(&mut self, name: &str) -> Result<Vec<u8>> {
        let what = format!("{} in {}", name, self.tar.path.display());
        let file = self
            .tar
            .read(name)?
            .ok_or_else(|| anyhow!("{what} is missing: this is not a docker-archive"))?;
        read_document(file, &what)
    }
}

impl Source for DockerArchive {
    fn describe(&self) -> String {
        format!("the docker archive {}", self.tar.path.display())
    }

    fn image(&mut self) -> Result<Image> {
        let what = Source::describe(self);
        let entries: Vec<DockerEntry> = parse(
            &self.document("manifest.json")?,
            &format!("{what}'s manifest.json"),
        )?;
        let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
        // `kiosk/os:v2` is `docker.io/kiosk/os:v2`, as docker reads it.
        let same = |a: &str, b: &str| {
            a == b
                || matches!(
                    (super::registry::Reference::parse(a), super::registry::Reference::parse(b)),
                    (Ok(a), Ok(b)) if a == b
                )
        };
        let entry = match &self.reference {
            Some(reference) => entries
                .iter()
                .find(|e| tags(e).iter().any(|t| same(t, reference)))
                .ok_or_else(|| anyhow!("{what} has no image tagged {reference:?}"))?,
            None => match entries.as_slice() {
                [one] => one,
                _ => bail!(
                    "{what} has {} images; name one by its tag (`:REPO:TAG` after the path)",
                    entries.len()
                ),
            },
        };
        let config_bytes = self.document(&entry.config)?;
        // The config's file is named by its digest where the archive says so.
        let stem = entry
            .config
            .trim_start_matches("blobs/sha256/")
            .trim_end_matches(".json");
        if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            let got = sha256(&config_bytes);
            ensure!(
                got == format!("sha256:{stem}"),
                "{what}: the config {} has the digest {got}: it was changed or damaged",
                entry.config
            );
        }
        let config: Config = parse(&config_bytes, "the config")?;
        ensure!(
            entry.layers.len() == config.rootfs.diff_ids.len(),
            "{what}: manifest.json names {} layers and the config {} diff_ids",
            entry.layers.len(),
            config.rootfs.diff_ids.len()
        );
        let arch = host_architecture();
        ensure!(
            config.architecture.is_empty() || config.architecture == arch,
            "the image is for {}, and this machine is {arch}",
            config.architecture
        );
        let titles = titles(&config.history, entry.layers.len());
        let mut layers = Vec::new();
        for (i, (file, diff_id)) in entry.layers.iter().zip(&config.rootfs.diff_ids).enumerate() {
            check_digest(diff_id, &format!("the config's diff_id {}", i + 1))?;
            layers.push(ImageLayer {
                blob: None,
                file: Some(file.clone()),
                diff_id: diff_id.clone(),
                title: titles[i].clone(),
            });
        }
        Ok(Image {
            digest: None,
            config,
            layers,
        })
    }

    fn open_layer(&mut self, layer: &ImageLayer) -> Result<Box<dyn Read + '_>> {
        let name = layer
            .file
            .as_deref()
            .expect("a docker archive's layers are files");
        let what = Source::describe(self);
        self.tar
            .read(name)?
            .ok_or_else(|| anyhow!("{what} has no layer file {name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_lines_become_menu_titles() {
        assert_eq!(
            title_of("/bin/sh -c #(nop) ADD file:abc in / ").as_deref(),
            Some("ADD file:abc in /")
        );
        assert_eq!(
            title_of("RUN /bin/sh -c apt-get update &&\tapt-get install -y\n curl # buildkit")
                .as_deref(),
            Some("RUN apt-get update && apt-get install -y curl")
        );
        assert_eq!(title_of(" \n\t"), None);
        assert_eq!(title_of(&"x".repeat(300)).unwrap().chars().count(), 100);
        assert!(!title_of("a\u{1b}[2Jb").unwrap().contains('\u{1b}'));
    }

    #[test]
    fn titles_line_up_with_the_layers_that_history_made() {
        let h = |by: &str, empty: bool| History {
            created_by: Some(by.into()),
            comment: None,
            empty_layer: empty,
        };
        let history = [
            h("ADD base", false),
            h("ENV X=1", true),
            h("RUN make", false),
        ];
        assert_eq!(
            titles(&history, 2),
            [Some("ADD base".to_owned()), Some("RUN make".to_owned())]
        );
        assert_eq!(titles(&history, 3), [None, None, None]);
    }
}
