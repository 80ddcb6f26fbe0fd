//! Signed delta bundles: one file carrying the layer from one tree to another, for devices that
//! receive updates from a build server.
//!
//! ```text
//! "STRATAB\x01" | u64 LE manifest length | manifest (TOML) | u32 LE signature count
//!              | count x (32-byte ed25519 public key, 64-byte signature) | payload
//! ```
//!
//! The manifest names the tree the bundle applies to (`base`, a digest of the whole merged
//! tree) and the tree it gives (`target`), and lists every entry of the layer in tree order with
//! its metadata and, for files, the blake3 hash of the content and where the content is in the
//! payload: zstd-compressed whole, or a zstd-compressed fast_rsync delta against the file the
//! base tree has at that path (whose hash is recorded too). Signatures cover the manifest; the
//! manifest covers every byte that is rebuilt, because each rebuilt file is checked against its
//! hash before the layer is added.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::engine::delta::{Compare, DeltaStats, delta};
use crate::engine::manifest::{Content, Fields, entry_line, escape, hash_file, unescape};
use crate::engine::{Kind, Layer, MergedNode, MergedView, Meta, Node};

const MAGIC: &[u8; 8] = b"STRATAB\x02";
const FORMAT_VERSION: u32 = 2;
/// Signatures sign this prefix and the manifest, so they mean nothing elsewhere.
const SIGNING_CONTEXT: &[u8] = b"strata bundle manifest v2\0";
/// A manifest larger than this is refused before it is read.
const MAX_MANIFEST: u64 = 32 << 20;
/// The most a manifest may decompress to (about 500,000 entries).
const MAX_MANIFEST_TEXT: u64 = 128 << 20;
const MAX_SIGNATURES: u32 = 64;
/// Files up to this size are sent as deltas against the old file when that is smaller; both
/// are held in memory while the delta is made and applied. Larger files go whole, streamed.
pub const DELTA_LIMIT: u64 = 64 << 20;
const ZSTD_LEVEL: i32 = 15;
/// The path of the root entry.
const ROOT: &str = ".";
const BLOCK_SIZE: u32 = 1024;

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

fn is_false(b: &bool) -> bool {
    !b
}

/// What `bundle create` made.
#[derive(Debug, Clone, Default)]
pub struct Created {
    pub delta: DeltaStats,
    pub whole: u64,
    /// Files sent as fast_rsync deltas and as zstd patches against the old file.
    pub deltas: u64,
    pub patches: u64,
    /// Files whose content is the base's (new metadata only): no payload.
    pub unchanged: u64,
    pub size: u64,
}

/// The digest of a merged tree: every path in order with its kind, metadata (directory mtimes
/// aside), content hash (or
/// the first other name of the same file), symlink target, device number and xattrs. `hash`
/// gives a file's content hash (from a stored manifest, or by reading it).
pub fn tree_digest(
    view: &MergedView<'_>,
    hash: &mut dyn FnMut(&Path, &MergedNode<'_>) -> Result<String>,
) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut first_name: HashMap<(usize, (u64, u64)), PathBuf> = HashMap::new();
    let mut failed = None;
    view.walk(&mut |rel, node| {
        if failed.is_some() {
            return;
        }
        let content = match &node.node.kind {
            Kind::File { inode, nlink, .. } => {
                match (*nlink > 1)
                    .then(|| first_name.get(&(node.layer, *inode)))
                    .flatten()
                {
                    Some(first) => Some(Content::LinkTo(first)),
                    None => match hash(rel, node) {
                        Ok(h) => Some(Content::Hash(h)),
                        Err(e) => {
                            failed = Some(e);
                            return;
                        }
                    },
                }
            }
            _ => None,
        };
        hasher.update(entry_line(rel, node.node, content, Fields::Tree).as_bytes());
        if let Kind::File { inode, nlink, .. } = &node.node.kind
            && *nlink > 1
        {
            first_name
                .entry((node.layer, *inode))
                .or_insert_with(|| rel.to_owned());
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

/// Hashes a merged view's file by reading it, remembering each hash by the file's path on
/// disk, so that a second digest over the same files (base, then target) reads none again.
pub fn hash_by_reading(
    view: &MergedView<'_>,
    known: &mut HashMap<PathBuf, String>,
    rel: &Path,
    node: &MergedNode<'_>,
) -> Result<String> {
    let path = view.source_path(rel, node);
    if let Some(hash) = known.get(&path) {
        return Ok(hash.clone());
    }
    let hash = hash_file(&path).with_context(|| format!("hashing {}", path.display()))?;
    known.insert(path, hash.clone());
    Ok(hash)
}

/// Makes a bundle at `out` from the tree `from` shows to the plain tree `to`.
pub fn create(
    from: &MergedView<'_>,
    to: &Layer,
    out: &Path,
    key: Option<&SigningKey>,
) -> Result<Created> {
    let to_view_layers = std::slice::from_ref(to);
    let to_view = MergedView::new(to_view_layers);
    // Both digests read every file: at once, on two threads.
    let digest = |view: &MergedView<'_>| {
        let mut known = HashMap::new();
        tree_digest(view, &mut |rel, node| {
            hash_by_reading(view, &mut known, rel, node)
        })
        .map(|digest| (digest, known))
    };
    let (base, target) = std::thread::scope(|scope| {
        let base = scope.spawn(|| digest(from));
        let target = digest(&to_view);
        (base.join().expect("a digest thread panicked"), target)
    });
    let ((base, mut known), (target, known_to)) = (base?, target?);
    known.extend(known_to);
    // Contents compared by hash: a same-size change with an unchanged mtime must not be missed
    // (the bundle would then never rebuild its promised target).
    let (layer, stats) = delta(from, to, Compare::Checksum)
        .with_context(|| format!("comparing {} with the base", to.root.display()))?;

    let mut created = Created {
        delta: stats,
        ..Created::default()
    };
    let payload_path = out.with_extension("payload.part");
    let written = write_payload(from, to, &layer, &payload_path, &known, &mut created);
    let entries = match written {
        Ok(entries) => entries,
        Err(e) => {
            let _ = fs::remove_file(&payload_path);
            return Err(e);
        }
    };
    let offset = fs::metadata(&payload_path)?.len();
    let manifest = BundleManifest {
        version: FORMAT_VERSION,
        base,
        target,
        payload: offset,
        entries,
    };
    let text = toml::to_string(&manifest).context("writing the manifest")?;
    // Stored compressed (its hashes and paths are most of a small update), and signed as stored:
    // a signature is checked before anything is decompressed.
    let packed = zstd::bulk::compress(text.as_bytes(), 19).context("compressing the manifest")?;
    let result = (|| -> Result<u64> {
        let part = out.with_extension("part");
        let mut file = BufWriter::new(
            File::create(&part).with_context(|| format!("creating {}", part.display()))?,
        );
        file.write_all(MAGIC)?;
        file.write_all(&(packed.len() as u64).to_le_bytes())?;
        file.write_all(&packed)?;
        match key {
            Some(key) => {
                file.write_all(&1u32.to_le_bytes())?;
                file.write_all(key.verifying_key().as_bytes())?;
                file.write_all(&key.sign(&signed_message(&packed)).to_bytes())?;
            }
            None => file.write_all(&0u32.to_le_bytes())?,
        }
        io::copy(&mut File::open(&payload_path)?, &mut file)?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let size = file.metadata()?.len();
        fs::rename(&part, out)?;
        Ok(size)
    })()
    .with_context(|| format!("writing {}", out.display()));
    let _ = fs::remove_file(&payload_path);
    if result.is_err() {
        let _ = fs::remove_file(out.with_extension("part"));
    }
    created.size = result?;
    Ok(created)
}

/// Writes every file's content to the payload file; returns the manifest's entries.
fn write_payload(
    from: &MergedView<'_>,
    to: &Layer,
    layer: &Layer,
    payload_path: &Path,
    known: &HashMap<PathBuf, String>,
    created: &mut Created,
) -> Result<Vec<Entry>> {
    let mut payload = BufWriter::new(
        File::create(payload_path)
            .with_context(|| format!("creating {}", payload_path.display()))?,
    );
    // The layer's root first: its metadata is the merged root's.
    let mut root = entry_of(Path::new(""), &layer.tree);
    root.path = ROOT.to_owned();
    let mut entries = vec![root];
    let mut first_name: HashMap<(u64, u64), String> = HashMap::new();
    let mut work = Vec::new();
    walk_nodes(&layer.tree, &mut PathBuf::new(), &mut work);
    // Only the first name of a hard-linked file carries content.
    let mut seen = std::collections::HashSet::new();
    let first_names: Vec<bool> = work
        .iter()
        .map(|(_, node)| match &node.kind {
            Kind::File { inode, nlink, .. } => *nlink <= 1 || seen.insert(*inode),
            _ => false,
        })
        .collect();
    // The basis a changed file is encoded against: the base's file at its path, when both are
    // small enough to hold in memory.
    let basis_of = |rel: &Path, node: &Node| {
        from.get(rel).filter(|b| {
            matches!(b.node.kind, Kind::File { size, .. } if size <= DELTA_LIMIT)
                && matches!(node.kind, Kind::File { size, .. } if size <= DELTA_LIMIT)
        })
    };
    // Windows of files whose deltas and patches are made in parallel (bounded: at most 256
    // files or 256 MiB of input each), then written in order.
    let mut start = 0;
    while start < work.len() {
        let (mut end, mut input) = (start, 0u64);
        while end < work.len() && end - start < 256 && input < 256 << 20 {
            if let Kind::File { size, .. } = work[end].1.kind {
                input += size;
            }
            end += 1;
        }
        let jobs: Vec<(usize, PathBuf, PathBuf)> = (start..end)
            .filter_map(|k| {
                let (rel, node) = &work[k];
                let basis = basis_of(rel, node).filter(|_| first_names[k])?;
                Some((k, from.source_path(rel, basis), to.root.join(rel)))
            })
            .collect();
        let mut encoded = encode_parallel(&jobs);
        for (k, (rel, node)) in work.iter().enumerate().take(end).skip(start) {
            let mut entry = entry_of(rel, node);
            if let Kind::File { inode, nlink, .. } = &node.kind {
                if *nlink > 1 {
                    if let Some(first) = first_name.get(inode) {
                        entry.link = Some(first.clone());
                        entries.push(entry);
                        continue;
                    }
                    first_name.insert(*inode, entry.path.clone());
                }
                let source = to.root.join(rel);
                // The target digest hashed every file of `to` already.
                entry.hash = Some(match known.get(&source) {
                    Some(hash) => hash.clone(),
                    None => hash_file(&source)
                        .with_context(|| format!("hashing {}", source.display()))?,
                });
                let offset = payload.stream_position().context("writing the payload")?;
                let (encoding, basis_hash) = match encoded.remove(&k) {
                    Some(result) => {
                        let (encoding, bytes, basis_hash) = result?;
                        payload.write_all(&bytes).context("writing the payload")?;
                        (encoding, basis_hash)
                    }
                    None => {
                        let file = File::open(&source)
                            .with_context(|| format!("reading {}", source.display()))?;
                        zstd::stream::copy_encode(BufReader::new(file), &mut payload, ZSTD_LEVEL)
                            .with_context(|| format!("compressing {}", source.display()))?;
                        ("whole", None)
                    }
                };
                match encoding {
                    "delta" => created.deltas += 1,
                    "patch" => created.patches += 1,
                    "basis" => created.unchanged += 1,
                    _ => created.whole += 1,
                }
                let end = payload.stream_position().context("writing the payload")?;
                entry.data = Some(Data {
                    encoding: encoding.to_owned(),
                    offset,
                    length: end - offset,
                    basis: basis_hash,
                });
            }
            entries.push(entry);
        }
        start = end;
    }
    payload.flush().context("writing the payload")?;
    Ok(entries)
}

/// One changed file's encoding: its form, bytes, and the hash of the basis it needs.
type Encoded = (&'static str, Vec<u8>, Option<String>);

/// [`encode_small`] for each (index, basis, new file), on as many threads as there are cores.
fn encode_parallel(jobs: &[(usize, PathBuf, PathBuf)]) -> HashMap<usize, Result<Encoded>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len())
        .max(1);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while let Some((k, basis, new)) = jobs.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        done.push((*k, encode_small(basis, new)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("an encoder thread panicked"))
            .collect()
    })
}

/// The basis itself when the content did not change; else whole, delta or patch, whichever is
/// smallest; all held in memory (files up to
/// [`DELTA_LIMIT`]). A delta is fast_rsync's (block matches against the old file), compressed;
/// a patch is the new file compressed with the old one as zstd's reference prefix, as
/// `zstd --patch-from` does, which also finds matches shorter than a block.
fn encode_small(basis: &Path, new: &Path) -> Result<Encoded> {
    let old = fs::read(basis).with_context(|| format!("reading {}", basis.display()))?;
    let data = fs::read(new).with_context(|| format!("reading {}", new.display()))?;
    if old == data {
        // Only the metadata changed (an upgrade rewrites mtimes of files it did not change):
        // the content is the basis itself, and nothing goes in the payload.
        return Ok((
            "basis",
            Vec::new(),
            Some(blake3::hash(&old).to_hex().to_string()),
        ));
    }
    let whole = zstd::bulk::compress(&data, ZSTD_LEVEL).context("compressing")?;
    let signature = fast_rsync::Signature::calculate(
        &old,
        fast_rsync::SignatureOptions {
            block_size: BLOCK_SIZE,
            crypto_hash_size: 8,
        },
    );
    let mut delta = Vec::new();
    fast_rsync::diff(&signature.index(), &data, &mut delta)
        .map_err(|e| anyhow!("making a delta for {}: {e}", new.display()))?;
    let delta = zstd::bulk::compress(&delta, ZSTD_LEVEL).context("compressing")?;
    let patch = patch(&old, &data).with_context(|| format!("compressing {}", new.display()))?;
    let basis_hash = || Some(blake3::hash(&old).to_hex().to_string());
    Ok(if patch.len() < delta.len().min(whole.len()) {
        ("patch", patch, basis_hash())
    } else if delta.len() < whole.len() {
        ("delta", delta, basis_hash())
    } else {
        ("whole", whole, None)
    })
}

/// The largest window a patch uses: the old file and the new one together, up to
/// 2 x [`DELTA_LIMIT`]. Applying one never needs more memory than this.
const PATCH_WINDOW_LOG: u32 = 27;

/// `data` compressed with `old` as the reference prefix.
fn patch(old: &[u8], data: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), ZSTD_LEVEL, old)?;
    // The window must reach back over the whole old file from the end of the new one.
    let total = (old.len() + data.len()).max(1);
    let window_log = (usize::BITS - (total - 1).leading_zeros()).clamp(10, PATCH_WINDOW_LOG);
    encoder.window_log(window_log)?;
    encoder.long_distance_matching(true)?;
    encoder.set_pledged_src_size(Some(data.len() as u64))?;
    encoder.write_all(data)?;
    encoder.finish()
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    [SIGNING_CONTEXT, manifest].concat()
}

fn walk_nodes<'a>(node: &'a Node, path: &mut PathBuf, out: &mut Vec<(PathBuf, &'a Node)>) {
    if !path.as_os_str().is_empty() {
        out.push((path.clone(), node));
    }
    if let Kind::Dir { children, .. } = &node.kind {
        for (name, child) in children {
            path.push(name);
            walk_nodes(child, path, out);
            path.pop();
        }
    }
}

fn entry_of(rel: &Path, node: &Node) -> Entry {
    let m = &node.meta;
    let mut entry = Entry {
        path: escape(rel.as_os_str().as_bytes()),
        kind: node.kind.name().to_owned(),
        opaque: matches!(node.kind, Kind::Dir { opaque: true, .. }),
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        mtime: m.mtime.0,
        mtime_ns: m.mtime.1,
        xattrs: m
            .xattrs
            .iter()
            .map(|(k, v)| (escape(k.as_bytes()), escape(v)))
            .collect(),
        size: None,
        hash: None,
        link: None,
        data: None,
        target: None,
        rdev: None,
    };
    match &node.kind {
        Kind::File { size, .. } => entry.size = Some(*size),
        Kind::Symlink { target } => entry.target = Some(escape(target.as_bytes())),
        Kind::CharDevice { rdev } | Kind::BlockDevice { rdev } => entry.rdev = Some(*rdev),
        _ => {}
    }
    entry
}

/// A bundle file, opened: its manifest read and checked, its signatures parsed.
#[derive(Debug)]
pub struct Bundle {
    pub path: PathBuf,
    pub manifest: BundleManifest,
    manifest_bytes: Vec<u8>,
    pub signatures: Vec<(VerifyingKey, Signature)>,
    payload_start: u64,
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

fn unusable(path: &Path, what: String) -> anyhow::Error {
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

    /// Decompresses every whole file's content and checks it against its hash (deltas need the
    /// base tree, so they are checked when applied).
    pub fn check_whole_files(&self) -> Result<()> {
        let mut payload = File::open(&self.path)?;
        for entry in &self.manifest.entries {
            if entry.data.as_ref().is_some_and(|d| d.encoding == "whole") {
                let rel = PathBuf::from(OsString::from_vec(unescape(&entry.path)));
                self.decode(&mut payload, None, &rel, entry, &mut io::sink())?;
            }
        }
        Ok(())
    }

    /// Rebuilds every file's content into `dir` (plain files at their relative paths) and
    /// returns the layer tree whose files are read from there: deltas applied to the files the
    /// base tree `base` has, each result checked against its hash. Bounded memory: whole files
    /// stream; deltas are only made for files up to [`DELTA_LIMIT`].
    pub fn rebuild(&self, base: &MergedView<'_>, dir: &Path) -> Result<Layer> {
        let mut payload = File::open(&self.path)?;
        let mut root = dir_node(&Entry {
            path: String::new(),
            kind: "dir".into(),
            ..empty_entry()
        });
        let mut inodes: HashMap<String, u64> = HashMap::new();
        for (i, entry) in self.manifest.entries.iter().enumerate() {
            if entry.path == ROOT {
                root = dir_node(entry);
                continue;
            }
            let rel = PathBuf::from(OsString::from_vec(unescape(&entry.path)));
            let node = match entry.kind.as_str() {
                "dir" => dir_node(entry),
                "file" => {
                    let inode = match &entry.link {
                        Some(first) => *inodes.get(first).ok_or_else(|| {
                            anyhow!("{}: links to {first}, which comes later", entry.path)
                        })?,
                        None => {
                            let out_path = dir.join(&rel);
                            if let Some(parent) = out_path.parent() {
                                fs::create_dir_all(parent)?;
                            }
                            let mut out = BufWriter::new(
                                File::create(&out_path)
                                    .with_context(|| format!("creating {}", out_path.display()))?,
                            );
                            self.decode(&mut payload, Some(base), &rel, entry, &mut out)?;
                            // With its metadata, so that the layer can link it as it is.
                            let file = out.into_inner().map_err(|e| e.into_error())?;
                            crate::engine::copy::set_fd_meta(&file, &meta_of(entry))
                                .with_context(|| format!("{}: setting metadata", entry.path))?;
                            i as u64 + 1
                        }
                    };
                    inodes.insert(entry.path.clone(), inode);
                    let size = entry.size.unwrap_or(0);
                    Node {
                        meta: meta_of(entry),
                        kind: Kind::File {
                            size,
                            inode: (0, inode),
                            nlink: 2,
                        },
                    }
                }
                "symlink" => Node {
                    meta: meta_of(entry),
                    kind: Kind::Symlink {
                        target: OsString::from_vec(unescape(entry.target.as_deref().unwrap_or(""))),
                    },
                },
                "char" => Node {
                    meta: meta_of(entry),
                    kind: Kind::CharDevice {
                        rdev: entry.rdev.unwrap_or(0),
                    },
                },
                "block" => Node {
                    meta: meta_of(entry),
                    kind: Kind::BlockDevice {
                        rdev: entry.rdev.unwrap_or(0),
                    },
                },
                "fifo" => Node {
                    meta: meta_of(entry),
                    kind: Kind::Fifo,
                },
                "socket" => Node {
                    meta: meta_of(entry),
                    kind: Kind::Socket,
                },
                "whiteout" => Node {
                    meta: meta_of(entry),
                    kind: Kind::Whiteout,
                },
                other => bail!("{}: unknown kind {other:?}", entry.path),
            };
            insert(&mut root, &rel, node);
        }
        Ok(Layer {
            root: dir.to_owned(),
            ns: crate::engine::XattrNs::Trusted,
            tree: root,
            unclean: Vec::new(),
        })
    }

    /// Writes one file's content to `out`, checked against its hash. `base` is the tree a
    /// delta applies to (None: deltas are refused).
    fn decode(
        &self,
        payload: &mut File,
        base: Option<&MergedView<'_>>,
        rel: &Path,
        entry: &Entry,
        out: &mut dyn Write,
    ) -> Result<()> {
        let data = entry
            .data
            .as_ref()
            .ok_or_else(|| anyhow!("{}: a file without content", entry.path))?;
        let size = entry
            .size
            .ok_or_else(|| anyhow!("{}: a file without a size", entry.path))?;
        let want = entry
            .hash
            .as_deref()
            .ok_or_else(|| anyhow!("{}: a file without a hash", entry.path))?;
        if data
            .offset
            .checked_add(data.length)
            .is_none_or(|end| end > self.manifest.payload)
        {
            bail!("{}: its content lies outside the payload", entry.path);
        }
        payload
            .seek(SeekFrom::Start(self.payload_start + data.offset))
            .with_context(|| format!("{}: reading the payload", entry.path))?;
        let compressed = Read::by_ref(payload).take(data.length);
        let mut hasher = blake3::Hasher::new();
        match data.encoding.as_str() {
            "whole" => {
                let decoder = zstd::stream::read::Decoder::new(compressed)
                    .with_context(|| format!("{}: reading its content", entry.path))?;
                copy_exact(decoder, size, &mut hasher, out, &entry.path)?;
            }
            "basis" => {
                let old = read_basis(base, rel, entry, "basis")?;
                ensure!(
                    data.length == 0,
                    "{}: an unchanged file with content in the payload",
                    entry.path
                );
                copy_exact(old.as_slice(), size, &mut hasher, out, &entry.path)?;
            }
            "patch" => {
                let old = read_basis(base, rel, entry, "patch")?;
                let mut decoder =
                    zstd::stream::read::Decoder::with_ref_prefix(BufReader::new(compressed), &old)
                        .with_context(|| format!("{}: reading its content", entry.path))?;
                decoder.window_log_max(PATCH_WINDOW_LOG)?;
                copy_exact(decoder, size, &mut hasher, out, &entry.path)?;
            }
            "delta" => {
                let old = read_basis(base, rel, entry, "delta")?;
                let mut delta = Vec::new();
                zstd::stream::read::Decoder::new(compressed)?
                    .take(2 * size + (1 << 20))
                    .read_to_end(&mut delta)
                    .with_context(|| format!("{}: its delta is corrupt", entry.path))?;
                let mut rebuilt = Vec::with_capacity(size as usize);
                fast_rsync::apply_limited(&old, &delta, &mut rebuilt, size as usize)
                    .map_err(|e| anyhow!("{}: its delta does not apply: {e}", entry.path))?;
                ensure!(
                    rebuilt.len() as u64 == size,
                    "{}: its delta gives {} bytes, not the {size} the manifest says",
                    entry.path,
                    rebuilt.len()
                );
                hasher.update(&rebuilt);
                out.write_all(&rebuilt)
                    .with_context(|| format!("{}: writing its content", entry.path))?;
            }
            other => bail!("{}: unknown encoding {other:?}", entry.path),
        }
        let got = hasher.finalize().to_hex();
        ensure!(
            got.as_str() == want,
            "{}: the rebuilt content does not match its hash (the bundle is damaged or was tampered with)",
            entry.path
        );
        Ok(())
    }
}

/// Copies exactly `size` bytes of `content` to `out`, hashing them: a longer or shorter stream
/// is an error (one byte more than the size is read, never more: no full disk from a bomb).
fn copy_exact(
    content: impl Read,
    size: u64,
    hasher: &mut blake3::Hasher,
    out: &mut dyn Write,
    path: &str,
) -> Result<()> {
    let mut limited = content.take(size + 1);
    let mut buf = vec![0u8; 1 << 16];
    let mut written = 0u64;
    loop {
        let n = limited
            .read(&mut buf)
            .with_context(|| format!("{path}: its content is corrupt"))?;
        if n == 0 {
            break;
        }
        written += n as u64;
        ensure!(
            written <= size,
            "{path}: its content is longer than the {size} bytes the manifest says"
        );
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("{path}: writing its content"))?;
    }
    ensure!(
        written == size,
        "{path}: its content is {written} bytes, not the {size} the manifest says"
    );
    Ok(())
}

/// The base's file a delta, patch or unchanged file was made against, checked against the hash the entry
/// names; only files up to [`DELTA_LIMIT`] (held in memory).
fn read_basis(
    base: Option<&MergedView<'_>>,
    rel: &Path,
    entry: &Entry,
    what: &str,
) -> Result<Vec<u8>> {
    let size = entry.size.unwrap_or(0);
    ensure!(
        size <= DELTA_LIMIT,
        "{}: a {what} for a file larger than {DELTA_LIMIT} bytes",
        entry.path
    );
    let basis_want = entry
        .data
        .as_ref()
        .and_then(|d| d.basis.as_deref())
        .ok_or_else(|| anyhow!("{}: a {what} without its basis hash", entry.path))?;
    let base = base.ok_or_else(|| anyhow!("{}: a {what} needs the base tree", entry.path))?;
    let node = base
        .get(rel)
        .filter(|n| matches!(n.node.kind, Kind::File { size, .. } if size <= DELTA_LIMIT))
        .ok_or_else(|| {
            anyhow!(
                "{}: the {what}'s basis file is not in this stack",
                entry.path
            )
        })?;
    let basis_path = base.source_path(rel, node);
    let old = fs::read(&basis_path).with_context(|| format!("reading {}", basis_path.display()))?;
    ensure!(
        blake3::hash(&old).to_hex().as_str() == basis_want,
        "{}: this stack's file is not the one the {what} was made against",
        entry.path
    );
    Ok(old)
}

fn empty_entry() -> Entry {
    Entry {
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

fn meta_of(entry: &Entry) -> Meta {
    Meta {
        mode: entry.mode & 0o7777,
        uid: entry.uid,
        gid: entry.gid,
        mtime: (entry.mtime, entry.mtime_ns),
        xattrs: entry
            .xattrs
            .iter()
            .map(|(k, v)| (OsString::from_vec(unescape(k)), unescape(v)))
            .collect(),
    }
}

fn dir_node(entry: &Entry) -> Node {
    Node {
        meta: meta_of(entry),
        kind: Kind::Dir {
            opaque: entry.opaque,
            children: BTreeMap::new(),
        },
    }
}

fn insert(root: &mut Node, rel: &Path, node: Node) {
    let mut here = root;
    let parts: Vec<_> = rel.iter().collect();
    let (last, dirs) = parts
        .split_last()
        .expect("checked: entries are below the root");
    for part in dirs {
        let Kind::Dir { children, .. } = &mut here.kind else {
            unreachable!("checked: parents are directories of the bundle");
        };
        here = children
            .get_mut(*part)
            .expect("checked: parents come first");
    }
    if let Kind::Dir { children, .. } = &mut here.kind {
        children.insert(OsString::from(last), node);
    }
}

/// Every path relative and plain, every parent a directory the bundle made earlier, no path
/// twice, links to earlier files: so rebuilding writes nowhere but below its own directory.
fn check_entries(manifest: &BundleManifest) -> Result<()> {
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

const PUBLIC_TAG: &str = "strata-ed25519-public";
const SECRET_TAG: &str = "strata-ed25519-secret";

pub fn format_public(key: &VerifyingKey) -> String {
    use base64::Engine;
    format!(
        "{PUBLIC_TAG} {}\n",
        base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
    )
}

pub fn format_secret(key: &SigningKey) -> String {
    use base64::Engine;
    format!(
        "{SECRET_TAG} {}\n",
        base64::engine::general_purpose::STANDARD.encode(key.to_bytes())
    )
}

fn decode_key<const N: usize>(text: &str, tag: &str) -> Result<[u8; N]> {
    use base64::Engine;
    let mut words = text.split_whitespace();
    ensure!(
        words.next() == Some(tag),
        "not a {tag} key (the file should start with {tag:?})"
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(words.next().unwrap_or(""))
        .context("the key is not valid base64")?;
    bytes
        .try_into()
        .map_err(|_| anyhow!("the key has the wrong length"))
}

pub fn parse_public(text: &str) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&decode_key::<32>(text, PUBLIC_TAG)?)
        .map_err(|_| anyhow!("not a valid ed25519 public key"))
}

pub fn parse_secret(text: &str) -> Result<SigningKey> {
    Ok(SigningKey::from_bytes(&decode_key::<32>(text, SECRET_TAG)?))
}

/// A new signing key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        filled +=
            rustix::rand::getrandom(&mut seed[filled..], rustix::rand::GetRandomFlags::empty())
                .context("reading random bytes")?;
    }
    Ok(SigningKey::from_bytes(&seed))
}
