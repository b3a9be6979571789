#!/usr/bin/env bash
# Sets everything up on a fresh Debian machine and boots one Capsa microVM
# with the defaults (2 vCPUs, 256 MiB): the agent prints its ready line and
# powers the VM off. Extra arguments go to capsa-vmm. On a PVM host, which
# cannot boot a stock guest (README, "Hosts with PVM"), the microVM runs on
# a KVM nested in QEMU instead, and its console is shown afterwards.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
args=(--cpus 2 --memory-mib 256 --cmdline "quiet capsa.exit_after_ready=1" "$@")

if ! "$root/scripts/kvm-is-pvm.sh"; then
    cargo build --quiet --release --locked -p capsa-vmm --manifest-path "$root/Cargo.toml"
    exec "$root/target/release/capsa-vmm" --kernel "$kernel" --initrd "$initrd" "${args[@]}"
fi

echo "demo: /dev/kvm here is PVM; booting on a KVM nested in QEMU TCG (about a minute)" >&2
bin=$("$root/scripts/build-static.sh" capsa-vmm)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-vmm" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
{
    printf './capsa-vmm --kernel vmlinux --initrd initramfs.cpio'
    printf ' %q' "${args[@]}"
    printf ' 2>&1\necho "=== demo: capsa-vmm exited with $?"\n'
} > "$payload/run.sh"
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested/demo.log"
"$root/scripts/nested-kvm.sh" "$payload" "$log"
sed -n '/^CAPSA_READY\|capsa-vmm\|=== demo/p' "$log"
status=$(sed -n 's/^=== demo: capsa-vmm exited with \([0-9]*\)$/\1/p' "$log")
exit "${status:-1}"
