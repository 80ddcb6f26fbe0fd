//! Which kernel a stack boots (docs/kernels.md), one rule for the hook and `overlayctl`, both
//! reading the stack's layers: the kernel `/vmlinuz` points at (Debian keeps it
//! on the newest installed) when its initramfs is there too, else the highest version that has
//! both `/boot/vmlinuz-V` and `/boot/initrd.img-V`.

use std::path::{Path, PathBuf};

/// A stack's kernel: its version and where its kernel and initramfs files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackKernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

/// The stack's kernel. `find` gives where a path of the stack is (None when the stack has no
/// such entry); `boot_names` are the names in the stack's `/boot`.
pub fn stack_kernel(
    find: impl Fn(&Path) -> Option<PathBuf>,
    boot_names: impl IntoIterator<Item = String>,
) -> Option<StackKernel> {
    let with_files = |version: &str| {
        // A version names a directory of the boot partition (`/boot/strata/VERSION`): never
        // that directory itself or its parent.
        if matches!(version, "" | "." | "..") {
            return None;
        }
        Some(StackKernel {
            version: version.to_owned(),
            vmlinuz: find(&Path::new("boot").join(format!("vmlinuz-{version}")))?,
            initrd: find(&Path::new("boot").join(format!("initrd.img-{version}")))?,
        })
    };
    let linked = ["vmlinuz", "boot/vmlinuz"].iter().find_map(|link| {
        let target = std::fs::read_link(find(Path::new(link))?).ok()?;
        let name = target.file_name()?.to_str()?.to_owned();
        with_files(name.strip_prefix("vmlinuz-")?)
    });
    if linked.is_some() {
        return linked;
    }
    let mut versions: Vec<String> = boot_names
        .into_iter()
        .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
        .collect();
    versions.sort_by_key(|v| version_key(v));
    versions.dedup();
    versions.iter().rev().find_map(|v| with_files(v))
}

/// The kernel of the stack of `layers` (top first, the upper left out: a kernel counts once it
/// is in a layer). What `overlayctl` keeps on the real root and what the hook restarts into.
pub fn layers_kernel(layers: &[PathBuf]) -> Option<StackKernel> {
    let names: Vec<String> = layers
        .iter()
        .filter_map(|layer| std::fs::read_dir(layer.join("boot")).ok())
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    stack_kernel(|rel| lookup(layers, rel), names)
}

/// The file `rel` of the merged stack of `layers` (top first), as overlayfs shows it: the
/// topmost layer that has it, unless a whiteout, a non-directory on the way or an opaque
/// directory above hides the layers below. None when the stack has no such entry.
pub fn lookup(layers: &[PathBuf], rel: &Path) -> Option<PathBuf> {
    for layer in layers {
        let mut hidden_below = false;
        let mut dir = layer.clone();
        for (i, part) in rel.iter().enumerate() {
            dir.push(part);
            let meta = match std::fs::symlink_metadata(&dir) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => return None,
            };
            let last = i + 1 == rel.iter().count();
            if is_whiteout(&meta) {
                return None;
            }
            if last {
                return Some(dir);
            }
            if !meta.is_dir() {
                // A file where the path needs a directory hides the path below.
                return None;
            }
            hidden_below |= is_opaque(&dir);
        }
        if hidden_below {
            return None;
        }
    }
    None
}

fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut value = [0u8; 2];
            rustix::fs::lgetxattr(dir, *name, &mut value).is_ok_and(|n| &value[..n] == b"y")
        })
}

/// Orders kernel versions by their numbers (`6.1.0-9` before `6.1.0-10`).
pub fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Loads `kernel` with its initramfs and `cmdline` for the next kexec (kexec_file_load(2)):
/// the hook restarts into it at once, `overlayctl switch` through systemd's shutdown. The one
/// `unsafe` call of the workspace: no maintained crate wraps this system call.
#[allow(unsafe_code)]
pub fn load_for_kexec(kernel: &StackKernel, cmdline: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let open = |path: &Path| {
        std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))
    };
    let (vmlinuz, initrd) = (open(&kernel.vmlinuz)?, open(&kernel.initrd)?);
    let cmdline = std::ffi::CString::new(cmdline)
        .map_err(|_| "the command line holds a NUL byte".to_owned())?;
    let bytes = cmdline.as_bytes_with_nul();
    // SAFETY: kexec_file_load(2) reads the two descriptors and `bytes.len()` bytes of the
    // NUL-terminated command line, all valid for the call.
    let loaded = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            vmlinuz.as_raw_fd(),
            initrd.as_raw_fd(),
            bytes.len(),
            bytes.as_ptr(),
            0u64,
        )
    };
    if loaded != 0 {
        return Err(format!(
            "kexec_file_load {}: {}",
            kernel.vmlinuz.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The command line for a kexec that carries `stack` (`strata.stack=`, none to let the next
/// boot choose): this one without a `strata.stack=` of its own.
pub fn carried_cmdline(cmdline: &str, stack: Option<&[String]>) -> String {
    let mut kept: Vec<String> = cmdline
        .split_whitespace()
        .filter(|p| !p.starts_with("strata.stack="))
        .map(str::to_owned)
        .collect();
    if let Some(stack) = stack {
        // Everything after `--` belongs to init: ours goes before it.
        let at = kept.iter().position(|p| p == "--").unwrap_or(kept.len());
        kept.insert(at, format!("strata.stack={}", stack.join(",")));
    }
    kept.join(" ")
}

/// The running kernel's release (`uname -r`).
pub fn running_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn lookup_follows_overlay_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, bottom) = (tmp.path().join("top"), tmp.path().join("bottom"));
        for (layer, file) in [(&bottom, "boot/a"), (&bottom, "boot/b"), (&top, "boot/c")] {
            fs::create_dir_all(layer.join(file).parent().unwrap()).unwrap();
            fs::write(layer.join(file), file).unwrap();
        }
        let layers = [top.clone(), bottom.clone()];
        assert_eq!(
            lookup(&layers, Path::new("boot/a")),
            Some(bottom.join("boot/a"))
        );
        assert_eq!(
            lookup(&layers, Path::new("boot/c")),
            Some(top.join("boot/c"))
        );
        assert_eq!(lookup(&layers, Path::new("boot/none")), None);
        // A file named boot in the top layer hides the directory below.
        let shadow = [tmp.path().join("shadow"), bottom.clone()];
        fs::create_dir_all(&shadow[0]).unwrap();
        fs::write(shadow[0].join("boot"), "x").unwrap();
        assert_eq!(lookup(&shadow, Path::new("boot/a")), None);
    }

    fn in_root(root: &Path) -> Option<StackKernel> {
        let names = fs::read_dir(root.join("boot"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_else(|_| Vec::new());
        stack_kernel(
            |rel| {
                let path = root.join(rel);
                path.symlink_metadata().is_ok().then_some(path)
            },
            names,
        )
    }

    #[test]
    fn the_stack_is_carried_before_init_arguments() {
        let stack = ["up".to_owned(), "base".to_owned()];
        assert_eq!(
            carried_cmdline(
                "root=LABEL=r ro strata.stack=x quiet -- single",
                Some(&stack)
            ),
            "root=LABEL=r ro quiet strata.stack=up,base -- single"
        );
        assert_eq!(
            carried_cmdline("ro", Some(&stack)),
            "ro strata.stack=up,base"
        );
        assert_eq!(carried_cmdline("ro strata.stack=a quiet", None), "ro quiet");
    }

    #[test]
    fn the_linked_kernel_or_the_newest_with_both_files() {
        let root = tempfile::tempdir().unwrap();
        let boot = root.path().join("boot");
        fs::create_dir(&boot).unwrap();
        assert_eq!(in_root(root.path()), None);
        for name in [
            "vmlinuz-6.1.0-9-amd64",
            "initrd.img-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "initrd.img-6.1.0-10-amd64",
            "vmlinuz-6.1.0-11-amd64",
        ] {
            fs::write(boot.join(name), name).unwrap();
        }
        // 11 has no initramfs: 10 is the newest bootable one.
        assert_eq!(in_root(root.path()).unwrap().version, "6.1.0-10-amd64");
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-9-amd64", root.path().join("vmlinuz"))
            .unwrap();
        let kernel = in_root(root.path()).unwrap();
        assert_eq!(kernel.version, "6.1.0-9-amd64");
        assert_eq!(kernel.initrd, boot.join("initrd.img-6.1.0-9-amd64"));
    }

    #[test]
    fn a_version_never_names_the_boot_directory_or_its_parent() {
        let root = tempfile::tempdir().unwrap();
        let boot = root.path().join("boot");
        fs::create_dir(&boot).unwrap();
        for name in ["vmlinuz-..", "initrd.img-..", "vmlinuz-.", "initrd.img-."] {
            fs::write(boot.join(name), name).unwrap();
        }
        assert_eq!(in_root(root.path()), None);
        std::os::unix::fs::symlink("boot/vmlinuz-..", root.path().join("vmlinuz")).unwrap();
        assert_eq!(in_root(root.path()), None);
    }
}
