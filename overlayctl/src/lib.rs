//! `overlayctl`: the command line over a Strata store. One command enum, one function per
//! command; the plan logic lives in `layers-spec`.

pub mod engine;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use layers_spec::store::{self, Loaded};
use layers_spec::{BootOverrides, BootState, LayerState, Plan, Resolution, legacy, resolve};
use serde::Serialize;

/// Where the hook leaves the store of the running system.
pub const BOOTED_STORE: &str = "/run/strata/store";
/// The hook's record of the current boot; its presence means the hook booted this system.
pub const BOOTED_RECORD: &str = "/run/strata/booted.toml";
/// The store on an unbooted root filesystem.
pub const DEFAULT_STORE: &str = "/strata";

/// Manage the layered root filesystem of this device.
#[derive(Debug, Parser)]
#[command(name = "overlayctl", version, about)]
pub struct Cli {
    /// The store to work on [default: /run/strata/store when booted by Strata, else /strata]
    #[arg(long, global = true, env = "STRATA_STORE", value_name = "PATH")]
    pub store: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the layers, top first, and what the next boot mounts (the default command).
    Status,
    /// Check a plan file and report the first problem with its line and column.
    Check(CheckOpts),
    /// Convert a legacy XO `.overlayplan` into the store's plan.
    ImportLegacy(ImportLegacyOpts),
}

#[derive(Debug, Args)]
pub struct CheckOpts {
    /// The plan to check [default: the store's overlayplan.toml]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportLegacyOpts {
    /// The legacy plan (`[Layers]` with `name="Title",ro` lines, top first).
    pub file: PathBuf,
    /// Replace a plan the store already has (it is kept as overlayplan.toml.prev).
    #[arg(long)]
    pub force: bool,
}

/// Runs one command, writing its report to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    let store = cli.store.unwrap_or_else(default_store);
    match cli.command.unwrap_or(Command::Status) {
        Command::Status => status(&store, cli.json, out),
        Command::Check(opts) => check(&store, &opts, cli.json, out),
        Command::ImportLegacy(opts) => import_legacy(&store, &opts, cli.json, out),
    }
}

fn default_store() -> PathBuf {
    if Path::new(BOOTED_RECORD).exists() {
        BOOTED_STORE.into()
    } else {
        DEFAULT_STORE.into()
    }
}

fn load_plan(store: &Path) -> Result<Loaded<Plan>> {
    let loaded = store::load_plan(store)
        .with_context(|| format!("loading the plan of the store at {}", store.display()))?;
    if let Some(why) = &loaded.fell_back {
        eprintln!(
            "overlayctl: warning: using {} because {why}",
            loaded.path.display()
        );
    }
    Ok(loaded)
}

#[derive(Serialize)]
struct StatusJson<'a> {
    store: &'a Path,
    plan: &'a Path,
    plan_fell_back: Option<String>,
    layers: Vec<LayerJson<'a>>,
    next_boot: &'a [String],
    notes: Vec<String>,
}

#[derive(Serialize)]
struct LayerJson<'a> {
    name: &'a str,
    title: Option<&'a str>,
    state: LayerState,
    trial_tries_left: Option<u32>,
    known_good: bool,
    parent: Option<&'a str>,
    created: Option<String>,
    digest: Option<&'a str>,
    next_boot: bool,
    left_out: Option<String>,
}

fn status(store: &Path, json: bool, out: &mut dyn Write) -> Result<()> {
    let loaded = load_plan(store)?;
    let plan = &loaded.value;
    let state = store::load_state(store)
        .with_context(|| format!("loading the boot state of {}", store.display()))?
        .value;
    let present = |name: &str| store.join("layers").join(name).is_dir();
    let next = resolve(plan, &state, &BootOverrides::default(), Some(&present));

    if json {
        let report = StatusJson {
            store,
            plan: &loaded.path,
            plan_fell_back: loaded.fell_back.as_ref().map(ToString::to_string),
            layers: plan
                .layers
                .iter()
                .map(|l| LayerJson {
                    name: &l.name,
                    title: l.title.as_deref(),
                    state: l.state,
                    trial_tries_left: tries_left(plan, &state, &l.name),
                    known_good: l.known_good,
                    parent: l.parent.as_deref(),
                    created: l.created.map(|c| c.to_string()),
                    digest: l.digest.as_deref(),
                    next_boot: next.stack.contains(&l.name),
                    left_out: next.reason(&l.name).map(ToString::to_string),
                })
                .collect(),
            next_boot: &next.stack,
            notes: next.notes.iter().map(ToString::to_string).collect(),
        };
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    write_status_table(plan, &state, &next, out)?;
    Ok(())
}

fn tries_left(plan: &Plan, state: &BootState, name: &str) -> Option<u32> {
    let layer = plan.layer(name)?;
    (layer.state == LayerState::Trial)
        .then(|| plan.boot.trial_boots.saturating_sub(state.tries(name)))
}

/// The text table. Names are never cut (they are what people type); the title takes what is
/// left of 80 columns.
fn write_status_table(
    plan: &Plan,
    state: &BootState,
    next: &Resolution,
    out: &mut dyn Write,
) -> Result<()> {
    const FIXED: usize = 2 + 1 + 10 + 1 + 2 + 1 + 10 + 1;
    const MIN_TITLE: usize = 8;
    let name_width = plan
        .layers
        .iter()
        .map(|l| l.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let title_width = 80usize.saturating_sub(FIXED + name_width).max(MIN_TITLE);
    writeln!(
        out,
        "A {:<name_width$} {:<10} {:<2} {:<10} TITLE",
        "NAME", "STATE", "KG", "CREATED"
    )?;
    for layer in &plan.layers {
        let mark = if next.stack.contains(&layer.name) {
            "*"
        } else {
            " "
        };
        let shown_state = match tries_left(plan, state, &layer.name) {
            Some(left) => format!("trial {left}/{}", plan.boot.trial_boots),
            None => format!("{:?}", layer.state).to_lowercase(),
        };
        let created = layer
            .created
            .and_then(|c| c.date)
            .map(|d| d.to_string())
            .unwrap_or_default();
        let line = format!(
            "{mark} {:<name_width$} {:<10} {:<2} {:<10} {}",
            layer.name,
            shown_state,
            if layer.known_good { "kg" } else { "" },
            created,
            ellipsize(layer.display_title(), title_width),
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    if !next.left_out.is_empty() {
        writeln!(out, "Left out of the next boot:")?;
    }
    for left in &next.left_out {
        writeln!(out, "  {}: {}", left.name, left.reason)?;
    }
    for note in &next.notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

fn ellipsize(text: &str, width: usize) -> String {
    let text = text.lines().next().unwrap_or("");
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn check(store: &Path, opts: &CheckOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let path = opts.file.clone().unwrap_or_else(|| store::plan_path(store));
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let plan = Plan::parse(&text, &path.display().to_string())?;
    if json {
        serde_json::to_writer(
            &mut *out,
            &serde_json::json!({ "file": path, "valid": true, "layers": plan.layers.len() }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{}: a valid plan of {} layers",
            path.display(),
            plan.layers.len()
        )?;
    }
    Ok(())
}

fn import_legacy(
    store: &Path,
    opts: &ImportLegacyOpts,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let text = fs::read_to_string(&opts.file)
        .with_context(|| format!("reading {}", opts.file.display()))?;
    let plan = legacy::import(&text, &opts.file.display().to_string())?;
    if !store.is_dir() {
        bail!(
            "the store {} does not exist; create it first (overlayctl init, or mkdir)",
            store.display()
        );
    }
    let target = store::plan_path(store);
    if target.exists() && !opts.force {
        bail!(
            "{} already exists; pass --force to replace it (the old plan is kept as .prev)",
            target.display()
        );
    }
    store::save_plan(store, &plan).with_context(|| format!("writing {}", target.display()))?;
    if json {
        serde_json::to_writer(
            &mut *out,
            &serde_json::json!({ "plan": target, "layers": plan.layers.len() }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "imported {} layers into {}",
            plan.layers.len(),
            target.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from(["overlayctl", "--store", "/s", "--json"]).unwrap();
        assert!(cli.command.is_none() && cli.json);
        assert_eq!(cli.store.as_deref(), Some(Path::new("/s")));
        let cli =
            Cli::try_parse_from(["overlayctl", "import-legacy", "x.plan", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::ImportLegacy(ImportLegacyOpts { force: true, .. }))
        ));
        assert!(Cli::try_parse_from(["overlayctl", "bogus"]).is_err());
        assert!(Cli::try_parse_from(["overlayctl", "import-legacy"]).is_err());
    }

    #[test]
    fn ellipsizes_to_width() {
        assert_eq!(ellipsize("short", 10), "short");
        assert_eq!(ellipsize("exactly-10", 10), "exactly-10");
        assert_eq!(ellipsize("much-too-long", 10), "much-too-…");
        assert_eq!(ellipsize("two\nlines", 10), "two");
    }
}
