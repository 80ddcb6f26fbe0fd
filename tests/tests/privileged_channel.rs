//! A fleet on an update channel, as root: twenty simulated devices (twenty stores, each with its
//! own machine id) follow a signed channel served over HTTP. A release rolled out to 25 % reaches
//! exactly the devices whose machine-id hash falls in it, the rest stay as they were; at 100 %
//! all take it; pulled back, every device leaves it out and runs the release before; a device no
//! bundle starts from takes the release's image. Replayed, tampered and unsigned channels are
//! refused with nothing changed.

use std::fs;
use std::path::{Path, PathBuf};

use tests::Scratch;
use tests::oci::{FileServer, Layout};
use tests::views::shown_tree;

const DEVICES: usize = 20;

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

fn machine_id(device: usize) -> String {
    format!("{:032x}", (device as u128 + 1) * 0x9e37_79b9_7f4a_7c15)
}

/// The rollout rule, computed here on its own: blake3 of `ID:CHANNEL:RELEASE`, its first 8
/// bytes little-endian, modulo 100, below the share.
fn expected_in(id: &str, release: &str, share: u64) -> bool {
    let hash = blake3::hash(format!("{id}:stable:{release}").as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap()) % 100 < share
}

struct Fleet {
    scratch: Scratch,
    server: FileServer,
    www: PathBuf,
    key: PathBuf,
    devices: Vec<PathBuf>,
}

impl Fleet {
    /// Signs `index` into `www/NAME`, as the build server publishes it.
    fn publish(&self, name: &str, index: &serde_json::Value) -> String {
        let file = self.scratch.path(&format!("{name}.index.json"));
        fs::write(&file, serde_json::to_vec_pretty(index).unwrap()).unwrap();
        let out = self.www.join(name);
        let _ = fs::remove_file(&out);
        let none = self.scratch.path("no-store");
        ok(
            &self.scratch,
            &none,
            &[
                "channel",
                "sign",
                file.to_str().unwrap(),
                "--key",
                self.key.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
        );
        self.server.url(name)
    }

    fn update(&self, device: usize, channel: &str) -> String {
        ok(
            &self.scratch,
            &self.devices[device],
            &[
                "update",
                "--channel",
                channel,
                "--machine-id",
                &machine_id(device),
            ],
        )
    }

    fn tree(&self, device: usize) -> String {
        ok(&self.scratch, &self.devices[device], &["channel", "tree"])
            .trim()
            .to_owned()
    }
}

#[test]
fn privileged_a_fleet_follows_a_channel_with_staged_rollouts_and_pull_backs() {
    let Some(scratch) =
        Scratch::new("privileged_a_fleet_follows_a_channel_with_staged_rollouts_and_pull_backs")
    else {
        return;
    };
    // Two releases as full trees, and the signed bundle between them.
    let (rel1, rel2) = (scratch.path("rel-1"), scratch.path("rel-2"));
    for (tree, version) in [(&rel1, "1"), (&rel2, "2")] {
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::create_dir_all(tree.join("usr/bin")).unwrap();
        fs::write(tree.join("etc/version"), format!("{version}\n")).unwrap();
        fs::write(
            tree.join("usr/bin/app"),
            format!("#!/bin/sh\necho {version}\n"),
        )
        .unwrap();
    }
    fs::write(rel2.join("etc/new-in-2"), "yes\n").unwrap();
    let none = scratch.path("no-store");
    let key = scratch.path("build.key");
    ok(
        &scratch,
        &none,
        &["keys", "generate", "-o", key.to_str().unwrap()],
    );
    let www = scratch.path("www");
    fs::create_dir_all(&www).unwrap();
    let bundle = www.join("rel-2.bundle");
    ok(
        &scratch,
        &none,
        &[
            "bundle",
            "create",
            "--from",
            rel1.to_str().unwrap(),
            "--to",
            rel2.to_str().unwrap(),
            "-o",
            bundle.to_str().unwrap(),
            "--sign",
            key.to_str().unwrap(),
        ],
    );
    let tree = |dir: &Path| {
        ok(&scratch, &none, &["channel", "tree", dir.to_str().unwrap()])
            .trim()
            .to_owned()
    };
    let (tree1, tree2) = (tree(&rel1), tree(&rel2));
    let info = ok(
        &scratch,
        &none,
        &["--json", "bundle", "info", bundle.to_str().unwrap()],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (
            info["base"].as_str().unwrap(),
            info["target"].as_str().unwrap()
        ),
        (tree1.as_str(), tree2.as_str()),
        "a channel names trees as bundles do"
    );

    // Twenty devices on rel-1, trusting the build key.
    let server = FileServer::start(&www);
    let devices: Vec<PathBuf> = (0..DEVICES)
        .map(|i| scratch.path(&format!("device-{i}")))
        .collect();
    let public = format!("{}.pub", key.display());
    for device in &devices {
        ok(
            &scratch,
            device,
            &["init", "--base", rel1.to_str().unwrap(), "--name", "rel-1"],
        );
        ok(
            &scratch,
            device,
            &["keys", "add", &public, "--name", "build"],
        );
    }
    let fleet = Fleet {
        scratch,
        server,
        www,
        key,
        devices,
    };
    let release = |name: &str, tree: &str, rollout: u8, pulled: bool| {
        let mut r =
            serde_json::json!({"name": name, "tree": tree, "rollout": rollout, "pulled": pulled});
        if name == "rel-2" {
            r["bundles"] =
                serde_json::json!([{"from": tree1, "bundle": fleet.server.url("rel-2.bundle")}]);
        }
        r
    };
    let index = |serial: u64, releases: Vec<serde_json::Value>| serde_json::json!({"channel": "stable", "serial": serial, "releases": releases});

    // Serial 1: rel-2 to 25 %.
    let url1 = fleet.publish(
        "stable-1.json",
        &index(
            1,
            vec![
                release("rel-1", &tree1, 100, false),
                release("rel-2", &tree2, 25, false),
            ],
        ),
    );
    let expected: Vec<usize> = (0..DEVICES)
        .filter(|&i| expected_in(&machine_id(i), "rel-2", 25))
        .collect();
    assert!(
        (2..=9).contains(&expected.len()),
        "the ids chosen give {} of {DEVICES}: not about a quarter",
        expected.len()
    );
    let plans: Vec<Vec<u8>> = fleet
        .devices
        .iter()
        .map(|d| fs::read(d.join("overlayplan.toml")).unwrap())
        .collect();
    let check = fleet
        .scratch
        .overlayctl(
            &fleet.devices[expected[0]],
            &[
                "update",
                "--check",
                "--channel",
                &url1,
                "--machine-id",
                &machine_id(expected[0]),
            ],
        )
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(String::from_utf8_lossy(&check).contains("would take rel-2 by bundle"));
    let mut updated = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        let out = fleet.update(i, &url1);
        if out.contains("took rel-2") {
            updated.push(i);
        } else {
            assert!(out.contains("not yet to this one"), "{out}");
            assert_eq!(
                &fs::read(fleet.devices[i].join("overlayplan.toml")).unwrap(),
                plan,
                "device {i} is not in the rollout and changed"
            );
        }
    }
    assert_eq!(updated, expected, "the devices in the 25% rollout");
    for &i in &updated {
        assert_eq!(fleet.tree(i), tree2, "device {i} runs rel-2");
        let plan = fs::read_to_string(fleet.devices[i].join("overlayplan.toml")).unwrap();
        assert!(
            plan.contains("release = \"rel-2\"") && plan.contains("state = \"trial\""),
            "{plan}"
        );
        let out = fleet.update(i, &url1);
        assert!(out.contains("up to date"), "{out}");
    }
    // The bundle came over HTTP, once per device that took it.
    let fetched = fleet
        .server
        .asked
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.ends_with("rel-2.bundle"))
        .count();
    assert_eq!(fetched, expected.len());

    // Serial 2: everyone. Then the old index, replayed, is refused.
    let url2 = fleet.publish(
        "stable-2.json",
        &index(
            2,
            vec![
                release("rel-1", &tree1, 100, false),
                release("rel-2", &tree2, 100, false),
            ],
        ),
    );
    for i in 0..DEVICES {
        fleet.update(i, &url2);
        assert_eq!(fleet.tree(i), tree2, "device {i} at 100%");
    }
    let err = fails(
        &fleet.scratch,
        &fleet.devices[0],
        &["update", "--channel", &url1, "--machine-id", &machine_id(0)],
    );
    assert!(err.contains("older than serial 2"), "{err}");

    // A channel changed after signing, and one signed by a key the devices do not trust.
    let tampered = fleet.www.join("tampered.json");
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&fs::read(fleet.www.join("stable-2.json")).unwrap()).unwrap();
    let text = String::from_utf8(base64_decode(envelope["index"].as_str().unwrap()))
        .unwrap()
        .replace("\"rollout\": 100", "\"rollout\": 99");
    envelope["index"] = base64_encode(text.as_bytes()).into();
    fs::write(&tampered, serde_json::to_vec(&envelope).unwrap()).unwrap();
    let err = fails(
        &fleet.scratch,
        &fleet.devices[0],
        &[
            "update",
            "--channel",
            tampered.to_str().unwrap(),
            "--machine-id",
            &machine_id(0),
        ],
    );
    assert!(err.contains("changed after signing"), "{err}");
    let other_key = fleet.scratch.path("other.key");
    ok(
        &fleet.scratch,
        &none,
        &["keys", "generate", "-o", other_key.to_str().unwrap()],
    );
    let index_file = fleet.scratch.path("stable-2.json.index.json");
    let foreign = fleet.www.join("foreign.json");
    ok(
        &fleet.scratch,
        &none,
        &[
            "channel",
            "sign",
            index_file.to_str().unwrap(),
            "--key",
            other_key.to_str().unwrap(),
            "-o",
            foreign.to_str().unwrap(),
        ],
    );
    let err = fails(
        &fleet.scratch,
        &fleet.devices[0],
        &[
            "update",
            "--channel",
            foreign.to_str().unwrap(),
            "--machine-id",
            &machine_id(0),
        ],
    );
    assert!(err.contains("not signed by a trusted key"), "{err}");

    // Serial 3: rel-2 pulled back. Every device leaves it out and runs rel-1 again.
    let url3 = fleet.publish(
        "stable-3.json",
        &index(
            3,
            vec![
                release("rel-1", &tree1, 100, false),
                release("rel-2", &tree2, 100, true),
            ],
        ),
    );
    for i in 0..DEVICES {
        let out = fleet.update(i, &url3);
        assert!(out.contains("rel-2 was pulled back"), "{out}");
        assert!(out.contains("up to date: rel-1"), "{out}");
        assert_eq!(fleet.tree(i), tree1, "device {i} back on rel-1");
    }
    let mnt = fleet.scratch.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(
        &fleet.scratch,
        &fleet.devices[0],
        &["mount", mnt.to_str().unwrap()],
    );
    assert_eq!(shown_tree(&mnt), shown_tree(&rel1));
    ok(
        &fleet.scratch,
        &fleet.devices[0],
        &["umount", mnt.to_str().unwrap()],
    );

    // Serial 4: rel-3, an image only. A device no bundle starts from takes the image; its tree
    // is the one the build server's own store of the image has.
    let layout = Layout::new(&fleet.scratch.path("layout"), &fleet.scratch.path("umoci"));
    layout.layer(None, "rel-3", "ADD rel-3 system", |root| {
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/version"), "3\n").unwrap();
    });
    let image = format!("oci:{}:rel-3", layout.dir.display());
    let build = fleet.scratch.path("build-store");
    ok(&fleet.scratch, &build, &["init", "--image", &image]);
    let tree3 = ok(&fleet.scratch, &build, &["channel", "tree"])
        .trim()
        .to_owned();
    let mut rel3 = release("rel-3", &tree3, 100, false);
    rel3["image"] = image.clone().into();
    let url4 = fleet.publish(
        "stable-4.json",
        &index(
            4,
            vec![
                release("rel-1", &tree1, 100, false),
                release("rel-2", &tree2, 100, true),
                rel3,
            ],
        ),
    );
    let out = fleet.update(0, &url4);
    assert!(out.contains("took rel-3 by image"), "{out}");
    assert_eq!(fleet.tree(0), tree3);
    let out = fleet.update(0, &url4);
    assert!(out.contains("up to date: rel-3"), "{out}");
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The README's path end to end: a Containerfile built with buildah (`FROM scratch`, the base
/// system added from a tar, then `RUN` steps), pushed to Debian's docker-registry with
/// `buildah push`, a device made from it with `init --image`; the next release, built from the
/// same Containerfile with one step changed, reaches the device through a signed channel that
/// names the image, itself served by the registry as an artifact: the layers the two builds
/// share are held, only the changed ones move.
#[test]
fn privileged_a_containerfile_built_with_buildah_ships_to_a_device_through_a_channel() {
    use tests::oci::{Registry, run};
    let Some(scratch) = Scratch::new(
        "privileged_a_containerfile_built_with_buildah_ships_to_a_device_through_a_channel",
    ) else {
        return;
    };
    let context = scratch.path("context");
    let rootfs = scratch.path("rootfs");
    tests::vm::busybox_root(&rootfs, "base");
    fs::create_dir_all(&context).unwrap();
    run(std::process::Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(context.join("rootfs.tar"))
        .arg("."));
    let registry = Registry::start(&scratch.path("registry"), None);
    let storage = scratch.path("buildah");
    let buildah = |args: &[&str]| {
        let mut cmd = std::process::Command::new("buildah");
        cmd.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        run(&mut cmd)
    };
    let build = |release: &str, app: &str| {
        fs::write(
            context.join("Containerfile"),
            format!(
                "FROM scratch\nADD rootfs.tar /\nRUN mkdir -p /opt/app && echo ready > /etc/base-ready\nRUN echo {app} > /opt/app/version && echo {release} > /etc/version\n"
            ),
        )
        .unwrap();
        let tag = format!("localhost/kiosk:{release}");
        buildah(&[
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "-t",
            &tag,
            "-f",
            context.join("Containerfile").to_str().unwrap(),
            context.to_str().unwrap(),
        ]);
        let reference = format!("{}/kiosk/os:{release}", registry.host());
        buildah(&[
            "push",
            "--tls-verify=false",
            &tag,
            &format!("docker://{reference}"),
        ]);
        let layout = scratch.path("layouts");
        buildah(&["push", &tag, &format!("oci:{}:{release}", layout.display())]);
        (reference, layout)
    };
    let (rel1, _) = build("rel-1", "1.0");
    let device = scratch.path("device");
    let out = ok(&scratch, &device, &["init", "--image", &rel1, "--insecure"]);
    assert_eq!(out.matches("added  ").count(), 3, "{out}");

    let (rel2, layout) = build("rel-2", "2.0");
    let build_store = scratch.path("build-store");
    ok(
        &scratch,
        &build_store,
        &["init", "--image", &rel2, "--insecure"],
    );
    let tree2 = ok(&scratch, &build_store, &["channel", "tree"])
        .trim()
        .to_owned();
    let key = scratch.path("build.key");
    ok(
        &scratch,
        &build_store,
        &["keys", "generate", "-o", key.to_str().unwrap()],
    );
    ok(
        &scratch,
        &device,
        &[
            "keys",
            "add",
            &format!("{}.pub", key.display()),
            "--name",
            "build",
        ],
    );
    let www = scratch.path("www");
    fs::create_dir_all(&www).unwrap();
    let index = scratch.path("index.json");
    fs::write(
        &index,
        serde_json::json!({"channel": "stable", "serial": 1, "releases": [
            {"name": "rel-2", "tree": tree2, "image": rel2},
        ]})
        .to_string(),
    )
    .unwrap();
    let channel = www.join("stable.json");
    ok(
        &scratch,
        &build_store,
        &[
            "channel",
            "sign",
            index.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-o",
            channel.to_str().unwrap(),
        ],
    );
    // The channel is served by the same registry, as an artifact.
    let channel_ref = format!("{}/kiosk/channel:stable", registry.host());
    ok(
        &scratch,
        &build_store,
        &[
            "channel",
            "push",
            channel.to_str().unwrap(),
            &channel_ref,
            "--insecure",
        ],
    );
    let shown = ok(
        &scratch,
        &device,
        &["channel", "show", &channel_ref, "--insecure"],
    );
    assert!(
        shown.contains("signed by build") && shown.contains("rel-2"),
        "{shown}"
    );
    let out = ok(
        &scratch,
        &device,
        &[
            "update",
            "--channel",
            &channel_ref,
            "--machine-id",
            &machine_id(0),
            "--insecure",
        ],
    );
    assert!(out.contains("took rel-2 by image"), "{out}");
    let plan = fs::read_to_string(device.join("overlayplan.toml")).unwrap();
    assert_eq!(
        plan.matches("[[layer]]").count(),
        4,
        "two layers held, one new:\n{plan}"
    );
    assert_eq!(ok(&scratch, &device, &["channel", "tree"]).trim(), tree2);
    let mnt = scratch.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(&scratch, &device, &["mount", mnt.to_str().unwrap()]);
    let want = Layout::at(&layout).unpack("rel-2", &scratch.path("unpacked"));
    assert_eq!(
        tests::views::first_difference(&shown_tree(&want), &shown_tree(&mnt)),
        None
    );
    assert_eq!(
        fs::read_to_string(mnt.join("opt/app/version")).unwrap(),
        "2.0\n"
    );
    ok(&scratch, &device, &["umount", mnt.to_str().unwrap()]);
}
