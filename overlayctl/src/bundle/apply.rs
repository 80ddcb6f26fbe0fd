//! Rebuilding a bundle's files on the device, each checked against its hash.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::engine::manifest::unescape;
use crate::engine::{Kind, Layer, MergedView, Meta, Node};

use super::diff;
use super::format::{
    Bundle, DELTA_LIMIT, Data, Entry, GZIP_LIMIT, Part, ROOT, STREAM_WINDOW_LOG, plain_path,
};
use super::gzip;

/// Threads copying unchanged files from the base while the parts are decoded.
const COPIERS: usize = 2;

/// What [`Bundle::each_part`] calls for each file: the part, its bytes (None for a streamed
/// part), the entry and its path.
type EachFile<'a> = dyn FnMut(&Part, Option<&[u8]>, &Entry, &Path) -> Result<()> + 'a;

impl Bundle {
    /// Decompresses every part and checks every whole file's content against its hash (diffs
    /// and unchanged files need the base tree, so they are checked when applied).
    pub fn check_whole_files(&self) -> Result<()> {
        self.each_part(&mut |part, region, entry, rel| {
            let data = entry.data.as_ref().expect("indexed: files with content");
            if data.encoding == "whole" {
                let mut out = Checked::new(io::sink());
                self.write_content(part, region, None, rel, entry, &mut out)?;
                out.check(entry)?;
            }
            Ok(())
        })
    }

    /// Rebuilds every file's content into `dir` (plain files at their relative paths) and
    /// returns the layer tree whose files are read from there: diffs applied to the files the
    /// base tree `base` has, each result checked against its hash. Bounded memory: a part at a
    /// time ([`super::PART_LIMIT`] bytes, and its compressed bytes), and a gzip file's content.
    pub fn rebuild(&self, base: &MergedView<'_>, dir: &Path) -> Result<Layer> {
        let mut root = dir_node(&Entry {
            path: String::new(),
            kind: "dir".into(),
            ..Entry::empty()
        });
        let mut inodes: HashMap<String, u64> = HashMap::new();
        // Files whose content is the base's, copied beside the parts' decoding.
        let mut unchanged: Vec<(&Entry, PathBuf)> = Vec::new();
        for (i, entry) in self.manifest.entries.iter().enumerate() {
            if entry.path == ROOT {
                root = dir_node(entry);
                continue;
            }
            let rel = PathBuf::from(OsString::from_vec(unescape(&entry.path)));
            let node = match entry.kind.as_str() {
                "dir" => {
                    // Made here, parents first, so the files written into it need no more.
                    let made = dir.join(&rel);
                    fs::create_dir(&made)
                        .with_context(|| format!("creating {}", made.display()))?;
                    dir_node(entry)
                }
                "file" => {
                    let inode = match &entry.link {
                        Some(first) => *inodes.get(first).ok_or_else(|| {
                            anyhow!("{}: links to {first}, which comes later", entry.path)
                        })?,
                        None => {
                            if entry.data.as_ref().is_some_and(|d| d.encoding == "basis") {
                                unchanged.push((entry, rel.clone()));
                            }
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
        // The content: a part at a time, in the payload's order, on this thread; the unchanged
        // files copied by others meanwhile (reading many files at once is what a cold disk
        // does fastest).
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let copy = || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let Some((entry, rel)) = unchanged.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                write_file(dir, rel, entry, &mut |out| {
                    copy_unchanged(base, rel, entry, out)
                })
                .inspect_err(|_| stop.store(true, Ordering::Relaxed))?;
            }
            Ok(())
        };
        std::thread::scope(|scope| {
            let copiers: Vec<_> = (0..COPIERS).map(|_| scope.spawn(copy)).collect();
            let decoded = self
                .each_part(&mut |part, region, entry, rel| {
                    write_file(dir, rel, entry, &mut |out| {
                        self.write_content(part, region, Some(base), rel, entry, out)
                    })
                })
                .inspect_err(|_| stop.store(true, Ordering::Relaxed));
            let copied = copiers
                .into_iter()
                .try_for_each(|c| c.join().expect("a copying thread panicked"));
            decoded.and(copied)
        })?;
        Ok(Layer {
            root: dir.to_owned(),
            ns: crate::engine::XattrNs::Trusted,
            tree: root,
            unclean: Vec::new(),
        })
    }

    /// Calls `f` for every file with content in the payload, a part at a time in order: the
    /// part, its bytes (None for a streamed part, whose content `f` reads itself), the entry
    /// and its path.
    fn each_part(&self, f: &mut EachFile<'_>) -> Result<()> {
        let parts = &self.manifest.parts;
        let mut by_part: Vec<Vec<&Entry>> = vec![Vec::new(); parts.len()];
        for entry in &self.manifest.entries {
            if let Some(data) = &entry.data
                && data.encoding != "basis"
            {
                by_part
                    .get_mut(data.part as usize)
                    .ok_or_else(|| anyhow!("{}: in a part the bundle lacks", entry.path))?
                    .push(entry);
            }
        }
        let mut payload =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        for (i, (part, entries)) in parts.iter().zip(&by_part).enumerate() {
            let bytes = match part.stream {
                true => None,
                false => Some(
                    self.read_part(&mut payload, part)
                        .with_context(|| format!("part {i} of the payload"))?,
                ),
            };
            if let Some(bytes) = &bytes {
                check_layout(i, part, bytes, entries)?;
            }
            for entry in entries {
                let rel = PathBuf::from(OsString::from_vec(unescape(&entry.path)));
                f(part, bytes.as_deref(), entry, &rel)?;
            }
        }
        Ok(())
    }

    /// A part's bytes, decompressed whole: exactly as many as the manifest says.
    fn read_part(&self, payload: &mut File, part: &Part) -> Result<Vec<u8>> {
        payload.seek(SeekFrom::Start(self.payload_start + part.offset))?;
        let mut compressed = Vec::with_capacity(part.length as usize);
        Read::by_ref(payload)
            .take(part.length)
            .read_to_end(&mut compressed)?;
        ensure!(
            compressed.len() as u64 == part.length,
            "it ends early (truncated)"
        );
        let size = part.size() as usize;
        let mut bytes = Vec::with_capacity(size);
        let got = zstd::bulk::Decompressor::new()?
            .decompress_to_buffer(&compressed, &mut bytes)
            .map_err(|e| anyhow!("it does not decompress to its {size} bytes ({e})"))?;
        ensure!(
            got == size,
            "it decompresses to {got} bytes, not the {size} the manifest says"
        );
        Ok(bytes)
    }

    /// Writes one file's content from its part (`bytes`, or read from the payload when the
    /// part is streamed) to `out`. `base` is the tree a diff applies to (None: diffs are
    /// refused).
    fn write_content(
        &self,
        part: &Part,
        bytes: Option<&[u8]>,
        base: Option<&MergedView<'_>>,
        rel: &Path,
        entry: &Entry,
        out: &mut dyn Write,
    ) -> Result<()> {
        let data = entry.data.as_ref().expect("indexed: files with content");
        let size = entry.size.unwrap_or(0);
        let path = &entry.path;
        let Some(bytes) = bytes else {
            // A streamed part: one file, whole.
            let mut payload = File::open(&self.path)
                .with_context(|| format!("opening {}", self.path.display()))?;
            payload.seek(SeekFrom::Start(self.payload_start + part.offset))?;
            let mut decoder =
                zstd::stream::read::Decoder::new(BufReader::new(payload.take(part.length)))?;
            decoder.window_log_max(STREAM_WINDOW_LOG)?;
            let copied = io::copy(&mut decoder.take(size.saturating_add(1)), out)
                .with_context(|| format!("{path}: its content is corrupt"))?;
            ensure!(
                copied == size,
                "{path}: its content is {copied} bytes, not the {size} the manifest says"
            );
            return Ok(());
        };
        let (c, d) = (part.controls as usize, part.diffs as usize);
        let (controls, diffs, literals) = (&bytes[..c], &bytes[c..c + d], &bytes[c + d..]);
        let gzip = data.gzip.is_some();
        if !gzip {
            return self.decode(controls, diffs, literals, base, rel, entry, out);
        }
        let mut remade = gzip::Remade::new(out);
        self.decode(controls, diffs, literals, base, rel, entry, &mut remade)?;
        remade
            .finish()
            .with_context(|| format!("{path}: writing its content"))?;
        Ok(())
    }

    /// Writes the bytes a part's regions make for one entry: whole, or a diff applied to its
    /// basis (for a gzip file sent as its content, that content).
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        controls: &[u8],
        diffs: &[u8],
        literals: &[u8],
        base: Option<&MergedView<'_>>,
        rel: &Path,
        entry: &Entry,
        target: &mut dyn Write,
    ) -> Result<()> {
        let data = entry.data.as_ref().expect("indexed: files with content");
        let size = entry.size.unwrap_or(0);
        let path = &entry.path;
        let gzip = data.gzip.is_some();
        let region = |from: &[u8], at: u64, len: u64| -> Result<std::ops::Range<usize>> {
            let end = at
                .checked_add(len)
                .filter(|end| *end <= from.len() as u64)
                .ok_or_else(|| anyhow!("{path}: its content lies outside its part"))?;
            Ok(at as usize..end as usize)
        };
        match data.encoding.as_str() {
            "whole" => {
                let range = region(literals, data.offset, data.length)?;
                ensure!(
                    gzip || data.length == size,
                    "{path}: its content is {} bytes, not the {size} the manifest says",
                    data.length
                );
                target.write_all(&literals[range])?;
            }
            "bsdiff" => {
                let own = region(controls, data.offset, data.length)?;
                let (add, copy) = diff::lengths(&controls[own.clone()])
                    .with_context(|| format!("{path}: its diff is damaged"))?;
                let diff_at = region(diffs, data.diff.unwrap_or(0), add)?;
                let extra_at = region(literals, data.extra.unwrap_or(0), copy)?;
                let old = read_basis(base, rel, data, path, &self.used)?;
                let old = match gzip {
                    true => gzip::content(old.as_slice(), GZIP_LIMIT)
                        .with_context(|| format!("{path}: its basis is not a gzip file"))?,
                    false => old,
                };
                let limit = if gzip { GZIP_LIMIT } else { size };
                let written = diff::apply(
                    &old,
                    &controls[own],
                    &diffs[diff_at],
                    &literals[extra_at],
                    limit,
                    target,
                )
                .with_context(|| format!("{path}: its diff does not apply"))?;
                ensure!(
                    gzip || written == size,
                    "{path}: its diff gives {written} bytes, not the {size} the manifest says"
                );
            }
            other => bail!("{path}: unknown encoding {other:?}"),
        }
        Ok(())
    }
}

/// The files of a part use its bytes in order, each byte once, as `bundle create` lays them
/// out: each file's controls, added bytes and new bytes start where the previous file's end,
/// and together they fill the part. So the work a part asks for is bounded by its size.
fn check_layout(i: usize, part: &Part, bytes: &[u8], entries: &[&Entry]) -> Result<()> {
    let (mut controls, mut diffs, mut literals) = (0u64, 0u64, 0u64);
    for entry in entries {
        let data = entry.data.as_ref().expect("indexed: files with content");
        let path = &entry.path;
        let in_order = match data.encoding.as_str() {
            "bsdiff" => {
                let at = data.offset as usize;
                let own = bytes
                    .get(at..at + data.length as usize)
                    .ok_or_else(|| anyhow!("{path}: its controls lie outside its part"))?;
                let (add, copy) =
                    diff::lengths(own).with_context(|| format!("{path}: its diff is damaged"))?;
                let in_order = data.offset == controls
                    && data.diff == Some(diffs)
                    && data.extra == Some(literals);
                controls += data.length;
                diffs = diffs.saturating_add(add);
                literals = literals.saturating_add(copy);
                in_order
            }
            _ => {
                let in_order = data.offset == literals;
                literals += data.length;
                in_order
            }
        };
        ensure!(
            in_order,
            "{path}: its bytes do not start where the previous file's end in part {i}"
        );
    }
    ensure!(
        (controls, diffs, literals) == (part.controls, part.diffs, part.literals),
        "part {i} holds bytes no file uses, or its files use more than it holds"
    );
    Ok(())
}

/// A writer that hashes and counts what it writes, for the check against the manifest.
pub(super) struct Checked<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> Checked<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            written: 0,
        }
    }

    /// The content written is the entry's: its size and its hash.
    fn check(&self, entry: &Entry) -> Result<()> {
        let size = entry.size.unwrap_or(0);
        ensure!(
            self.written == size,
            "{}: its content is {} bytes, not the {size} the manifest says",
            entry.path,
            self.written
        );
        let again = entry.data.as_ref().is_some_and(|d| d.gzip.is_some());
        ensure!(
            Some(self.hasher.finalize().to_hex().as_str()) == entry.hash.as_deref(),
            "{}: the rebuilt content does not match its hash ({})",
            entry.path,
            if again {
                "a gzip file compressed again with zlib at level 9: the bundle is damaged, was tampered with, or was made by an overlayctl whose zlib compresses otherwise"
            } else {
                "the bundle is damaged or was tampered with"
            }
        );
        Ok(())
    }
}

impl<W: Write> Write for Checked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Creates `dir/rel` (its directory made already), writes the entry's content with `fill` (checked against its size and
/// hash), and sets its metadata, so that the layer can link the file as it is.
fn write_file(
    dir: &Path,
    rel: &Path,
    entry: &Entry,
    fill: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let out_path = dir.join(rel);
    let mut file = BufWriter::new(
        File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?,
    );
    let mut out = Checked::new(&mut file as &mut dyn Write);
    fill(&mut out)?;
    out.check(entry)?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    crate::engine::copy::set_fd_meta(&file, &meta_of(entry))
        .with_context(|| format!("{}: setting metadata", entry.path))
}

/// The base's file at the entry's path, copied as it is (only its metadata changed).
fn copy_unchanged(
    base: &MergedView<'_>,
    rel: &Path,
    entry: &Entry,
    out: &mut dyn Write,
) -> Result<()> {
    let node = base
        .get(rel)
        .filter(|n| matches!(n.node.kind, Kind::File { .. }))
        .ok_or_else(|| anyhow!("{}: the unchanged file is not in this stack", entry.path))?;
    let path = base.source_path(rel, node);
    let mut file = File::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut limited = Read::by_ref(&mut file).take(entry.size.unwrap_or(0).saturating_add(1));
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = limited
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("{}: writing its content", entry.path))?;
    }
}

/// The content of the base's file a diff was made against (at the entry's path, or the one it
/// names), checked against the hash the entry names. Each base file serves one diff at most, so
/// a bundle reads no base file twice, however many entries it has.
fn read_basis(
    base: Option<&MergedView<'_>>,
    rel: &Path,
    data: &Data,
    path: &str,
    used: &std::cell::RefCell<std::collections::HashSet<PathBuf>>,
) -> Result<Vec<u8>> {
    let want = data
        .basis
        .as_deref()
        .ok_or_else(|| anyhow!("{path}: a diff without its basis hash"))?;
    let base = base.ok_or_else(|| anyhow!("{path}: a diff needs the base tree"))?;
    let basis_rel = match &data.from {
        Some(from) => plain_path(from)
            .ok_or_else(|| anyhow!("{path}: made from {from:?}, not a plain path"))?,
        None => rel.to_owned(),
    };
    let node = base.get(&basis_rel).ok_or_else(|| {
        anyhow!(
            "{path}: the diff's basis {} is not in this stack",
            basis_rel.display()
        )
    })?;
    ensure!(
        matches!(node.node.kind, Kind::File { size, .. } if size <= DELTA_LIMIT),
        "{path}: the diff's basis {} is not a file of at most {DELTA_LIMIT} bytes in this stack",
        basis_rel.display()
    );
    ensure!(
        used.borrow_mut().insert(basis_rel.clone()),
        "{path}: the diff's basis {} serves another file's diff already",
        basis_rel.display()
    );
    let basis_path = base.source_path(&basis_rel, node);
    let mut old = Vec::new();
    File::open(&basis_path)
        .and_then(|f| f.take(DELTA_LIMIT + 1).read_to_end(&mut old))
        .with_context(|| format!("reading {}", basis_path.display()))?;
    ensure!(
        old.len() as u64 <= DELTA_LIMIT && blake3::hash(&old).to_hex().as_str() == want,
        "{path}: this stack's {} is not the file the diff was made against",
        basis_rel.display()
    );
    Ok(old)
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
