//! Which kernel a stack boots (docs/kernels.md), one rule for the hook (reading the mounted
//! stack) and `overlayctl` (reading the layers): the kernel `/vmlinuz` points at (Debian keeps it
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

/// Orders kernel versions by their numbers (`6.1.0-9` before `6.1.0-10`).
pub fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
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
}
