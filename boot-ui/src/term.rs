//! The menu on a real terminal: raw mode and the alternate screen, keys, the countdown, redraws
//! on resize, and the terminal put back on every way out, a panic included. Also the hidden
//! menu's "press any key" wait. Everything is drawn on standard error (standard output stays
//! free for results), keys come from standard input.

use std::io::{self, Write};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};

use crate::app::{Action, App, Key};

/// Set while the terminal is in raw mode, so the panic hook knows to put it back.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// Puts the terminal back, once, whoever calls first (the guard or the panic hook).
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stderr(), terminal::LeaveAlternateScreen, cursor::Show);
    }
}

/// Raw mode (and with `alternate`, the alternate screen) until dropped: the terminal is put
/// back on return, on `?`, on unwinding, and by a panic hook before the panic message.
#[derive(Debug)]
pub struct RawGuard;

impl RawGuard {
    pub fn enter(alternate: bool) -> io::Result<Self> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        terminal::enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        let guard = Self;
        if alternate {
            execute!(io::stderr(), terminal::EnterAlternateScreen, cursor::Hide)?;
        }
        Ok(guard)
    }
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Whether box-drawing characters are safe: a UTF-8 locale on a terminal that is not the bare
/// Linux console or a serial line (whose TERM is unset, `linux`, `vt100`...).
pub fn unicode_ok() -> bool {
    let utf8 = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.is_empty())
        .is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v.contains("utf-8") || v.contains("utf8")
        });
    let term = std::env::var("TERM").unwrap_or_default();
    utf8 && !term.is_empty()
        && !matches!(
            term.as_str(),
            "linux" | "dumb" | "vt100" | "vt102" | "vt220"
        )
}

/// The menu's key for a terminal key event, if it has one. Ctrl-C is Esc (boot the default);
/// a serial line's bare line feed arrives as Ctrl-J and means Enter.
pub fn map_key(event: KeyEvent) -> Option<Key> {
    if event.kind == KeyEventKind::Release {
        return None;
    }
    if event.modifiers.contains(KeyModifiers::CONTROL) {
        return match event.code {
            KeyCode::Char('c') => Some(Key::Esc),
            KeyCode::Char('j' | 'm') => Some(Key::Enter),
            KeyCode::Char('h') => Some(Key::Backspace),
            _ => None,
        };
    }
    Some(match event.code {
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Char(c) => Key::Char(c),
        _ => return None,
    })
}

/// How long a bare Esc waits for the rest of an escape sequence. A serial line may deliver an
/// arrow key's bytes apart; without this, half an arrow key would boot the default.
const ESC_DELAY: Duration = Duration::from_millis(150);

/// Runs the menu until a key (or the countdown) gives an action. The terminal is restored
/// before this returns, whatever happens. A terminal that hangs up is an error: nobody can
/// answer any more, and the caller boots the default.
pub fn run_menu(app: &mut App) -> io::Result<Action> {
    let _guard = RawGuard::enter(true)?;
    // Cleared by hand: Terminal::clear asks the terminal where its cursor is, and a serial line
    // may never answer. Consoles without an alternate screen need the clear.
    execute!(io::stderr(), terminal::Clear(terminal::ClearType::All))?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stderr()))?;
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    loop {
        // draw() resizes to the terminal first, so a resize is one more pass of this loop.
        terminal.draw(|frame| frame.render_widget(&*app, frame.area()))?;
        check_line()?;
        let wait = next_tick.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            let key = match event::read()? {
                Event::Key(key) if is_bare_esc(key) => after_escape()?,
                Event::Key(key) => map_key(key),
                _ => None,
            };
            if let Some(action) = key.and_then(|k| app.handle_key(k)) {
                return Ok(action);
            }
        } else {
            next_tick += Duration::from_secs(1);
            if let Some(action) = app.tick() {
                return Ok(action);
            }
        }
    }
}

fn is_bare_esc(key: KeyEvent) -> bool {
    key.code == KeyCode::Esc && key.modifiers.is_empty() && key.kind != KeyEventKind::Release
}

/// After a bare Esc: Esc itself when nothing follows within [`ESC_DELAY`], else the arrow or
/// Home/End key whose bytes arrived split (`[A`, `OB`...), else nothing.
fn after_escape() -> io::Result<Option<Key>> {
    let Some(first) = key_within(ESC_DELAY)? else {
        return Ok(Some(Key::Esc));
    };
    if !matches!(first.code, KeyCode::Char('[' | 'O')) {
        return Ok(map_key(first));
    }
    Ok(key_within(ESC_DELAY)?.and_then(|last| match last.code {
        KeyCode::Char('A') => Some(Key::Up),
        KeyCode::Char('B') => Some(Key::Down),
        KeyCode::Char('H') => Some(Key::Home),
        KeyCode::Char('F') => Some(Key::End),
        _ => None,
    }))
}

/// The next key event, if one comes within `wait`.
fn key_within(wait: Duration) -> io::Result<Option<KeyEvent>> {
    if !event::poll(wait)? {
        return Ok(None);
    }
    Ok(match event::read()? {
        Event::Key(key) => Some(key),
        _ => None,
    })
}

/// Fails when the terminal on standard input hung up (an unplugged console, a closed pty):
/// reads would then return nothing forever.
fn check_line() -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdin = io::stdin();
    let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now))?;
    if fds[0]
        .revents()
        .intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL)
    {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the terminal hung up",
        ));
    }
    Ok(())
}

/// The hidden menu: `strata: press any key for the boot menu (N)` for `seconds`, counting down
/// on one line. True when a key was pressed (and swallowed).
pub fn wait_for_key(seconds: u32) -> io::Result<bool> {
    let _guard = RawGuard::enter(false)?;
    // Keys typed before the prompt are not an answer to it.
    while event::poll(Duration::ZERO)? {
        event::read()?;
    }
    let mut out = io::stderr();
    let mut pressed = false;
    for left in (1..=seconds).rev() {
        check_line()?;
        write!(out, "\rstrata: press any key for the boot menu ({left}) ")?;
        out.flush()?;
        let until = Instant::now() + Duration::from_secs(1);
        while let Some(wait) = until.checked_duration_since(Instant::now()) {
            if !event::poll(wait)? {
                break;
            }
            if let Event::Key(key) = event::read()?
                && key.kind != KeyEventKind::Release
            {
                pressed = true;
                break;
            }
        }
        if pressed {
            break;
        }
    }
    write!(out, "\r\n")?;
    out.flush()?;
    Ok(pressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_with_control_and_release_handled() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert_eq!(map_key(key(KeyCode::Up, KeyModifiers::NONE)), Some(Key::Up));
        assert_eq!(
            map_key(key(KeyCode::Char('t'), KeyModifiers::NONE)),
            Some(Key::Char('t'))
        );
        assert_eq!(
            map_key(key(KeyCode::Char('G'), KeyModifiers::SHIFT)),
            Some(Key::Char('G'))
        );
        assert_eq!(
            map_key(key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Key::Esc)
        );
        assert_eq!(
            map_key(key(KeyCode::Char('j'), KeyModifiers::CONTROL)),
            Some(Key::Enter)
        );
        assert_eq!(
            map_key(key(KeyCode::Char('x'), KeyModifiers::CONTROL)),
            None
        );
        assert_eq!(map_key(key(KeyCode::F(1), KeyModifiers::NONE)), None);
        let mut release = key(KeyCode::Enter, KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(map_key(release), None);
    }
}
