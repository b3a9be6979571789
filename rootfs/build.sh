#!/usr/bin/env bash
# Builds the guest initramfs: a newc cpio whose /init is the statically
# linked capsa-agent. Prints the path of the cpio on stdout. Tests add
# their own static programs with --add SOURCE=PATH_IN_GUEST.
#
#   rootfs/build.sh [--add SRC=DEST]... [OUTPUT]
#   default OUTPUT: target/capsa/initramfs.cpio
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
extra=()
while [ "${1:-}" = --add ]; do
    extra+=("$2")
    shift 2
done
out="${1:-$root/target/capsa/initramfs.cpio}"
agent="$("$root/scripts/build-static.sh" capsa-agent)/capsa-agent"
extra=("$agent=init" "${extra[@]}")

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
# The kernel opens /dev/console for init before anything mounts devtmpfs,
# and the agent logs fatal errors to /dev/kmsg.
if ! { mknod -m 0600 "$stage/dev/console" c 5 1 && mknod -m 0600 "$stage/dev/kmsg" c 1 11; }; then
    echo "rootfs: creating /dev/console needs root (mknod)" >&2
    exit 1
fi
for spec in "${extra[@]}"; do
    src=${spec%%=*} dest=${spec#*=}
    if readelf -l "$src" | grep -q INTERP; then
        echo "rootfs: $src is dynamically linked; the guest has no libc" >&2
        exit 1
    fi
    install -D -m 0755 "$src" "$stage/$dest"
done
mkdir -p "$(dirname "$out")"
# Sorted names and fixed owners and times keep the archive reproducible.
(cd "$stage" && find . -mindepth 1 -exec touch -h -d @0 {} + &&
    find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) > "$out.tmp"
mv "$out.tmp" "$out"
echo "rootfs: $(stat -c %s "$out") bytes" >&2
echo "$out"
