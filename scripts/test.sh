#!/usr/bin/env bash
# The project's checks: formatting, clippy, and every test (unit and
# property tests, the integration tests that boot real microVMs on
# /dev/kvm, and the device check).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
{ read -r kernel; read -r initrd; } < <(scripts/setup.sh)
export CAPSA_KERNEL="$kernel" CAPSA_INITRD="$initrd"

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

# A PVM host (kvm_pvm, no VMX/SVM) emulates a stock guest kernel instruction
# by instruction and cannot run its user space: boot there is impossible, so
# the boot tests run on a real KVM nested inside QEMU instead (README).
if scripts/kvm-is-pvm.sh; then
    echo "test: /dev/kvm here is PVM, which cannot boot a stock Linux guest;" \
         "KVM boot tests run nested under QEMU instead of on this host" >&2
    export CAPSA_SKIP_BOOT_TESTS=1
    nested=1
fi

# Boot tests are CPU-heavy; two at a time suits a 2-core machine.
cargo test --locked --workspace -- --test-threads=2
if [ "${nested:-0}" = 1 ]; then
    scripts/boot-check-nested.sh "$kernel" "$initrd"
fi
# The virtio devices end to end, from both sides (nested on a PVM host).
scripts/device-check.sh "$kernel" "${CAPSA_DEVICE_CHECK_BULK:-1073741824}"
# The daemon and the CLI end to end (nested on a PVM host), then 50
# create/start/delete cycles checked for leftovers.
scripts/daemon-check.sh "$kernel" "$initrd" main
scripts/daemon-check.sh "$kernel" "$initrd" cycles
# containerd with the Capsa shim, end to end (nested on a PVM host).
scripts/shim-check.sh "$kernel" "$initrd" check
