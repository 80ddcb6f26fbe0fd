//! `sync`'s delta against the kernel: for random pairs of stacks, the target is the kernel's
//! merged view of the second stack (alone, or laid over the first, as an upgrade) copied out
//! with `cp -a` (a plain tree, as a new system's image would be); the delta from the first stack to it is written as a layer, and the first
//! stack with that layer on top must show exactly the target, both in the engine's merged view
//! and through a real overlay mount. A second delta from there must be empty. Root only.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use overlayctl::engine::copy::copy_layer;
use overlayctl::engine::delta::{Compare, delta};
use overlayctl::engine::{Layer, MergedView, XattrNs};
use proptest::prelude::*;
use tests::layergen::{LayerSpec, stack, write_layer};
use tests::views::{engine_view, first_difference, kernel_view, without_dir_mtimes};
use tests::{have_root, mount_overlay, overlay_dirs, private_mount_namespace};

fn write_stack(scratch: &Path, prefix: &str, layers: &[LayerSpec]) -> Vec<PathBuf> {
    layers
        .iter()
        .enumerate()
        .map(|(i, (children, _))| {
            let dir = scratch.join(format!("{prefix}{i}"));
            fs::create_dir_all(&dir).unwrap();
            write_layer(&dir, children, XattrNs::Trusted);
            dir
        })
        .collect()
}

fn mount(scratch: &Path, name: &str, lowers: &[PathBuf]) -> PathBuf {
    let (upper, work, merged) = overlay_dirs(&scratch.join(name));
    let lowers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount_overlay(&lowers, &upper, &work, &merged, "").expect("mounting a stack");
    merged
}

fn unmount(path: &Path) {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// The names of each file that has more than one, as sets.
fn link_groups(root: &Path) -> std::collections::BTreeSet<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let mut groups: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for rel in kernel_view(root).keys() {
        let Ok(meta) = fs::symlink_metadata(root.join(rel)) else {
            continue;
        };
        if meta.is_file() && meta.nlink() > 1 {
            groups
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
    }
    groups.into_values().filter(|g| g.len() > 1).collect()
}

/// `upgrade`: the target is the second stack laid over the first (most of it unchanged, as in
/// a real upgrade); otherwise the second stack alone.
fn check_sync(
    scratch: &Path,
    from: &[LayerSpec],
    to: &[LayerSpec],
    upgrade: bool,
    compare: Compare,
) -> Result<(), TestCaseError> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    let a = write_stack(scratch, "a", from);
    let mut b = write_stack(scratch, "b", to);
    if upgrade {
        b.extend(a.iter().cloned());
    }
    let b_merged = mount(scratch, "bm", &b);
    let target = scratch.join("target");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&b_merged)
        .arg(&target)
        .output()
        .unwrap();
    unmount(&b_merged);
    // A whiteout over nothing in a directory only one layer has is listed by the kernel but
    // cannot be looked up (README, the layer engine): cp says so and copies everything else.
    let errors = String::from_utf8_lossy(&copied.stderr);
    assert!(
        copied.status.success()
            || errors
                .lines()
                .all(|l| l.contains("No such file or directory")),
        "cp -a of the target failed: {errors}"
    );

    let a_layers = Layer::read_all(&a, XattrNs::Trusted).unwrap();
    let view = MergedView::new(&a_layers);
    let target_tree = Layer::read(&target, XattrNs::Trusted).unwrap();
    let (layer, _) = delta(&view, &target_tree, compare)
        .map_err(|e| TestCaseError::fail(format!("delta: {e}")))?;
    copy_layer(&layer, scratch, "new".as_ref()).unwrap();

    let mut stack = vec![scratch.join("new")];
    stack.extend(a.iter().cloned());
    let want = without_dir_mtimes(kernel_view(&target));

    let layers = Layer::read_all(&stack, XattrNs::Trusted).unwrap();
    let engine = without_dir_mtimes(engine_view(&layers));
    if let Some(diff) = first_difference(&want, &engine) {
        return Err(TestCaseError::fail(format!(
            "engine, stack + delta vs target: {diff}"
        )));
    }
    let merged = mount(scratch, "sm", &stack);
    let mut kernel = without_dir_mtimes(kernel_view(&merged));
    let links = link_groups(&merged);
    unmount(&merged);
    let want_links = link_groups(&target);
    if links != want_links {
        return Err(TestCaseError::fail(format!(
            "hard links differ: the stack + delta has {links:?}, the target {want_links:?}"
        )));
    }
    // The mount's root takes its attributes from the (empty) upper: compare what is below it.
    kernel.remove(Path::new(""));
    let mut want = want;
    want.remove(Path::new(""));
    if let Some(diff) = first_difference(&want, &kernel) {
        return Err(TestCaseError::fail(format!(
            "kernel, stack + delta vs target: {diff}"
        )));
    }
    // Synced once, there is nothing left to sync.
    let again = MergedView::new(&layers);
    let (_, stats) = delta(&again, &target_tree, compare).unwrap();
    if !stats.is_empty() {
        return Err(TestCaseError::fail(format!(
            "a second delta is not empty: {stats:?}"
        )));
    }
    Ok(())
}

#[test]
fn privileged_sync_delta_shows_the_target() {
    if !have_root("privileged_sync_delta_shows_the_target") {
        return;
    }
    private_mount_namespace();
    let scratch = tempfile::tempdir().unwrap();
    let mut runner = tests::diff_runner();
    let strategy = (stack(), stack(), any::<bool>(), any::<bool>());
    let result = runner.run(&strategy, |((from, _), (to, _), upgrade, checksum)| {
        let compare = if checksum {
            Compare::Checksum
        } else {
            Compare::Quick
        };
        check_sync(&scratch.path().join("case"), &from, &to, upgrade, compare)
    });
    if let Err(err) = result {
        panic!("sync's delta does not give the target (shrunk case below)\n{err}");
    }
}
