//! The engine's merged view against the kernel's: random stacks of 1 to 8 layers are written to
//! disk, mounted with real overlayfs in a private mount namespace, and every path of the mount is
//! compared with the engine's merged view of the same layer directories. Root only.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use overlayctl::engine::manifest::hash_file;
use overlayctl::engine::{Kind, Layer, MergedView, XattrNs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tests::layergen::{LayerSpec, mark_root_opaque, stack, write_layer};
use tests::{have_root, mount_overlay, overlay_dirs, private_mount_namespace};

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

fn check_stack(scratch: &Path, layers: &[LayerSpec], user_ns: bool) -> Result<(), TestCaseError> {
    let _ = fs::remove_dir_all(scratch);
    let ns = if user_ns {
        XattrNs::User
    } else {
        XattrNs::Trusted
    };
    let mut dirs = Vec::new();
    for (i, (children, root_opaque)) in layers.iter().enumerate() {
        let dir = scratch.join(format!("l{i}"));
        fs::create_dir_all(&dir).unwrap();
        write_layer(&dir, children, ns);
        if *root_opaque {
            mark_root_opaque(&dir, ns);
        }
        dirs.push(dir);
    }
    let (upper, work, merged) = overlay_dirs(scratch);
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
