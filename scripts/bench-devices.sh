#!/usr/bin/env bash
# Device benchmark: vsock throughput both ways and virtio-blk sequential
# and 4 KiB random-read speed in a capsa microVM, next to the same probe on
# the host (a Unix socketpair, the disk's backing file). Prints a table and
# writes target/capsa/bench-devices.json.
#
# On a PVM host (README, "Hosts with PVM") it runs on a KVM nested in QEMU
# TCG, where the disk's backing file is on tmpfs: absolute figures there
# are emulation figures; compare guest and host within one run.
#
#   scripts/bench-devices.sh [RUNS] [VSOCK_MIB] [DISK_MIB] [RANDOM_READS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
runs=${1:-3} vsock_mib=${2:-256} disk_mib=${3:-256} reads=${4:-20000}
{ read -r kernel; read -r _; } < <("$root/scripts/setup.sh")
bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-io-probe capsa-benches)
json="$root/target/capsa/bench-devices.json"
initrd="$root/target/capsa/initramfs-probe.cpio"
"$root/rootfs/build.sh" --add "$bin/capsa-io-probe=bin/capsa-io-probe" "$initrd" > /dev/null
bench_args=(--runs "$runs" --vsock-bytes $((vsock_mib << 20)) --disk-mib "$disk_mib"
            --random-reads "$reads" --timeout-secs 600)

if ! "$root/scripts/kvm-is-pvm.sh"; then
    exec "$bin/capsa-bench" devices --vmm "$bin/capsa-vmm" --kernel "$kernel" --initrd "$initrd" \
        --probe "$bin/capsa-io-probe" "${bench_args[@]}" --json "$json"
fi

echo "bench-devices: /dev/kvm here is PVM; measuring on a KVM nested in QEMU TCG" >&2
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-bench" "$bin/capsa-vmm" "$bin/capsa-io-probe" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
cat > "$payload/run.sh" <<RUN
./capsa-bench devices --vmm ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio \
    --probe ./capsa-io-probe ${bench_args[*]} --work-dir /tmp --json /tmp/bench.json 2>&1
echo "=== JSON"
cat /tmp/bench.json
echo
echo "=== END JSON"
RUN
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested/bench-devices.log"
CAPSA_NESTED_TIMEOUT_SECS=3600 "$root/scripts/nested-kvm.sh" "$payload" "$log"
sed -n '/^virtio devices/,/^results written/p' "$log"
payload_json "$log" "$json"
if ! grep -q '"benchmark": "devices"' "$json"; then
    echo "bench-devices: no results; outer console in $log" >&2
    tail -30 "$log" >&2
    exit 1
fi
