//! The layer-name rule: a name is one path component inside the store, never a way out of it.

/// Why a layer name is refused (docs/design.md: 1 to 128 of `[A-Za-z0-9._+-]`, no leading dot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is {0} bytes long; the limit is {max}", max = MAX_NAME_LEN)]
    TooLong(usize),
    #[error("it starts with `.`")]
    LeadingDot,
    #[error("it contains `..`")]
    DotDot,
    #[error("it contains `/`, which would name a path outside the store")]
    Slash,
    #[error("it contains a NUL byte")]
    Nul,
    #[error("it contains {0:?}; names use only letters, digits, `.`, `_`, `+` and `-`")]
    BadChar(char),
}

/// The longest layer name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks `name` against the rule in docs/design.md: 1 to 128 of `[A-Za-z0-9._+-]`, not starting with `.`,
/// and (so that no reader mistakes it for a path step) no `..` anywhere.
///
/// The problems are checked from the most specific to the most general, so a name with a `/`
/// is reported as such rather than as "a bad character".
pub fn check_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.contains('\0') {
        return Err(NameProblem::Nul);
    }
    if name.contains('/') {
        return Err(NameProblem::Slash);
    }
    if name.starts_with('.') {
        return Err(NameProblem::LeadingDot);
    }
    if name.contains("..") {
        return Err(NameProblem::DotDot);
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
    {
        return Err(NameProblem::BadChar(bad));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong(name.len()));
    }
    Ok(())
}

/// Serde helper: a list of layer names, each checked, for files whose names become paths.
pub(crate) fn de_layer_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = <String as serde::Deserialize>::deserialize(d)?;
    check_name(&name)
        .map_err(|p| serde::de::Error::custom(format!("layer name {name:?} is not valid: {p}")))?;
    Ok(name)
}

pub(crate) fn de_layer_names<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    let names = <Vec<String> as serde::Deserialize>::deserialize(d)?;
    for name in &names {
        check_name(name).map_err(|p| {
            serde::de::Error::custom(format!("layer name {name:?} is not valid: {p}"))
        })?;
    }
    Ok(names)
}

/// An optional name checked as a layer name (a release name, which names layers).
pub(crate) fn de_opt_layer_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let name = <Option<String> as serde::Deserialize>::deserialize(d)?;
    if let Some(name) = &name {
        check_name(name).map_err(|p| {
            serde::de::Error::custom(format!("release name {name:?} is not valid: {p}"))
        })?;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design_rule() {
        let cases: &[(&str, Option<NameProblem>)] = &[
            ("basesystem", None),
            ("upgrade-2007-05-20-finallyfixed", None),
            ("v1.2+build_3", None),
            ("a.b", None),
            ("", Some(NameProblem::Empty)),
            ("a/b", Some(NameProblem::Slash)),
            ("/etc", Some(NameProblem::Slash)),
            ("..", Some(NameProblem::LeadingDot)),
            (".hidden", Some(NameProblem::LeadingDot)),
            ("a..b", Some(NameProblem::DotDot)),
            ("a\0b", Some(NameProblem::Nul)),
            ("with space", Some(NameProblem::BadChar(' '))),
            ("é", Some(NameProblem::BadChar('é'))),
            ("a:b", Some(NameProblem::BadChar(':'))),
        ];
        for (name, want) in cases {
            assert_eq!(check_name(name).err(), *want, "name {name:?}");
        }
    }

    #[test]
    fn length_limit_is_128_bytes() {
        assert!(check_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert_eq!(
            check_name(&"a".repeat(MAX_NAME_LEN + 1)),
            Err(NameProblem::TooLong(129))
        );
    }
}

/// `text` as it may reach a terminal: control characters (escape sequences, carriage returns,
/// bidirectional overrides) written as `\u{..}` escapes, so a title cannot move the cursor,
/// retitle the window or hide what follows it.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("Security fixes"), "Security fixes");
        assert_eq!(
            printable("X\u{1b}]0;pwned\u{7}\u{1b}[2J"),
            "X\\u{1b}]0;pwned\\u{7}\\u{1b}[2J"
        );
        assert_eq!(printable("a\u{202e}b\r\n"), "a\\u{202e}b\\u{d}\\u{a}");
        assert_eq!(printable("Überarbeitung ✓"), "Überarbeitung ✓");
    }
}
