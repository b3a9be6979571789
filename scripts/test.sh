#!/usr/bin/env bash
# The project's checks: formatting, clippy, every unit and property test,
# the end-to-end suites of capsa-e2e (boot, agent, devices: `cargo xtask
# e2e`, on this host's KVM or nested in one outer machine where that is
# PVM), and the daemon and shim checks not yet moved into them. Ends with
# the time each step took.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

steps=()
report() {
    local status=$?
    echo
    echo "| step | seconds | status |"
    echo "|---|---|---|"
    local step
    for step in "${steps[@]}"; do echo "$step"; done
    echo "test: $((SECONDS - began)) s in all"
    exit "$status"
}
began=$SECONDS
trap report EXIT
# Runs a step and keeps its time; a failing step ends the run.
step() {
    local name=$1 start=$SECONDS status=0; shift
    "$@" || status=$?
    steps+=("| $name | $((SECONDS - start)) | $status |")
    return "$status"
}

{ read -r kernel; read -r initrd; } < <(scripts/setup.sh)
export CAPSA_KERNEL="$kernel" CAPSA_INITRD="$initrd"

step fmt cargo fmt --all -- --check
step clippy cargo clippy --locked --workspace --all-targets -- -D warnings
# Two test threads suit a 2-core machine.
step "cargo test" cargo test --locked --workspace -- --test-threads=2
# The suites print their own table (and target/e2e/report.json).
step "e2e: boot, agent, devices" cargo xtask e2e
# The daemon and the CLI end to end (nested on a PVM host), then 50
# create/start/delete cycles checked for leftovers.
step "daemon-check main" scripts/daemon-check.sh "$kernel" "$initrd" main
step "daemon-check cycles" scripts/daemon-check.sh "$kernel" "$initrd" cycles
# containerd with the Capsa shim, end to end (nested on a PVM host).
step "shim-check" scripts/shim-check.sh "$kernel" "$initrd" check
