#!/usr/bin/env bash
# The containerd benchmark: times `ctr run --rm IMAGE ID true` with the
# Capsa shim and with io.containerd.runc.v2 in the same containerd
# (Debian's, its config in a temporary directory, a busybox image built
# here and imported with `ctr image import`; capsa-bench ctr), prints a
# table and writes target/capsa/bench-ctr.json. On a PVM host (README,
# "Hosts with PVM") it all runs on a KVM nested in QEMU, containerd and
# runc included. The shim's checks are capsa-e2e's shim suite.
#
#   scripts/bench-ctr.sh KERNEL INITRD [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
kernel=$1 initrd=$2 runs=${3:-10}
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/bench-ctr.log"
need_packages containerd runc bsdutils

bin=$("$root/scripts/build-static.sh" capsa-vmm containerd-shim-capsa-v2 capsa-benches)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
mkdir -p "$payload/bin"
cp "$bin/capsa-vmm" "$bin/containerd-shim-capsa-v2" "$bin/capsa-bench" "$payload/bin/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/busybox-image.sh" "$payload/layout" > /dev/null
(cd "$payload/layout" && tar cf ../busybox.tar .)
rm -rf "$payload/layout"

nested=0
if "$root/scripts/kvm-is-pvm.sh"; then
    nested=1
    native_programs "$payload" containerd ctr containerd-shim-runc-v2 runc script
    # containerd's overlayfs snapshotter.
    export CAPSA_NESTED_MODULES="${CAPSA_NESTED_MODULES:-} fs/overlayfs/overlay"
fi
{
    printf 'nested=%q runs=%q\n' "$nested" "$runs"
    printf 'install_native() {\n%s\n}\n' "$install_native"
    printf '%s\n' "$start_containerd"
    cat <<'RUN'
if [ "$nested" = 1 ]; then
    install_native
    mkdir -p /run /var/run /sys/fs/cgroup
    mount -t cgroup2 none /sys/fs/cgroup
    # Terminals, for ctr -t under script(1).
    mkdir -p /dev/pts
    mount -t devpts -o ptmxmode=0666 devpts /dev/pts
    # runc cannot pivot_root out of the outer machine's initramfs root.
    runc_args=--no-pivot
fi
export PATH=$PWD/bin:$PATH
T=$(mktemp -d)
start_containerd "$T" 'disabled_plugins = ["io.containerd.grpc.v1.cri"]' ''
image=docker.io/library/busybox:latest
c() { ctr --address "$T/containerd.sock" "$@"; }
capsa() { c run --runtime io.containerd.capsa.v2 --runtime-config-path "$T/shim.toml" "$@"; }
step() { name=$1; shift; echo "=== BEGIN $name"; "$@" 2>&1; echo "=== END $name exit=$?"; }
step import c image import --base-name docker.io/library/busybox busybox.tar

capsa-bench ctr --runs "$runs" --address "$T/containerd.sock" --image "$image" \
    --runtime "capsa=io.containerd.capsa.v2 --runtime-config-path $T/shim.toml" \
    --runtime "runc=io.containerd.runc.v2 ${runc_args:-}" \
    --containerd-log "$T/containerd.log" --json "$T/bench.json" 2>&1
echo "=== JSON"
cat "$T/bench.json"
echo
echo "=== END JSON"
kill "$containerd_pid"

RUN
} > "$payload/run.sh"

run_payload "$payload" "$log" 1800
sed -n '/^`ctr run --rm/,/^of which/p' "$log"
payload_json "$log" "$root/target/capsa/bench-ctr.json"
echo "results written to target/capsa/bench-ctr.json"
