//! Bundles end to end through `overlayctl`, as root: a signed bundle made on a "build server"
//! from two trees, applied to a store whose stack is the old tree, mounted and compared with the
//! new tree; then every kind of bad bundle (truncated, tampered, wrong base, unsigned, escaping
//! paths, a path through a symlink, a decompression bomb), each refused with a clear error and
//! nothing changed in the store.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

use assert_cmd::Command;
use tests::Scratch;

struct Env {
    scratch: Scratch,
}

impl std::ops::Deref for Env {
    type Target = Scratch;

    fn deref(&self) -> &Scratch {
        &self.scratch
    }
}

impl Env {
    fn new(test: &str) -> Option<Self> {
        let env = Self {
            scratch: Scratch::new(test)?,
        };
        old_tree(&env.path("old"));
        new_tree(&env.path("old"), &env.path("new"));
        Some(env)
    }

    fn cmd(&self, store: &str, args: &[&str]) -> Command {
        self.overlayctl(&self.path(store), args)
    }

    fn ok(&self, store: &str, args: &[&str]) -> String {
        let out = self
            .cmd(store, args)
            .assert()
            .success()
            .get_output()
            .clone();
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, store: &str, args: &[&str]) -> String {
        let out = self
            .cmd(store, args)
            .assert()
            .failure()
            .get_output()
            .clone();
        String::from_utf8(out.stderr).unwrap()
    }

    /// `bundle create --from FROM --to NEW -o OUT [--sign KEY]`, run "on the build server";
    /// returns its report.
    fn create(&self, from: &Path, out: &Path, key: Option<&Path>) -> String {
        let new = self.path("new");
        let mut args = vec![
            "bundle",
            "create",
            "--from",
            from.to_str().unwrap(),
            "--to",
            new.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        if let Some(key) = key {
            args.extend(["--sign", key.to_str().unwrap()]);
        }
        self.ok("server", &args)
    }

    /// A store whose only layer is the old tree.
    fn store(&self, name: &str) {
        self.ok(
            name,
            &["init", "--base", self.path("old").to_str().unwrap()],
        );
    }

    /// Every path, size and inode in a store (the lock file aside).
    fn snapshot(&self, store: &str) -> Vec<(PathBuf, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let mut stack = vec![self.path(store)];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    stack.push(path.clone());
                }
                out.push((path, meta.len(), meta.ino()));
            }
        }
        out.retain(|(p, _, _)| !p.ends_with(".lock"));
        out.sort();
        out
    }
}

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// Text that compresses, and changes a little between the versions.
fn library(version: u32) -> Vec<u8> {
    (0..20_000)
        .map(|i| {
            format!(
                "symbol_{i} version {}\n",
                if i == 7_777 { version } else { 1 }
            )
        })
        .collect::<String>()
        .into_bytes()
}

fn old_tree(root: &Path) {
    write(&root.join("etc/motd"), b"old\n");
    write(&root.join("etc/gone.conf"), b"going\n");
    write(&root.join("usr/lib/libbig.so"), &library(1));
    write(&root.join("usr/bin/tool"), b"#!/bin/sh\necho 1\n");
    fs::set_permissions(root.join("usr/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("tool", root.join("usr/bin/t")).unwrap();
    // 9 MiB that do not compress, too large for a diff.
    let mut noise = Vec::with_capacity(9 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while noise.len() < 9 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend(x.to_le_bytes());
    }
    write(&root.join("usr/share/big.dat"), &noise);
}

fn new_tree(old: &Path, root: &Path) {
    let copied = StdCommand::new("cp")
        .arg("-a")
        .arg(old)
        .arg(root)
        .status()
        .unwrap();
    assert!(copied.success());
    write(&root.join("etc/motd"), b"new\n");
    fs::remove_file(root.join("etc/gone.conf")).unwrap();
    write(&root.join("usr/lib/libbig.so"), &library(2));
    write(&root.join("usr/share/new/readme"), b"hello\n");
    // A new symlink, as a library upgrade leaves one: it exists in the bundle only, never as a
    // file to link into the new layer.
    std::os::unix::fs::symlink("libbig.so", root.join("usr/lib/libbig.so.2")).unwrap();
    // An empty file last of all: its content is no bytes of a part.
    write(&root.join("var/zz-empty"), b"");
    // The large file's content unchanged, its mtime new (as an upgrade leaves it): no payload.
    let big = fs::File::options()
        .write(true)
        .open(root.join("usr/share/big.dat"))
        .unwrap();
    big.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30))
        .unwrap();
    fs::hard_link(
        root.join("usr/share/new/readme"),
        root.join("usr/share/new/README"),
    )
    .unwrap();
    fs::set_permissions(
        root.join("usr/bin/tool"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    xattr::set(root.join("usr/bin/tool"), "user.origin", b"release 2").unwrap();
}

#[test]
fn privileged_bundle_signed_applies_and_mounts_as_the_new_tree() {
    let Some(env) = Env::new("privileged_bundle_signed_applies_and_mounts_as_the_new_tree") else {
        return;
    };
    let key = env.path("build.key");
    env.ok("server", &["keys", "generate", "-o", key.to_str().unwrap()]);
    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret key is private");
    let bundle = env.path("release-2.bundle");
    let made = env.create(&env.path("old"), &bundle, Some(&key));
    assert!(
        made.contains("1 as binary diffs (0 gzip files as their content), 2 from the base unchanged, in 1 parts; signed"),
        "{made}"
    );
    // The library changed in one line of 20,000: sent as a diff, the bundle is tiny.
    let size = fs::metadata(&bundle).unwrap().len();
    assert!(size < 8_000, "a {size}-byte bundle for a one-line change");

    env.store("device");
    env.ok(
        "device",
        &[
            "keys",
            "add",
            format!("{}.pub", key.display()).as_str(),
            "--name",
            "build",
        ],
    );
    let info = env.ok("device", &["bundle", "info", bundle.to_str().unwrap()]);
    assert!(info.contains("signer signed by build"), "{info}");
    assert!(
        info.contains(
            "6 files: 1 binary diffs, 0 gzip files as their content, 2 unchanged from the base; 1 parts"
        ),
        "{info}"
    );
    let verified = env.ok("device", &["bundle", "verify", bundle.to_str().unwrap()]);
    assert!(verified.contains("intact"), "{verified}");

    let added = env.ok(
        "device",
        &["add-layer", "--bundle", bundle.to_str().unwrap()],
    );
    assert!(added.contains("signed by build"), "{added}");
    assert!(added.contains("added layer release-2"), "{added}");
    let mnt = env.path("mnt");
    fs::create_dir(&mnt).unwrap();
    env.ok("device", &["mount", mnt.to_str().unwrap(), "--read-only"]);
    let (shown, wanted) = (
        tests::views::shown_tree(&mnt),
        tests::views::shown_tree(&env.path("new")),
    );
    assert_eq!(tests::views::first_difference(&wanted, &shown), None);
    assert_eq!(shown.len(), wanted.len());
    env.ok("device", &["umount", mnt.to_str().unwrap()]);
    // The layer holds the rebuilt files, not the unchanged ones; the store's staging is empty.
    assert!(!env.path("device/layers/release-2/usr/bin/t").exists());
    assert_eq!(
        fs::read_dir(env.path("device/staging")).map_or(0, |d| d.count()),
        0
    );

    // The same bundle again: the stack has moved on, so its base no longer matches.
    let before = env.snapshot("device");
    let e = env.fails(
        "device",
        &[
            "add-layer",
            "--bundle",
            bundle.to_str().unwrap(),
            "--name",
            "again",
        ],
    );
    assert!(e.contains("applies to the tree"), "{e}");
    assert_eq!(env.snapshot("device"), before);
}

/// The mounted next-boot stack of `store` shows exactly `tree`.
fn assert_stack_shows(env: &Env, store: &str, tree: &Path) {
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    env.ok(store, &["mount", mnt.to_str().unwrap(), "--read-only"]);
    let (shown, wanted) = (
        tests::views::shown_tree(&mnt),
        tests::views::shown_tree(tree),
    );
    env.ok(store, &["umount", mnt.to_str().unwrap()]);
    assert_eq!(tests::views::first_difference(&wanted, &shown), None);
    assert_eq!(shown.len(), wanted.len());
}

/// A device whose store went through a disk image made with `mkfs.ext4 -d`, which keeps whole
/// seconds of every mtime: a bundle made from the original trees still applies there, and gives
/// the promised tree.
#[test]
fn privileged_bundle_applies_where_mtimes_lost_their_fractions() {
    let Some(env) = Env::new("privileged_bundle_applies_where_mtimes_lost_their_fractions") else {
        return;
    };
    let bundle = env.path("release-2.bundle");
    env.create(&env.path("old"), &bundle, None);
    // The old tree with every mtime cut to its whole second, as the device has it.
    let cut = env.path("cut");
    tests::vm::run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(env.path("old"))
            .arg(&cut),
    );
    let listed = tests::vm::run(
        std::process::Command::new("find")
            .arg(&cut)
            .args(["-printf", "%T@ %p\\n"]),
    );
    let mut fractions = 0;
    for line in listed.lines() {
        let (time, path) = line.split_once(' ').unwrap();
        let whole = time.split('.').next().unwrap();
        fractions += usize::from(!time.ends_with(".0000000000"));
        tests::vm::run(
            std::process::Command::new("touch")
                .args(["-h", "-d", &format!("@{whole}")])
                .arg(path),
        );
    }
    assert!(
        fractions > 0,
        "the old tree has mtimes with fractions:\n{listed}"
    );
    env.ok("device", &["init", "--base", cut.to_str().unwrap()]);
    let added = env.ok(
        "device",
        &[
            "add-layer",
            "--bundle",
            bundle.to_str().unwrap(),
            "--name",
            "r2",
        ],
    );
    assert!(added.contains("added layer r2"), "{added}");
}

#[test]
fn privileged_bundle_from_a_store_layer() {
    let Some(env) = Env::new("privileged_bundle_from_a_store_layer") else {
        return;
    };
    // The build server keeps a store like its devices': the base, then release 2 synced in.
    let (old, new) = (env.path("old"), env.path("new"));
    env.store("server");
    env.ok("server", &["sync", new.to_str().unwrap(), "--name", "r2"]);
    let third = env.path("third");
    let copied = StdCommand::new("cp")
        .arg("-a")
        .arg(&new)
        .arg(&third)
        .status();
    assert!(copied.unwrap().success());
    write(&third.join("usr/lib/libbig.so"), &library(3));
    let server = env.path("server");
    let create = |from_layer: Option<&str>, to: &Path, out: &Path| {
        let mut args = vec!["bundle", "create", "--from", server.to_str().unwrap()];
        args.extend(
            from_layer
                .map(|l| ["--from-layer", l])
                .into_iter()
                .flatten(),
        );
        args.extend(["--to", to.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        env.ok("elsewhere", &args)
    };

    // Devices still on the base get base -> release 2; devices on release 2 get 2 -> 3.
    let (to_2, to_3) = (env.path("to-2.bundle"), env.path("to-3.bundle"));
    let made = create(Some("base"), &new, &to_2);
    assert!(
        made.contains(
            "1 as binary diffs (0 gzip files as their content), 2 from the base unchanged"
        ),
        "{made}"
    );
    create(None, &third, &to_3);
    env.store("device");
    let e = env.fails("device", &["add-layer", "--bundle", to_3.to_str().unwrap()]);
    assert!(e.contains("applies to the tree"), "{e}");
    env.ok("device", &["add-layer", "--bundle", to_2.to_str().unwrap()]);
    assert_stack_shows(&env, "device", &new);
    env.ok("device", &["add-layer", "--bundle", to_3.to_str().unwrap()]);
    assert_stack_shows(&env, "device", &third);

    // Bad input: a layer the server's plan lacks; --from-layer with a tree; a store as NEW.
    let fails = |from: &Path, from_layer: Option<&str>, to: &Path| {
        let mut args = vec!["bundle", "create", "--from", from.to_str().unwrap()];
        args.extend(
            from_layer
                .map(|l| ["--from-layer", l])
                .into_iter()
                .flatten(),
        );
        let out = env.path("x.bundle");
        args.extend(["--to", to.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        env.fails("elsewhere", &args)
    };
    let e = fails(&server, Some("r9"), &third);
    assert!(e.contains("has no layer \"r9\" (it has: r2, base)"), "{e}");
    let e = fails(&old, Some("base"), &third);
    assert!(e.contains("--from-layer needs --from to be a store"), "{e}");
    let e = fails(&old, None, &server);
    assert!(e.contains("is a Strata store; --to takes"), "{e}");
    assert!(!env.path("x.bundle").exists());
}

/// A bundle file written by hand: the manifest (written here as TOML, stored as the JSON a
/// bundle holds), no signatures, payload bytes.
fn craft(path: &Path, manifest: &str, payload: &[u8]) {
    let value: toml::Value = toml::from_str(manifest).unwrap();
    let json = serde_json::to_vec(&value).unwrap();
    let packed = zstd::bulk::compress(&json, 3).unwrap();
    let mut bytes = b"STRATAB\x03".to_vec();
    bytes.extend((packed.len() as u64).to_le_bytes());
    bytes.extend(packed);
    bytes.extend(0u32.to_le_bytes());
    bytes.extend(payload);
    fs::write(path, bytes).unwrap();
}

/// A payload of one part holding `frame` (a zstd frame) that claims to hold `controls`,
/// `diffs` and `literals` bytes: the manifest's `payload` line and part table, and the bytes.
fn one_part(frame: &[u8], controls: usize, diffs: usize, literals: usize) -> String {
    format!(
        "payload = {len}\n[[part]]\noffset = 0\nlength = {len}\ncontrols = {controls}\n\
         diffs = {diffs}\nliterals = {literals}\n",
        len = frame.len()
    )
}

/// A binary diff control: add, copy, then move by `seek` in the old file.
fn control(add: u64, copy: u64, seek: i64) -> Vec<u8> {
    let mut out = Vec::new();
    for mut n in [add, copy, ((seek << 1) ^ (seek >> 63)) as u64] {
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    out
}

#[test]
fn privileged_bundle_bad_bundles_change_nothing() {
    let Some(env) = Env::new("privileged_bundle_bad_bundles_change_nothing") else {
        return;
    };
    let key = env.path("build.key");
    env.ok("server", &["keys", "generate", "-o", key.to_str().unwrap()]);
    let good = env.path("good.bundle");
    let old = env.path("old");
    env.create(&old, &good, Some(&key));
    env.store("device");
    env.ok(
        "device",
        &[
            "keys",
            "add",
            format!("{}.pub", key.display()).as_str(),
            "--name",
            "build",
        ],
    );
    let bytes = fs::read(&good).unwrap();
    let before = env.snapshot("device");
    let refused = |file: &Path, extra: &[&str], want: &str| {
        let mut args = vec![
            "add-layer",
            "--bundle",
            file.to_str().unwrap(),
            "--name",
            "x",
        ];
        args.extend(extra);
        let e = env.fails("device", &args);
        assert!(
            e.contains(want),
            "{}: wanted {want:?} in:\n{e}",
            file.display()
        );
        assert_eq!(
            env.snapshot("device"),
            before,
            "{} changed the store",
            file.display()
        );
    };

    let truncated = env.path("truncated.bundle");
    fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    refused(&truncated, &[], "truncated or extended");
    fs::write(&truncated, &bytes[..40]).unwrap();
    refused(&truncated, &[], "truncated");

    // A changed payload byte: the signature still matches the manifest, the content does not.
    let tampered = env.path("tampered.bundle");
    let mut changed = bytes.clone();
    let last = changed.len() - 3;
    changed[last] ^= 0x55;
    fs::write(&tampered, &changed).unwrap();
    let e = env.fails(
        "device",
        &["add-layer", "--bundle", tampered.to_str().unwrap()],
    );
    assert!(
        e.contains("does not match its hash")
            || e.contains("corrupt")
            || e.contains("does not apply"),
        "{e}"
    );
    assert_eq!(env.snapshot("device"), before);

    // A changed manifest (stored compressed after the 16-byte header): the signature no
    // longer matches, and nothing is decompressed.
    let mut changed = bytes.clone();
    changed[16 + 20] ^= 0x01;
    fs::write(&tampered, &changed).unwrap();
    refused(&tampered, &[], "does not match its manifest");

    // Unsigned while keys/ holds keys: refused unless asked for.
    let unsigned = env.path("unsigned.bundle");
    env.create(&old, &unsigned, None);
    refused(&unsigned, &[], "is not signed by a key in");

    // Made for another tree.
    let other = env.path("other.bundle");
    let elsewhere = env.path("elsewhere");
    write(&elsewhere.join("etc/motd"), b"elsewhere\n");
    env.create(&elsewhere, &other, Some(&key));
    refused(&other, &[], "applies to the tree");

    // Hand-made bundles: escaping paths, a path through a symlink, a decompression bomb.
    let info = env.ok("device", &["bundle", "info", good.to_str().unwrap()]);
    let base = info
        .lines()
        .find_map(|l| l.strip_prefix("base   "))
        .unwrap()
        .to_owned();
    let head = format!("version = 3\nbase = \"{base}\"\ntarget = \"blake3:00\"\n");
    let crafted = env.path("crafted.bundle");
    let root = "[[entry]]\npath = \".\"\nkind = \"dir\"\nmode = 493\n";
    craft(
        &crafted,
        &format!("{head}payload = 0\n{root}[[entry]]\npath = \"../escape\"\nkind = \"fifo\"\n"),
        b"",
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "is not a plain relative path",
    );
    craft(
        &crafted,
        &format!("{head}payload = 0\n{root}[[entry]]\npath = \"/etc/passwd\"\nkind = \"fifo\"\n"),
        b"",
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "is not a plain relative path",
    );
    craft(
        &crafted,
        &format!(
            "{head}payload = 0\n{root}[[entry]]\npath = \"a\"\nkind = \"symlink\"\ntarget = \"/etc\"\n\
             [[entry]]\npath = \"a/passwd\"\nkind = \"fifo\"\n"
        ),
        b"",
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "is not under a directory the bundle made",
    );
    // A part that decompresses to 64 MiB where it claims 10 bytes; a part larger than a device
    // holds.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    let file = |size: usize, length: usize| {
        format!(
            "[[entry]]\npath = \"bomb\"\nkind = \"file\"\nsize = {size}\nhash = \"{}\"\n\
             data = {{ encoding = \"whole\", part = 0, offset = 0, length = {length} }}\n",
            blake3::hash(&vec![0u8; size]).to_hex()
        )
    };
    craft(
        &crafted,
        &format!("{head}{}{root}{}", one_part(&bomb, 0, 0, 10), file(10, 10)),
        &bomb,
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "does not decompress to its 10 bytes",
    );
    craft(
        &crafted,
        &format!(
            "{head}{}{root}{}",
            one_part(&bomb, 0, 0, 64 << 20),
            file(64 << 20, 64 << 20)
        ),
        &bomb,
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "part 0 holds 67108864 bytes",
    );
    assert_eq!(
        fs::read_dir(env.path("device/staging")).map_or(0, |d| d.count()),
        0
    );

    // Content shorter than the size the manifest gives (the copy would pad it with zeros).
    let short = zstd::bulk::compress(b"new\n", 3).unwrap();
    craft(
        &crafted,
        &format!(
            "{head}{}{root}[[entry]]\npath = \"short\"\nkind = \"file\"\nsize = 1000\n\
             hash = \"{}\"\ndata = {{ encoding = \"whole\", part = 0, offset = 0, length = 4 }}\n",
            one_part(&short, 0, 0, 4),
            blake3::hash(b"new\n").to_hex(),
        ),
        &short,
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "entry \"short\" has 4 bytes of content, not the 1000 its size says",
    );
    // Two files on the same bytes of a part: each byte of a part is used once.
    let twice = zstd::bulk::compress(b"same", 3).unwrap();
    craft(
        &crafted,
        &format!(
            "{head}{}{root}[[entry]]\npath = \"a\"\nkind = \"file\"\nsize = 4\nhash = \"{h}\"\n\
             data = {{ encoding = \"whole\", part = 0, offset = 0, length = 4 }}\n\
             [[entry]]\npath = \"b\"\nkind = \"file\"\nsize = 4\nhash = \"{h}\"\n\
             data = {{ encoding = \"whole\", part = 0, offset = 0, length = 4 }}\n",
            one_part(&twice, 0, 0, 4),
            h = blake3::hash(b"same").to_hex(),
        ),
        &twice,
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "b: its bytes do not start where the previous file's end in part 0",
    );
    // A manifest that decompresses to more than 128 MiB: refused before it is all read.
    let mut bomb_manifest = b"STRATAB\x03".to_vec();
    let packed = zstd::bulk::compress(&vec![b'#'; 129 << 20], 3).unwrap();
    bomb_manifest.extend((packed.len() as u64).to_le_bytes());
    bomb_manifest.extend(packed);
    bomb_manifest.extend(0u32.to_le_bytes());
    fs::write(&crafted, bomb_manifest).unwrap();
    refused(
        &crafted,
        &["--allow-unsigned"],
        "its manifest decompresses to more than 134217728 bytes",
    );
    // Diffs against the stack's etc/motd ("old\n"): one naming another basis file, one that
    // makes more than the file's size (the same 4 bytes again and again), one that reads past
    // the old file's end, and one naming a basis path outside the tree.
    let again: Vec<u8> = (0..1000).flat_map(|_| control(4, 0, -4)).collect();
    for (controls, diffs, extra, size, basis, from, error) in [
        (
            control(0, 4, 0),
            0,
            &b"new\n"[..],
            4,
            &b"not old\n"[..],
            "",
            "etc/motd: this stack's etc/motd is not the file the diff was made against",
        ),
        (
            again,
            4000,
            &b""[..],
            10,
            &b"old\n"[..],
            "",
            "etc/motd: its diff does not apply",
        ),
        (
            control(400, 0, 0),
            400,
            &b""[..],
            400,
            &b"old\n"[..],
            "",
            "reads past the end of the file it applies to",
        ),
        (
            control(0, 4, 0),
            0,
            &b"new\n"[..],
            4,
            &b"old\n"[..],
            ", from = \"../../etc/passwd\"",
            "is made from \"../../etc/passwd\", not a plain relative path",
        ),
    ] {
        let mut part = controls.clone();
        part.extend(vec![0u8; diffs]);
        part.extend(extra);
        let frame = zstd::bulk::compress(&part, 3).unwrap();
        let new = vec![b'x'; size];
        craft(
            &crafted,
            &format!(
                "{head}{}{root}[[entry]]\npath = \"etc\"\nkind = \"dir\"\n\
                 [[entry]]\npath = \"etc/motd\"\nkind = \"file\"\nsize = {size}\nhash = \"{}\"\n\
                 data = {{ encoding = \"bsdiff\", part = 0, offset = 0, length = {}, diff = 0, \
                 extra = 0, basis = \"{}\"{from} }}\n",
                one_part(&frame, controls.len(), diffs, extra.len()),
                blake3::hash(&new).to_hex(),
                controls.len(),
                blake3::hash(basis).to_hex(),
            ),
            &frame,
        );
        refused(&crafted, &["--allow-unsigned"], error);
    }
    // An unchanged file (its content is the base's) that claims payload bytes too.
    craft(
        &crafted,
        &format!(
            "{head}payload = 0\n{root}[[entry]]\npath = \"etc\"\nkind = \"dir\"\n\
             [[entry]]\npath = \"etc/motd\"\nkind = \"file\"\nsize = 4\nhash = \"{h}\"\n\
             data = {{ encoding = \"basis\", offset = 0, length = 3, basis = \"{h}\" }}\n",
            h = blake3::hash(b"old\n").to_hex(),
        ),
        b"",
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "etc/motd\" is the base's file unchanged but claims content or another basis",
    );
    // An old bundle (format 2) is refused by its version.
    let mut old_format = fs::read(&good).unwrap();
    old_format[7] = 2;
    fs::write(&crafted, old_format).unwrap();
    refused(
        &crafted,
        &["--allow-unsigned"],
        "format version 2 (this overlayctl reads 3); make it again with this overlayctl's `bundle create`",
    );
    // overlayfs's own attributes, which would hide what the manifest shows.
    craft(
        &crafted,
        &format!(
            "{head}payload = 0\n{root}[[entry]]\npath = \"etc\"\nkind = \"dir\"\n\
             xattrs = {{ \"trusted.overlay.opaque\" = \"y\" }}\n"
        ),
        b"",
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "sets overlayfs's own attribute",
    );
    // Non-canonical paths, and a second name that claims other metadata.
    craft(
        &crafted,
        &format!("{head}payload = 0\n{root}[[entry]]\npath = \"etc/./x\"\nkind = \"fifo\"\n"),
        b"",
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "is not a plain relative path",
    );
    let data = zstd::bulk::compress(b"x", 3).unwrap();
    craft(
        &crafted,
        &format!(
            "{head}{}{root}[[entry]]\npath = \"a\"\nkind = \"file\"\nsize = 1\nmode = 420\n\
             hash = \"{}\"\ndata = {{ encoding = \"whole\", part = 0, offset = 0, length = 1 }}\n\
             [[entry]]\npath = \"b\"\nkind = \"file\"\nsize = 1\nmode = 2541\nlink = \"a\"\n",
            one_part(&data, 0, 0, 1),
            blake3::hash(b"x").to_hex(),
        ),
        &data,
    );
    refused(
        &crafted,
        &["--allow-unsigned"],
        "claims other metadata or content",
    );
    assert_eq!(
        fs::read_dir(env.path("device/staging")).map_or(0, |d| d.count()),
        0
    );

    // A key name that would reach outside keys/.
    let e = env.fails("device", &["keys", "remove", "../../victim"]);
    assert!(e.contains("key name \"../../victim\" is not valid"), "{e}");

    // With --allow-unsigned the unsigned good bundle goes in.
    let added = env.ok(
        "device",
        &[
            "add-layer",
            "--bundle",
            unsigned.to_str().unwrap(),
            "--allow-unsigned",
        ],
    );
    assert!(added.contains("is not signed by a trusted key"), "{added}");
}

/// Serves `data` over HTTP/1.1 on 127.0.0.1 with range requests; the first answer stops after
/// `cut` bytes of body, as a broken connection would. Returns the port and the request heads.
fn serve(data: Vec<u8>, cut: usize) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let start = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("range: bytes=")
                        .map(str::to_owned)
                })
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
            seen.lock().unwrap().push(head);
            let answer = match start {
                Some(start) => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    data.len() - start,
                    data.len() - 1,
                    data.len()
                ),
                None => format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    data.len()
                ),
            };
            let body = &data[start.unwrap_or(0)..];
            let body = if i == 0 { &body[..cut] } else { body };
            let _ = stream.write_all(answer.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    (port, log)
}

#[test]
fn privileged_bundle_downloads_resume_after_a_broken_connection() {
    let Some(env) = Env::new("privileged_bundle_downloads_resume_after_a_broken_connection") else {
        return;
    };
    let bundle = env.path("release-2.bundle");
    env.create(&env.path("old"), &bundle, None);
    let data = fs::read(&bundle).unwrap();
    let cut = data.len() / 2;
    let (port, log) = serve(data, cut);
    env.store("device");
    let url = format!("http://127.0.0.1:{port}/release-2.bundle");

    let e = env.fails("device", &["add-layer", "--bundle", &url]);
    assert!(e.contains("run the command again to resume"), "{e}");
    let parts: Vec<_> = fs::read_dir(env.path("device/downloads"))
        .unwrap()
        .collect();
    assert_eq!(parts.len(), 1, "the partial download is kept");
    assert!(!env.path("device/layers/release-2").exists());

    let added = env.ok("device", &["add-layer", "--bundle", &url]);
    assert!(added.contains("added layer release-2"), "{added}");
    let heads = log.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[1]
            .to_ascii_lowercase()
            .contains(&format!("range: bytes={cut}-")),
        "the second request resumes: {heads:?}"
    );
    assert_eq!(
        fs::read_dir(env.path("device/downloads")).unwrap().count(),
        0,
        "the finished download is removed"
    );
}
