//! The record of the running boot (`/run/strata/booted.toml`): what the hook mounted and why, so
//! that `overlayctl` knows which layers are in use and the menu can say why a boot fell back.

use serde::{Deserialize, Serialize};
use toml::value::Datetime;

use crate::error::PlanError;
use crate::plan::{UpperMode, check_version};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Booted {
    pub version: u32,
    /// The layers mounted, top first.
    #[serde(deserialize_with = "crate::name::de_layer_names")]
    pub stack: Vec<String>,
    pub upper: UpperMode,
    /// The persistent upper in use (`uppers/<id>`), when the upper is persistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_id: Option<String>,
    /// Where the store is in the running system.
    pub store: String,
    /// The stack came from a one-shot selection made in the menu.
    #[serde(default)]
    pub one_shot: bool,
    /// Why the boot did not mount the stack it resolved first, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Notes from resolution (ignored options, broken parent links, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Datetime>,
}

impl Booted {
    pub fn parse(text: &str, file: &str) -> Result<Self, PlanError> {
        check_version(text, file)?;
        toml::from_str(text).map_err(|e| PlanError::from_toml(file, text, &e))
    }

    pub fn to_toml(&self) -> Result<String, PlanError> {
        toml::to_string_pretty(self).map_err(|e| PlanError::Unwritable {
            what: "boot record",
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_names() {
        let booted = Booted {
            version: 1,
            stack: vec!["upgrade-1".into(), "base".into()],
            upper: UpperMode::Persistent,
            upper_id: Some("1".into()),
            store: "/run/strata/store".into(),
            one_shot: false,
            fallback: Some("the resolved stack failed to mount: EINVAL".into()),
            notes: vec!["strata.top=x names no layer of the plan; ignored".into()],
            at: Some("2026-11-22T03:00:00Z".parse().unwrap()),
        };
        let text = booted.to_toml().unwrap();
        assert_eq!(Booted::parse(&text, "b").unwrap(), booted);
        let bad = "version = 1\nstack = [\"../x\"]\nupper = \"tmpfs\"\nstore = \"/s\"\n";
        let err = Booted::parse(bad, "b").unwrap_err().to_string();
        assert!(
            err.starts_with("b:2:9: layer name \"../x\" is not valid"),
            "{err}"
        );
    }
}
