//! Boot state (`state/boot.toml`): what the hook and the menu remember between boots, apart from
//! the plan so that a boot never has to rewrite the plan just to count.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::value::Datetime;

use crate::error::{Location, PlanError};
use crate::name::check_name;
use crate::plan::{PLAN_VERSION, UpperMode, check_version};

/// Everything the next boot needs to know about earlier ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootState {
    pub version: u32,
    /// The last stack (top first) that booted and was confirmed healthy; the first fallback.
    #[serde(
        default,
        deserialize_with = "crate::name::de_layer_names",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub last_good: Vec<String>,
    /// A selection made in the menu for the next boot only; the hook clears it once used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub once: Option<OneShot>,
    /// Boots already tried, per trial layer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trial_tries: BTreeMap<String, u32>,
    /// The persistent upper in use (`uppers/<id>/`); the hook starts with `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_upper: Option<String>,
    /// The stack the current persistent upper was last mounted over, top first (a tmpfs
    /// boot in between does not change it): what a rollback is judged against.
    #[serde(
        default,
        deserialize_with = "crate::name::de_layer_names",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub upper_stack: Vec<String>,
    /// What the previous boot mounted, and why it fell back if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_boot: Option<LastBoot>,
    /// `overlayctl checkpoint`: at the next boot the hook freezes this upper into a layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// Uppers a rollback set aside (`[upper] on_rollback = "fresh"`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archived_uppers: Vec<ArchivedUpper>,
    /// Layers a change is putting into `layers/` before the plan names them. Recorded before
    /// the layer's directory is made, dropped once the plan names it; a claim the plan never
    /// came to name was cut short, and its directory is deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claimed: Vec<StoreRecord>,
    /// Layers a command let go (`remove`, a compaction's replaced layers, the policy).
    /// Recorded before the plan stops naming them; each is deleted once nothing needs it (the
    /// running boot, the last good stack, a one-shot selection). Nothing else in `layers/` is
    /// ever deleted: a directory nobody recorded is kept and shown as not in the plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<StoreRecord>,
}

/// A layer named in the store's journal ([`BootState::claimed`], [`BootState::released`]),
/// and the command that did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRecord {
    #[serde(deserialize_with = "crate::name::de_layer_name")]
    pub layer: String,
    pub by: String,
}

impl StoreRecord {
    pub fn new(layer: impl Into<String>, by: impl Into<String>) -> Self {
        Self {
            layer: layer.into(),
            by: by.into(),
        }
    }
}

/// A persistent upper a rollback set aside: kept with the stack it was last used over, so
/// `overlayctl mount --upper ID` can show what was changed there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchivedUpper {
    #[serde(deserialize_with = "crate::name::de_layer_name")]
    pub id: String,
    /// Top first.
    #[serde(deserialize_with = "crate::name::de_layer_names")]
    pub layers: Vec<String>,
}

/// An upper to freeze into a read-only layer at the next boot. The hook renames it into
/// `layers/` and sets `frozen`; the next `overlayctl` command that changes the store writes the
/// layer's manifest and digest (the hook does not hash files) and drops the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The layer it becomes.
    #[serde(deserialize_with = "crate::name::de_layer_name")]
    pub layer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The upper (`uppers/<id>/`) it freezes; an id follows the layer-name rule.
    #[serde(deserialize_with = "crate::name::de_layer_name")]
    pub upper: String,
    /// The top of the stack the upper was used over: the new layer's parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frozen: bool,
}

/// A one-shot selection: exactly these layers (in plan order), for one boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneShot {
    #[serde(deserialize_with = "crate::name::de_layer_names")]
    pub layers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<UpperMode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastBoot {
    #[serde(deserialize_with = "crate::name::de_layer_names")]
    pub layers: Vec<String>,
    /// Why the boot did not mount the stack it resolved, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Datetime>,
}

impl Default for BootState {
    fn default() -> Self {
        Self {
            version: PLAN_VERSION,
            last_good: Vec::new(),
            once: None,
            trial_tries: BTreeMap::new(),
            current_upper: None,
            upper_stack: Vec::new(),
            last_boot: None,
            checkpoint: None,
            archived_uppers: Vec::new(),
            claimed: Vec::new(),
            released: Vec::new(),
        }
    }
}

impl BootState {
    /// Parses boot state; layer names in it are checked like the plan's, since the hook turns
    /// them into paths.
    pub fn parse(text: &str, file: &str) -> Result<Self, PlanError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // One read when the state is good (a boot reads it every time). When it is not, or its
        // version is not this one, the version is judged first, as for the plan.
        let state: Self = match toml::from_str(text) {
            Ok(state) => state,
            Err(e) => {
                check_version(text, file)?;
                return Err(PlanError::from_toml(file, text, &e));
            }
        };
        if state.version != PLAN_VERSION {
            check_version(text, file)?;
        }
        let names = state.trial_tries.keys().chain(state.current_upper.as_ref());
        if names.map(|n| check_name(n)).all(|checked| checked.is_ok()) {
            return Ok(state);
        }
        // Map keys carry no span of their own through serde: a second read finds the bad one.
        #[derive(Deserialize)]
        struct KeySpans {
            #[serde(default)]
            trial_tries: BTreeMap<Spanned<String>, IgnoredAny>,
            current_upper: Option<Spanned<String>>,
        }
        let keys: KeySpans =
            toml::from_str(text).map_err(|e| PlanError::from_toml(file, text, &e))?;
        for key in keys.trial_tries.keys().chain(keys.current_upper.as_ref()) {
            check_name(key.get_ref()).map_err(|problem| PlanError::BadName {
                at: Location::of_span(file, text, Some(key.span())),
                name: key.get_ref().clone(),
                problem,
            })?;
        }
        Ok(state)
    }

    pub fn to_toml(&self) -> Result<String, PlanError> {
        let body = toml::to_string_pretty(self).map_err(|e| PlanError::Unwritable {
            what: "boot state",
            message: e.to_string(),
        })?;
        Ok(format!(
            "# Strata boot state: written by the boot hook and the menu.\n{body}"
        ))
    }

    /// Validates boot state built in memory and returns the text it is written as.
    pub fn check(&self) -> Result<String, PlanError> {
        let text = self.to_toml()?;
        if &Self::parse(&text, "(boot state to be written)")? != self {
            return Err(PlanError::Unwritable {
                what: "boot state",
                message: "it does not read back as itself".into(),
            });
        }
        Ok(text)
    }

    /// Whether the journal records `name` as claimed or released.
    pub fn journals(&self, name: &str) -> bool {
        self.claimed
            .iter()
            .chain(&self.released)
            .any(|r| r.layer == name)
    }

    /// Records that `by` lets the layer `name` go (once: a second record is not added).
    pub fn release(&mut self, name: &str, by: &str) {
        if !self.released.iter().any(|r| r.layer == name) {
            self.released.push(StoreRecord::new(name, by));
        }
    }

    /// Boots tried so far by a trial layer.
    pub fn tries(&self, layer: &str) -> u32 {
        self.trial_tries.get(layer).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> BootState {
        BootState {
            version: 1,
            last_good: vec!["b".into(), "base".into()],
            once: Some(OneShot {
                layers: vec!["base".into()],
                upper: Some(UpperMode::Tmpfs),
            }),
            trial_tries: [("a.1+x".to_owned(), 2)].into(),
            current_upper: Some("3".into()),
            upper_stack: vec!["b".into(), "base".into()],
            last_boot: Some(LastBoot {
                layers: vec!["a.1+x".into(), "b".into(), "base".into()],
                fallback: Some("mount of the resolved stack failed: EINVAL".into()),
                at: Some("2026-11-22T03:00:00Z".parse().unwrap()),
            }),
            checkpoint: Some(Checkpoint {
                layer: "checkpoint-1".into(),
                title: Some("Before the upgrade".into()),
                upper: "3".into(),
                parent: Some("a.1+x".into()),
                frozen: true,
            }),
            archived_uppers: vec![ArchivedUpper {
                id: "2".into(),
                layers: vec!["b".into(), "base".into()],
            }],
            claimed: vec![StoreRecord::new("new-1", "add-layer")],
            released: vec![StoreRecord::new("old-1", "remove")],
        }
    }

    /// The example in the README's "Boot state" section is a valid state file.
    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("### Boot state").expect("the section")..];
        let start = section.find("```toml\n").expect("its example") + 8;
        let text = &section[start..start + section[start..].find("```").unwrap()];
        let state = BootState::parse(text, "README.md").unwrap();
        assert_eq!(state.archived_uppers[0].layers.len(), 3);
        assert_eq!(
            state.checkpoint.unwrap().parent.as_deref(),
            Some("upgrade-1")
        );
    }

    #[test]
    fn round_trips() {
        for state in [BootState::default(), full()] {
            let text = state.to_toml().unwrap();
            assert_eq!(BootState::parse(&text, "s").unwrap(), state, "{text}");
        }
    }

    #[test]
    fn default_state_is_just_a_version() {
        assert_eq!(
            BootState::parse("version = 1\n", "s").unwrap(),
            BootState::default()
        );
    }

    #[test]
    fn bad_state_is_located() {
        let cases = [
            ("version = 1\nlast_good = [\"ok\", \"../x\"]\n", "s:2:"),
            ("version = 1\n[once]\nlayers = [\"a/b\"]\n", "s:3:"),
            (
                "version = 1\n[trial_tries]\nok = 1\n\"../../etc\" = 1\n",
                "s:4:1: layer name \"../../etc\" is not valid",
            ),
            ("version = 1\nbogus = 1\n", "s:2:1: unknown key `bogus`"),
            ("version = 2\n", "s:1:11: version 2 is not supported"),
            ("last_good = []\n", "s:1:1: the file has no `version` key"),
        ];
        for (text, want) in cases {
            let err = BootState::parse(text, "s").unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}\n got: {err}\nwant: {want}");
            if text.contains("..") || text.contains("a/b") {
                assert!(
                    err.contains("not a valid name") || err.contains("is not valid"),
                    "{err}"
                );
            }
        }
    }
}
