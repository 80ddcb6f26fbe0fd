//! Property tests: what is written reads back as itself, and resolution keeps its promises for
//! any plan, boot state, command line and set of layers on disk.

use std::collections::BTreeSet;

use layers_spec::resolve::Note;
use layers_spec::{
    BootOverrides, BootSettings, BootState, ByteSize, Datetime, Layer, LayerState, MenuMode,
    OnRollback, OneShot, Plan, Policy, Reason, UpperMode, UpperSettings, check_name, legacy,
    resolve,
};
use proptest::prelude::*;
use proptest::sample::subsequence;

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,24}".prop_filter("no `..`", |n| check_name(n).is_ok())
}

fn names(max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set(name(), 1..=max).prop_shuffle_vec()
}

trait ShuffleVec {
    fn prop_shuffle_vec(self) -> BoxedStrategy<Vec<String>>;
}
impl<S: Strategy<Value = BTreeSet<String>> + 'static> ShuffleVec for S {
    fn prop_shuffle_vec(self) -> BoxedStrategy<Vec<String>> {
        self.prop_map(|set| set.into_iter().collect::<Vec<_>>())
            .prop_shuffle()
            .boxed()
    }
}

fn state() -> impl Strategy<Value = LayerState> {
    prop_oneof![
        Just(LayerState::Active),
        Just(LayerState::Trial),
        Just(LayerState::Disabled)
    ]
}

/// Free text: quotes, backslashes, commas, `=`, newlines, non-ASCII.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ,=\"'\\\\#;\n\té→\u{1F600}]{0,30}"
}

fn datetime() -> impl Strategy<Value = Datetime> {
    (
        1990u32..2100,
        1u32..=12,
        1u32..=28,
        0u32..24,
        0u32..60,
        any::<bool>(),
    )
        .prop_map(|(y, mo, d, h, mi, date_only)| {
            let text = if date_only {
                format!("{y:04}-{mo:02}-{d:02}")
            } else {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:00Z")
            };
            text.parse().unwrap()
        })
}

prop_compose! {
    fn layer_fields()(
        state in state(),
        known_good in any::<bool>(),
        title in proptest::option::of(text()),
        created in proptest::option::of(datetime()),
        digest in proptest::option::of("[0-9a-f]{64}"),
        notes in proptest::option::of(text()),
        parent_pick in proptest::option::of(any::<prop::sample::Index>()),
    ) -> (LayerState, bool, Option<String>, Option<Datetime>, Option<String>, Option<String>, Option<prop::sample::Index>) {
        (state, known_good, title, created, digest.map(|d| format!("blake3:{d}")), notes, parent_pick)
    }
}

prop_compose! {
    /// A valid plan: unique names, parents always below their layer.
    fn plan()(names in names(8))(
        fields in prop::collection::vec(layer_fields(), names.len()),
        names in Just(names),
        menu in prop_oneof![Just(MenuMode::Always), Just(MenuMode::OnKey), Just(MenuMode::OnFailure), Just(MenuMode::Never)],
        timeout_s in 0u32..=3600,
        trial_boots in 1u32..6,
        menu_lock in proptest::option::of(proptest::sample::select(vec![
            "$argon2id$v=19$m=19456,t=2,p=1$YQK1Ld7JlDzBPceCvX4v4A$fwBKyfLwTkgUrD3Dq7njdmSX1K7Upf//sFp55ru9t28".to_owned(),
            "$argon2id$v=19$m=19456,t=2,p=1$MdMW+kndMtyqxhXCyHPbKA$1P/Zoc3DhPbG23O8Wg/CT9NJrGjp6DvDcnFTaFj14OI".to_owned(),
        ])),
        mode in prop_oneof![Just(UpperMode::Persistent), Just(UpperMode::Tmpfs)],
        on_rollback in prop_oneof![Just(OnRollback::Carry), Just(OnRollback::Fresh)],
        max_layers in 1u32..=500,
        min_free in any::<u64>(),
        keep_known_good in any::<bool>(),
        drop_disabled_after in proptest::option::of(0u64..10_000_000),
    ) -> Plan {
        let count = names.len();
        let layers = names.iter().zip(fields).enumerate().map(|(i, (name, f))| {
            let (state, known_good, title, created, digest, notes, parent_pick) = f;
            let below = count - i - 1;
            let parent = parent_pick.filter(|_| below > 0).map(|p| names[i + 1 + p.index(below)].clone());
            // Compacted layers name what they replaced (layers no longer in the plan).
            let replaces = if i % 3 == 0 { vec![format!("merged-{i}a"), format!("merged-{i}b")] } else { vec![] };
            let disabled_at = if state == LayerState::Disabled { created } else { None };
            // Pulled layers stand in for the layers below them, and carry their OCI diff_id.
            let supersedes = if i % 4 == 1 { names[i + 1..].iter().take(2).cloned().collect() } else { vec![] };
            let diff_id = (i % 5 == 2).then(|| format!("sha256:{:064x}", i));
            Layer { name: name.clone(), title, state, known_good, parent, created, digest, notes, disabled_at, replaces, supersedes, diff_id, release: (i % 6 == 3).then(|| "rel-2".to_owned()) }
        }).collect();
        Plan {
            version: 1,
            boot: BootSettings { menu, timeout_s, trial_boots, menu_lock },
            upper: UpperSettings { mode, on_rollback },
            policy: Policy { max_layers, min_free: ByteSize(min_free), keep_known_good, drop_disabled_after: drop_disabled_after.map(layers_spec::Age) },
            layers,
        }
    }
}

/// A plan, and boot state, overrides and a presence set that refer to its layers (and a few
/// names it does not have).
fn scenario() -> impl Strategy<Value = (Plan, BootState, BootOverrides, BTreeSet<String>)> {
    plan()
        .prop_flat_map(|plan| {
            let mut pool: Vec<String> = plan.layers.iter().map(|l| l.name.clone()).collect();
            pool.push("not-in-plan".into());
            let n = pool.len();
            (
                Just(plan),
                prop::collection::btree_map(prop::sample::select(pool.clone()), 0u32..6, 0..n),
                proptest::option::of(subsequence(pool.clone(), 0..=n)),
                subsequence(pool.clone(), 0..=n),
                proptest::option::of(prop::sample::select(pool.clone())),
                subsequence(pool.clone(), 0..=n),
                subsequence(pool, 0..=n),
            )
        })
        .prop_map(|(plan, tries, once, last_good, top, disable, present)| {
            let state = BootState {
                trial_tries: tries,
                once: once.map(|layers| OneShot {
                    layers,
                    upper: None,
                }),
                last_good,
                ..BootState::default()
            };
            let overrides = BootOverrides {
                top,
                disable,
                ..BootOverrides::default()
            };
            (plan, state, overrides, present.into_iter().collect())
        })
}

proptest! {
    // Failures print the shrunk case; nothing is written into the source tree.
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn plans_round_trip_through_toml(plan in plan()) {
        let text = plan.to_toml().unwrap();
        let back = Plan::parse(&text, "p").map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &plan);
        prop_assert_eq!(back.to_toml().unwrap(), text);
    }

    #[test]
    fn boot_state_round_trips((_plan, state, _o, _p) in scenario()) {
        let text = state.to_toml().unwrap();
        prop_assert_eq!(BootState::parse(&text, "s").unwrap(), state);
    }

    #[test]
    fn no_input_makes_the_parsers_panic(text in "\\PC{0,200}") {
        let _ = Plan::parse(&text, "p");
        let _ = BootState::parse(&text, "s");
        let _ = legacy::import(&text, "l");
        let _ = BootOverrides::parse(&text);
    }

    #[test]
    fn mangled_plans_fail_cleanly_or_parse_validly(plan in plan(), cut in any::<prop::sample::Index>(), junk in "[\\[\\]=\"a-z\n .]{0,8}") {
        let text = plan.to_toml().unwrap();
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) { at -= 1; }
        let mangled = format!("{}{junk}{}", &text[..at], &text[at..]);
        match Plan::parse(&mangled, "p") {
            Ok(parsed) => prop_assert!(parsed.check().is_ok()),
            Err(e) => {
                let at = e.location().expect("located");
                prop_assert!(at.line >= 1 && at.line <= mangled.lines().count().max(1) + 1, "{e}");
            }
        }
    }

    #[test]
    fn legacy_files_import_in_order_with_titles(
        layers in names(8).prop_flat_map(|names| {
            let n = names.len();
            (Just(names), prop::collection::vec(("[a-zA-Z0-9 ,=\"'\\\\;#!]{1,20}", any::<bool>(), " {0,2}", any::<bool>()), n))
        }),
        crlf in any::<bool>(),
    ) {
        let (names, details) = layers;
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = format!("# exported from an XO{eol}[Layers]{eol}");
        for (name, (title, ro, pad, comment)) in names.iter().zip(&details) {
            let quoted = title.replace('\\', "\\\\").replace('"', "\\\"");
            text += &format!("{name}{pad}={pad}\"{quoted}\"{}{eol}", if *ro { format!("{pad},{pad}ro") } else { String::new() });
            if *comment { text += &format!("; {title}{eol}"); }
        }
        let plan = legacy::import(&text, "l").map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(plan.layers.len(), names.len());
        for ((layer, name), (title, ro, _, _)) in plan.layers.iter().zip(&names).zip(&details) {
            prop_assert_eq!(&layer.name, name);
            prop_assert_eq!(layer.title.as_deref(), Some(title.as_str()));
            prop_assert_eq!(layer.state, if *ro { LayerState::Active } else { LayerState::Trial });
        }
    }

    #[test]
    fn command_lines_round_trip(
        top in proptest::option::of(name()),
        disable in prop::collection::vec(name(), 0..4),
        menu in any::<bool>(), debug in any::<bool>(),
        upper in proptest::option::of(prop_oneof![Just(UpperMode::Persistent), Just(UpperMode::Tmpfs)]),
        quote in any::<bool>(),
    ) {
        let q = |s: String| if quote { format!("\"{s}\"") } else { s };
        let mut words = vec!["BOOT_IMAGE=/vmlinuz".to_owned(), "root=/dev/vda1".into(), "ro".into()];
        if let Some(t) = &top { words.push(q(format!("strata.top={t}"))); }
        let mut unique: Vec<String> = Vec::new();
        for d in &disable { if !unique.contains(d) { unique.push(d.clone()); } }
        if !unique.is_empty() { words.push(format!("strata.disable={}", q(unique.join(",")))); }
        if menu { words.push("strata.menu".into()); }
        if debug { words.push("strata.debug=1".into()); }
        if let Some(u) = upper { words.push(format!("strata.upper={}", if u == UpperMode::Tmpfs { "tmpfs" } else { "persistent" })); }
        let (parsed, problems) = BootOverrides::parse(&words.join(" "));
        prop_assert!(problems.is_empty(), "{:?}", problems);
        prop_assert_eq!(parsed, BootOverrides { top, disable: unique, menu, upper, store: None, debug, stack: None });
    }

    #[test]
    fn resolve_keeps_its_promises((plan, state, overrides, present) in scenario()) {
        let is_present = |name: &str| present.contains(name);
        let r = resolve(&plan, &state, &overrides, Some(&is_present));
        let position = |name: &str| plan.position(name).expect("only plan layers");

        // The stack keeps the plan's order, and with the left-out layers covers the plan once.
        let positions: Vec<usize> = r.stack.iter().map(|n| position(n)).collect();
        prop_assert!(positions.windows(2).all(|w| w[0] < w[1]), "order {:?}", r.stack);
        let left: Vec<usize> = r.left_out.iter().map(|l| position(&l.name)).collect();
        prop_assert!(left.windows(2).all(|w| w[0] < w[1]));
        let mut all: Vec<usize> = positions.iter().chain(&left).copied().collect();
        all.sort_unstable();
        prop_assert_eq!(all, (0..plan.layers.len()).collect::<Vec<_>>());

        // Nothing missing from the store is ever mounted.
        prop_assert!(r.stack.iter().all(|n| present.contains(n)));

        let fell_back = r.notes.iter().any(|n| matches!(n, Note::FellBack { .. }));
        let top = overrides.top.as_deref().and_then(|t| plan.position(t));
        if !fell_back {
            for name in &r.stack {
                let layer = plan.layer(name).unwrap();
                let i = position(name);
                // Disabled on the command line: never. Above the top: never.
                prop_assert!(!overrides.disable.contains(name));
                prop_assert!(top.is_none_or(|t| i >= t), "{} above top", name);
                let chosen = top == Some(i) || state.once.as_ref().is_some_and(|o| o.layers.contains(name));
                // Disabled in the plan, or out of trial tries: only when chosen explicitly.
                if !chosen {
                    prop_assert!(layer.state != LayerState::Disabled, "{} is disabled", name);
                    prop_assert!(!(layer.state == LayerState::Trial && state.tries(name) >= plan.boot.trial_boots));
                }
            }
            if let Some(t) = top {
                for l in &r.left_out[..] {
                    if position(&l.name) < t {
                        prop_assert_eq!(&l.reason, &Reason::AboveTop { top: plan.layers[t].name.clone() });
                    }
                }
            }
        }

        // Never empty while a known-good layer is present.
        let known_good_present = plan.layers.iter().any(|l| l.known_good && present.contains(&l.name));
        if known_good_present {
            prop_assert!(!r.stack.is_empty());
        }
        prop_assert_eq!(r.stack.is_empty(), r.notes.contains(&Note::Empty));
    }
}
