//! One function per command that changes or checks the store (status and mount have their own
//! modules). Each takes the store lock for a change, refuses bad input before touching anything,
//! and reports what the next boot will mount.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use layers_spec::{LayerState, Plan, legacy, printable};

use crate::changes::{self, Changed};
use crate::engine::XattrNs;
use crate::engine::delta::Compare;
use crate::ops::{self, NewLayer};
use crate::store::Store;
use crate::transaction::Transaction;
use crate::{
    AddLayerOpts, AdoptOpts, AssessOpts, BundleCommand, ChannelCommand, CheckOpts, CheckpointOpts,
    CompactOpts, DiffOpts, ImportLegacyOpts, InitOpts, KeysCommand, KnownGoodOpts, MenuLockOpts,
    PolicyOpts, PullOpts, RemoveOpts, RunOpts, SwitchOpts, SyncOpts, UpdateOpts, name_from_path,
    write_json,
};

/// Prints what a change did and what the next boot will mount.
fn print_changed(changed: &Changed, json: bool, out: &mut dyn Write) -> Result<()> {
    if json {
        return write_json(out, changed);
    }
    writeln!(out, "{}", changed.summary)?;
    writeln!(out, "next boot: {}", changed.next_boot.join(", "))?;
    for note in &changed.notes {
        writeln!(out, "warning: {note}")?;
    }
    Ok(())
}

pub fn init(root: &Path, opts: &InitOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    if let Some(image) = &opts.image {
        let downloads = root.join(crate::fetch::DOWNLOADS);
        let (mut source, short_name) =
            crate::oci::open_source(image, &opts.registry.access(), &downloads)?;
        let request = crate::oci::pull::Request {
            name: opts.name.clone(),
            short_name,
            title: opts.title.clone(),
            squash: opts.squash,
            state: LayerState::Active,
            notes: None,
            release: None,
        };
        let pulled = crate::oci::pull::init(root, source.as_mut(), &request)?;
        return report_pulled(&pulled, json, out);
    }
    let base = opts
        .base
        .as_deref()
        .expect("clap requires --base or --image");
    let layer = NewLayer {
        name: opts.name.clone().unwrap_or_else(|| "base".to_owned()),
        title: opts.title.clone(),
        parent: None,
        state: LayerState::Active,
        known_good: true,
        notes: None,
        release: None,
    };
    let added = ops::init(root, base, &layer, opts.move_base)?;
    report_added(&added, root, json, out)
}

pub fn adopt(opts: &AdoptOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store_name = layers_store::layout::DEFAULT_STORE.trim_start_matches('/');
    let adopted = crate::adopt::adopt(&opts.root, store_name, &opts.name, !opts.no_bootloader)?;
    if json {
        return write_json(out, &adopted);
    }
    writeln!(
        out,
        "at the next boot, {} entries of the root ({}) and {} of /boot become layer {} of the store {}, by rename",
        adopted.entries.len(),
        adopted.entries.join(", "),
        adopted.boot_entries.len(),
        adopted.layer,
        adopted.store.display()
    )?;
    writeln!(
        out,
        "the next boot starts kernel {} from /boot/strata/default",
        adopted.kernel
    )?;
    match &adopted.bootloader {
        Some(config) => writeln!(
            out,
            "wrote {} to boot it (the one before is grub.cfg.before-strata beside it)",
            config.display()
        )?,
        None => writeln!(
            out,
            "the bootloader's configuration was left alone: it must boot /boot/strata/default/vmlinuz with its initrd.img"
        )?,
    }
    Ok(())
}

pub fn assess(root: &Path, opts: &AssessOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    // systemd's own verdict: the target is active only when every check before it passed.
    let healthy = std::process::Command::new("systemctl")
        .args(["is-active", "--quiet", "boot-complete.target"])
        .status()
        .is_ok_and(|s| s.success());
    let assessed = changes::assess(&Store::open(root)?, healthy)?;
    if json {
        write_json(out, &assessed)?;
    } else if assessed.healthy {
        writeln!(
            out,
            "strata: the boot is healthy (boot-complete.target reached)"
        )?;
    } else if assessed.restart {
        writeln!(
            out,
            "strata: the health checks failed on trial layer{} {}; restarting, so the tries run out and the stack before boots",
            if assessed.trials.len() == 1 { "" } else { "s" },
            assessed.trials.join(", ")
        )?;
    } else {
        writeln!(
            out,
            "strata: the health checks failed, and no trial layer is running to leave out: no restart (roll back with `overlayctl rollback` or the boot menu)"
        )?;
    }
    if assessed.restart && !opts.dry_run {
        out.flush()?;
        let status = std::process::Command::new("systemctl")
            .args(["reboot"])
            .status()
            .context("running systemctl reboot")?;
        ensure!(status.success(), "systemctl reboot failed: {status}");
    }
    Ok(())
}

pub fn switch(root: &Path, opts: &SwitchOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    ensure!(
        store.booted()?.is_some(),
        "this system was not booted from {}; switch moves a running Strata system",
        root.display()
    );
    let (plan, state) = (store.plan()?.value, store.state()?);
    let switch = crate::bootkernel::load_next_boot(&store, &plan, &state, !opts.dry_run)?;
    if json {
        write_json(out, &switch)?;
    } else {
        writeln!(
            out,
            "{} {} on kernel {} (a kexec through systemd's shutdown)",
            if opts.dry_run {
                "would start"
            } else {
                "starting"
            },
            switch.stack.join(", "),
            switch.kernel
        )?;
    }
    if !opts.dry_run {
        out.flush()?;
        let status = std::process::Command::new("systemctl")
            .arg("kexec")
            .status()
            .context("running systemctl kexec")?;
        ensure!(status.success(), "systemctl kexec failed: {status}");
    }
    Ok(())
}

pub fn release(root: &Path, json: bool, out: &mut dyn Write) -> Result<()> {
    let released = crate::adopt::release(&Store::open(root)?)?;
    if json {
        return write_json(out, &released);
    }
    let upper = match &released.upper {
        Some(id) => format!(" with the changes in upper {id}"),
        None => String::new(),
    };
    writeln!(
        out,
        "at the next boot, {}{upper} becomes the plain root filesystem (hard links, no copy); the store is put aside beside it as STORE.released (/strata.released by default), to delete once the plain system is fine",
        released.stack.join(", ")
    )?;
    Ok(())
}

pub fn pull(root: &Path, opts: &PullOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let downloads = store.folder(crate::store::Folder::Downloads)?;
    let (mut source, short_name) =
        crate::oci::open_source(&opts.image, &opts.registry.access(), downloads.path())?;
    let request = crate::oci::pull::Request {
        name: opts.name.clone(),
        short_name,
        title: opts.title.clone(),
        squash: opts.squash,
        state: if opts.active {
            LayerState::Active
        } else {
            LayerState::Trial
        },
        notes: opts.notes.clone(),
        release: None,
    };
    let pulled = crate::oci::pull::pull(&store, source.as_mut(), &request)?;
    report_pulled(&pulled, json, out)
}

pub fn update(root: &Path, opts: &UpdateOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let options = crate::channel::Options {
        channel: &opts.channel,
        check: opts.check,
        machine_id: opts.machine_id.as_deref(),
        allow_unsigned: opts.allow_unsigned,
        access: opts.registry.access(),
    };
    let updated = crate::channel::update(&store, &options)?;
    if json {
        return write_json(out, &updated);
    }
    writeln!(
        out,
        "channel {} (serial {}): this device runs {}",
        updated.channel,
        updated.serial,
        updated
            .from
            .as_deref()
            .unwrap_or("no release of the channel")
    )?;
    if !updated.rolled_back.is_empty() {
        writeln!(
            out,
            "{} {} pulled back: its layers are left out",
            updated.rolled_back.join(", "),
            if updated.rolled_back.len() == 1 {
                "was"
            } else {
                "were"
            }
        )?;
    }
    writeln!(out, "{}", updated.said)?;
    Ok(())
}

pub fn channel(
    root: &Path,
    command: &ChannelCommand,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    match command {
        ChannelCommand::Sign { index, key, output } => {
            let bytes = crate::channel::sign(index, key)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(output)
                .with_context(|| format!("creating {}", output.display()))?;
            file.write_all(&bytes)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", output.display()))?;
            if !json {
                writeln!(out, "wrote {}", output.display())?;
            }
        }
        ChannelCommand::Tree { dir } => {
            let digest = match dir {
                Some(dir) => ops::tree_of_dir(dir)?,
                None => ops::next_boot_tree(&Store::open(root)?)?.1,
            };
            if json {
                return write_json(out, &serde_json::json!({ "tree": digest }));
            }
            writeln!(out, "{digest}")?;
        }
        ChannelCommand::Push {
            file,
            reference,
            registry,
        } => {
            let reference = crate::oci::registry::Reference::parse(reference)?;
            let shown = reference.to_string();
            let mut to = crate::oci::registry::Registry::new(
                reference,
                &registry.access(),
                &std::env::temp_dir(),
            )?;
            let digest = to.push_channel(file)?;
            if json {
                return write_json(
                    out,
                    &serde_json::json!({"channel": file, "reference": shown, "digest": digest}),
                );
            }
            writeln!(out, "pushed {} to {shown} ({digest})", file.display())?;
        }
        ChannelCommand::Show { channel, registry } => {
            let trusted = match Store::open(root) {
                Ok(store) => crate::keys::trusted(&store)?,
                Err(_) => Vec::new(),
            };
            // A channel in a registry downloads into a directory of this command's own, removed
            // after.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let downloads =
                std::env::temp_dir().join(format!("strata-channel.{}.{nanos}", std::process::id()));
            std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
                .create(&downloads)
                .with_context(|| format!("creating {}", downloads.display()))?;
            let read =
                crate::channel::read(channel, &trusted, true, &registry.access(), &downloads);
            // Only what the download left, which `read` removed: an empty directory.
            let _ = fs::remove_dir(&downloads);
            let read = read?;
            if json {
                return write_json(out, &read.index);
            }
            writeln!(
                out,
                "channel {} serial {}, signed by {}",
                read.index.channel,
                read.index.serial,
                if read.signers.is_empty() {
                    "no trusted key".to_owned()
                } else {
                    read.signers.join(", ")
                }
            )?;
            for r in &read.index.releases {
                writeln!(
                    out,
                    "{} {} rollout {}%{}: {} bundle(s){}",
                    r.name,
                    r.tree,
                    r.rollout,
                    if r.pulled { ", pulled back" } else { "" },
                    r.bundles.len(),
                    r.image
                        .as_deref()
                        .map(|i| format!(", image {i}"))
                        .unwrap_or_default()
                )?;
            }
        }
    }
    Ok(())
}

fn report_pulled(pulled: &crate::oci::pull::Pulled, json: bool, out: &mut dyn Write) -> Result<()> {
    if json {
        return write_json(out, pulled);
    }
    if let Some(digest) = &pulled.image {
        writeln!(out, "image {} ({digest})", pulled.source)?;
    } else {
        writeln!(out, "image {}", pulled.source)?;
    }
    for name in &pulled.held {
        writeln!(out, "held   {name}")?;
    }
    for added in &pulled.added {
        writeln!(
            out,
            "added  {}{}: {} read, {} entries, {} of content",
            added.name,
            added
                .title
                .as_deref()
                .map(|t| format!(" ({})", layers_spec::name::printable(t)))
                .unwrap_or_default(),
            layers_spec::size::human(added.blob_bytes),
            added.entries,
            layers_spec::size::human(added.file_bytes),
        )?;
    }
    if pulled.added.is_empty() {
        writeln!(out, "the store holds the whole image; nothing was added")?;
    }
    if !pulled.superseded.is_empty() {
        writeln!(
            out,
            "left out while the new layers are in the stack: {}",
            pulled.superseded.join(", ")
        )?;
    }
    writeln!(out, "next boot: {}", pulled.stack.join(", "))?;
    Ok(())
}

fn report_added(added: &ops::Added, root: &Path, json: bool, out: &mut dyn Write) -> Result<()> {
    if json {
        return write_json(
            out,
            &serde_json::json!({
                "layer": added.name, "digest": added.digest, "entries": added.stats.entries,
                "bytes": added.stats.bytes, "store": root,
            }),
        );
    }
    writeln!(
        out,
        "added layer {} ({} entries, {} of content) to {}\ndigest {}",
        added.name,
        added.stats.entries,
        layers_spec::size::human(added.stats.bytes),
        root.display(),
        added.digest
    )?;
    Ok(())
}

/// The name given with --name, or the one `path`'s file name makes.
fn layer_name(given: Option<&String>, path: &Path) -> Result<String> {
    match given {
        Some(name) => Ok(name.clone()),
        None => name_from_path(path).ok_or_else(|| {
            anyhow!(
                "{} is not usable as a layer name; give one with --name",
                path.display()
            )
        }),
    }
}

pub fn add_layer(root: &Path, opts: &AddLayerOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let source = opts
        .dir
        .as_deref()
        .or(opts.bundle.as_deref())
        .expect("clap requires DIR or --bundle");
    let in_registry = opts
        .bundle
        .as_deref()
        .and_then(Path::to_str)
        .and_then(crate::oci::registry::Reference::explicit);
    // A bundle `rel-2.bundle` or `REGISTRY/REPO:rel-2` gives `rel-2`; a directory keeps its
    // whole name (`upgrade-2.1`).
    let named_after = match (&opts.bundle, &in_registry) {
        (_, Some(reference)) => {
            PathBuf::from(reference.tag.as_deref().unwrap_or(reference.short_name()))
        }
        (Some(bundle), None) if bundle.extension().is_some_and(|e| e == "bundle") => {
            bundle.with_extension("")
        }
        _ => source.to_owned(),
    };
    let name = layer_name(opts.name.as_ref(), &named_after)?;
    let layer = NewLayer {
        name,
        title: opts.title.clone(),
        parent: opts.parent.clone(),
        state: if opts.active {
            LayerState::Active
        } else {
            LayerState::Trial
        },
        known_good: opts.known_good,
        notes: opts.notes.clone(),
        release: None,
    };
    let ns = if opts.userxattr {
        XattrNs::User
    } else {
        XattrNs::Trusted
    };
    if let Some(bundle) = &opts.bundle {
        let url = bundle.to_str().filter(|b| crate::fetch::is_url(b));
        let applied = match (url, in_registry) {
            (_, Some(reference)) => {
                // Downloaded before the store is locked, resumed where a cut one stopped.
                let downloads = store.folder(crate::store::Folder::Downloads)?;
                let mut registry = crate::oci::registry::Registry::new(
                    reference,
                    &opts.registry.access(),
                    downloads.path(),
                )?;
                let file = registry.pull_bundle()?;
                let applied = ops::add_bundle(&store, &file, opts.allow_unsigned, &layer);
                // Added or refused, the download is done with.
                crate::oci::image::Source::done(&mut registry)?;
                applied?
            }
            (Some(url), None) => {
                // Downloaded before the store is locked: a slow line holds up nothing.
                let part = crate::fetch::download_path(root, url);
                crate::fetch::fetch(url, &part)?;
                let applied = ops::add_bundle(&store, &part, opts.allow_unsigned, &layer);
                // Added or refused, the download is done with: a refused bundle would only be
                // refused again.
                let _ = fs::remove_file(&part);
                applied?
            }
            (None, None) => ops::add_bundle(&store, bundle, opts.allow_unsigned, &layer)?,
        };
        if !json {
            match applied.signers.as_slice() {
                [] => writeln!(out, "{} is not signed by a trusted key", bundle.display())?,
                signers => writeln!(out, "signed by {}", signers.join(", "))?,
            }
        }
        return report_added(&applied.added, root, json, out);
    }
    let added = ops::add_layer(&store, source, ns, &layer)?;
    report_added(&added, root, json, out)
}

pub fn sync(root: &Path, opts: &SyncOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let name = layer_name(opts.name.as_ref(), &opts.target)?;
    let layer = NewLayer {
        name,
        title: opts.title.clone(),
        parent: None,
        state: LayerState::Trial,
        known_good: false,
        notes: opts.notes.clone(),
        release: None,
    };
    let compare = if opts.checksum {
        Compare::Checksum
    } else {
        Compare::Quick
    };
    let synced = ops::sync(&store, &opts.target, compare, &layer, opts.dry_run)?;
    let d = &synced.delta;
    if json {
        return write_json(
            out,
            &serde_json::json!({
                "target": opts.target, "stack": synced.stack, "dry_run": opts.dry_run,
                "layer": synced.added.as_ref().map(|a| &a.name),
                "digest": synced.added.as_ref().map(|a| &a.digest),
                "added": d.added, "changed": d.changed, "metadata": d.metadata,
                "deleted": d.deleted, "opaque": d.opaque, "bytes": d.bytes,
            }),
        );
    }
    let on = synced.stack.first().map_or("", String::as_str);
    if d.is_empty() {
        writeln!(
            out,
            "{} already equals the stack ({}): nothing to add",
            opts.target.display(),
            synced.stack.join(", ")
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{} added, {} changed, {} with new metadata, {} deleted ({} as opaque directories)",
        d.added, d.changed, d.metadata, d.deleted, d.opaque
    )?;
    let content = layers_spec::size::human(d.bytes);
    match &synced.added {
        Some(added) => writeln!(
            out,
            "added trial layer {} on {on} ({content} of content)\ndigest {}",
            added.name, added.digest
        )?,
        None => writeln!(
            out,
            "dry run: would add trial layer {} on {on} ({content} of content); nothing was changed",
            layer.name
        )?,
    }
    Ok(())
}

pub fn bundle(root: &Path, command: &BundleCommand, json: bool, out: &mut dyn Write) -> Result<()> {
    match command {
        BundleCommand::Create {
            from,
            from_layer,
            to,
            output,
            sign,
        } => {
            let made = ops::make_bundle(from, from_layer.as_deref(), to, output, sign.as_deref())?;
            if json {
                return write_json(out, &made);
            }
            writeln!(
                out,
                "wrote {} ({}): {} added, {} changed, {} with new metadata, {} deleted; {} files whole, {} as binary diffs ({} gzip files as their content), {} from the base unchanged, in {} parts; {}",
                made.bundle.display(),
                layers_spec::size::human(made.bytes),
                made.added,
                made.changed,
                made.metadata,
                made.deleted,
                made.whole,
                made.bsdiff,
                made.gzip,
                made.unchanged,
                made.parts,
                if made.signed { "signed" } else { "unsigned" }
            )?;
        }
        BundleCommand::Push {
            file,
            reference,
            registry,
        } => {
            let bundle = crate::bundle::Bundle::open(file, None)?;
            let reference = crate::oci::registry::Reference::parse(reference)?;
            let shown = reference.to_string();
            let downloads = std::env::temp_dir();
            let mut to =
                crate::oci::registry::Registry::new(reference, &registry.access(), &downloads)?;
            let digest = to.push_bundle(file, &bundle.manifest.base, &bundle.manifest.target)?;
            if json {
                return write_json(
                    out,
                    &serde_json::json!({"bundle": file, "reference": shown, "digest": digest}),
                );
            }
            writeln!(out, "pushed {} to {shown} ({digest})", file.display())?;
        }
        BundleCommand::Verify { file } | BundleCommand::Info { file } => {
            let whole = matches!(command, BundleCommand::Verify { .. });
            let info = ops::describe_bundle(root, file, whole)?;
            if json {
                return write_json(out, &info);
            }
            if whole {
                writeln!(out, "{}: intact", file.display())?;
            }
            writeln!(out, "base   {}", info.base)?;
            writeln!(out, "target {}", info.target)?;
            writeln!(
                out,
                "size   {} ({} entries; {} files: {} binary diffs, {} gzip files as their content, {} unchanged from the base; {} parts)",
                layers_spec::size::human(info.bytes),
                info.entries,
                info.files,
                info.bsdiff,
                info.gzip,
                info.unchanged,
                info.parts
            )?;
            let signed = match (info.signatures, info.trusted_signers.as_slice()) {
                (0, _) => "unsigned".to_owned(),
                (n, []) => format!("{n} signature(s), none by a key in keys/"),
                (_, names) => format!("signed by {}", names.join(", ")),
            };
            writeln!(out, "signer {signed}")?;
        }
    }
    Ok(())
}

pub fn keys(root: &Path, command: &KeysCommand, json: bool, out: &mut dyn Write) -> Result<()> {
    use crate::keys;
    match command {
        KeysCommand::Generate { output } => {
            let written = keys::generate(output)?;
            if json {
                return write_json(out, &written);
            }
            writeln!(
                out,
                "wrote {} (secret: keep it on the build server) and {}",
                written.secret.display(),
                written.public.display()
            )?;
        }
        KeysCommand::Add { file, name } => {
            let name = keys::add(&Store::open(root)?, file, name.as_deref())?;
            if json {
                return write_json(out, &serde_json::json!({ "trusted": name }));
            }
            writeln!(out, "trusting {name} for bundles")?;
        }
        KeysCommand::List => {
            let list = keys::list(&Store::open(root)?)?;
            if json {
                return write_json(out, &list);
            }
            for key in &list {
                writeln!(out, "{} {}", key.name, key.key)?;
            }
        }
        KeysCommand::Remove { name } => {
            keys::remove(&Store::open(root)?, name)?;
            if json {
                return write_json(out, &serde_json::json!({ "removed": name }));
            }
            writeln!(out, "no longer trusting {name}")?;
        }
    }
    Ok(())
}

/// Sets layers' state; trial counters of the layers go, since the choice is now explicit.
pub fn enable(root: &Path, names: &[String], json: bool, out: &mut dyn Write) -> Result<()> {
    let changed = changes::set_state(&Store::open(root)?, names, LayerState::Active)?;
    print_changed(&changed, json, out)
}

pub fn disable(root: &Path, names: &[String], json: bool, out: &mut dyn Write) -> Result<()> {
    let changed = changes::set_state(&Store::open(root)?, names, LayerState::Disabled)?;
    print_changed(&changed, json, out)
}

pub fn accept(root: &Path, names: &[String], json: bool, out: &mut dyn Write) -> Result<()> {
    let changed = changes::accept(&Store::open(root)?, names)?;
    print_changed(&changed, json, out)
}

pub fn known_good(
    root: &Path,
    opts: &KnownGoodOpts,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let changed = changes::known_good(&Store::open(root)?, &opts.layer, opts.unset)?;
    print_changed(&changed, json, out)
}

pub fn menu_lock(root: &Path, opts: &MenuLockOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    // Asked before the store is locked, so a slow typist does not hold up other commands.
    let hash = if opts.clear {
        None
    } else {
        let password = read_password()?;
        Some(layers_spec::lock::hash_password(&password).map_err(anyhow::Error::msg)?)
    };
    let changed = changes::menu_lock(&Store::open(root)?, hash)?;
    print_changed(&changed, json, out)
}

/// A password from the terminal (asked twice, echo off) or the first line of standard input.
fn read_password() -> Result<String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        let password = line.trim_end_matches(['\r', '\n']).to_owned();
        if password.is_empty() {
            bail!("the password on standard input is empty; nothing was changed");
        }
        return Ok(password);
    }
    let ask = |prompt: &str| -> Result<String> {
        let mut input = stdin.lock();
        let saved =
            rustix::termios::tcgetattr(&input).context("reading the terminal's settings")?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        // Echo goes off before the prompt shows, so nothing typed after it is echoed, and
        // nothing typed is thrown away (no flush).
        rustix::termios::tcsetattr(&input, rustix::termios::OptionalActions::Now, &quiet)
            .context("turning the terminal's echo off")?;
        eprint!("{prompt}");
        let mut line = String::new();
        let read = input.read_line(&mut line);
        // Echo comes back however the read went.
        let _ = rustix::termios::tcsetattr(&input, rustix::termios::OptionalActions::Now, &saved);
        eprintln!();
        read.context("reading the password")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    let password = ask("Menu password: ")?;
    if password.is_empty() {
        bail!("an empty password locks nothing; nothing was changed");
    }
    if ask("The same again: ")? != password {
        bail!("the two passwords differ; nothing was changed");
    }
    Ok(password)
}

pub fn rollback(root: &Path, to: Option<&str>, json: bool, out: &mut dyn Write) -> Result<()> {
    let changed = changes::rollback(&Store::open(root)?, to)?;
    print_changed(&changed, json, out)
}

pub fn remove(root: &Path, opts: &RemoveOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let layer = match (&opts.layer, &opts.upper) {
        (Some(layer), None) => layer,
        (_, Some(id)) => {
            let mut change = Transaction::begin(&store)?;
            let size = crate::uppers::size(&store, id);
            crate::uppers::remove(&store, &mut change.state, id)?;
            if json {
                return write_json(
                    out,
                    &serde_json::json!({ "removed_upper": id, "size": size }),
                );
            }
            let size = size.map_or_else(|| "?".to_owned(), layers_spec::size::human);
            writeln!(out, "removed archived upper {id} ({size})")?;
            return Ok(());
        }
        (None, None) => bail!("name a layer to remove, or --upper ID"),
    };
    match changes::remove(&store, layer, opts.force)? {
        changes::Removed::Layer(changed) => print_changed(&changed, json, out),
        removed if json => write_json(out, &removed),
        changes::Removed::Unplanned { path, .. } => {
            writeln!(
                out,
                "removed {}, which the plan did not name",
                path.display()
            )?;
            Ok(())
        }
    }
}

pub fn verify(root: &Path, only: Option<&str>, json: bool, out: &mut dyn Write) -> Result<()> {
    let found = crate::verify::verify(&Store::open(root)?, only)?;
    if json {
        write_json(out, &found)?;
    } else {
        // Problems name paths inside layers and names from the store's folders: text only.
        for r in &found.layers {
            match &r.problem {
                None => writeln!(out, "{}: ok", r.layer)?,
                Some(problem) => writeln!(out, "{}: {}", r.layer, printable(problem))?,
            }
        }
        for n in &found.not_in_plan {
            let what = n.what.map(|w| format!(" ({w})")).unwrap_or_default();
            let how = crate::status::removal(&n.name);
            writeln!(
                out,
                "{}: not in the plan{what}; kept ({how})",
                printable(&n.name)
            )?;
        }
    }
    let bad = found.failed();
    if !bad.is_empty() {
        bail!(
            "{} layer{} failed verification: {}",
            bad.len(),
            if bad.len() == 1 { "" } else { "s" },
            bad.join(", ")
        );
    }
    Ok(())
}

pub fn check(root: &Path, opts: &CheckOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let path = opts
        .file
        .clone()
        .unwrap_or_else(|| root.join(layers_store::layout::PLAN_FILE));
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let plan = Plan::parse(&text, &path.display().to_string())?;
    if json {
        return write_json(
            out,
            &serde_json::json!({ "file": path, "valid": true, "layers": plan.layers.len() }),
        );
    }
    writeln!(
        out,
        "{}: a valid plan of {} layers",
        path.display(),
        plan.layers.len()
    )?;
    Ok(())
}

pub fn import_legacy(
    root: &Path,
    opts: &ImportLegacyOpts,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let text = fs::read_to_string(&opts.file)
        .with_context(|| format!("reading {}", opts.file.display()))?;
    let plan = legacy::import(&text, &opts.file.display().to_string())?;
    let store = Store::open(root)?;
    let _lock = store.lock()?;
    let target = root.join(layers_store::layout::PLAN_FILE);
    if target.exists() && !opts.force {
        bail!(
            "{} already exists; pass --force to replace it (the old plan is kept as .prev)",
            target.display()
        );
    }
    store.save_plan(&plan)?;
    if json {
        return write_json(
            out,
            &serde_json::json!({ "plan": target, "layers": plan.layers.len() }),
        );
    }
    writeln!(
        out,
        "imported {} layers into {}",
        plan.layers.len(),
        target.display()
    )?;
    Ok(())
}

pub fn compact(root: &Path, opts: &CompactOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let request = crate::compaction::Request {
        from: opts.from.clone(),
        to: opts.to.clone(),
        name: opts.name.clone(),
        title: opts.title.clone(),
    };
    let done = crate::compaction::run(&store, &request)?;
    let s = &done.stats;
    if json {
        return write_json(
            out,
            &serde_json::json!({
                "layer": done.name, "digest": done.digest, "replaced": done.replaced,
                "deleted": done.deleted, "pending": done.pending, "entries": s.entries,
                "linked": done.linked, "copied_bytes": done.copied_bytes,
                "whiteouts_dropped": s.whiteouts_dropped, "opaque_dropped": s.opaque_dropped,
            }),
        );
    }
    writeln!(
        out,
        "compacted {} into {} ({} entries, {} files linked, {} copied; {} whiteouts and {} opaque marks that hid nothing dropped)",
        done.replaced.join(", "),
        done.name,
        s.entries,
        done.linked,
        layers_spec::size::human(done.copied_bytes),
        s.whiteouts_dropped,
        s.opaque_dropped
    )?;
    if !done.deleted.is_empty() {
        writeln!(out, "deleted {}", done.deleted.join(", "))?;
    }
    if !done.pending.is_empty() {
        writeln!(
            out,
            "kept until unused (a mounted stack or the last good stack has them): {}",
            done.pending.join(", ")
        )?;
    }
    writeln!(out, "digest {}", done.digest)?;
    Ok(())
}

pub fn policy(root: &Path, opts: &PolicyOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let applied = crate::policy::apply(&Store::open(root)?, opts.dry_run, opts.if_space_low)?;
    if json {
        return write_json(out, &applied);
    }
    if applied.space_fine {
        writeln!(
            out,
            "nothing to do: free space is above the policy's min_free"
        )?;
        return Ok(());
    }
    let verb = if applied.dry_run { "would" } else { "done:" };
    for action in &applied.actions {
        writeln!(out, "{verb} {action}")?;
    }
    if applied.actions.is_empty() {
        writeln!(out, "nothing to do: the store is within its policy")?;
    }
    for note in &applied.notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

pub fn diff(root: &Path, opts: &DiffOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    use crate::diff::{Diff, How};
    let found = crate::diff::between(&Store::open(root)?, &opts.from, &opts.to, opts.packages)?;
    if json {
        return write_json(out, &found);
    }
    let changes = match found {
        Diff::Packages(changes) => return write_packages(&changes, out),
        Diff::Files(changes) => changes,
    };
    for c in &changes {
        let (mark, size) = match (c.how, c.before, c.after) {
            (How::Added, _, Some(n)) => ('+', layers_spec::size::human(n)),
            (How::Removed, Some(n), _) => ('-', layers_spec::size::human(n)),
            (How::Changed, Some(x), Some(y)) => (
                '~',
                format!(
                    "{} -> {}",
                    layers_spec::size::human(x),
                    layers_spec::size::human(y)
                ),
            ),
            (How::Added, ..) => ('+', String::new()),
            (How::Removed, ..) => ('-', String::new()),
            (How::Changed, ..) => ('~', String::new()),
        };
        // A file name in a layer may hold escape sequences: printed as text only.
        writeln!(out, "{mark} {} {size}", printable(&c.path))?;
    }
    let count = |how: How| changes.iter().filter(|c| c.how == how).count();
    let bytes = |side: fn(&crate::diff::FileChange) -> Option<u64>| -> u64 {
        changes.iter().filter_map(side).sum()
    };
    writeln!(
        out,
        "files: {} added, {} removed, {} changed ({} before, {} after)",
        count(How::Added),
        count(How::Removed),
        count(How::Changed),
        layers_spec::size::human(bytes(|c| c.before)),
        layers_spec::size::human(bytes(|c| c.after)),
    )?;
    Ok(())
}

fn write_packages(changes: &[crate::diff::PackageChange], out: &mut dyn Write) -> Result<()> {
    for c in changes {
        let versions = match (&c.before, &c.after) {
            (Some(x), Some(y)) => format!("{x} -> {y}"),
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (None, None) => String::new(),
        };
        // Package fields come from a dpkg database in a layer: printed as text only.
        let (package, arch) = (printable(&c.package), printable(&c.arch));
        let versions = printable(&versions);
        writeln!(out, "{:<10} {package}:{arch} {versions}", c.how)?;
    }
    let count = |how: &str| changes.iter().filter(|c| c.how == how).count();
    writeln!(
        out,
        "packages: {} upgraded, {} downgraded, {} added, {} removed, {} changed",
        count("upgraded"),
        count("downgraded"),
        count("added"),
        count("removed"),
        count("changed")
    )?;
    Ok(())
}

pub fn run(root: &Path, opts: &RunOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    use crate::run::Outcome;
    let store = Store::open(root)?;
    let layer = crate::run::new_layer(opts.name.clone(), opts.title.clone(), &opts.command);
    match crate::run::run(&store, &layer, opts.keep_on_failure, &opts.command)? {
        Outcome::Added {
            added,
            entries,
            deletions,
            bytes,
        } => {
            if json {
                return write_json(
                    out,
                    &serde_json::json!({
                        "layer": added.name, "digest": added.digest, "entries": entries,
                        "deletions": deletions, "bytes": bytes,
                    }),
                );
            }
            writeln!(
                out,
                "added trial layer {}: {entries} entries changed ({deletions} deletions), {} of content\ndigest {}",
                added.name,
                layers_spec::size::human(bytes),
                added.digest
            )?;
            Ok(())
        }
        Outcome::Unchanged => {
            if json {
                return write_json(out, &serde_json::json!({ "layer": null }));
            }
            writeln!(
                out,
                "{} changed nothing; no layer was added",
                opts.command[0]
            )?;
            Ok(())
        }
        Outcome::Failed { why, kept: None } => {
            bail!("{why}: all changes rolled back")
        }
        Outcome::Failed {
            why,
            kept: Some(upper),
        } => bail!(
            "{why}: its changes are kept in {} (--keep-on-failure); nothing was added",
            upper.display()
        ),
    }
}

pub fn checkpoint(
    root: &Path,
    opts: &CheckpointOpts,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let done = changes::checkpoint(
        &Store::open(root)?,
        opts.name.as_deref(),
        opts.title.as_deref(),
    )?;
    if json {
        return write_json(out, &done);
    }
    if let Some(replaced) = &done.replaced {
        writeln!(out, "(this replaces the pending checkpoint {replaced})")?;
    }
    writeln!(
        out,
        "at the next boot, upper {} becomes the read-only layer {} on top, and a fresh upper starts",
        done.upper, done.layer
    )?;
    Ok(())
}
