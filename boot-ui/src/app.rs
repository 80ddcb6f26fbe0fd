//! The menu's state machine: the layers, the selection, and what each key does. No I/O and no
//! drawing here (drawing is `impl Widget for &App` in `render`); the caller applies the
//! [`Action`] a key returns.

use layers_spec::lock::verify_password;
use layers_spec::{BootState, LayerState, Plan, Resolution};
use serde::Serialize;

/// What the person chose. Layer lists are top first, in plan order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Boot what the plan (and the command line) give, unchanged.
    BootDefault,
    /// Boot these layers this once; the plan is not changed.
    BootOnce { layers: Vec<String> },
    /// Save this selection to the plan, then boot it.
    SaveAndBoot { layers: Vec<String> },
    /// Open a shell; the menu comes back when it ends.
    Shell,
}

/// A key as the menu understands it; the terminal code maps its events to these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    Home,
    End,
    PageUp,
    PageDown,
    Enter,
    Esc,
    Backspace,
    Char(char),
}

/// One layer of the plan as the menu shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub name: String,
    pub title: String,
    pub state: LayerState,
    pub known_good: bool,
    pub parent: Option<String>,
    /// The creation date, `YYYY-MM-DD`.
    pub created: Option<String>,
    pub digest: Option<String>,
    pub notes: Option<String>,
    /// Bytes of file content, when the caller knows them.
    pub size: Option<u64>,
    /// Boots left before a trial layer is disabled; `None` for other states.
    pub tries_left: Option<u32>,
    /// Why the default boot leaves this layer out, when it does.
    pub left_out: Option<String>,
}

/// What the caller knows besides the plan.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Why the last boot fell back, when it did.
    pub fallback: Option<String>,
    /// A shell exists and may be offered.
    pub shell: bool,
    /// Seconds before the default boots unless a key is pressed.
    pub countdown: Option<u32>,
    /// The plan's `menu_lock` (a PHC password hash): changes need the password.
    pub lock: Option<String>,
    /// Draw with ASCII only (serial consoles, terminals without Unicode).
    pub ascii: bool,
    /// Why `s` cannot save (the plan on disk is damaged, say); Enter still boots once.
    pub save_refused: Option<String>,
}

/// What the menu is showing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Menu,
    Help,
    /// Asking for the lock's password before `then` is carried out.
    Password {
        input: String,
        then: Key,
    },
}

/// The menu's whole state.
#[derive(Debug, Clone)]
pub struct App {
    pub(crate) layers: Vec<LayerInfo>,
    /// On or off for each layer, in plan order.
    pub(crate) selected: Vec<bool>,
    pub(crate) default: Vec<bool>,
    pub(crate) cursor: usize,
    pub(crate) mode: Mode,
    pub(crate) countdown: Option<u32>,
    pub(crate) lock: Option<String>,
    pub(crate) unlocked: bool,
    pub(crate) shell: bool,
    pub(crate) fallback: Option<String>,
    /// A one-line answer to the last key (a refusal, a wrong password).
    pub(crate) message: Option<String>,
    pub(crate) ascii: bool,
    pub(crate) save_refused: Option<String>,
    /// Seconds since the last key.
    pub(crate) idle: u32,
}

/// How many rows PageUp and PageDown move.
const PAGE: usize = 10;
/// A menu nobody touches for this long starts a countdown to the default: a device whose
/// command line forces the menu must still boot when nobody is there.
pub const IDLE_LIMIT: u32 = 270;
/// That countdown's length.
pub const IDLE_COUNTDOWN: u32 = 30;

impl App {
    /// The menu for a plan and the resolution the default boot would mount. `size` gives a
    /// layer's size when the caller can tell it.
    pub fn new(
        plan: &Plan,
        resolution: &Resolution,
        state: &BootState,
        size: &dyn Fn(&str) -> Option<u64>,
        setup: Setup,
    ) -> Self {
        let layers: Vec<LayerInfo> = plan
            .layers
            .iter()
            .map(|l| LayerInfo {
                name: l.name.clone(),
                title: l.display_title().into_owned(),
                state: l.state,
                known_good: l.known_good,
                parent: l.parent.clone(),
                created: l
                    .created
                    .as_ref()
                    .and_then(|d| d.date)
                    .map(|d| d.to_string()),
                digest: l.digest.clone(),
                notes: l.notes.clone(),
                size: size(&l.name),
                tries_left: (l.state == LayerState::Trial)
                    .then(|| plan.boot.trial_boots.saturating_sub(state.tries(&l.name))),
                left_out: resolution.reason(&l.name).map(ToString::to_string),
            })
            .collect();
        let default: Vec<bool> = layers
            .iter()
            .map(|l| resolution.stack.contains(&l.name))
            .collect();
        // Start on the top layer of the default stack: the one a rollback moves away from.
        let cursor = default.iter().position(|&on| on).unwrap_or(0);
        Self {
            selected: default.clone(),
            default,
            layers,
            cursor,
            mode: Mode::Menu,
            countdown: setup.countdown.filter(|&s| s > 0),
            lock: setup.lock,
            unlocked: false,
            shell: setup.shell,
            fallback: setup.fallback,
            message: None,
            ascii: setup.ascii,
            save_refused: setup.save_refused,
            idle: 0,
        }
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    pub fn countdown(&self) -> Option<u32> {
        self.countdown
    }

    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// The selected layers' names, top first.
    pub fn selection(&self) -> Vec<String> {
        self.layers
            .iter()
            .zip(&self.selected)
            .filter(|(_, on)| **on)
            .map(|(l, _)| l.name.clone())
            .collect()
    }

    pub fn is_default(&self) -> bool {
        self.selected == self.default
    }

    fn locked(&self) -> bool {
        self.lock.is_some() && !self.unlocked
    }

    /// One second passed: counts down, and boots the default when the count reaches zero. A
    /// menu left alone for [`IDLE_LIMIT`] seconds starts a countdown of its own.
    pub fn tick(&mut self) -> Option<Action> {
        let Some(left) = self.countdown.as_mut() else {
            self.idle += 1;
            if self.idle >= IDLE_LIMIT {
                self.countdown = Some(IDLE_COUNTDOWN);
            }
            return None;
        };
        *left = left.saturating_sub(1);
        (*left == 0).then_some(Action::BootDefault)
    }

    /// Changes state for a key and returns what to do, if anything.
    pub fn handle_key(&mut self, key: Key) -> Option<Action> {
        // Somebody is there: the countdown stops at the first key.
        self.countdown = None;
        self.idle = 0;
        match self.mode.clone() {
            Mode::Help => {
                self.mode = Mode::Menu;
                None
            }
            Mode::Password { input, then } => self.password_key(input, then, key),
            Mode::Menu => {
                self.message = None;
                self.menu_key(key)
            }
        }
    }

    fn menu_key(&mut self, key: Key) -> Option<Action> {
        let last = self.layers.len().saturating_sub(1);
        match key {
            Key::Up | Key::Char('k') => self.cursor = self.cursor.saturating_sub(1),
            Key::Down | Key::Char('j') => self.cursor = (self.cursor + 1).min(last),
            Key::Home | Key::Char('g') => self.cursor = 0,
            Key::End | Key::Char('G') => self.cursor = last,
            Key::PageUp => self.cursor = self.cursor.saturating_sub(PAGE),
            Key::PageDown => self.cursor = (self.cursor + PAGE).min(last),
            Key::Char('?') => self.mode = Mode::Help,
            Key::Esc => return Some(Action::BootDefault),
            Key::Char('d') => self.selected = self.default.clone(),
            Key::Enter if self.is_default() => return Some(Action::BootDefault),
            Key::Char(' ' | 't' | 's' | '!') | Key::Enter if self.locked() => {
                self.mode = Mode::Password {
                    input: String::new(),
                    then: key,
                };
            }
            Key::Char(' ') => {
                if let Some(on) = self.selected.get_mut(self.cursor) {
                    *on = !*on;
                }
            }
            Key::Char('t') => {
                for (i, on) in self.selected.iter_mut().enumerate() {
                    if i < self.cursor {
                        *on = false;
                    } else if i == self.cursor {
                        *on = true;
                    }
                }
            }
            Key::Char('s') if self.save_refused.is_some() => {
                let why = self.save_refused.as_deref().unwrap_or_default();
                self.message = Some(format!("{why}: Enter boots the selection once"));
            }
            Key::Enter | Key::Char('s') => {
                let layers = self.selection();
                if layers.is_empty() {
                    self.message = Some("select at least one layer to boot".into());
                } else if key == Key::Enter {
                    return Some(Action::BootOnce { layers });
                } else {
                    return Some(Action::SaveAndBoot { layers });
                }
            }
            Key::Char('!') if self.shell => return Some(Action::Shell),
            _ => {}
        }
        None
    }

    fn password_key(&mut self, mut input: String, then: Key, key: Key) -> Option<Action> {
        match key {
            Key::Esc => {
                self.mode = Mode::Menu;
                self.message = Some("locked: only the default can boot".into());
            }
            Key::Enter => {
                if self
                    .lock
                    .as_deref()
                    .is_some_and(|h| verify_password(h, &input))
                {
                    self.unlocked = true;
                    self.mode = Mode::Menu;
                    self.message = None;
                    return self.menu_key(then);
                }
                self.mode = Mode::Password {
                    input: String::new(),
                    then,
                };
                self.message = Some("wrong password".into());
            }
            Key::Backspace => {
                input.pop();
                self.mode = Mode::Password { input, then };
            }
            Key::Char(c) => {
                input.push(c);
                self.mode = Mode::Password { input, then };
            }
            _ => self.mode = Mode::Password { input, then },
        }
        None
    }

    /// What is wrong with the selection, for the person to see before booting it.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let on = |name: &str| {
            self.layers
                .iter()
                .zip(&self.selected)
                .any(|(l, on)| *on && l.name == name)
        };
        for (layer, _) in self
            .layers
            .iter()
            .zip(&self.selected)
            .filter(|(_, on)| **on)
        {
            let Some(parent) = &layer.parent else {
                continue;
            };
            let known = self.layers.iter().any(|l| &l.name == parent);
            if known && !on(parent) {
                warnings.push(format!(
                    "{} was built on {parent}, which is left out",
                    layer.name
                ));
            }
        }
        let any_known_good = self.layers.iter().any(|l| l.known_good);
        let kept = self
            .layers
            .iter()
            .zip(&self.selected)
            .any(|(l, on)| *on && l.known_good);
        if any_known_good && !kept {
            warnings.push("no known-good layer is selected".into());
        }
        if !self.selected.contains(&true) {
            warnings.push("nothing is selected".into());
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layers_spec::lock::hash_password;
    use layers_spec::{BootOverrides, Layer, resolve};

    /// broken (trial) on good on base (known good), each built on the one below.
    fn plan() -> Plan {
        let mut broken = Layer::new("broken");
        broken.state = LayerState::Trial;
        broken.parent = Some("good".into());
        let mut good = Layer::new("good");
        good.parent = Some("base".into());
        good.title = Some("Good upgrade".into());
        let mut base = Layer::new("base");
        base.known_good = true;
        Plan::new(vec![broken, good, base])
    }

    fn app_with(plan: &Plan, setup: Setup) -> App {
        let state = BootState::default();
        let r = resolve(plan, &state, &BootOverrides::default(), None);
        App::new(plan, &r, &state, &|_| None, setup)
    }

    fn app() -> App {
        app_with(&plan(), Setup::default())
    }

    fn keys(app: &mut App, keys: &[Key]) -> Option<Action> {
        keys.iter().fold(None, |_, &k| app.handle_key(k))
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn starts_on_the_default_stack_with_the_cursor_on_its_top() {
        let app = app();
        assert_eq!(app.selection(), names(&["broken", "good", "base"]));
        assert_eq!(app.cursor(), 0);
        assert!(app.is_default());
        assert!(app.warnings().is_empty());
        assert_eq!(app.layers[0].tries_left, Some(3));
    }

    #[test]
    fn arrows_and_vi_keys_move_within_bounds() {
        let mut app = app();
        assert_eq!(keys(&mut app, &[Key::Up]), None);
        assert_eq!(app.cursor(), 0);
        keys(&mut app, &[Key::Down, Key::Char('j'), Key::Down]);
        assert_eq!(app.cursor(), 2);
        keys(&mut app, &[Key::Char('k')]);
        assert_eq!(app.cursor(), 1);
        keys(&mut app, &[Key::Home]);
        assert_eq!(app.cursor(), 0);
        keys(&mut app, &[Key::End]);
        assert_eq!(app.cursor(), 2);
        keys(&mut app, &[Key::PageUp]);
        assert_eq!(app.cursor(), 0);
        keys(&mut app, &[Key::PageDown]);
        assert_eq!(app.cursor(), 2);
        keys(&mut app, &[Key::Char('g')]);
        assert_eq!(app.cursor(), 0);
        keys(&mut app, &[Key::Char('G')]);
        assert_eq!(app.cursor(), 2);
    }

    #[test]
    fn t_makes_the_highlighted_layer_the_top() {
        let mut app = app();
        let action = keys(&mut app, &[Key::Down, Key::Char('t'), Key::Enter]);
        assert_eq!(
            action,
            Some(Action::BootOnce {
                layers: names(&["good", "base"])
            })
        );
        // A disabled layer below the new top stays off; the top itself is switched on.
        let mut plan = plan();
        plan.layers[1].state = LayerState::Disabled;
        let mut app = app_with(&plan, Setup::default());
        assert_eq!(app.selection(), names(&["broken", "base"]));
        keys(&mut app, &[Key::Down, Key::Char('t')]);
        assert_eq!(app.selection(), names(&["good", "base"]));
    }

    #[test]
    fn space_toggles_and_s_saves() {
        let mut app = app();
        keys(&mut app, &[Key::Char(' ')]);
        assert_eq!(app.selection(), names(&["good", "base"]));
        keys(&mut app, &[Key::Char(' ')]);
        assert!(app.is_default());
        let action = keys(&mut app, &[Key::Char(' '), Key::Char('s')]);
        assert_eq!(
            action,
            Some(Action::SaveAndBoot {
                layers: names(&["good", "base"])
            })
        );
    }

    #[test]
    fn enter_on_the_default_and_esc_boot_the_default() {
        assert_eq!(keys(&mut app(), &[Key::Enter]), Some(Action::BootDefault));
        assert_eq!(
            keys(&mut app(), &[Key::Char(' '), Key::Esc]),
            Some(Action::BootDefault)
        );
    }

    #[test]
    fn d_restores_the_default() {
        let mut app = app();
        keys(&mut app, &[Key::Down, Key::Down, Key::Char('t')]);
        assert_eq!(app.selection(), names(&["base"]));
        keys(&mut app, &[Key::Char('d')]);
        assert!(app.is_default());
        assert_eq!(keys(&mut app, &[Key::Enter]), Some(Action::BootDefault));
    }

    #[test]
    fn an_empty_selection_does_not_boot() {
        let mut app = app();
        keys(
            &mut app,
            &[
                Key::Char(' '),
                Key::Down,
                Key::Char(' '),
                Key::Down,
                Key::Char(' '),
            ],
        );
        assert!(app.selection().is_empty());
        assert_eq!(keys(&mut app, &[Key::Enter]), None);
        assert_eq!(app.message(), Some("select at least one layer to boot"));
        assert_eq!(keys(&mut app, &[Key::Char('s')]), None);
        assert!(app.warnings().contains(&"nothing is selected".to_string()));
        // The next key clears the message.
        keys(&mut app, &[Key::Up]);
        assert_eq!(app.message(), None);
    }

    #[test]
    fn help_opens_and_any_key_closes_it() {
        let mut app = app();
        keys(&mut app, &[Key::Char('?')]);
        assert_eq!(app.mode(), &Mode::Help);
        // Keys in the help screen do nothing else.
        assert_eq!(keys(&mut app, &[Key::Esc]), None);
        assert_eq!(app.mode(), &Mode::Menu);
        assert!(app.is_default());
    }

    #[test]
    fn the_shell_is_offered_only_when_allowed() {
        assert_eq!(keys(&mut app(), &[Key::Char('!')]), None);
        let mut app = app_with(
            &plan(),
            Setup {
                shell: true,
                ..Setup::default()
            },
        );
        assert_eq!(keys(&mut app, &[Key::Char('!')]), Some(Action::Shell));
    }

    #[test]
    fn warns_when_a_layer_loses_its_parent_or_no_known_good_remains() {
        let mut app = app();
        keys(&mut app, &[Key::Down, Key::Char(' ')]);
        assert_eq!(
            app.warnings(),
            ["broken was built on good, which is left out"]
        );
        keys(&mut app, &[Key::Char('d'), Key::Down, Key::Char(' ')]);
        assert_eq!(
            app.warnings(),
            [
                "good was built on base, which is left out",
                "no known-good layer is selected"
            ]
        );
        // A parent the plan no longer has (merged away) is not a warning.
        let mut plan = plan();
        plan.layers[2].known_good = false;
        plan.layers[1].parent = Some("gone".into());
        assert!(app_with(&plan, Setup::default()).warnings().is_empty());
    }

    #[test]
    fn the_countdown_boots_the_default_and_a_key_stops_it() {
        let setup = || Setup {
            countdown: Some(2),
            ..Setup::default()
        };
        let mut app = app_with(&plan(), setup());
        assert_eq!(app.tick(), None);
        assert_eq!(app.countdown(), Some(1));
        assert_eq!(app.tick(), Some(Action::BootDefault));

        let mut app = app_with(&plan(), setup());
        keys(&mut app, &[Key::Down]);
        assert_eq!(app.countdown(), None);
        assert_eq!(app.tick(), None);
        assert_eq!(app.tick(), None);
    }

    #[test]
    fn a_menu_left_alone_boots_the_default_in_the_end() {
        let mut app = app();
        for _ in 0..IDLE_LIMIT - 1 {
            assert_eq!(app.tick(), None);
        }
        assert_eq!(app.countdown(), None);
        keys(&mut app, &[Key::Down]);
        for _ in 0..IDLE_LIMIT {
            assert_eq!(app.tick(), None);
        }
        assert_eq!(app.countdown(), Some(IDLE_COUNTDOWN));
        for _ in 1..IDLE_COUNTDOWN {
            assert_eq!(app.tick(), None);
        }
        assert_eq!(app.tick(), Some(Action::BootDefault));
    }

    #[test]
    fn a_refused_save_says_why_and_enter_still_boots_once() {
        let mut app = app_with(
            &plan(),
            Setup {
                save_refused: Some("the plan is damaged".into()),
                ..Setup::default()
            },
        );
        assert_eq!(keys(&mut app, &[Key::Char(' '), Key::Char('s')]), None);
        assert_eq!(
            app.message(),
            Some("the plan is damaged: Enter boots the selection once")
        );
        assert_eq!(
            keys(&mut app, &[Key::Enter]),
            Some(Action::BootOnce {
                layers: names(&["good", "base"])
            })
        );
    }

    #[test]
    fn a_locked_menu_asks_for_the_password_before_any_change() {
        let hash = hash_password("kiosk").unwrap();
        let setup = || Setup {
            lock: Some(hash.clone()),
            shell: true,
            ..Setup::default()
        };
        // The default still boots without it.
        assert_eq!(
            keys(&mut app_with(&plan(), setup()), &[Key::Enter]),
            Some(Action::BootDefault)
        );
        for key in [
            Key::Char(' '),
            Key::Char('t'),
            Key::Char('s'),
            Key::Char('!'),
        ] {
            let mut app = app_with(&plan(), setup());
            assert_eq!(keys(&mut app, &[Key::Down, key]), None);
            assert!(matches!(app.mode(), Mode::Password { .. }), "{key:?}");
            assert_eq!(app.selection(), names(&["broken", "good", "base"]));
        }
        // A wrong password changes nothing; Esc gives up.
        let mut app = app_with(&plan(), setup());
        let typed: Vec<Key> = "nope".chars().map(Key::Char).collect();
        keys(&mut app, &[Key::Down, Key::Char('t')]);
        keys(&mut app, &typed);
        assert_eq!(keys(&mut app, &[Key::Enter]), None);
        assert_eq!(app.message(), Some("wrong password"));
        keys(&mut app, &[Key::Esc]);
        assert_eq!(app.mode(), &Mode::Menu);
        assert!(app.is_default());
        // The right one (after a typo fixed with Backspace) carries out the key that asked.
        keys(&mut app, &[Key::Char('t')]);
        let typed: Vec<Key> = "kiosx".chars().map(Key::Char).collect();
        keys(&mut app, &typed);
        keys(&mut app, &[Key::Backspace, Key::Char('k'), Key::Enter]);
        assert_eq!(app.mode(), &Mode::Menu);
        assert_eq!(app.selection(), names(&["good", "base"]));
        // Unlocked for the rest of this menu.
        assert_eq!(
            keys(&mut app, &[Key::Char('s')]),
            Some(Action::SaveAndBoot {
                layers: names(&["good", "base"])
            })
        );
    }

    #[test]
    fn a_malformed_lock_unlocks_nothing() {
        let mut app = app_with(
            &plan(),
            Setup {
                lock: Some("not a hash".into()),
                ..Setup::default()
            },
        );
        keys(&mut app, &[Key::Char(' '), Key::Char('x'), Key::Enter]);
        assert_eq!(app.message(), Some("wrong password"));
        assert!(app.is_default());
    }

    #[test]
    fn actions_print_as_json() {
        let json = |a: &Action| serde_json::to_string(a).unwrap();
        assert_eq!(json(&Action::BootDefault), r#"{"action":"boot-default"}"#);
        assert_eq!(
            json(&Action::BootOnce {
                layers: names(&["good", "base"])
            }),
            r#"{"action":"boot-once","layers":["good","base"]}"#
        );
        assert_eq!(
            json(&Action::SaveAndBoot {
                layers: names(&["base"])
            }),
            r#"{"action":"save-and-boot","layers":["base"]}"#
        );
        assert_eq!(json(&Action::Shell), r#"{"action":"shell"}"#);
    }
}
