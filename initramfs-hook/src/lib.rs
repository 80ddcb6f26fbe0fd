//! The early-boot program: the boot flow ([`flow`]: options, plan and state, the boot menu,
//! the overlay with its fallbacks, the record), the standalone `/init` ([`standalone`]), the
//! initramfs it runs from ([`mkinitramfs`]), and the console the menu runs on ([`console`]).
//! `initramfs-hook resolve` shows the decision a boot would make on any machine, and
//! `initramfs-hook boot` runs the flow on a mounted root, and `initramfs-hook take-root` puts the
//! stack in place of a root another initramfs mounted ([`takeover`]: the dracut and
//! initramfs-tools glue).

pub mod console;
pub mod flow;
pub mod freeze;
pub mod kexec;
pub mod log;
pub mod mkinitramfs;
pub mod standalone;
pub mod takeover;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use layers_spec::{BootOverrides, resolve};

pub use flow::DEFAULT_STORE;

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
    /// Build a minimal initramfs whose /init is this program (standalone mode).
    Mkinitramfs {
        /// The image to write.
        #[arg(short, long)]
        output: PathBuf,
        /// The kernel's module directory (lib/modules/VERSION, with modules.dep).
        #[arg(long, value_name = "DIR")]
        modules_dir: Option<PathBuf>,
        /// A module to include and load at boot, with its dependencies (repeat as needed).
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
        /// A static busybox to include, for an emergency shell.
        #[arg(long, value_name = "PATH")]
        busybox: Option<PathBuf>,
        /// Write an uncompressed cpio instead of gzip.
        #[arg(long)]
        no_compress: bool,
        /// The /init to install [default: this program]
        #[arg(long, value_name = "PATH")]
        init: Option<PathBuf>,
    },
    /// Run the boot flow on a mounted root: mount the stack at NEWROOT, record it in
    /// RUN/strata/booted.toml, count trial boots, and bind the store at RUN/strata/store.
    /// (The standalone /init does this and then switch_roots; dracut and initramfs-tools call
    /// this.)
    Boot {
        /// The real root filesystem, mounted.
        #[arg(long)]
        sysroot: PathBuf,
        /// Where to mount the overlay.
        #[arg(long)]
        newroot: PathBuf,
        /// The directory that becomes the new root's /run.
        #[arg(long, default_value = "/run")]
        run: PathBuf,
        /// The kernel command line [default: /proc/cmdline].
        #[arg(long)]
        cmdline: Option<String>,
        /// For tests: keys for the boot menu, by name (`down t enter`), instead of a terminal.
        #[arg(long, value_name = "KEYS")]
        menu_keys: Option<String>,
    },
    /// Put the layered root in place of the real root another initramfs mounted at ROOT (all
    /// the initramfs-tools and dracut glue does): read the command line, move the real root to
    /// RUN/strata/root, make it writable, and mount the stack at ROOT. Without a store, or when
    /// no stack mounts, the real root stays (or goes back) at ROOT. Never fails the boot.
    TakeRoot {
        /// Where the next stage expects the root (initramfs-tools' ${rootmnt}, dracut's
        /// $NEWROOT), with the real root mounted there.
        #[arg(long)]
        root: PathBuf,
        /// Where the real root is mounted instead, when not at ROOT.
        #[arg(long)]
        real: Option<PathBuf>,
        /// The directory that becomes the new root's /run.
        #[arg(long, default_value = "/run")]
        run: PathBuf,
        /// The kernel command line [default: /proc/cmdline].
        #[arg(long)]
        cmdline: Option<String>,
        /// For tests: keys for the boot menu, by name (`down t enter`), instead of a terminal.
        #[arg(long, value_name = "KEYS")]
        menu_keys: Option<String>,
    },
}

fn console_for(menu_keys: Option<&str>) -> Result<Box<dyn console::Console>> {
    Ok(match menu_keys {
        Some(keys) => Box::new(
            console::Scripted::parse(keys)
                .map_err(anyhow::Error::msg)
                .context("--menu-keys")?,
        ),
        None => Box::new(console::Terminal::default()),
    })
}

pub fn run(cli: &Cli) -> Result<String> {
    let cmdline = |given: &Option<String>| -> Result<String> {
        match given {
            Some(text) => Ok(text.clone()),
            None => fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline"),
        }
    };
    match &cli.command {
        HookCommand::Resolve {
            sysroot,
            cmdline: given,
        } => resolve_report(sysroot, &cmdline(given)?),
        HookCommand::Mkinitramfs {
            output,
            modules_dir,
            modules,
            busybox,
            no_compress,
            init,
        } => {
            let spec = mkinitramfs::ImageSpec {
                init: match init {
                    Some(path) => path.clone(),
                    None => std::env::current_exe().context("finding this program")?,
                },
                modules_dir: modules_dir.clone(),
                modules: modules.clone(),
                busybox: busybox.clone(),
                gzip: !no_compress,
            };
            let loaded = mkinitramfs::build(&spec, output)?;
            Ok(format!(
                "wrote {} ({} modules: {})\n",
                output.display(),
                loaded.len(),
                loaded.join(" ")
            ))
        }
        HookCommand::Boot {
            sysroot,
            newroot,
            run,
            cmdline: given,
            menu_keys,
        } => {
            let mut console = console_for(menu_keys.as_deref())?;
            let env = flow::BootEnv {
                sysroot: sysroot.clone(),
                newroot: newroot.clone(),
                run: run.clone(),
                cmdline: cmdline(given)?,
                may_restart: false,
            };
            let mut log = flow::Log::default();
            let outcome = flow::boot(&env, &mut log, console.as_mut())?;
            Ok(outcome.booted.to_toml()?)
        }
        HookCommand::TakeRoot {
            root,
            real,
            run,
            cmdline: given,
            menu_keys,
        } => {
            let mut console = console_for(menu_keys.as_deref())?;
            let places = takeover::Places {
                root: root.clone(),
                real: real.clone(),
                run: run.clone(),
                // Without the command line the defaults hold: the boot goes on.
                cmdline: cmdline(given).unwrap_or_default(),
            };
            let mut log = flow::Log {
                kmsg: true,
                ..Default::default()
            };
            Ok(
                match takeover::take_root(&places, &mut log, console.as_mut()) {
                    takeover::TookRoot::Layered => "strata: the layered root is mounted\n".into(),
                    takeover::TookRoot::Plain(why) => format!("strata: {why}\n"),
                    takeover::TookRoot::Already(record) => format!(
                        "strata: {} exists: this boot's root is already taken\n",
                        record.display()
                    ),
                },
            )
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
    // Symlinks on the way resolve inside SYSROOT, as they will when it is `/`.
    let store = layers_store::Store::open_in_root(
        sysroot,
        Path::new(overrides.store.as_deref().unwrap_or(DEFAULT_STORE)),
    )?;
    let store_dir = store.path();
    let plan = store
        .load_plan()
        .with_context(|| format!("loading the plan from {}", store_dir.display()))?;
    if let Some(why) = &plan.fell_back {
        report += &format!("strata: using {} because {why}\n", plan.path.display());
    }
    let state = store
        .load_state()
        .with_context(|| format!("loading the boot state from {}", store_dir.display()))?;
    if let Some(why) = &state.fell_back {
        report += &format!("strata: using {} because {why}\n", state.path.display());
    }
    let presence = store.layer_presence();
    let present = |name: &str| presence.has(name);
    let resolution = resolve(&plan.value, &state.value, &overrides, Some(&present));
    report += &boot_ui::describe(&plan.value, &resolution);
    report += &format!(
        "strata: stack (top first): {}\n",
        resolution.stack.join(":")
    );
    report += &format!("strata: upper: {:?}\n", resolution.upper).to_lowercase();
    Ok(report)
}
