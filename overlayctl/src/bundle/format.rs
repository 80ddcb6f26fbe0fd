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

pub(super) const MAGIC: &[u8; 8] = b"STRATAB\x02";
pub(super) const FORMAT_VERSION: u32 = 2;
/// Signatures sign this prefix and the manifest, so they mean nothing elsewhere.
pub(super) const SIGNING_CONTEXT: &[u8] = b"strata bundle manifest v2\0";
/// A manifest larger than this is refused before it is read.
pub(super) const MAX_MANIFEST: u64 = 32 << 20;
/// The most a manifest may decompress to (about 500,000 entries).
pub(super) const MAX_MANIFEST_TEXT: u64 = 128 << 20;
pub(super) const MAX_SIGNATURES: u32 = 64;
/// Files up to this size are sent as deltas against the old file when that is smaller; both
/// are held in memory while the delta is made and applied. Larger files go whole, streamed.
pub const DELTA_LIMIT: u64 = 64 << 20;
/// The largest window a patch uses: the old file and the new one together, up to
/// 2 x [`DELTA_LIMIT`]. Applying one never needs more memory than this.
pub(super) const PATCH_WINDOW_LOG: u32 = 27;
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
    #[serde(default, rename = "entry")]
    pub entries: Vec<Entry>,
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

/// Where a file's content is in the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Data {
    /// `whole` or `delta`.
    pub encoding: String,
    pub offset: u64,
    pub length: u64,
    /// For a delta: blake3 of the file it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
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
        let text =
            std::str::from_utf8(&unpacked).map_err(|_| bad("its manifest is not UTF-8".into()))?;
        let manifest: BundleManifest =
            toml::from_str(text).map_err(|e| bad(format!("its manifest: {}", e.message())))?;
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
    dirs.insert(PathBuf::new());
    for (i, entry) in manifest.entries.iter().enumerate() {
        if entry.path == ROOT {
            ensure!(
                i == 0 && entry.kind == "dir",
                "the root entry must come first and be a directory"
            );
            continue;
        }
        let bytes = unescape(&entry.path);
        let rel = PathBuf::from(OsString::from_vec(bytes.clone()));
        let plain = !bytes.is_empty()
            && bytes
                .split(|&b| b == b'/')
                .all(|part| !part.is_empty() && part != b"." && part != b"..")
            && rel.components().all(|c| matches!(c, Component::Normal(_)))
            && escape(&bytes) == entry.path;
        ensure!(
            plain,
            "entry {:?} is not a plain relative path (absolute, empty, `.` or `..`)",
            entry.path
        );
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
            } else {
                ensure!(
                    entry.data.is_some(),
                    "entry {:?} is a file without content",
                    entry.path
                );
            }
            files.insert(&entry.path, entry);
        }
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
        let text = toml::to_string(manifest).unwrap();
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
        other_magic[7] = 1;
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
