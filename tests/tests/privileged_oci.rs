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
    // The manifests, hashed as the layers were unpacked, are what the layers hold.
    ok(&scratch, &store, &["verify"]);
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
    // The policy merges down to max_layers around the superseded layer, never through it: a
    // merge that took it in would show v1's app again.
    let plan = fs::read_to_string(store.join("overlayplan.toml")).unwrap();
    fs::write(
        store.join("overlayplan.toml"),
        plan.replace("max_layers = 8", "max_layers = 2"),
    )
    .unwrap();
    let out = ok(&scratch, &store, &["policy"]);
    assert!(out.contains("superseded layers are never merged"), "{out}");
    assert!(store.join("layers").join(&first[0]).is_dir());
    assert_same("v2 after the policy", &mounted(&scratch, &store), &v2);

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

/// One tar entry, written by hand: ustar, with a PAX header before it when it has records (a
/// name over 100 bytes gets one), or a GNU long-name header when asked.
#[derive(Clone)]
struct Entry {
    name: Vec<u8>,
    kind: u8,
    data: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
    dev: (u32, u32),
    pax: Vec<(String, Vec<u8>)>,
    gnu_long_name: bool,
}

fn entry(name: &str, kind: u8) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        kind,
        data: Vec::new(),
        link: Vec::new(),
        mode: if kind == b'5' { 0o755 } else { 0o644 },
        owner: (0, 0),
        dev: (0, 0),
        pax: Vec::new(),
        gnu_long_name: false,
    }
}

fn file(name: &str, data: &str) -> Entry {
    Entry {
        data: data.as_bytes().to_vec(),
        ..entry(name, b'0')
    }
}

fn dir(name: &str) -> Entry {
    entry(name, b'5')
}

fn link(name: &str, kind: u8, target: &str) -> Entry {
    Entry {
        link: target.as_bytes().to_vec(),
        ..entry(name, kind)
    }
}

fn octal(field: &mut [u8], value: u64) {
    let text = format!("{:0width$o}", value, width = field.len() - 1);
    field[..text.len()].copy_from_slice(text.as_bytes());
}

fn header(name: &[u8], kind: u8, size: u64, e: &Entry) -> [u8; 512] {
    let mut h = [0u8; 512];
    let short = &name[..name.len().min(100)];
    h[..short.len()].copy_from_slice(short);
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], u64::from(e.owner.0));
    octal(&mut h[116..124], u64::from(e.owner.1));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = kind;
    let link = &e.link[..e.link.len().min(100)];
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], u64::from(e.dev.0));
    octal(&mut h[337..345], u64::from(e.dev.1));
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

fn push_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut pax = e.pax.clone();
        if e.name.len() > 100 && !e.gnu_long_name {
            pax.push(("path".into(), e.name.clone()));
        }
        if !pax.is_empty() {
            let mut body = Vec::new();
            for (key, value) in &pax {
                let rest = key.len() + value.len() + 3;
                let mut len = rest + 1;
                while len != rest + len.to_string().len() {
                    len = rest + len.to_string().len();
                }
                body.extend_from_slice(format!("{len} {key}=").as_bytes());
                body.extend_from_slice(value);
                body.push(b'\n');
            }
            out.extend_from_slice(&header(b"././@PaxHeader", b'x', body.len() as u64, e));
            push_data(&mut out, &body);
        }
        if e.gnu_long_name {
            let mut name = e.name.clone();
            name.push(0);
            out.extend_from_slice(&header(b"././@LongLink", b'L', name.len() as u64, e));
            push_data(&mut out, &name);
        }
        out.extend_from_slice(&header(&e.name, e.kind, e.data.len() as u64, e));
        push_data(&mut out, &e.data);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

#[derive(Clone, Copy)]
enum Packed {
    Plain,
    Gzip,
    Zstd,
}

/// Writes an OCI image layout of these layers (bottom first), as a build tool would: each
/// layer's blob, the config with their diff_ids and a history line each, the manifest, the
/// index. `tweak` may change the diff_ids the config lists before it is written; the returned
/// paths are the layers' blob files.
fn write_layout(
    dir: &Path,
    layers: &[(Vec<u8>, Packed)],
    tweak: impl FnOnce(&mut Vec<String>),
) -> Vec<PathBuf> {
    use overlayctl::oci::image::sha256;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = sha256(bytes);
        let path = blobs.join(&digest["sha256:".len()..]);
        fs::write(&path, bytes).unwrap();
        (digest, bytes.len(), path)
    };
    let mut diff_ids = Vec::new();
    let mut descriptors = Vec::new();
    let mut files = Vec::new();
    for (tar, packed) in layers {
        diff_ids.push(sha256(tar));
        let (blob, media_type) = match packed {
            Packed::Plain => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            Packed::Gzip => {
                use std::io::Write as _;
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).unwrap();
                (
                    gz.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Packed::Zstd => (
                zstd::encode_all(&tar[..], 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let (digest, size, path) = put(&blob);
        files.push(path);
        descriptors
            .push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
    }
    tweak(&mut diff_ids);
    let history: Vec<_> = (0..layers.len())
        .map(|i| serde_json::json!({"created_by": format!("hand-made layer {}", i + 1)}))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": history,
    });
    let (config_digest, config_size, _) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size, _) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size}],
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    files
}

/// The base every hand-made image starts from: `srv/` (mode 0750, owner 7:7) with two files.
fn hand_base() -> Vec<u8> {
    let mut srv = dir("srv");
    srv.mode = 0o750;
    srv.owner = (7, 7);
    tar(&[
        dir("etc"),
        file("etc/motd", "hello\n"),
        srv,
        file("srv/a", "a\n"),
        file("srv/b", "b\n"),
    ])
}

#[test]
fn privileged_opaque_directories_zstd_long_names_and_pax_records_are_read() {
    let Some(scratch) =
        Scratch::new("privileged_opaque_directories_zstd_long_names_and_pax_records_are_read")
    else {
        return;
    };
    let long = format!("srv/{}/{}", "d".repeat(90), "f".repeat(60));
    let mut long_file = file(&long, "deep\n");
    long_file.pax = vec![
        ("mtime".into(), b"1700000000.25".to_vec()),
        ("SCHILY.xattr.user.strata".into(), b"pax".to_vec()),
    ];
    let layers = [
        (hand_base(), Packed::Plain),
        // No entry for srv/: it is implied, and takes its metadata from below; opaque, so
        // only c shows.
        (
            tar(&[entry("srv/.wh..wh..opq", b'0'), file("srv/c", "c\n")]),
            Packed::Zstd,
        ),
        (
            tar(&[dir(&format!("srv/{}", "d".repeat(90))), long_file]),
            Packed::Gzip,
        ),
    ];
    let image = scratch.path("image");
    write_layout(&image, &layers, |_| {});
    let store = scratch.path("store");
    ok(
        &scratch,
        &store,
        &["init", "--image", &format!("oci:{}", image.display())],
    );
    let mnt = scratch.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(&scratch, &store, &["mount", mnt.to_str().unwrap()]);
    let mut names: Vec<String> = fs::read_dir(mnt.join("srv"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["c", &"d".repeat(90)],
        "srv/ is opaque over the base"
    );
    use std::os::unix::fs::MetadataExt;
    let srv = fs::metadata(mnt.join("srv")).unwrap();
    assert_eq!(
        (srv.mode() & 0o7777, srv.uid(), srv.gid()),
        (0o750, 7, 7),
        "the implied srv/ keeps what the base gave it"
    );
    let deep = fs::metadata(mnt.join(&long)).unwrap();
    assert_eq!(
        (deep.mtime(), deep.mtime_nsec()),
        (1_700_000_000, 250_000_000)
    );
    assert_eq!(
        xattr::get(mnt.join(&long), "user.strata").unwrap(),
        Some(b"pax".to_vec())
    );
    assert_eq!(fs::read_to_string(mnt.join("etc/motd")).unwrap(), "hello\n");
    ok(&scratch, &store, &["umount", mnt.to_str().unwrap()]);
    ok(&scratch, &store, &["verify"]);
}

#[test]
fn privileged_hostile_layers_are_refused_with_the_store_unchanged() {
    let Some(scratch) =
        Scratch::new("privileged_hostile_layers_are_refused_with_the_store_unchanged")
    else {
        return;
    };
    let base = (hand_base(), Packed::Gzip);
    let good = scratch.path("good");
    write_layout(&good, std::slice::from_ref(&base), |_| {});
    let store = scratch.path("store");
    ok(
        &scratch,
        &store,
        &["init", "--image", &format!("oci:{}", good.display())],
    );
    let victim = scratch.path("victim");
    fs::create_dir_all(&victim).unwrap();
    let snapshot = || {
        (
            fs::read(store.join("overlayplan.toml")).unwrap(),
            tests::dir_names(&store.join("layers")),
            tests::dir_names(&store.join("manifests")),
            tests::dir_names(&store.join("staging")),
            tests::dir_names(&victim),
        )
    };
    let before = snapshot();
    let huge = vec![b'a'; 2 << 20];
    let mut overlay_xattr = file("etc/x", "x");
    overlay_xattr.pax = vec![(
        "SCHILY.xattr.trusted.overlay.redirect".into(),
        b"/etc".to_vec(),
    )];
    let mut huge_pax = file("etc/x", "x");
    huge_pax.pax = vec![("comment".into(), huge.clone())];
    let mut huge_name = file(std::str::from_utf8(&huge).unwrap(), "x");
    huge_name.gnu_long_name = true;
    let mut whiteout_device = entry("etc/null", b'3');
    whiteout_device.dev = (0, 0);
    let escape = victim.display().to_string();
    let mut trailing = tar(&[file("etc/x", "x")]);
    trailing.extend_from_slice(b"a second archive hides here");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dot-dot",
            tar(&[file("../../../victim/x", "x")]),
            "has `..`",
        ),
        ("absolute", tar(&[file("/victim/x", "x")]), "is absolute"),
        (
            "through a symlink",
            tar(&[link("esc", b'2', &escape), file("esc/pwned", "x")]),
            "a symlink in this layer, not a directory",
        ),
        (
            "link out",
            tar(&[link("etc/p", b'1', "../../../etc/passwd")]),
            "has `..`",
        ),
        (
            "link absolute",
            tar(&[link("etc/p", b'1', "/etc/passwd")]),
            "is absolute",
        ),
        (
            "link to nothing",
            tar(&[link("etc/p", b'1', "etc/nothing")]),
            "not an earlier entry",
        ),
        (
            "link to a directory",
            tar(&[dir("etc"), link("etc/p", b'1', "etc")]),
            "a hard link to \"etc\", which is a directory",
        ),
        (
            "whiteout over a parent",
            tar(&[entry(".wh.srv", b'0'), file("srv/x", "x")]),
            "a whiteout in this layer, not a directory",
        ),
        (
            "an entry and its whiteout",
            tar(&[file("etc/y", "y"), entry("etc/.wh.y", b'0')]),
            "a whiteout of \"etc/y\"",
        ),
        (
            "reserved whiteout name",
            tar(&[entry("etc/.wh..wh.x", b'0')]),
            "not a whiteout name",
        ),
        (
            "huge PAX header",
            tar(&[huge_pax]),
            "more than 1048576 bytes",
        ),
        (
            "huge long name",
            tar(&[huge_name]),
            "more than 1048576 bytes",
        ),
        (
            "overlay attribute",
            tar(&[overlay_xattr]),
            "overlayfs attribute",
        ),
        (
            "whiteout-form device",
            tar(&[whiteout_device]),
            "0/0 character device",
        ),
        (
            "twice",
            tar(&[file("etc/y", "1"), file("etc/y", "2")]),
            "already a file",
        ),
        ("data after the end", trailing, "data after its end"),
        (
            "opaque root",
            tar(&[entry(".wh..wh..opq", b'0')]),
            "opaque marker at the layer's root",
        ),
        (
            "a volume header",
            tar(&[entry("vol", b'V')]),
            "which a layer cannot hold",
        ),
    ];
    for (what, bad, expected) in cases {
        let dir = scratch.path(&format!("bad-{}", what.replace(' ', "-")));
        write_layout(&dir, &[base.clone(), (bad, Packed::Gzip)], |_| {});
        let err = fails(
            &scratch,
            &store,
            &["pull", &format!("oci:{}", dir.display())],
        );
        assert!(
            err.contains(expected),
            "{what}: expected {expected:?} in:\n{err}"
        );
        assert!(
            before == snapshot(),
            "{what}: the store or the victim changed"
        );
    }
    // A config whose diff_id is not the layer's, and a blob changed after the manifest was made.
    let dir = scratch.path("bad-diff-id");
    write_layout(
        &dir,
        &[base.clone(), (tar(&[file("etc/y", "y")]), Packed::Gzip)],
        |ids| {
            ids[1] = format!("sha256:{}", "0".repeat(64));
        },
    );
    let err = fails(
        &scratch,
        &store,
        &["pull", &format!("oci:{}", dir.display())],
    );
    assert!(err.contains("not the diff_id"), "{err}");
    assert!(before == snapshot(), "diff_id: the store changed");
    let dir = scratch.path("bad-blob");
    let blobs = write_layout(
        &dir,
        &[base.clone(), (tar(&[file("etc/y", "y")]), Packed::Plain)],
        |_| {},
    );
    let mut bytes = fs::read(&blobs[1]).unwrap();
    let at = bytes.windows(2).position(|w| w == b"y\0").unwrap_or(600);
    bytes[at] = b'z';
    fs::write(&blobs[1], &bytes).unwrap();
    let err = fails(
        &scratch,
        &store,
        &["pull", &format!("oci:{}", dir.display())],
    );
    assert!(err.contains("changed or damaged"), "{err}");
    assert!(before == snapshot(), "tampered blob: the store changed");
    // And a good second layer goes in after all that.
    let dir = scratch.path("good-2");
    write_layout(
        &dir,
        &[base, (tar(&[file("etc/y", "y")]), Packed::Zstd)],
        |_| {},
    );
    ok(
        &scratch,
        &store,
        &["pull", &format!("oci:{}", dir.display())],
    );
}

/// Through Debian's registry: a registry that wants a token (from a token server that wants a
/// password), a download cut half-way and resumed with a range request, a blob changed in the
/// registry's storage refused.
#[test]
fn privileged_registry_pulls_with_tokens_resume_cut_downloads_and_refuse_tampered_blobs() {
    use tests::oci::{CuttingProxy, Registry, TokenServer, noise};
    let Some(scratch) = Scratch::new(
        "privileged_registry_pulls_with_tokens_resume_cut_downloads_and_refuse_tampered_blobs",
    ) else {
        return;
    };
    let layout = Layout::new(&scratch.path("layout"), &scratch.path("umoci"));
    layout.layer(None, "v1", "ADD base", |root| {
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/motd"), "v1\n").unwrap();
    });
    // 6 MiB that do not compress: a layer worth cutting.
    layout.layer(Some("v1"), "v2", "RUN fetch data", |root| {
        fs::create_dir_all(root.join("data")).unwrap();
        fs::write(root.join("data/blob"), noise(6 << 20, 7)).unwrap();
    });
    let tokens = TokenServer::start(&scratch.path(""), "fleet", "s3cret");
    let registry_dir = scratch.path("registry");
    fs::create_dir_all(&registry_dir).unwrap();
    let registry = Registry::start(&registry_dir, Some(&tokens.registry_auth()));
    let host = registry.host();
    for tag in ["v1", "v2"] {
        layout.copy(
            tag,
            &format!("docker://{host}/kiosk/os:{tag}"),
            &["--dest-tls-verify=false", "--dest-creds", "fleet:s3cret"],
        );
    }
    let reference = |tag: &str| format!("{host}/kiosk/os:{tag}");

    // Without credentials the token server says no, and the error says what to give.
    let store = scratch.path("store");
    let err = fails(
        &scratch,
        &store,
        &["init", "--image", &reference("v1"), "--insecure"],
    );
    assert!(err.contains("--creds"), "{err}");
    assert!(!store.join("overlayplan.toml").exists());
    let creds = ["--insecure", "--creds", "fleet:s3cret"];
    let mut args = vec!["init", "--image"];
    let v1 = reference("v1");
    args.push(&v1);
    args.extend(creds);
    ok(&scratch, &store, &args);
    assert!(tokens.given.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let want_v1 = shown_tree(&layout.unpack("v1", &scratch.path("unpacked-v1")));
    assert_same("v1 from the registry", &mounted(&scratch, &store), &want_v1);

    // v2 through a proxy that cuts its big layer after 1 MiB: the pull fails, keeps what came,
    // changes nothing; the next pull asks for the rest and finishes.
    let proxy = CuttingProxy::start(registry.port);
    let manifest: serde_json::Value = serde_json::from_str(&tests::oci::run(
        std::process::Command::new("skopeo")
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                "--creds",
                "fleet:s3cret",
            ])
            .arg(format!("docker://{}", reference("v2"))),
    ))
    .unwrap();
    let big = manifest["layers"][1]["digest"].as_str().unwrap().to_owned();
    let big_size = manifest["layers"][1]["size"].as_u64().unwrap();
    assert!(
        big_size > 6_000_000,
        "the layer does not compress: {big_size}"
    );
    proxy.arm(&big, 1 << 20);
    let plan_before = fs::read(store.join("overlayplan.toml")).unwrap();
    let through_proxy = format!("127.0.0.1:{}/kiosk/os:v2", proxy.port);
    let mut args = vec!["pull", through_proxy.as_str()];
    args.extend(creds);
    let err = fails(&scratch, &store, &args);
    assert!(err.contains("run the command again to resume"), "{err}");
    assert!(proxy.cuts_made.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        fs::read(store.join("overlayplan.toml")).unwrap(),
        plan_before
    );
    let part = store
        .join("downloads")
        .join(format!("sha256-{}.blob.part", &big["sha256:".len()..]));
    let kept = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(
        kept >= 1 << 20 && kept < big_size,
        "kept {kept} of {big_size}"
    );
    let out = ok(&scratch, &store, &args);
    assert!(out.contains("added  "), "{out}");
    let ranges: Vec<String> = proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(target, _)| target.contains(&big))
        .filter_map(|(_, range)| range.clone())
        .collect();
    assert_eq!(
        ranges,
        [format!("bytes={kept}-")],
        "the second pull resumed where the first stopped"
    );
    let want_v2 = shown_tree(&layout.unpack("v2", &scratch.path("unpacked-v2")));
    assert_same("v2 from the registry", &mounted(&scratch, &store), &want_v2);
    ok(&scratch, &store, &["verify"]);
    assert!(
        tests::dir_names(&store.join("downloads")).is_empty(),
        "the downloads are removed once the layers are in"
    );

    // `init --image` cut half-way keeps only its downloads, and the next one resumes them.
    let cut_init = scratch.path("cut-init");
    proxy.arm(&big, 1 << 20);
    let mut args = vec!["init", "--image", through_proxy.as_str()];
    args.extend(creds);
    let err = fails(&scratch, &cut_init, &args);
    assert!(err.contains("run the command again to resume"), "{err}");
    assert_eq!(tests::dir_names(&cut_init), ["downloads"]);
    ok(&scratch, &cut_init, &args);
    let resumed = proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(target, range)| target.contains(&big) && range.is_some())
        .count();
    assert_eq!(resumed, 2, "the second init resumed too");
    assert_same(
        "v2 from a resumed init",
        &mounted(&scratch, &cut_init),
        &want_v2,
    );
    // Never into a directory that holds something else.
    let busy = scratch.path("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("mine"), "keep").unwrap();
    let mut args = vec!["init", "--image", through_proxy.as_str()];
    args.extend(creds);
    let err = fails(&scratch, &busy, &args);
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(tests::dir_names(&busy), ["mine"]);

    // A blob changed in the registry's storage: served under its old digest, refused, and the
    // download that does not match is not kept.
    let fresh = scratch.path("fresh");
    let mut args = vec!["init", "--image"];
    let v1_ref = reference("v1");
    args.push(&v1_ref);
    args.extend(creds);
    ok(&scratch, &fresh, &args);
    let plan_before = fs::read(fresh.join("overlayplan.toml")).unwrap();
    let file = registry.blob_file(&big);
    let mut bytes = fs::read(&file).unwrap();
    bytes[1000] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    let v2_ref = reference("v2");
    let mut args = vec!["pull", v2_ref.as_str()];
    args.extend(creds);
    let err = fails(&scratch, &fresh, &args);
    assert!(err.contains("changed or damaged"), "{err}");
    assert_eq!(
        fs::read(fresh.join("overlayplan.toml")).unwrap(),
        plan_before
    );
    assert!(
        tests::dir_names(&fresh.join("downloads")).is_empty(),
        "the bad download is gone"
    );
    assert!(tests::dir_names(&fresh.join("staging")).is_empty());

    // A signed bundle through the same registry, as an OCI artifact.
    let (old, new) = (scratch.path("tree-1"), scratch.path("tree-2"));
    for (tree, text) in [(&old, "one\n"), (&new, "two\n")] {
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/release"), text).unwrap();
    }
    fs::write(new.join("etc/added"), "new\n").unwrap();
    let bundled = scratch.path("bundled");
    ok(
        &scratch,
        &bundled,
        &["init", "--base", old.to_str().unwrap()],
    );
    let key = scratch.path("build.key");
    ok(
        &scratch,
        &bundled,
        &["keys", "generate", "-o", key.to_str().unwrap()],
    );
    let public = format!("{}.pub", key.display());
    ok(
        &scratch,
        &bundled,
        &["keys", "add", &public, "--name", "build"],
    );
    let file = scratch.path("rel-2.bundle");
    ok(
        &scratch,
        &bundled,
        &[
            "bundle",
            "create",
            "--from",
            old.to_str().unwrap(),
            "--to",
            new.to_str().unwrap(),
            "-o",
            file.to_str().unwrap(),
            "--sign",
            key.to_str().unwrap(),
        ],
    );
    let bundle_ref = format!("{host}/kiosk/bundles:rel-2");
    let mut args = vec![
        "bundle",
        "push",
        file.to_str().unwrap(),
        bundle_ref.as_str(),
    ];
    args.extend(creds);
    let out = ok(&scratch, &bundled, &args);
    assert!(out.contains("pushed"), "{out}");
    let mut args = vec!["add-layer", "--bundle", bundle_ref.as_str()];
    args.extend(creds);
    let out = ok(&scratch, &bundled, &args);
    assert!(
        out.contains("signed by build") && out.contains("added layer rel-2"),
        "{out}"
    );
    assert_same(
        "the bundle's tree",
        &mounted(&scratch, &bundled),
        &shown_tree(&new),
    );
    assert!(tests::dir_names(&bundled.join("downloads")).is_empty());
    // An image's tag is no bundle.
    let mut args = vec!["add-layer", "--bundle", v1_ref.as_str(), "--name", "x"];
    args.extend(creds);
    let err = fails(&scratch, &bundled, &args);
    assert!(err.contains("not a Strata bundle"), "{err}");
}
