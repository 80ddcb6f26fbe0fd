//! Where the boot flow meets a person: the real terminal (a VT or a serial console, as process 1
//! or under an initramfs framework), no terminal at all, or keys given on the command line for
//! tests (`boot --menu-keys`).

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::Path;

use boot_ui::{Action, App, Key};

/// The shell a menu may open, when the image has one.
const SHELL: &str = "/bin/sh";

/// What the flow asks of the console.
pub trait Console {
    /// A person could be there: a terminal to draw on and to read keys from.
    fn interactive(&mut self) -> bool;
    /// The hidden menu: waits up to `seconds` for a key; true when one came.
    fn wait_for_key(&mut self, seconds: u32) -> bool;
    /// Runs the menu to an action; `Err` when the terminal failed.
    fn run_menu(&mut self, app: &mut App) -> Result<Action, String>;
    /// Whether a shell can be opened.
    fn has_shell(&self) -> bool;
    /// Opens the shell and returns when it ends.
    fn shell(&mut self);
    /// Draw with ASCII only.
    fn ascii(&self) -> bool;
}

/// No terminal: the default boots.
#[derive(Debug, Default)]
pub struct NoConsole;

impl Console for NoConsole {
    fn interactive(&mut self) -> bool {
        false
    }
    fn wait_for_key(&mut self, _: u32) -> bool {
        false
    }
    fn run_menu(&mut self, _: &mut App) -> Result<Action, String> {
        Ok(Action::BootDefault)
    }
    fn has_shell(&self) -> bool {
        false
    }
    fn shell(&mut self) {}
    fn ascii(&self) -> bool {
        true
    }
}

/// The console the boot runs on: standard input and standard error.
#[derive(Debug, Default)]
pub struct Terminal {
    prepared: Option<bool>,
    /// Plymouth's splash, hidden while the console is the menu's.
    splash: Option<Splash>,
}

impl Terminal {
    /// Makes a bare console usable for a full-screen program, once: Plymouth's splash out of
    /// the way, a size when the kernel gave none (serial lines report 0x0), and a controlling
    /// terminal (process 1 has none, and without one raw mode and key reads fail).
    fn prepare(&mut self) -> bool {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() || !std::io::stderr().is_terminal() {
            return false;
        }
        self.splash = Splash::hide();
        let fd = stdin.as_fd();
        if let Ok(size) = rustix::termios::tcgetwinsize(fd)
            && (size.ws_row == 0 || size.ws_col == 0)
        {
            let size = rustix::termios::Winsize {
                ws_row: 24,
                ws_col: 80,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let _ = rustix::termios::tcsetwinsize(fd, size);
        }
        if std::fs::File::open("/dev/tty").is_err() {
            let _ = rustix::process::setsid();
            let _ = rustix::process::ioctl_tiocsctty(fd);
        }
        true
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(splash) = self.splash.take() {
            splash.show();
        }
    }
}

/// Plymouth, when its daemon runs: it draws the splash on the console and reads its keys, so
/// the menu (and its wait for a key) hides the splash first and gives it back after, as
/// systemd's console prompts do.
#[derive(Debug)]
struct Splash {
    plymouth: std::path::PathBuf,
}

impl Splash {
    /// Where an initramfs has the client.
    const CLIENTS: [&'static str; 4] = [
        "/usr/bin/plymouth",
        "/bin/plymouth",
        "/usr/sbin/plymouth",
        "/sbin/plymouth",
    ];

    /// Hides the splash when Plymouth runs; `None` when it does not (or will not answer).
    fn hide() -> Option<Self> {
        let plymouth = Self::CLIENTS.into_iter().find(|c| Path::new(c).exists())?;
        Self::hide_with(Path::new(plymouth))
    }

    /// The same with the client at `plymouth`.
    fn hide_with(plymouth: &Path) -> Option<Self> {
        let splash = Self {
            plymouth: plymouth.to_owned(),
        };
        if !splash.ask("--ping") {
            return None;
        }
        // hide-splash gives the console back in text mode; deactivate then stops Plymouth from
        // drawing a splash that had not loaded yet (a display found later) and from reading
        // keys. Shown again after even when a request went unanswered: it may have been done.
        let hidden = splash.ask("hide-splash") & splash.ask("deactivate");
        Self::note(if hidden {
            "Plymouth's splash is hidden while the boot menu has the console"
        } else {
            "Plymouth did not answer; the boot menu may share the console with its splash"
        });
        Some(splash)
    }

    fn show(self) {
        if self.ask("reactivate") & self.ask("show-splash") {
            Self::note("Plymouth's splash is shown again");
        }
    }

    /// A line for the kernel log (the console is the menu's).
    fn note(line: &str) {
        crate::log::to_kmsg(line);
    }

    /// How long a request to Plymouth may take: a daemon that does not answer must not hold
    /// the boot (the unit has no start timeout, for the person at the menu).
    const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

    /// Asks Plymouth `what`; true when it answered yes in time (else the client is killed).
    fn ask(&self, what: &str) -> bool {
        let Ok(mut client) = std::process::Command::new(&self.plymouth)
            .arg(what)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            return false;
        };
        let asked = std::time::Instant::now();
        loop {
            match client.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if asked.elapsed() < Self::ANSWER_WITHIN => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => {
                    let _ = client.kill();
                    let _ = client.wait();
                    return false;
                }
            }
        }
    }
}

impl Console for Terminal {
    fn interactive(&mut self) -> bool {
        if let Some(prepared) = self.prepared {
            return prepared;
        }
        let prepared = self.prepare();
        self.prepared = Some(prepared);
        prepared
    }

    fn wait_for_key(&mut self, seconds: u32) -> bool {
        self.interactive() && boot_ui::term::wait_for_key(seconds).unwrap_or(false)
    }

    fn run_menu(&mut self, app: &mut App) -> Result<Action, String> {
        boot_ui::term::run_menu(app).map_err(|e| e.to_string())
    }

    fn has_shell(&self) -> bool {
        Path::new(SHELL).exists()
    }

    fn shell(&mut self) {
        eprintln!("strata: leave the shell (exit) to return to the boot menu");
        // The boot blocks the terminal's signals; the shell starts with none blocked (the
        // standard library clears the mask of what it spawns).
        let _ = std::process::Command::new(SHELL).status();
    }

    fn ascii(&self) -> bool {
        !boot_ui::term::unicode_ok()
    }
}

/// Keys given in advance, for tests of the flow on any machine: the menu gets them in order,
/// and when they run out it boots the default (as Esc would).
#[derive(Debug, Default)]
pub struct Scripted {
    keys: std::collections::VecDeque<Key>,
    /// How many times the shell was asked for.
    pub shells: u32,
}

impl Scripted {
    /// Keys by name, separated by spaces or commas: `up down j k t s d enter esc space
    /// backspace bang` or any single character.
    pub fn parse(text: &str) -> Result<Self, String> {
        let keys = text
            .split([' ', ','])
            .filter(|k| !k.is_empty())
            .map(|name| {
                Ok(match name.to_ascii_lowercase().as_str() {
                    "up" => Key::Up,
                    "down" => Key::Down,
                    "home" => Key::Home,
                    "end" => Key::End,
                    "pageup" => Key::PageUp,
                    "pagedown" => Key::PageDown,
                    "enter" => Key::Enter,
                    "esc" => Key::Esc,
                    "backspace" => Key::Backspace,
                    "space" => Key::Char(' '),
                    "bang" => Key::Char('!'),
                    _ => {
                        let mut chars = name.chars();
                        match (chars.next(), chars.next()) {
                            (Some(c), None) => Key::Char(c),
                            _ => return Err(format!("{name:?} is not a key name")),
                        }
                    }
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { keys, shells: 0 })
    }
}

impl Console for Scripted {
    fn interactive(&mut self) -> bool {
        true
    }

    fn wait_for_key(&mut self, _: u32) -> bool {
        self.keys.pop_front().is_some()
    }

    fn run_menu(&mut self, app: &mut App) -> Result<Action, String> {
        while let Some(key) = self.keys.pop_front() {
            if let Some(action) = app.handle_key(key) {
                return Ok(action);
            }
        }
        Ok(Action::BootDefault)
    }

    fn has_shell(&self) -> bool {
        true
    }

    fn shell(&mut self) {
        self.shells += 1;
    }

    fn ascii(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for Plymouth's client that records what it was asked in `asked` and behaves
    /// as `script` says (a shell `case` on the request).
    fn fake_plymouth(dir: &Path, script: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let client = dir.join("plymouth");
        let asked = dir.join("asked");
        std::fs::write(
            &client,
            format!(
                "#!/bin/sh\necho \"$1\" >>{}\ncase \"$1\" in\n{script}\nesac\n",
                asked.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
        client
    }

    fn asked(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("asked")).unwrap_or_default()
    }

    #[test]
    fn splash_is_hidden_and_shown_again() {
        let dir = tempfile::tempdir().unwrap();
        let client = fake_plymouth(dir.path(), "*) exit 0 ;;");
        let splash = Splash::hide_with(&client).expect("Plymouth answered");
        assert_eq!(asked(dir.path()), "--ping\nhide-splash\ndeactivate\n");
        splash.show();
        assert_eq!(
            asked(dir.path()),
            "--ping\nhide-splash\ndeactivate\nreactivate\nshow-splash\n"
        );
    }

    #[test]
    fn no_daemon_no_hiding() {
        let dir = tempfile::tempdir().unwrap();
        let client = fake_plymouth(dir.path(), "--ping) exit 1 ;;");
        assert!(Splash::hide_with(&client).is_none());
        assert_eq!(
            asked(dir.path()),
            "--ping\n",
            "nothing asked of a daemon not running"
        );
    }

    #[test]
    fn a_daemon_that_does_not_answer_does_not_hold_the_boot() {
        let dir = tempfile::tempdir().unwrap();
        let client = fake_plymouth(dir.path(), "hide-splash) exec sleep 600 ;;");
        let started = std::time::Instant::now();
        // Given up after ANSWER_WITHIN, the client killed (not 600 s); the rest still asked,
        // and the splash is shown again after.
        let splash = Splash::hide_with(&client).expect("the daemon answered the ping");
        assert!(
            started.elapsed() < Splash::ANSWER_WITHIN * 4,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(asked(dir.path()), "--ping\nhide-splash\ndeactivate\n");
        splash.show();
        assert!(asked(dir.path()).ends_with("reactivate\nshow-splash\n"));
    }

    #[test]
    fn key_names_parse() {
        let s = Scripted::parse("down,t  enter Esc x bang").unwrap();
        assert_eq!(
            Vec::from(s.keys),
            [
                Key::Down,
                Key::Char('t'),
                Key::Enter,
                Key::Esc,
                Key::Char('x'),
                Key::Char('!')
            ]
        );
        assert_eq!(
            Scripted::parse("down sideways").unwrap_err(),
            "\"sideways\" is not a key name"
        );
    }
}
