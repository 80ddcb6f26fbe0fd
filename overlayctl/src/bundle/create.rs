//! `bundle create`: the manifest and payload from one tree to another.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ed25519_dalek::{Signer, SigningKey};

use crate::engine::delta::{Compare, DeltaStats, delta};
use crate::engine::manifest::{Content, Fields, entry_line, escape, hash_file};
use crate::engine::{Kind, Layer, MergedNode, MergedView, Node};

use super::diff::Diff;
use super::format::{
    BundleManifest, DELTA_LIMIT, Data, Entry, FORMAT_VERSION, GZIP_LIMIT, GZIP_ZLIB_9, MAGIC,
    PART_LIMIT, Part, ROOT, STREAM_WINDOW_LOG, signed_message,
};
use super::gzip;

/// zstd's level for parts: high, because a bundle is made once and sent to every device.
const ZSTD_LEVEL: i32 = 19;
/// A part's window: the whole part.
const PART_WINDOW_LOG: u32 = 24;
/// zstd's level for a file streamed whole (large files: a lower level keeps them fast).
const STREAM_LEVEL: i32 = 15;
/// Files encoded at once, at most: each diff takes memory (see [`encode_parallel`]).
const MAX_ENCODERS: usize = 4;

/// What `bundle create` made.
#[derive(Debug, Clone, Default)]
pub struct Created {
    pub delta: DeltaStats,
    pub whole: u64,
    /// Files sent as binary diffs against a base file.
    pub bsdiff: u64,
    /// gzip files sent as their content (whole or diffed), compressed again on the device.
    pub gzip: u64,
    /// Files whose content is the base's (new metadata only): no payload.
    pub unchanged: u64,
    pub parts: u64,
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
    let (entries, parts) = match written {
        Ok(written) => written,
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
        parts,
        entries,
    };
    let text = serde_json::to_string(&manifest).context("writing the manifest")?;
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

/// Writes every file's content to the payload file, in parts; returns the manifest's entries
/// and parts.
fn write_payload(
    from: &MergedView<'_>,
    to: &Layer,
    layer: &Layer,
    payload_path: &Path,
    known: &HashMap<PathBuf, String>,
    created: &mut Created,
) -> Result<(Vec<Entry>, Vec<Part>)> {
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
    let renamed = renamed_files(from, to);
    let mut used = std::collections::HashSet::new();
    // Every file's entry, and the job for each first name's content.
    let mut jobs = Vec::new();
    for (rel, node) in &work {
        let mut entry = entry_of(rel, node);
        if let Kind::File { inode, nlink, size } = &node.kind {
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
            let hash = match known.get(&source) {
                Some(hash) => hash.clone(),
                None => {
                    hash_file(&source).with_context(|| format!("hashing {}", source.display()))?
                }
            };
            if unchanged(from, known, rel, *size, &hash) {
                // Only the metadata changed (an upgrade rewrites mtimes of files it did not
                // change): the content is the base's, and nothing goes in the payload.
                created.unchanged += 1;
                entry.data = Some(Data {
                    encoding: "basis".into(),
                    ..Data::default()
                });
            } else {
                jobs.push(Job {
                    entry: entries.len(),
                    rel: rel.clone(),
                    source,
                    size: *size,
                    // Each base file serves one diff at most (a device refuses more).
                    basis: basis_of(from, &renamed, rel, *size)
                        .filter(|(basis_rel, _)| used.insert(basis_rel.clone())),
                });
            }
            entry.hash = Some(hash);
        }
        entries.push(entry);
    }
    let mut packer = Packer::default();
    // Files are encoded a window at a time on every core (at most 256 files or 256 MiB of
    // input each), and packed into parts in tree order.
    let mut start = 0;
    while start < jobs.len() {
        let (mut end, mut input) = (start, 0u64);
        while end < jobs.len() && end - start < 256 && input < 256 << 20 {
            input += jobs[end].size.min(DELTA_LIMIT);
            end += 1;
        }
        for (job, encoded) in jobs[start..end]
            .iter()
            .zip(encode_parallel(&jobs[start..end]))
        {
            let entry = &mut entries[job.entry];
            let data = match encoded? {
                Encoded::Large => {
                    packer.flush(&mut payload)?;
                    created.whole += 1;
                    packer.stream(&job.source, &mut payload)?
                }
                Encoded::Whole { content, gzip } => {
                    created.whole += 1;
                    created.gzip += u64::from(gzip);
                    packer.whole(content, gzip, &mut payload)?
                }
                Encoded::Diff {
                    diff,
                    gzip,
                    basis,
                    from,
                } => {
                    created.bsdiff += 1;
                    created.gzip += u64::from(gzip);
                    let mut data = packer.diff(diff, gzip, &mut payload)?;
                    data.basis = Some(basis);
                    data.from = from;
                    data
                }
            };
            entry.data = Some(data);
        }
        start = end;
    }
    packer.flush(&mut payload)?;
    payload.flush().context("writing the payload")?;
    created.parts = packer.parts.len() as u64;
    Ok((entries, packer.parts))
}

/// Whether the base's file at `rel` has the content `hash` (of `size` bytes): hashed when the
/// base digest did not (a second name of a hard-linked file).
fn unchanged(
    from: &MergedView<'_>,
    known: &HashMap<PathBuf, String>,
    rel: &Path,
    size: u64,
    hash: &str,
) -> bool {
    let Some(node) = from.get(rel) else {
        return false;
    };
    if !matches!(node.node.kind, Kind::File { size: old, .. } if old == size) {
        return false;
    }
    let path = from.source_path(rel, node);
    match known.get(&path) {
        Some(known) => known == hash,
        None => hash_file(&path).is_ok_and(|h| h == hash),
    }
}

/// One file whose content goes in the payload.
struct Job {
    /// Its index among the entries, and its path.
    entry: usize,
    rel: PathBuf,
    source: PathBuf,
    size: u64,
    /// The base's file it may be diffed against: its path in the base, and on disk.
    basis: Option<(PathBuf, PathBuf)>,
}

/// Files of the base the new tree no longer has, by their names' shapes ([`shape`]): an
/// upgraded library's old version, under its old name.
fn renamed_files(from: &MergedView<'_>, to: &Layer) -> HashMap<String, PathBuf> {
    let mut gone = HashMap::new();
    from.walk(&mut |rel, node| {
        if matches!(node.node.kind, Kind::File { size, .. } if size <= DELTA_LIMIT)
            && fs::symlink_metadata(to.root.join(rel)).is_err()
        {
            gone.entry(shape(rel)).or_insert_with(|| rel.to_owned());
        }
    });
    gone
}

/// A path with its digits left out: what the names of one file's versions share
/// (`libfoo.so.1.2.3`, `libfoo.so.1.2.4`).
fn shape(rel: &Path) -> String {
    rel.to_string_lossy()
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .collect()
}

/// The base's file a new file may be diffed against: the one at its path, or an earlier
/// version under another name; both small enough to diff in memory.
fn basis_of(
    from: &MergedView<'_>,
    renamed: &HashMap<String, PathBuf>,
    rel: &Path,
    size: u64,
) -> Option<(PathBuf, PathBuf)> {
    let small = |node: &crate::engine::MergedNode<'_>| matches!(node.node.kind, Kind::File { size, .. } if size <= DELTA_LIMIT);
    let same = from.get(rel);
    let (basis_rel, node) = match same {
        Some(node) if small(node) => (rel.to_owned(), node),
        Some(_) => return None,
        None => {
            let other = renamed.get(&shape(rel))?;
            (other.clone(), from.get(other).filter(|n| small(n))?)
        }
    };
    (size <= DELTA_LIMIT).then(|| {
        let path = from.source_path(&basis_rel, node);
        (basis_rel, path)
    })
}

/// One file's content, encoded.
enum Encoded {
    /// Too large to hold: streamed whole into a part of its own.
    Large,
    Whole {
        content: Vec<u8>,
        gzip: bool,
    },
    Diff {
        diff: Diff,
        gzip: bool,
        basis: String,
        from: Option<String>,
    },
}

/// [`encode`] for each job, on as many threads as there are cores; results in order.
fn encode_parallel(jobs: &[Job]) -> Vec<Result<Encoded>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // bsdiff holds about 17 bytes per byte of an old file (8 MiB: 136 MiB) while it sorts.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_ENCODERS)
        .min(jobs.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, Result<Encoded>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(k) else { break };
                        done.push((k, encode(job)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("an encoder thread panicked"))
            .collect()
    });
    done.sort_by_key(|(k, _)| *k);
    done.into_iter().map(|(_, result)| result).collect()
}

/// A file whole, or a diff against its basis when that compresses smaller; a gzip file that
/// compressing again remakes exactly as its content (and its basis's content).
fn encode(job: &Job) -> Result<Encoded> {
    if job.size > DELTA_LIMIT {
        return Ok(Encoded::Large);
    }
    let source = &job.source;
    let new = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    let unzipped = gzip::content_if_remade(&new, GZIP_LIMIT);
    let gzip = unzipped.is_some();
    let new = unzipped.unwrap_or(new);
    let Some((basis_rel, basis_path)) = &job.basis else {
        return Ok(Encoded::Whole { content: new, gzip });
    };
    let old = fs::read(basis_path).with_context(|| format!("reading {}", basis_path.display()))?;
    let basis = blake3::hash(&old).to_hex().to_string();
    let old = match gzip {
        true => match gzip::content(old.as_slice(), GZIP_LIMIT) {
            Ok(content) => content,
            // The old file is no gzip file: the new one goes as its content, whole.
            Err(_) => return Ok(Encoded::Whole { content: new, gzip }),
        },
        false => old,
    };
    let diff = Diff::make(&old, &new).with_context(|| format!("diffing {}", source.display()))?;
    // Which is smaller once compressed, judged by a fast level on each alone.
    let quick = |bytes: &[u8]| zstd::bulk::compress(bytes, 3).map_or(usize::MAX, |z| z.len());
    let diffed = quick(&diff.controls) + quick(&diff.diff) + quick(&diff.extra);
    let fits = (diff.controls.len() + diff.diff.len() + diff.extra.len()) as u64 <= PART_LIMIT;
    if !fits || diffed >= quick(&new) {
        return Ok(Encoded::Whole { content: new, gzip });
    }
    Ok(Encoded::Diff {
        diff,
        gzip,
        basis,
        from: (*basis_rel != job.rel).then(|| escape(basis_rel.as_os_str().as_bytes())),
    })
}

/// Files' content gathered into parts of at most [`PART_LIMIT`] bytes, each written to the
/// payload as one zstd frame when full.
#[derive(Default)]
struct Packer {
    parts: Vec<Part>,
    /// Whether a file's content is in the part being filled (an empty file's is no bytes).
    claimed: bool,
    controls: Vec<u8>,
    diffs: Vec<u8>,
    literals: Vec<u8>,
    at: u64,
}

impl Packer {
    fn held(&self) -> u64 {
        (self.controls.len() + self.diffs.len() + self.literals.len()) as u64
    }

    /// Makes room for `bytes` more in the part being filled.
    fn room(&mut self, bytes: u64, payload: &mut impl Write) -> Result<()> {
        if self.held() + bytes > PART_LIMIT {
            self.flush(payload)?;
        }
        Ok(())
    }

    fn whole(&mut self, content: Vec<u8>, gzip: bool, payload: &mut impl Write) -> Result<Data> {
        self.room(content.len() as u64, payload)?;
        let data = Data {
            encoding: "whole".into(),
            part: self.parts.len() as u32,
            offset: self.literals.len() as u64,
            length: content.len() as u64,
            gzip: gzip.then(|| GZIP_ZLIB_9.to_owned()),
            ..Data::default()
        };
        self.claimed = true;
        self.literals.extend_from_slice(&content);
        Ok(data)
    }

    fn diff(&mut self, diff: Diff, gzip: bool, payload: &mut impl Write) -> Result<Data> {
        let bytes = diff.controls.len() + diff.diff.len() + diff.extra.len();
        self.room(bytes as u64, payload)?;
        let data = Data {
            encoding: "bsdiff".into(),
            part: self.parts.len() as u32,
            offset: self.controls.len() as u64,
            length: diff.controls.len() as u64,
            diff: Some(self.diffs.len() as u64),
            extra: Some(self.literals.len() as u64),
            gzip: gzip.then(|| GZIP_ZLIB_9.to_owned()),
            ..Data::default()
        };
        self.claimed = true;
        self.controls.extend_from_slice(&diff.controls);
        self.diffs.extend_from_slice(&diff.diff);
        self.literals.extend_from_slice(&diff.extra);
        Ok(data)
    }

    /// Writes the part being filled, if it holds anything.
    fn flush(&mut self, payload: &mut impl Write) -> Result<()> {
        if self.held() == 0 && !self.claimed {
            return Ok(());
        }
        self.claimed = false;
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
        encoder.window_log(PART_WINDOW_LOG)?;
        encoder.long_distance_matching(true)?;
        encoder.set_pledged_src_size(Some(self.held()))?;
        for region in [&self.controls, &self.diffs, &self.literals] {
            encoder.write_all(region)?;
        }
        let frame = encoder.finish()?;
        payload.write_all(&frame).context("writing the payload")?;
        self.parts.push(Part {
            offset: self.at,
            length: frame.len() as u64,
            controls: self.controls.len() as u64,
            diffs: self.diffs.len() as u64,
            literals: self.literals.len() as u64,
            stream: false,
        });
        self.at += frame.len() as u64;
        self.controls.clear();
        self.diffs.clear();
        self.literals.clear();
        Ok(())
    }

    /// A file too large to hold, compressed as it is read into a streamed part of its own.
    fn stream(&mut self, source: &Path, payload: &mut (impl Write + Seek)) -> Result<Data> {
        let file = File::open(source).with_context(|| format!("reading {}", source.display()))?;
        let len = file.metadata()?.len();
        let mut encoder = zstd::stream::write::Encoder::new(&mut *payload, STREAM_LEVEL)?;
        encoder.window_log(STREAM_WINDOW_LOG)?;
        encoder.long_distance_matching(true)?;
        encoder.set_pledged_src_size(Some(len))?;
        let copied = io::copy(&mut BufReader::new(file).take(len), &mut encoder)
            .with_context(|| format!("compressing {}", source.display()))?;
        anyhow::ensure!(
            copied == len,
            "{} changed while it was read",
            source.display()
        );
        encoder.finish()?;
        let length = payload.stream_position().context("writing the payload")? - self.at;
        let part = self.parts.len() as u32;
        self.parts.push(Part {
            offset: self.at,
            length,
            controls: 0,
            diffs: 0,
            literals: len,
            stream: true,
        });
        self.at += length;
        Ok(Data {
            encoding: "whole".into(),
            part,
            offset: 0,
            length: len,
            ..Data::default()
        })
    }
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
