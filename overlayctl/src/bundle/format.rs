//! The bundle file: its header, manifest, signatures and the checks made before anything is
//! rebuilt.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::engine::manifest::{escape, unescape};

pub(super) const MAGIC: &[u8; 8] = b"STRATAB\x03";
pub(super) const FORMAT_VERSION: u32 = 3;
/// Signatures sign this prefix and the manifest, so they mean nothing elsewhere.
pub(super) const SIGNING_CONTEXT: &[u8] = b"strata bundle manifest v3\0";
/// A manifest larger than this is refused before it is read.
pub(super) const MAX_MANIFEST: u64 = 32 << 20;
/// The most a manifest may decompress to (about 500,000 entries).
pub(super) const MAX_MANIFEST_TEXT: u64 = 128 << 20;
pub(super) const MAX_SIGNATURES: u32 = 64;
/// The most a part holds once decompressed: it is decompressed whole into memory, beside its
/// compressed bytes (so applying needs about twice this, whatever the bundle's size).
pub const PART_LIMIT: u64 = 16 << 20;
/// Files up to this size (old and new) are sent as binary diffs against a file of the base
/// when that is smaller than the file itself; larger files go whole.
pub const DELTA_LIMIT: u64 = PART_LIMIT / 2;
/// A gzip file whose content is at most this large may be sent as its content, compressed
/// again on the device (its content and the base's are held in memory to diff them).
pub const GZIP_LIMIT: u64 = 8 << 20;
/// The largest window a streamed part (one file too large for a part) may use: 16 MiB.
pub(super) const STREAM_WINDOW_LOG: u32 = 24;
/// How a gzip file sent as its content is compressed again: zlib's deflate at level 9, a
/// 32 KiB window, gzip's header without name or time from Unix (`gzip -9n` on small files).
pub const GZIP_ZLIB_9: &str = "zlib-9";
/// The path of the root entry.
pub(super) const ROOT: &str = ".";

/// The bundle's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub version: u32,
    /// Digest of the merged tree the bundle applies to.
    pub base: String,
    /// Digest of the merged tree once applied.
    pub target: String,
    /// Bytes of payload after the signatures.
    pub payload: u64,
    /// The payload's parts, in order, end to end.
    #[serde(default, rename = "part")]
    pub parts: Vec<Part>,
    #[serde(default, rename = "entry")]
    pub entries: Vec<Entry>,
}

/// One zstd frame of the payload. Decompressed, a part is three regions end to end: the
/// controls of its binary diffs, the bytes their controls add to the base's, and literal bytes
/// (whole files, and the new bytes of diffs). A streamed part holds one file larger than
/// [`PART_LIMIT`], whole, and is decompressed as a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// Where the frame is in the payload, and its compressed length.
    pub offset: u64,
    pub length: u64,
    #[serde(default)]
    pub controls: u64,
    #[serde(default)]
    pub diffs: u64,
    pub literals: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
}

impl Part {
    /// Bytes once decompressed.
    pub fn size(&self) -> u64 {
        self.controls
            .saturating_add(self.diffs)
            .saturating_add(self.literals)
    }
}

/// One entry of the layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative path, escaped as in layer manifests.
    pub path: String,
    /// `dir`, `file`, `symlink`, `char`, `block`, `fifo`, `socket` or `whiteout`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub opaque: bool,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub mtime: i64,
    #[serde(default)]
    pub mtime_ns: u32,
    /// Escaped names and values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// blake3 of the content, for files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Another name of the same file, earlier in the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Data>,
    /// Symlink target, escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
}

impl Entry {
    /// An entry with nothing set: a directory's mode, no content.
    pub(super) fn empty() -> Self {
        Self {
            path: String::new(),
            kind: String::new(),
            opaque: false,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_ns: 0,
            xattrs: BTreeMap::new(),
            size: None,
            hash: None,
            link: None,
            data: None,
            target: None,
            rdev: None,
        }
    }
}

/// Where a file's content comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Data {
    /// `whole` (bytes in a part's literals), `bsdiff` (a binary diff against a base file) or
    /// `basis` (the base's file at this path, unchanged: no payload).
    pub encoding: String,
    #[serde(default)]
    pub part: u32,
    /// `whole`: where the bytes are in the part's literals. `bsdiff`: where its controls are
    /// in the part's controls.
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub length: u64,
    /// `bsdiff`: where the bytes its controls add start in the part's diff bytes, and where the
    /// bytes they copy start in its literals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<u64>,
    /// `bsdiff`: blake3 of the base file it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    /// `bsdiff`: the base file's path (escaped) when it is not this entry's own: an earlier
    /// version under another name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The bytes are the content of a gzip file, compressed again as this names
    /// ([`GZIP_ZLIB_9`]); a `bsdiff` then applies to the base file's content too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gzip: Option<String>,
}

pub(super) fn is_false(b: &bool) -> bool {
    !b
}

pub(super) fn signed_message(manifest: &[u8]) -> Vec<u8> {
    [SIGNING_CONTEXT, manifest].concat()
}

/// A bundle file, opened: its manifest read and checked, its signatures parsed.
#[derive(Debug)]
pub struct Bundle {
    pub path: PathBuf,
    pub manifest: BundleManifest,
    pub(super) manifest_bytes: Vec<u8>,
    pub signatures: Vec<(VerifyingKey, Signature)>,
    pub(super) payload_start: u64,
    /// Base files that served a diff already (a bundle made by `bundle create` uses each once).
    pub(super) used: std::cell::RefCell<std::collections::HashSet<PathBuf>>,
}

/// What comes before a bundle's payload, read from the start of the file: the header, the
/// signatures and the manifest, not yet checked against the rest of the file
/// ([`BundleHead::check`] does that and gives the [`Bundle`]). It reads nothing but the bytes it
/// is given, so the fuzzer (`tests/src/fuzz_checks.rs`) runs on bytes in memory exactly the code
/// [`Bundle::open`] runs on a file.
#[derive(Debug, Clone)]
pub struct BundleHead {
    pub manifest: BundleManifest,
    /// The manifest as stored (compressed): what the signatures sign.
    pub manifest_bytes: Vec<u8>,
    pub signatures: Vec<(VerifyingKey, Signature)>,
    /// Where the payload starts in the file.
    pub payload_start: u64,
}

pub(super) fn unusable(path: &Path, what: String) -> anyhow::Error {
    anyhow!("{} is not a usable bundle: {what}", path.display())
}

impl BundleHead {
    /// Reads the header, the signatures and the manifest from `from`, the start of the bundle
    /// file `path` (only named in errors), which is `len` bytes long.
    /// With `gate`, the manifest must be signed by one of those keys before it is even parsed.
    pub fn read(
        path: &Path,
        mut from: impl Read,
        len: u64,
        gate: Option<&[(String, VerifyingKey)]>,
    ) -> Result<Self> {
        let bad = |what: String| unusable(path, what);
        let mut magic = [0u8; 8];
        from.read_exact(&mut magic)
            .map_err(|_| bad("it is shorter than a bundle header".into()))?;
        if magic[..7] == MAGIC[..7] && magic[7] != MAGIC[7] {
            return Err(bad(format!(
                "format version {} (this overlayctl reads {FORMAT_VERSION}); make it again with this overlayctl's `bundle create`",
                magic[7]
            )));
        }
        if &magic != MAGIC {
            return Err(bad("it does not start with a Strata bundle header".into()));
        }
        let mut word = [0u8; 8];
        from.read_exact(&mut word)
            .map_err(|_| bad("it ends inside its header".into()))?;
        let manifest_len = u64::from_le_bytes(word);
        if manifest_len > MAX_MANIFEST || manifest_len > len {
            return Err(bad(format!(
                "its manifest claims {manifest_len} bytes (the file has {len}, the limit is {MAX_MANIFEST})"
            )));
        }
        let mut manifest_bytes = vec![0u8; manifest_len as usize];
        from.read_exact(&mut manifest_bytes)
            .map_err(|_| bad("it ends inside its manifest (truncated)".into()))?;
        let mut count = [0u8; 4];
        from.read_exact(&mut count)
            .map_err(|_| bad("it ends before its signatures (truncated)".into()))?;
        let count = u32::from_le_bytes(count);
        if count > MAX_SIGNATURES {
            return Err(bad(format!("it claims {count} signatures")));
        }
        let mut signatures = Vec::new();
        for _ in 0..count {
            let mut key = [0u8; 32];
            let mut sig = [0u8; 64];
            from.read_exact(&mut key)
                .and_then(|()| from.read_exact(&mut sig))
                .map_err(|_| bad("it ends inside its signatures (truncated)".into()))?;
            let key = VerifyingKey::from_bytes(&key)
                .map_err(|_| bad("a signature names an invalid public key".into()))?;
            signatures.push((key, Signature::from_bytes(&sig)));
        }
        // With keys to trust, an unsigned or foreign manifest is refused before it is parsed:
        // parsing costs memory, and only a trusted signer may make us spend it.
        let message = signed_message(&manifest_bytes);
        if let Some(trusted) = gate
            && !signatures.iter().any(|(k, sig)| {
                trusted.iter().any(|(_, t)| t == k) && k.verify(&message, sig).is_ok()
            })
        {
            if signatures
                .iter()
                .any(|(k, _)| trusted.iter().any(|(_, t)| t == k))
            {
                return Err(anyhow!(
                    "{} has a signature that does not match its manifest: it was changed after signing; nothing was added",
                    path.display()
                ));
            }
            return Err(anyhow!(
                "{} is not signed by a key in keys/ ({} trusted); nothing was added (--allow-unsigned to add it anyway)",
                path.display(),
                trusted.len()
            ));
        }
        let mut unpacked = Vec::new();
        zstd::stream::read::Decoder::new(manifest_bytes.as_slice())
            .and_then(|d| d.take(MAX_MANIFEST_TEXT + 1).read_to_end(&mut unpacked))
            .map_err(|e| bad(format!("its manifest does not decompress ({e})")))?;
        if unpacked.len() as u64 > MAX_MANIFEST_TEXT {
            return Err(bad(format!(
                "its manifest decompresses to more than {MAX_MANIFEST_TEXT} bytes"
            )));
        }
        // JSON, read straight into the manifest's types: a TOML document of the same entries
        // took ten times the memory to parse.
        let manifest: BundleManifest =
            serde_json::from_slice(&unpacked).map_err(|e| bad(format!("its manifest: {e}")))?;
        drop(unpacked);
        if manifest.version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} (this overlayctl reads {FORMAT_VERSION})",
                manifest.version
            )));
        }
        // Read so far: magic, length, manifest, count, and a key and a signature each.
        let payload_start = 8 + 8 + manifest_len + 4 + u64::from(count) * (32 + 64);
        Ok(Self {
            manifest,
            manifest_bytes,
            signatures,
            payload_start,
        })
    }

    /// Checks the head against the whole file (`len` bytes): the payload is all there, and every
    /// path is relative, without `..`, under a directory the bundle itself creates.
    pub fn check(self, path: &Path, len: u64) -> Result<Bundle> {
        let bad = |what: String| unusable(path, what);
        if len != self.payload_start.saturating_add(self.manifest.payload) {
            return Err(bad(format!(
                "its payload should be {} bytes but {} are there (truncated or extended)",
                self.manifest.payload,
                len.saturating_sub(self.payload_start)
            )));
        }
        check_entries(&self.manifest).map_err(|e| bad(e.to_string()))?;
        Ok(Bundle {
            path: path.to_owned(),
            manifest: self.manifest,
            manifest_bytes: self.manifest_bytes,
            signatures: self.signatures,
            payload_start: self.payload_start,
            used: Default::default(),
        })
    }
}

impl Bundle {
    /// Reads and checks everything but the payload: the header, the manifest (every path
    /// relative, without `..`, under a directory the bundle itself creates), the signatures, and
    /// that the payload is all there.
    /// With `gate`, the manifest must be signed by one of those keys before it is even parsed.
    pub fn open(path: &Path, gate: Option<&[(String, VerifyingKey)]>) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        BundleHead::read(path, &mut file, len, gate)?.check(path, len)
    }

    /// The keys among `trusted` that signed this bundle's manifest validly.
    pub fn signed_by<'k>(&self, trusted: &'k [(String, VerifyingKey)]) -> Vec<&'k str> {
        let message = signed_message(&self.manifest_bytes);
        trusted
            .iter()
            .filter(|(_, key)| {
                self.signatures
                    .iter()
                    .any(|(k, sig)| k == key && key.verify(&message, sig).is_ok())
            })
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Whether every signature in the file is valid for the manifest (whoever made it).
    pub fn signatures_valid(&self) -> bool {
        let message = signed_message(&self.manifest_bytes);
        self.signatures
            .iter()
            .all(|(k, sig)| k.verify(&message, sig).is_ok())
    }
}

/// Every path relative and plain, every parent a directory the bundle made earlier, no path
/// twice, links to earlier files: so rebuilding writes nowhere but below its own directory.
pub(super) fn check_entries(manifest: &BundleManifest) -> Result<()> {
    let mut dirs: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut seen: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut files: HashMap<&str, &Entry> = HashMap::new();
    let mut in_stream = vec![0u32; manifest.parts.len()];
    check_parts(manifest)?;
    dirs.insert(PathBuf::new());
    for (i, entry) in manifest.entries.iter().enumerate() {
        if entry.path == ROOT {
            ensure!(
                i == 0 && entry.kind == "dir",
                "the root entry must come first and be a directory"
            );
            continue;
        }
        let rel = plain_path(&entry.path).ok_or_else(|| {
            anyhow!(
                "entry {:?} is not a plain relative path (absolute, empty, `.` or `..`)",
                entry.path
            )
        })?;
        for name in entry.xattrs.keys() {
            let name = unescape(name);
            ensure!(
                !name.starts_with(b"trusted.overlay.") && !name.starts_with(b"user.overlay."),
                "entry {:?} sets overlayfs's own attribute {:?}; a bundle says what is opaque or deleted with its entries, not with attributes",
                entry.path,
                String::from_utf8_lossy(&name)
            );
        }
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        ensure!(
            dirs.contains(&parent),
            "entry {:?} is not under a directory the bundle made before it (a path through a symlink or a file?)",
            entry.path
        );
        ensure!(
            seen.insert(rel.clone()),
            "entry {:?} appears twice",
            entry.path
        );
        if entry.kind == "dir" {
            dirs.insert(rel);
        }
        if entry.kind == "file" {
            if let Some(first) = &entry.link {
                let Some(first_entry) = files.get(first.as_str()) else {
                    bail!(
                        "entry {:?} links to {first:?}, which is not an earlier file",
                        entry.path
                    );
                };
                // One file, one set of metadata: a link that says otherwise would make the
                // promised tree differ from the written one.
                fn same(
                    e: &Entry,
                ) -> (
                    u32,
                    u32,
                    u32,
                    i64,
                    u32,
                    &BTreeMap<String, String>,
                    Option<u64>,
                ) {
                    (e.mode, e.uid, e.gid, e.mtime, e.mtime_ns, &e.xattrs, e.size)
                }
                ensure!(
                    same(entry) == same(first_entry) && entry.data.is_none(),
                    "entry {:?} is another name of {first:?} but claims other metadata or content",
                    entry.path
                );
            }
            files.insert(&entry.path, entry);
        }
        if let Some(data) = &entry.data {
            check_data(manifest, entry, data, &mut in_stream)?;
        } else {
            ensure!(
                entry.kind != "file" || entry.link.is_some(),
                "entry {:?} is a file without content",
                entry.path
            );
        }
    }
    for (i, used) in in_stream.iter().enumerate() {
        ensure!(
            !manifest.parts[i].stream || *used == 1,
            "part {i} is streamed but holds {used} files (it must hold one)"
        );
    }
    Ok(())
}

/// The path an escaped relative path names, when it is plain: not empty, not absolute, no `.`
/// or `..`, escaped as this overlayctl escapes it.
pub(super) fn plain_path(escaped: &str) -> Option<PathBuf> {
    let bytes = unescape(escaped);
    let rel = PathBuf::from(OsString::from_vec(bytes.clone()));
    let plain = !bytes.is_empty()
        && bytes
            .split(|&b| b == b'/')
            .all(|part| !part.is_empty() && part != b"." && part != b"..")
        && rel.components().all(|c| matches!(c, Component::Normal(_)))
        && escape(&bytes) == escaped;
    plain.then_some(rel)
}

/// The parts lie end to end over the whole payload, each within the limit a device holds in
/// memory (a streamed part aside).
fn check_parts(manifest: &BundleManifest) -> Result<()> {
    let mut at = 0u64;
    for (i, part) in manifest.parts.iter().enumerate() {
        ensure!(
            part.offset == at,
            "part {i} starts at byte {} of the payload, not where the part before ends ({at})",
            part.offset
        );
        at = at
            .checked_add(part.length)
            .ok_or_else(|| anyhow!("part {i} is longer than any file"))?;
        if part.stream {
            ensure!(
                part.controls == 0 && part.diffs == 0,
                "part {i} is streamed but holds diffs"
            );
        } else {
            ensure!(
                part.size() <= PART_LIMIT
                    && part.controls.saturating_add(part.diffs) <= PART_LIMIT
                    && part.length <= PART_LIMIT + (PART_LIMIT >> 4),
                "part {i} holds {} bytes ({} compressed); a part may hold {PART_LIMIT}",
                part.size(),
                part.length
            );
        }
    }
    ensure!(
        at == manifest.payload,
        "the parts cover {at} bytes of a {}-byte payload",
        manifest.payload
    );
    Ok(())
}

/// One file's content: its encoding known, its bytes inside its part's regions, its basis
/// named and its path plain.
fn check_data(
    manifest: &BundleManifest,
    entry: &Entry,
    data: &Data,
    in_stream: &mut [u32],
) -> Result<()> {
    let path = &entry.path;
    ensure!(
        entry.kind == "file" && entry.link.is_none(),
        "entry {path:?} has content but is not a file's first name"
    );
    ensure!(
        entry.size.is_some() && entry.hash.is_some(),
        "entry {path:?} is a file without a size or a hash"
    );
    if let Some(how) = &data.gzip {
        ensure!(
            how == GZIP_ZLIB_9,
            "entry {path:?} is compressed again with {how:?}, which this overlayctl does not know"
        );
    }
    if let Some(from) = &data.from {
        ensure!(
            plain_path(from).is_some(),
            "entry {path:?} is made from {from:?}, not a plain relative path"
        );
    }
    let within =
        |start: u64, len: u64, region: u64| start.checked_add(len).is_some_and(|end| end <= region);
    let part = || {
        manifest.parts.get(data.part as usize).ok_or_else(|| {
            anyhow!(
                "entry {path:?} is in part {}, which the bundle does not have",
                data.part
            )
        })
    };
    match data.encoding.as_str() {
        "basis" => ensure!(
            data.length == 0 && data.basis.is_none() && data.from.is_none() && data.gzip.is_none(),
            "entry {path:?} is the base's file unchanged but claims content or another basis"
        ),
        "whole" => {
            let part = part()?;
            ensure!(
                within(data.offset, data.length, part.literals),
                "entry {path:?} lies outside its part's literal bytes"
            );
            ensure!(
                data.gzip.is_some() || Some(data.length) == entry.size,
                "entry {path:?} has {} bytes of content, not the {} its size says",
                data.length,
                entry.size.unwrap_or(0)
            );
            if part.stream {
                in_stream[data.part as usize] += 1;
                ensure!(
                    data.offset == 0 && data.length == part.literals && data.gzip.is_none(),
                    "entry {path:?} is not the whole of its streamed part"
                );
            }
        }
        "bsdiff" => {
            let part = part()?;
            ensure!(!part.stream, "entry {path:?} is a diff in a streamed part");
            ensure!(
                within(data.offset, data.length, part.controls),
                "entry {path:?} lies outside its part's controls"
            );
            ensure!(
                data.diff.is_some_and(|d| d <= part.diffs),
                "entry {path:?} lies outside its part's diff bytes"
            );
            ensure!(
                data.extra.is_some_and(|x| x <= part.literals),
                "entry {path:?} lies outside its part's literal bytes"
            );
            ensure!(
                data.basis.is_some(),
                "entry {path:?} is a diff without its basis's hash"
            );
        }
        other => bail!("entry {path:?} has an unknown encoding {other:?}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn manifest(version: u32) -> BundleManifest {
        BundleManifest {
            version,
            base: "blake3:00".into(),
            target: "blake3:11".into(),
            payload: 0,
            parts: Vec::new(),
            entries: vec![Entry {
                path: ROOT.into(),
                kind: "dir".into(),
                mtime: 1,
                ..Entry::empty()
            }],
        }
    }

    /// A bundle's head as `bundle create` writes it: magic, length, the compressed manifest,
    /// and each signer's key and signature.
    fn head(manifest: &BundleManifest, signers: &[&SigningKey]) -> Vec<u8> {
        let text = serde_json::to_string(manifest).unwrap();
        let packed = zstd::bulk::compress(text.as_bytes(), 3).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend((packed.len() as u64).to_le_bytes());
        out.extend(&packed);
        out.extend((signers.len() as u32).to_le_bytes());
        for key in signers {
            out.extend(key.verifying_key().as_bytes());
            out.extend(key.sign(&signed_message(&packed)).to_bytes());
        }
        out
    }

    fn read(bytes: &[u8], gate: Option<&[(String, VerifyingKey)]>) -> Result<BundleHead> {
        BundleHead::read(Path::new("b.bundle"), bytes, bytes.len() as u64, gate)
    }

    #[test]
    fn a_head_reads_back_with_its_signatures() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let bytes = head(&manifest(FORMAT_VERSION), &[&key]);
        let trusted = [("ci".to_owned(), key.verifying_key())];
        let head = read(&bytes, Some(&trusted)).unwrap();
        assert_eq!(head.manifest, manifest(FORMAT_VERSION));
        assert_eq!(head.signatures.len(), 1);
        assert_eq!(head.payload_start, bytes.len() as u64);
    }

    #[test]
    fn another_format_version_is_named() {
        let bytes = head(&manifest(1), &[]);
        let e = read(&bytes, None).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "b.bundle is not a usable bundle: format version 1 (this overlayctl reads {FORMAT_VERSION})"
            )
        );
    }

    #[test]
    fn bad_heads_are_refused_with_what_is_wrong() {
        let good = head(&manifest(FORMAT_VERSION), &[]);
        let mut other_magic = good.clone();
        other_magic[0] = b'X';
        let mut version_2 = good.clone();
        version_2[7] = 2;
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&(MAX_MANIFEST + 1).to_le_bytes());
        let mut many = good[..good.len() - 4].to_vec();
        many.extend((MAX_SIGNATURES + 1).to_le_bytes());
        for (bytes, said) in [
            (&good[..5], "shorter than a bundle header"),
            (
                &other_magic[..],
                "does not start with a Strata bundle header",
            ),
            (
                &version_2[..],
                "format version 2 (this overlayctl reads 3); make it again",
            ),
            (&good[..12], "ends inside its header"),
            (&huge[..], "its manifest claims"),
            (&good[..20], "ends inside its manifest"),
            (&good[..good.len() - 2], "ends before its signatures"),
            (&many[..], "claims 65 signatures"),
        ] {
            // Read as a stream cut short: the file is as long as the whole head.
            let len = good.len() as u64;
            let e = BundleHead::read(Path::new("b.bundle"), bytes, len, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(said), "{said:?}: {e}");
        }
    }

    /// A manifest with one file whose content is `data`, over `parts`.
    fn with_file(parts: Vec<Part>, data: Data) -> BundleManifest {
        let mut m = manifest(FORMAT_VERSION);
        m.payload = parts.last().map_or(0, |p| p.offset + p.length);
        m.parts = parts;
        m.entries.push(Entry {
            path: "f".into(),
            kind: "file".into(),
            size: Some(4),
            hash: Some("h".into()),
            data: Some(data),
            ..Entry::empty()
        });
        m
    }

    fn part(offset: u64, length: u64, literals: u64) -> Part {
        Part {
            offset,
            length,
            controls: 0,
            diffs: 0,
            literals,
            stream: false,
        }
    }

    fn whole(part: u32, offset: u64, length: u64) -> Data {
        Data {
            encoding: "whole".into(),
            part,
            offset,
            length,
            ..Data::default()
        }
    }

    #[test]
    fn parts_and_content_are_checked_before_anything_is_read() {
        let good = with_file(vec![part(0, 10, 4)], whole(0, 0, 4));
        check_entries(&good).unwrap();
        let diff = Data {
            encoding: "bsdiff".into(),
            length: 3,
            diff: Some(0),
            extra: Some(0),
            basis: Some("b".into()),
            ..Data::default()
        };
        let with_controls = |mut p: Part| {
            p.controls = 3;
            p
        };
        let streamed = |mut p: Part| {
            p.stream = true;
            p
        };
        check_entries(&with_file(
            vec![with_controls(part(0, 10, 4))],
            diff.clone(),
        ))
        .unwrap();
        for (manifest, said) in [
            (
                with_file(vec![part(0, 10, 4), part(12, 5, 1)], whole(0, 0, 4)),
                "part 1 starts at byte 12 of the payload, not where the part before ends (10)",
            ),
            (
                with_file(vec![part(0, 10, PART_LIMIT + 1)], whole(0, 0, 4)),
                "part 0 holds 16777217 bytes",
            ),
            (
                with_file(vec![part(0, 10, 4)], whole(1, 0, 4)),
                "is in part 1, which the bundle does not have",
            ),
            (
                with_file(vec![part(0, 10, 4)], whole(0, 2, 4)),
                "lies outside its part's literal bytes",
            ),
            (
                with_file(vec![part(0, 10, 4)], whole(0, u64::MAX, 4)),
                "lies outside its part's literal bytes",
            ),
            (
                with_file(vec![part(0, 10, 4)], diff.clone()),
                "lies outside its part's controls",
            ),
            (
                with_file(
                    vec![with_controls(part(0, 10, 4))],
                    Data {
                        basis: None,
                        ..diff.clone()
                    },
                ),
                "a diff without its basis's hash",
            ),
            (
                with_file(
                    vec![with_controls(part(0, 10, 4))],
                    Data {
                        from: Some("../etc/shadow".into()),
                        ..diff.clone()
                    },
                ),
                "is made from \"../etc/shadow\", not a plain relative path",
            ),
            (
                with_file(
                    vec![part(0, 10, 4)],
                    Data {
                        gzip: Some("brotli".into()),
                        ..whole(0, 0, 4)
                    },
                ),
                "compressed again with \"brotli\"",
            ),
            (
                with_file(vec![streamed(part(0, 10, 9))], whole(0, 0, 4)),
                "is not the whole of its streamed part",
            ),
            (
                with_file(
                    vec![part(0, 10, 4)],
                    Data {
                        encoding: "patch".into(),
                        ..whole(0, 0, 4)
                    },
                ),
                "unknown encoding \"patch\"",
            ),
            (
                with_file(
                    vec![],
                    Data {
                        encoding: "basis".into(),
                        length: 3,
                        ..Data::default()
                    },
                ),
                "unchanged but claims content",
            ),
        ] {
            let e = check_entries(&manifest).unwrap_err().to_string();
            assert!(e.contains(said), "{said:?}: {e}");
        }
        // A streamed part that no file claims, or the payload longer than the parts.
        let mut unclaimed = with_file(vec![streamed(part(0, 10, 4))], whole(0, 0, 4));
        unclaimed.entries.pop();
        let e = check_entries(&unclaimed).unwrap_err().to_string();
        assert!(e.contains("part 0 is streamed but holds 0 files"), "{e}");
        let mut longer = good.clone();
        longer.payload += 1;
        let e = check_entries(&longer).unwrap_err().to_string();
        assert!(
            e.contains("the parts cover 10 bytes of a 11-byte payload"),
            "{e}"
        );
    }

    #[test]
    fn the_gate_refuses_unsigned_and_changed_manifests_before_parsing() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let trusted = [("ci".to_owned(), key.verifying_key())];
        let unsigned = head(&manifest(FORMAT_VERSION), &[]);
        let e = read(&unsigned, Some(&trusted)).unwrap_err().to_string();
        assert!(e.contains("is not signed by a key in keys/"), "{e}");
        // One byte of the manifest changed after signing.
        let mut changed = head(&manifest(FORMAT_VERSION), &[&key]);
        changed[20] ^= 1;
        let e = read(&changed, Some(&trusted)).unwrap_err().to_string();
        assert!(e.contains("does not match its manifest"), "{e}");
        // Signed by a key nobody trusts.
        let stranger = SigningKey::from_bytes(&[9; 32]);
        let foreign = head(&manifest(FORMAT_VERSION), &[&stranger]);
        let e = read(&foreign, Some(&trusted)).unwrap_err().to_string();
        assert!(e.contains("is not signed by a key in keys/"), "{e}");
    }
}
