#!/bin/sh
# dracut pre-pivot (systemd in the initramfs): systemd mounted the real root at $NEWROOT; put
# the layered root there instead.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
. /lib/strata-lib.sh
[ -e /run/strata/booted.toml ] && return 0
mkdir -p /run/strata/root
# systemd makes / shared, and a mount under a shared mount cannot be moved (ostree-prepare-root
# does the same); systemd makes the real root's / shared again after switch-root.
mount --make-rprivate /
mount --move "$NEWROOT" /run/strata/root
strata_boot /run/strata/root "$NEWROOT"
