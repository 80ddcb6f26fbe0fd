//! Adopting an installed system (docs/design.md, "Adopt and release"): `overlayctl adopt` writes
//! the journal `adopt.toml` in a new store, naming the real root's top-level entries (and the
//! kernels' files in `/boot`) that become the base layer; the hook, at the next boot, moves them
//! there by rename (no copy) before it reads the plan. Each step is a rename, and the journal
//! stays until the last one is done, so a power cut anywhere is finished by the next boot: the
//! machine boots the plain system (before the journal exists) or the adopted store, never
//! neither.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dir::{Dir, DirError};
use crate::layout::Folder;
use crate::store::Store;

/// Names on the real root that stay there (besides the store): the filesystem's, and `/boot`
/// (its kernels' files move; GRUB's files and the boot kernel stay).
pub const STAYS: &[&str] = &["lost+found", "boot"];
/// Names in `/boot` that stay on the real root.
pub const BOOT_STAYS: &[&str] = &["grub", "strata", "efi", "lost+found"];

/// `overlayctl adopt`'s GRUB configuration, kept beside `grub.cfg` in `/boot/grub`.
pub const GRUB_CONFIG_COPY: &str = "grub.cfg.strata";
/// What every configuration `overlayctl adopt` writes boots.
const GRUB_BOOTS: &str = "/boot/strata/default/";

/// The journal's file name, in the store.
pub const ADOPT_FILE: &str = "adopt.toml";
/// Where the base layer is gathered in `staging/` before it is renamed into `layers/`.
const GATHERED: &str = "adopting";

/// Where an adoption is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Written by `overlayctl adopt`; the next boot moves the entries.
    Pending,
    /// The entries are in the layer; the next change writes its manifest and digest.
    Moved,
}

/// The journal of an adoption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adoption {
    pub version: u32,
    pub phase: Phase,
    /// The layer the entries become.
    pub layer: String,
    /// Top-level entries of the real root to move.
    pub entries: Vec<String>,
    /// Entries of the real root's `/boot` to move (the kernels and their files; GRUB's own
    /// files and `/boot/strata` stay).
    pub boot_entries: Vec<String>,
}

impl Adoption {
    /// The journal in `store`, when there is one.
    pub fn read(store: &Store) -> Result<Option<Self>, String> {
        let bytes = store.root().read(ADOPT_FILE).map_err(|e| e.to_string())?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let path = store.root().child_path(ADOPT_FILE);
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
        let adoption: Self =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        layers_spec::check_name(&adoption.layer)
            .map_err(|p| format!("{}: layer {:?}: {p}", path.display(), adoption.layer))?;
        for name in adoption.entries.iter().chain(&adoption.boot_entries) {
            if !is_entry_name(name) {
                return Err(format!(
                    "{}: {name:?} is not the name of an entry (no `/`, not `.` or `..`)",
                    path.display()
                ));
            }
        }
        let store_name = store.root().path().file_name().and_then(|n| n.to_str());
        let stays = |names: &[String], stays: &[&str], whose: &str| match names
            .iter()
            .find(|n| stays.contains(&n.as_str()) || Some(n.as_str()) == store_name)
        {
            Some(name) => Err(format!(
                "{}: {name:?} stays on the real root's {whose}; an adoption never moves it",
                path.display()
            )),
            None => Ok(()),
        };
        stays(&adoption.entries, STAYS, "top level")?;
        stays(&adoption.boot_entries, BOOT_STAYS, "/boot")?;
        Ok(Some(adoption))
    }

    /// Writes the journal (a new file renamed over the old one, flushed).
    pub fn write(&self, store: &Store) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let root = store.root();
        let scratch = crate::layout::scratch_name(ADOPT_FILE);
        root.write_new(&scratch, text.as_bytes(), 0o644)
            .and_then(|()| root.rename_over(&scratch, root, ADOPT_FILE))
            .and_then(|()| root.sync())
            .map_err(|e| e.to_string())
    }

    /// Moves the entries into the layer (the hook's part): what is still on the real root
    /// goes to `staging/adopting/`, then that becomes `layers/LAYER`. Safe to run again after
    /// a cut at any point. A warning for the log when GRUB's configuration could not be
    /// checked (the adoption stands: the store boots whatever GRUB starts, through the hook).
    pub fn carry_out(&mut self, real_root: &Path, store: &Store) -> Result<Option<String>, String> {
        self.move_entries(real_root, store)
            .map_err(|e| e.to_string())?;
        let warning = keep_grub_config(real_root)
            .err()
            .map(|e| format!("GRUB's configuration was not checked: {e}"));
        self.phase = Phase::Moved;
        self.write(store)?;
        Ok(warning)
    }

    fn move_entries(&self, real_root: &Path, store: &Store) -> Result<(), crate::StoreError> {
        let real = Dir::open(real_root)?;
        let layers = store.folder(Folder::Layers)?;
        if layers.kind(&self.layer)?.is_some() {
            return Ok(());
        }
        let staging = store.folder(Folder::Staging)?;
        // Every directory first, so no step after the first rename needs space.
        let gathered = staging.sub_or_create(GATHERED)?;
        let boot = match real.kind("boot")? {
            Some(_) => Some((real.sub("boot")?, gathered.sub_or_create("boot")?)),
            None => None,
        };
        let moves = || -> Result<(), crate::StoreError> {
            let mut groups = vec![(&real, &gathered, &self.entries)];
            if let Some((boot, gathered_boot)) = &boot {
                groups.push((boot, gathered_boot, &self.boot_entries));
            }
            // Each entry still to move must move by rename: not something mounted on (a
            // separate /usr, a bind mount), which rename refuses halfway through.
            for (from, _, names) in &groups {
                for name in names.iter() {
                    if from.kind(name)?.is_some() && from.is_mount_point(name)? {
                        return Err(DirError::io(
                            from.child_path(name),
                            "moving it into the base layer",
                            std::io::Error::other(
                                "it is a mount point (a separate filesystem or a bind mount), \
                                 which cannot move by rename; unmount it or leave it out of \
                                 fstab, then boot again",
                            ),
                        )
                        .into());
                    }
                }
            }
            for (from, to, names) in &groups {
                for name in names.iter() {
                    if from.kind(name)?.is_some() && to.kind(name)?.is_none() {
                        from.rename_to(name, to, name)?;
                    }
                }
            }
            Ok(())
        };
        if let Err(e) = moves() {
            // Everything back where it was, so the plain system boots as before; the journal
            // stays, and the next boot tries again.
            let mut groups = vec![(&real, &gathered, &self.entries)];
            if let Some((boot, gathered_boot)) = &boot {
                groups.push((boot, gathered_boot, &self.boot_entries));
            }
            for (to, from, names) in groups {
                for name in names {
                    if matches!(from.kind(name), Ok(Some(_))) && matches!(to.kind(name), Ok(None)) {
                        let _ = from.rename_to(name, to, name);
                    }
                }
                let _ = to.sync();
            }
            return Err(e);
        }
        if let Some((boot, gathered_boot)) = &boot {
            gathered_boot.sync()?;
            boot.sync()?;
        }
        // `/` is the overlay from now on: the root's fstab line is marked in the layer (never
        // before: a plain system that boots after a cut mounts its root as it always did).
        rewrite_fstab(&gathered, false)?;
        gathered.sync()?;
        real.sync()?;
        staging.rename_to(GATHERED, &layers, &self.layer)?;
        layers.sync()?;
        staging.sync()?;
        Ok(())
    }

    /// Removes the journal once the layer is sealed.
    pub fn remove(store: &Store) -> Result<(), DirError> {
        store.root().remove(ADOPT_FILE).map(drop)
    }
}

/// Puts adopt's GRUB configuration back when something rewrote `grub.cfg` after it (Debian's
/// `update-grub`, run by a kernel upgrade before the restart, boots `/boot/vmlinuz-V`, which is
/// in the layer now): the one found is kept as `grub.cfg.after-adopt`.
fn keep_grub_config(real_root: &Path) -> Result<(), DirError> {
    let real = Dir::open(real_root)?;
    if !real.has_dir("boot") || !real.sub("boot")?.has_dir("grub") {
        return Ok(());
    }
    let grub = real.sub("boot")?.sub("grub")?;
    let Some(ours) = grub.read(GRUB_CONFIG_COPY)? else {
        return Ok(());
    };
    let current = grub.read("grub.cfg")?.unwrap_or_default();
    if String::from_utf8_lossy(&current).contains(GRUB_BOOTS) {
        return Ok(());
    }
    if !current.is_empty() {
        let kept = crate::layout::scratch_name("grub.cfg.after-adopt");
        grub.write_new(&kept, &current, 0o644)?;
        grub.rename_over(&kept, &grub, "grub.cfg.after-adopt")?;
    }
    let scratch = crate::layout::scratch_name("grub.cfg");
    grub.write_new(&scratch, &ours, 0o644)?;
    grub.rename_over(&scratch, &grub, "grub.cfg")?;
    grub.sync()
}

/// Before the real root's line in an adopted system's fstab: `/` is Strata's overlay.
pub const FSTAB_MARK: &str = "#strata: / is the overlay the initramfs mounts; this was: ";

/// The fstab `text` with the root filesystem's line marked as Strata's (`/` is the overlay the
/// hook mounts, which no mount option of the real root's fits), or, `restore`, put back. None
/// when nothing changes.
pub fn fstab_root(text: &str, restore: bool) -> Option<String> {
    let mut changed = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if restore {
                if let Some(original) = line.strip_prefix(FSTAB_MARK) {
                    changed = true;
                    return original.to_owned();
                }
            } else if line.split_whitespace().nth(1) == Some("/") && !line.starts_with('#') {
                changed = true;
                return format!("{FSTAB_MARK}{line}");
            }
            line.to_owned()
        })
        .collect();
    changed.then(|| lines.join("\n") + "\n")
}

/// The root filesystem's line in the tree's `etc/fstab` marked as Strata's, or, `restore`, put
/// back: a new file renamed over the old one (a hard link to a layer's file stays as it was).
pub(crate) fn rewrite_fstab(tree: &Dir, restore: bool) -> Result<(), DirError> {
    if tree.kind("etc")? != Some(rustix::fs::FileType::Directory) {
        return Ok(());
    }
    let etc = tree.sub("etc")?;
    if etc.kind("fstab")? != Some(rustix::fs::FileType::RegularFile) {
        return Ok(());
    }
    let Some(text) = etc
        .read("fstab")?
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| fstab_root(&text, restore))
    else {
        return Ok(());
    };
    let scratch = crate::layout::scratch_name("fstab");
    etc.write_new(&scratch, text.as_bytes(), 0o644)?;
    etc.rename_over(&scratch, &etc, "fstab")?;
    etc.sync()
}

/// A name of one directory entry: not empty, no `/`, not `.` or `..` (a journal never leads a
/// rename outside the directory it names).
pub fn is_entry_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\0']) && name != "." && name != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_stay_in_their_directory() {
        for good in ["etc", "lost+found", "vmlinuz", ".hidden", "a b"] {
            assert!(is_entry_name(good), "{good}");
        }
        for bad in ["", ".", "..", "../etc", "etc/passwd", "/etc", "a\0b"] {
            assert!(!is_entry_name(bad), "{bad}");
        }
    }

    #[test]
    fn adopts_grub_configuration_comes_back_after_update_grub() {
        let tmp = tempfile::tempdir().unwrap();
        let grub = tmp.path().join("boot/grub");
        std::fs::create_dir_all(&grub).unwrap();
        let ours = "linux /boot/strata/default/vmlinuz root=UUID=x\n";
        let debians = "linux /boot/vmlinuz-6.1.0-57-amd64 root=UUID=x\n";
        std::fs::write(grub.join(GRUB_CONFIG_COPY), ours).unwrap();
        std::fs::write(grub.join("grub.cfg"), debians).unwrap();
        keep_grub_config(tmp.path()).unwrap();
        let read = |name: &str| std::fs::read_to_string(grub.join(name)).unwrap();
        assert_eq!(read("grub.cfg"), ours);
        assert_eq!(read("grub.cfg.after-adopt"), debians);
        // Once it is ours, nothing changes; nor without adopt's copy.
        std::fs::write(grub.join("grub.cfg.after-adopt"), "kept").unwrap();
        keep_grub_config(tmp.path()).unwrap();
        assert_eq!(read("grub.cfg.after-adopt"), "kept");
        std::fs::remove_file(grub.join(GRUB_CONFIG_COPY)).unwrap();
        std::fs::write(grub.join("grub.cfg"), debians).unwrap();
        keep_grub_config(tmp.path()).unwrap();
        assert_eq!(read("grub.cfg"), debians);
    }
}
