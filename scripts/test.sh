#!/usr/bin/env bash
# The project's checks: formatting, clippy, every unit and property test,
# and every end-to-end suite of capsa-e2e (`cargo xtask e2e`: on this
# host's KVM, or in one nested outer machine where that is PVM), and the
# containment benchmark (scripts/bench-containment.sh). Ends with the time
# each step took, after the suites' own table.
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
step "e2e suites" cargo xtask e2e
# Fails unless every Capsa row of its table is contained.
step "containment bench" scripts/bench-containment.sh
