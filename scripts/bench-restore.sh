#!/usr/bin/env bash
# Restore benchmark: capsa-vmm restoring a snapshot of a VM booted to its
# agent's answer, next to the same VM booted cold, each timed to the
# agent's first answer, and the host memory of idle VMs of each kind, in
# one run. Prints a table and writes target/capsa/bench-restore.json.
#
# On a PVM host (README, "Hosts with PVM") both run on a KVM nested in QEMU
# TCG: absolute times there are emulation times; only the ratio means much.
#
#   scripts/bench-restore.sh [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
runs=${1:-10}
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")

bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-benches)
json="$root/target/capsa/bench-restore.json"
mkdir -p "$(dirname "$json")"

if ! "$root/scripts/kvm-is-pvm.sh"; then
    exec "$bin/capsa-bench" restore --vmm "$bin/capsa-vmm" --kernel "$kernel" --initrd "$initrd" \
        --runs "$runs" --json "$json"
fi

echo "bench-restore: /dev/kvm here is PVM; measuring on a KVM nested in QEMU TCG" >&2
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-bench" "$bin/capsa-vmm" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
cat > "$payload/run.sh" <<RUN
./capsa-bench restore --vmm ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio \
    --runs $runs --idle ${CAPSA_BENCH_IDLE:-5} --json /tmp/bench-restore.json 2>&1
echo "=== JSON"
cat /tmp/bench-restore.json
echo
echo "=== END JSON"
RUN
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested/bench-restore.log"
"$root/scripts/nested-kvm.sh" "$payload" "$log"
sed -n '/^start to the agent/,/^results written/p' "$log"
payload_json "$log" "$json"
if ! grep -q '"benchmark": "restore"' "$json"; then
    echo "bench-restore: no results; outer console in $log" >&2
    tail -30 "$log" >&2
    exit 1
fi
echo "bench-restore: results in $json" >&2
