//! The engine's merged view against the kernel's: random stacks of 1 to 8 layers are written to
//! disk, mounted with real overlayfs in a private mount namespace, and every path of the mount is
//! compared with the engine's merged view of the same layer directories. Root only.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, AtFlags};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, mkfifo};
use overlayctl::engine::manifest::hash_file;
use overlayctl::engine::{Kind, Layer, MergedView, XattrNs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tests::{have_root, mount_overlay, private_mount_namespace};

/// What one path of a layer holds, as the generator describes it.
#[derive(Debug, Clone)]
enum Spec {
    File {
        content: u8,
        meta: MetaSpec,
        link_group: Option<u8>,
    },
    Dir {
        meta: MetaSpec,
        opaque: Opaque,
        children: BTreeMap<String, Spec>,
    },
    Symlink {
        target: String,
    },
    Whiteout,
    /// A zero-size file with `overlay.whiteout`: a whiteout only in a directory marked `x`.
    XattrWhiteout,
    Fifo {
        meta: MetaSpec,
    },
    Socket,
    CharDevice,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Opaque {
    No,
    Y,
    X,
}

#[derive(Debug, Clone)]
struct MetaSpec {
    mode: u32,
    owner: u32,
    mtime: i64,
    xattr: Option<u8>,
}

fn meta() -> impl Strategy<Value = MetaSpec> {
    (
        prop::sample::select(vec![0o644, 0o600, 0o755, 0o4755, 0o1777, 0o000]),
        prop::sample::select(vec![0, 1000, 65534]),
        prop::sample::select(vec![0, 1_000_000_000, 1_700_000_000]),
        proptest::option::of(0u8..3),
    )
        .prop_map(|(mode, owner, mtime, xattr)| MetaSpec {
            mode,
            owner,
            mtime,
            xattr,
        })
}

fn leaf() -> impl Strategy<Value = Spec> {
    prop_oneof![
        6 => (0u8..4, meta(), proptest::option::of(0u8..2))
            .prop_map(|(content, meta, link_group)| Spec::File { content, meta, link_group }),
        2 => prop::sample::select(vec!["a", "../b", "/etc/passwd", "c/d", ""])
            .prop_filter("symlinks need a target", |t| !t.is_empty())
            .prop_map(|t| Spec::Symlink { target: t.to_owned() }),
        3 => Just(Spec::Whiteout),
        2 => Just(Spec::XattrWhiteout),
        // User xattrs are for files and directories only.
        1 => meta().prop_map(|meta| Spec::Fifo { meta: MetaSpec { xattr: None, ..meta } }),
        1 => Just(Spec::Socket),
        1 => Just(Spec::CharDevice),
    ]
}

/// Names from a small pool, so that layers collide on the same paths.
fn children(inner: impl Strategy<Value = Spec>) -> impl Strategy<Value = BTreeMap<String, Spec>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(str::to_owned),
        inner,
        0..4,
    )
}

fn spec() -> impl Strategy<Value = Spec> {
    leaf().prop_recursive(5, 48, 4, |inner| {
        (
            meta(),
            prop_oneof![4 => Just(Opaque::No), 1 => Just(Opaque::Y), 1 => Just(Opaque::X)],
            children(inner),
        )
            .prop_map(|(meta, opaque, children)| Spec::Dir {
                meta,
                opaque,
                children,
            })
    })
}

/// A layer's root children, sometimes with a deep chain of directories on top.
fn layer() -> impl Strategy<Value = BTreeMap<String, Spec>> {
    (children(spec()), proptest::option::of((1usize..12, spec()))).prop_map(|(mut root, deep)| {
        if let Some((depth, at_bottom)) = deep {
            let mut node = at_bottom;
            for level in (0..depth).rev() {
                let meta = MetaSpec {
                    mode: 0o755,
                    owner: 0,
                    mtime: 0,
                    xattr: None,
                };
                let name = if level == 0 {
                    "deep".to_owned()
                } else {
                    format!("d{level}")
                };
                node = Spec::Dir {
                    meta,
                    opaque: Opaque::No,
                    children: [(name, node)].into(),
                };
            }
            if let Spec::Dir { children, .. } = node {
                root.extend(children);
            }
        }
        root
    })
}

fn stack() -> impl Strategy<Value = (Vec<BTreeMap<String, Spec>>, bool)> {
    (prop::collection::vec(layer(), 1..=8), any::<bool>())
}

struct Writer {
    ns: XattrNs,
    /// First path written for each hard-link group, in this layer.
    links: BTreeMap<u8, PathBuf>,
}

impl Writer {
    fn set_meta(&self, path: &Path, meta: &MetaSpec, is_symlink: bool) {
        if let Some(x) = meta.xattr {
            xattr::set(path, "user.strata-test", &[b'v', x]).unwrap();
        }
        fchownat(
            AT_FDCWD,
            path,
            Some(Uid::from_raw(meta.owner)),
            Some(Gid::from_raw(meta.owner)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        if !is_symlink {
            fs::set_permissions(path, fs::Permissions::from_mode(meta.mode)).unwrap();
        }
        let t = TimeSpec::new(meta.mtime, 0);
        utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    fn write(&mut self, path: &Path, spec: &Spec) {
        match spec {
            Spec::File {
                content,
                meta,
                link_group,
            } => {
                if let Some(first) = link_group.and_then(|g| self.links.get(&g)) {
                    fs::hard_link(first, path).unwrap();
                    return;
                }
                fs::write(path, vec![b'x'; *content as usize * 3]).unwrap();
                self.set_meta(path, meta, false);
                if let Some(g) = link_group {
                    self.links.insert(*g, path.to_owned());
                }
            }
            Spec::Dir {
                meta,
                opaque,
                children,
            } => {
                fs::create_dir(path).unwrap();
                for (name, child) in children {
                    self.write(&path.join(name), child);
                }
                match opaque {
                    Opaque::No => {}
                    Opaque::Y => xattr::set(path, self.ns.name("opaque"), b"y").unwrap(),
                    Opaque::X => xattr::set(path, self.ns.name("opaque"), b"x").unwrap(),
                }
                // Last, as writing children changes the directory's mtime.
                self.set_meta(path, meta, false);
            }
            Spec::Symlink { target } => std::os::unix::fs::symlink(target, path).unwrap(),
            Spec::Whiteout => mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap(),
            Spec::XattrWhiteout => {
                fs::write(path, b"").unwrap();
                xattr::set(path, self.ns.name("whiteout"), b"").unwrap();
            }
            Spec::Fifo { meta } => {
                mkfifo(path, Mode::from_bits_truncate(0o644)).unwrap();
                self.set_meta(path, meta, false);
            }
            Spec::Socket => drop(UnixListener::bind(path).unwrap()),
            Spec::CharDevice => mknod(
                path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(1, 3),
            )
            .unwrap(),
        }
    }
}

/// What is compared for each path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    /// Files: size and content hash. Symlinks: the target. Devices: rdev.
    content: String,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Walks the kernel's mount.
fn kernel_view(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn go(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        let path = root.join(rel);
        // A whiteout that hides nothing, in a directory only one layer has, is passed through by
        // the kernel's readdir but fails lookup: it is not there, and the engine agrees.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return;
        };
        let ft = meta.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_file() {
            (
                "file",
                format!("{} {}", meta.len(), hash_file(&path).unwrap()),
            )
        } else if ft.is_symlink() {
            (
                "symlink",
                fs::read_link(&path).unwrap().display().to_string(),
            )
        } else if ft.is_char_device() {
            ("char", meta.rdev().to_string())
        } else if ft.is_block_device() {
            ("block", meta.rdev().to_string())
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("socket", String::new())
        };
        let xattrs = xattr::list(&path)
            .unwrap()
            .map(|n| {
                (
                    n.as_bytes().to_vec(),
                    xattr::get(&path, &n).unwrap().unwrap_or_default(),
                )
            })
            .collect();
        out.insert(
            rel.to_owned(),
            Seen {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: meta.mtime(),
                content,
                xattrs,
            },
        );
        if ft.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                go(root, &rel.join(entry.unwrap().file_name()), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, Path::new(""), &mut out);
    out
}

/// Walks the engine's merged view of the same layers.
fn engine_view(layers: &[Layer]) -> BTreeMap<PathBuf, Seen> {
    let view = MergedView::new(layers);
    let mut out = BTreeMap::new();
    view.walk(&mut |rel, node| {
        let n = node.node;
        let content = match &n.kind {
            Kind::File { size, .. } => format!(
                "{size} {}",
                hash_file(&view.source_path(rel, node)).unwrap()
            ),
            Kind::Symlink { target } => Path::new(target).display().to_string(),
            Kind::CharDevice { rdev } | Kind::BlockDevice { rdev } => rdev.to_string(),
            _ => String::new(),
        };
        let xattrs = n
            .meta
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect();
        out.insert(
            rel.to_owned(),
            Seen {
                kind: n.kind.name(),
                mode: n.meta.mode,
                uid: n.meta.uid,
                gid: n.meta.gid,
                mtime: n.meta.mtime.0,
                content,
                xattrs,
            },
        );
    });
    out
}

/// The first difference between the two views, described for a person.
fn first_difference(
    kernel: &BTreeMap<PathBuf, Seen>,
    engine: &BTreeMap<PathBuf, Seen>,
) -> Option<String> {
    for (path, seen) in kernel {
        match engine.get(path) {
            None => {
                return Some(format!(
                    "{}: the kernel shows {seen:?}, the engine nothing",
                    path.display()
                ));
            }
            Some(ours) if ours != seen => {
                return Some(format!(
                    "{}:\n  kernel: {seen:?}\n  engine: {ours:?}",
                    path.display()
                ));
            }
            _ => {}
        }
    }
    engine
        .iter()
        .find(|(path, _)| !kernel.contains_key(*path))
        .map(|(path, ours)| {
            format!(
                "{}: the engine shows {ours:?}, the kernel nothing",
                path.display()
            )
        })
}

fn check_stack(
    scratch: &Path,
    layers: &[BTreeMap<String, Spec>],
    user_ns: bool,
) -> Result<(), TestCaseError> {
    let _ = fs::remove_dir_all(scratch);
    let ns = if user_ns {
        XattrNs::User
    } else {
        XattrNs::Trusted
    };
    let mut dirs = Vec::new();
    for (i, children) in layers.iter().enumerate() {
        let dir = scratch.join(format!("l{i}"));
        fs::create_dir_all(&dir).unwrap();
        let mut writer = Writer {
            ns,
            links: BTreeMap::new(),
        };
        for (name, spec) in children {
            writer.write(&dir.join(name), spec);
        }
        dirs.push(dir);
    }
    let (upper, work, merged) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("merged"),
    );
    for dir in [&upper, &work, &merged] {
        fs::create_dir_all(dir).unwrap();
    }
    let lowers: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    mount_overlay(
        &lowers,
        &upper,
        &work,
        &merged,
        if user_ns { "userxattr" } else { "" },
    )
    .map_err(|e| TestCaseError::fail(format!("mount failed: {e}")))?;
    let mut kernel = kernel_view(&merged);
    // The mount's root takes its attributes from the (empty) upper, which the engine does not
    // model; everything below it is compared.
    kernel.remove(Path::new(""));
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();

    let read: Vec<Layer> = dirs.iter().map(|d| Layer::read(d, ns).unwrap()).collect();
    let mut engine = engine_view(&read);
    engine.remove(Path::new(""));
    if let Some(diff) = first_difference(&kernel, &engine) {
        return Err(TestCaseError::fail(format!(
            "{} namespace: {diff}",
            ns.prefix()
        )));
    }
    Ok(())
}

/// Stacks per run: hundreds in CI, more with `STRATA_DIFF_CASES`.
fn cases() -> u32 {
    std::env::var("STRATA_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[test]
fn privileged_merged_view_matches_the_kernel() {
    if !have_root("privileged_merged_view_matches_the_kernel") {
        return;
    }
    private_mount_namespace();
    let scratch = tempfile::tempdir().unwrap();
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&stack(), |(layers, user_ns)| {
        check_stack(&scratch.path().join("case"), &layers, user_ns)
    });
    if let Err(err) = result {
        panic!("the engine and the kernel disagree (shrunk case below)\n{err}");
    }
}
