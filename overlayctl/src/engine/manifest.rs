//! The canonical manifest of a layer and its digest: one line per entry in path order, with
//! metadata and a blake3 hash of each file's content. Equal layers have equal manifests, on any
//! machine; the digest (`blake3:` and the hash of the manifest) goes into the plan.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::tree::{Kind, Layer, LayerError, Meta, Node, XattrNs};

/// A layer's manifest text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub text: String,
}

impl Manifest {
    /// Builds the manifest of a layer, reading every file to hash it.
    pub fn of_layer(layer: &Layer) -> Result<Self, LayerError> {
        Self::of_layer_with(layer, &mut |rel| hash_file(&layer.root.join(rel)))
    }

    /// Builds the manifest of a layer with each file's content hash from `hash` (given the
    /// file's path in the layer): known hashes spare reading the files.
    pub fn of_layer_with(
        layer: &Layer,
        hash: &mut dyn FnMut(&Path) -> io::Result<String>,
    ) -> Result<Self, LayerError> {
        let mut text = String::new();
        let mut first_path_of_inode: HashMap<(u64, u64), PathBuf> = HashMap::new();
        let mut path = PathBuf::new();
        write_node(
            layer,
            &layer.tree,
            &mut path,
            &mut first_path_of_inode,
            hash,
            &mut text,
        )?;
        Ok(Self { text })
    }

    /// The size and content hash of every file the manifest lists, by path (other names of a
    /// file included).
    pub fn file_hashes(&self) -> HashMap<PathBuf, (u64, String)> {
        let mut hashes: HashMap<PathBuf, (u64, String)> = HashMap::new();
        for line in self.text.lines() {
            let mut fields = line.split(' ');
            let (Some(path), Some("file")) = (fields.next(), fields.next()) else {
                continue;
            };
            let path = PathBuf::from(OsStr::from_bytes(&unescape(path)));
            let mut size = None;
            for field in fields {
                if let Some(n) = field.strip_prefix("size=") {
                    size = n.parse().ok();
                }
                if let (Some(hash), Some(size)) = (field.strip_prefix("blake3="), size) {
                    hashes.insert(path, (size, hash.to_owned()));
                    break;
                }
                if let Some(first) = field.strip_prefix("link=") {
                    let first = PathBuf::from(OsStr::from_bytes(&unescape(first)));
                    if let Some(known) = hashes.get(&first).cloned() {
                        hashes.insert(path, known);
                    }
                    break;
                }
            }
        }
        hashes
    }

    /// `blake3:` and the hex hash of the text.
    pub fn digest(&self) -> String {
        format!("blake3:{}", blake3::hash(self.text.as_bytes()).to_hex())
    }

    /// The first path, in manifest order, whose line differs between two manifests (present in
    /// one only, or different). A directory whose only difference is its mtime (which any change
    /// inside it makes) is named only when nothing else differs.
    pub fn first_difference(&self, other: &Manifest) -> Option<String> {
        let lines = |m: &'_ Manifest| -> BTreeMap<PathBuf, String> {
            m.text
                .lines()
                .map(|line| {
                    let path = match line.split(' ').next().unwrap_or_default() {
                        "." => PathBuf::new(),
                        path => PathBuf::from(OsStr::from_bytes(&unescape(path))),
                    };
                    (path, line.to_owned())
                })
                .collect()
        };
        let (ours, theirs) = (lines(self), lines(other));
        let differing = ours
            .keys()
            .chain(theirs.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|path| ours.get(*path) != theirs.get(*path));
        let mut first_mtime_only = None;
        for path in differing {
            let (a, b) = (ours.get(path), theirs.get(path));
            let dir_mtime_only = matches!((a, b), (Some(a), Some(b)) if without_mtime(a) == without_mtime(b) && a.contains(" dir "));
            let shown = escape(path.as_os_str().as_bytes());
            let shown = if shown.is_empty() {
                ".".to_owned()
            } else {
                shown
            };
            if !dir_mtime_only {
                return Some(shown);
            }
            first_mtime_only.get_or_insert(shown);
        }
        first_mtime_only
    }
}

impl Manifest {
    /// Whether `copy` is this manifest with every timestamp cut to whole seconds, as a store
    /// copied by a tool that keeps no sub-second times reads (`mkfs.ext4 -d`, tar's ustar
    /// format): line for line the same but where this has `mtime=S.N` and the copy `mtime=S.0`.
    pub fn same_but_whole_second_mtimes(&self, copy: &Manifest) -> bool {
        let (ours, theirs) = (self.text.lines(), copy.text.lines());
        ours.clone().count() == theirs.clone().count()
            && ours.zip(theirs).all(|(a, b)| {
                a == b || {
                    let (a, b) = (a.split(' '), b.split(' '));
                    a.clone().count() == b.clone().count()
                        && a.zip(b).all(|(a, b)| a == b || whole_second_of(a, b))
                }
            })
    }
}

impl Manifest {
    /// The layer this manifest describes, as [`Layer::read`] would read it from `root`, without
    /// reading the disk: every entry with its metadata, from the lines alone. Hard links come out
    /// as files sharing an inode number made up from `dev` (no real device has it) and the
    /// line of the group's first path, with the group's size as link count; walking the layer
    /// could only count more links (to names outside it), which a layer never shows.
    /// An error names the first line that is not one this manifest format writes.
    pub fn to_layer(&self, root: &Path, ns: XattrNs, dev: u64) -> Result<Layer, String> {
        let mut entries: Vec<(PathBuf, Node)> = Vec::new();
        // Each file's group (the line of its first name) and size, by path.
        let mut group_of: HashMap<PathBuf, (usize, u64)> = HashMap::new();
        let mut links: HashMap<usize, u64> = HashMap::new();
        for (number, line) in self.text.lines().enumerate() {
            let bad = |why: &str| format!("manifest line {}: {why}: {line:?}", number + 1);
            let mut fields = line.split(' ');
            let path = match fields.next() {
                Some(".") => PathBuf::new(),
                Some(path) if !path.is_empty() => PathBuf::from(OsStr::from_bytes(&unescape(path))),
                _ => return Err(bad("no path")),
            };
            if (number == 0) != path.as_os_str().is_empty() {
                return Err(bad("the root comes first, and only there"));
            }
            // Names only: no `/` at the start, no `.` or `..` (the merge writes every name it
            // is given, one directory handle at a time).
            let plain = path
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            let canonical = path.as_os_str().as_bytes() == rejoined(&path);
            if !plain || !canonical {
                return Err(bad("a path that is not a plain relative path"));
            }
            let kind = fields.next().ok_or_else(|| bad("no kind"))?;
            let mut meta = Meta {
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: (0, 0),
                xattrs: Default::default(),
            };
            let (mut size, mut link, mut opaque, mut target, mut rdev) =
                (None, None, false, None, None);
            let mut seen: Vec<&str> = Vec::new();
            for field in fields {
                let number = |text: &str| text.parse::<u64>().map_err(|_| bad("a bad number"));
                let id = |text: &str| text.parse::<u32>().map_err(|_| bad("a bad owner"));
                let (key, value) = match field.split_once('=') {
                    Some(pair) => pair,
                    None if field == "opaque" => (field, ""),
                    None => return Err(bad("a field without a value")),
                };
                if !key.starts_with("xattr.") && seen.contains(&key) {
                    return Err(bad("a field twice"));
                }
                seen.push(key);
                match key {
                    "mode" => {
                        meta.mode = u32::from_str_radix(value, 8)
                            .ok()
                            .filter(|m| *m <= 0o7777)
                            .ok_or_else(|| bad("a bad mode"))?
                    }
                    "uid" => meta.uid = id(value)?,
                    "gid" => meta.gid = id(value)?,
                    "mtime" => {
                        let (s, ns) = value.split_once('.').ok_or_else(|| bad("a bad mtime"))?;
                        let s = s.parse::<i64>().map_err(|_| bad("a bad mtime"))?;
                        let ns = ns
                            .parse::<u32>()
                            .ok()
                            .filter(|ns| *ns < 1_000_000_000)
                            .ok_or_else(|| bad("a bad mtime"))?;
                        meta.mtime = (s, ns);
                    }
                    "size" => size = Some(number(value)?),
                    "blake3" => {}
                    "link" => link = Some(PathBuf::from(OsStr::from_bytes(&unescape(value)))),
                    "opaque" if field == "opaque" => opaque = true,
                    "target" => target = Some(OsStr::from_bytes(&unescape(value)).to_owned()),
                    "rdev" => rdev = Some(number(value)?),
                    _ if key.starts_with("xattr.") => {
                        let name = unescape(&key["xattr.".len()..]);
                        meta.xattrs
                            .insert(OsStr::from_bytes(&name).to_owned(), unescape(value));
                    }
                    _ => return Err(bad("an unknown field")),
                }
            }
            let kind = match (kind, size, link, target, rdev) {
                ("file", Some(size), None, None, None) => {
                    group_of.insert(path.clone(), (number, size));
                    links.insert(number, 1);
                    Kind::File {
                        size,
                        inode: (dev, number as u64),
                        nlink: 1,
                    }
                }
                ("file", None, Some(first), None, None) => {
                    let (group, size) = *group_of
                        .get(&first)
                        .ok_or_else(|| bad("a link to no file before it"))?;
                    *links.entry(group).or_default() += 1;
                    group_of.insert(path.clone(), (group, size));
                    Kind::File {
                        size,
                        inode: (dev, group as u64),
                        nlink: 1,
                    }
                }
                ("dir", None, None, None, None) => Kind::Dir {
                    opaque,
                    children: Default::default(),
                },
                ("symlink", None, None, Some(target), None) => Kind::Symlink { target },
                ("char", None, None, None, Some(rdev)) => Kind::CharDevice { rdev },
                ("block", None, None, None, Some(rdev)) => Kind::BlockDevice { rdev },
                ("fifo", None, None, None, None) => Kind::Fifo,
                ("socket", None, None, None, None) => Kind::Socket,
                ("whiteout", None, None, None, None) => Kind::Whiteout,
                _ => return Err(bad("not an entry this format writes")),
            };
            if opaque && !kind.is_dir() {
                return Err(bad("opaque on something not a directory"));
            }
            // Every entry but a whiteout has its metadata.
            let described = ["mode", "uid", "gid", "mtime"]
                .iter()
                .all(|key| seen.contains(key));
            if !matches!(kind, Kind::Whiteout) && !described {
                return Err(bad("an entry without its mode, owner and mtime"));
            }
            entries.push((path, Node { meta, kind }));
        }
        let Some((_, mut tree)) = (!entries.is_empty()).then(|| entries.remove(0)) else {
            return Err("the manifest is empty".to_owned());
        };
        if !tree.kind.is_dir() {
            return Err("manifest line 1: the root is not a directory".to_owned());
        }
        for (path, mut node) in entries {
            if let Kind::File { inode, nlink, .. } = &mut node.kind {
                *nlink = links.get(&(inode.1 as usize)).copied().unwrap_or(1);
            }
            let name = path.file_name().expect("not the root").to_owned();
            let mut parent = &mut tree;
            for part in path.parent().into_iter().flat_map(Path::iter) {
                parent = match &mut parent.kind {
                    Kind::Dir { children, .. } => children.get_mut(part).ok_or_else(|| {
                        format!("{}: listed before its directory", path.display())
                    })?,
                    _ => {
                        return Err(format!(
                            "{}: inside something not a directory",
                            path.display()
                        ));
                    }
                };
            }
            let Kind::Dir { children, .. } = &mut parent.kind else {
                return Err(format!(
                    "{}: inside something not a directory",
                    path.display()
                ));
            };
            if children.insert(name, node).is_some() {
                return Err(format!("{}: listed twice", path.display()));
            }
        }
        Ok(Layer {
            root: root.to_owned(),
            ns,
            tree,
            unclean: Vec::new(),
        })
    }
}

/// A relative path as its components join again: differs from the path when it had `./` or
/// `//` or a trailing `/` in it.
fn rejoined(path: &Path) -> Vec<u8> {
    let parts: Vec<&[u8]> = path.iter().map(|p| p.as_bytes()).collect();
    parts.join(&b'/')
}

/// Whether field `copy` is field `original`, an mtime, cut to whole seconds.
fn whole_second_of(original: &str, copy: &str) -> bool {
    let (Some(original), Some(copy)) =
        (original.strip_prefix("mtime="), copy.strip_prefix("mtime="))
    else {
        return false;
    };
    matches!(
        (original.split_once('.'), copy.split_once('.')),
        (Some((seconds, _)), Some((copied, "000000000"))) if seconds == copied
    )
}

fn without_mtime(line: &str) -> String {
    line.split(' ')
        .filter(|f| !f.starts_with("mtime="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The inverse of [`escape`].
pub fn unescape(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = text
            .get(i + 2..i + 4)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let (b'\\', Some(b'x'), Some(value)) = (bytes[i], bytes.get(i + 1), hex) {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The blake3 hash of a file's content, in hex.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(&*super::longpath::short(path)?)?)?;
    crate::progress::bytes(hasher.count());
    Ok(hasher.finalize().to_hex().to_string())
}

/// Bytes as they appear in a manifest: printable ASCII as is, everything else (and space,
/// backslash, `=`) as `\xNN`, so a line splits on spaces without ambiguity.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A file's content in a line: another name of the same file written earlier, or its size and
/// hash.
#[derive(Debug)]
pub enum Content<'a> {
    LinkTo(&'a Path),
    Hash(String),
}

/// Which fields a line carries: a layer's manifest has every one; a tree digest (bundles)
/// leaves out directory mtimes, which move with any change inside, the fractions of a second
/// of other mtimes (a disk image made with `mkfs.ext4 -d` keeps whole seconds, and a device
/// whose store came from one must still match), and `opaque`, which is a layer's, not a
/// tree's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    Layer,
    Tree,
}

/// One entry's line, newline included: path, kind, metadata, content, target or device number,
/// xattrs, each escaped so that the line splits on spaces without ambiguity.
pub fn entry_line(
    path: &Path,
    node: &Node,
    content: Option<Content<'_>>,
    fields: Fields,
) -> String {
    let mut out = String::new();
    let shown = if path.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        escape(path.as_os_str().as_bytes())
    };
    let _ = write!(out, "{shown} {}", node.kind.name());
    if !matches!(node.kind, Kind::Whiteout) {
        let m = &node.meta;
        let _ = write!(out, " mode={:04o} uid={} gid={}", m.mode, m.uid, m.gid);
        match fields {
            Fields::Layer => {
                let _ = write!(out, " mtime={}.{:09}", m.mtime.0, m.mtime.1);
            }
            Fields::Tree if !node.kind.is_dir() => {
                let _ = write!(out, " mtime={}", m.mtime.0);
            }
            Fields::Tree => {}
        }
    }
    match (&node.kind, content) {
        (Kind::File { .. }, Some(Content::LinkTo(first))) => {
            let _ = write!(out, " link={}", escape(first.as_os_str().as_bytes()));
        }
        (Kind::File { size, .. }, Some(Content::Hash(hash))) => {
            let _ = write!(out, " size={size} blake3={hash}");
        }
        (Kind::Dir { opaque: true, .. }, _) if fields == Fields::Layer => out.push_str(" opaque"),
        (Kind::Symlink { target }, _) => {
            let _ = write!(out, " target={}", escape(target.as_bytes()));
        }
        (Kind::CharDevice { rdev } | Kind::BlockDevice { rdev }, _) => {
            let _ = write!(out, " rdev={rdev}");
        }
        _ => {}
    }
    for (name, value) in &node.meta.xattrs {
        let _ = write!(out, " xattr.{}={}", escape(name.as_bytes()), escape(value));
    }
    out.push('\n');
    out
}

fn write_node(
    layer: &Layer,
    node: &Node,
    path: &mut PathBuf,
    first_path_of_inode: &mut HashMap<(u64, u64), PathBuf>,
    hash: &mut dyn FnMut(&Path) -> io::Result<String>,
    out: &mut String,
) -> Result<(), LayerError> {
    let content = match &node.kind {
        Kind::File { inode, nlink, .. } => {
            let first = (*nlink > 1)
                .then(|| first_path_of_inode.get(inode))
                .flatten();
            match first {
                Some(first) => Some(Content::LinkTo(first)),
                None => {
                    let hash = hash(path).map_err(|source| LayerError::Io {
                        path: layer.root.join(&*path),
                        action: "hashing",
                        source,
                    })?;
                    Some(Content::Hash(hash))
                }
            }
        }
        _ => None,
    };
    out.push_str(&entry_line(path, node, content, Fields::Layer));
    if let Kind::File { inode, nlink, .. } = &node.kind
        && *nlink > 1
    {
        first_path_of_inode
            .entry(*inode)
            .or_insert_with(|| path.clone());
    }
    if let Kind::Dir { children, .. } = &node.kind {
        for (name, child) in children {
            path.push(name);
            write_node(layer, child, path, first_path_of_inode, hash, out)?;
            path.pop();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hashes_follow_links() {
        let m = Manifest {
            text: concat!(
                ". dir mode=0755\n",
                r"a\x20b file mode=0644 size=1 blake3=aa",
                "\n",
                r"c file mode=0644 link=a\x20b",
                "\nd symlink target=c\n"
            )
            .into(),
        };
        let hashes = m.file_hashes();
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[Path::new("a b")], (1, "aa".to_owned()));
        assert_eq!(hashes[Path::new("c")], (1, "aa".to_owned()));
    }

    #[test]
    fn a_manifest_gives_back_its_layer_or_names_the_bad_line() {
        let m = |text: &str| Manifest { text: text.into() };
        let good = m(concat!(
            ". dir mode=0755 uid=0 gid=0 mtime=1.000000002\n",
            "a dir mode=0700 uid=1 gid=2 mtime=-3.000000000 opaque xattr.user.x=y\\x20z\n",
            "a/f file mode=4755 uid=0 gid=0 mtime=5.000000000 size=3 blake3=ab\n",
            "a/g file mode=4755 uid=0 gid=0 mtime=5.000000000 link=a/f\n",
            "d char mode=0600 uid=0 gid=0 mtime=5.000000000 rdev=259\n",
            "gone whiteout\n",
            "l symlink mode=0777 uid=0 gid=0 mtime=5.000000000 target=a/f\n",
        ));
        let layer = good.to_layer(Path::new("/x"), XattrNs::Trusted, 9).unwrap();
        let a = layer.get(Path::new("a")).unwrap();
        assert!(matches!(a.kind, Kind::Dir { opaque: true, .. }));
        assert_eq!(
            (a.meta.mode, a.meta.uid, a.meta.gid, a.meta.mtime),
            (0o700, 1, 2, (-3, 0))
        );
        assert_eq!(a.meta.xattrs[OsStr::new("user.x")], b"y z");
        let file = |p: &str| match layer.get(Path::new(p)).unwrap().kind {
            Kind::File { size, inode, nlink } => (size, inode, nlink),
            _ => panic!("{p} is not a file"),
        };
        assert_eq!(file("a/f"), (3, (9, 2), 2));
        assert_eq!(file("a/g"), file("a/f"));
        assert!(matches!(
            layer.get(Path::new("gone")).unwrap().kind,
            Kind::Whiteout
        ));
        assert!(matches!(
            layer.get(Path::new("d")).unwrap().kind,
            Kind::CharDevice { rdev: 259 }
        ));

        // Each case with the metadata every entry carries, where `M` stands.
        let meta = "mode=0644 uid=0 gid=0 mtime=1.000000000";
        for (text, line) in [
            ("", "empty"),
            ("a file M size=1 blake3=0\n", "line 1"),
            (". dir M\n. dir M\n", "line 2"),
            (". dir M\na file M size=1 blake3=0 colour=red\n", "line 2"),
            (". dir M\na file M link=b\n", "line 2"),
            (". dir M\na file M\n", "line 2"),
            (". dir M\na symlink M size=1 blake3=0\n", "line 2"),
            (". dir M\na file M size=1 blake3=0 opaque\n", "line 2"),
            (". dir M\na file M size=x blake3=0\n", "line 2"),
            (". dir M\na/b file M size=1 blake3=0\n", "a/b"),
            (
                ". dir M\na file M size=1 blake3=0\na/b file M size=1 blake3=0\n",
                "a/b",
            ),
            (". dir M\na dir M\na dir M\n", "listed twice"),
            (". dir M\n.. dir M\n", "line 2"),
            (". dir M\na dir M\na/.. file M size=1 blake3=0\n", "line 3"),
            (". dir M\na dir M\na/./b file M size=1 blake3=0\n", "line 3"),
            (". dir M\n/etc file M size=1 blake3=0\n", "line 2"),
            (". dir M\na//b file M size=1 blake3=0\n", "line 2"),
            (". file M size=1 blake3=0\n", "line 1"),
            // Fields out of range, twice, without a value, or missing.
            (
                ". dir M\na file mode=0644 uid=4294967296 gid=0 mtime=1.0 size=1 blake3=0\n",
                "line 2",
            ),
            (
                ". dir M\na file mode=0644 uid=0 gid=0 mtime=1.1000000000 size=1 blake3=0\n",
                "line 2",
            ),
            (
                ". dir M\na file mode=17777 uid=0 gid=0 mtime=1.0 size=1 blake3=0\n",
                "line 2",
            ),
            (". dir M\na file M size=1 size=2 blake3=0\n", "line 2"),
            (". dir M\na dir M opaque=y\n", "line 2"),
            (". dir M\na file M size=1 blake3\n", "line 2"),
            (
                ". dir M\na file mode=0644 uid=0 gid=0 size=1 blake3=0\n",
                "line 2",
            ),
        ] {
            let text = text.replace(" M", &format!(" {meta}"));
            let err = m(&text)
                .to_layer(Path::new("/x"), XattrNs::Trusted, 9)
                .unwrap_err();
            assert!(err.contains(line), "{text:?}: {err}");
        }
    }

    #[test]
    fn escapes_what_would_break_a_line() {
        assert_eq!(escape(b"usr/lib/libc.so.6"), "usr/lib/libc.so.6");
        assert_eq!(escape(b"a b\\c=d\n\xff"), "a\\x20b\\x5cc\\x3dd\\x0a\\xff");
    }

    #[test]
    fn unescape_inverts_escape() {
        for bytes in [&b"plain/path"[..], b"a b\\c=d\n\xff", b"\\x4", b""] {
            assert_eq!(unescape(&escape(bytes)), bytes);
        }
    }

    #[test]
    fn first_difference_names_the_earlier_path() {
        let m = |text: &str| Manifest { text: text.into() };
        let a = m(". dir mtime=1\na file x\nc file\n");
        assert_eq!(
            a.first_difference(&m(". dir mtime=1\na file y\nc file\n"))
                .as_deref(),
            Some("a")
        );
        assert_eq!(
            a.first_difference(&m(". dir mtime=1\nb file\nc file\n"))
                .as_deref(),
            Some("a")
        );
        assert_eq!(
            a.first_difference(&m(". dir mtime=1\na file x\n"))
                .as_deref(),
            Some("c")
        );
        assert_eq!(a.first_difference(&a), None);
        // Tree order, not text order: "d/z" comes before "d-x" in a tree walk of d then d-x.
        let b = m(". dir mtime=1\nd dir mtime=1\nd/z file\nd-x file\n");
        let c = m(". dir mtime=1\nd dir mtime=1\nd-x file 2\n");
        assert_eq!(b.first_difference(&c).as_deref(), Some("d/z"));
    }

    #[test]
    fn timestamps_cut_to_whole_seconds_are_the_same_layer() {
        let m = |text: &str| Manifest { text: text.into() };
        let original =
            m(". dir mtime=7.5 mode=0755\nbin symlink mtime=9.123456789 target=usr/bin\n");
        let cut =
            m(". dir mtime=7.000000000 mode=0755\nbin symlink mtime=9.000000000 target=usr/bin\n");
        assert!(original.same_but_whole_second_mtimes(&cut));
        assert!(original.same_but_whole_second_mtimes(&original));
        // Other seconds, a sub-second part that is not zero, another field or another line:
        // a different layer.
        for other in [
            ". dir mtime=8.000000000 mode=0755\nbin symlink mtime=9.000000000 target=usr/bin\n",
            ". dir mtime=7.000000001 mode=0755\nbin symlink mtime=9.000000000 target=usr/bin\n",
            ". dir mtime=7.000000000 mode=0700\nbin symlink mtime=9.000000000 target=usr/bin\n",
            ". dir mtime=7.000000000 mode=0755\nbin symlink mtime=9.000000000 target=usr/sbin\n",
            ". dir mtime=7.000000000 mode=0755\n",
            ". dir mtime=7.000000000 mode=0755 extra\nbin symlink mtime=9.000000000 target=usr/bin\n",
        ] {
            assert!(!original.same_but_whole_second_mtimes(&m(other)), "{other}");
        }
        // Only the copy may have lost time, not the record.
        assert!(!cut.same_but_whole_second_mtimes(&original));
    }

    #[test]
    fn a_deletion_is_named_rather_than_its_directory_mtime() {
        let before = Manifest {
            text: ". dir mtime=1\nd dir mode=0755 mtime=1\nd/\\xc3\\xa9 file\nd/z file\n".into(),
        };
        let after = Manifest {
            text: ". dir mtime=1\nd dir mode=0755 mtime=2\nd/\\xc3\\xa9 file\n".into(),
        };
        assert_eq!(before.first_difference(&after).as_deref(), Some("d/z"));
        let touched = Manifest {
            text: ". dir mtime=1\nd dir mode=0755 mtime=2\nd/\\xc3\\xa9 file\nd/z file\n".into(),
        };
        assert_eq!(before.first_difference(&touched).as_deref(), Some("d"));
    }
}
