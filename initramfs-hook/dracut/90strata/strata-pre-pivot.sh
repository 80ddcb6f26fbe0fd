#!/bin/sh
# dracut pre-pivot: the real root is at $NEWROOT; put the layered root there instead.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
store=$(getarg strata.store=)
[ -d "$NEWROOT${store:-/strata}" ] || return 0
mkdir -p /run/strata/root
mount --move "$NEWROOT" /run/strata/root
# The store, its state and the persistent upper are written: the real root must be writable.
mount -o remount,rw /run/strata/root || warn "strata: the real root stays read-only"
if ! initramfs-hook boot --sysroot /run/strata/root --newroot "$NEWROOT" --run /run >/dev/null; then
    warn "strata: no layered root could be mounted; booting the real root as it is"
    mount --move /run/strata/root "$NEWROOT"
fi
