//! Copying a layer preserves everything: for random layers (every kind of entry, hard links,
//! owners, setuid modes, xattrs, opaque directories, whiteouts in both forms and both xattr
//! namespaces) the copy's canonical manifest equals the source's, and so does that of the layer
//! its manifest alone describes. Root only.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

use overlayctl::engine::copy::copy_layer;
use overlayctl::engine::manifest::hash_file;
use overlayctl::engine::{Kind, Layer, LayerError, Manifest, XattrNs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tests::have_root;
use tests::layergen::{layer, write_layer};

#[test]
fn privileged_copies_keep_the_manifest() {
    if !have_root("privileged_copies_keep_the_manifest") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let config = Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&(layer(), any::<bool>()), |(children, user_ns)| {
        let case = scratch.path().join("case");
        let _ = fs::remove_dir_all(&case);
        let source = case.join("source");
        fs::create_dir_all(&source).unwrap();
        let ns = if user_ns {
            XattrNs::User
        } else {
            XattrNs::Trusted
        };
        write_layer(&source, &children, ns);

        let read = Layer::read(&source, ns).unwrap();
        copy_layer(&read, &case, "copy".as_ref())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let copy = Layer::read(&case.join("copy"), XattrNs::Trusted).unwrap();
        let (want, got) = (
            Manifest::of_layer(&read).unwrap(),
            Manifest::of_layer(&copy).unwrap(),
        );
        if let Some(path) = want.first_difference(&got) {
            return Err(TestCaseError::fail(format!(
                "the copy differs first at {path}\nsource:\n{}\ncopy:\n{}",
                want.text, got.text
            )));
        }
        // The layer as its manifest alone describes it (what compaction plans from) has the
        // same manifest: every entry, its metadata and its hard links come back.
        let described = want
            .to_layer(&source, ns, u64::MAX)
            .map_err(TestCaseError::fail)?;
        let again = Manifest::of_layer(&described).unwrap();
        if let Some(path) = want.first_difference(&again) {
            return Err(TestCaseError::fail(format!(
                "the layer read from its manifest differs first at {path}\nmanifest:\n{}\nagain:\n{}",
                want.text, again.text
            )));
        }
        // Whiteouts come out as devices, so the copy is clean for every kernel.
        // (Whiteouts inside opaque directories are kept as they are, and still noted.)
        let noted_in_source = read
            .unclean
            .iter()
            .filter(|e| matches!(e, LayerError::WhiteoutInOpaque { .. }))
            .count();
        prop_assert_eq!(copy.unclean.len(), noted_in_source, "{:?}", copy.unclean);
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

#[test]
fn privileged_sparse_files_stay_sparse() {
    if !have_root("privileged_sparse_files_stay_sparse") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fs::create_dir(&source).unwrap();
    let mut file = fs::File::create(source.join("disk.img")).unwrap();
    file.write_all(b"head").unwrap();
    file.seek(SeekFrom::Start(32 << 20)).unwrap();
    file.write_all(b"middle").unwrap();
    file.set_len(64 << 20).unwrap();
    drop(file);

    let read = Layer::read(&source, XattrNs::Trusted).unwrap();
    let stats = copy_layer(&read, dir.path(), "copy".as_ref()).unwrap();
    assert_eq!(stats.bytes, 64 << 20);
    let copied = dir.path().join("copy/disk.img");
    let meta = fs::metadata(&copied).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} blocks allocated: the holes were filled",
        meta.blocks()
    );
    assert_eq!(
        hash_file(&copied).unwrap(),
        hash_file(&source.join("disk.img")).unwrap()
    );
    let copy = Layer::read(&dir.path().join("copy"), XattrNs::Trusted).unwrap();
    assert!(
        matches!(copy.get("disk.img".as_ref()).unwrap().kind, Kind::File { size, .. } if size == 64 << 20)
    );
}
