//! Drawing the menu: `impl Widget for &App`, one helper per area. Only ASCII when the app asks
//! for it (serial consoles and terminals without Unicode fonts), and nothing that needs colour
//! to be understood: the highlighted row is reverse video.

use layers_spec::LayerState;
use layers_spec::size::human;
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::symbols::border;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Widget, Wrap};

use crate::app::{App, LayerInfo, Mode};

const ASCII_BORDER: border::Set = border::Set {
    top_left: "+",
    top_right: "+",
    bottom_left: "+",
    bottom_right: "+",
    vertical_left: "|",
    vertical_right: "|",
    horizontal_top: "-",
    horizontal_bottom: "-",
};

/// Rows of the details pane, borders included.
const DETAILS_HEIGHT: u16 = 7;

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let warnings = self.warnings();
        let banner = u16::from(self.fallback.is_some());
        let [header, fallback, list, details, notes, status] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(banner),
            Constraint::Min(3),
            Constraint::Length(DETAILS_HEIGHT),
            Constraint::Length(warnings.len().min(3) as u16 + 1),
            Constraint::Length(1),
        ])
        .areas(area);
        self.render_header(header, buf);
        if let Some(why) = &self.fallback {
            Line::from(format!("The last boot fell back: {why}"))
                .bold()
                .render(fallback, buf);
        }
        if self.mode == Mode::Help {
            self.render_help(list.union(details), buf);
        } else {
            self.render_layers(list, buf);
            self.render_details(details, buf);
        }
        self.render_notes(&warnings, notes, buf);
        self.render_status(status, buf);
    }
}

impl App {
    fn block<'a>(&self, title: impl Into<Line<'a>>) -> Block<'a> {
        Block::bordered()
            .border_set(if self.ascii {
                ASCII_BORDER
            } else {
                border::PLAIN
            })
            .title(title)
    }

    fn ellipsis(&self) -> &'static str {
        if self.ascii { "~" } else { "…" }
    }

    fn render_header(&self, area: Rect, buf: &mut Buffer) {
        let mut spans = vec![Span::from("Strata boot menu").bold()];
        if let Some(left) = self.countdown {
            spans.push(Span::from(format!(
                "  (the default boots in {left} s; press a key to stay)"
            )));
        } else if !self.is_default() {
            spans.push(Span::from("  (selection changed)"));
        }
        Line::from(spans).render(area, buf);
    }

    fn render_layers(&self, area: Rect, buf: &mut Buffer) {
        let visible = area.height.saturating_sub(2) as usize;
        let total = self.layers.len();
        // Keep the cursor on screen without remembering a scroll position.
        let offset = (self.cursor + 1).saturating_sub(visible.max(1));
        let mut block = self.block(" Layers, top first ");
        if total > visible {
            let last = (offset + visible).min(total);
            block = block
                .title(Line::from(format!(" {}-{last} of {total} ", offset + 1)).right_aligned());
        }
        let inner = block.inner(area);
        block.render(area, buf);
        let width = inner.width as usize;
        let name_width = self
            .layers
            .iter()
            .map(|l| l.name.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(4, 24)
            .min(width / 3);
        let rows = self.layers.iter().enumerate().skip(offset).take(visible);
        for (row, (i, layer)) in rows.enumerate() {
            let line =
                self.layer_line(layer, self.selected[i], i == self.cursor, name_width, width);
            let style = if i == self.cursor {
                Style::new().add_modifier(Modifier::REVERSED)
            } else {
                Style::new()
            };
            let y = inner.y + row as u16;
            buf.set_style(Rect::new(inner.x, y, inner.width, 1), style);
            buf.set_stringn(inner.x, y, line, width, style);
        }
    }

    /// `> [x] name  title  state  K  date`, fitted to `width`.
    fn layer_line(
        &self,
        layer: &LayerInfo,
        on: bool,
        current: bool,
        name_width: usize,
        width: usize,
    ) -> String {
        const STATE_WIDTH: usize = 20;
        const DATE_WIDTH: usize = 10;
        let state = match (layer.state, layer.tries_left) {
            (LayerState::Trial, Some(0)) => "trial, used up".to_owned(),
            (LayerState::Trial, Some(1)) => "trial, 1 boot left".to_owned(),
            (LayerState::Trial, Some(n)) => format!("trial, {n} boots left"),
            (LayerState::Trial, None) => "trial".to_owned(),
            (LayerState::Active, _) => "active".to_owned(),
            (LayerState::Disabled, _) => "disabled".to_owned(),
        };
        let fixed = 2 + 4 + name_width + 1 + 1 + STATE_WIDTH + 1 + 1 + 1 + DATE_WIDTH;
        let title_width = width.saturating_sub(fixed).max(1);
        format!(
            "{} [{}] {} {} {} {} {}",
            if current { ">" } else { " " },
            if on { "x" } else { " " },
            fit(&layer.name, name_width, self.ellipsis()),
            fit(&layer.title, title_width, self.ellipsis()),
            fit(&state, STATE_WIDTH, self.ellipsis()),
            if layer.known_good { "K" } else { " " },
            fit(layer.created.as_deref().unwrap_or(""), DATE_WIDTH, ""),
        )
    }

    fn render_details(&self, area: Rect, buf: &mut Buffer) {
        let Some(layer) = self.layers.get(self.cursor) else {
            self.block(" No layers ").render(area, buf);
            return;
        };
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let mut facts = format!("parent: {}", or_none(&layer.parent));
        if let Some(created) = &layer.created {
            facts.push_str(&format!("  created: {created}"));
        }
        if let Some(size) = layer.size {
            facts.push_str(&format!("  size: {}", human(size)));
        }
        if layer.known_good {
            facts.push_str("  known good");
        }
        let default = match &layer.left_out {
            Some(why) => format!("default boot: left out ({why})"),
            None => "default boot: in the stack".to_owned(),
        };
        let block = self.block(format!(" {} ", layer.name));
        let width = block.inner(area).width as usize;
        let lines: Vec<Line> = [
            layer.title.clone(),
            facts,
            format!("digest: {}", or_none(&layer.digest)),
            default,
            format!("notes: {}", or_none(&layer.notes)),
        ]
        .iter()
        .map(|text| Line::from(fit(text, width, self.ellipsis()).trim_end().to_owned()))
        .collect();
        Paragraph::new(lines).block(block).render(area, buf);
    }

    fn render_help(&self, area: Rect, buf: &mut Buffer) {
        let (up, down) = if self.ascii {
            ("Up", "Down")
        } else {
            ("↑", "↓")
        };
        let mut lines = vec![
            format!("{up} {down} j k    move (PgUp PgDn Home End g G jump)"),
            "Space        switch the highlighted layer on or off".to_owned(),
            "t            make the highlighted layer the top: everything above it off".to_owned(),
            "Enter        boot the selection once; the plan stays as it is".to_owned(),
            "s            save the selection to the plan and boot it".to_owned(),
            "d            back to the plan's default selection".to_owned(),
            "Esc          boot the default".to_owned(),
        ];
        if self.shell {
            lines.push("!            open a shell; leave it to come back here".to_owned());
        }
        if self.lock.is_some() {
            lines.push(
                "Changes ask for the menu password; the default boots without it.".to_owned(),
            );
        }
        lines.push(String::new());
        lines.push("[x] in the stack   K known good   trial: boots left before it is".to_owned());
        lines.push("disabled unless `overlayctl accept` accepts it".to_owned());
        lines.push(String::new());
        lines.push("Press any key to go back.".to_owned());
        Paragraph::new(lines.into_iter().map(Line::from).collect::<Vec<_>>())
            .wrap(Wrap { trim: false })
            .block(self.block(" Help "))
            .render(area, buf);
    }

    fn render_notes(&self, warnings: &[String], area: Rect, buf: &mut Buffer) {
        let mut lines: Vec<Line> = warnings
            .iter()
            .take(3)
            .map(|w| Line::from(format!("! {w}")).bold())
            .collect();
        let message = match &self.mode {
            Mode::Password { input, .. } => {
                let mut text = format!(
                    "Menu password: {}_  (Enter to check, Esc to give up)",
                    "*".repeat(input.chars().count())
                );
                if let Some(m) = &self.message {
                    text = format!("{m}. {text}");
                }
                Some(text)
            }
            _ => self.message.clone(),
        };
        lines.push(Line::from(message.unwrap_or_default()));
        Paragraph::new(lines).render(area, buf);
    }

    /// The keys, as many as fit, most needed first; `? help` lists them all.
    fn render_status(&self, area: Rect, buf: &mut Buffer) {
        let mut items = vec![
            if self.ascii {
                "Up/Down move"
            } else {
                "↑/↓ move"
            },
            "Space on/off",
            "t top",
            "Enter boot",
            "s save",
            "Esc default",
        ];
        if self.shell {
            items.push("! shell");
        }
        items.push("d reset");
        let help = "? help";
        let mut text = String::new();
        for item in items {
            let room = area.width as usize;
            if text.chars().count() + item.chars().count() + 2 + help.len() + 2 <= room {
                text.push_str(item);
                text.push_str("  ");
            }
        }
        text.push_str(help);
        Line::from(text).reversed().render(area, buf);
    }
}

/// `text` cut or padded to exactly `width` characters, `ellipsis` marking a cut.
fn fit(text: &str, width: usize, ellipsis: &str) -> String {
    let text = text.lines().next().unwrap_or("");
    let count = text.chars().count();
    if count <= width {
        return format!("{text:<width$}");
    }
    let keep = width.saturating_sub(ellipsis.chars().count());
    text.chars().take(keep).collect::<String>() + ellipsis
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{Key, Setup};
    use layers_spec::{BootOverrides, BootState, Layer, Plan, resolve};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn plan() -> Plan {
        let mut broken = Layer::new("upgrade-3-broken");
        broken.state = LayerState::Trial;
        broken.parent = Some("upgrade-2".into());
        broken.title = Some("The upgrade that broke Wi-Fi".into());
        broken.created = Some("2026-11-20T10:00:00Z".parse().unwrap());
        broken.digest = Some(format!("blake3:{}", "ab".repeat(32)));
        let mut good = Layer::new("upgrade-2");
        good.parent = Some("base".into());
        good.title = Some("Security fixes".into());
        good.created = Some("2026-11-19T10:00:00Z".parse().unwrap());
        good.notes = Some("accepted after a healthy boot".into());
        let mut base = Layer::new("base");
        base.known_good = true;
        base.title = Some("Core System Image".into());
        base.created = Some("2026-11-01T10:00:00Z".parse().unwrap());
        Plan::new(vec![broken, good, base])
    }

    fn app(plan: &Plan, setup: Setup) -> App {
        let mut state = BootState::default();
        state.trial_tries.insert("upgrade-3-broken".into(), 1);
        let r = resolve(plan, &state, &BootOverrides::default(), None);
        App::new(
            plan,
            &r,
            &state,
            &|name| Some(name.len() as u64 * 1000),
            setup,
        )
    }

    fn screen(app: &App, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| frame.render_widget(app, frame.area()))
            .unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_owned()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_default_screen_at_80x24() {
        let app = app(&plan(), Setup::default());
        insta::assert_snapshot!(screen(&app, 80, 24));
    }

    #[test]
    fn ascii_on_a_serial_console_with_a_fallback_and_a_countdown() {
        let app = app(
            &plan(),
            Setup {
                ascii: true,
                countdown: Some(5),
                fallback: Some("layer upgrade-2 is missing from the store".into()),
                shell: true,
                ..Setup::default()
            },
        );
        let text = screen(&app, 80, 24);
        assert!(text.is_ascii(), "{text}");
        insta::assert_snapshot!(text);
    }

    #[test]
    fn a_rollback_with_its_warning() {
        let mut app = app(&plan(), Setup::default());
        app.handle_key(Key::Down);
        app.handle_key(Key::Down);
        app.handle_key(Key::Char('t'));
        let text = screen(&app, 80, 24);
        assert!(!text.contains("! no known-good layer"), "{text}");
        insta::assert_snapshot!(text);
        app.handle_key(Key::Char('d'));
        app.handle_key(Key::Up);
        app.handle_key(Key::Char(' '));
        let text = screen(&app, 80, 24);
        assert!(
            text.contains("! upgrade-3-broken was built on upgrade-2, which is left out"),
            "{text}"
        );
    }

    #[test]
    fn a_long_stack_scrolls_with_the_cursor() {
        let mut layers: Vec<Layer> = (1..=40)
            .rev()
            .map(|i| {
                let mut l = Layer::new(format!("upgrade-{i:02}"));
                l.parent = Some(if i == 1 {
                    "base".into()
                } else {
                    format!("upgrade-{:02}", i - 1)
                });
                l
            })
            .collect();
        let mut base = Layer::new("base");
        base.known_good = true;
        layers.push(base);
        let plan = Plan::new(layers);
        let mut app = app(&plan, Setup::default());
        let top = screen(&app, 80, 24);
        assert!(top.contains("1-12 of 41"), "{top}");
        for _ in 0..30 {
            app.handle_key(Key::Down);
        }
        let text = screen(&app, 80, 24);
        insta::assert_snapshot!(text);
        assert!(text.contains("> [x] upgrade-10"), "{text}");
        assert!(!text.contains("upgrade-40"), "{text}");
    }

    #[test]
    fn help_and_password_screens() {
        let mut app = app(
            &plan(),
            Setup {
                lock: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA".into()),
                ..Setup::default()
            },
        );
        app.handle_key(Key::Char('?'));
        insta::assert_snapshot!("help", screen(&app, 80, 24));
        app.handle_key(Key::Esc);
        app.handle_key(Key::Char('t'));
        app.handle_key(Key::Char('a'));
        app.handle_key(Key::Char('b'));
        let text = screen(&app, 80, 24);
        assert!(
            text.contains("Menu password: **_  (Enter to check, Esc to give up)"),
            "{text}"
        );
    }

    #[test]
    fn wider_terminals_give_the_title_the_room_and_resizing_redraws() {
        let app = app(&plan(), Setup::default());
        let narrow = screen(&app, 80, 24);
        assert!(
            narrow.contains("upgrade-3-broken The upgrade that bro… trial"),
            "{narrow}"
        );
        let wide = screen(&app, 120, 30);
        assert!(
            wide.contains("upgrade-3-broken The upgrade that broke Wi-Fi "),
            "{wide}"
        );
        assert_eq!(wide.lines().count(), 30);
    }

    #[test]
    fn fit_pads_and_cuts() {
        assert_eq!(fit("abc", 5, "~"), "abc  ");
        assert_eq!(fit("abcdef", 4, "~"), "abc~");
        assert_eq!(fit("two\nlines", 5, "~"), "two  ");
        assert_eq!(fit("äöüäöü", 4, "…"), "äöü…");
    }
}
