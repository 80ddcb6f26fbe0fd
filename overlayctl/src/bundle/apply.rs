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

use super::format::{Bundle, DELTA_LIMIT, Entry, PATCH_WINDOW_LOG, ROOT};

impl Bundle {
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
            ..Entry::empty()
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
