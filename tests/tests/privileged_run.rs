//! `overlayctl run -- CMD` for real, as root: the command runs in a private mount namespace and
//! a chroot over a busybox root's stack with a fresh upper; what it changes becomes a trial layer
//! that mounts to the expected tree; a failing, missing or interrupted command changes nothing.

use std::fs;
use std::path::{Path, PathBuf};

use tests::{have_root, private_mount_namespace};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(test: &str) -> Option<Self> {
        if !have_root(test) {
            return None;
        }
        private_mount_namespace();
        let env = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let base = env.path("base");
        tests::vm::busybox_root(&base, "1");
        fs::write(base.join("etc/old.conf"), "old\n").unwrap();
        env.ok(&["init", "--base", base.to_str().unwrap()]);
        Some(env)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn ok(&self, args: &[&str]) -> String {
        tests::overlayctl(&self.store(), args)
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("overlayctl"))
            .env("STRATA_RUN_DIR", "/nonexistent/strata-run")
            .arg("--store")
            .arg(self.store())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "overlayctl {args:?} succeeded");
        String::from_utf8(out.stderr).unwrap()
    }

    /// The plan's layer names, the layer directories, and what `runs/` holds.
    fn snapshot(&self) -> (String, Vec<String>, usize) {
        let list = |dir: &Path| tests::dir_names(dir);
        (
            fs::read_to_string(self.store().join("overlayplan.toml")).unwrap(),
            list(&self.store().join("layers")),
            list(&self.store().join("runs")).len(),
        )
    }
}

#[test]
fn privileged_run_turns_a_command_into_a_layer() {
    let Some(env) = Env::new("privileged_run_turns_a_command_into_a_layer") else {
        return;
    };
    let report = env.ok(&[
        "run",
        "--name",
        "upgrade",
        "--",
        "/bin/sh",
        "-c",
        // /proc is there, the stack is the root, and the changes stay in the upper.
        "test -e /proc/self/status && echo 2 > /etc/version && busybox rm /etc/old.conf \
         && busybox mkdir -p /usr/share/new && echo hello > /usr/share/new/file",
    ]);
    assert!(report.contains("added trial layer upgrade"), "{report}");
    assert!(report.contains("(1 deletions)"), "{report}");
    let plan = fs::read_to_string(env.store().join("overlayplan.toml")).unwrap();
    assert!(
        plan.contains("name = \"upgrade\"\nstate = \"trial\"\nparent = \"base\""),
        "{plan}"
    );
    // The stack with the new layer shows the command's changes; the upper's leftovers are gone.
    let mnt = env.path("mnt");
    fs::create_dir(&mnt).unwrap();
    env.ok(&["mount", mnt.to_str().unwrap(), "--read-only"]);
    let read = |rel: &str| fs::read_to_string(mnt.join(rel)).ok();
    assert_eq!(read("etc/version").as_deref(), Some("2\n"));
    assert_eq!(read("etc/old.conf"), None);
    assert_eq!(read("usr/share/new/file").as_deref(), Some("hello\n"));
    assert!(mnt.join("bin/busybox").exists());
    env.ok(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(env.snapshot().2, 0, "runs/ is empty");
    assert_eq!(env.ok(&["verify", "upgrade"]), "upgrade: ok\n");

    // A command that changes nothing adds nothing.
    let before = env.snapshot();
    let report = env.ok(&["run", "--", "/bin/sh", "-c", "echo $((6 * 7))"]);
    assert!(
        report.contains("changed nothing; no layer was added"),
        "{report}"
    );
    assert_eq!(env.snapshot(), before);
}

#[test]
fn privileged_run_failures_roll_everything_back() {
    let Some(env) = Env::new("privileged_run_failures_roll_everything_back") else {
        return;
    };
    let before = env.snapshot();
    let cases: [(&[&str], &str); 3] = [
        (
            &["/bin/sh", "-c", "echo broken > /etc/version; exit 3"],
            "/bin/sh failed (exit status 3): all changes rolled back",
        ),
        (
            &["/no/such/command"],
            "/no/such/command failed (exit status 127): all changes rolled back",
        ),
        // Interrupted: the command is stopped by SIGINT, as Ctrl-C would.
        (
            &[
                "/bin/sh",
                "-c",
                "echo half > /etc/version; kill -INT $$; sleep 5",
            ],
            "/bin/sh was stopped by a signal: all changes rolled back",
        ),
    ];
    for (command, error) in cases {
        let mut args = vec!["run", "--name", "x", "--"];
        args.extend(command);
        let e = env.fails(&args);
        assert!(e.contains(error), "{command:?}: {e}");
        assert_eq!(env.snapshot(), before, "{command:?} changed the store");
    }
    // --keep-on-failure keeps the upper and says where.
    let e = env.fails(&[
        "run",
        "--name",
        "kept",
        "--keep-on-failure",
        "--",
        "/bin/sh",
        "-c",
        "echo broken > /etc/version; exit 1",
    ]);
    let kept = env.store().join("runs/kept/upper");
    assert!(e.contains(&format!("kept in {}", kept.display())), "{e}");
    assert_eq!(
        fs::read_to_string(kept.join("etc/version")).unwrap(),
        "broken\n"
    );
    // Kept through the cleaning of stopped runs the next command does.
    env.ok(&["run", "--name", "y", "--", "/bin/sh", "-c", ":"]);
    assert!(kept.join("etc/version").exists());
    fs::remove_dir_all(env.store().join("runs/kept")).unwrap();
    // No room: refused with the numbers, before anything runs.
    let path = env.store().join("overlayplan.toml");
    let plan = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        plan.replace("min_free = \"512MiB\"", "min_free = \"1024TiB\""),
    )
    .unwrap();
    let before = env.snapshot();
    let e = env.fails(&["run", "--", "/bin/sh", "-c", "echo x > /etc/version"]);
    assert!(
        e.contains("to run anything:") && e.contains("policy.min_free keeps 1024TiB"),
        "{e}"
    );
    assert_eq!(env.snapshot(), before);
}

#[test]
fn privileged_run_killed_is_cleaned_once_all_its_processes_are_gone() {
    use std::os::unix::process::CommandExt;
    let Some(env) = Env::new("privileged_run_killed_is_cleaned_once_all_its_processes_are_gone")
    else {
        return;
    };
    // The run in a process group of its own, so the test can kill all of it.
    let mut run = std::process::Command::new(assert_cmd::cargo::cargo_bin("overlayctl"))
        .env("STRATA_RUN_DIR", "/nonexistent/strata-run")
        .arg("--store")
        .arg(env.store())
        .args(["run", "--name", "k", "--", "/bin/sh", "-c"])
        .arg("echo x > /etc/x; sleep 60")
        .process_group(0)
        .spawn()
        .unwrap();
    let written = env.store().join("runs/k/upper/etc/x");
    for _ in 0..200 {
        if written.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(written.exists(), "the run did not start");
    let group = run.id();
    // overlayctl killed, its command still running: the run stays.
    run.kill().unwrap();
    run.wait().unwrap();
    env.ok(&["run", "--name", "y", "--", "/bin/sh", "-c", ":"]);
    assert!(written.exists(), "a live run was removed");
    // Everything gone: the next command removes what it left.
    let group = nix::unistd::Pid::from_raw(i32::try_from(group).unwrap());
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    // (The kernel releases the lock as the last process exits: give it a moment.)
    for _ in 0..50 {
        env.ok(&["run", "--name", "y", "--", "/bin/sh", "-c", ":"]);
        if tests::dir_names(&env.store().join("runs")).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("what the killed run left was never removed");
}
