//! `strata.*` options on the kernel command line: choices made at boot that override the plan.

use crate::name::check_name;
use crate::plan::UpperMode;

/// What the kernel command line asks of this boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootOverrides {
    /// `strata.top=NAME`: boot with NAME as the top layer; everything above it is left out.
    pub top: Option<String>,
    /// `strata.disable=a,b` (may be given more than once): leave these layers out.
    pub disable: Vec<String>,
    /// `strata.menu`: show the boot menu whatever the plan says.
    pub menu: bool,
    /// `strata.upper=tmpfs|persistent`.
    pub upper: Option<UpperMode>,
    /// `strata.store=/PATH`: where the store is on the root filesystem.
    pub store: Option<String>,
    /// `strata.debug`: log every step.
    pub debug: bool,
    /// `strata.stack=a,b,c`: exactly these layers, top first, with no menu and no trial boot
    /// counted: what the hook passes to the kernel it restarts into (kexec) for the stack it
    /// chose.
    pub stack: Option<Vec<String>>,
}

/// A `strata.*` parameter that was not understood. The boot goes on without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line `{param}`: {message}")]
pub struct CmdlineProblem {
    /// The parameter as written (quotes removed).
    pub param: String,
    pub message: String,
}

const PREFIX: &str = "strata.";
const KNOWN: &str = "strata.top, strata.disable, strata.menu, strata.upper, strata.store, strata.debug, strata.stack";

impl BootOverrides {
    /// Reads the `strata.*` parameters of a kernel command line such as `/proc/cmdline`.
    /// Other parameters are not ours and are passed over; everything after `--` belongs to init.
    /// A parameter given twice takes its last value, as the kernel does, except `strata.disable`,
    /// whose lists add up.
    pub fn parse(cmdline: &str) -> (Self, Vec<CmdlineProblem>) {
        let mut overrides = Self::default();
        let mut problems = Vec::new();
        for param in split_params(cmdline) {
            if param == "--" {
                break;
            }
            let Some(rest) = param.strip_prefix(PREFIX) else {
                continue;
            };
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (rest, None),
            };
            if let Err(message) = overrides.apply(key, value) {
                problems.push(CmdlineProblem {
                    param: param.clone(),
                    message,
                });
            }
        }
        (overrides, problems)
    }

    fn apply(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        match key {
            "top" => {
                let name = required(value, "a layer name")?;
                check_name(name).map_err(|p| format!("{name:?} is not a layer name: {p}"))?;
                self.top = Some(name.to_owned());
            }
            "disable" => {
                let list = required(value, "a comma-separated list of layer names")?;
                let mut names = Vec::new();
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    check_name(name).map_err(|p| format!("{name:?} is not a layer name: {p}"))?;
                    names.push(name.to_owned());
                }
                for name in names {
                    if !self.disable.contains(&name) {
                        self.disable.push(name);
                    }
                }
            }
            "stack" => {
                let list = required(value, "a comma-separated list of layer names, top first")?;
                let mut names: Vec<String> = Vec::new();
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    check_name(name).map_err(|p| format!("{name:?} is not a layer name: {p}"))?;
                    if names.iter().any(|n| n == name) {
                        return Err(format!("{name:?} is named twice"));
                    }
                    names.push(name.to_owned());
                }
                if names.is_empty() {
                    return Err("needs at least one layer name".into());
                }
                self.stack = Some(names);
            }
            "menu" => self.menu = flag(value)?,
            "debug" => self.debug = flag(value)?,
            "upper" => {
                self.upper = Some(match required(value, "tmpfs or persistent")? {
                    "tmpfs" => UpperMode::Tmpfs,
                    "persistent" => UpperMode::Persistent,
                    other => {
                        return Err(format!(
                            "{other:?} is not an upper mode; use tmpfs or persistent"
                        ));
                    }
                });
            }
            "store" => {
                let path = required(value, "an absolute path")?;
                if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                    return Err(format!(
                        "{path:?} is not usable; give an absolute path without `..`, such as /strata"
                    ));
                }
                self.store = Some(path.to_owned());
            }
            _ => return Err(format!("unknown option; known options are {KNOWN}")),
        }
        Ok(())
    }
}

fn required<'a>(value: Option<&'a str>, what: &str) -> Result<&'a str, String> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("needs a value: {what}")),
    }
}

/// A bare flag is on; `=1/0`, `yes/no`, `on/off`, `true/false` say so explicitly.
fn flag(value: Option<&str>) -> Result<bool, String> {
    match value {
        None => Ok(true),
        Some("1" | "yes" | "y" | "on" | "true") => Ok(true),
        Some("0" | "no" | "n" | "off" | "false") => Ok(false),
        Some(other) => Err(format!(
            "{other:?} is not on or off; write the option alone, or =1 or =0"
        )),
    }
}

/// Splits a command line as the kernel does: on whitespace outside double quotes. Quotes group
/// and are removed (`strata.top="a b"` and `"strata.top=a b"` both give `strata.top=a b`).
fn split_params(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut in_quote = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quote = !in_quote;
                started = true;
            }
            c if c.is_whitespace() && !in_quote => {
                if started {
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        params.push(current);
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_option() {
        let (o, problems) = BootOverrides::parse(
            "BOOT_IMAGE=/vmlinuz root=/dev/vda rw strata.top=upgrade-5 strata.disable=a,b \
             strata.disable=c strata.menu strata.upper=tmpfs strata.store=/data/strata strata.debug quiet\n",
        );
        assert_eq!(problems, []);
        assert_eq!(
            o,
            BootOverrides {
                top: Some("upgrade-5".into()),
                disable: vec!["a".into(), "b".into(), "c".into()],
                menu: true,
                upper: Some(UpperMode::Tmpfs),
                store: Some("/data/strata".into()),
                debug: true,
                stack: None,
            }
        );
    }

    #[test]
    fn a_given_stack() {
        let (o, problems) = BootOverrides::parse("strata.stack=up-2,base quiet");
        assert_eq!(problems, []);
        assert_eq!(o.stack, Some(vec!["up-2".to_owned(), "base".to_owned()]));
        for bad in [
            "strata.stack=",
            "strata.stack=a,a",
            "strata.stack=a,../x",
            "strata.stack=,",
        ] {
            let (o, problems) = BootOverrides::parse(bad);
            assert_eq!((o.stack, problems.len()), (None, 1), "{bad}");
        }
    }

    #[test]
    fn nothing_of_ours_means_defaults() {
        let (o, problems) = BootOverrides::parse("root=UUID=1234 ro quiet splash");
        assert_eq!((o, problems), (BootOverrides::default(), vec![]));
        assert_eq!(BootOverrides::parse("").0, BootOverrides::default());
    }

    #[test]
    fn quoted_values() {
        let (o, problems) = BootOverrides::parse(
            r#"strata.disable="a, b" "strata.top=base" strata.store="/my store""#,
        );
        assert_eq!(problems, []);
        assert_eq!(o.disable, ["a", "b"]);
        assert_eq!(o.top.as_deref(), Some("base"));
        assert_eq!(o.store.as_deref(), Some("/my store"));
    }

    #[test]
    fn flags_take_explicit_values_and_last_wins() {
        let (o, problems) = BootOverrides::parse(
            "strata.menu strata.menu=0 strata.debug=yes strata.upper=tmpfs strata.upper=persistent",
        );
        assert_eq!(problems, []);
        assert!(!o.menu);
        assert!(o.debug);
        assert_eq!(o.upper, Some(UpperMode::Persistent));
    }

    #[test]
    fn arguments_for_init_are_not_read() {
        let (o, problems) = BootOverrides::parse("root=/dev/sda -- strata.menu strata.bogus");
        assert_eq!((o.menu, problems), (false, vec![]));
    }

    #[test]
    fn problems_are_reported_not_ignored() {
        let (o, problems) = BootOverrides::parse(
            "strata.tpo=x strata.upper=ram strata.top= strata.top=../etc strata.disable=ok,a/b \
             strata.store=relative strata.menu=maybe strata.top=good",
        );
        let report: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(report.len(), 7, "{report:#?}");
        assert!(report[0].contains("`strata.tpo=x`: unknown option; known options are strata.top"));
        assert!(report[1].contains("\"ram\" is not an upper mode"));
        assert!(report[2].contains("`strata.top=`: needs a value"));
        assert!(report[3].contains("\"../etc\" is not a layer name: it contains `/`"));
        assert!(report[4].contains("\"a/b\" is not a layer name"));
        assert!(report[5].contains("\"relative\" is not usable"));
        assert!(report[6].contains("\"maybe\" is not on or off"));
        // What was good still applies; a bad list changes nothing.
        assert_eq!(o.top.as_deref(), Some("good"));
        assert!(o.disable.is_empty());
        assert_eq!(o.upper, None);
    }

    #[test]
    fn splits_like_the_kernel() {
        assert_eq!(
            split_params("  a  b\t\"c d\"e  \"\" "),
            ["a", "b", "c de", ""]
        );
    }
}
