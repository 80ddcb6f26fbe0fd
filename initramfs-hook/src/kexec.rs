//! Kernels that follow the stack (docs/kernels.md): when the stack this boot mounted has a
//! kernel other than the running one, restart into it with kexec, passing the stack on as
//! `strata.stack=` so the second pass mounts exactly it, asks nothing and counts nothing again.

use crate::log::Log;

pub use layers_store::kernel::{StackKernel, layers_kernel, running_release};

/// Loads `kernel` for kexec with `cmdline`, then restarts into it. Returns only when that
/// fails, with why.
pub fn restart_into(kernel: &StackKernel, cmdline: &str, log: &mut Log) -> String {
    if let Err(e) = layers_store::kernel::load_for_kexec(kernel, cmdline) {
        return e;
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
