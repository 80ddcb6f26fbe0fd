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
    /// a cut at any point.
    pub fn carry_out(&mut self, real_root: &Path, store: &Store) -> Result<(), String> {
        self.move_entries(real_root, store)
            .map_err(|e| e.to_string())?;
        self.phase = Phase::Moved;
        self.write(store)
    }

    fn move_entries(&self, real_root: &Path, store: &Store) -> Result<(), crate::StoreError> {
        let real = Dir::open(real_root)?;
        let layers = store.folder(Folder::Layers)?;
        if layers.kind(&self.layer)?.is_none() {
            let staging = store.folder(Folder::Staging)?;
            let gathered = staging.sub_or_create(GATHERED)?;
            for name in &self.entries {
                if real.kind(name)?.is_some() && gathered.kind(name)?.is_none() {
                    real.rename_to(name, &gathered, name)?;
                }
            }
            if let Some(boot) = real.kind("boot")?.map(|_| real.sub("boot")).transpose()? {
                let gathered_boot = gathered.sub_or_create("boot")?;
                for name in &self.boot_entries {
                    if boot.kind(name)?.is_some() && gathered_boot.kind(name)?.is_none() {
                        boot.rename_to(name, &gathered_boot, name)?;
                    }
                }
                gathered_boot.sync()?;
                boot.sync()?;
            }
            gathered.sync()?;
            real.sync()?;
            staging.rename_to(GATHERED, &layers, &self.layer)?;
            layers.sync()?;
            staging.sync()?;
        }
        Ok(())
    }

    /// Removes the journal once the layer is sealed.
    pub fn remove(store: &Store) -> Result<(), DirError> {
        store.root().remove(ADOPT_FILE).map(drop)
    }
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
}
