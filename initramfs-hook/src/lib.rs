//! The early-boot program. This first part is steps 1 and 3 of the boot flow (DESIGN): read the
//! `strata.*` options, load the plan (with `.prev` fallback) and the boot state, and resolve the
//! stack. `initramfs-hook resolve` runs exactly that against a root directory, so the decision
//! the boot will make can be checked on any machine; mounting and switch_root come next.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use layers_spec::{BootOverrides, resolve, store};

/// The store's place on the root filesystem unless `strata.store=` says otherwise.
pub const DEFAULT_STORE: &str = "/strata";

#[derive(Debug, Parser)]
#[command(
    name = "initramfs-hook",
    version,
    about = "Strata's early-boot program"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: HookCommand,
}

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// Show the stack a boot of SYSROOT would mount, and why each other layer is left out.
    Resolve {
        /// The root filesystem holding the store.
        #[arg(long, default_value = "/")]
        sysroot: PathBuf,
        /// The kernel command line [default: /proc/cmdline].
        #[arg(long)]
        cmdline: Option<String>,
    },
}

pub fn run(cli: &Cli) -> Result<String> {
    match &cli.command {
        HookCommand::Resolve { sysroot, cmdline } => {
            let cmdline = match cmdline {
                Some(text) => text.clone(),
                None => fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?,
            };
            resolve_report(sysroot, &cmdline)
        }
    }
}

/// The boot's decision as text: problems on the command line, any plan fallback, the stack.
pub fn resolve_report(sysroot: &Path, cmdline: &str) -> Result<String> {
    let (overrides, problems) = BootOverrides::parse(cmdline);
    let mut report = String::new();
    for problem in &problems {
        report += &format!("strata: ignoring {problem}\n");
    }
    let store_dir = sysroot.join(
        overrides
            .store
            .as_deref()
            .unwrap_or(DEFAULT_STORE)
            .trim_start_matches('/'),
    );
    let plan = store::load_plan(&store_dir)
        .with_context(|| format!("loading the plan from {}", store_dir.display()))?;
    if let Some(why) = &plan.fell_back {
        report += &format!("strata: using {} because {why}\n", plan.path.display());
    }
    let state = store::load_state(&store_dir)
        .with_context(|| format!("loading the boot state from {}", store_dir.display()))?;
    if let Some(why) = &state.fell_back {
        report += &format!("strata: using {} because {why}\n", state.path.display());
    }
    let layers = store_dir.join("layers");
    let present = |name: &str| layers.join(name).is_dir();
    let resolution = resolve(&plan.value, &state.value, &overrides, Some(&present));
    report += &boot_ui::describe(&plan.value, &resolution);
    report += &format!(
        "strata: stack (top first): {}\n",
        resolution.stack.join(":")
    );
    report += &format!("strata: upper: {:?}\n", resolution.upper).to_lowercase();
    Ok(report)
}
