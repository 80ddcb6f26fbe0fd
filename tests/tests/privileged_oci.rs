//! OCI images as layers, as root, with the real tools: images built layer by layer with
//! `umoci`, copied to `oci-archive` and `docker-archive` with `skopeo`, pulled into stores with
//! `overlayctl pull`, mounted by the kernel and compared with what `umoci unpack` makes of the
//! same image; hand-made layers for what umoci never writes (opaque directories, zstd, long
//! names, PAX times) and for hostile archives, each refused with the store unchanged.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use tests::Scratch;
use tests::oci::Layout;
use tests::views::shown_tree;

fn ok(scratch: &Scratch, store: &Path, args: &[&str]) -> String {
    let out = scratch
        .overlayctl(store, args)
        .assert()
        .success()
        .get_output()
        .clone();
    String::from_utf8(out.stdout).unwrap()
}

fn fails(scratch: &Scratch, store: &Path, args: &[&str]) -> String {
    let out = scratch
        .overlayctl(store, args)
        .assert()
        .failure()
        .get_output()
        .clone();
    String::from_utf8(out.stderr).unwrap()
}

/// What the store's next boot shows, through the kernel's overlayfs.
fn mounted(scratch: &Scratch, store: &Path) -> BTreeMap<PathBuf, tests::views::Seen> {
    let mnt = scratch.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(scratch, store, &["mount", mnt.to_str().unwrap()]);
    let view = shown_tree(&mnt);
    ok(scratch, store, &["umount", mnt.to_str().unwrap()]);
    view
}

fn assert_same(
    what: &str,
    got: &BTreeMap<PathBuf, tests::views::Seen>,
    want: &BTreeMap<PathBuf, tests::views::Seen>,
) {
    if let Some(difference) = tests::views::first_difference(want, got) {
        panic!(
            "{what}: the stack does not show the image (\"kernel\" is umoci's unpack, \"engine\" the stack):\n{difference}"
        );
    }
}

/// The next boot's stack, top first, from `status --json`.
fn next_stack(scratch: &Scratch, store: &Path) -> Vec<String> {
    let out = ok(scratch, store, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    status["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers in {out}"))
        .iter()
        .filter(|l| l["next_boot"] == true)
        .map(|l| l["name"].as_str().unwrap().to_owned())
        .collect()
}

/// An image `base` (files of every kind, owners, modes, an xattr, a hard link), `v1` (base and
/// an app layer) and `v2` (base, another app layer that deletes and changes files, and one
/// more layer).
fn build_images(scratch: &Scratch) -> Layout {
    let layout = Layout::new(&scratch.path("layout"), &scratch.path("umoci"));
    layout.layer(None, "base", "ADD base system", |root| {
        for dir in [
            "etc",
            "usr/bin",
            "var/lib/data",
            "home/user",
            "tmp",
            "dev",
            "srv",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(root.join("etc/motd"), "hello\n").unwrap();
        fs::hard_link(root.join("etc/motd"), root.join("etc/motd.hard")).unwrap();
        symlink("/etc/motd", root.join("etc/link")).unwrap();
        fs::write(root.join("etc/old"), "to be deleted\n").unwrap();
        fs::write(root.join("var/lib/data/x"), "x\n").unwrap();
        fs::write(root.join("usr/bin/suid"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(
            root.join("usr/bin/suid"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(root.join("home/user/notes"), "mine\n").unwrap();
        std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::chown(root.join("home/user/notes"), Some(1000), Some(1000)).unwrap();
        fs::set_permissions(root.join("home/user"), fs::Permissions::from_mode(0o700)).unwrap();
        xattr::set(root.join("etc/motd"), "user.strata.test", b"kept").unwrap();
        nix::unistd::mkfifo(
            &root.join("srv/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        nix::sys::stat::mknod(
            &root.join("dev/null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    });
    layout.layer(Some("base"), "v1", "RUN /bin/sh -c install app 1", |root| {
        fs::create_dir_all(root.join("opt/app")).unwrap();
        fs::write(root.join("opt/app/version"), "1\n").unwrap();
    });
    layout.layer(
        Some("base"),
        "v2-app",
        "RUN /bin/sh -c install app 2",
        |root| {
            fs::create_dir_all(root.join("opt/app")).unwrap();
            fs::write(root.join("opt/app/version"), "2\n").unwrap();
            fs::remove_file(root.join("etc/old")).unwrap();
            fs::remove_dir_all(root.join("var/lib/data")).unwrap();
            fs::create_dir_all(root.join("var/lib/data")).unwrap();
            fs::write(root.join("var/lib/data/y"), "y\n").unwrap();
            fs::set_permissions(root.join("etc/motd"), fs::Permissions::from_mode(0o600)).unwrap();
        },
    );
    layout.layer(Some("v2-app"), "v2", "RUN /bin/sh -c configure", |root| {
        fs::write(root.join("etc/app.conf"), "on\n").unwrap();
        fs::remove_file(root.join("usr/bin/suid")).unwrap();
    });
    layout
}

#[test]
fn privileged_images_become_layers_in_image_order_and_roll_back_whole() {
    let Some(scratch) =
        Scratch::new("privileged_images_become_layers_in_image_order_and_roll_back_whole")
    else {
        return;
    };
    let layout = build_images(&scratch);
    let image = |tag: &str| format!("oci:{}:{tag}", layout.dir.display());
    let v1 = shown_tree(&layout.unpack("v1", &scratch.path("unpacked-v1")));
    let v2 = shown_tree(&layout.unpack("v2", &scratch.path("unpacked-v2")));

    // A store made from v1: two layers, the base known-good, titled from the history.
    let store = scratch.path("store");
    let out = ok(&scratch, &store, &["init", "--image", &image("v1")]);
    assert!(
        out.contains("(ADD base system)") && out.contains("(RUN install app 1)"),
        "{out}"
    );
    let first = next_stack(&scratch, &store);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_same("v1", &mounted(&scratch, &store), &v1);
    let plan = fs::read_to_string(store.join("overlayplan.toml")).unwrap();
    assert!(plan.contains("diff_id = \"sha256:"), "{plan}");

    // v2 shares the base: it is held, the two new layers come in as trial layers and stand in
    // for v1's app layer.
    let out = ok(&scratch, &store, &["pull", &image("v2")]);
    assert!(out.contains(&format!("held   {}", first[1])), "{out}");
    assert_eq!(out.matches("added  ").count(), 2, "{out}");
    assert!(
        out.contains(&format!(
            "left out while the new layers are in the stack: {}",
            first[0]
        )),
        "{out}"
    );
    let second = next_stack(&scratch, &store);
    assert_eq!(second.len(), 3, "{second:?}");
    assert_eq!(second[2], first[1], "the base is the same layer");
    assert_same("v2 over v1", &mounted(&scratch, &store), &v2);
    // Pulling it again brings nothing.
    let out = ok(&scratch, &store, &["pull", &image("v2")]);
    assert!(out.contains("nothing was added"), "{out}");

    // Leaving v2's layers out (as trial boots running out do) brings v1 back whole.
    ok(&scratch, &store, &["disable", &second[0], &second[1]]);
    assert_eq!(next_stack(&scratch, &store), first);
    assert_same("v1 again", &mounted(&scratch, &store), &v1);
    // Leaving out only v2's top layer keeps v1's app layer out: it is superseded by v2's.
    ok(&scratch, &store, &["enable", &second[1]]);
    assert_eq!(
        next_stack(&scratch, &store),
        vec![second[1].clone(), first[1].clone()]
    );
    ok(&scratch, &store, &["enable", &second[0]]);
    // A run that a layer outside it stands in for part of cannot be merged: v2's top layer
    // supersedes v1's app layer, which would vanish into v2's app layer.
    ok(&scratch, &store, &["accept", &second[0], &second[1]]);
    let err = fails(
        &scratch,
        &store,
        &["compact", "--from", &first[0], "--to", &second[1]],
    );
    assert!(err.contains("supersedes"), "{err}");
    assert_same("v2 accepted", &mounted(&scratch, &store), &v2);

    // The same image from an oci-archive and a docker-archive, and merged into one layer.
    let archive = scratch.path("v2.oci.tar");
    layout.copy("v2", &format!("oci-archive:{}:v2", archive.display()), &[]);
    let docker = scratch.path("v2.docker.tar");
    layout.copy(
        "v2",
        &format!("docker-archive:{}:kiosk/os:v2", docker.display()),
        &[],
    );
    for (name, source, layers) in [
        (
            "from-oci-archive",
            format!("oci-archive:{}", archive.display()),
            3,
        ),
        (
            "from-docker-archive",
            format!("docker-archive:{}:kiosk/os:v2", docker.display()),
            3,
        ),
        ("squashed", image("v2"), 1),
    ] {
        let other = scratch.path(name);
        let mut args = vec!["init", "--image", source.as_str()];
        if layers == 1 {
            args.push("--squash");
        }
        ok(&scratch, &other, &args);
        assert_eq!(next_stack(&scratch, &other).len(), layers, "{name}");
        assert_same(name, &mounted(&scratch, &other), &v2);
    }
    // The merged layer has no whiteouts: nothing is below it.
    let squashed = scratch.path("squashed");
    let layer = fs::read_dir(squashed.join("layers"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        !layer.join("etc/old").exists() && fs::symlink_metadata(layer.join("etc/old")).is_err()
    );
    // A docker-archive with the layers of a store already pulled from elsewhere: held by diff_id.
    let out = ok(
        &scratch,
        &scratch.path("from-oci-archive"),
        &["pull", &format!("docker-archive:{}", docker.display())],
    );
    assert!(out.contains("nothing was added"), "{out}");
}
