#!/usr/bin/env bash
# Builds a one-layer busybox OCI image (Debian's busybox-static) with umoci
# into the image layout directory LAYOUT, tagged "latest"; each FILE:PATH
# adds a host file at PATH in the image.
#
#   scripts/busybox-image.sh LAYOUT [FILE:PATH]...
set -euo pipefail
layout=$1; shift
for p in umoci busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >&2
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$work/bundle" > /dev/null
rootfs="$work/bundle/rootfs"
mkdir -p "$rootfs"/{bin,tmp,etc,root}
chmod 1777 "$rootfs/tmp"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
for extra in "$@"; do
    install -D "${extra%%:*}" "$rootfs/${extra#*:}"
done
umoci repack --image "$layout:latest" "$work/bundle" > /dev/null
umoci config --image "$layout:latest" --config.cmd /bin/sh --config.env PATH=/bin \
    --architecture amd64 --os linux
umoci gc --layout "$layout"
