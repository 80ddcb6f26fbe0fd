//! The Debian package `scripts/package` makes: lintian-clean (each tag it keeps is explained in
//! packaging/debian/lintian-explained), its programs static (each runs in an empty chroot), the
//! units' commands and the glue's calls present in it, a man page for every command and
//! completions for three shells. Installing it on a real Debian is the Debian VM tests' job.

use std::fs;
use std::path::Path;
use std::process::Command;

use tests::have_root;

#[test]
fn package_is_lintian_clean_static_and_complete() {
    if !have_root("package_is_lintian_clean_static_and_complete") {
        return;
    }
    let workspace = tests::vm::workspace();
    let out = Command::new(workspace.join("scripts/package"))
        .arg("--lintian")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/package --lintian: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = workspace.join(String::from_utf8(out.stdout).unwrap().trim());
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let unpacked = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root)
        .status()
        .unwrap();
    assert!(unpacked.success());

    // Static: each runs with nothing else in its root.
    for program in ["overlayctl", "initramfs-hook", "boot-ui"] {
        let out = Command::new("chroot")
            .arg(root)
            .arg(format!("/usr/sbin/{program}"))
            .arg("--version")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} in an empty chroot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every ExecStart names a program the package holds.
    let units = root.join("lib/systemd/system");
    let mut services = 0;
    for entry in fs::read_dir(&units).unwrap() {
        let text = fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines().filter_map(|l| l.strip_prefix("ExecStart=")) {
            let program = line.split_whitespace().next().unwrap();
            assert!(root.join(&program[1..]).is_file(), "{program}");
            services += 1;
        }
    }
    assert_eq!(services, 5);
    let preset =
        fs::read_to_string(root.join("lib/systemd/system-preset/50-strata.preset")).unwrap();
    for unit in [
        "strata-accept.service",
        "strata-policy.timer",
        "strata-space.timer",
        "strata-update.timer",
    ] {
        assert!(units.join(unit).is_file() && preset.contains(&format!("enable {unit}")));
    }
    // The glue calls the hook and nothing else of its own.
    let script =
        fs::read_to_string(root.join("usr/share/initramfs-tools/scripts/local-bottom/strata"))
            .unwrap();
    let commands: Vec<&str> = script
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(
        commands.last().copied(),
        Some("exec /sbin/initramfs-hook take-root --root \"${rootmnt}\""),
        "{script}"
    );
    assert!(
        !script.contains("sed ") && !script.contains("mount "),
        "{script}"
    );
    // A man page per command and subcommand, and completions.
    let man = root.join("usr/share/man/man8");
    for page in [
        "overlayctl.8.gz",
        "overlayctl-add-layer.8.gz",
        "overlayctl-bundle-create.8.gz",
        "initramfs-hook-take-root.8.gz",
        "boot-ui.8.gz",
    ] {
        assert!(man.join(page).is_file(), "{page}");
    }
    let subcommands = overlayctl_subcommands();
    for sub in &subcommands {
        assert!(
            man.join(format!("overlayctl-{sub}.8.gz")).is_file(),
            "{sub}"
        );
    }
    for completion in [
        "usr/share/bash-completion/completions/overlayctl",
        "usr/share/zsh/vendor-completions/_overlayctl",
        "usr/share/fish/vendor_completions.d/overlayctl.fish",
    ] {
        let text = fs::read_to_string(root.join(completion)).unwrap();
        assert!(text.contains("add-layer"), "{completion}");
    }
    assert!(
        Path::new(&deb)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("_amd64.deb")
    );
}

/// The visible subcommands of `overlayctl`, from its help.
fn overlayctl_subcommands() -> Vec<String> {
    use clap::CommandFactory;
    overlayctl::Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name().to_owned())
        .collect()
}
