#!/usr/bin/env bash
# Sets everything up on a fresh Debian machine and boots one Capsa microVM
# with the defaults (2 vCPUs, 256 MiB): the agent prints its ready line and
# powers the VM off. Extra arguments go to capsa-vmm.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
cargo build --quiet --release --locked -p capsa-vmm --manifest-path "$root/Cargo.toml"
exec "$root/target/release/capsa-vmm" --kernel "$kernel" --initrd "$initrd" \
    --cpus 2 --memory-mib 256 --cmdline "quiet capsa.exit_after_ready=1" "$@"
