//! The Strata boot menu. [`App`] is the state machine (keys in, actions out), drawn by
//! `impl Widget for &App`; [`term`] runs it on a real terminal, and [`describe`] is the plain
//! summary logged when no terminal is there.

pub mod app;
pub mod cli;
mod render;
pub mod term;

pub use app::{Action, App, Key, LayerInfo, Mode, Setup};
pub use layers_spec::lock::{hash_password, verify_password};

use std::fmt::Write;

use layers_spec::{LayerState, Plan, Resolution};

/// A few lines for a console: the layers top first, `*` on those that will be mounted.
pub fn describe(plan: &Plan, resolution: &Resolution) -> String {
    let mut text = String::from("strata: layers, top first (* = mounted this boot)\n");
    for layer in &plan.layers {
        let mounted = resolution.stack.contains(&layer.name);
        let mut line = format!(
            "  {} {} \"{}\"",
            if mounted { '*' } else { ' ' },
            layer.name,
            layer.display_title()
        );
        if layer.state == LayerState::Trial {
            line.push_str(" [trial]");
        }
        if layer.known_good {
            line.push_str(" [known good]");
        }
        if let Some(reason) = resolution.reason(&layer.name) {
            let _ = write!(line, " - {reason}");
        }
        text.push_str(&line);
        text.push('\n');
    }
    for note in &resolution.notes {
        let _ = writeln!(text, "strata: {note}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use layers_spec::{BootOverrides, BootState, Layer, resolve};

    #[test]
    fn marks_the_stack_and_says_why_the_rest_is_out() {
        let mut top = Layer::new("upgrade-2");
        top.state = LayerState::Trial;
        let mut base = Layer::new("base");
        base.known_good = true;
        base.title = Some("Core System Image".into());
        let plan = Plan::new(vec![top, base]);
        let (overrides, _) = BootOverrides::parse("strata.top=base");
        let r = resolve(&plan, &BootState::default(), &overrides, None);
        assert_eq!(
            describe(&plan, &r),
            "strata: layers, top first (* = mounted this boot)\n\
             \x20   upgrade-2 \"upgrade-2\" [trial] - above the chosen top \"base\"\n\
             \x20 * base \"Core System Image\" [known good]\n"
        );
    }
}
