#!/bin/sh
# strata_boot REAL NEWROOT: with a store on the real root mounted at REAL, mount the layered root
# at NEWROOT; without a store, or when no layered root can be mounted, move REAL there as it is.
strata_boot() {
    store=$(getarg strata.store=)
    if [ -d "$1${store:-/strata}" ]; then
        # The store, its state and the persistent upper are written: the root must be writable.
        mount -o remount,rw "$1" || warn "strata: the real root stays read-only"
        initramfs-hook boot --sysroot "$1" --newroot "$2" --run /run >/dev/null && return 0
        warn "strata: no layered root could be mounted; booting the real root as it is"
    fi
    mount --move "$1" "$2"
}
