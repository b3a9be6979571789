#!/usr/bin/env bash
# Boot-time benchmark: capsa-vmm and QEMU `-M microvm` booting the same
# kernel and initramfs to the agent's ready line and power-off, in one run.
# Prints a table and writes target/capsa/bench-boot.json.
#
# On a PVM host (README, "Hosts with PVM") both run on a KVM nested in QEMU
# TCG: absolute times there are emulation times; only the ratio means much.
#
# CAPSA_BOOT_VARIANTS (NAME=PARAMS;NAME=PARAMS...) adds capsa-vmm runners
# with those kernel parameters; CAPSA_BOOT_PROFILE=1 boots once more with
# initcall_debug and prints the kernel's slowest initcalls.
#
#   scripts/bench-boot.sh [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
runs=${1:-10}
extra=()
IFS=';' read -r -a variants <<< "${CAPSA_BOOT_VARIANTS:-}"
for variant in "${variants[@]}"; do
    if [ -n "$variant" ]; then extra+=(--variant "$variant"); fi
done
if [ "${CAPSA_BOOT_PROFILE:-0}" = 1 ]; then extra+=(--profile); fi
extra_text=
if [ "${#extra[@]}" -gt 0 ]; then extra_text=$(printf '%q ' "${extra[@]}"); fi
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "install ok installed" ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >&2

bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-benches)
json="$root/target/capsa/bench-boot.json"
mkdir -p "$(dirname "$json")"

if ! "$root/scripts/kvm-is-pvm.sh"; then
    exec "$bin/capsa-bench" boot --vmm "$bin/capsa-vmm" --kernel "$kernel" --initrd "$initrd" \
        --qemu "$(command -v qemu-system-x86_64)" --runs "$runs" --json "$json" "${extra[@]}"
fi

echo "bench-boot: /dev/kvm here is PVM; measuring on a KVM nested in QEMU TCG" >&2
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
mkdir -p "$payload/qemu-share"
cp "$bin/capsa-bench" "$bin/capsa-vmm" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/nested-add-program.sh" "$payload" qemu-system-x86_64
cp /usr/share/qemu/bios-microvm.bin "$payload/qemu-share/"
cat > "$payload/run.sh" <<RUN
./capsa-bench boot --vmm ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio \
    --qemu ./bin/qemu-system-x86_64 --qemu-data-dir ./qemu-share --runs $runs --json /tmp/bench-boot.json \
    $extra_text 2>&1
echo "=== JSON"
cat /tmp/bench-boot.json
echo
echo "=== END JSON"
RUN
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested/bench-boot.log"
"$root/scripts/nested-kvm.sh" "$payload" "$log"
sed -n '/^boot to ready line/,/^results written/p' "$log"
payload_json "$log" "$json"
if ! grep -q '"benchmark": "boot"' "$json"; then
    echo "bench-boot: no results; outer console in $log" >&2
    tail -30 "$log" >&2
    exit 1
fi
echo "bench-boot: results in $json" >&2
