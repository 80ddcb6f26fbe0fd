//! Kernels that follow the stack (docs/kernels.md): when the stack this boot mounted has a
//! kernel other than the running one, restart into it with kexec, passing the stack on as
//! `strata.stack=` so the second pass mounts exactly it, asks nothing and counts nothing again.

use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::log::Log;

/// A stack's kernel: its version and its two files, inside the mounted stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackKernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

/// The kernel of the stack mounted at `root`: the one `/vmlinuz` points at (Debian keeps it on
/// the newest installed) when its initramfs is there too, else the highest version that has
/// both files. None for a stack without a kernel.
pub fn stack_kernel(root: &Path) -> Option<StackKernel> {
    let boot = root.join("boot");
    let with_files = |version: &str| {
        let vmlinuz = boot.join(format!("vmlinuz-{version}"));
        let initrd = boot.join(format!("initrd.img-{version}"));
        (vmlinuz.is_file() && initrd.is_file()).then(|| StackKernel {
            version: version.to_owned(),
            vmlinuz,
            initrd,
        })
    };
    let linked = ["vmlinuz", "boot/vmlinuz"].iter().find_map(|link| {
        let target = fs::read_link(root.join(link)).ok()?;
        let name = target.file_name()?.to_str()?.to_owned();
        with_files(name.strip_prefix("vmlinuz-")?)
    });
    if linked.is_some() {
        return linked;
    }
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
        .collect();
    versions.sort_by_key(|v| version_key(v));
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

/// The command line for the second pass: this one without a `strata.stack=` of its own, and
/// the stack this pass chose.
pub fn carried_cmdline(cmdline: &str, stack: &[String]) -> String {
    let mut kept: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|p| !p.starts_with("strata.stack="))
        .collect();
    let given = format!("strata.stack={}", stack.join(","));
    // Everything after `--` belongs to init: ours goes before it.
    let at = kept.iter().position(|p| *p == "--").unwrap_or(kept.len());
    kept.insert(at, &given);
    kept.join(" ")
}

/// Loads `kernel` with its initramfs and `cmdline` for kexec, then restarts into it. Returns
/// only when that fails, with why. (The one `unsafe` call of the workspace: no maintained crate
/// wraps kexec_file_load.)
#[allow(unsafe_code)]
pub fn restart_into(kernel: &StackKernel, cmdline: &str, log: &mut Log) -> String {
    let open =
        |path: &Path| fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()));
    let (vmlinuz, initrd) = match (open(&kernel.vmlinuz), open(&kernel.initrd)) {
        (Ok(v), Ok(i)) => (v, i),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let Ok(cmdline) = CString::new(cmdline) else {
        return "the command line holds a NUL byte".into();
    };
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
        return format!("kexec_file_load: {}", std::io::Error::last_os_error());
    }
    log.say(format!(
        "restarting into kernel {} (the stack's own)",
        kernel.version
    ));
    rustix::fs::sync();
    match rustix::system::reboot(rustix::system::RebootCommand::Kexec) {
        Ok(()) => "the kexec restart returned".into(),
        Err(e) => format!("restarting with kexec: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linked_kernel_or_the_newest_with_both_files() {
        let root = tempfile::tempdir().unwrap();
        let boot = root.path().join("boot");
        fs::create_dir(&boot).unwrap();
        assert_eq!(stack_kernel(root.path()), None);
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
        assert_eq!(stack_kernel(root.path()).unwrap().version, "6.1.0-10-amd64");
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-9-amd64", root.path().join("vmlinuz"))
            .unwrap();
        let kernel = stack_kernel(root.path()).unwrap();
        assert_eq!(kernel.version, "6.1.0-9-amd64");
        assert_eq!(kernel.initrd, boot.join("initrd.img-6.1.0-9-amd64"));
    }

    #[test]
    fn the_stack_is_carried_before_init_arguments() {
        let stack = ["up".to_owned(), "base".to_owned()];
        assert_eq!(
            carried_cmdline("root=LABEL=r ro strata.stack=x quiet -- single", &stack),
            "root=LABEL=r ro quiet strata.stack=up,base -- single"
        );
        assert_eq!(carried_cmdline("ro", &stack), "ro strata.stack=up,base");
    }
}
