#!/usr/bin/env bash
# Benchmark of isolation: `capsa-bench containment` runs one battery of
# escape probes (capsa-bench probe, as root with SYS_ADMIN, SYS_MODULE,
# SYS_RAWIO, MKNOD, NET_ADMIN and NET_RAW) inside a Capsa group and, as
# peers, inside runc and crun containers of the same root filesystem (an
# OCI bundle from umoci), and prints a table probe x runtime (contained /
# escaped / not applicable). Writes target/capsa/bench-containment.json and
# fails unless every Capsa row is contained. On a PVM host everything runs
# inside the nested QEMU machine, peers included: their escapes change that
# machine, never this host.
#
#   scripts/bench-containment.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
need_packages runc crun umoci
bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-daemon capsa-cli capsa-benches)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
mkdir -p "$payload/bin"
cp "$bin/capsa-vmm" "$bin/capsad" "$bin/capsa" "$bin/capsa-bench" "$payload/bin/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/busybox-image.sh" "$payload/probe-oci" "$bin/capsa-bench:bin/capsa-bench" > /dev/null
umoci unpack --image "$payload/probe-oci:latest" "$payload/probe-bundle" > /dev/null
nested=0
if "$root/scripts/kvm-is-pvm.sh"; then
    nested=1
    native_programs "$payload" runc crun
    # capsad makes each group's scratch disk with mkfs.ext4 and its packet
    # filter with nft.
    "$root/scripts/nested-add-program.sh" "$payload" mkfs.ext4
    "$root/scripts/nested-add-program.sh" "$payload" nft
fi
{
    printf 'nested=%q\n' "$nested"
    printf 'install_native() {\n%s\n}\n' "$install_native"
    cat <<'RUN'
peer_args=
if [ "$nested" = 1 ]; then
    install_native
    mkdir -p /run /sys/fs/cgroup
    mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
    # runc and crun cannot pivot_root out of the outer machine's initramfs.
    peer_args=--peer-run-arg=--no-pivot
fi
export PATH=$PWD/bin:$PATH
state=$(mktemp -d)
export CAPSA_SOCKET=$state/capsad.sock
capsad --root "$state/root" --socket "$CAPSA_SOCKET" --kernel vmlinux --initrd initramfs.cpio \
    --vmm "$PWD/bin/capsa-vmm" > "$state/capsad.log" 2>&1 &
daemon=$!
for i in $(seq 100); do [ -S "$CAPSA_SOCKET" ] && break; sleep 0.1; done
capsa image import probe-oci --name probe > /dev/null
status=0
capsa-bench containment --capsa "$PWD/bin/capsa" --image probe --bundle probe-bundle \
    --peer "runc=$(command -v runc)" --peer "crun=$(command -v crun)" $peer_args \
    --json "$state/bench.json" 2>&1 || status=$?
echo "=== JSON"
cat "$state/bench.json" 2>/dev/null
echo
echo "=== END JSON"
echo "=== STATUS $status"
[ "$status" = 0 ] || tail -20 "$state/capsad.log"
kill "$daemon"
RUN
} > "$payload/run.sh"
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/bench-containment.log"
run_payload "$payload" "$log" 900 || true
sed -n '/^Containment:/,/^results written/p' "$log"
mkdir -p "$root/target/capsa"
payload_json "$log" "$root/target/capsa/bench-containment.json"
if ! grep -q '^=== STATUS 0$' "$log"; then
    echo "bench-containment: failed (log: $log)" >&2
    grep -E '^(Error|Caused by|    [0-9]+:)|^=== STATUS' "$log" | tail -12 >&2 || true
    exit 1
fi
echo "results written to target/capsa/bench-containment.json"
