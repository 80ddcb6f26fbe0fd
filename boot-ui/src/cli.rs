//! `boot-ui`: the menu against a plan on any terminal, printing the chosen action as JSON (for
//! previews and tests).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use layers_spec::{BootOverrides, BootState, Plan, resolve};

use crate::app::{App, Setup};
use crate::term;

/// Runs the Strata boot menu against a plan and prints the chosen action as JSON.
#[derive(Debug, Parser)]
#[command(name = "boot-ui", version)]
pub struct Opts {
    /// The plan (overlayplan.toml) to show.
    #[arg(long, value_name = "PATH")]
    plan: PathBuf,
    /// The boot state (state/boot.toml) for trial counts and the one-shot selection.
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,
    /// Kernel command-line options to resolve the default stack with (strata.top=...).
    #[arg(long, value_name = "TEXT", default_value = "")]
    cmdline: String,
    /// Draw with ASCII only [default: unless the locale is UTF-8 on a capable terminal].
    #[arg(long, conflicts_with = "unicode")]
    ascii: bool,
    /// Draw with Unicode box characters whatever the locale says.
    #[arg(long)]
    unicode: bool,
    /// Boot the default after this many seconds unless a key is pressed.
    #[arg(long, value_name = "SECONDS")]
    countdown: Option<u32>,
    /// Offer the shell key.
    #[arg(long)]
    shell: bool,
    /// Show this as the reason the last boot fell back.
    #[arg(long, value_name = "TEXT")]
    fallback: Option<String>,
}

pub fn run(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> Result<()> {
    let opts = Opts::try_parse_from(args).unwrap_or_else(|e| e.exit());
    let plan_path = &opts.plan;
    let text = std::fs::read_to_string(plan_path)
        .with_context(|| format!("reading {}", plan_path.display()))?;
    let plan = Plan::parse(&text, &plan_path.display().to_string())?;
    let state = match &opts.state {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            BootState::parse(&text, &path.display().to_string())?
        }
        None => BootState::default(),
    };
    let (overrides, problems) = BootOverrides::parse(&opts.cmdline);
    if let Some(problem) = problems.first() {
        bail!("--cmdline: {problem}");
    }
    // The menu draws on standard error, so the JSON on standard output can be captured.
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        bail!("the menu needs a terminal on standard input and standard error");
    }
    let resolution = resolve(&plan, &state, &overrides, None);
    let setup = Setup {
        fallback: opts.fallback,
        shell: opts.shell,
        countdown: opts.countdown,
        lock: plan.boot.menu_lock.clone(),
        ascii: opts.ascii || (!opts.unicode && !term::unicode_ok()),
        save_refused: None,
    };
    let mut app = App::new(&plan, &resolution, &state, &|_| None, setup);
    let action = term::run_menu(&mut app).context("running the menu")?;
    println!("{}", serde_json::to_string(&action)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let opts =
            Opts::try_parse_from(["boot-ui", "--plan", "p.toml", "--ascii", "--countdown", "3"])
                .unwrap();
        assert_eq!(opts.plan, PathBuf::from("p.toml"));
        assert!(opts.ascii);
        assert_eq!(opts.countdown, Some(3));
        assert!(Opts::try_parse_from(["boot-ui"]).is_err());
        assert!(Opts::try_parse_from(["boot-ui", "--plan", "p", "--ascii", "--unicode"]).is_err());
    }
}
