//! `overlayctl`: the command line over a Strata store. The clap types are in [`cli`]; `run`
//! calls one function per command (in [`commands`], [`status`], [`mount`]), which prints as text
//! or JSON what an operation returns. The operations take plain inputs and return typed reports:
//! changes go through one [`transaction::Transaction`] ([`ops`], [`changes`], [`compaction`],
//! [`mod@run`], [`policy::apply`]); reports only read ([`status::gather`], [`verify`], [`diff`],
//! [`keys`]).
pub mod adopt;
pub mod bootkernel;
pub mod bundle;
pub mod changes;
pub mod channel;
pub mod cli;
pub mod commands;
pub mod compaction;
pub mod diff;
pub mod engine;
pub mod fetch;
pub mod install;
pub mod keys;
pub mod mount;
pub mod oci;
pub mod ops;
pub mod policy;
pub mod progress;
pub mod recover;
pub mod run;
pub mod space;
pub mod status;
pub mod store;
pub mod transaction;
pub mod uppers;
pub mod verify;

pub use cli::*;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

/// Where the hook leaves the store of the running system.
pub const BOOTED_STORE: &str = layers_store::layout::BOOTED_STORE;
/// The store on an unbooted root filesystem.
pub const DEFAULT_STORE: &str = layers_store::layout::DEFAULT_STORE;

/// Runs one command, writing its report to `out`. A long job's report waits until its
/// progress line is gone, so the two never share a line of the terminal.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    let store = cli.store.unwrap_or_else(default_store);
    let json = cli.json;
    progress::enable(json);
    let command = cli.command.unwrap_or(Command::Status);
    let Some(progress) = long_job(&command).map(progress::Phase::start) else {
        return dispatch(&store, json, cli.verbose, command, out);
    };
    let mut report = Vec::new();
    let result = dispatch(&store, json, cli.verbose, command, &mut report);
    drop(progress);
    out.write_all(&report)?;
    result
}

fn dispatch(
    store: &Path,
    json: bool,
    verbose: bool,
    command: Command,
    out: &mut dyn Write,
) -> Result<()> {
    let store = store.to_owned();
    match command {
        Command::Status => status::status(&store, json, verbose, out),
        Command::Init(opts) => commands::init(&store, &opts, json, out),
        Command::Adopt(opts) => commands::adopt(&opts, json, out),
        Command::Release => commands::release(&store, json, out),
        Command::Assess(opts) => commands::assess(&store, &opts, json, out),
        Command::Switch(opts) => commands::switch(&store, &opts, json, out),
        Command::AddLayer(opts) => commands::add_layer(&store, &opts, json, out),
        Command::Pull(opts) => commands::pull(&store, &opts, json, out),
        Command::Update(opts) => commands::update(&store, &opts, json, out),
        Command::Channel(command) => commands::channel(&store, &command, json, out),
        Command::Sync(opts) => commands::sync(&store, &opts, json, out),
        Command::Enable(opts) => commands::enable(&store, &opts.layers, json, out),
        Command::Disable(opts) => commands::disable(&store, &opts.layers, json, out),
        Command::Accept(opts) => commands::accept(&store, &opts.layers, json, out),
        Command::KnownGood(opts) => commands::known_good(&store, &opts, json, out),
        Command::Rollback(opts) => commands::rollback(&store, opts.to.as_deref(), json, out),
        Command::Remove(opts) => commands::remove(&store, &opts, json, out),
        Command::Mount(opts) => mount::mount_command(&store, &opts, json, out),
        Command::Umount(opts) => mount::umount_command(&opts.mountpoint, json, out),
        Command::Verify(opts) => commands::verify(&store, opts.layer.as_deref(), json, out),
        Command::Check(opts) => commands::check(&store, &opts, json, out),
        Command::ImportLegacy(opts) => commands::import_legacy(&store, &opts, json, out),
        Command::MenuLock(opts) => commands::menu_lock(&store, &opts, json, out),
        Command::Compact(opts) => commands::compact(&store, &opts, json, out),
        Command::Policy(opts) => commands::policy(&store, &opts, json, out),
        Command::Diff(opts) => commands::diff(&store, &opts, json, out),
        Command::Run(opts) => commands::run(&store, &opts, json, out),
        Command::Checkpoint(opts) => commands::checkpoint(&store, &opts, json, out),
        Command::RunChild(opts) => run::child(&store, &opts.scratch, &opts.lowers, &opts.command),
        Command::Bundle(command) => commands::bundle(&store, &command, json, out),
        Command::Keys(command) => commands::keys(&store, &command, json, out),
    }
}

/// What a command that may take long is doing, for its progress line (`run` shows one of its
/// own once its command is done: the command has the terminal before).
fn long_job(command: &Command) -> Option<String> {
    Some(match command {
        Command::Init(opts) => match (&opts.base, &opts.image) {
            (Some(base), _) => format!("making the base layer from {}", base.display()),
            (None, Some(image)) => format!("making the store from {image}"),
            (None, None) => return None,
        },
        Command::Pull(opts) => format!("pulling {}", opts.image),
        Command::AddLayer(opts) => match (&opts.dir, &opts.bundle) {
            (_, Some(bundle)) => format!("adding the layer in {}", bundle.display()),
            (Some(dir), None) => format!("adding {} as a layer", dir.display()),
            (None, None) => return None,
        },
        Command::Sync(opts) => format!("syncing to {}", opts.target.display()),
        Command::Compact(_) => "compacting".to_owned(),
        Command::Verify(_) => "verifying".to_owned(),
        Command::Bundle(BundleCommand::Create { output, .. }) => {
            format!("making {}", output.display())
        }
        Command::Bundle(BundleCommand::Verify { file }) => format!("checking {}", file.display()),
        _ => return None,
    })
}

fn default_store() -> PathBuf {
    if store::booted_record_path().exists() {
        BOOTED_STORE.into()
    } else {
        DEFAULT_STORE.into()
    }
}

/// Writes `value` as JSON and a newline.
pub(crate) fn write_json(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The file name of a path, when it is a valid layer name.
pub(crate) fn name_from_path(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    layers_spec::check_name(name)
        .is_ok()
        .then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_from_paths() {
        assert_eq!(
            name_from_path(Path::new("/tmp/upgrade-2")).as_deref(),
            Some("upgrade-2")
        );
        assert_eq!(name_from_path(Path::new("/tmp/has space")), None);
        assert_eq!(name_from_path(Path::new("/")), None);
    }
}
