//! Errors for plans, boot state and legacy files: each names the file, line and column.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

pub use crate::name::NameProblem;

/// A place in a text file, 1-based, columns counted in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` in `text` (clamped to the text, and to a char boundary).
    pub fn at(file: &str, text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Self {
            file: file.to_owned(),
            line,
            column,
        }
    }

    /// The start of a span, or the start of the file when there is none.
    pub(crate) fn of_span(file: &str, text: &str, span: Option<Range<usize>>) -> Self {
        Self::at(file, text, span.map_or(0, |s| s.start))
    }

    pub(crate) fn line(file: &str, line: usize, column: usize) -> Self {
        Self {
            file: file.to_owned(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Everything that can be wrong with a plan or boot-state file, or with reading and writing one.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// TOML syntax, an unknown key, a value of the wrong type or an unknown variant.
    #[error("{at}: {message}")]
    Toml { at: Location, message: String },

    #[error("{at}: the file has no `version` key; add `version = 1` at the top")]
    MissingVersion { at: Location },

    #[error("{at}: version {found} is not supported; this build of Strata reads version 1")]
    UnsupportedVersion { at: Location, found: i64 },

    #[error("{at}: the plan lists no layers; add at least a base layer as a [[layer]] table")]
    NoLayers { at: Location },

    #[error("{at}: layer name {name:?} is not valid: {problem}")]
    BadName {
        at: Location,
        name: String,
        problem: NameProblem,
    },

    #[error(
        "{at}: layer {name:?} is listed twice (first at line {first_line}); layer names must be unique"
    )]
    DuplicateLayer {
        at: Location,
        name: String,
        first_line: usize,
    },

    #[error(
        "{at}: layer {name:?} names its parent {parent:?}, but no layer of that name is in the plan"
    )]
    MissingParent {
        at: Location,
        name: String,
        parent: String,
    },

    #[error(
        "{at}: layer {name:?} names itself as its parent; remove `parent` or name the layer it was built on"
    )]
    SelfParent { at: Location, name: String },

    #[error("{at}: the parents of these layers form a cycle: {}; every chain of parents must end at a base layer", cycle.join(" -> "))]
    ParentCycle { at: Location, cycle: Vec<String> },

    #[error(
        "{at}: layer {name:?} names its parent {parent:?}, which is above it in the plan; a layer is built on one listed below it (layers are listed top first)"
    )]
    ParentAbove {
        at: Location,
        name: String,
        parent: String,
    },

    #[error("{at}: {message}")]
    BadValue { at: Location, message: String },

    /// A line of a legacy XO `.overlayplan` file that cannot be read.
    #[error("{at}: {message}")]
    Legacy { at: Location, message: String },

    /// A value built in memory that TOML cannot express (such as a date with month 13).
    #[error("the {what} cannot be written: {message}")]
    Unwritable { what: &'static str, message: String },

    #[error("{at}: the plan lists {count} layers; at most {max} fit in one overlay stack")]
    TooManyLayers {
        at: Location,
        count: usize,
        max: u32,
    },

    // Not `source`: the error is said once, in this message, not again by a cause chain.
    #[error("{path}: {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        error: std::io::Error,
    },

    #[error("{primary}; the previous copy could not be used either: {prev}")]
    NoUsableCopy {
        primary: Box<PlanError>,
        prev: Box<PlanError>,
    },
}

impl PlanError {
    /// Where in a file the error is, when it is about a file's content.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Toml { at, .. }
            | Self::MissingVersion { at }
            | Self::UnsupportedVersion { at, .. }
            | Self::NoLayers { at }
            | Self::BadName { at, .. }
            | Self::DuplicateLayer { at, .. }
            | Self::MissingParent { at, .. }
            | Self::SelfParent { at, .. }
            | Self::ParentCycle { at, .. }
            | Self::ParentAbove { at, .. }
            | Self::BadValue { at, .. }
            | Self::TooManyLayers { at, .. }
            | Self::Legacy { at, .. } => Some(at),
            Self::Io { .. } | Self::NoUsableCopy { .. } | Self::Unwritable { .. } => None,
        }
    }

    pub fn io(path: impl Into<PathBuf>, action: &'static str, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            action,
            error,
        }
    }

    /// A TOML deserialisation error, with serde's "field" spoken as TOML's "key".
    pub(crate) fn from_toml(file: &str, text: &str, err: &toml::de::Error) -> Self {
        let message = plain_toml_message(
            err.message().trim_end(),
            err.span().and_then(|s| text.get(s)),
        );
        Self::Toml {
            at: Location::of_span(file, text, err.span()),
            message,
        }
    }
}

/// toml's and serde's wording, turned into sentences that say what would be valid.
fn plain_toml_message(message: &str, found: Option<&str>) -> String {
    if message == "duplicate key"
        && let Some(key) = found
    {
        return format!(
            "duplicate key `{}`; a key may appear once in each table",
            key.trim()
        );
    }
    if message == "wanted string or table" {
        return "expected a quoted word here, such as \"trial\" or \"on-key\"".into();
    }
    if message.starts_with("wanted exactly 1 element") {
        let name = found
            .and_then(|f| f.trim().strip_prefix("[[")?.strip_suffix("]]"))
            .unwrap_or("name");
        return format!("this is a single table: write [{name}], not [[{name}]]");
    }
    if message == "invalid type: map, expected a sequence" {
        return "layers are an array of tables: write [[layer]] for each, not [layer]".into();
    }
    let mut message = message
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
        .replace("expected a sequence", "expected an array");
    for table in [
        "BootSettings",
        "UpperSettings",
        "Policy",
        "Layer",
        "OneShot",
        "LastBoot",
    ] {
        message = message.replace(&format!("expected struct {table}"), "expected a table");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_characters() {
        let text = "a = 1\nbé = 2\r\nc = 3";
        assert_eq!(Location::at("f", text, 0).to_string(), "f:1:1");
        let b = text.find('b').unwrap();
        assert_eq!(Location::at("f", text, b + 3).to_string(), "f:2:3");
        let c = text.find('c').unwrap();
        assert_eq!(Location::at("f", text, c).to_string(), "f:3:1");
        // Past the end and inside a multi-byte character both stay in range.
        assert_eq!(Location::at("f", text, 999).line, 3);
        assert_eq!(Location::at("f", text, b + 2).column, 2);
    }
}
