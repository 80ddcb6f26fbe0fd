//! The engine's merged view against the kernel's: random stacks of 1 to 8 layers are written to
//! disk, mounted with real overlayfs in a private mount namespace, and every path of the mount is
//! compared with the engine's merged view of the same layer directories. Root only.

use std::fs;
use std::path::{Path, PathBuf};

use overlayctl::engine::{Layer, XattrNs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tests::layergen::{LayerSpec, mark_root_opaque, stack, write_layer};
use tests::views::{engine_view, first_difference, kernel_view};
use tests::{have_root, mount_overlay, overlay_dirs, private_mount_namespace};

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
