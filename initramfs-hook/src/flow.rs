//! The boot flow on a mounted root (docs/design.md, "Boot flow"): options, plan and state, the
//! stack, the overlay with its fallback chain, the record of what was done, trial counting, and
//! the store made visible to the new root. The standalone `/init` and the dracut and
//! initramfs-tools glue all call [`boot`]; so do the tests, on a plain directory.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use boot_ui::Action;
use layers_spec::{
    BootOverrides, BootState, Booted, LastBoot, LayerState, MenuMode, OnRollback, Plan, Resolution,
    UpperMode, resolve,
};
use layers_store::layout::{
    BOOTED_FILE, FIRST_UPPER, Folder, RUN_SUBDIR, STORE_BIND, TMPFS_UPPER, UPPER_DATA, UPPER_WORK,
};
use layers_store::mount::{OverlaySpec, SOURCE_PREFIX, mount_overlay};
use layers_store::{Store, StoreError};
use rustix::mount::{MountFlags, MountPropagationFlags};

use crate::console::Console;

pub use layers_store::layout::DEFAULT_STORE;

/// Where things are for one boot.
#[derive(Debug, Clone)]
pub struct BootEnv {
    /// The real root filesystem, mounted.
    pub sysroot: PathBuf,
    /// Where the overlay goes (the future `/`).
    pub newroot: PathBuf,
    /// The directory that becomes the new root's `/run` (the initramfs's `/run`).
    pub run: PathBuf,
    pub cmdline: String,
    /// Whether the boot may restart into the chosen stack's own kernel (kexec): only in an
    /// initramfs, never when the flow runs on a running system.
    pub may_restart: bool,
}

pub use crate::log::Log;

/// How the boot went, when the overlay is mounted.
#[derive(Debug)]
pub struct Outcome {
    pub booted: Booted,
    /// The resolved stack's summary, printed when the menu was asked for.
    pub showed_menu: bool,
}

/// Why no overlay could be mounted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("there is no store at {0}; this root was not set up by Strata")]
    NoStore(PathBuf),
    #[error("the store cannot be used: {0}")]
    BadStore(String),
    #[error("no usable plan in {store}: {reason}")]
    NoPlan { store: PathBuf, reason: String },
    #[error("every stack failed to mount; the last error: {0}")]
    NothingMounts(String),
    #[error(
        "the store was released (`overlayctl release`): the plain system boots, and the store is kept as {0}"
    )]
    Released(PathBuf),
}

/// Runs the boot flow: mounts the overlay at `env.newroot` and returns what it did. Its stages:
/// [`load`], [`recover`], [`choose`] (the menu), [`retire_exhausted`] and [`record_tries`],
/// [`candidates`] (pure, beside `resolve`), [`mount`], [`follow_kernel`], [`record`].
pub fn boot(env: &BootEnv, log: &mut Log, console: &mut dyn Console) -> Result<Outcome, BootError> {
    let mut boot = load(env, log)?;
    recover(&mut boot, log);
    // Each layer's directory is looked up once from here on: nothing below adds or removes one.
    let presence = boot.store.layer_presence();
    let present = |name: &str| presence.has(name);
    let (mut resolution, showed_menu) = choose(&mut boot, &present, console, log);
    retire_exhausted(&mut boot, &resolution, log);
    record_tries(&mut boot, &present, &mut resolution, log);
    let upper = prepare_upper(env, &boot.store, &mut boot.state, resolution.upper, log);
    let (candidates, missing) = candidates(&boot.plan, &boot.state, &resolution, &present);
    if let Some(why) = &missing {
        log.say(why);
    }
    let mounted = mount(env, &mut boot, &candidates, &upper, resolution.upper, log)?;
    if env.may_restart && boot.overrides.stack.is_none() {
        follow_kernel(env, &mut boot, &mounted, log);
    }
    Ok(record(
        env,
        boot,
        mounted,
        &upper,
        &resolution,
        showed_menu,
        log,
    ))
}

/// What a boot works with: the command line's options, the store, its plan and state.
struct Boot {
    overrides: BootOverrides,
    /// The store as the command line names it (the overlay's source names it so).
    store_rel: String,
    store: Store,
    plan: Plan,
    /// Why the plan came from its `.prev` copy; then nothing is written to it.
    plan_fallback: Option<String>,
    state: BootState,
    /// As read: an ordinary boot that changes nothing writes nothing.
    state_before: BootState,
}

/// Reads the options, opens the store inside the root, loads the plan (or its `.prev`) and the
/// boot state (a damaged one starts afresh).
fn load(env: &BootEnv, log: &mut Log) -> Result<Boot, BootError> {
    let (overrides, problems) = BootOverrides::parse(&env.cmdline);
    log.debug |= overrides.debug;
    for problem in &problems {
        log.say(format!("ignoring {problem}"));
    }
    let store_rel = overrides
        .store
        .clone()
        .unwrap_or_else(|| DEFAULT_STORE.to_owned());
    // Symlinks on the way are resolved inside the root, as they will be once it is `/`.
    let store = match Store::open_in_root(&env.sysroot, Path::new(&store_rel)) {
        Ok(store) => store,
        Err(StoreError::NoStore(path)) => return Err(BootError::NoStore(path)),
        Err(e) => return Err(BootError::BadStore(e.to_string())),
    };
    adopt(env, &store, log);
    if let Some(aside) = release(env, &store, &store_rel, log) {
        return Err(BootError::Released(aside));
    }
    let loaded = store.load_plan().map_err(|e| BootError::NoPlan {
        store: store.path().to_owned(),
        reason: e.to_string(),
    })?;
    let plan_fallback = loaded.fell_back.as_ref().map(|why| {
        let note = format!("the plan is unusable ({why}); booting from its previous copy");
        log.say(&note);
        note
    });
    let state = match store.load_state() {
        Ok(state) => {
            if let Some(why) = &state.fell_back {
                log.say(format!(
                    "boot state unusable ({why}); using its previous copy"
                ));
            }
            state.value
        }
        Err(e) => {
            log.say(format!("boot state unusable ({e}); starting afresh"));
            BootState::default()
        }
    };
    Ok(Boot {
        overrides,
        store_rel,
        store,
        plan: loaded.value,
        plan_fallback,
        state_before: state.clone(),
        state,
    })
}

/// An adoption `overlayctl adopt` asked for: the installed system's entries move into the base
/// layer by rename, before the plan that names it is read (docs/design.md, "Adopt and release").
fn adopt(env: &BootEnv, store: &Store, log: &mut Log) {
    use layers_store::adopt::{Adoption, Phase};
    match Adoption::read(store) {
        Ok(Some(mut adoption)) if adoption.phase == Phase::Pending => {
            match adoption.carry_out(&env.sysroot, store) {
                Ok(warning) => {
                    log.say(format!(
                        "adopted the installed system: it is layer {} now",
                        adoption.layer
                    ));
                    if let Some(warning) = warning {
                        log.say(warning);
                    }
                }
                Err(e) => log.say(format!(
                    "adopting the installed system failed: {e}; what had moved is back, and \
                     the plain system boots (the next boot tries again)"
                )),
            }
        }
        Ok(_) => {}
        Err(e) => log.say(format!("the adoption journal cannot be read: {e}")),
    }
}

/// A release `overlayctl release` asked for: the stack and its upper become the plain root
/// (docs/design.md, "Adopt and release"). The store's new path when it was done.
fn release(env: &BootEnv, store: &Store, store_rel: &str, log: &mut Log) -> Option<PathBuf> {
    use layers_store::release::Release;
    let mut release = match Release::read(store) {
        Ok(Some(release)) => release,
        Ok(None) => return None,
        Err(e) => {
            log.say(format!("the release journal cannot be read: {e}"));
            return None;
        }
    };
    match release.carry_out(&env.sysroot, Path::new(store_rel), store) {
        Ok(name) => {
            let aside = Path::new(store_rel).with_file_name(name);
            log.say(format!(
                "released: {} is the plain root now; the store is kept as {}",
                summarize(&release.stack),
                aside.display()
            ));
            Some(aside)
        }
        Err(e) => {
            log.say(format!("releasing the store failed: {e}"));
            None
        }
    }
}

/// Finishes what interrupted changes left, freezes a pending checkpoint and carries out the
/// journal; with a plan from `.prev`, only puts a half-done freeze back.
fn recover(boot: &mut Boot, log: &mut Log) {
    clear_leftovers(&boot.store, log);
    if boot.plan_fallback.is_none() {
        crate::freeze::freeze_checkpoint(&boot.store, &mut boot.plan, &mut boot.state, log);
        sweep(&boot.store, &boot.plan, &mut boot.state, log);
    } else {
        // No plan to write the layer into: a freeze cut short goes back into its upper.
        crate::freeze::undo_half_done(&boot.store, &boot.state, log);
    }
}

/// Resolves the stack, and shows the menu when it is asked for: the person's choice replaces
/// the command line's. Returns the resolution and whether the menu was asked for.
fn choose(
    boot: &mut Boot,
    present: &dyn Fn(&str) -> bool,
    console: &mut dyn Console,
    log: &mut Log,
) -> (Resolution, bool) {
    let Boot {
        overrides,
        store,
        plan,
        state,
        ..
    } = boot;
    let mut resolution = resolve(plan, state, overrides, Some(present));
    for note in &resolution.notes {
        log.say(note.to_string());
    }
    for left in &resolution.left_out {
        log.debug(format!("{} left out: {}", left.name, left.reason));
    }
    // The stack a restart into its kernel carried over was chosen already.
    if overrides.stack.is_some() {
        return (resolution, false);
    }
    let exhausted_now = resolution
        .left_out
        .iter()
        .any(|l| matches!(l.reason, layers_spec::Reason::TrialExhausted { .. }));
    let fell_back_last_time = state
        .last_boot
        .as_ref()
        .is_some_and(|b| b.fallback.is_some());
    // A trial layer whose boots ran out without `accept` is a failed upgrade: on-failure shows.
    let menu_asked = overrides.menu
        || plan.boot.menu == MenuMode::Always
        || (plan.boot.menu == MenuMode::OnFailure && (fell_back_last_time || exhausted_now));
    let showed_menu = menu_asked
        || (plan.boot.menu == MenuMode::OnKey
            && plan.boot.timeout_s > 0
            && console.interactive()
            && console.wait_for_key(plan.boot.timeout_s));
    if showed_menu && !console.interactive() {
        log.say("no terminal for the boot menu; booting the default");
        for line in boot_ui::describe(plan, &resolution).lines() {
            log.say(line.trim_start_matches("strata: "));
        }
    } else if showed_menu {
        // Shown by the plan rather than by a person: it boots the default unless someone is there.
        let countdown =
            (!overrides.menu && plan.boot.menu != MenuMode::OnKey).then_some(plan.boot.timeout_s);
        let choice = MenuChoice {
            store,
            plan_damaged: boot.plan_fallback.is_some(),
            countdown,
        };
        if choice.run(console, plan, state, &resolution, log) {
            overrides.top = None;
            overrides.disable.clear();
            resolution = resolve(plan, state, overrides, Some(present));
        }
    }
    (resolution, showed_menu)
}

/// Trial layers whose tries ran out are disabled in the plan for good (docs/design.md).
fn retire_exhausted(boot: &mut Boot, resolution: &Resolution, log: &mut Log) {
    let exhausted: Vec<&str> = resolution
        .left_out
        .iter()
        .filter(|l| matches!(l.reason, layers_spec::Reason::TrialExhausted { .. }))
        .map(|l| l.name.as_str())
        .collect();
    if exhausted.is_empty() || boot.plan_fallback.is_some() {
        return;
    }
    for name in exhausted {
        if let Some(layer) = boot.plan.layer_mut(name) {
            // No date: an early-boot clock may be wrong; the policy job records it.
            layer.set_state(LayerState::Disabled, None);
        }
        boot.state.trial_tries.remove(name);
        log.say(format!(
            "trial layer {name} was never accepted; it is disabled now"
        ));
    }
    if let Err(e) = boot.store.save_plan(&boot.plan) {
        log.say(format!("could not save the plan: {e}"));
    }
}

/// A trial layer's try is recorded before it is mounted: a boot that cannot record it (a full
/// disk) leaves the layer out, so its tries still run out and the rollback comes.
fn record_tries(
    boot: &mut Boot,
    present: &dyn Fn(&str) -> bool,
    resolution: &mut Resolution,
    log: &mut Log,
) {
    let Boot {
        overrides,
        store,
        plan,
        state,
        ..
    } = boot;
    // A restart into the stack's kernel: the first pass counted this boot's tries.
    if overrides.stack.is_some() {
        return;
    }
    let trials: Vec<String> = resolution.trials(plan).map(str::to_owned).collect();
    if trials.is_empty() {
        return;
    }
    for name in &trials {
        *state.trial_tries.entry(name.clone()).or_insert(0) += 1;
    }
    let Err(e) = store.save_state(state) else {
        return;
    };
    log.say(format!(
        "this boot's try of trial layer {} cannot be recorded ({e}); it is left out of this boot",
        trials.join(", ")
    ));
    for name in &trials {
        if let Some(tries) = state.trial_tries.get_mut(name) {
            *tries -= 1;
        }
    }
    state.trial_tries.retain(|_, tries| *tries > 0);
    overrides.disable.extend(trials);
    overrides.top = None;
    *resolution = resolve(plan, state, overrides, Some(present));
}

/// A stack to try, and why it is not the one resolved (None for the resolved stack).
type Candidate = (Vec<String>, Option<String>);

/// The stacks to try, in order, each with why it is not the one resolved (see
/// [`fallback_chain`]); and, when a layer the resolved stack needs is missing from the store,
/// why the resolved stack is not among them. Pure.
fn candidates(
    plan: &Plan,
    state: &BootState,
    resolution: &Resolution,
    present: &dyn Fn(&str) -> bool,
) -> (Vec<Candidate>, Option<String>) {
    let mut candidates = fallback_chain(plan, state, &resolution.stack, present);
    // A layer that should be in the stack but is missing means a damaged store: rather than
    // mount the rest without it, start from the fallbacks.
    let missing: Vec<&str> = resolution
        .left_out
        .iter()
        .filter(|l| l.reason == layers_spec::Reason::MissingOnDisk)
        .map(|l| l.name.as_str())
        .collect();
    if missing.is_empty() {
        return (candidates, None);
    }
    let why = format!("layer {} is missing from the store", missing.join(", "));
    // The resolved stack is the one entry without a reason.
    candidates.retain(|(_, reason)| reason.is_some());
    for (_, reason) in &mut candidates {
        if let Some(reason) = reason {
            *reason = reason.replace("the resolved stack did not mount", &why);
        }
    }
    (candidates, Some(why))
}

/// What mounted: the stack, why it was not the resolved one, and the upper it got.
struct Mounted {
    stack: Vec<String>,
    fallback: Option<String>,
    upper: UpperMode,
}

/// Mounts the first candidate that mounts, with the persistent upper (a fresh one for a
/// rollback with `on_rollback = "fresh"`), the very last with a tmpfs upper.
fn mount(
    env: &BootEnv,
    boot: &mut Boot,
    candidates: &[Candidate],
    upper: &Result<(PathBuf, PathBuf), String>,
    mode: UpperMode,
    log: &mut Log,
) -> Result<Mounted, BootError> {
    let layers_dir = boot.store.path().join(Folder::Layers.name());
    let mut last_error = String::from("no layer to mount");
    let mut mounted = None;
    let mut rollback = RollbackUpper::new(&boot.store, &boot.plan, &boot.state, mode);
    for (i, (stack, why)) in candidates.iter().enumerate() {
        let (upper_dirs, upper_mode) = match (upper, i + 1 == candidates.len()) {
            // The very last try trades a broken persistent upper for a tmpfs one.
            (Ok(dirs), false) => (
                rollback
                    .dirs_for(&boot.store, &boot.plan, &boot.state, stack, log)
                    .unwrap_or_else(|| dirs.clone()),
                mode,
            ),
            (Ok(_), true) | (Err(_), _) => match tmpfs_upper(env) {
                Ok(dirs) => (dirs, UpperMode::Tmpfs),
                Err(e) => {
                    last_error = e;
                    continue;
                }
            },
        };
        if stack.is_empty() {
            continue;
        }
        let spec = OverlaySpec {
            lowers: stack.iter().map(|n| layers_dir.join(n)).collect(),
            upper: Some(upper_dirs),
            userxattr: false,
            read_only: false,
            source: format!("{SOURCE_PREFIX}:{}", boot.store_rel),
        };
        match mount_overlay(&spec, &env.newroot) {
            Ok(api) => {
                log.debug(format!(
                    "mounted {} layers with the {api:?} mount API",
                    stack.len()
                ));
                rollback.mounted(&boot.plan, stack, upper_mode, &mut boot.state, log);
                if upper_mode == UpperMode::Persistent {
                    boot.state.upper_stack.clone_from(stack);
                }
                mounted = Some(Mounted {
                    stack: stack.clone(),
                    fallback: why.clone(),
                    upper: upper_mode,
                });
                break;
            }
            Err(e) => {
                last_error = e.to_string();
                log.say(format!("mounting {} failed: {e}", stack.join(":")));
            }
        }
    }
    rollback.discard_unused(&boot.store, log);
    layers_spec::fault::point("boot-mounted");
    mounted.ok_or(BootError::NothingMounts(last_error))
}

/// When the mounted stack has a kernel other than the running one, restarts into it (kexec) with
/// the stack carried on the command line (docs/kernels.md). Returns when it does not: the stack
/// has no kernel, has the running one, or the restart failed (then it boots on this kernel).
fn follow_kernel(env: &BootEnv, boot: &mut Boot, mounted: &Mounted, log: &mut Log) {
    // The layers' kernel, as `overlayctl` keeps it on the real root: one the upper holds (an
    // `apt-get` on the running system) counts once it is in a layer.
    let layers: Vec<PathBuf> = mounted
        .stack
        .iter()
        .map(|name| boot.store.layer_path(name))
        .collect();
    let Some(kernel) = crate::kexec::layers_kernel(&layers) else {
        return;
    };
    let running = crate::kexec::running_release();
    if kernel.version == running {
        return;
    }
    // What this pass decided holds: the one-shot selection is used up (the tries are counted).
    boot.state.once = None;
    if boot.state != boot.state_before
        && let Err(e) = boot.store.save_state(&boot.state)
    {
        log.say(format!("could not save the boot state: {e}"));
    }
    let cmdline = layers_store::kernel::carried_cmdline(&env.cmdline, Some(&mounted.stack));
    let why = crate::kexec::restart_into(&kernel, &cmdline, log);
    log.say(format!(
        "booting {} on the running kernel {running}, not its own {}: {why}",
        summarize(&mounted.stack),
        kernel.version
    ));
}

/// Records the boot: the state (only when it changed), `/run/strata/booted.toml`, and the
/// store bound where the new root sees it.
fn record(
    env: &BootEnv,
    mut boot: Boot,
    mounted: Mounted,
    upper: &Result<(PathBuf, PathBuf), String>,
    resolution: &Resolution,
    showed_menu: bool,
    log: &mut Log,
) -> Outcome {
    let Mounted {
        stack,
        fallback,
        upper: upper_mode,
    } = mounted;
    let upper_fallback = upper
        .as_ref()
        .err()
        .filter(|_| upper_mode == UpperMode::Tmpfs)
        .map(|why| format!("{why}; booted with a tmpfs upper"));
    let fallback = [boot.plan_fallback.take(), upper_fallback, fallback]
        .into_iter()
        .flatten()
        .reduce(|a, b| format!("{a}; {b}"));
    if let Some(why) = &fallback {
        log.say(format!("fell back: {why}"));
    }
    log.say(format!("booting {}", summarize(&stack)));

    let state = &mut boot.state;
    // The one-shot selection is used up.
    state.once = None;
    state.last_boot = Some(LastBoot {
        layers: stack.clone(),
        fallback: fallback.clone(),
        at: None,
    });
    // An ordinary boot (no trial layer, no one-shot, the same stack as last time) writes nothing:
    // a faster boot, and no flash wear on devices that boot often.
    if *state != boot.state_before
        && let Err(e) = boot.store.save_state(state)
    {
        log.say(format!("could not save the boot state: {e}"));
    }
    let run_dir = env.run.join(RUN_SUBDIR);
    let booted = Booted {
        version: layers_spec::plan::PLAN_VERSION,
        stack,
        upper: upper_mode,
        upper_id: (upper_mode == UpperMode::Persistent)
            .then(|| state.current_upper.clone())
            .flatten(),
        // Where `expose_store` binds it: /run/strata/store in the new root.
        store: run_dir.join(STORE_BIND).display().to_string(),
        one_shot: resolution.one_shot,
        fallback,
        notes: resolution.notes.iter().map(ToString::to_string).collect(),
        at: None,
    };
    write_record(&run_dir, &booted, log);
    expose_store(&run_dir, boot.store.path(), log);
    Outcome {
        booted,
        showed_menu,
    }
}

/// The boot menu and what its choice does to the plan and the boot state.
struct MenuChoice<'a> {
    store: &'a Store,
    /// The plan came from its `.prev` copy: a saved choice would overwrite the damaged file
    /// with an old plan, so it is used for this boot only.
    plan_damaged: bool,
    countdown: Option<u32>,
}

impl MenuChoice<'_> {
    /// Shows the menu until the person chooses a boot. True when the choice differs from the
    /// default: a one-shot selection in the state, or a new plan saved with `.prev` kept.
    fn run(
        &self,
        console: &mut dyn Console,
        plan: &mut Plan,
        state: &mut BootState,
        resolution: &layers_spec::Resolution,
        log: &mut Log,
    ) -> bool {
        let mut countdown = self.countdown;
        loop {
            let setup = boot_ui::Setup {
                fallback: state.last_boot.as_ref().and_then(|b| b.fallback.clone()),
                shell: console.has_shell(),
                countdown: countdown.take(),
                lock: plan.boot.menu_lock.clone(),
                ascii: console.ascii(),
                save_refused: self
                    .plan_damaged
                    .then(|| "the plan on disk is damaged, so nothing can be saved".to_owned()),
            };
            let size = |name: &str| self.store.layer_content_size(name);
            let mut app = boot_ui::App::new(plan, resolution, state, &size, setup);
            let action = match console.run_menu(&mut app) {
                Ok(action) => action,
                Err(e) => {
                    log.say(format!("the boot menu failed ({e}); booting the default"));
                    return false;
                }
            };
            let once = |state: &mut BootState, layers: Vec<String>| {
                state.once = Some(layers_spec::OneShot {
                    layers,
                    upper: None,
                });
            };
            match action {
                Action::Shell => {
                    log.say("menu: opening a shell");
                    console.shell();
                }
                Action::BootDefault => {
                    log.say("menu: booting the default");
                    return false;
                }
                Action::BootOnce { layers } => {
                    log.say(format!(
                        "menu: booting {} once; the plan is unchanged",
                        summarize(&layers)
                    ));
                    once(state, layers);
                    return true;
                }
                Action::SaveAndBoot { layers } if self.plan_damaged => {
                    log.say(format!(
                        "menu: the plan is damaged, so {} boots once and is not saved",
                        summarize(&layers)
                    ));
                    once(state, layers);
                    return true;
                }
                Action::SaveAndBoot { layers } => {
                    let mut saved = plan.clone();
                    for layer in &mut saved.layers {
                        let chosen = layers.contains(&layer.name);
                        match (chosen, layer.state) {
                            (true, LayerState::Disabled) => {
                                layer.set_state(LayerState::Active, None);
                            }
                            (false, _) => layer.set_state(LayerState::Disabled, None),
                            (true, _) => {}
                        }
                    }
                    match self.store.save_plan(&saved) {
                        Ok(()) => {
                            log.say(format!(
                                "menu: saved {} to the plan; booting it",
                                summarize(&layers)
                            ));
                            // A trial layer switched on by hand gets its boots back; one
                            // that was in the default stack keeps counting.
                            for name in layers.iter().filter(|n| !resolution.stack.contains(n)) {
                                state.trial_tries.remove(name);
                            }
                            // A pending one-shot selection would outrank what was just saved.
                            state.once = None;
                            *plan = saved;
                        }
                        Err(e) => {
                            log.say(format!(
                                "menu: could not save the plan ({e}); booting {} once",
                                summarize(&layers)
                            ));
                            once(state, layers);
                        }
                    }
                    return true;
                }
            }
        }
    }
}

/// The stacks to try, in order, each with why it is not the one resolved: the resolved stack,
/// the last good stack, the known-good layers, the base alone. Repeats are dropped.
fn fallback_chain(
    plan: &Plan,
    state: &BootState,
    resolved: &[String],
    present: &dyn Fn(&str) -> bool,
) -> Vec<Candidate> {
    let in_plan_order = |names: &dyn Fn(&str) -> bool| -> Vec<String> {
        plan.layers
            .iter()
            .map(|l| l.name.clone())
            .filter(|n| names(n) && present(n))
            .collect()
    };
    let mut chain: Vec<(Vec<String>, Option<String>)> = vec![(resolved.to_vec(), None)];
    // Recorded before a compaction, it may name layers the compacted one replaced.
    let last_good = plan.current_names(&state.last_good);
    let last_good: HashSet<&str> = last_good.iter().map(String::as_str).collect();
    let in_plan: HashSet<&str> = plan.layers.iter().map(|l| l.name.as_str()).collect();
    if !last_good.is_empty() && last_good.iter().all(|n| in_plan.contains(n) && present(n)) {
        chain.push((
            in_plan_order(&|n| last_good.contains(n)),
            Some("the resolved stack did not mount; booted the last good stack".into()),
        ));
    }
    let known_good: HashSet<&str> = plan
        .layers
        .iter()
        .filter(|l| l.known_good)
        .map(|l| l.name.as_str())
        .collect();
    chain.push((
        in_plan_order(&|n| known_good.contains(n)),
        Some("the resolved stack did not mount; booted the known-good layers".into()),
    ));
    if let Some(base) = plan.base().filter(|b| present(&b.name)) {
        chain.push((
            vec![base.name.clone()],
            Some("no better stack mounted; booted the base layer alone".into()),
        ));
    }
    let mut chain: Vec<(Vec<String>, Option<String>)> =
        chain.into_iter().fold(Vec::new(), |mut out, (stack, why)| {
            if !stack.is_empty() && !out.iter().any(|(s, _)| s == &stack) {
                out.push((stack, why));
            }
            out
        });
    // The last try repeats the base with a tmpfs upper, in case the persistent upper is what
    // fails.
    if let Some(base) = plan.base().filter(|b| present(&b.name)) {
        chain.push((
            vec![base.name.clone()],
            Some(
                "the persistent upper did not mount; booted the base layer with a tmpfs upper"
                    .into(),
            ),
        ));
    }
    chain
}

/// The persistent upper's `data` and `work`, created when missing, or a tmpfs one.
fn prepare_upper(
    env: &BootEnv,
    store: &Store,
    state: &mut BootState,
    mode: UpperMode,
    log: &mut Log,
) -> Result<(PathBuf, PathBuf), String> {
    if mode == UpperMode::Tmpfs {
        return tmpfs_upper(env);
    }
    let id = state
        .current_upper
        .get_or_insert_with(|| FIRST_UPPER.to_owned())
        .clone();
    upper_dirs(store, &id).map_err(|e| {
        let message = format!("the persistent upper {id} cannot be used: {e}");
        log.say(&message);
        message
    })
}

/// `uppers/<id>/data` and `work`, made when missing; each a real directory of the store (an
/// upper is never mounted through a symlink).
pub(crate) fn upper_dirs(store: &Store, id: &str) -> Result<(PathBuf, PathBuf), StoreError> {
    let upper = store.folder(Folder::Uppers)?.sub_or_create(id)?;
    let (data, work) = (
        upper.sub_or_create(UPPER_DATA)?,
        upper.sub_or_create(UPPER_WORK)?,
    );
    // Left by a mount with `volatile`, it would refuse every later mount (docs/overlayfs.md).
    work.remove("incompat")?;
    Ok((data.path().to_owned(), work.path().to_owned()))
}

/// `[upper] on_rollback = "fresh"`: a boot that leaves out layers the persistent upper was
/// last used over mounts a fresh persistent upper, and the old one is archived with that stack
/// (`overlayctl mount --upper ID` shows it). Made when a stack to mount needs it; removed
/// again, empty, when no such stack mounted.
struct RollbackUpper {
    /// The stack the current upper was last used over, and its id, when `fresh` applies.
    from: Option<(Vec<String>, String)>,
    /// The fresh upper's id and directories, once made.
    fresh: Option<(String, (PathBuf, PathBuf))>,
    used: bool,
}

impl RollbackUpper {
    fn new(store: &Store, plan: &Plan, state: &BootState, mode: UpperMode) -> Self {
        // An upper with nothing in it (just started by a checkpoint, say) has nothing to keep.
        let empty = state.current_upper.as_ref().is_none_or(|id| {
            fs::read_dir(store.path_of(Folder::Uppers, id).join(UPPER_DATA))
                .map_or(true, |mut d| d.next().is_none())
        });
        let before = if empty {
            None
        } else if state.upper_stack.is_empty() {
            // Written before the state recorded the upper's own stack.
            state.last_boot.as_ref().map(|b| b.layers.clone())
        } else {
            Some(state.upper_stack.clone())
        };
        let from = (plan.upper.on_rollback == OnRollback::Fresh && mode == UpperMode::Persistent)
            .then_some(before)
            .flatten()
            .zip(state.current_upper.clone());
        Self {
            from,
            fresh: None,
            used: false,
        }
    }

    /// What mounting `stack` leaves out of the upper's last stack: a rollback when not empty.
    fn left_out(&self, plan: &Plan, stack: &[String]) -> Vec<String> {
        self.from
            .as_ref()
            .map(|(before, _)| plan.left_out_since(before, stack))
            .unwrap_or_default()
    }

    /// A fresh upper's directories when mounting `stack` is a rollback; else None (the
    /// current upper). One that cannot be made is said, and the current one used.
    fn dirs_for(
        &mut self,
        store: &Store,
        plan: &Plan,
        state: &BootState,
        stack: &[String],
        log: &mut Log,
    ) -> Option<(PathBuf, PathBuf)> {
        if self.left_out(plan, stack).is_empty() {
            return None;
        }
        if self.fresh.is_none() {
            let id = crate::freeze::first_free_upper(store, state);
            match upper_dirs(store, &id) {
                Ok(dirs) => self.fresh = Some((id, dirs)),
                Err(e) => {
                    log.say(format!(
                        "a fresh upper for the rollback cannot be made ({e}); keeping the current one"
                    ));
                    self.from = None;
                    return None;
                }
            }
        }
        self.fresh.as_ref().map(|(_, dirs)| dirs.clone())
    }

    /// `stack` mounted with `mode`: when it was on the fresh upper, the old one is archived.
    fn mounted(
        &mut self,
        plan: &Plan,
        stack: &[String],
        mode: UpperMode,
        state: &mut BootState,
        log: &mut Log,
    ) {
        let left = self.left_out(plan, stack);
        let (Some((before, current)), Some((id, _))) = (&self.from, &self.fresh) else {
            return;
        };
        if mode != UpperMode::Persistent || left.is_empty() {
            return;
        }
        self.used = true;
        log.say(format!(
            "rolled back from {}: upper {current} is archived (overlayctl mount --upper {current} shows it); a fresh upper {id} starts",
            left.join(", ")
        ));
        // A checkpoint of that upper still pending (its freeze failed) is the archive now.
        if state
            .checkpoint
            .as_ref()
            .is_some_and(|c| !c.frozen && &c.upper == current)
        {
            log.say(format!(
                "the pending checkpoint of upper {current} is dropped: the upper is archived instead"
            ));
            state.checkpoint = None;
        }
        state.archived_uppers.retain(|a| &a.id != current);
        state.archived_uppers.push(layers_spec::ArchivedUpper {
            id: current.clone(),
            layers: plan.current_names(before),
        });
        state.current_upper = Some(id.clone());
    }

    /// The fresh upper this boot made and did not use goes again.
    fn discard_unused(&mut self, store: &Store, log: &mut Log) {
        if let Some((id, _)) = self.fresh.take().filter(|_| !self.used) {
            let removed = store
                .folder(Folder::Uppers)
                .map_err(|e| e.to_string())
                .and_then(|uppers| uppers.remove(&id).map_err(|e| e.to_string()));
            if let Err(e) = removed {
                log.say(format!("could not remove the unused fresh upper {id}: {e}"));
            }
        }
    }
}

fn tmpfs_upper(env: &BootEnv) -> Result<(PathBuf, PathBuf), String> {
    let dir = env.run.join(RUN_SUBDIR).join(TMPFS_UPPER);
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            layers_store::mount::parse_mountinfo(&m)
                .iter()
                .any(|e| e.target == dir)
        })
        .unwrap_or(false);
    if !mounted {
        rustix::mount::mount(
            "strata-upper",
            &dir,
            "tmpfs",
            MountFlags::empty(),
            c"mode=0755",
        )
        .map_err(|e| format!("mounting a tmpfs upper at {}: {e}", dir.display()))?;
    }
    let (data, work) = (dir.join(UPPER_DATA), dir.join(UPPER_WORK));
    for path in [&data, &work] {
        fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    }
    Ok((data, work))
}

/// Deletes what an interrupted store change left (only what Strata named; the root may be
/// read-only, then nothing is removed).
fn clear_leftovers(store: &Store, log: &mut Log) {
    match store.clear_leftovers() {
        Ok(left) => {
            for path in left.removed {
                log.debug(format!(
                    "removed {}, left by an interrupted change",
                    path.display()
                ));
            }
            for (path, why) in left.kept {
                log.debug(format!("{} is kept: {why}", path.display()));
            }
        }
        Err(e) => log.debug(format!(
            "could not clear what interrupted changes left: {e}"
        )),
    }
}

/// Carries out the store's journal: layers a command let go and nothing needs any more are
/// deleted (nothing is mounted from the store yet, so nothing uses them); a change cut short
/// loses what it claimed. Only with a plan read from its own file. Nothing else is deleted.
fn sweep(store: &Store, plan: &Plan, state: &mut BootState, log: &mut Log) {
    match store.sweep(plan, state, &Default::default()) {
        Ok(swept) => {
            for (name, by) in swept.deleted {
                let by = layers_spec::printable(&by);
                log.say(format!("deleted layer {name}, which {by} let go"));
            }
            for (name, why) in swept.failed {
                log.say(format!("layer {name} cannot be deleted now: {why}"));
            }
        }
        Err(e) => log.say(format!("could not delete the layers let go: {e}")),
    }
}

fn write_record(dir: &Path, booted: &Booted, log: &mut Log) {
    let written = fs::create_dir_all(dir).and_then(|()| {
        let text = booted.to_toml().map_err(std::io::Error::other)?;
        fs::write(dir.join(BOOTED_FILE), text)
    });
    if let Err(e) = written {
        log.say(format!(
            "could not write {}: {e}",
            dir.join(BOOTED_FILE).display()
        ));
    }
}

/// Bind-mounts the store at `<run>/strata/store`, so the new root sees it at /run/strata/store.
fn expose_store(run_dir: &Path, store: &Path, log: &mut Log) {
    let target = run_dir.join(STORE_BIND);
    let done = fs::create_dir_all(&target)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            rustix::mount::mount_bind(store, &target).map_err(|e| e.to_string())?;
            // Private, so mounts under it do not spread back to the real root's tree.
            rustix::mount::mount_change(&target, MountPropagationFlags::PRIVATE)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = done {
        log.say(format!(
            "could not make the store visible at /run/strata/store: {e}"
        ));
    }
}

/// A stack for a log line: every name when there are few, else the ends and a count.
fn summarize(stack: &[String]) -> String {
    const SHOWN: usize = 6;
    if stack.len() <= SHOWN {
        return stack.join(", ");
    }
    format!(
        "{} layers: {}, … {}",
        stack.len(),
        stack[..SHOWN - 1].join(", "),
        stack.last().expect("a long stack has a last layer")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_stacks_are_summarized() {
        let names = |n: usize| (0..n).map(|i| format!("l{i}")).collect::<Vec<_>>();
        assert_eq!(summarize(&names(3)), "l0, l1, l2");
        assert_eq!(
            summarize(&names(500)),
            "500 layers: l0, l1, l2, l3, l4, … l499"
        );
    }
}
