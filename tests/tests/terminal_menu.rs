//! The `boot-ui` binary on a real terminal: tmux runs it, keys go in with send-keys, the
//! screen comes back with capture-pane, and the JSON the binary prints is checked. Each test
//! has its own tmux server (socket), so they run side by side.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const PLAN: &str = r#"version = 1

[[layer]]
name = "broken"
title = "Broken upgrade"
state = "trial"
parent = "good"

[[layer]]
name = "good"
title = "Good upgrade"
parent = "base"

[[layer]]
name = "base"
title = "Busybox base"
known_good = true
"#;

struct Tmux {
    dir: TempDir,
    socket: String,
}

impl Tmux {
    /// Runs `command` (a shell line) in a detached 80x24 tmux session in a fresh directory
    /// holding `plan.toml`.
    fn start(test: &str, command: &str) -> Self {
        tests::vm::ensure_commands(&[("tmux", "tmux")]);
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("plan.toml"), PLAN).unwrap();
        let tmux = Self {
            socket: format!("strata-{test}-{}", std::process::id()),
            dir,
        };
        let line = format!("cd {} && {command}; sleep 60", tmux.dir.path().display());
        tmux.run(&[
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            "sh",
            "-c",
            &line,
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .env("LANG", "C.UTF-8")
            .output()
            .expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p"])
    }

    /// Waits (10 s at most) for the screen to show `text`; panics with the screen otherwise.
    fn wait_for(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the screen never showed {text:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        for key in keys {
            self.run(&["send-keys", key]);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for the file the command writes last, and returns it.
    fn wait_for_file(&self, name: &str) -> String {
        let path = self.path(name);
        let start = Instant::now();
        while !path.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} never appeared; the screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        fs::read_to_string(path).unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn boot_ui() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_strata-menu-panic"))
        .parent()
        .map(|dir| Box::leak(dir.join("boot-ui").into_boxed_path()) as &Path)
        .filter(|p| p.exists())
        .expect("boot-ui is built (cargo build --workspace)")
}

/// The menu's command line, writing the action to action.json and the terminal's settings
/// before and after to stty.before and stty.after.
fn menu_command(args: &str) -> String {
    format!(
        "stty -g > stty.before; {} --plan plan.toml {args} > action.json.part; \
         echo $? > status; stty -g > stty.after; mv action.json.part action.json",
        boot_ui().display()
    )
}

#[test]
fn terminal_menu_rollback_once_in_ascii() {
    let tmux = Tmux::start("rollback", &menu_command("--ascii"));
    let screen = tmux.wait_for("+ Layers, top first");
    assert!(screen.contains("|> [x] broken Broken upgrade"), "{screen}");
    assert!(screen.is_ascii(), "{screen}");
    tmux.keys(&["j", "t"]);
    let screen = tmux.wait_for("|  [ ] broken");
    assert!(screen.contains("|> [x] good   Good upgrade"), "{screen}");
    assert!(screen.contains("(selection changed)"), "{screen}");
    tmux.keys(&["Enter"]);
    let action = tmux.wait_for_file("action.json");
    assert_eq!(
        action.trim(),
        r#"{"action":"boot-once","layers":["good","base"]}"#
    );
    assert_eq!(fs::read_to_string(tmux.path("status")).unwrap().trim(), "0");
    assert_eq!(
        fs::read_to_string(tmux.path("stty.before")).unwrap(),
        fs::read_to_string(tmux.path("stty.after")).unwrap(),
        "the terminal is restored"
    );
}

#[test]
fn terminal_menu_save_warnings_and_unicode() {
    let tmux = Tmux::start("save", &menu_command(""));
    // A UTF-8 locale on xterm: box-drawing borders.
    tmux.wait_for("┌ Layers, top first");
    // Leaving out good while broken (built on it) stays on: a warning, inline.
    tmux.keys(&["Down", "Space"]);
    tmux.wait_for("! broken was built on good, which is left out");
    tmux.keys(&["d", "?"]);
    tmux.wait_for("Press any key to go back.");
    tmux.keys(&["q", "End", "t", "s"]);
    let action = tmux.wait_for_file("action.json");
    assert_eq!(
        action.trim(),
        r#"{"action":"save-and-boot","layers":["base"]}"#
    );
}

#[test]
fn terminal_menu_escape_countdown_and_resize() {
    let tmux = Tmux::start("escape", &menu_command("--ascii"));
    tmux.wait_for("+ Layers, top first");
    tmux.run(&["resize-window", "-x", "100", "-y", "30"]);
    let wide = format!("+{}+", "-".repeat(98));
    let screen = tmux.wait_for(&wide);
    assert_eq!(screen.lines().count(), 30, "{screen}");
    tmux.keys(&["Escape"]);
    let action = tmux.wait_for_file("action.json");
    assert_eq!(action.trim(), r#"{"action":"boot-default"}"#);

    // Nobody there: the countdown boots the default by itself.
    let tmux = Tmux::start("countdown", &menu_command("--ascii --countdown 2"));
    tmux.wait_for("the default boots in");
    let action = tmux.wait_for_file("action.json");
    assert_eq!(action.trim(), r#"{"action":"boot-default"}"#);
}

#[test]
fn terminal_menu_gives_the_terminal_back_after_a_panic() {
    let command = format!(
        "stty -g > stty.before; {} 2> panic.log; echo $? > status; stty -g > stty.after; \
         touch done",
        env!("CARGO_BIN_EXE_strata-menu-panic")
    );
    let tmux = Tmux::start("panic", &command);
    tmux.wait_for_file("done");
    assert_eq!(
        fs::read_to_string(tmux.path("status")).unwrap().trim(),
        "101"
    );
    assert!(
        fs::read_to_string(tmux.path("panic.log"))
            .unwrap()
            .contains("a bug inside the menu")
    );
    assert_eq!(
        fs::read_to_string(tmux.path("stty.before")).unwrap(),
        fs::read_to_string(tmux.path("stty.after")).unwrap(),
        "the terminal is restored after the panic"
    );
}

#[test]
fn terminal_menu_lock_asks_twice_without_echo() {
    if !tests::have_root("terminal_menu_lock_asks_twice_without_echo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("base/etc")).unwrap();
    fs::write(dir.path().join("base/etc/version"), "base\n").unwrap();
    let store = dir.path().join("store");
    tests::overlayctl(
        &store,
        &["init", "--base", dir.path().join("base").to_str().unwrap()],
    );
    let command = format!(
        "{} --store {} menu-lock; echo $? > status",
        assert_cmd::cargo::cargo_bin("overlayctl").display(),
        store.display()
    );
    let tmux = Tmux::start("lock", &command);
    tmux.wait_for("Menu password:");
    tmux.keys(&["s3cret", "Enter"]);
    let screen = tmux.wait_for("The same again:");
    assert!(
        !screen.contains("s3cret"),
        "the password was echoed:\n{screen}"
    );
    tmux.keys(&["s3cret", "Enter"]);
    assert_eq!(
        tmux.wait_for_file("status").trim(),
        "0",
        "{}",
        tmux.screen()
    );
    let plan = layers_spec::Plan::parse(
        &fs::read_to_string(store.join("overlayplan.toml")).unwrap(),
        "plan",
    )
    .unwrap();
    let hash = plan.boot.menu_lock.expect("a lock in the plan");
    assert!(layers_spec::lock::verify_password(&hash, "s3cret"));

    // Two different passwords: refused, the lock unchanged.
    let tmux = Tmux::start("lock-mismatch", &command);
    tmux.wait_for("Menu password:");
    tmux.keys(&["one", "Enter"]);
    tmux.wait_for("The same again:");
    tmux.keys(&["two", "Enter"]);
    assert_eq!(tmux.wait_for_file("status").trim(), "1");
    tmux.wait_for("the two passwords differ; nothing was changed");
    let after = fs::read_to_string(store.join("overlayplan.toml")).unwrap();
    assert!(after.contains(&hash));
}
