//! Random layers for tests: a proptest strategy describing layer trees with every kind of entry
//! overlayfs knows, and a writer that puts them on disk (root needed for owners, devices and
//! `trusted.` attributes).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, AtFlags};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, mkfifo};
use overlayctl::engine::XattrNs;
use proptest::prelude::*;

/// What one path of a layer holds, as the generator describes it.
#[derive(Debug, Clone)]
pub enum Spec {
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
pub enum Opaque {
    No,
    Y,
    X,
}

#[derive(Debug, Clone)]
pub struct MetaSpec {
    pub mode: u32,
    pub owner: u32,
    pub mtime: i64,
    pub xattr: Option<u8>,
}

pub fn meta() -> impl Strategy<Value = MetaSpec> {
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

pub fn spec() -> impl Strategy<Value = Spec> {
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
pub fn layer() -> impl Strategy<Value = BTreeMap<String, Spec>> {
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

/// One layer: its root's children, and whether its root is marked opaque.
pub type LayerSpec = (BTreeMap<String, Spec>, bool);

/// Layer root children, 1 to 8 layers of them (each with whether its root is marked opaque),
/// and whether to use the `user.` namespace.
pub fn stack() -> impl Strategy<Value = (Vec<LayerSpec>, bool)> {
    (
        prop::collection::vec((layer(), prop::bool::weighted(0.1)), 1..=8),
        any::<bool>(),
    )
}

/// Marks a layer's root directory opaque (which the kernel ignores).
pub fn mark_root_opaque(dir: &Path, ns: XattrNs) {
    xattr::set(dir, ns.name("opaque"), b"y").unwrap();
}

/// Writes one layer's root children into the existing directory `dir`.
pub fn write_layer(dir: &Path, children: &BTreeMap<String, Spec>, ns: XattrNs) {
    let mut writer = Writer {
        ns,
        links: BTreeMap::new(),
    };
    for (name, spec) in children {
        writer.write(&dir.join(name), spec);
    }
}
