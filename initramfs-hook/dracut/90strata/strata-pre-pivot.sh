#!/bin/sh
# dracut pre-pivot (systemd in the initramfs): systemd mounted the real root at $NEWROOT;
# initramfs-hook puts the layered root there instead.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
. /lib/strata-lib.sh
strata_boot "$NEWROOT" "$NEWROOT"
