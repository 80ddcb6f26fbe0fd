#!/bin/bash
# dracut module: Strata mounts the root from its layer plan (overlayfs) once dracut has mounted
# the real root. Install as /usr/lib/dracut/modules.d/90strata/; the logic is in initramfs-hook.

check() {
    require_binaries initramfs-hook || return 1
    return 0
}

depends() {
    echo base
}

installkernel() {
    instmods overlay
}

install() {
    inst_binary "$(command -v initramfs-hook)" /usr/bin/initramfs-hook
    inst_hook pre-pivot 90 "$moddir/strata-pre-pivot.sh"
}
