#!/bin/bash
# dracut module: Strata mounts the root from its layer plan (overlayfs) once dracut has mounted
# the real root. Install as /usr/lib/dracut/modules.d/90strata/; the logic is in initramfs-hook.
# STRATA_HOOK_BINARY names a build to include instead of the installed one.

# The hook: STRATA_HOOK_BINARY, else the first found on dracut's PATH or where the README's
# manual install puts it.
strata_hook() {
    local found
    if [[ $STRATA_HOOK_BINARY ]]; then
        echo "$STRATA_HOOK_BINARY"
        return
    fi
    found=$(find_binary initramfs-hook) && [[ -x $found ]] && {
        echo "$found"
        return
    }
    for found in /usr/local/sbin/initramfs-hook /usr/local/bin/initramfs-hook; do
        [[ -x $found ]] && {
            echo "$found"
            return
        }
    done
}

check() {
    local hook
    hook=$(strata_hook)
    if [[ ! -x $hook ]]; then
        derror "strata: initramfs-hook not found (${STRATA_HOOK_BINARY:-looked on PATH, in /usr/local/sbin and /usr/local/bin}): this initramfs will not mount Strata's layered root"
        return 1
    fi
    return 0
}

depends() {
    echo base rootfs-block
}

installkernel() {
    instmods overlay
}

install() {
    # inst_binary: a build linked dynamically brings its libraries.
    inst_binary "$(strata_hook)" /usr/bin/initramfs-hook
    if dracut_module_included "systemd"; then
        # systemd's initrd: a unit of its own, which owns the console for the boot menu, and
        # one after it without the console, for a boot whose console cannot be opened.
        local unit
        for unit in strata-root.service strata-root-fallback.service; do
            inst_simple "$moddir/$unit" "$systemdsystemunitdir/$unit"
            $SYSTEMCTL -q --root "$initdir" enable "$unit"
        done
    else
        # dracut's shell init checks the root's layout right after its mount hooks, so the
        # layered root is mounted by a mount hook, before that check.
        inst_hook mount 98 "$moddir/strata-mount.sh"
    fi
}
