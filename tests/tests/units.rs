//! The systemd units in `packaging/systemd`: `systemd-analyze verify` accepts them (every key
//! known, the command there and executable, the ordering sound), and the accept unit hangs on
//! systemd's boot assessment. What they do once started is `overlayctl policy` and `accept`,
//! tested elsewhere; booting a systemd root to watch boot-complete.target fire is not done here.

use std::fs;
use std::path::Path;
use std::process::Command;

fn unit_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd")
}

#[test]
fn units_verify_with_systemd_analyze() {
    tests::vm::ensure_commands(&[("systemd-analyze", "systemd")]);
    // The units name the installed path; here they run the workspace's build.
    let dir = tempfile::tempdir().unwrap();
    let overlayctl = assert_cmd::cargo::cargo_bin("overlayctl");
    let mut names = Vec::new();
    for entry in fs::read_dir(unit_dir()).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ExecStart=/usr/sbin/overlayctl")
                || path.extension().is_some_and(|e| e == "timer")
        );
        let text = text.replace("/usr/sbin/overlayctl", overlayctl.to_str().unwrap());
        let name = path.file_name().unwrap();
        fs::write(dir.path().join(name), text).unwrap();
        names.push(dir.path().join(name));
    }
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&names)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn accept_waits_for_boot_complete_and_policy_runs_on_a_timer() {
    let read = |name: &str| fs::read_to_string(unit_dir().join(name)).unwrap();
    let accept = read("strata-accept.service");
    for line in [
        "Requires=boot-complete.target",
        "After=boot-complete.target",
        "ExecStart=/usr/sbin/overlayctl accept",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            accept.lines().any(|l| l == line),
            "strata-accept.service lacks {line}"
        );
    }
    let timer = read("strata-policy.timer");
    assert!(timer.lines().any(|l| l == "WantedBy=timers.target"));
    let policy = read("strata-policy.service");
    assert!(
        policy
            .lines()
            .any(|l| l == "ExecStart=/usr/sbin/overlayctl policy")
    );
    let space = read("strata-space.service");
    assert!(
        space
            .lines()
            .any(|l| l == "ExecStart=/usr/sbin/overlayctl policy --if-space-low")
    );
    let assess = read("strata-assess.service");
    for line in [
        "After=boot-complete.target multi-user.target strata-accept.service",
        "ExecStart=/usr/sbin/overlayctl assess",
        "StandardOutput=journal+console",
    ] {
        assert!(
            assess.lines().any(|l| l == line),
            "strata-assess.service lacks {line}"
        );
    }
    let timer = read("strata-space.timer");
    assert!(timer.lines().any(|l| l == "OnUnitActiveSec=5min"));
    let update = read("strata-update.service");
    for line in [
        "ConditionPathExists=/etc/strata/update.conf",
        "EnvironmentFile=/etc/strata/update.conf",
        "ExecStart=/usr/sbin/overlayctl update",
        "After=network-online.target",
    ] {
        assert!(
            update.lines().any(|l| l == line),
            "strata-update.service lacks {line}"
        );
    }
    let timer = read("strata-update.timer");
    assert!(timer.lines().any(|l| l == "WantedBy=timers.target"));
}
