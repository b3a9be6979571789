#!/usr/bin/env bash
# The containerd benchmark: times `ctr run --rm IMAGE ID true` with the
# Capsa shim, its root filesystem on a disk (an EROFS image,
# rootfs_disks = 4) and streamed over vsock (rootfs_disks = 0), and with
# io.containerd.runc.v2, in the same containerd (Debian's, its config in a
# temporary directory), for a busybox image built here and the real-size
# Debian image (scripts/debian-image.sh), both imported with `ctr image
# import`; capsa-bench ctr. Prints a table per image and writes
# target/capsa/bench-ctr.json. On a PVM host (README,
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
(cd "$("$root/scripts/debian-image.sh")" && tar cf "$payload/debian.tar" .)

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
c() { ctr --address "$T/containerd.sock" "$@"; }
step() { name=$1; shift; echo "=== BEGIN $name"; "$@" 2>&1; echo "=== END $name exit=$?"; }
step import c image import --base-name docker.io/library/busybox busybox.tar
step import-debian c image import --base-name docker.io/library/debian debian.tar
# Room in the guest for the Debian image streamed into its memory; and
# the same shim with its root filesystems streamed.
sed -i 's/^memory_mib = .*/memory_mib = 1024/' "$T/shim.toml"
cp "$T/shim.toml" "$T/shim-stream.toml"
echo 'rootfs_disks = 0' >> "$T/shim-stream.toml"
echo 'rootfs_disks = 4' >> "$T/shim.toml"

for image in busybox debian; do
    capsa-bench ctr --runs "$runs" --address "$T/containerd.sock" \
        --image "docker.io/library/$image:latest" \
        --runtime "capsa-disk=io.containerd.capsa.v2 --runtime-config-path $T/shim.toml" \
        --runtime "capsa-stream=io.containerd.capsa.v2 --runtime-config-path $T/shim-stream.toml" \
        --runtime "runc=io.containerd.runc.v2 ${runc_args:-}" \
        --containerd-log "$T/containerd.log" --json "$T/bench-$image.json" 2>&1
done
echo "=== JSON"
printf '{"busybox": %s, "debian": %s}\n' "$(cat "$T/bench-busybox.json")" "$(cat "$T/bench-debian.json")"
echo "=== END JSON"
kill "$containerd_pid"

RUN
} > "$payload/run.sh"

run_payload "$payload" "$log" 1800
grep -E '^(`ctr run|\||of which|or .* EROFS)' "$log"
payload_json "$log" "$root/target/capsa/bench-ctr.json"
echo "results written to target/capsa/bench-ctr.json"
