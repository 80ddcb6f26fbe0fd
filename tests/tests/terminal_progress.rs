//! Progress lines on a real terminal (tmux): a long job says what it did on stderr when stderr
//! is a terminal, and nothing when it is a pipe or JSON was asked for.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::Scratch;

fn tmux(socket: &str, args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `line` in a fresh 120x30 tmux session (its own server) and returns the screen once
/// `done` shows.
fn on_terminal(socket: &str, line: &str, done: &str) -> String {
    let socket = &format!("{socket}-{done}");
    tmux(
        socket,
        &[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "30",
            "sh",
            "-c",
            &format!("{line}; echo {done}; sleep 60"),
        ],
    );
    let started = Instant::now();
    loop {
        let screen = tmux(socket, &["capture-pane", "-p", "-J"]);
        if screen.contains(done) {
            tmux(socket, &["kill-server"]);
            return screen;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no {done}:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn terminal_progress_on_a_terminal_only() {
    let Some(scratch) = Scratch::new("terminal_progress_on_a_terminal_only") else {
        return;
    };
    tests::vm::ensure_commands(&[("tmux", "tmux")]);
    for (tree, files) in [("base", 50), ("upgrade", 2000)] {
        for i in 0..files {
            let path = scratch.path(tree).join(format!("d{}/f{i}", i % 20));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, format!("{tree} {i}\n")).unwrap();
        }
    }
    let store = scratch.path("store");
    // A pipe: the report only.
    let out = scratch
        .overlayctl(
            &store,
            &["init", "--base", scratch.path("base").to_str().unwrap()],
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("entries,"), "{stderr}");

    let overlayctl = assert_cmd::cargo::cargo_bin("overlayctl");
    let socket = format!("strata-progress-{}", std::process::id());
    let upgrade = scratch.path("upgrade");
    let screen = on_terminal(
        &socket,
        &format!(
            "STRATA_RUN_DIR={} {} --store {} add-layer {} --name up >/dev/null",
            scratch.path("run").display(),
            overlayctl.display(),
            store.display(),
            upgrade.display()
        ),
        "finished-add",
    );
    let said = format!("adding {} as a layer: ", upgrade.display());
    let line = screen
        .lines()
        .find(|l| l.starts_with(&said))
        .unwrap_or_else(|| panic!("no progress summary:\n{screen}"));
    // Every file and directory of the tree was read (2000 files in 20 directories, and more
    // for the copy's own reads).
    let entries: u64 = line[said.len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(entries >= 2021, "{line}");
    assert!(
        line.contains(" of content in ") && line.ends_with(" s"),
        "{line}"
    );

    // JSON: nothing but the report, on a terminal too.
    let screen = on_terminal(
        &socket,
        &format!(
            "{} --json --store {} verify >/dev/null",
            overlayctl.display(),
            store.display()
        ),
        "finished-verify",
    );
    assert!(!screen.contains("verifying"), "{screen}");
}
