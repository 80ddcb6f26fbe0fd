//! `overlayctl status`: the layers top first, what the next boot mounts (A), what is mounted now
//! (C), and why anything is left out.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use layers_spec::size::human;
use layers_spec::{BootOverrides, BootState, Booted, LayerState, Plan, Resolution, resolve};
use serde::Serialize;

use crate::space::{Space, layer_space};
use crate::store::Store;
use crate::write_json;

/// The next boot's resolution for a store, with layer presence checked on disk.
pub fn next_boot(store: &Store, plan: &Plan, state: &BootState) -> Resolution {
    let present = |name: &str| store.layer_dir(name).is_dir();
    resolve(plan, state, &BootOverrides::default(), Some(&present))
}

/// For each layer whose stack has a dpkg database that differs from the stack below's, a line
/// saying how: "packages: 2 upgraded (libc6 2.36-9+deb12u7 -> 2.36-9+deb12u14, …), 1 added".
fn package_changes(store: &Store, plan: &Plan) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    // A stack's database is the one below's unless the layer brings its own: each file is read
    // once.
    let mut read_files: std::collections::HashMap<std::path::PathBuf, Option<String>> =
        std::collections::HashMap::new();
    for (i, layer) in plan.layers.iter().enumerate() {
        // The stack with this layer on top, and the one just below it (enabled layers only).
        let below: Vec<std::path::PathBuf> = plan.layers[i + 1..]
            .iter()
            .filter(|l| l.state.is_enabled())
            .map(|l| store.layer_dir(&l.name))
            .collect();
        let mut with = vec![store.layer_dir(&layer.name)];
        with.extend(below.iter().cloned());
        let mut read = |layers: &[std::path::PathBuf]| {
            let path = crate::diff::dpkg_status_in(layers)?;
            read_files
                .entry(path)
                .or_insert_with_key(|p| std::fs::read_to_string(p).ok())
                .clone()
        };
        let (Some(after), before) = (read(&with), read(&below)) else {
            continue;
        };
        let changes = crate::diff::packages(before.as_deref().unwrap_or(""), &after);
        if changes.is_empty() {
            continue;
        }
        let mut parts = Vec::new();
        for how in ["upgraded", "downgraded", "added", "removed", "changed"] {
            let these: Vec<&crate::diff::PackageChange> =
                changes.iter().filter(|c| c.how == how).collect();
            if these.is_empty() {
                continue;
            }
            let shown: Vec<String> = these
                .iter()
                .take(3)
                .map(|c| match (&c.before, &c.after) {
                    (Some(x), Some(y)) => format!("{} {x} -> {y}", c.package),
                    (Some(v), None) | (None, Some(v)) => format!("{} {v}", c.package),
                    (None, None) => c.package.clone(),
                })
                .collect();
            let more = if these.len() > 3 { ", …" } else { "" };
            parts.push(format!(
                "{} {how} ({}{more})",
                these.len(),
                shown.join(", ")
            ));
        }
        out.insert(
            layer.name.clone(),
            format!("packages: {}", parts.join("; ")),
        );
    }
    out
}

/// Layer directories the plan no longer names (compacted or removed while in use, or left by
/// an interrupted change): deleted by the next command or boot that finds them unused.
pub fn pending_deletion(store: &Store, plan: &Plan, state: &BootState) -> Vec<String> {
    let mut names: Vec<String> = state
        .released
        .iter()
        .map(|r| r.layer.clone())
        .filter(|name| plan.layer(name).is_none() && store.layer_present(name))
        .collect();
    names.sort();
    names
}

/// The space of the plan's layers present in the store and of those pending deletion.
pub(crate) fn spaces(store: &Store, plan: &Plan, pending: &[String]) -> BTreeMap<String, Space> {
    let names: Vec<&str> = plan
        .layers
        .iter()
        .map(|l| l.name.as_str())
        .filter(|n| store.layer_dir(n).is_dir())
        .chain(pending.iter().map(String::as_str))
        .collect();
    layer_space(&store.root.join(crate::store::LAYERS), &names)
}

#[derive(Serialize)]
struct StatusJson<'a> {
    store: &'a Path,
    plan: &'a Path,
    plan_fell_back: Option<&'a str>,
    layers: Vec<LayerJson<'a>>,
    /// Layers no longer in the plan, waiting until unused to be deleted.
    pending_deletion: Vec<PendingJson<'a>>,
    /// Directories in `layers/` that the plan does not name and nobody recorded: kept.
    not_in_plan: Vec<&'a str>,
    /// What could not be read (a damaged boot state or boot record), in words.
    problems: &'a [String],
    next_boot: &'a [String],
    current_boot: Option<&'a [String]>,
    notes: Vec<String>,
    current_upper: Option<&'a str>,
    archived_uppers: Vec<ArchivedJson<'a>>,
    checkpoint: Option<&'a layers_spec::Checkpoint>,
}

#[derive(Serialize)]
struct ArchivedJson<'a> {
    id: &'a str,
    /// The stack it was used over, top first.
    layers: &'a [String],
    /// Bytes of file content in it.
    size: Option<u64>,
}

#[derive(Serialize)]
struct PendingJson<'a> {
    name: &'a str,
    size: Option<u64>,
    frees: Option<u64>,
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
    /// Bytes of file content, hard-linked files once.
    size: Option<u64>,
    /// What removing it would free (files other layers link too are not counted).
    frees: Option<u64>,
    next_boot: bool,
    current_boot: bool,
    left_out: Option<String>,
}

/// Everything `status` shows, gathered once; printed as text or JSON.
#[derive(Debug)]
pub struct Status {
    pub store: PathBuf,
    pub plan_path: PathBuf,
    /// Why the plan was read from its previous copy, when it was.
    pub plan_fell_back: Option<String>,
    pub plan: Plan,
    pub state: BootState,
    /// The stack mounted now, when the running system was booted from this store.
    pub booted: Option<Booted>,
    pub next: Resolution,
    /// Released layers still present, waiting until unused.
    pub pending: Vec<String>,
    /// Directories in `layers/` nobody accounts for, with what each is when not a directory.
    pub not_in_plan: Vec<(String, Option<&'static str>)>,
    /// What could not be read (a damaged boot state or boot record), in words.
    pub problems: Vec<String>,
    /// Each walked layer's space.
    pub spaces: BTreeMap<String, Space>,
    /// Content sizes from the manifests, for layers that could not be walked.
    pub manifest_sizes: BTreeMap<String, u64>,
    /// Each archived upper's content size.
    pub archived_sizes: BTreeMap<String, Option<u64>>,
    /// With `verbose`: each layer's package changes, in words.
    pub packages: BTreeMap<String, String>,
}

/// Reads the store for `status`. With `verbose`, each layer's package changes too (its
/// stack's dpkg database against the one of the stack below it).
pub fn gather(root: &Path, verbose: bool) -> Result<Status> {
    let store = Store::open(root)?;
    let loaded = store.plan()?;
    let plan = loaded.value;
    let (state, state_problem) = store.state_for_report();
    let (booted, booted_problem) = match store.booted() {
        Ok(booted) => (booted, None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let next = next_boot(&store, &plan, &state);
    let pending = pending_deletion(&store, &plan, &state);
    let spaces = spaces(&store, &plan, &pending);
    let manifest_sizes = plan
        .layers
        .iter()
        .filter(|l| !spaces.contains_key(&l.name))
        .filter_map(|l| Some((l.name.clone(), store.handle().layer_content_size(&l.name)?)))
        .collect();
    let archived_sizes = state
        .archived_uppers
        .iter()
        .map(|a| (a.id.clone(), crate::uppers::size(&store, &a.id)))
        .collect();
    Ok(Status {
        store: root.to_owned(),
        plan_path: loaded.path,
        plan_fell_back: loaded.fell_back.as_ref().map(ToString::to_string),
        not_in_plan: store.unaccounted_layers(&plan, &state),
        problems: state_problem.into_iter().chain(booted_problem).collect(),
        packages: match verbose {
            true => package_changes(&store, &plan),
            false => BTreeMap::new(),
        },
        plan,
        state,
        booted,
        next,
        pending,
        spaces,
        manifest_sizes,
        archived_sizes,
    })
}

pub fn status(root: &Path, json: bool, verbose: bool, out: &mut dyn Write) -> Result<()> {
    let status = gather(root, verbose)?;
    match json {
        true => write_json(out, &status.json()),
        false => status.write_text(out),
    }
}

impl Status {
    /// A layer's content size: walked, or from its manifest.
    fn size(&self, name: &str) -> Option<u64> {
        self.spaces
            .get(name)
            .map(|s| s.size)
            .or_else(|| self.manifest_sizes.get(name).copied())
    }

    fn json(&self) -> StatusJson<'_> {
        let (plan, state) = (&self.plan, &self.state);
        StatusJson {
            store: &self.store,
            plan: &self.plan_path,
            plan_fell_back: self.plan_fell_back.as_deref(),
            layers: plan
                .layers
                .iter()
                .map(|l| LayerJson {
                    name: &l.name,
                    title: l.title.as_deref(),
                    state: l.state,
                    trial_tries_left: tries_left(plan, state, &l.name),
                    known_good: l.known_good,
                    parent: l.parent.as_deref(),
                    created: l.created.map(|c| c.to_string()),
                    digest: l.digest.as_deref(),
                    size: self.size(&l.name),
                    frees: self.spaces.get(&l.name).map(|s| s.frees),
                    next_boot: self.next.stack.contains(&l.name),
                    current_boot: self
                        .booted
                        .as_ref()
                        .is_some_and(|b| b.stack.contains(&l.name)),
                    left_out: self.next.reason(&l.name).map(ToString::to_string),
                })
                .collect(),
            pending_deletion: self
                .pending
                .iter()
                .map(|name| PendingJson {
                    name,
                    size: self.spaces.get(name).map(|s| s.size),
                    frees: self.spaces.get(name).map(|s| s.frees),
                })
                .collect(),
            next_boot: &self.next.stack,
            current_boot: self.booted.as_ref().map(|b| b.stack.as_slice()),
            notes: self.next.notes.iter().map(ToString::to_string).collect(),
            current_upper: state.current_upper.as_deref(),
            archived_uppers: state
                .archived_uppers
                .iter()
                .map(|a| ArchivedJson {
                    id: &a.id,
                    layers: &a.layers,
                    size: self.archived_sizes.get(&a.id).copied().flatten(),
                })
                .collect(),
            checkpoint: state.checkpoint.as_ref(),
            not_in_plan: self.not_in_plan.iter().map(|(n, _)| n.as_str()).collect(),
            problems: &self.problems,
        }
    }

    /// The table, then what is not in the plan, pending deletion, archived uppers and a
    /// pending checkpoint. Names read from the store's folders are printed escaped.
    pub fn write_text(&self, out: &mut dyn Write) -> Result<()> {
        for problem in &self.problems {
            writeln!(out, "warning: {problem}")?;
        }
        self.write_table(out)?;
        for (name, what) in &self.not_in_plan {
            let what = what.map(|w| format!(" ({w})")).unwrap_or_default();
            let (shown, how) = (layers_spec::printable(name), removal(name));
            writeln!(out, "Not in the plan: layers/{shown}{what}, kept ({how})")?;
        }
        if !self.pending.is_empty() {
            let shown: Vec<String> = self
                .pending
                .iter()
                .map(|n| match self.spaces.get(n) {
                    Some(space) => format!("{n} (frees {})", human(space.frees)),
                    None => n.clone(),
                })
                .collect();
            writeln!(
                out,
                "Pending deletion once unused (no longer in the plan): {}",
                shown.join(", ")
            )?;
        }
        self.write_uppers(out)
    }

    /// Archived uppers and a pending checkpoint, when there are any.
    fn write_uppers(&self, out: &mut dyn Write) -> Result<()> {
        let state = &self.state;
        if !state.archived_uppers.is_empty() {
            writeln!(
                out,
                "Archived uppers (see one with `overlayctl mount DIR --upper ID`):"
            )?;
            for archived in &state.archived_uppers {
                let size = self.archived_sizes.get(&archived.id).copied().flatten();
                let size = size.map_or("?".into(), human);
                writeln!(
                    out,
                    "  {}: {size}, used over {}",
                    archived.id,
                    archived.layers.first().map_or("nothing", String::as_str)
                )?;
            }
        }
        match &state.checkpoint {
            Some(c) if c.frozen => writeln!(
                out,
                "Checkpoint: layer {} was frozen from upper {}; the next change writes its manifest",
                c.layer, c.upper
            )?,
            Some(c) => writeln!(
                out,
                "Checkpoint: at the next boot upper {} becomes layer {}",
                c.upper, c.layer
            )?,
            None => {}
        }
        Ok(())
    }

    /// The table. Names are never cut (they are what people type); the title takes what is left of
    /// 80 columns, or a line of its own when too little is left.
    fn write_table(&self, out: &mut dyn Write) -> Result<()> {
        let (plan, state, next) = (&self.plan, &self.state, &self.next);
        let (spaces, packages, booted) = (&self.spaces, &self.packages, self.booted.as_ref());
        const WIDTH: usize = 80;
        const MIN_TITLE: usize = 16;
        let name_width = plan
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(0)
            .max(4);
        let shown_state = |name: &str, layer_state: LayerState| match tries_left(plan, state, name)
        {
            Some(left) => format!("trial {left}/{}", plan.boot.trial_boots),
            None => format!("{layer_state:?}").to_lowercase(),
        };
        let state_width = plan
            .layers
            .iter()
            .map(|l| shown_state(&l.name, l.state).len())
            .max()
            .unwrap_or(0)
            .max(5);
        // "A C K " + name + " " + state + " " + size(6) + " " + frees(6) + " " + created(10) + " "
        let fixed = 6 + name_width + 1 + state_width + 1 + 6 + 1 + 6 + 1 + 10 + 1;
        let title_inline = WIDTH.saturating_sub(fixed) >= MIN_TITLE;
        let header = format!(
            "A C K {:<name_width$} {:<state_width$} {:>6} {:>6} {:<10}",
            "NAME", "STATE", "SIZE", "FREES", "CREATED"
        );
        let header = if title_inline {
            format!("{header} TITLE")
        } else {
            header.trim_end().to_owned()
        };
        writeln!(out, "{header}")?;
        for layer in &plan.layers {
            let mark = |on: bool, c: char| if on { c } else { ' ' };
            let shown_state = shown_state(&layer.name, layer.state);
            let created = layer
                .created
                .and_then(|c| c.date)
                .map(|d| d.to_string())
                .unwrap_or_default();
            let space = spaces.get(&layer.name);
            // Without a walk (a layer this user may not read), the manifest's size and no frees.
            let (size, frees) = match space {
                Some(s) => (human(s.size), human(s.frees)),
                None => (
                    self.manifest_sizes
                        .get(&layer.name)
                        .map_or_else(|| "-".into(), |&n| human(n)),
                    "-".into(),
                ),
            };
            let row = format!(
                "{} {} {} {:<name_width$} {:<state_width$} {:>6} {:>6} {:<10}",
                mark(next.stack.contains(&layer.name), 'A'),
                mark(booted.is_some_and(|b| b.stack.contains(&layer.name)), 'C'),
                mark(layer.known_good, 'K'),
                layer.name,
                shown_state,
                size,
                frees,
                created,
            );
            let title = layers_spec::printable(layer.title.as_deref().unwrap_or(""));
            let title = title.as_ref();
            let changes = packages.get(&layer.name);
            if title_inline {
                writeln!(
                    out,
                    "{}",
                    format!("{row} {}", ellipsize(title, WIDTH - fixed)).trim_end()
                )?;
            } else {
                writeln!(out, "{}", row.trim_end())?;
                if !title.is_empty() {
                    writeln!(out, "      {}", ellipsize(title, WIDTH - 6))?;
                }
            }
            if let Some(changes) = changes {
                writeln!(out, "      {changes}")?;
            }
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
        if let Some(fallback) = booted.and_then(|b| b.fallback.as_deref()) {
            writeln!(out, "note: the running boot fell back: {fallback}")?;
        }
        Ok(())
    }
}

/// How an entry of `layers/` nobody accounts for can go: by `remove` when it has a layer's
/// name; else Strata never touches it.
pub fn removal(name: &str) -> String {
    match layers_spec::check_name(name) {
        Ok(()) => format!("`overlayctl remove {name}` deletes it"),
        Err(_) => "not a layer name, so only a hand deletes it".into(),
    }
}

pub fn tries_left(plan: &Plan, state: &BootState, name: &str) -> Option<u32> {
    let layer = plan.layer(name)?;
    (layer.state == LayerState::Trial)
        .then(|| plan.boot.trial_boots.saturating_sub(state.tries(name)))
}

pub fn ellipsize(text: &str, width: usize) -> String {
    let text = text.lines().next().unwrap_or("");
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ellipsizes_to_width() {
        assert_eq!(ellipsize("short", 10), "short");
        assert_eq!(ellipsize("exactly-10", 10), "exactly-10");
        assert_eq!(ellipsize("much-too-long", 10), "much-too-…");
        assert_eq!(ellipsize("two\nlines", 10), "two");
    }
}
