//! Compaction against the kernel: for random stacks and a random run of adjacent layers in
//! them, the run is compacted into one layer (files hard-linked from the run), and the stack
//! with that layer in the run's place must show exactly what the original stack showed, in the
//! engine's merged view and through a real overlay mount, hard-link groups included. Root only.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use overlayctl::engine::compact::compact;
use overlayctl::engine::copy::link_layer;
use overlayctl::engine::{Layer, XattrNs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tests::layergen::{LayerSpec, stack, write_layer};
use tests::views::{engine_view, first_difference, kernel_view};
use tests::{have_root, mount_overlay, overlay_dirs, private_mount_namespace};

fn mounted_view(
    scratch: &Path,
    name: &str,
    lowers: &[PathBuf],
) -> (BTreeMap<PathBuf, tests::views::Seen>, Vec<Vec<PathBuf>>) {
    let (upper, work, merged) = overlay_dirs(&scratch.join(name));
    let lowers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount_overlay(&lowers, &upper, &work, &merged, "").expect("mounting a stack");
    let mut view = kernel_view(&merged);
    // The names of each file that has more than one.
    let mut groups: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for rel in view.keys() {
        if let Ok(meta) = fs::symlink_metadata(merged.join(rel))
            && meta.is_file()
            && meta.nlink() > 1
        {
            groups
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
    }
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
    // The mount's root takes its attributes from the (empty) upper.
    view.remove(Path::new(""));
    let groups = groups.into_values().filter(|g| g.len() > 1).collect();
    (view, groups)
}

fn check_compact(
    scratch: &Path,
    layers: &[LayerSpec],
    run_start: usize,
    run_len: usize,
) -> Result<(), TestCaseError> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    let dirs: Vec<PathBuf> = layers
        .iter()
        .enumerate()
        .map(|(i, (children, _))| {
            let dir = scratch.join(format!("l{i}"));
            fs::create_dir_all(&dir).unwrap();
            write_layer(&dir, children, XattrNs::Trusted);
            dir
        })
        .collect();
    let start = run_start % dirs.len();
    let end = (start + 1 + run_len % (dirs.len() - start)).min(dirs.len());
    let read = Layer::read_all(&dirs, XattrNs::Trusted).unwrap();
    let made = compact(&read[start..end], &read[end..]);
    let run_layers = &read[start..end];
    link_layer(
        &made.tree,
        &|rel| run_layers[made.sources[rel]].root.join(rel),
        scratch,
        "c".as_ref(),
    )
    .unwrap();
    let mut compacted = dirs[..start].to_vec();
    compacted.push(scratch.join("c"));
    compacted.extend(dirs[end..].iter().cloned());

    let before = engine_view(&read);
    let after = engine_view(&Layer::read_all(&compacted, XattrNs::Trusted).unwrap());
    if let Some(diff) = first_difference(&before, &after) {
        return Err(TestCaseError::fail(format!(
            "engine, run {start}..{end} compacted: {diff}"
        )));
    }
    let (kernel_before, links_before) = mounted_view(scratch, "before", &dirs);
    let (kernel_after, links_after) = mounted_view(scratch, "after", &compacted);
    if let Some(diff) = first_difference(&kernel_before, &kernel_after) {
        return Err(TestCaseError::fail(format!(
            "kernel, run {start}..{end} compacted: {diff}"
        )));
    }
    if links_before != links_after {
        return Err(TestCaseError::fail(format!(
            "hard links differ: before {links_before:?}, after {links_after:?}"
        )));
    }
    Ok(())
}

#[test]
fn privileged_compact_stack_shows_what_the_original_showed() {
    if !have_root("privileged_compact_stack_shows_what_the_original_showed") {
        return;
    }
    private_mount_namespace();
    let scratch = tempfile::tempdir().unwrap();
    let cases = std::env::var("STRATA_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = (stack(), any::<usize>(), any::<usize>());
    let result = runner.run(&strategy, |((layers, _), start, len)| {
        check_compact(&scratch.path().join("case"), &layers, start, len)
    });
    if let Err(err) = result {
        panic!("the compacted stack differs from the original (shrunk case below)\n{err}");
    }
}
