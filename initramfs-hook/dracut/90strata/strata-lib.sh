#!/bin/sh
# strata_boot REAL NEWROOT: initramfs-hook mounts the layered root at NEWROOT when the real root
# (mounted at REAL) holds a store; else, or when no layered root can be mounted, it moves REAL
# there as it is.
strata_boot() {
    if [ "$1" = "$2" ]; then
        initramfs-hook take-root --root "$2"
    else
        initramfs-hook take-root --real "$1" --root "$2"
    fi
}
