#!/bin/bash
# dracut module: Strata mounts the root from its layer plan (overlayfs) once dracut has mounted
# the real root. Install as /usr/lib/dracut/modules.d/90strata/; the logic is in initramfs-hook.
# STRATA_HOOK_BINARY names a build to include instead of the installed one.

strata_hook() {
    if [[ $STRATA_HOOK_BINARY ]]; then
        echo "$STRATA_HOOK_BINARY"
    else
        find_binary initramfs-hook
    fi
}

check() {
    [[ -x $(strata_hook) ]] || return 1
    return 0
}

depends() {
    echo base rootfs-block
}

installkernel() {
    instmods overlay
}

install() {
    inst_simple "$(strata_hook)" /usr/bin/initramfs-hook
    inst_simple "$moddir/strata-lib.sh" /lib/strata-lib.sh
    # dracut's shell init checks the root's layout right after its mount hooks; systemd does not.
    if dracut_module_included "systemd"; then
        inst_hook pre-pivot 90 "$moddir/strata-pre-pivot.sh"
    else
        inst_hook mount 98 "$moddir/strata-mount.sh"
    fi
}
