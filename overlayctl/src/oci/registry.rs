//! Images (and bundles, as artifacts) from a registry, through the OCI distribution API:
//! `GET /v2/REPO/manifests/REF` and `/v2/REPO/blobs/DIGEST`, with the bearer-token dance a
//! registry asks for in its `WWW-Authenticate` answer (credentials from `--creds` or the
//! `auth.json` that `skopeo login` and `podman login` write), or HTTP basic auth.
//!
//! Blobs download into the store's `downloads/`, named by digest, and resume with a range
//! request where a cut download stopped; a blob is used only once its size and digest match.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::image::{
    Config, DOCKER_LIST, DOCKER_MANIFEST, Descriptor, Image, ImageLayer, Index, MAX_DOCUMENT,
    Manifest, OCI_INDEX, OCI_MANIFEST, Source, check_digest, check_document, image_of, is_index,
    parse, pick_platform, sha256,
};

/// A bundle stored in a registry: an OCI artifact of this type, whose one blob is the bundle.
pub const BUNDLE_ARTIFACT: &str = "application/vnd.strata.bundle.v1";
/// The artifact's config: the trees the bundle goes from and to.
pub const BUNDLE_CONFIG: &str = "application/vnd.strata.bundle.config.v1+json";

/// A kind of artifact Strata keeps in registries.
#[derive(Debug)]
struct Artifact {
    what: &'static str,
    media_type: &'static str,
    config: &'static str,
    max_size: u64,
}

impl Artifact {
    const BUNDLE: Self = Self {
        what: "bundle",
        media_type: BUNDLE_ARTIFACT,
        config: BUNDLE_CONFIG,
        max_size: u64::MAX,
    };
    const CHANNEL: Self = Self {
        what: "channel",
        media_type: CHANNEL_ARTIFACT,
        config: CHANNEL_CONFIG,
        max_size: 1 << 20,
    };
}

/// A channel document stored in a registry.
pub const CHANNEL_ARTIFACT: &str = "application/vnd.strata.channel.v1+json";
const CHANNEL_CONFIG: &str = "application/vnd.strata.channel.config.v1+json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BundleConfig {
    base: String,
    target: String,
}

/// `REGISTRY/REPOSITORY[:TAG][@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// Parses a reference as `docker` and `skopeo` do: the first part is the registry when it
    /// has a `.` or a `:` or is `localhost`, else the image is on Docker Hub (`library/` for a
    /// one-part name). Without a tag or digest, the tag is `latest`.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.strip_prefix("docker://").unwrap_or(text);
        let bad = |why: &str| anyhow!("{text:?} is not an image reference: {why}");
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest, &format!("the reference {text:?}"))?;
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path)
            }
            _ => ("docker.io".to_owned(), rest),
        };
        // A tag follows the last `:` of the last path component.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (path, None),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_owned()
        };
        ensure!(!repository.is_empty(), bad("no repository"));
        ensure!(
            repository.split('/').all(|part| {
                part.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && part.ends_with(|c: char| c.is_ascii_alphanumeric())
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            }),
            bad("a repository is lowercase letters, digits, `.`, `_`, `-` and `/`")
        );
        if let Some(tag) = &tag {
            ensure!(
                !tag.is_empty()
                    && tag.len() <= 128
                    && tag
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                bad("a tag is at most 128 letters, digits, `.`, `_` and `-`")
            );
        }
        ensure!(
            registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)),
            bad("the registry is a host name and an optional port")
        );
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What `GET manifests/` takes: the digest when there is one, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .expect("a reference has a tag or a digest")
    }

    /// A reference given where a file or URL may also be: `docker://…`, or a name whose first
    /// part is a registry (with a `.` or `:`, or `localhost`) and that is no existing file.
    pub fn explicit(text: &str) -> Option<Self> {
        if text.starts_with("docker://") {
            return Self::parse(text).ok();
        }
        let first = text.split('/').next()?;
        let registry_like = text.contains('/')
            && (first.contains('.') || first.contains(':') || first == "localhost");
        (registry_like && !Path::new(text).exists())
            .then(|| Self::parse(text).ok())
            .flatten()
    }

    /// The repository's last part: what pulled layers are named after.
    pub fn short_name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Plain HTTP (a local registry), and no certificate check over HTTPS.
    pub insecure: bool,
    /// `USER:PASSWORD`.
    pub creds: Option<String>,
    /// An `auth.json` to read credentials from instead of the usual places.
    pub authfile: Option<PathBuf>,
}

/// A registry's repository, spoken to over the distribution API.
#[derive(Debug)]
pub struct Registry {
    pub reference: Reference,
    agent: ureq::Agent,
    base: String,
    basic: Option<String>,
    /// `Authorization` for the next requests, once the registry asked for one.
    authorization: Option<String>,
    /// Whether the registry has answered a request (and so any challenge) yet.
    answered: bool,
    downloads: PathBuf,
    /// Blobs downloaded for this pull: removed once it is done.
    fetched: Vec<PathBuf>,
}

impl Registry {
    /// `downloads` is where blobs go (the store's `downloads/`).
    pub fn new(reference: Reference, access: &Access, downloads: &Path) -> Result<Self> {
        let tls = ureq::tls::TlsConfig::builder()
            .disable_verification(access.insecure)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_connect(Some(Duration::from_secs(30)))
            .user_agent(concat!("strata-overlayctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let scheme = if access.insecure { "http" } else { "https" };
        let host = if reference.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &reference.registry
        };
        let basic = credentials(&reference.registry, access)?.map(|(user, password)| {
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        });
        Ok(Self {
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            reference,
            agent,
            basic,
            authorization: None,
            answered: false,
            downloads: downloads.to_owned(),
            fetched: Vec::new(),
        })
    }

    /// GETs `path` (under `/v2/REPO/`), authorizing as the registry asks on a 401.
    fn get(&mut self, path: &str, accept: &str) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}/{path}", self.base);
        let headers: Vec<(&str, String)> = if accept.is_empty() {
            Vec::new()
        } else {
            vec![("Accept", accept.to_owned())]
        };
        self.send("GET", &url, &headers, &Body::Empty)
    }

    /// Sends one request to `url`, authorizing as the registry asks on a 401 and sending it
    /// again once.
    fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        body: &Body,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        for attempt in 0..2 {
            let mut request = ureq::http::Request::builder().method(method).uri(url);
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            if let Some(authorization) = &self.authorization {
                request = request.header("Authorization", authorization);
            }
            let asked = || format!("asking {url} ({method})");
            let response = match body {
                Body::Empty => {
                    let request = request.body(()).with_context(asked)?;
                    self.agent.run(request)
                }
                Body::Bytes(bytes) => {
                    let request = request.body(bytes.as_slice()).with_context(asked)?;
                    self.agent.run(request)
                }
                Body::File(path) => {
                    let file =
                        File::open(path).with_context(|| format!("opening {}", path.display()))?;
                    let request = request
                        .body(ureq::SendBody::from_owned_reader(file))
                        .with_context(asked)?;
                    self.agent.run(request)
                }
            }
            .with_context(asked)?;
            if response.status().as_u16() != 401 || attempt == 1 {
                self.answered = true;
                return Ok(response);
            }
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            self.authorize(&challenge, url)?;
        }
        unreachable!("the loop returns")
    }

    /// Answers a `WWW-Authenticate` challenge: a bearer token from the realm it names (with
    /// the credentials, when there are some), or basic auth.
    fn authorize(&mut self, challenge: &str, url: &str) -> Result<()> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let basic = self.basic.as_ref().ok_or_else(|| {
                anyhow!(
                    "{} asks for a user and password; give --creds USER:PASSWORD or log in with `skopeo login`",
                    self.reference.registry
                )
            })?;
            self.authorization = Some(format!("Basic {basic}"));
            return Ok(());
        }
        ensure!(
            scheme.eq_ignore_ascii_case("bearer"),
            "{url} answered 401 without a bearer or basic challenge ({challenge:?})"
        );
        let params = challenge_params(params);
        let realm = params
            .get("realm")
            .ok_or_else(|| anyhow!("{url} asks for a token but names no realm to get it from"))?;
        ensure!(
            realm.starts_with("https://") || realm.starts_with("http://"),
            "{url} names the token realm {realm:?}, which is not an http(s) URL"
        );
        let mut request = self.agent.get(realm.as_str());
        let mut query = Vec::new();
        if let Some(service) = params.get("service") {
            query.push(("service", service.clone()));
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
        query.push(("scope", scope));
        for (key, value) in &query {
            request = request.query(*key, value);
        }
        if let Some(basic) = &self.basic {
            request = request.header("Authorization", format!("Basic {basic}"));
        }
        let response = request
            .call()
            .with_context(|| format!("asking {realm} for a token"))?;
        let status = response.status().as_u16();
        ensure!(
            status == 200,
            "{realm} refused a token for {} ({status}){}",
            self.reference,
            if self.basic.is_none() {
                "; give --creds USER:PASSWORD or log in with `skopeo login`"
            } else {
                ": are the credentials right?"
            }
        );
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_limited(response, MAX_DOCUMENT, "the token")?;
        let token: Token = parse(&body, "the token answer")?;
        let token = token
            .token
            .or(token.access_token)
            .ok_or_else(|| anyhow!("{realm} answered without a token"))?;
        self.authorization = Some(format!("Bearer {token}"));
        Ok(())
    }

    /// A manifest or index by tag or digest, checked against the digest when one is known;
    /// with its media type and digest.
    pub fn manifest(&mut self, reference: &str) -> Result<(String, String, Vec<u8>)> {
        let accept = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", ");
        let response = self.get(&format!("manifests/{reference}"), &accept)?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            404 => bail!("{} has no manifest {reference}", self.describe_repo()),
            other => bail!(
                "{} answered {other} for the manifest {reference}",
                self.describe_repo()
            ),
        }
        let media_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_owned())
            .unwrap_or_default();
        let bytes = read_limited(response, MAX_DOCUMENT, "the manifest")?;
        let digest = sha256(&bytes);
        if reference.starts_with("sha256:") {
            ensure!(
                digest == reference,
                "{} sent a manifest with the digest {digest} for {reference}: it was changed or damaged",
                self.describe_repo()
            );
        }
        // The document says what it is when the header does not.
        let media_type = if media_type.is_empty() || media_type == "application/json" {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Typed {
                media_type: Option<String>,
            }
            parse::<Typed>(&bytes, "the manifest")?
                .media_type
                .unwrap_or_default()
        } else {
            media_type
        };
        Ok((media_type, digest, bytes))
    }

    /// A small blob (a config), read whole and checked.
    pub fn document(&mut self, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>> {
        check_digest(&descriptor.digest, what)?;
        ensure!(
            descriptor.size <= MAX_DOCUMENT,
            "{what} is {} bytes, over the {MAX_DOCUMENT} a document may be",
            descriptor.size
        );
        let response = self.get(&format!("blobs/{}", descriptor.digest), "")?;
        let status = response.status().as_u16();
        ensure!(
            status == 200,
            "{} answered {status} for {what} {}",
            self.describe_repo(),
            descriptor.digest
        );
        let bytes = read_limited(response, MAX_DOCUMENT, what)?;
        check_document(&bytes, descriptor, what)?;
        Ok(bytes)
    }

    /// Downloads a blob into `downloads/` (resuming a cut download), checks its size and
    /// digest, and returns the file. A blob that does not match is removed: the next try
    /// starts over.
    pub fn blob(&mut self, descriptor: &Descriptor) -> Result<PathBuf> {
        check_digest(&descriptor.digest, "a blob")?;
        let hex = &descriptor.digest["sha256:".len()..];
        let done = self.downloads.join(format!("sha256-{hex}.blob"));
        let part = self.downloads.join(format!("sha256-{hex}.blob.part"));
        // A finished download from an earlier run is used only if it still matches.
        if done.exists() && hash_file(&done)? != (descriptor.size, descriptor.digest.clone()) {
            fs::remove_file(&done).with_context(|| format!("removing {}", done.display()))?;
        }
        if !done.exists() {
            // Authorized first (the download itself does not answer challenges).
            if !self.answered {
                let reference = self.reference.manifest_ref().to_owned();
                self.manifest(&reference)?;
            }
            let url = format!("{}/blobs/{}", self.base, descriptor.digest);
            let headers: Vec<(&str, String)> = self
                .authorization
                .iter()
                .map(|a| ("Authorization", a.clone()))
                .collect();
            // A part longer than the blob is no start of it: begin again.
            if fs::metadata(&part).is_ok_and(|m| m.len() > descriptor.size) {
                fs::remove_file(&part).with_context(|| format!("removing {}", part.display()))?;
            }
            crate::fetch::fetch_with(&self.agent, &url, &headers, &part)?;
            let (size, digest) = hash_file(&part)?;
            if size != descriptor.size || digest != descriptor.digest {
                let _ = fs::remove_file(&part);
                bail!(
                    "{} sent {size} bytes with digest {digest} for the blob {} ({} bytes): it was changed or damaged; nothing was added",
                    self.describe_repo(),
                    descriptor.digest,
                    descriptor.size
                );
            }
            fs::rename(&part, &done).with_context(|| format!("renaming {}", part.display()))?;
        }
        if !self.fetched.contains(&done) {
            self.fetched.push(done.clone());
        }
        Ok(done)
    }

    /// Whether the registry has the blob already.
    fn has_blob(&mut self, digest: &str) -> Result<bool> {
        let url = format!("{}/blobs/{digest}", self.base);
        let response = self.send("HEAD", &url, &[], &Body::Empty)?;
        Ok(response.status().as_u16() == 200)
    }

    /// Uploads a blob (one monolithic `PUT` after the upload's `POST`), unless the registry has
    /// it.
    fn upload(&mut self, digest: &str, body: Body) -> Result<()> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        let url = format!("{}/blobs/uploads/", self.base);
        let response = self.send("POST", &url, &[], &Body::Empty)?;
        let status = response.status().as_u16();
        ensure!(
            status == 202,
            "{} answered {status} to starting an upload (are the credentials allowed to push?)",
            self.describe_repo()
        );
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                anyhow!(
                    "{} started an upload without a Location",
                    self.describe_repo()
                )
            })?
            .to_owned();
        // A Location may be a path on the registry or a whole URL.
        let location = if location.starts_with('/') {
            let origin = self
                .base
                .splitn(4, '/')
                .take(3)
                .collect::<Vec<_>>()
                .join("/");
            format!("{origin}{location}")
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={digest}");
        let headers = [("Content-Type", "application/octet-stream".to_owned())];
        let response = self.send("PUT", &put, &headers, &body)?;
        let status = response.status().as_u16();
        ensure!(
            status == 201,
            "{} answered {status} to the upload of {digest}",
            self.describe_repo()
        );
        Ok(())
    }

    /// Stores the bundle `file` (its base and target tree digests in its config) as an OCI
    /// artifact under this reference's tag; returns the manifest's digest.
    pub fn push_bundle(&mut self, file: &Path, base: &str, target: &str) -> Result<String> {
        let config = serde_json::to_vec(&BundleConfig {
            base: base.to_owned(),
            target: target.to_owned(),
        })?;
        self.push_artifact(file, &Artifact::BUNDLE, &config)
    }

    /// Stores a signed channel document as an OCI artifact under this reference's tag.
    pub fn push_channel(&mut self, file: &Path) -> Result<String> {
        self.push_artifact(file, &Artifact::CHANNEL, b"{}")
    }

    /// Stores `file` as the one blob of an artifact of `kind` under this reference's tag.
    fn push_artifact(&mut self, file: &Path, kind: &Artifact, config: &[u8]) -> Result<String> {
        let tag = self
            .reference
            .tag
            .clone()
            .filter(|_| self.reference.digest.is_none())
            .ok_or_else(|| anyhow!("push to a tag (REPO:TAG), not a digest"))?;
        let (size, digest) = hash_file(file)?;
        let config_digest = sha256(config);
        self.upload(&config_digest, Body::Bytes(config.to_vec()))?;
        self.upload(&digest, Body::File(file.to_owned()))?;
        let title = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(kind.what);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": kind.media_type,
            "config": {"mediaType": kind.config, "digest": config_digest, "size": config.len()},
            "layers": [{
                "mediaType": kind.media_type, "digest": digest, "size": size,
                "annotations": {"org.opencontainers.image.title": title},
            }],
        });
        let bytes = serde_json::to_vec(&manifest)?;
        let url = format!("{}/manifests/{tag}", self.base);
        let headers = [("Content-Type", OCI_MANIFEST.to_owned())];
        let response = self.send("PUT", &url, &headers, &Body::Bytes(bytes.clone()))?;
        let status = response.status().as_u16();
        ensure!(
            status == 201,
            "{} answered {status} to the {}'s manifest",
            self.describe_repo(),
            kind.what
        );
        Ok(sha256(&bytes))
    }

    /// Downloads the bundle this reference names (resuming a cut download) and returns its
    /// file in `downloads/`, checked against the manifest's digest.
    pub fn pull_bundle(&mut self) -> Result<PathBuf> {
        self.pull_artifact(&Artifact::BUNDLE)
    }

    /// Downloads the channel document this reference names, checked against its digest.
    pub fn pull_channel(&mut self) -> Result<PathBuf> {
        self.pull_artifact(&Artifact::CHANNEL)
    }

    fn pull_artifact(&mut self, kind: &Artifact) -> Result<PathBuf> {
        let reference = self.reference.manifest_ref().to_owned();
        let (media_type, _, bytes) = self.manifest(&reference)?;
        ensure!(
            media_type == OCI_MANIFEST,
            "{} is a {media_type:?}, not a {}",
            self.reference,
            kind.what
        );
        let manifest: Manifest = parse(&bytes, "the manifest")?;
        ensure!(
            manifest.artifact_type.as_deref() == Some(kind.media_type)
                || manifest.config.media_type == kind.config,
            "{} is not a Strata {} (its artifact type is {:?})",
            self.reference,
            kind.what,
            manifest
                .artifact_type
                .as_deref()
                .unwrap_or(&manifest.config.media_type)
        );
        let [layer] = manifest.layers.as_slice() else {
            bail!(
                "{} has {} blobs; a {} has one",
                self.reference,
                manifest.layers.len(),
                kind.what
            );
        };
        ensure!(
            layer.media_type == kind.media_type,
            "{}'s blob is a {:?}, not a {}",
            self.reference,
            layer.media_type,
            kind.what
        );
        ensure!(
            layer.size <= kind.max_size,
            "{}'s {} is {} bytes, over the {} one may be",
            self.reference,
            kind.what,
            layer.size,
            kind.max_size
        );
        self.blob(layer)
    }

    fn describe_repo(&self) -> String {
        format!(
            "the registry {} ({})",
            self.reference.registry, self.reference.repository
        )
    }
}

impl Source for Registry {
    fn describe(&self) -> String {
        self.reference.to_string()
    }

    fn image(&mut self) -> Result<Image> {
        let reference = self.reference.manifest_ref().to_owned();
        let (mut media_type, mut digest, mut bytes) = self.manifest(&reference)?;
        for _ in 0..4 {
            if !is_index(&media_type) {
                break;
            }
            let index: Index = parse(&bytes, "the image index")?;
            let chosen = pick_platform(&index, &self.reference.to_string())?.clone();
            (media_type, digest, bytes) = self.manifest(&chosen.digest)?;
        }
        ensure!(
            media_type.is_empty() || media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST,
            "{} is a {media_type:?}, not an image manifest",
            self.reference
        );
        let manifest: Manifest = parse(&bytes, "the manifest")?;
        let config: Config = parse(
            &self.document(&manifest.config, "the config")?,
            "the config",
        )?;
        image_of(Some(digest), &manifest, config)
    }

    fn open_layer(&mut self, layer: &ImageLayer) -> Result<Box<dyn Read + '_>> {
        let blob = layer
            .blob
            .as_ref()
            .expect("a registry's layers have descriptors");
        let path = self.blob(blob)?;
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Box::new(file))
    }

    fn prefetch(&mut self, layers: &[ImageLayer]) -> Result<()> {
        for layer in layers {
            if let Some(blob) = &layer.blob {
                self.blob(blob)?;
            }
        }
        Ok(())
    }

    fn checks_blobs(&self) -> bool {
        true
    }

    fn done(&mut self) -> Result<()> {
        for path in self.fetched.drain(..) {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }
}

/// What a request carries.
#[derive(Debug)]
enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// A file, opened again for each attempt.
    File(PathBuf),
}

/// Reads a body, refusing one over `limit` bytes.
fn read_limited(
    response: ureq::http::Response<ureq::Body>,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what}"))?;
    ensure!(
        bytes.len() as u64 <= limit,
        "{what} is over {limit} bytes, which it never is"
    );
    Ok(bytes)
}

/// The size and digest of a file.
fn hash_file(path: &Path) -> Result<(u64, String)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    hash_stream(file, u64::MAX).with_context(|| format!("reading {}", path.display()))
}

/// The size and digest of what `from` gives, reading at most `limit` bytes and one more.
pub fn hash_stream(from: impl Read, limit: u64) -> Result<(u64, String)> {
    let mut from = from.take(limit.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 18];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, format!("sha256:{:x}", hasher.finalize())))
}

/// `realm="…",service="…",scope="…"` as a map (values may hold commas inside their quotes).
fn challenge_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            },
        };
        params.insert(key, value.to_owned());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    params
}

/// Credentials for `registry`: `--creds`, else the auth.json `skopeo login` or `podman login`
/// wrote (`--authfile`, `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
/// `~/.config/containers/auth.json`), else Docker's `~/.docker/config.json`.
fn credentials(registry: &str, access: &Access) -> Result<Option<(String, String)>> {
    if let Some(creds) = &access.creds {
        let (user, password) = creds
            .split_once(':')
            .ok_or_else(|| anyhow!("--creds is USER:PASSWORD"))?;
        return Ok(Some((user.to_owned(), password.to_owned())));
    }
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(file) = &access.authfile {
        files.push(file.clone());
    } else {
        if let Some(file) = std::env::var_os("REGISTRY_AUTH_FILE") {
            files.push(file.into());
        }
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
            files.push(Path::new(&dir).join("containers/auth.json"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            files.push(Path::new(&home).join(".config/containers/auth.json"));
            files.push(Path::new(&home).join(".docker/config.json"));
        }
    }
    for file in files {
        let text = match fs::read(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && access.authfile.is_none() => {
                continue;
            }
            Err(e) => return Err(anyhow!(e).context(format!("reading {}", file.display()))),
        };
        #[derive(serde::Deserialize)]
        struct AuthFile {
            #[serde(default)]
            auths: HashMap<String, AuthEntry>,
        }
        #[derive(serde::Deserialize)]
        struct AuthEntry {
            auth: Option<String>,
        }
        let parsed: AuthFile = parse(&text, &file.display().to_string())?;
        let entry = parsed.auths.iter().find(|(key, _)| {
            let key = key
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            key == registry || key.split('/').next() == Some(registry)
        });
        if let Some((_, AuthEntry { auth: Some(auth) })) = entry {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth)
                .with_context(|| {
                    format!("{}: the auth for {registry} is not base64", file.display())
                })?;
            let decoded = String::from_utf8(decoded).with_context(|| {
                format!("{}: the auth for {registry} is not text", file.display())
            })?;
            if let Some((user, password)) = decoded.split_once(':') {
                return Ok(Some((user.to_owned(), password.to_owned())));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_as_docker_reads_them() {
        let r = Reference::parse("127.0.0.1:5000/kiosk/os:v2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "kiosk/os", Some("v2"))
        );
        assert_eq!(r.short_name(), "os");
        let r = Reference::parse("debian").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/debian", Some("latest"))
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("docker://localhost/os@{digest}")).unwrap();
        assert_eq!(r.manifest_ref(), digest);
        assert_eq!(r.tag, None);
        for bad in [
            "localhost/OS:1",
            "localhost/os:a/b",
            "localhost/os@sha256:xyz",
            "localhost/",
            "localhost/os:",
            "localhost/os/../x",
            "host.example/os:a b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges_are_read_with_commas_in_quotes() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
    }
}
