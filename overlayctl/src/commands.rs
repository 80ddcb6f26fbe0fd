//! One function per command that changes or checks the store (status and mount have their own
//! modules). Each takes the store lock for a change, refuses bad input before touching anything,
//! and reports what the next boot will mount.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use layers_spec::{LayerState, Plan, legacy};
use serde::Serialize;

use crate::changes::{self, Changed};
use crate::engine::delta::Compare;
use crate::engine::{Layer, Manifest, XattrNs};
use crate::ops::{self, NewLayer};
use crate::store::Store;
use crate::transaction::{Transaction, layer_index};
use crate::{
    AddLayerOpts, BundleCommand, CheckOpts, CheckpointOpts, CompactOpts, DiffOpts,
    ImportLegacyOpts, InitOpts, KeysCommand, KnownGoodOpts, MenuLockOpts, PolicyOpts, RemoveOpts,
    RunOpts, SyncOpts, name_from_path, write_json,
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
    let layer = NewLayer {
        name: opts.name.clone(),
        title: opts.title.clone(),
        parent: None,
        state: LayerState::Active,
        known_good: true,
        notes: None,
    };
    let added = ops::init(root, &opts.base, &layer, opts.move_base)?;
    report_added(&added, root, json, out)
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
    // A bundle `rel-2.bundle` gives `rel-2`; a directory keeps its whole name (`upgrade-2.1`).
    let named_after = match &opts.bundle {
        Some(bundle) if bundle.extension().is_some_and(|e| e == "bundle") => {
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
    };
    let ns = if opts.userxattr {
        XattrNs::User
    } else {
        XattrNs::Trusted
    };
    if let Some(bundle) = &opts.bundle {
        let url = bundle.to_str().filter(|b| crate::fetch::is_url(b));
        let applied = match url {
            Some(url) => {
                // Downloaded before the store is locked: a slow line holds up nothing.
                let part = crate::fetch::download_path(root, url);
                crate::fetch::fetch(url, &part)?;
                let applied = ops::add_bundle(&store, &part, opts.allow_unsigned, &layer);
                // Added or refused, the download is done with: a refused bundle would only be
                // refused again.
                let _ = fs::remove_file(&part);
                applied?
            }
            None => ops::add_bundle(&store, bundle, opts.allow_unsigned, &layer)?,
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
    use crate::bundle::{Bundle, create, parse_secret, trusted_keys};
    match command {
        BundleCommand::Create {
            from,
            from_layer,
            to,
            output,
            sign,
        } => {
            let key = match sign {
                Some(path) => Some(
                    parse_secret(
                        &fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                    .with_context(|| format!("reading {}", path.display()))?,
                ),
                None => None,
            };
            let from_store = from.join(layers_store::layout::PLAN_FILE).is_file();
            ensure!(
                from_store || from_layer.is_none(),
                "--from-layer needs --from to be a store (a directory with {}); {} is a tree",
                layers_store::layout::PLAN_FILE,
                from.display()
            );
            ensure!(
                !to.join(layers_store::layout::PLAN_FILE).is_file(),
                "{} is a Strata store; --to takes the new system as a plain tree",
                to.display()
            );
            // The two trees are read at once.
            let (old, new) = std::thread::scope(|scope| {
                let new = scope.spawn(|| ops::read_clean(to, XattrNs::Trusted));
                let old = if from_store {
                    Store::open(from)
                        .and_then(|store| ops::read_stack_at(&store, from_layer.as_deref()))
                        .map(|(_, layers)| layers)
                } else {
                    ops::read_clean(from, XattrNs::Trusted).map(|layer| vec![layer])
                };
                (old, new.join().expect("a tree reader panicked"))
            });
            let (old, new) = (old?, new?);
            let view = crate::engine::MergedView::new(&old);
            let made = create(&view, &new, output, key.as_ref())?;
            let d = &made.delta;
            if json {
                return write_json(
                    out,
                    &serde_json::json!({
                        "bundle": output, "bytes": made.size, "whole": made.whole,
                        "deltas": made.deltas, "patches": made.patches, "unchanged": made.unchanged,
                        "added": d.added, "changed": d.changed,
                        "metadata": d.metadata, "deleted": d.deleted, "signed": key.is_some(),
                    }),
                );
            }
            writeln!(
                out,
                "wrote {} ({}): {} added, {} changed, {} with new metadata, {} deleted; {} files whole, {} as deltas, {} as patches, {} from the base unchanged{}",
                output.display(),
                layers_spec::size::human(made.size),
                d.added,
                d.changed,
                d.metadata,
                d.deleted,
                made.whole,
                made.deltas,
                made.patches,
                made.unchanged,
                if key.is_some() {
                    "; signed"
                } else {
                    "; unsigned"
                }
            )?;
            Ok(())
        }
        BundleCommand::Verify { file } | BundleCommand::Info { file } => {
            let bundle = Bundle::open(file, None)?;
            let trusted = trusted_keys(&root.join(crate::store::KEYS)).unwrap_or_default();
            let signers = bundle.signed_by(&trusted);
            ensure!(
                bundle.signatures_valid(),
                "{}: a signature does not match the manifest (changed after signing)",
                file.display()
            );
            if matches!(command, BundleCommand::Verify { .. }) {
                bundle.check_whole_files()?;
            }
            let m = &bundle.manifest;
            let files = m.entries.iter().filter(|e| e.data.is_some()).count();
            let encoded = |how: &str| {
                m.entries
                    .iter()
                    .filter(|e| e.data.as_ref().is_some_and(|d| d.encoding == how))
                    .count()
            };
            let (deltas, patches, unchanged) =
                (encoded("delta"), encoded("patch"), encoded("basis"));
            let size = fs::metadata(file)?.len();
            if json {
                return write_json(
                    out,
                    &serde_json::json!({
                        "bundle": file, "bytes": size, "base": m.base, "target": m.target,
                        "entries": m.entries.len(), "files": files, "deltas": deltas, "patches": patches,
                        "unchanged": unchanged,
                        "signatures": bundle.signatures.len(), "trusted_signers": signers,
                    }),
                );
            }
            if matches!(command, BundleCommand::Verify { .. }) {
                writeln!(out, "{}: intact", file.display())?;
            }
            writeln!(out, "base   {}", m.base)?;
            writeln!(out, "target {}", m.target)?;
            writeln!(
                out,
                "size   {} ({} entries; {} files: {} deltas, {} patches, {} unchanged from the base)",
                layers_spec::size::human(size),
                m.entries.len(),
                files,
                deltas,
                patches,
                unchanged
            )?;
            let signed = match (bundle.signatures.len(), signers.as_slice()) {
                (0, _) => "unsigned".to_owned(),
                (n, []) => format!("{n} signature(s), none by a key in keys/"),
                (_, names) => format!("signed by {}", names.join(", ")),
            };
            writeln!(out, "signer {signed}")?;
            Ok(())
        }
    }
}

pub fn keys(root: &Path, command: &KeysCommand, json: bool, out: &mut dyn Write) -> Result<()> {
    use crate::bundle::{format_public, format_secret, generate_key, parse_public, trusted_keys};
    let keys_dir = root.join(crate::store::KEYS);
    match command {
        KeysCommand::Generate { output } => {
            let key = generate_key()?;
            let public = std::path::PathBuf::from(format!("{}.pub", output.display()));
            ensure!(
                !output.exists() && !public.exists(),
                "{} or {} exists; nothing was written",
                output.display(),
                public.display()
            );
            use std::os::unix::fs::OpenOptionsExt;
            let mut secret = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(output)
                .with_context(|| format!("creating {}", output.display()))?;
            secret.write_all(format_secret(&key).as_bytes())?;
            fs::write(&public, format_public(&key.verifying_key()))
                .with_context(|| format!("writing {}", public.display()))?;
            writeln!(
                out,
                "wrote {} (secret: keep it on the build server) and {}",
                output.display(),
                public.display()
            )?;
            Ok(())
        }
        KeysCommand::Add { file, name } => {
            let store = Store::open(root)?;
            let _lock = store.lock()?;
            let text =
                fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let key = parse_public(&text).with_context(|| format!("reading {}", file.display()))?;
            let name = match name {
                Some(n) => n.clone(),
                None => file
                    .file_name()
                    .map(|n| n.to_string_lossy().trim_end_matches(".pub").to_owned())
                    .unwrap_or_default(),
            };
            layers_spec::check_name(&name)
                .map_err(|p| anyhow!("key name {name:?} is not valid: {p}"))?;
            fs::create_dir_all(&keys_dir)?;
            let path = keys_dir.join(format!("{name}.pub"));
            ensure!(!path.exists(), "a key named {name} is already trusted");
            fs::write(&path, format_public(&key))
                .with_context(|| format!("writing {}", path.display()))?;
            Store::sync_dir(&keys_dir)?;
            writeln!(out, "trusting {name} for bundles")?;
            Ok(())
        }
        KeysCommand::List => {
            let keys = trusted_keys(&keys_dir)?;
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(
                        |(n, k)| serde_json::json!({"name": n, "key": format_public(k).trim_end()}),
                    )
                    .collect();
                return write_json(out, &list);
            }
            for (name, key) in &keys {
                write!(out, "{name} {}", format_public(key))?;
            }
            Ok(())
        }
        KeysCommand::Remove { name } => {
            layers_spec::check_name(name)
                .map_err(|p| anyhow!("key name {name:?} is not valid: {p}"))?;
            let store = Store::open(root)?;
            let _lock = store.lock()?;
            // Through the folder's handle: a symlinked keys/ is refused, never deleted through.
            let keys = store.folder(crate::store::Folder::Keys)?;
            let file = format!("{name}.pub");
            ensure!(
                keys.kind(&file)?.is_some(),
                "no trusted key is named {name}"
            );
            keys.remove(&file)?;
            writeln!(out, "no longer trusting {name}")?;
            Ok(())
        }
    }
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

#[derive(Serialize)]
struct Verified {
    layer: String,
    ok: bool,
    problem: Option<String>,
}

pub fn verify(root: &Path, only: Option<&str>, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let plan = store.plan()?.value;
    let layers: Vec<&layers_spec::Layer> = match only {
        Some(name) => vec![&plan.layers[layer_index(&plan, name)?]],
        None => plan.layers.iter().collect(),
    };
    let mut results = Vec::new();
    for layer in layers {
        let problem = verify_layer(&store, layer)?;
        results.push(Verified {
            layer: layer.name.clone(),
            ok: problem.is_none(),
            problem,
        });
    }
    if json {
        write_json(out, &results)?;
    } else {
        for r in &results {
            match &r.problem {
                None => writeln!(out, "{}: ok", r.layer)?,
                Some(problem) => writeln!(out, "{}: {problem}", r.layer)?,
            }
        }
        if only.is_none() {
            let (state, _) = store.state_for_report();
            for (name, what) in store.unaccounted_layers(&plan, &state) {
                let what = what.map(|w| format!(" ({w})")).unwrap_or_default();
                writeln!(
                    out,
                    "{name}: not in the plan{what}; kept (`overlayctl remove {name}` deletes it)"
                )?;
            }
        }
    }
    let bad: Vec<&str> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.layer.as_str())
        .collect();
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

/// `None` when the layer matches its recorded digest.
fn verify_layer(store: &Store, layer: &layers_spec::Layer) -> Result<Option<String>> {
    let dir = store.layer_dir(&layer.name);
    if !store.layer_present(&layer.name) {
        let layers = store.folder(crate::store::Folder::Layers)?;
        return Ok(Some(match layers.sub(&layer.name) {
            Err(e) if layers.kind(&layer.name)?.is_some() => {
                format!("{e}; the boot does not mount it")
            }
            _ => format!("missing: {} does not exist", dir.display()),
        }));
    }
    let Some(recorded) = &layer.digest else {
        return Ok(Some(
            "the plan records no digest for it, so it cannot be verified".into(),
        ));
    };
    let read = Layer::read(&dir, XattrNs::Trusted)
        .with_context(|| format!("reading {}", dir.display()))?;
    let manifest =
        Manifest::of_layer(&read).with_context(|| format!("hashing {}", dir.display()))?;
    if &manifest.digest() == recorded {
        return Ok(None);
    }
    let stored = fs::read_to_string(store.manifest_path(&layer.name))
        .ok()
        .map(|text| Manifest { text });
    Ok(Some(match stored.filter(|m| &m.digest() == recorded) {
        Some(stored) => match stored.first_difference(&manifest) {
            Some(path) => format!("differs from its recorded manifest, first at {path}"),
            None => "differs from its recorded digest".into(),
        },
        None => format!(
            "digest {} differs from the recorded {recorded}",
            manifest.digest()
        ),
    }))
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
    use crate::policy::{Action, Facts, decide};
    let store = Store::open(root)?;
    let loaded = store.plan()?;
    if let Some(why) = loaded.fell_back {
        bail!("the plan cannot be read ({why}); the policy does nothing");
    }
    let plan = loaded.value;
    let spaces = crate::status::spaces(&store, &plan, &[]);
    let in_use = store.layers_in_use()?;
    let archived: Vec<crate::policy::Archived> = store
        .state()?
        .archived_uppers
        .iter()
        .map(|a| crate::policy::Archived {
            id: a.id.clone(),
            bytes: crate::uppers::size(&store, &a.id).unwrap_or(0),
            layers: plan.current_names(&a.layers),
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let decision = decide(
        &plan,
        &Facts {
            now,
            free: ops::free_bytes(&store)?,
            in_use: &in_use,
            frees: &|name| spaces.get(name).map_or(0, |s| s.frees),
            archived_uppers: &archived,
        },
    );
    if !opts.dry_run {
        for action in &decision.actions {
            match action {
                Action::Date { layers } => {
                    let mut change = Transaction::begin(&store)?;
                    for name in layers {
                        if let Some(layer) = change.plan.layer_mut(name)
                            && layer.state == LayerState::Disabled
                            && layer.disabled_at.is_none()
                        {
                            layer.disabled_at = Some(crate::store::now());
                        }
                    }
                    change.commit()?;
                }
                Action::Remove { layer, .. } => {
                    let mut change = Transaction::begin(&store)?;
                    ops::remove_layer(&mut change, layer, true, "policy")
                        .and_then(|()| change.commit().map(drop))
                        .with_context(|| format!("policy: {action}"))?;
                }
                Action::RemoveUpper { id, .. } => {
                    let mut change = Transaction::begin(&store)?;
                    crate::uppers::remove(change.store, &mut change.state, id)
                        .with_context(|| format!("policy: {action}"))?;
                }
                Action::Compact { from, to, .. } => {
                    let request = crate::compaction::Request {
                        from: Some(from.clone()),
                        to: Some(to.clone()),
                        ..Default::default()
                    };
                    crate::compaction::run(&store, &request)
                        .with_context(|| format!("policy: {action}"))?;
                }
            }
            if !json {
                writeln!(out, "done: {action}")?;
            }
        }
    }
    if json {
        return write_json(
            out,
            &serde_json::json!({
                "dry_run": opts.dry_run, "actions": decision.actions, "notes": decision.notes,
            }),
        );
    }
    if opts.dry_run {
        for action in &decision.actions {
            writeln!(out, "would {action}")?;
        }
    }
    if decision.actions.is_empty() {
        writeln!(out, "nothing to do: the store is within its policy")?;
    }
    for note in &decision.notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

pub fn diff(root: &Path, opts: &DiffOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    use crate::engine::MergedView;
    let store = Store::open(root)?;
    let (a_names, a_layers) = ops::read_stack_at(&store, Some(&opts.from))?;
    let (b_names, b_layers) = ops::read_stack_at(&store, Some(&opts.to))?;
    let (a, b) = (MergedView::new(&a_layers), MergedView::new(&b_layers));
    if opts.packages {
        let status = |view: &MergedView<'_>, names: &[String]| -> Result<String> {
            let rel = Path::new("var/lib/dpkg/status");
            let node = view.get(rel).ok_or_else(|| {
                anyhow!(
                    "the stack {} has no var/lib/dpkg/status (not a Debian system)",
                    names.join(", ")
                )
            })?;
            let path = view.source_path(rel, node);
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let changes = crate::diff::packages(&status(&a, &a_names)?, &status(&b, &b_names)?);
        if json {
            return write_json(out, &serde_json::json!({ "packages": changes }));
        }
        for c in &changes {
            let versions = match (&c.before, &c.after) {
                (Some(x), Some(y)) => format!("{x} -> {y}"),
                (Some(x), None) | (None, Some(x)) => x.clone(),
                (None, None) => String::new(),
            };
            // Package fields come from a dpkg database in a layer: printed as text only.
            let (package, arch) = (
                layers_spec::printable(&c.package),
                layers_spec::printable(&c.arch),
            );
            let versions = layers_spec::printable(&versions);
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
        return Ok(());
    }
    let plan = store.plan()?.value;
    let known = ops::known_hashes(&store, &plan, &a_names, &a_layers)
        .into_iter()
        .chain(ops::known_hashes(&store, &plan, &b_names, &b_layers))
        .collect();
    let changes = crate::diff::files(&a, &b, &known)?;
    if json {
        return write_json(out, &serde_json::json!({ "files": changes }));
    }
    use crate::diff::How;
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
        writeln!(
            out,
            "{mark} {} {size}",
            layers_spec::printable(&c.path.to_string())
        )?;
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
