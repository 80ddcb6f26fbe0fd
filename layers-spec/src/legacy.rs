//! Import of the legacy XO `.overlayplan` format: a `[Layers]` section of
//! `name="Title",ro` lines, top first; `ro` marks an accepted layer.

use crate::error::{Location, PlanError};
use crate::name::check_name;
use crate::plan::{Layer, LayerState, MAX_STACK, Plan};

/// Reads a legacy plan into a version-1 plan with default settings. Layers keep their order and
/// titles; `ro` becomes `active`, no flag `trial`. `file` names the file in errors.
pub fn import(text: &str, file: &str) -> Result<Plan, PlanError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut in_layers = false;
    let mut seen_header = false;
    let mut layers: Vec<(Layer, usize)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let err = |column: usize, message: String| PlanError::Legacy {
            at: Location::line(file, line_no, column),
            message,
        };
        let indent = raw.chars().take_while(|c| c.is_whitespace()).count();
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            let section = strip_comment(section).trim_end();
            let Some(section) = section.strip_suffix(']') else {
                return Err(err(
                    indent + 1,
                    format!("{line:?} opens a section but does not close it with `]`"),
                ));
            };
            if !section.trim().eq_ignore_ascii_case("layers") {
                return Err(err(
                    indent + 1,
                    format!("unknown section [{section}]; a legacy plan has one section, [Layers]"),
                ));
            }
            if seen_header {
                return Err(err(
                    indent + 1,
                    "a second [Layers] section; list every layer in one".into(),
                ));
            }
            in_layers = true;
            seen_header = true;
            continue;
        }
        if !in_layers {
            return Err(err(
                indent + 1,
                "a layer line before the [Layers] section; the file must start with [Layers]"
                    .into(),
            ));
        }
        let layer = parse_entry(raw).map_err(|(column, message)| err(column, message))?;
        if let Some((_, first)) = layers.iter().find(|(l, _)| l.name == layer.name) {
            return Err(err(
                indent + 1,
                format!(
                    "layer {:?} is listed twice (first at line {first})",
                    layer.name
                ),
            ));
        }
        // Refused here, at its line: the plan check below would name the plan it writes.
        if layers.len() == MAX_STACK as usize {
            return Err(err(
                indent + 1,
                format!(
                    "layer {:?} is one more than the {MAX_STACK} that fit in one overlay stack",
                    layer.name
                ),
            ));
        }
        layers.push((layer, line_no));
    }
    if !seen_header {
        return Err(PlanError::Legacy {
            at: Location::line(file, 1, 1),
            message: "no [Layers] section; this is not a legacy XO plan".into(),
        });
    }
    if layers.is_empty() {
        return Err(PlanError::Legacy {
            at: Location::line(file, text.lines().count().max(1), 1),
            message: "the [Layers] section lists no layers".into(),
        });
    }
    let plan = Plan::new(layers.into_iter().map(|(l, _)| l).collect());
    plan.check()?;
    Ok(plan)
}

/// One `name="Title",flag,…` line; errors carry the 1-based column.
fn parse_entry(raw: &str) -> Result<Layer, (usize, String)> {
    let column_of = |byte: usize| raw[..byte].chars().count() + 1;
    let Some(eq) = raw.find('=') else {
        return Err((
            column_of(raw.len() - raw.trim_start().len()),
            format!(
                "{:?} is not `name=\"Title\"` (with `,ro` for an accepted layer)",
                raw.trim()
            ),
        ));
    };
    let name = raw[..eq].trim();
    let name_col = column_of(raw.len() - raw.trim_start().len());
    check_name(name).map_err(|p| (name_col, format!("layer name {name:?} is not valid: {p}")))?;

    let value_start = eq + 1 + (raw[eq + 1..].len() - raw[eq + 1..].trim_start().len());
    let value = &raw[value_start..];
    let (title, rest_start) = if let Some(quoted) = value.strip_prefix('"') {
        let (title, len) = unquote(quoted).ok_or_else(|| {
            (
                column_of(value_start),
                "the title's quote is not closed".to_owned(),
            )
        })?;
        (title, value_start + 1 + len)
    } else {
        // An unquoted title runs to the first comma or comment.
        let end = value.find([',', '#', ';']).unwrap_or(value.len());
        (value[..end].trim().to_owned(), value_start + end)
    };

    let mut state = LayerState::Trial;
    let rest = strip_comment(&raw[rest_start..]);
    let trimmed = rest.trim();
    if !trimmed.is_empty() {
        let Some(flags) = trimmed.strip_prefix(',') else {
            return Err((
                column_of(rest_start + (rest.len() - rest.trim_start().len())),
                format!(
                    "unexpected {trimmed:?} after the title; flags follow a comma, as in `,ro`"
                ),
            ));
        };
        // Byte offset of `flags` within `raw`, to point at the flag that is wrong.
        let mut offset = rest_start + (rest.len() - rest.trim_start().len()) + 1;
        for piece in flags.split(',') {
            let flag = piece.trim();
            let at = offset + (piece.len() - piece.trim_start().len());
            offset += piece.len() + 1;
            if flag.is_empty() {
                continue;
            }
            if flag.eq_ignore_ascii_case("ro") {
                state = LayerState::Active;
            } else {
                return Err((
                    column_of(at),
                    format!("unknown flag {flag:?}; the only flag is `ro` (accepted)"),
                ));
            }
        }
    }
    let mut layer = Layer::new(name);
    layer.title = (!title.is_empty()).then_some(title);
    layer.state = state;
    Ok(layer)
}

/// Everything before a `#` or `;` comment.
fn strip_comment(text: &str) -> &str {
    text.find(['#', ';']).map_or(text, |at| &text[..at])
}

/// The body of a quoted title up to its closing quote, with `\"` and `\\` unescaped; returns it
/// and the number of bytes consumed including the closing quote.
fn unquote(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => match chars.next() {
                Some((_, e @ ('"' | '\\'))) => out.push(e),
                Some((_, other)) => {
                    out.push('\\');
                    out.push(other);
                }
                None => return None,
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const XO: &str = include_str!("../tests/fixtures/xo.overlayplan");

    fn summary(plan: &Plan) -> Vec<(&str, &str, LayerState)> {
        plan.layers
            .iter()
            .map(|l| {
                (
                    l.name.as_str(),
                    l.title.as_deref().unwrap_or(&l.name),
                    l.state,
                )
            })
            .collect()
    }

    #[test]
    fn the_xo_example_imports() {
        let plan = import(XO, "xo.overlayplan").unwrap();
        assert_eq!(
            summary(&plan),
            [
                (
                    "upgrade-2007-05-20-finallyfixed",
                    "Finally Fixed X Problem",
                    LayerState::Active
                ),
                (
                    "upgrade-2007-05-19-betterupdatestillbroken",
                    "It'll work this time!",
                    LayerState::Trial
                ),
                (
                    "upgrade-2007-05-18-nastystuff",
                    "Oh, some problem found",
                    LayerState::Trial
                ),
                ("basesystem", "Core System Image", LayerState::Active),
            ]
        );
        // The result is a valid plan that reads back as itself.
        assert_eq!(Plan::parse(&plan.to_toml().unwrap(), "t").unwrap(), plan);
    }

    #[test]
    fn tolerates_what_hand_edited_files_have() {
        let text = "\u{feff}# a comment\r\n; another\r\n\r\n  [Layers]  ; the layers\r\n\
                    top = \"Fix: a=b, c=\\\"d\\\" \\\\ e\" , RO ; accepted\r\n\
                    mid=\"Trying\",\r\n\
                    low=Unquoted ; a comment, with ro\r\n\
                    base=Plain title,ro # plain\r\n";
        let plan = import(text, "f").unwrap();
        assert_eq!(
            summary(&plan),
            [
                ("top", "Fix: a=b, c=\"d\" \\ e", LayerState::Active),
                ("mid", "Trying", LayerState::Trial),
                ("low", "Unquoted", LayerState::Trial),
                ("base", "Plain title", LayerState::Active),
            ]
        );
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let cases: &[(&str, &str)] = &[
            (
                "[Layers]\na=\"x\",ro\nb=\"unclosed\n",
                "f:3:3: the title's quote is not closed",
            ),
            ("[Layers]\na=\"x\",rw\n", "f:2:7: unknown flag \"rw\""),
            ("[Layers]\na=\"x\",ro,o\n", "f:2:10: unknown flag \"o\""),
            (
                "[Layers]\na=\"ro\" , ro , r\n",
                "f:2:15: unknown flag \"r\"",
            ),
            (
                "[Layers]\n  bad/name=\"x\"\n",
                "f:2:3: layer name \"bad/name\" is not valid: it contains `/`",
            ),
            (
                "[Layers]\na=\"x\"\na=\"y\"\n",
                "f:3:1: layer \"a\" is listed twice (first at line 2)",
            ),
            (
                "a=\"x\"\n[Layers]\n",
                "f:1:1: a layer line before the [Layers] section",
            ),
            ("[Layers]\n[Other]\n", "f:2:1: unknown section [Other]"),
            (
                "[Layers]\n[Layers\n",
                "f:2:1: \"[Layers\" opens a section but does not close it",
            ),
            (
                "[Layers]\njust words\n",
                "f:2:1: \"just words\" is not `name=\"Title\"`",
            ),
            (
                "[Layers]\na=\"x\" ro\n",
                "f:2:7: unexpected \"ro\" after the title",
            ),
            ("# nothing\n", "f:1:1: no [Layers] section"),
            (
                "[Layers]\n# none\n",
                "f:2:1: the [Layers] section lists no layers",
            ),
            ("", "f:1:1: no [Layers] section"),
        ];
        for (text, want) in cases {
            let got = import(text, "f").unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "input {text:?}\n got: {got}\nwant: {want}…"
            );
        }
    }
}
