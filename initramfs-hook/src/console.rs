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
    plymouth: &'static str,
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
        let splash = Self { plymouth };
        if !(splash.ask("--ping") && splash.ask("hide-splash")) {
            return None;
        }
        Self::note("Plymouth's splash is hidden while the boot menu has the console");
        Some(splash)
    }

    fn show(self) {
        if self.ask("show-splash") {
            Self::note("Plymouth's splash is shown again");
        }
    }

    /// A line for the kernel log (the console is the menu's).
    fn note(line: &str) {
        if let Some(mut kmsg) = crate::log::open_kmsg() {
            crate::log::to_kmsg(&mut kmsg, line);
        }
    }

    fn ask(&self, what: &str) -> bool {
        std::process::Command::new(self.plymouth)
            .arg(what)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
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
