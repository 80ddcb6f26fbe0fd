#!/bin/sh
# dracut mount hook (dracut's shell init; with systemd, strata-root.service does this): mount the
# real root with rootfs-block's own mount_root (fsck, rootflags, ro/rw) at /run/strata/root, then
# mount the layered root at $NEWROOT. dracut refuses a root without /proc, /sys and /dev, which a
# store-only partition lacks, so this must happen before its check, not at pre-pivot.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
[ -n "$root" ] && [ -z "${root%%block:*}" ] || return 0
ismounted /run/strata/root && return 0
strata_newroot=$NEWROOT
mkdir -p /run/strata/root
NEWROOT=/run/strata/root
. "$hookdir"/mount/99-mount-root.sh
NEWROOT=$strata_newroot
ismounted /run/strata/root || return 0
initramfs-hook take-root --real /run/strata/root --root "$NEWROOT"
