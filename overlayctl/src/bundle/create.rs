//! `bundle create`: the manifest and payload from one tree to another.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use ed25519_dalek::{Signer, SigningKey};

use crate::engine::delta::{Compare, DeltaStats, delta};
use crate::engine::manifest::{Content, Fields, entry_line, escape, hash_file};
use crate::engine::{Kind, Layer, MergedNode, MergedView, Node};

use super::format::{
    BundleManifest, DELTA_LIMIT, Data, Entry, FORMAT_VERSION, MAGIC, PATCH_WINDOW_LOG, ROOT,
    signed_message,
};

/// zstd's level for whole files and patches.
const ZSTD_LEVEL: i32 = 15;
/// fast_rsync's block size for the signatures deltas are made against.
const BLOCK_SIZE: u32 = 1024;

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
        ..Entry::empty()
    };
    match &node.kind {
        Kind::File { size, .. } => entry.size = Some(*size),
        Kind::Symlink { target } => entry.target = Some(escape(target.as_bytes())),
        Kind::CharDevice { rdev } | Kind::BlockDevice { rdev } => entry.rdev = Some(*rdev),
        _ => {}
    }
    entry
}
