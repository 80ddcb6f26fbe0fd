//! `initramfs-hook resolve` against a root directory with a store in it.

use std::fs;

use assert_cmd::Command;

#[test]
fn resolves_a_store_under_a_sysroot_with_command_line_overrides() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("data/strata");
    for layer in ["upgrade-2", "upgrade-1", "base"] {
        fs::create_dir_all(store.join("layers").join(layer)).unwrap();
    }
    fs::write(
        store.join("overlayplan.toml"),
        "version = 1\n\
         [[layer]]\nname = \"upgrade-2\"\nstate = \"trial\"\nparent = \"upgrade-1\"\n\
         [[layer]]\nname = \"upgrade-1\"\nparent = \"base\"\n\
         [[layer]]\nname = \"base\"\ntitle = \"Core\"\nknown_good = true\n",
    )
    .unwrap();
    let out = Command::cargo_bin("initramfs-hook")
        .unwrap()
        .args(["resolve", "--sysroot"])
        .arg(root.path())
        .args(["--cmdline", "root=/dev/vda strata.store=/data/strata strata.top=upgrade-1 strata.upper=tmpfs strata.colour=red"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        out,
        "strata: ignoring kernel command line `strata.colour=red`: unknown option; known options are strata.top, strata.disable, strata.menu, strata.upper, strata.store, strata.debug, strata.stack\n\
         strata: layers, top first (* = mounted this boot)\n\
         \x20   upgrade-2 \"upgrade-2\" [trial] - above the chosen top \"upgrade-1\"\n\
         \x20 * upgrade-1 \"upgrade-1\"\n\
         \x20 * base \"Core\" [known good]\n\
         strata: stack (top first): upgrade-1:base\n\
         strata: upper: tmpfs\n"
    );
}

#[test]
fn a_missing_store_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("initramfs-hook")
        .unwrap()
        .args(["resolve", "--cmdline", "quiet", "--sysroot"])
        .arg(root.path())
        .assert()
        .failure()
        .code(1)
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8(out).unwrap();
    assert!(
        err.starts_with("strata: error: there is no store at "),
        "{err}"
    );
    assert!(err.contains("/strata; create one with"), "{err}");
}
