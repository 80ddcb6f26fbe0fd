//! `overlayctl adopt`: turns the installed system into a store at the next boot, without
//! copying it (docs/design.md, "Adopt and release"). This writes a store beside the system
//! whose plan names one base layer, the journal of what moves into it, the running kernel where
//! the bootloader starts it, and (GRUB) a boot entry for it; the hook moves the entries at the
//! next boot, and the next change after that writes the layer's manifest and digest.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use layers_spec::{BootState, Layer, LayerState, Plan};
use layers_store::adopt::{Adoption, BOOT_STAYS, Phase, STAYS};
use layers_store::kernel::StackKernel;
use serde::Serialize;

use crate::store::Store;

/// What `adopt` prepared.
#[derive(Debug, Serialize)]
pub struct Adopted {
    pub store: PathBuf,
    pub layer: String,
    /// Top-level entries that become the layer.
    pub entries: Vec<String>,
    /// Entries of `/boot` that become the layer's.
    pub boot_entries: Vec<String>,
    /// The kernel the next boot starts.
    pub kernel: String,
    /// The bootloader configuration written (the old one kept beside it), if any.
    pub bootloader: Option<PathBuf>,
}

/// Prepares the adoption of the system whose root is `root` (`/` on a device).
pub fn adopt(root: &Path, store_name: &str, layer: &str, bootloader: bool) -> Result<Adopted> {
    layers_spec::check_name(layer).map_err(|p| anyhow::anyhow!("{layer:?}: {p}"))?;
    ensure!(
        !crate::store::booted_record_path().exists(),
        "this system already runs from a Strata store; there is nothing to adopt"
    );
    let root_dev = fs::metadata(root)
        .with_context(|| format!("reading {}", root.display()))?
        .dev();
    let boot = root.join("boot");
    if let Ok(meta) = fs::symlink_metadata(&boot) {
        ensure!(
            meta.is_dir() && meta.dev() == root_dev,
            "{} is a separate filesystem or not a directory; adopt needs /boot on the root filesystem",
            boot.display()
        );
    }
    let store_dir = root.join(store_name);
    ensure!(
        fs::symlink_metadata(&store_dir).is_err(),
        "{} exists; adopt makes a new store there",
        store_dir.display()
    );
    let kernel = running_kernel(root)?;
    crate::bootkernel::check_initramfs_has_hook(&kernel.initrd)?;

    let names = |dir: &Path, stays: &[&str]| -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name();
            let name = name
                .to_str()
                .with_context(|| format!("{}: a name that is not UTF-8", dir.display()))?
                .to_owned();
            if !stays.contains(&name.as_str()) && name != store_name {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    };
    let entries = names(root, STAYS)?;
    ensure!(
        ["usr", "etc"]
            .iter()
            .all(|n| entries.iter().any(|e| e == n)),
        "{} does not look like an installed system (no usr/ and etc/)",
        root.display()
    );
    let boot_entries = if boot.is_dir() {
        names(&boot, BOOT_STAYS)?
    } else {
        Vec::new()
    };

    // The boot kernel and the bootloader first: without the journal (written last) they boot
    // the plain system as before.
    let boot_dir = boot.join("strata");
    fs::create_dir_all(&boot_dir).with_context(|| format!("creating {}", boot_dir.display()))?;
    crate::bootkernel::install(&boot_dir, &kernel)?;
    let bootloader = if bootloader {
        write_grub_config(root, &boot)?
    } else {
        None
    };
    // Made here, so a failure removes only what this call made.
    fs::create_dir(&store_dir).with_context(|| format!("creating {}", store_dir.display()))?;
    let made = make_store(&store_dir, layer, &entries, &boot_entries);
    if made.is_err() {
        let _ = fs::remove_dir_all(&store_dir);
    }
    made?;
    Ok(Adopted {
        store: store_dir,
        layer: layer.to_owned(),
        entries,
        boot_entries,
        kernel: kernel.version,
        bootloader,
    })
}

/// The store with its plan and, last, the journal the next boot carries out.
fn make_store(
    store_dir: &Path,
    layer: &str,
    entries: &[String],
    boot_entries: &[String],
) -> Result<()> {
    let store = Store::create(store_dir)?;
    let _lock = store.lock()?;
    let mut base = Layer::new(layer.to_owned());
    base.title = Some("The installed system, adopted".into());
    base.state = LayerState::Active;
    base.known_good = true;
    base.created = Some(crate::store::now());
    store.save_plan(&Plan::new(vec![base]))?;
    store.save_state(&BootState::default())?;
    Adoption {
        version: 1,
        phase: Phase::Pending,
        layer: layer.to_owned(),
        entries: entries.to_vec(),
        boot_entries: boot_entries.to_vec(),
    }
    .write(store.handle())
    .map_err(anyhow::Error::msg)
}

/// The running kernel's files in `root/boot`.
fn running_kernel(root: &Path) -> Result<StackKernel> {
    let version = layers_store::kernel::running_release();
    let kernel = StackKernel {
        vmlinuz: root.join(format!("boot/vmlinuz-{version}")),
        initrd: root.join(format!("boot/initrd.img-{version}")),
        version,
    };
    for file in [&kernel.vmlinuz, &kernel.initrd] {
        ensure!(
            file.is_file(),
            "{} is missing: adopt boots the running kernel, from its files in /boot",
            file.display()
        );
    }
    Ok(kernel)
}

/// Replaces GRUB's configuration with one that boots the kernel Strata keeps in
/// `/boot/strata/default` (the one before is kept as `grub.cfg.before-strata`). Its serial and
/// terminal settings are kept; the kernel arguments are this boot's, less the root and image.
fn write_grub_config(root: &Path, boot: &Path) -> Result<Option<PathBuf>> {
    let config = boot.join("grub/grub.cfg");
    let Ok(old) = fs::read_to_string(&config) else {
        return Ok(None);
    };
    if old.contains("/boot/strata/default/") {
        return Ok(None);
    }
    let uuid = run_text(
        Command::new("findmnt")
            .args(["--noheadings", "--output", "UUID", "--target"])
            .arg(root),
    )?;
    let uuid = uuid.trim();
    ensure!(
        !uuid.is_empty(),
        "the root filesystem has no UUID for GRUB to find it by"
    );
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let args: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|a| {
            !["BOOT_IMAGE=", "root=", "initrd="]
                .iter()
                .any(|p| a.starts_with(p))
                && !["ro", "rw"].contains(a)
        })
        .collect();
    let kept: Vec<&str> = old
        .lines()
        .map(str::trim)
        .filter(|l| {
            ["serial ", "terminal_input ", "terminal_output "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    let entry = |title: &str, link: &str| {
        format!(
            "menuentry '{title}' {{\n    linux /boot/strata/{link}/vmlinuz root=UUID={uuid} ro {args}\n    initrd /boot/strata/{link}/initrd.img\n}}\n",
            args = args.join(" ")
        )
    };
    let text = format!(
        "# Written by overlayctl adopt: boot the kernel Strata keeps for the next boot's stack.\n\
         # The configuration before is in grub.cfg.before-strata.\n\
         {kept}\ninsmod part_msdos\ninsmod part_gpt\ninsmod ext2\n\
         search --no-floppy --fs-uuid --set=root {uuid}\nset default=0\nset timeout=3\n\n{}\
         if [ -f /boot/strata/previous/vmlinuz ]; then\n{}fi\n",
        entry("Strata", "default"),
        entry("Strata (the kernel before)", "previous"),
        kept = kept.join("\n"),
    );
    let saved = boot.join("grub/grub.cfg.before-strata");
    fs::copy(&config, &saved).with_context(|| format!("keeping {}", saved.display()))?;
    // A copy the hook puts back if `update-grub` (a kernel upgrade before the restart) writes
    // Debian's own over it: that one boots kernels the adoption moves into the layer.
    for name in [layers_store::adopt::GRUB_CONFIG_COPY, "grub.cfg.strata-new"] {
        let new = boot.join("grub").join(name);
        fs::write(&new, &text).with_context(|| format!("writing {}", new.display()))?;
        fs::File::open(&new)?.sync_all()?;
    }
    let new = boot.join("grub/grub.cfg.strata-new");
    fs::rename(&new, &config).with_context(|| format!("replacing {}", config.display()))?;
    Ok(Some(config))
}

fn run_text(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `release` prepared.
#[derive(Debug, Serialize)]
pub struct Released {
    /// The stack (top first) and upper that become the plain root.
    pub stack: Vec<String>,
    pub upper: Option<String>,
}

/// Asks the next boot to make the running stack, with its upper, the plain root again, and to
/// put the store aside (`overlayctl release`): the way back from `adopt`.
pub fn release(store: &Store) -> Result<Released> {
    let booted = store.booted()?.ok_or_else(|| {
        anyhow::anyhow!(
            "this system was not booted from the store {}; release acts on the running stack",
            store.root.display()
        )
    })?;
    if let Some(why) = &booted.fallback {
        bail!(
            "this boot fell back ({why}): what runs is not the stack the plan names; restart, and release from a boot that mounts it"
        );
    }
    // Under the lock, with what an interrupted change left finished.
    let change = crate::transaction::Transaction::begin(store)?;
    // (The hook puts the root's fstab line back in the flattened tree: an upper on tmpfs would
    // lose a change made here.)
    let upper = (booted.upper == layers_spec::UpperMode::Persistent)
        .then(|| booted.upper_id.clone())
        .flatten();
    layers_store::release::Release {
        version: 1,
        phase: layers_store::release::Phase::Pending,
        stack: booted.stack.clone(),
        upper: upper.clone(),
    }
    .write(store.handle())
    .map_err(anyhow::Error::msg)?;
    drop(change);
    Ok(Released {
        stack: booted.stack,
        upper,
    })
}
