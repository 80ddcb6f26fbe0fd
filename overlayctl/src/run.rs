//! `overlayctl run -- CMD ARGS…`: a command (a package upgrade, say) run in the next boot's stack
//! with a fresh upper, in a private mount namespace and a chroot; what it changed becomes a trial
//! layer when it succeeds, and is discarded when it fails or is interrupted.
//!
//! The command runs in a child `overlayctl` (a hidden subcommand) that unshares its mount
//! namespace, mounts the overlay and /proc, /sys, /dev, /run inside it, chroots and execs the
//! command: every mount vanishes with it. The parent waits (Ctrl-C reaches the command, not the
//! parent), then turns the upper into a layer or removes it. Inside, `systemd-detect-virt
//! --container` says yes (`/run/host/container-manager`): packages' scripts leave the machine's
//! bootloader and services alone, as they do when an image is built in a container.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail, ensure};
use layers_spec::{LayerState, check_name};
use layers_store::mount::{OverlaySpec, SOURCE_PREFIX, mount_overlay};
use rustix::fd::OwnedFd;
use rustix::fs::{FlockOperation, Mode, OFlags, flock};

use crate::engine::{Kind, Node};
use crate::install::Files;
use crate::ops::{self, Added, NewLayer};
use crate::store::Store;
use crate::transaction::Transaction;

/// What a run did.
#[derive(Debug)]
pub enum Outcome {
    /// The command succeeded and changed something: the new layer.
    Added {
        added: Added,
        entries: u64,
        deletions: u64,
        /// Bytes of file content.
        bytes: u64,
    },
    /// It succeeded and changed nothing.
    Unchanged,
    /// It failed or was interrupted; its changes were discarded (or kept at `kept`).
    Failed { why: String, kept: Option<PathBuf> },
}

/// Runs `command` in the next boot's stack; see the module's documentation.
pub fn run(
    store: &Store,
    layer: &NewLayer,
    keep_on_failure: bool,
    command: &[String],
) -> Result<Outcome> {
    ensure!(!command.is_empty(), "no command to run: give it after --");
    check_name(&layer.name)
        .map_err(|p| anyhow::anyhow!("layer name {:?} is not valid: {p}", layer.name))?;
    // The next boot's stack, and the checks a new layer passes, read under the lock (and after
    // recovery); nothing is written until the run is done.
    let (stack, plan) = {
        let change = Transaction::begin(store)?;
        change.check_name_free(&layer.name)?;
        change.check_room_for_one()?;
        let stack = crate::status::next_boot(store, &change.plan, &change.state).stack;
        (stack, change.plan)
    };
    ensure!(
        !stack.is_empty(),
        "the next boot's stack is empty, so there is nothing to run in"
    );
    let free = ops::free_bytes(store)?;
    ensure!(
        free > plan.policy.min_free.0,
        "not enough room in {} to run anything: {} free, and policy.min_free keeps {}; nothing was run",
        store.root.display(),
        layers_spec::ByteSize(free),
        plan.policy.min_free
    );

    let runs = store.folder(crate::store::Folder::Runs)?;
    let scratch = runs.child_path(&layer.name);
    // Under the store's lock, so no other command takes the new run for a stale one.
    let store_lock = store.lock()?;
    crate::recover::clean_stale_runs(store)?;
    ensure!(
        !scratch.exists(),
        "{} exists (another run of that name, or one kept with --keep-on-failure); choose another --name",
        scratch.display()
    );
    let (upper, work, root) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("root"),
    );
    // The lock file first: it marks the directory as a run's (see `clean_stale_runs`).
    fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let _alive = lock_run(&scratch)?;
    for dir in [&upper, &work, &root] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    drop(store_lock);
    // The parent outlives Ctrl-C (the terminal sends it to the command too) to clean up.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGTERM,
    ] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))
            .context("catching interrupts")?;
    }
    let exe = std::env::current_exe().context("finding overlayctl itself")?;
    let mut child = Command::new(exe);
    child
        .arg("--store")
        .arg(&store.root)
        .arg("__run-child")
        .arg(&scratch);
    for name in &stack {
        child.arg("--lower").arg(store.layer_dir(name));
    }
    let status = child
        .arg("--")
        .args(command)
        .status()
        .context("starting the run")?;
    let failed = match (status.success(), interrupted.load(Ordering::SeqCst)) {
        (_, true) => Some("interrupted".to_owned()),
        (true, false) => None,
        (false, false) => Some(match status.code() {
            Some(code) => format!("{} failed (exit status {code})", command[0]),
            None => format!("{} was stopped by a signal", command[0]),
        }),
    };
    if let Some(why) = failed {
        if keep_on_failure {
            fs::write(scratch.join(KEPT), format!("{why}\n"))
                .with_context(|| format!("marking {} as kept", scratch.display()))?;
            return Ok(Outcome::Failed {
                why,
                kept: Some(upper),
            });
        }
        runs.remove(&layer.name)?;
        return Ok(Outcome::Failed { why, kept: None });
    }

    let result = {
        let _progress = crate::progress::Phase::start(format!("making layer {}", layer.name));
        add_upper(store, layer, &stack, &upper)
    };
    runs.remove(&layer.name)?;
    result
}

use layers_store::layout::{RUN_KEPT as KEPT, RUN_LOCK as LIVE_LOCK};

/// Locks the run at `scratch` for as long as any process of it lives: the lock's file is
/// inherited by the child and the command (no close-on-exec), so a run whose `overlayctl` was
/// killed stays locked while its command still writes.
fn lock_run(scratch: &Path) -> Result<OwnedFd> {
    let path = scratch.join(LIVE_LOCK);
    let fd = rustix::fs::open(
        &path,
        OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .map_err(std::io::Error::from)
    .with_context(|| format!("creating {}", path.display()))?;
    flock(&fd, FlockOperation::NonBlockingLockExclusive)
        .map_err(std::io::Error::from)
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(fd)
}

/// Adds the upper a successful run left as a trial layer on the stack it ran in.
fn add_upper(store: &Store, layer: &NewLayer, stack: &[String], upper: &Path) -> Result<Outcome> {
    let tree = ops::read_clean(upper, crate::engine::XattrNs::Trusted)
        .context("reading what the command changed")?;
    let Kind::Dir { children, .. } = &tree.tree.kind else {
        bail!("{} is not a directory", upper.display());
    };
    if children.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    let (mut entries, mut deletions) = (0, 0);
    count(&tree.tree, &mut entries, &mut deletions);
    let bytes = tree.tree.content_bytes();
    let mut tree = Some(tree);
    let added = ops::add_built_layer(store, layer, Files::Link, "run", &mut |plan, state, new| {
        let now = crate::status::next_boot(store, plan, state).stack;
        ensure!(
            now == stack,
            "the next boot's stack changed while the command ran ({} then, {} now); its changes were discarded",
            stack.join(", "),
            now.join(", ")
        );
        new.parent = stack.first().cloned();
        tree.take().context("the run's layer is added once")
    })?;
    Ok(Outcome::Added {
        added,
        entries,
        deletions,
        bytes,
    })
}

fn count(node: &Node, entries: &mut u64, deletions: &mut u64) {
    if let Kind::Dir { children, .. } = &node.kind {
        for child in children.values() {
            *entries += 1;
            if matches!(child.kind, Kind::Whiteout) {
                *deletions += 1;
            }
            count(child, entries, deletions);
        }
    }
}

/// The child: a private mount namespace, the overlay at `scratch/root` with `/proc`, `/sys`,
/// `/dev` and `/run` inside it, a chroot, and the command in its place. Returns only on error.
pub fn child(store: &Path, scratch: &Path, lowers: &[PathBuf], command: &[String]) -> Result<()> {
    use nix::mount::{MsFlags, mount};
    private_mount_namespace()?;
    let root = scratch.join("root");
    let spec = OverlaySpec {
        lowers: lowers.to_vec(),
        upper: Some((scratch.join("upper"), scratch.join("work"))),
        userxattr: false,
        read_only: false,
        // Canonical, as `overlayctl mount`'s: the layers are named relative to `layers/`.
        source: format!(
            "{SOURCE_PREFIX}:{}",
            std::fs::canonicalize(store)
                .unwrap_or_else(|_| store.to_owned())
                .display()
        ),
    };
    mount_overlay(&spec, &root).context("mounting the stack with a fresh upper")?;
    // Only where the tree has the directory: making one would change the layer.
    let inside = |dir: &str| Some(root.join(dir)).filter(|p| p.is_dir());
    if let Some(proc) = inside("proc") {
        mount(
            Some("proc"),
            &proc,
            Some("proc"),
            MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting /proc")?;
    }
    for dir in ["sys", "dev"] {
        if let Some(target) = inside(dir) {
            mount(
                Some(Path::new("/").join(dir).as_path()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .with_context(|| format!("binding /{dir}"))?;
        }
    }
    if let Some(run) = inside("run") {
        mount(
            Some("tmpfs"),
            &run,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )
        .context("mounting /run")?;
        // Tell the packages' scripts this is not the booted system, as a container manager
        // does: GRUB's kernel hook and postinst then leave the bootloader alone (Strata keeps
        // the next boot's kernel itself, docs/kernels.md) instead of failing to find the root
        // device under an overlay.
        fs::create_dir(run.join("host")).context("making /run/host")?;
        fs::write(run.join("host/container-manager"), "strata-run\n")
            .context("writing /run/host/container-manager")?;
    }
    nix::unistd::chroot(&root).context("changing root")?;
    std::env::set_current_dir("/").context("entering the new root")?;
    let error = Command::new(&command[0]).args(&command[1..]).exec();
    eprintln!("overlayctl run: {}: {error}", command[0]);
    std::process::exit(127);
}

/// Moves the calling thread into a mount namespace of its own whose mounts do not propagate
/// back: what it mounts vanishes with it and is never seen by the rest of the system.
pub fn private_mount_namespace() -> Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("making a private mount namespace (this needs root)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the mounts private")?;
    Ok(())
}

/// The trial layer a run adds.
pub fn new_layer(name: Option<String>, title: Option<String>, command: &[String]) -> NewLayer {
    NewLayer {
        name: name.unwrap_or_else(|| crate::store::stamped_name("run")),
        title,
        parent: None,
        state: LayerState::Trial,
        known_good: false,
        notes: Some(format!("made by: overlayctl run -- {}", command.join(" "))),
        release: None,
    }
}
