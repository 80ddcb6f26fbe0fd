//! The plan (`overlayplan.toml`, version 1): model, parsing with located errors, validation and
//! the stable TOML it is written as.

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::value::Datetime;

use crate::error::{Location, PlanError};
use crate::name::check_name;
use crate::size::ByteSize;

/// The plan format version this build reads and writes.
pub const PLAN_VERSION: u32 = 1;

/// overlayfs stacks at most this many lower layers (`OVL_MAX_STACK`).
pub const MAX_STACK: u32 = 500;

/// The longest hidden-menu timeout a plan may ask for, so a typo cannot stall a boot for hours.
pub const MAX_TIMEOUT_S: u32 = 3600;

/// The whole plan: settings and the layers, top first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: u32,
    #[serde(default)]
    pub boot: BootSettings,
    #[serde(default)]
    pub upper: UpperSettings,
    #[serde(default)]
    pub policy: Policy,
    /// Top first, as overlayfs orders `lowerdir`.
    #[serde(default, rename = "layer")]
    pub layers: Vec<Layer>,
}

/// `[boot]`: when the menu shows and how trial layers are tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootSettings {
    pub menu: MenuMode,
    /// How long the hidden menu waits for a key, in seconds.
    pub timeout_s: u32,
    /// Boots a trial layer gets before the hook disables it.
    pub trial_boots: u32,
    /// A password hash (PHC string, such as argon2id) the menu asks for before any change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub menu_lock: Option<String>,
}

impl Default for BootSettings {
    fn default() -> Self {
        Self {
            menu: MenuMode::OnKey,
            timeout_s: 3,
            trial_boots: 3,
            menu_lock: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MenuMode {
    /// Every boot.
    Always,
    /// When a key is pressed during `timeout_s`.
    OnKey,
    /// After a failed or fallen-back boot.
    OnFailure,
    /// Only when the kernel command line asks (`strata.menu`).
    Never,
}

/// `[upper]`: the writable layer on top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpperSettings {
    pub mode: UpperMode,
    pub on_rollback: OnRollback,
}

impl Default for UpperSettings {
    fn default() -> Self {
        Self {
            mode: UpperMode::Persistent,
            on_rollback: OnRollback::Carry,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpperMode {
    /// Changes survive a reboot (`uppers/<id>/`).
    Persistent,
    /// Changes live in RAM and are gone at the next boot.
    Tmpfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRollback {
    /// Keep using the current upper after a rollback.
    Carry,
    /// Archive the current upper and start an empty one.
    Fresh,
}

/// `[policy]`: what compaction and trimming may do on their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Compaction merges accepted intermediates down beyond this many layers.
    pub max_layers: u32,
    /// `add-layer` and `sync` refuse to go below this much free space.
    pub min_free: ByteSize,
    /// Known-good layers are never trimmed or merged away.
    pub keep_known_good: bool,
    /// `overlayctl policy` removes disabled layers created longer ago than this; unset: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_disabled_after: Option<crate::Age>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_layers: 8,
            min_free: ByteSize(512 << 20),
            keep_known_good: true,
            drop_disabled_after: None,
        }
    }
}

/// One `[[layer]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// The directory under `layers/`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default)]
    pub state: LayerState,
    #[serde(default, skip_serializing_if = "is_false")]
    pub known_good: bool,
    /// The layer this one was built on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Datetime>,
    /// `blake3:` and the hex digest of the layer's canonical manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// When it was disabled, as `overlayctl` (or the policy job, for a layer the boot disabled)
    /// recorded it: `policy.drop_disabled_after` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<Datetime>,
    /// The layers `overlayctl compact` merged into this one, top first.
    #[serde(
        default,
        deserialize_with = "crate::name::de_layer_names",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub replaces: Vec<String>,
    /// The layers this one stands in for: while it is in a stack they are left out of it. A
    /// pulled image's layers name the layers of the stack they replace, so leaving the new
    /// layers out (a trial that ran out, the menu) brings the old stack back whole.
    #[serde(
        default,
        deserialize_with = "crate::name::de_layer_names",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub supersedes: Vec<String>,
    /// For a layer made from an OCI image layer: `sha256:` and the hex digest of the layer's
    /// uncompressed tar (the image's `diff_id`), so a later pull finds it held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<String>,
    /// The channel release `overlayctl update` brought this layer in for: a release pulled
    /// back in the channel is rolled back by leaving out its layers.
    #[serde(
        default,
        deserialize_with = "crate::name::de_opt_layer_name",
        skip_serializing_if = "Option::is_none"
    )]
    pub release: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl Layer {
    /// An active layer with nothing but a name.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            title: None,
            state: LayerState::Active,
            known_good: false,
            parent: None,
            created: None,
            digest: None,
            notes: None,
            disabled_at: None,
            replaces: Vec::new(),
            supersedes: Vec::new(),
            diff_id: None,
            release: None,
        }
    }

    /// Sets the state, recording when it became disabled (`now`, where the caller has a clock it
    /// trusts; None leaves the date for the policy job to record) and forgetting the date when
    /// it is enabled again.
    pub fn set_state(&mut self, state: LayerState, now: Option<Datetime>) {
        if state != LayerState::Disabled {
            self.disabled_at = None;
        } else if self.state != LayerState::Disabled {
            self.disabled_at = now;
        }
        self.state = state;
    }

    /// The title, or the name when the layer has none, safe to print (see
    /// [`crate::name::printable`]).
    pub fn display_title(&self) -> std::borrow::Cow<'_, str> {
        crate::name::printable(self.title.as_deref().unwrap_or(&self.name))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerState {
    /// Accepted: part of every boot.
    #[default]
    Active,
    /// Installed, not yet accepted: each boot that includes it uses one of `trial_boots` tries.
    Trial,
    /// Left out of the stack.
    Disabled,
}

impl LayerState {
    pub fn is_enabled(self) -> bool {
        self != Self::Disabled
    }
}

/// The spans of the values validation may complain about, read leniently beside the real parse.
#[derive(Deserialize, Default)]
struct Spans {
    version: Option<Spanned<toml::Value>>,
    boot: Option<SettingSpans>,
    policy: Option<SettingSpans>,
    #[serde(default)]
    layer: Vec<Spanned<LayerSpans>>,
}

#[derive(Deserialize, Default)]
struct SettingSpans {
    timeout_s: Option<Spanned<IgnoredAny>>,
    trial_boots: Option<Spanned<IgnoredAny>>,
    menu_lock: Option<Spanned<IgnoredAny>>,
    max_layers: Option<Spanned<IgnoredAny>>,
}

#[derive(Deserialize, Default)]
struct LayerSpans {
    name: Option<Spanned<IgnoredAny>>,
    parent: Option<Spanned<IgnoredAny>>,
    created: Option<Spanned<IgnoredAny>>,
    digest: Option<Spanned<IgnoredAny>>,
    diff_id: Option<Spanned<IgnoredAny>>,
    supersedes: Option<Spanned<IgnoredAny>>,
}

/// Turns the spans of one parsed text into locations. The spans are read only when an error
/// needs one: a good plan is read once.
struct Locator<'a> {
    file: &'a str,
    text: &'a str,
    spans: OnceCell<Spans>,
}

impl<'a> Locator<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        Self {
            file,
            text,
            spans: OnceCell::new(),
        }
    }

    /// The lenient read. The strict one succeeded, so this one does too; were it not to, an
    /// error would point at the file without a line rather than not be reported.
    fn spans(&self) -> &Spans {
        self.spans
            .get_or_init(|| toml::from_str(self.text).unwrap_or_default())
    }

    fn at<T>(&self, span: Option<&Spanned<T>>) -> Location {
        Location::of_span(self.file, self.text, span.map(Spanned::span))
    }

    fn layer(&self, index: usize) -> Option<&LayerSpans> {
        self.spans().layer.get(index).map(Spanned::as_ref)
    }

    fn layer_table(&self, index: usize) -> Location {
        self.at(self.spans().layer.get(index))
    }

    fn layer_field(
        &self,
        index: usize,
        field: fn(&LayerSpans) -> Option<&Spanned<IgnoredAny>>,
    ) -> Location {
        match self.layer(index).and_then(field) {
            Some(span) => self.at(Some(span)),
            None => self.layer_table(index),
        }
    }

    fn setting(
        &self,
        section: fn(&Spans) -> Option<&SettingSpans>,
        field: fn(&SettingSpans) -> Option<&Spanned<IgnoredAny>>,
    ) -> Location {
        self.at(section(self.spans()).and_then(field))
    }
}

impl Plan {
    /// A plan with default settings and these layers (top first).
    pub fn new(layers: Vec<Layer>) -> Self {
        Self {
            version: PLAN_VERSION,
            boot: BootSettings::default(),
            upper: UpperSettings::default(),
            policy: Policy::default(),
            layers,
        }
    }

    /// Parses and validates a plan. `file` is only used to name the file in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, PlanError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // The strict read gives the model. When it fails, or the version is not this one, a
        // lenient read judges the version first, so a newer plan is refused as such and not for
        // its new keys; otherwise the strict read says what is wrong.
        match toml::from_str::<Plan>(text) {
            Ok(plan) => {
                let at = Locator::new(file, text);
                if plan.version != PLAN_VERSION {
                    judge_version(file, text, at.spans().version.as_ref())?;
                }
                plan.validate(&at)?;
                Ok(plan)
            }
            Err(e) => {
                check_version(text, file)?;
                Err(PlanError::from_toml(file, text, &e))
            }
        }
    }

    /// The plan as the TOML `save` writes: settings, then `[[layer]]` tables top first. Fails
    /// only for values TOML cannot hold, such as a `created` date with month 13.
    pub fn to_toml(&self) -> Result<String, PlanError> {
        let body = toml::to_string_pretty(self).map_err(|e| PlanError::Unwritable {
            what: "plan",
            message: e.to_string(),
        })?;
        Ok(format!(
            "# Strata plan: layers are listed top first. See `overlayctl --help`.\n{body}"
        ))
    }

    /// Validates a plan built in memory and returns the text it is written as. Errors locate
    /// the problem in that text, and the check also proves the plan reads back as itself.
    pub fn check(&self) -> Result<String, PlanError> {
        let text = self.to_toml()?;
        let back = Self::parse(&text, "(plan to be written)")?;
        if &back != self {
            return Err(PlanError::Unwritable {
                what: "plan",
                message: "it does not read back as itself".into(),
            });
        }
        Ok(text)
    }

    pub fn layer(&self, name: &str) -> Option<&Layer> {
        self.layers.iter().find(|l| l.name == name)
    }

    pub fn layer_mut(&mut self, name: &str) -> Option<&mut Layer> {
        self.layers.iter_mut().find(|l| l.name == name)
    }

    /// `stack` (names, top first) with each run of layers a compaction replaced given as the
    /// layer that replaced it: a stack recorded before a compaction (the last good one) in this
    /// plan's terms. A stack with only part of a run keeps its names.
    pub fn current_names(&self, stack: &[String]) -> Vec<String> {
        let mut names = stack.to_vec();
        for layer in self.layers.iter().filter(|l| !l.replaces.is_empty()) {
            let run = &layer.replaces;
            if let Some(at) = names.iter().position(|n| n == &run[0])
                && names.get(at..at + run.len()) == Some(&run[..])
            {
                names.splice(at..at + run.len(), [layer.name.clone()]);
            }
        }
        names
    }

    /// The layers of `before` (a stack booted earlier, top first) that `now` leaves out: what
    /// booting `now` after `before` rolls back. Layers added (an upgrade, a checkpoint) are not
    /// a rollback, nor is a merge: a layer a compaction replaced counts as kept when the layer
    /// that replaced it is in `now` (compaction also renames the recorded stacks it merges). One
    /// the plan no longer knows at all was removed: left out.
    pub fn left_out_since(&self, before: &[String], now: &[String]) -> Vec<String> {
        let now: HashSet<&str> = now.iter().map(String::as_str).collect();
        let kept = |name: &String| {
            now.contains(name.as_str())
                || (self.layer(name).is_none()
                    && self
                        .layers
                        .iter()
                        .find(|l| l.replaces.contains(name))
                        .is_some_and(|l| now.contains(l.name.as_str())))
        };
        before.iter().filter(|n| !kept(n)).cloned().collect()
    }

    /// Index from the top (0 is the top layer).
    pub fn position(&self, name: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.name == name)
    }

    /// The bottom layer: the base system.
    pub fn base(&self) -> Option<&Layer> {
        self.layers.last()
    }

    fn validate(&self, at: &Locator<'_>) -> Result<(), PlanError> {
        self.validate_settings(at)?;
        if self.layers.is_empty() {
            return Err(PlanError::NoLayers {
                at: Location::at(at.file, at.text, at.text.len()),
            });
        }
        if self.layers.len() > MAX_STACK as usize {
            return Err(PlanError::TooManyLayers {
                at: at.layer_table(MAX_STACK as usize),
                count: self.layers.len(),
                max: MAX_STACK,
            });
        }
        let mut first_seen: HashMap<&str, usize> = HashMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let name_at = || at.layer_field(i, |l| l.name.as_ref());
            check_name(&layer.name).map_err(|problem| PlanError::BadName {
                at: name_at(),
                name: layer.name.clone(),
                problem,
            })?;
            if let Some(&first) = first_seen.get(layer.name.as_str()) {
                return Err(PlanError::DuplicateLayer {
                    at: name_at(),
                    name: layer.name.clone(),
                    first_line: at.layer_field(first, |l| l.name.as_ref()).line,
                });
            }
            first_seen.insert(&layer.name, i);
            layer.validate_values(i, at)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(parent) = &layer.parent else {
                continue;
            };
            let parent_at = || at.layer_field(i, |l| l.parent.as_ref());
            if parent == &layer.name {
                return Err(PlanError::SelfParent {
                    at: parent_at(),
                    name: layer.name.clone(),
                });
            }
            if !first_seen.contains_key(parent.as_str()) {
                return Err(PlanError::MissingParent {
                    at: parent_at(),
                    name: layer.name.clone(),
                    parent: parent.clone(),
                });
            }
        }
        if let Some((i, cycle)) = self.find_parent_cycle(&first_seen) {
            return Err(PlanError::ParentCycle {
                at: at.layer_field(i, |l| l.parent.as_ref()),
                cycle,
            });
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(parent) = &layer.parent else {
                continue;
            };
            if first_seen[parent.as_str()] < i {
                return Err(PlanError::ParentAbove {
                    at: at.layer_field(i, |l| l.parent.as_ref()),
                    name: layer.name.clone(),
                    parent: parent.clone(),
                });
            }
        }
        Ok(())
    }

    fn validate_settings(&self, at: &Locator<'_>) -> Result<(), PlanError> {
        let bad = |at: Location, message: String| Err(PlanError::BadValue { at, message });
        let boot: fn(&Spans) -> Option<&SettingSpans> = |s| s.boot.as_ref();
        let policy: fn(&Spans) -> Option<&SettingSpans> = |s| s.policy.as_ref();
        if self.boot.timeout_s > MAX_TIMEOUT_S {
            return bad(
                at.setting(boot, |s| s.timeout_s.as_ref()),
                format!(
                    "boot.timeout_s is {}; it must be at most {MAX_TIMEOUT_S} seconds (use menu = \"always\" for a menu at every boot)",
                    self.boot.timeout_s
                ),
            );
        }
        if self.boot.trial_boots == 0 {
            return bad(
                at.setting(boot, |s| s.trial_boots.as_ref()),
                "boot.trial_boots is 0; a trial layer needs at least 1 boot to be tried".into(),
            );
        }
        if let Some(lock) = &self.boot.menu_lock
            && let Err(why) = crate::lock::check_hash(lock)
        {
            return bad(
                at.setting(boot, |s| s.menu_lock.as_ref()),
                format!(
                    "boot.menu_lock must be an argon2id password hash (\"$argon2id$…\", as `overlayctl menu-lock` writes), never the password itself: {why}"
                ),
            );
        }
        if !(1..=MAX_STACK).contains(&self.policy.max_layers) {
            return bad(
                at.setting(policy, |s| s.max_layers.as_ref()),
                format!(
                    "policy.max_layers is {}; it must be between 1 and {MAX_STACK} (overlayfs stacks at most {MAX_STACK} layers)",
                    self.policy.max_layers
                ),
            );
        }
        Ok(())
    }

    /// The first cycle among parent links, as the index of the layer where it was found and the
    /// names along it (the first name repeated at the end). Linear: each layer is walked once.
    fn find_parent_cycle(&self, index: &HashMap<&str, usize>) -> Option<(usize, Vec<String>)> {
        const UNSEEN: usize = usize::MAX;
        let parent_of = |i: usize| self.layers[i].parent.as_deref().map(|p| index[p]);
        // For each layer, the walk that first reached it; a walk that meets itself is a cycle.
        let mut walk_of = vec![UNSEEN; self.layers.len()];
        for start in 0..self.layers.len() {
            let mut current = Some(start);
            while let Some(i) = current.filter(|&i| walk_of[i] == UNSEEN) {
                walk_of[i] = start;
                current = parent_of(i);
            }
            let Some(on_cycle) = current.filter(|&i| walk_of[i] == start) else {
                continue;
            };
            let mut cycle = vec![self.layers[on_cycle].name.clone()];
            let mut next = parent_of(on_cycle)?;
            while next != on_cycle {
                cycle.push(self.layers[next].name.clone());
                next = parent_of(next)?;
            }
            cycle.push(self.layers[on_cycle].name.clone());
            return Some((on_cycle, cycle));
        }
        None
    }
}

impl Layer {
    fn validate_values(&self, i: usize, at: &Locator<'_>) -> Result<(), PlanError> {
        if let Some(digest) = &self.digest
            && !is_valid_digest(digest)
        {
            return Err(PlanError::BadValue {
                at: at.layer_field(i, |l| l.digest.as_ref()),
                message: format!(
                    "layer {:?} has digest {digest:?}; a digest is `blake3:` followed by 64 lowercase hex digits",
                    self.name
                ),
            });
        }
        if let Some(diff_id) = &self.diff_id
            && !is_valid_sha256(diff_id)
        {
            return Err(PlanError::BadValue {
                at: at.layer_field(i, |l| l.diff_id.as_ref()),
                message: format!(
                    "layer {:?} has diff_id {diff_id:?}; a diff_id is `sha256:` followed by 64 lowercase hex digits",
                    self.name
                ),
            });
        }
        if self.supersedes.contains(&self.name) {
            return Err(PlanError::BadValue {
                at: at.layer_field(i, |l| l.supersedes.as_ref()),
                message: format!("layer {:?} supersedes itself", self.name),
            });
        }
        if let Some(created) = &self.created
            && created.date.is_none()
        {
            return Err(PlanError::BadValue {
                at: at.layer_field(i, |l| l.created.as_ref()),
                message: format!(
                    "layer {:?} has created = {created}, which has no date; write a date-time such as 2007-05-20T10:00:00Z",
                    self.name
                ),
            });
        }
        Ok(())
    }
}

/// `blake3:` and 64 lowercase hex digits.
pub fn is_valid_digest(digest: &str) -> bool {
    digest.strip_prefix("blake3:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// `sha256:` and 64 lowercase hex digits: an OCI digest.
pub fn is_valid_sha256(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Reads only `version` and refuses anything but [`PLAN_VERSION`]; also used for boot state.
pub(crate) fn check_version(text: &str, file: &str) -> Result<(), PlanError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: Option<Spanned<toml::Value>>,
    }
    let only: VersionOnly =
        toml::from_str(text).map_err(|e| PlanError::from_toml(file, text, &e))?;
    judge_version(file, text, only.version.as_ref())
}

/// Refuses a missing version or any but [`PLAN_VERSION`].
fn judge_version(
    file: &str,
    text: &str,
    version: Option<&Spanned<toml::Value>>,
) -> Result<(), PlanError> {
    let Some(version) = version else {
        return Err(PlanError::MissingVersion {
            at: Location::line(file, 1, 1),
        });
    };
    let at = Location::of_span(file, text, Some(version.span()));
    match version.get_ref() {
        toml::Value::Integer(n) if *n == i64::from(PLAN_VERSION) => Ok(()),
        toml::Value::Integer(n) => Err(PlanError::UnsupportedVersion { at, found: *n }),
        other => Err(PlanError::BadValue {
            at,
            message: format!("version must be the integer 1, not {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL_PLAN: &str = include_str!("../tests/fixtures/full-plan.toml");

    #[test]
    fn the_design_example_parses() {
        let plan = Plan::parse(FULL_PLAN, "full-plan.toml").unwrap();
        assert_eq!(plan.layers.len(), 3);
        let top = &plan.layers[0];
        assert_eq!(top.name, "upgrade-2007-05-20-finallyfixed");
        assert_eq!(top.state, LayerState::Trial);
        assert_eq!(
            top.parent.as_deref(),
            Some("upgrade-2007-05-19-betterupdatestillbroken")
        );
        assert_eq!(top.created.unwrap().to_string(), "2007-05-20T10:00:00Z");
        assert_eq!(
            top.notes.as_deref(),
            Some("Fixes the X crash on resume.\nSecond line.")
        );
        assert_eq!(plan.layers[1].state, LayerState::Disabled);
        assert!(plan.base().unwrap().known_good);
        assert_eq!(plan.policy.min_free, ByteSize(512 << 20));
        assert_eq!(plan.position("basesystem"), Some(2));
    }

    #[test]
    fn written_toml_is_stable_and_reads_back() {
        let plan = Plan::parse(FULL_PLAN, "full-plan.toml").unwrap();
        let text = plan.to_toml().unwrap();
        let again = Plan::parse(&text, "written").unwrap();
        assert_eq!(again, plan);
        assert_eq!(
            again.to_toml().unwrap(),
            text,
            "writing twice gives the same bytes"
        );
        // Settings come first, then the layers top first as [[layer]] tables.
        let order: Vec<usize> = [
            "[boot]",
            "[upper]",
            "[policy]",
            "name = \"upgrade-2007-05-20",
            "name = \"basesystem\"",
        ]
        .iter()
        .map(|needle| text.find(needle).unwrap())
        .collect();
        assert!(order.is_sorted(), "{text}");
        assert_eq!(text.matches("[[layer]]").count(), 3);
    }

    #[test]
    fn missing_sections_take_defaults() {
        let plan = Plan::parse("version = 1\n[[layer]]\nname = \"base\"\n", "p").unwrap();
        assert_eq!(plan, Plan::new(vec![Layer::new("base")]));
        assert_eq!(plan.boot.menu, MenuMode::OnKey);
        assert_eq!(plan.upper.mode, UpperMode::Persistent);
        assert!(plan.policy.keep_known_good);
    }

    /// Every rule, and where its error points: (plan text, expected start of the message).
    const BAD: &[(&str, &str)] = &[
        // TOML itself, unknown keys, wrong types and variants: toml's spans.
        (
            "version = 1\n[boot]\nmenuu = \"always\"\n",
            "p:3:1: unknown key `menuu`, expected one of `menu`, `timeout_s`",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\ncolour = \"red\"\n",
            "p:4:1: unknown key `colour`, expected one of `name`, `title`, `state`",
        ),
        (
            "version = 1\nsurprise = true\n",
            "p:2:1: unknown key `surprise`",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\nstate = \"actve\"\n",
            "p:4:9: unknown variant `actve`, expected one of `active`, `trial`, `disabled`",
        ),
        (
            "version = 1\n[upper]\nmode = \"ram\"\n",
            "p:3:8: unknown variant `ram`, expected `persistent` or `tmpfs`",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\ntitle = 3\n",
            "p:4:9: invalid type: integer `3`, expected a string",
        ),
        (
            "version = 1\n[[layer]]\ntitle = \"no name\"\n",
            "p:2:1: missing key `name`",
        ),
        (
            "version = 1\nlayer = 5\n",
            "p:2:9: invalid type: integer `5`, expected an array",
        ),
        (
            "version = 1\nversion = 1\n",
            "p:2:1: duplicate key `version`",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\n",
            "p:3:10: invalid basic string, expected `\"`",
        ),
        (
            "version = 1\n[boot]\ntimeout_s = -1\n",
            "p:3:13: invalid value: integer `-1`, expected u32",
        ),
        (
            "version = 1\n[policy]\nmin_free = \"lots\"\n",
            "p:3:12: \"lots\" is not a size",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\nstate = true\n",
            "p:4:9: expected a quoted word here, such as \"trial\"",
        ),
        (
            "version = 1\n[[boot]]\n",
            "p:2:1: this is a single table: write [boot], not [[boot]]",
        ),
        (
            "version = 1\n[layer]\nname = \"a\"\n",
            "p:2:1: layers are an array of tables: write [[layer]] for each, not [layer]",
        ),
        (
            "version = 1\nboot = 3\n",
            "p:2:8: invalid type: integer `3`, expected a table",
        ),
        // Version.
        (
            "[[layer]]\nname = \"a\"\n",
            "p:1:1: the file has no `version` key; add `version = 1`",
        ),
        (
            "version = 2\nnew_key = 1\n",
            "p:1:11: version 2 is not supported; this build of Strata reads version 1",
        ),
        ("version = \"1\"\n", "p:1:11: version must be the integer 1"),
        // Layers.
        ("version = 1\n", "p:2:1: the plan lists no layers"),
        (
            "version = 1\n[[layer]]\nname = \"../etc\"\n",
            "p:3:8: layer name \"../etc\" is not valid: it contains `/`",
        ),
        (
            "version = 1\n[[layer]]\nname = \"..\"\n",
            "p:3:8: layer name \"..\" is not valid: it starts with `.`",
        ),
        (
            "version = 1\n[[layer]]\nname = \".hidden\"\n",
            "p:3:8: layer name \".hidden\" is not valid: it starts with `.`",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\\u0000b\"\n",
            "p:3:8: layer name \"a\\0b\" is not valid: it contains a NUL byte",
        ),
        (
            "version = 1\n[[layer]]\nname = \"\"\n",
            "p:3:8: layer name \"\" is not valid: it is empty",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a b\"\n",
            "p:3:8: layer name \"a b\" is not valid: it contains ' '",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\n[[layer]]\n  name = \"a\"\n",
            "p:5:10: layer \"a\" is listed twice (first at line 3)",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\nparent = \"zz\"\n",
            "p:4:10: layer \"a\" names its parent \"zz\", but no layer of that name is in the plan",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\nparent = \"a\"\n",
            "p:4:10: layer \"a\" names itself as its parent",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\nparent = \"b\"\n[[layer]]\nname = \"b\"\nparent = \"a\"\n",
            "p:4:10: the parents of these layers form a cycle: a -> b -> a",
        ),
        (
            "version = 1\n[[layer]]\nname = \"x\"\nparent = \"a\"\n[[layer]]\nname = \"a\"\nparent = \"b\"\n[[layer]]\nname = \"b\"\nparent = \"a\"\n",
            "p:7:10: the parents of these layers form a cycle: a -> b -> a",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\n[[layer]]\nname = \"b\"\nparent = \"a\"\n",
            "p:6:10: layer \"b\" names its parent \"a\", which is above it in the plan",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\ndigest = \"md5:00\"\n",
            "p:4:10: layer \"a\" has digest \"md5:00\"; a digest is `blake3:` followed by 64 lowercase hex digits",
        ),
        (
            "version = 1\n[[layer]]\nname = \"a\"\ncreated = 10:00:00\n",
            "p:4:11: layer \"a\" has created = 10:00:00, which has no date",
        ),
        // Settings.
        (
            "version = 1\n[boot]\ntrial_boots = 0\n[[layer]]\nname = \"a\"\n",
            "p:3:15: boot.trial_boots is 0",
        ),
        (
            "version = 1\n[boot]\ntimeout_s = 86400\n[[layer]]\nname = \"a\"\n",
            "p:3:13: boot.timeout_s is 86400; it must be at most 3600",
        ),
        (
            "version = 1\n[boot]\nmenu_lock = \"hunter2\"\n[[layer]]\nname = \"a\"\n",
            "p:3:13: boot.menu_lock must be an argon2id password hash",
        ),
        (
            "version = 1\n[policy]\nmax_layers = 501\n[[layer]]\nname = \"a\"\n",
            "p:3:14: policy.max_layers is 501; it must be between 1 and 500",
        ),
    ];

    #[test]
    fn every_error_names_its_line_and_column() {
        for (text, want) in BAD {
            let err = Plan::parse(text, "p").unwrap_err();
            let got = err.to_string();
            assert!(
                got.starts_with(want),
                "input:\n{text}\n got: {got}\nwant: {want}…"
            );
            let at = err.location().expect("content errors are located");
            assert_eq!(format!("{at}: "), got[..got.find(": ").unwrap() + 2]);
        }
    }

    #[test]
    fn more_layers_than_overlayfs_can_stack_are_refused_at_the_first_too_many() {
        let mut text = String::from("version = 1\n");
        for i in 0..=MAX_STACK {
            text += &format!("[[layer]]\nname = \"l{i}\"\n");
        }
        let err = Plan::parse(&text, "p").unwrap_err().to_string();
        let line = 2 + 2 * MAX_STACK as usize;
        assert!(
            err.starts_with(&format!(
                "p:{line}:1: the plan lists 501 layers; at most 500"
            )),
            "{err}"
        );
    }

    #[test]
    fn a_long_parent_chain_is_checked_quickly_and_a_cycle_in_it_found() {
        // 500 layers, each built on the next; the bottom one closes the loop.
        let count = MAX_STACK as usize;
        let mut layers: Vec<Layer> = (0..count).map(|i| Layer::new(format!("l{i}"))).collect();
        for (i, layer) in layers.iter_mut().enumerate().take(count - 1) {
            layer.parent = Some(format!("l{}", i + 1));
        }
        let plan = Plan::new(layers.clone());
        assert!(plan.check().is_ok());
        layers[count - 1].parent = Some("l0".into());
        let err = Plan::new(layers).check().unwrap_err();
        let PlanError::ParentCycle { cycle, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(cycle.len(), count + 1);
        assert_eq!((cycle[0].as_str(), cycle[count].as_str()), ("l0", "l0"));
    }

    #[test]
    fn values_toml_cannot_hold_are_an_error_not_a_panic() {
        let mut layer = Layer::new("a");
        let mut created: Datetime = "2007-05-20T10:00:00Z".parse().unwrap();
        created.date.as_mut().unwrap().month = 13;
        layer.created = Some(created);
        let err = Plan::new(vec![layer]).check().unwrap_err().to_string();
        assert!(err.starts_with("the plan cannot be written: "), "{err}");
    }

    #[test]
    fn a_plan_built_in_memory_is_checked_before_it_is_written() {
        let mut plan = Plan::new(vec![Layer::new("top"), Layer::new("base")]);
        assert!(plan.check().is_ok());
        plan.layers[0].parent = Some("gone".into());
        let err = plan.check().unwrap_err().to_string();
        assert!(err.starts_with("(plan to be written):"), "{err}");
        assert!(err.contains("names its parent \"gone\""), "{err}");
    }
}
