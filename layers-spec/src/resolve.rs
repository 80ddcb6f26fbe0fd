//! From plan, boot state and command line to the stack to mount: a pure function, so the hook,
//! the menu and `overlayctl status` all agree on what the next boot will be.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::cmdline::BootOverrides;
use crate::plan::{Layer, LayerState, Plan, UpperMode};
use crate::state::BootState;

/// The stack one boot mounts, and why every other layer of the plan is not in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// Layer names, top first, in plan order.
    pub stack: Vec<String>,
    /// Every plan layer not in `stack`, in plan order, with the reason.
    pub left_out: Vec<LeftOut>,
    pub upper: UpperMode,
    /// True when the stack came from the boot state's one-shot selection.
    pub one_shot: bool,
    /// Things the user should hear about: ignored overrides, fallbacks, broken parent links.
    pub notes: Vec<Note>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    pub name: String,
    pub reason: Reason,
}

/// Why a layer is not in the stack. When several apply, the first in this order is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `strata.top=` chose a layer below this one.
    AboveTop { top: String },
    /// Named in `strata.disable=`.
    DisabledOnCommandLine,
    /// A one-shot selection is in force and does not include it.
    NotInOneShot,
    /// `strata.stack=` names the stack, without it.
    NotInGivenStack,
    /// `state = "disabled"` in the plan.
    DisabledInPlan,
    /// A trial layer that used all its boots without being accepted.
    TrialExhausted { tries: u32, limit: u32 },
    /// Its directory is not in the store.
    MissingOnDisk,
    /// A layer above it in the stack supersedes it (a pulled image's layer standing in for it).
    SupersededBy { layer: String },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AboveTop { top } => write!(f, "above the chosen top {top:?}"),
            Self::DisabledOnCommandLine => f.write_str("disabled on the kernel command line"),
            Self::NotInOneShot => f.write_str("not in the selection made for this boot"),
            Self::NotInGivenStack => f.write_str("not in the stack strata.stack= names"),
            Self::DisabledInPlan => f.write_str("disabled in the plan"),
            Self::TrialExhausted { tries, limit } => {
                write!(
                    f,
                    "trial boots used up ({tries} of {limit}) without being accepted"
                )
            }
            Self::MissingOnDisk => f.write_str("missing from the store"),
            Self::SupersededBy { layer } => write!(f, "superseded by {layer:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// `strata.top=` names no layer of the plan; it was ignored.
    UnknownTop { name: String },
    /// `strata.disable=` names no layer of the plan.
    UnknownDisabled { name: String },
    /// The one-shot selection names a layer the plan no longer has.
    UnknownInOneShot { name: String },
    /// A layer in the stack was built on one that is left out.
    BuiltOnLeftOut { layer: String, parent: String },
    /// Nothing was left to mount, so the stack is a fallback.
    FellBack { to: Fallback },
    /// Nothing was left to mount and no fallback exists.
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The last stack that booted healthy, from the boot state.
    LastGood,
    /// The plan's known-good layers.
    KnownGood,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownTop { name } => {
                write!(f, "strata.top={name} names no layer of the plan; ignored")
            }
            Self::UnknownDisabled { name } => {
                write!(
                    f,
                    "strata.disable names {name:?}, which is not a layer of the plan"
                )
            }
            Self::UnknownInOneShot { name } => {
                write!(
                    f,
                    "the one-shot selection names {name:?}, which is no longer in the plan"
                )
            }
            Self::BuiltOnLeftOut { layer, parent } => write!(
                f,
                "layer {layer:?} was built on {parent:?}, which is left out; files it expects may be missing"
            ),
            Self::FellBack {
                to: Fallback::LastGood,
            } => f.write_str("every layer was left out; booting the last stack that booted well"),
            Self::FellBack {
                to: Fallback::KnownGood,
            } => f.write_str("every layer was left out; booting the known-good layers"),
            Self::Empty => {
                f.write_str("every layer was left out and no known-good layer is present")
            }
        }
    }
}

impl Resolution {
    /// The trial layers this boot mounts: each uses one try.
    pub fn trials<'a>(&'a self, plan: &'a Plan) -> impl Iterator<Item = &'a str> {
        let trials: HashSet<&str> = plan
            .layers
            .iter()
            .filter(|l| l.state == LayerState::Trial)
            .map(|l| l.name.as_str())
            .collect();
        self.stack
            .iter()
            .map(String::as_str)
            .filter(move |name| trials.contains(name))
    }

    pub fn reason(&self, name: &str) -> Option<&Reason> {
        self.left_out
            .iter()
            .find(|l| l.name == name)
            .map(|l| &l.reason)
    }
}

/// The names, for lookups.
fn set(names: &[String]) -> HashSet<&str> {
    names.iter().map(String::as_str).collect()
}

/// Resolves the stack for one boot.
///
/// Precedence, strongest first: the command line (`strata.stack`, which names the whole stack;
/// `strata.top`, `strata.disable`), then the
/// one-shot selection in the boot state, then the plan's layer states and trial counters. The
/// layer named by `strata.top` is in the stack whatever its state: the person asked for it.
/// `present` says whether a layer's directory exists; without it every layer is taken to exist.
/// When nothing is left, the last good stack and then the known-good layers are used, so the
/// stack is never empty while a known-good layer is present.
pub fn resolve(
    plan: &Plan,
    state: &BootState,
    overrides: &BootOverrides,
    present: Option<&dyn Fn(&str) -> bool>,
) -> Resolution {
    let present = |name: &str| present.is_none_or(|p| p(name));
    let mut notes = Vec::new();
    // Every lookup below by name, so a 500-layer plan resolves in linear time. The first layer
    // of a name wins, as in `Plan::layer`.
    let by_name: HashMap<&str, &Layer> = plan
        .layers
        .iter()
        .rev()
        .map(|l| (l.name.as_str(), l))
        .collect();
    let in_plan = |name: &str| by_name.contains_key(name);

    let top = overrides.top.as_ref().and_then(|name| {
        let position = plan.position(name);
        if position.is_none() {
            notes.push(Note::UnknownTop { name: name.clone() });
        }
        position
    });
    for name in &overrides.disable {
        if !in_plan(name) {
            notes.push(Note::UnknownDisabled { name: name.clone() });
        }
    }
    let once = state.once.as_ref();
    // Chosen before a compaction, it may name layers the compacted one replaced.
    let once_layers = once.map(|o| plan.current_names(&o.layers));
    for name in once_layers.iter().flatten() {
        if !in_plan(name) {
            notes.push(Note::UnknownInOneShot { name: name.clone() });
        }
    }

    let given = overrides.stack.as_deref().map(set);
    let disabled = set(&overrides.disable);
    let once_set = once_layers.as_deref().map(set);
    let mut stack = Vec::new();
    let mut left_out = Vec::new();
    for (i, layer) in plan.layers.iter().enumerate() {
        let name = &layer.name;
        let chosen_top = top == Some(i);
        let reason = if let Some(given) = &given {
            (!given.contains(name.as_str())).then_some(Reason::NotInGivenStack)
        } else if let Some(t) = top.filter(|&t| i < t) {
            Some(Reason::AboveTop {
                top: plan.layers[t].name.clone(),
            })
        } else if disabled.contains(name.as_str()) {
            Some(Reason::DisabledOnCommandLine)
        } else if chosen_top {
            None
        } else if let Some(once) = &once_set {
            (!once.contains(name.as_str())).then_some(Reason::NotInOneShot)
        } else if layer.state == LayerState::Disabled {
            Some(Reason::DisabledInPlan)
        } else if layer.state == LayerState::Trial && state.tries(name) >= plan.boot.trial_boots {
            Some(Reason::TrialExhausted {
                tries: state.tries(name),
                limit: plan.boot.trial_boots,
            })
        } else {
            None
        };
        match reason.or_else(|| (!present(name)).then_some(Reason::MissingOnDisk)) {
            Some(reason) => left_out.push(LeftOut {
                name: name.clone(),
                reason,
            }),
            None => stack.push(name.clone()),
        }
    }

    // A layer in the stack leaves out the layers it supersedes, unless the stack was named
    // whole (`strata.stack=`, a selection made in the menu). Top first, so a layer that is
    // itself superseded supersedes nothing.
    if given.is_none() && once_set.is_none() {
        let mut hidden: HashMap<&str, &str> = HashMap::new();
        let before = stack.len();
        let mut kept = Vec::with_capacity(before);
        for name in stack {
            if let Some(by) = hidden.get(name.as_str()) {
                left_out.push(LeftOut {
                    reason: Reason::SupersededBy {
                        layer: (*by).to_owned(),
                    },
                    name,
                });
                continue;
            }
            if let Some(layer) = by_name.get(name.as_str()) {
                for old in &layer.supersedes {
                    hidden.entry(old.as_str()).or_insert(layer.name.as_str());
                }
            }
            kept.push(name);
        }
        if kept.len() != before {
            // Left out in plan order, as the rest are.
            let at: HashMap<&str, usize> = plan
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| (l.name.as_str(), i))
                .collect();
            left_out.sort_by_key(|l| at.get(l.name.as_str()).copied());
        }
        stack = kept;
    }

    if stack.is_empty() {
        // Recorded before a compaction, it may name layers the compacted one replaced.
        let last_good = &plan.current_names(&state.last_good);
        let usable = |name: &String| in_plan(name) && present(name);
        let (chosen, note): (Vec<&String>, Note) =
            if !last_good.is_empty() && last_good.iter().all(usable) {
                let last_good = set(last_good);
                let chosen = plan
                    .layers
                    .iter()
                    .map(|l| &l.name)
                    .filter(|n| last_good.contains(n.as_str()))
                    .collect();
                (
                    chosen,
                    Note::FellBack {
                        to: Fallback::LastGood,
                    },
                )
            } else {
                let chosen = plan
                    .layers
                    .iter()
                    .filter(|l| l.known_good && present(&l.name))
                    .map(|l| &l.name)
                    .collect();
                (
                    chosen,
                    Note::FellBack {
                        to: Fallback::KnownGood,
                    },
                )
            };
        if chosen.is_empty() {
            notes.push(Note::Empty);
        } else {
            stack = chosen.into_iter().cloned().collect();
            let chosen = set(&stack);
            left_out.retain(|l| !chosen.contains(l.name.as_str()));
            notes.push(note);
        }
    }

    let in_stack = set(&stack);
    for name in &stack {
        if let Some(parent) = by_name.get(name.as_str()).and_then(|l| l.parent.as_ref())
            && !in_stack.contains(parent.as_str())
        {
            notes.push(Note::BuiltOnLeftOut {
                layer: name.clone(),
                parent: parent.clone(),
            });
        }
    }

    Resolution {
        stack,
        left_out,
        upper: overrides
            .upper
            .or(once.and_then(|o| o.upper))
            .unwrap_or(plan.upper.mode),
        one_shot: once.is_some(),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Layer;
    use crate::state::OneShot;

    /// top first: c (trial, on b), b (on a), a (base, known good).
    fn plan() -> Plan {
        let mut c = Layer::new("c");
        c.state = LayerState::Trial;
        c.parent = Some("b".into());
        let mut b = Layer::new("b");
        b.parent = Some("a".into());
        let mut a = Layer::new("a");
        a.known_good = true;
        Plan::new(vec![c, b, a])
    }

    fn cmdline(text: &str) -> BootOverrides {
        let (o, problems) = BootOverrides::parse(text);
        assert!(problems.is_empty(), "{problems:?}");
        o
    }

    fn run(plan: &Plan, state: &BootState, line: &str) -> Resolution {
        resolve(plan, state, &cmdline(line), None)
    }

    fn reasons(r: &Resolution) -> Vec<(&str, Reason)> {
        r.left_out
            .iter()
            .map(|l| (l.name.as_str(), l.reason.clone()))
            .collect()
    }

    #[test]
    fn the_default_stack_is_every_enabled_layer_top_first() {
        let r = run(&plan(), &BootState::default(), "");
        assert_eq!(r.stack, ["c", "b", "a"]);
        assert!(r.left_out.is_empty() && r.notes.is_empty() && !r.one_shot);
        assert_eq!(r.upper, UpperMode::Persistent);
        assert_eq!(r.trials(&plan()).collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn top_leaves_out_everything_above() {
        let r = run(&plan(), &BootState::default(), "strata.top=b");
        assert_eq!(r.stack, ["b", "a"]);
        assert_eq!(reasons(&r), [("c", Reason::AboveTop { top: "b".into() })]);
        assert!(r.notes.is_empty());
    }

    #[test]
    fn the_chosen_top_boots_even_when_disabled_in_the_plan() {
        let mut p = plan();
        p.layers[1].state = LayerState::Disabled;
        assert_eq!(run(&p, &BootState::default(), "").stack, ["c", "a"]);
        assert_eq!(
            run(&p, &BootState::default(), "strata.top=b").stack,
            ["b", "a"]
        );
    }

    #[test]
    fn disabled_layers_are_left_out_with_a_warning_for_what_was_built_on_them() {
        let mut p = plan();
        p.layers[1].state = LayerState::Disabled;
        let r = run(&p, &BootState::default(), "");
        assert_eq!(r.stack, ["c", "a"]);
        assert_eq!(reasons(&r), [("b", Reason::DisabledInPlan)]);
        assert_eq!(
            r.notes,
            [Note::BuiltOnLeftOut {
                layer: "c".into(),
                parent: "b".into()
            }]
        );
        assert!(
            r.notes[0]
                .to_string()
                .contains("\"c\" was built on \"b\", which is left out")
        );
    }

    #[test]
    fn command_line_disable_wins_over_everything() {
        let r = run(
            &plan(),
            &BootState::default(),
            "strata.disable=c,zz strata.top=c",
        );
        assert_eq!(r.stack, ["b", "a"]);
        assert_eq!(reasons(&r), [("c", Reason::DisabledOnCommandLine)]);
        assert_eq!(r.notes, [Note::UnknownDisabled { name: "zz".into() }]);
    }

    #[test]
    fn an_unknown_top_is_ignored_and_reported() {
        let r = run(&plan(), &BootState::default(), "strata.top=nope");
        assert_eq!(r.stack, ["c", "b", "a"]);
        assert_eq!(
            r.notes,
            [Note::UnknownTop {
                name: "nope".into()
            }]
        );
    }

    #[test]
    fn trial_layers_drop_out_when_their_tries_are_used() {
        let mut state = BootState::default();
        state.trial_tries.insert("c".into(), 2);
        assert_eq!(run(&plan(), &state, "").stack, ["c", "b", "a"]);
        state.trial_tries.insert("c".into(), 3);
        let r = run(&plan(), &state, "");
        assert_eq!(r.stack, ["b", "a"]);
        assert_eq!(
            reasons(&r),
            [("c", Reason::TrialExhausted { tries: 3, limit: 3 })]
        );
        assert_eq!(
            r.left_out[0].reason.to_string(),
            "trial boots used up (3 of 3) without being accepted"
        );
        // Accepted layers are not counted.
        let mut p = plan();
        p.layers[0].state = LayerState::Active;
        assert_eq!(run(&p, &state, "").stack, ["c", "b", "a"]);
    }

    #[test]
    fn a_given_stack_is_the_stack_whatever_the_states() {
        let mut p = plan();
        p.layers[0].state = LayerState::Trial;
        p.layers[1].state = LayerState::Disabled;
        let mut state = BootState::default();
        state.trial_tries.insert("c".into(), 99);
        let r = run(&p, &state, "strata.stack=c,b strata.top=a strata.disable=b");
        assert_eq!(
            r.stack,
            ["c", "b"],
            "named by the kexec'd pass: nothing else counts"
        );
        assert_eq!(reasons(&r), [("a", Reason::NotInGivenStack)]);
    }

    /// A pulled image v2 (e2 on d2 on b) over the stack of v1 (c on b on a): e2 and d2
    /// supersede c. While either is in the stack c is out; when both are out, c is back.
    #[test]
    fn superseded_layers_come_back_when_the_layers_that_stand_in_for_them_go() {
        let mut p = plan();
        p.layers[0].state = LayerState::Active;
        let new = |name: &str, parent: &str| {
            let mut l = Layer::new(name);
            l.state = LayerState::Trial;
            l.parent = Some(parent.into());
            l.supersedes = vec!["c".into()];
            l
        };
        p.layers.insert(0, new("d2", "b"));
        p.layers.insert(0, new("e2", "d2"));
        let mut state = BootState::default();
        let r = run(&p, &state, "");
        assert_eq!(r.stack, ["e2", "d2", "b", "a"]);
        assert_eq!(
            reasons(&r),
            [("c", Reason::SupersededBy { layer: "e2".into() })]
        );
        // The menu leaves out the top one: its layer below still stands in for c.
        let r = run(&p, &state, "strata.disable=e2");
        assert_eq!(r.stack, ["d2", "b", "a"]);
        assert_eq!(
            reasons(&r),
            [
                ("e2", Reason::DisabledOnCommandLine),
                ("c", Reason::SupersededBy { layer: "d2".into() })
            ]
        );
        // The trial ran out: the old stack comes back whole.
        state.trial_tries.insert("e2".into(), 3);
        state.trial_tries.insert("d2".into(), 3);
        let r = run(&p, &state, "");
        assert_eq!(r.stack, ["c", "b", "a"]);
        // Choosing c as the top, or naming the stack, is what the person asked for.
        state.trial_tries.clear();
        assert_eq!(run(&p, &state, "strata.top=c").stack, ["c", "b", "a"]);
        assert_eq!(
            run(&p, &state, "strata.stack=e2,c,a").stack,
            ["e2", "c", "a"]
        );
        // A superseded layer supersedes nothing: x (superseded by e2) cannot hide b.
        let mut x = Layer::new("x");
        x.supersedes = vec!["b".into()];
        p.layers.insert(2, x);
        p.layers[0].supersedes.push("x".into());
        assert_eq!(run(&p, &state, "").stack, ["e2", "d2", "b", "a"]);
    }

    #[test]
    fn a_one_shot_selection_replaces_the_plan_states() {
        let mut p = plan();
        p.layers[1].state = LayerState::Disabled;
        let state = BootState {
            once: Some(OneShot {
                layers: vec!["a".into(), "b".into(), "gone".into()],
                upper: Some(UpperMode::Tmpfs),
            }),
            ..BootState::default()
        };
        let r = run(&p, &state, "");
        assert_eq!(
            r.stack,
            ["b", "a"],
            "plan order, disabled b chosen explicitly"
        );
        assert_eq!(reasons(&r), [("c", Reason::NotInOneShot)]);
        assert_eq!(
            r.notes,
            [Note::UnknownInOneShot {
                name: "gone".into()
            }]
        );
        assert!(r.one_shot);
        assert_eq!(r.upper, UpperMode::Tmpfs);
        // The command line still wins over it.
        assert_eq!(
            run(&p, &state, "strata.upper=persistent").upper,
            UpperMode::Persistent
        );
        assert_eq!(run(&p, &state, "strata.disable=b").stack, ["a"]);
    }

    #[test]
    fn stacks_recorded_before_a_compaction_name_the_compacted_layer() {
        // x on c+b (which replaced c and b) on a.
        let mut merged = Layer::new("c+b");
        merged.replaces = vec!["c".into(), "b".into()];
        let p = Plan::new(vec![Layer::new("x"), merged, Layer::new("a")]);
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            p.current_names(&names(&["x", "c", "b", "a"])),
            ["x", "c+b", "a"]
        );
        // Part of the run cannot be said with the new layer.
        assert_eq!(p.current_names(&names(&["b", "a"])), ["b", "a"]);
        // After a boot of x, c, b, a: merging or adding is no rollback, leaving out x is.
        let before = names(&["x", "c", "b", "a"]);
        assert!(
            p.left_out_since(&before, &names(&["x", "c+b", "a"]))
                .is_empty()
        );
        assert!(
            p.left_out_since(&before, &names(&["cp", "x", "c+b", "a"]))
                .is_empty()
        );
        assert_eq!(p.left_out_since(&before, &names(&["c+b", "a"])), ["x"]);
        assert_eq!(p.left_out_since(&before, &names(&["a"])), ["x", "c", "b"]);
        // Booted b, a; then c added and c, b merged: no rollback unless c+b is left out.
        assert!(
            p.left_out_since(&names(&["b", "a"]), &names(&["x", "c+b", "a"]))
                .is_empty()
        );
        assert_eq!(p.left_out_since(&names(&["b", "a"]), &names(&["a"])), ["b"]);
        // Removed since (unknown to the plan, nothing replaced it): left out.
        assert_eq!(p.left_out_since(&names(&["z", "a"]), &names(&["a"])), ["z"]);
        let state = BootState {
            once: Some(OneShot {
                layers: names(&["x", "c", "b", "a"]),
                upper: None,
            }),
            last_good: names(&["c", "b", "a"]),
            ..BootState::default()
        };
        assert_eq!(run(&p, &state, "").stack, ["x", "c+b", "a"]);
        // With nothing selected, the last good stack, in the new names, is the fallback.
        let state = BootState {
            last_good: names(&["c", "b", "a"]),
            ..BootState::default()
        };
        let r = run(&p, &state, "strata.disable=x,c+b,a");
        assert_eq!(r.stack, ["c+b", "a"]);
    }

    #[test]
    fn missing_layers_are_left_out() {
        let present = |name: &str| name != "b";
        let r = resolve(
            &plan(),
            &BootState::default(),
            &BootOverrides::default(),
            Some(&present),
        );
        assert_eq!(r.stack, ["c", "a"]);
        assert_eq!(reasons(&r), [("b", Reason::MissingOnDisk)]);
    }

    #[test]
    fn an_empty_selection_falls_back_to_last_good_then_known_good() {
        let mut state = BootState::default();
        let r = run(&plan(), &state, "strata.disable=a,b,c");
        assert_eq!(r.stack, ["a"]);
        assert_eq!(
            r.notes,
            [Note::FellBack {
                to: Fallback::KnownGood
            }]
        );
        assert_eq!(
            reasons(&r),
            [
                ("c", Reason::DisabledOnCommandLine),
                ("b", Reason::DisabledOnCommandLine)
            ]
        );

        state.last_good = vec!["a".into(), "b".into()];
        let r = run(&plan(), &state, "strata.disable=a,b,c");
        assert_eq!(r.stack, ["b", "a"]);
        assert_eq!(
            r.notes,
            [Note::FellBack {
                to: Fallback::LastGood
            }]
        );

        // A last good stack with a layer that is gone is not used.
        let present = |name: &str| name != "b";
        let r = resolve(
            &plan(),
            &state,
            &cmdline("strata.disable=a,b,c"),
            Some(&present),
        );
        assert_eq!(r.stack, ["a"]);
        assert_eq!(
            r.notes,
            [Note::FellBack {
                to: Fallback::KnownGood
            }]
        );

        // Nothing known good and nothing left: an empty stack, said so.
        let mut p = plan();
        p.layers[2].known_good = false;
        let r = run(&p, &BootState::default(), "strata.disable=a,b,c");
        assert!(r.stack.is_empty());
        assert_eq!(r.notes, [Note::Empty]);
        assert_eq!(r.left_out.len(), 3);
    }

    #[test]
    fn upper_mode_comes_from_the_command_line_then_the_plan() {
        let mut p = plan();
        p.upper.mode = UpperMode::Tmpfs;
        assert_eq!(run(&p, &BootState::default(), "").upper, UpperMode::Tmpfs);
        assert_eq!(
            run(&p, &BootState::default(), "strata.upper=persistent").upper,
            UpperMode::Persistent
        );
    }
}
