//! Kernels that follow the stack (docs/kernels.md): when the stack this boot mounted has a
//! kernel other than the running one, restart into it with kexec, passing the stack on as
//! `strata.stack=` so the second pass mounts exactly it, asks nothing and counts nothing again.

use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::log::Log;

pub use layers_store::kernel::{StackKernel, running_release};

/// The kernel of the stack mounted at `root` (docs/kernels.md).
pub fn stack_kernel(root: &Path) -> Option<StackKernel> {
    let names = fs::read_dir(root.join("boot"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_else(|_| Vec::new());
    layers_store::kernel::stack_kernel(
        |rel| {
            let path = root.join(rel);
            path.symlink_metadata().is_ok().then_some(path)
        },
        names,
    )
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
    fn the_stack_is_carried_before_init_arguments() {
        let stack = ["up".to_owned(), "base".to_owned()];
        assert_eq!(
            carried_cmdline("root=LABEL=r ro strata.stack=x quiet -- single", &stack),
            "root=LABEL=r ro quiet strata.stack=up,base -- single"
        );
        assert_eq!(carried_cmdline("ro", &stack), "ro strata.stack=up,base");
    }
}
