#!/usr/bin/env bash
# The quick start, on a fresh Debian machine: installs and builds what is
# needed, starts the daemon (capsad) in a temporary root, imports the
# bundled test image (busybox, built with umoci) and runs it with the CLI:
#
#   capsad --root ROOT --socket SOCKET --kernel VMLINUX --initrd INITRAMFS &
#   capsa image import busybox-oci --name busybox
#   capsa run --rm busybox echo "hello from a Capsa microVM"
#   capsa ps
#
# Extra arguments replace the command run in the container. On a PVM host,
# which cannot boot a stock guest (README, "Hosts with PVM"), all of it
# runs on a KVM nested in QEMU instead, and its output is shown afterwards.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
command=(echo "hello from a Capsa microVM")
[ "$#" -gt 0 ] && command=("$@")

bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-daemon capsa-cli)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-vmm" "$bin/capsad" "$bin/capsa" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/busybox-image.sh" "$payload/busybox-oci" > /dev/null
nested=0
"$root/scripts/kvm-is-pvm.sh" && nested=1
dir=$payload
if [ "$nested" = 1 ]; then
    dir=/payload
    # The outer machine has busybox only: capsad makes each group's scratch
    # disk with mkfs.ext4.
    "$root/scripts/nested-add-program.sh" "$payload" mkfs.ext4
    # capsad builds its packet filter with it.
    "$root/scripts/nested-add-program.sh" "$payload" nft
fi
{
    printf 'cd %q\n' "$dir"
    printf 'export PATH=%q:%q/bin:$PATH\n' "$dir" "$dir"
    cat <<'QUICKSTART'
state=$(mktemp -d)
export CAPSA_SOCKET=$state/capsad.sock
show() { echo "\$ $*"; "$@"; }
capsad --root "$state/root" --socket "$CAPSA_SOCKET" --kernel vmlinux --initrd initramfs.cpio \
    > "$state/capsad.log" 2>&1 &
daemon=$!
echo "\$ capsad --root $state/root --socket \$CAPSA_SOCKET --kernel vmlinux --initrd initramfs.cpio &"
for i in $(seq 100); do [ -S "$CAPSA_SOCKET" ] && break; sleep 0.1; done
show capsa image import busybox-oci --name busybox
QUICKSTART
    printf 'show capsa run --rm busybox'
    printf ' %q' "${command[@]}"
    printf '\nstatus=$?\n'
    cat <<'QUICKSTART'
show capsa ps
kill "$daemon"
echo "=== demo: capsa run exited with $status"
QUICKSTART
} > "$payload/run.sh"

log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/demo.log"
if [ "$nested" = 0 ]; then
    sh "$payload/run.sh" | tee "$log"
    status=$(sed -n 's/^=== demo: capsa run exited with \([0-9]*\)$/\1/p' "$log")
    exit "${status:-1}"
fi
echo "demo: /dev/kvm here is PVM; running on a KVM nested in QEMU TCG (a minute or two)" >&2
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested/demo.log"
"$root/scripts/nested-kvm.sh" "$payload" "$log"
sed -n '/^\$ capsa/,/=== demo/p' "$log" | grep -v 'kvm \['

status=$(sed -n 's/^=== demo: capsa run exited with \([0-9]*\)$/\1/p' "$log")
exit "${status:-1}"
