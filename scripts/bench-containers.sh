#!/usr/bin/env bash
# Benchmark: `capsa run --rm IMAGE true` through a real capsad, for busybox
# and for a real-size Debian image with python3 (scripts/debian-image.sh):
# the import (with the layers' conversion to disk images), the first run
# and cached runs, next to runc and crun running the same root filesystems
# (OCI bundles from umoci), N runs each, and busybox's through a second
# capsad whose VMMs run without jail and seccomp filter; and a running
# container's memory, in the guest and on the host. Prints a table and writes
# target/capsa/bench-containers.json. On a PVM host everything runs inside
# the nested QEMU machine, peers included, so the figures compare.
#
#   scripts/bench-containers.sh [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
runs=${1:-10}
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
need_packages runc crun umoci
bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-daemon capsa-cli capsa-benches)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-vmm" "$bin/capsad" "$bin/capsa" "$bin/capsa-bench" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/busybox-image.sh" "$payload/busybox-oci" > /dev/null
cp -r "$("$root/scripts/debian-image.sh")" "$payload/debian-oci"
for image in busybox debian; do
    umoci unpack --image "$payload/$image-oci:latest" "$payload/$image-bundle" > /dev/null
    # The bundle runs `true`, without a terminal.
    python3 - "$payload/$image-bundle/config.json" <<'PY'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["process"]["args"] = ["/bin/true"]
config["process"]["terminal"] = False
json.dump(config, open(path, "w"))
PY
done
nested=0
"$root/scripts/kvm-is-pvm.sh" && nested=1
dir=$payload runc=$(command -v runc) crun=$(command -v crun)
if [ "$nested" = 1 ]; then
    dir=/payload
    "$root/scripts/nested-add-program.sh" "$payload" runc
    "$root/scripts/nested-add-program.sh" "$payload" crun
    # capsad makes each group's scratch disk with it.
    "$root/scripts/nested-add-program.sh" "$payload" mkfs.ext4
    # capsad builds its packet filter with it.
    "$root/scripts/nested-add-program.sh" "$payload" nft
    runc=/payload/programs/runc crun=/payload/programs/crun
fi
{
    printf 'cd %q\n' "$dir"
    printf 'runc=%q crun=%q runs=%q nested=%q\n' "$runc" "$crun" "$runs" "$nested"
    cat <<'RUN'
if [ "$nested" = 1 ]; then
    # runc re-executes itself (/proc/self/exe), so the libraries go where
    # the loader looks rather than behind a wrapper.
    mkdir -p /lib/x86_64-linux-gnu /lib64 /run /sys/fs/cgroup
    cp lib/* /lib/x86_64-linux-gnu/
    ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
    mount -t cgroup2 none /sys/fs/cgroup
    # The outer machine's root is its initramfs.
    peer_args=--peer-run-arg=--no-pivot
fi
state=$(mktemp -d)
export CAPSA_SOCKET=$state/capsad.sock
./capsad --root "$state/root" --socket "$CAPSA_SOCKET" --kernel vmlinux --initrd initramfs.cpio \
    --vmm ./capsa-vmm > "$state/capsad.log" 2>&1 &
daemon=$!
# The same, with its VMMs neither jailed nor filtered: what confinement costs.
./capsad --root "$state/bare-root" --socket "$state/bare.sock" --kernel vmlinux \
    --initrd initramfs.cpio --vmm ./capsa-vmm --bridge capsa1 --subnet 10.89.0.0/24 \
    --jail off --seccomp off > "$state/bare.log" 2>&1 &
bare=$!
for i in $(seq 100); do [ -S "$CAPSA_SOCKET" ] && [ -S "$state/bare.sock" ] && break; sleep 0.1; done
./capsa-bench containers --runs "$runs" --capsa ./capsa \
    --image busybox,busybox-oci,busybox-bundle --image debian,debian-oci,debian-bundle \
    --peer "runc=$runc" --peer "crun=$crun" $peer_args --unconfined-socket "$state/bare.sock" \
    --json "$state/bench.json" 2>&1
echo "=== JSON"
cat "$state/bench.json"
echo
echo "=== END JSON"
kill "$daemon" "$bare"
RUN
} > "$payload/run.sh"
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/bench-containers.log"
if [ "$nested" = 1 ]; then
    CAPSA_NESTED_TIMEOUT_SECS=1800 "$root/scripts/nested-kvm.sh" "$payload" "$log"
else
    sh "$payload/run.sh" > "$log" 2>&1
fi
sed -n '/^starting a container/,/^cached start/p' "$log"
mkdir -p "$root/target/capsa"
payload_json "$log" "$root/target/capsa/bench-containers.json"
echo "results written to target/capsa/bench-containers.json"
