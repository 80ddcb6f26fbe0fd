//! `overlayctl mount` and `umount`: any selection of layers, with an archived or current upper,
//! a throw-away tmpfs upper, or read-only, mounted with real overlayfs for inspection and
//! recovery; and unmounting only what was mounted so.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use layers_spec::{BootOverrides, check_name, resolve};
use layers_store::mount::{
    MountApi, OverlaySpec, SOURCE_PREFIX, mount_overlay, strata_mount_at, unmount,
};
use rustix::mount::MountFlags;

use crate::store::{Store, UPPERS, booted_record_path};
use crate::{MountOpts, write_json};
use layers_store::layout::{UPPER_DATA, UPPER_WORK};

/// A small tmpfs for a throw-away upper or an empty bottom layer. Once the overlay holds its
/// directories it is detached: it lives as long as the overlay and needs no cleaning up.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self> {
        let run = booted_record_path()
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| layers_store::layout::RUN_DIR.into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = run
            .join("tmp")
            .join(format!("mount.{}.{nanos}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        rustix::mount::mount(
            "strata-scratch",
            &dir,
            "tmpfs",
            MountFlags::empty(),
            c"mode=0755",
        )
        .map_err(std::io::Error::from)
        .with_context(|| {
            format!(
                "mounting a tmpfs at {} (mounting needs root)",
                dir.display()
            )
        })?;
        Ok(Self { dir })
    }

    fn subdir(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = unmount(&self.dir, true);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The record of an archived upper `id`, when it is one.
fn archived(store: &Store, id: Option<&str>) -> Result<Option<layers_spec::ArchivedUpper>> {
    let Some(id) = id else { return Ok(None) };
    Ok(store
        .state()?
        .archived_uppers
        .into_iter()
        .find(|a| a.id == id))
}

pub fn mount_command(root: &Path, opts: &MountOpts, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(root)?;
    let plan = store.plan()?.value;
    // An archived upper goes over the stack it was used over, unless told otherwise.
    let archived = archived(&store, opts.upper.as_deref())?;
    let stack: Vec<String> = match (&opts.layers, &opts.top, archived) {
        (Some(names), _, _) => {
            for name in names {
                if plan.layer(name).is_none() {
                    bail!("--layers names {name:?}, which is not a layer of the plan");
                }
            }
            plan.layers
                .iter()
                .filter(|l| names.contains(&l.name))
                .map(|l| l.name.clone())
                .collect()
        }
        (None, None, Some(archived)) => {
            let stack = plan.current_names(&archived.layers);
            if let Some(gone) = stack.iter().find(|n| plan.layer(n).is_none()) {
                bail!(
                    "upper {} was archived over {}, and layer {gone} is no longer in the plan; name a stack with --top or --layers",
                    archived.id,
                    stack.join(", ")
                );
            }
            stack
        }
        (None, top, _) => {
            if let Some(top) = top.as_ref().filter(|t| plan.layer(t).is_none()) {
                bail!("--top {top:?} is not a layer of the plan");
            }
            let overrides = BootOverrides {
                top: top.clone(),
                ..BootOverrides::default()
            };
            resolve(&plan, &store.state()?, &overrides, None).stack
        }
    };
    if stack.is_empty() {
        bail!("the selection has no layers to mount");
    }
    for name in &stack {
        let dir = store.layer_dir(name);
        if !dir.is_dir() {
            bail!("layer {name} is missing: {} does not exist", dir.display());
        }
    }
    if !opts.mountpoint.is_dir() {
        bail!(
            "the mount point {} is not a directory",
            opts.mountpoint.display()
        );
    }

    let mut lowers: Vec<PathBuf> = stack.iter().map(|n| store.layer_dir(n)).collect();
    let mut scratch = None;
    let upper = if let Some(id) = &opts.upper {
        check_name(id).map_err(|p| anyhow!("upper id {id:?} is not valid: {p}"))?;
        if store
            .booted()?
            .is_some_and(|b| b.upper_id.as_deref() == Some(id.as_str()))
        {
            bail!("upper {id} is the running system's upper; mounting it twice would corrupt it");
        }
        let dir = store.root.join(UPPERS).join(id);
        let (data, work) = (dir.join(UPPER_DATA), dir.join(UPPER_WORK));
        if !data.is_dir() || !work.is_dir() {
            bail!(
                "there is no upper {id}: {} needs data/ and work/",
                dir.display()
            );
        }
        Some((data, work))
    } else if opts.tmpfs_upper {
        let tmp = scratch.insert(Scratch::new()?);
        Some((tmp.subdir("data")?, tmp.subdir("work")?))
    } else {
        if lowers.len() == 1 {
            // overlayfs wants two lowers when there is no upper: add an empty one.
            lowers.push(scratch.insert(Scratch::new()?).subdir("empty")?);
        }
        None
    };
    let spec = OverlaySpec {
        lowers,
        upper,
        userxattr: false,
        read_only: opts.upper.is_none() && !opts.tmpfs_upper,
        // The store's canonical path: the layers are named relative to `layers/`, and whoever
        // reads this mount back (what is in use, from any working directory) finds them by it.
        source: format!(
            "{SOURCE_PREFIX}:{}",
            std::fs::canonicalize(&store.root)
                .unwrap_or_else(|_| store.root.clone())
                .display()
        ),
    };
    let api = mount_overlay(&spec, &opts.mountpoint).with_context(|| {
        format!(
            "mounting {} layers at {}",
            stack.len(),
            opts.mountpoint.display()
        )
    })?;
    drop(scratch);
    if json {
        return write_json(
            out,
            &serde_json::json!({
                "mountpoint": opts.mountpoint, "layers": stack, "read_only": spec.read_only,
                "api": if api == MountApi::New { "new" } else { "classic" },
            }),
        );
    }
    writeln!(
        out,
        "mounted {} layer{} at {} ({}): {}",
        stack.len(),
        if stack.len() == 1 { "" } else { "s" },
        opts.mountpoint.display(),
        match (&opts.upper, opts.tmpfs_upper) {
            (Some(id), _) => format!("changes go to upper {id}"),
            (None, true) => "changes go to a tmpfs and are lost at umount".to_owned(),
            _ => "read-only".to_owned(),
        },
        stack.join(", ")
    )?;
    Ok(())
}

pub fn umount_command(target: &Path, json: bool, out: &mut dyn Write) -> Result<()> {
    let canonical =
        fs::canonicalize(target).with_context(|| format!("finding {}", target.display()))?;
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let Some(entry) = strata_mount_at(&mountinfo, &canonical) else {
        bail!(
            "{} is not an overlay that overlayctl mounted; nothing was unmounted",
            target.display()
        );
    };
    unmount(&canonical, false).with_context(|| format!("unmounting {}", target.display()))?;
    if json {
        return write_json(
            out,
            &serde_json::json!({ "unmounted": canonical, "source": entry.source }),
        );
    }
    writeln!(out, "unmounted {}", canonical.display())?;
    Ok(())
}
