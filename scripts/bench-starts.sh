#!/usr/bin/env bash
# Start benchmark, in one run (one outer machine on a PVM host):
# - capsa-vmm restoring a snapshot of a VM booted to its agent, next to the
#   same VM booted cold, each to the agent's first answer (`capsa-bench
#   restore`);
# - `capsa run --rm busybox true` through capsad, restored from the
#   template of its shape and booted cold (--cold-boot), next to crun and
#   runc running the same root filesystem, and the host memory (PSS) of
#   IDLE idle groups of each kind (`capsa-bench starts`).
# Prints the tables and writes target/capsa/bench-starts.json.
#
#   scripts/bench-starts.sh [RUNS] [IDLE]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
runs=${1:-10}
idle=${2:-20}
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
need_packages runc crun umoci
bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-daemon capsa-cli capsa-benches)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-vmm" "$bin/capsad" "$bin/capsa" "$bin/capsa-bench" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/busybox-image.sh" "$payload/busybox-oci" > /dev/null
umoci unpack --image "$payload/busybox-oci:latest" "$payload/busybox-bundle" > /dev/null
python3 - "$payload/busybox-bundle/config.json" <<'PY'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["process"]["args"] = ["/bin/true"]
config["process"]["terminal"] = False
json.dump(config, open(path, "w"))
PY
nested=0
"$root/scripts/kvm-is-pvm.sh" && nested=1
dir=$payload runc=$(command -v runc) crun=$(command -v crun)
if [ "$nested" = 1 ]; then
    dir=/payload
    for program in runc crun mkfs.ext4 nft; do
        "$root/scripts/nested-add-program.sh" "$payload" "$program"
    done
    runc=/payload/programs/runc crun=/payload/programs/crun
fi
{
    printf 'cd %q\n' "$dir"
    printf 'runc=%q crun=%q runs=%q idle=%q nested=%q\n' "$runc" "$crun" "$runs" "$idle" "$nested"
    cat <<'RUN'
peer_args=
if [ "$nested" = 1 ]; then
    mkdir -p /lib/x86_64-linux-gnu /lib64 /run /sys/fs/cgroup
    cp lib/* /lib/x86_64-linux-gnu/
    ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
    mount -t cgroup2 none /sys/fs/cgroup
    # The outer machine's root is its initramfs.
    peer_args=--peer-run-arg=--no-pivot
fi
state=$(mktemp -d)
./capsa-bench restore --vmm ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio \
    --runs "$runs" --idle 5 --json "$state/restore.json" 2>&1
export CAPSA_SOCKET=$state/capsad.sock
# Idle guests touch little of their memory: the budget lets all of them in.
./capsad --root "$state/root" --socket "$CAPSA_SOCKET" --kernel vmlinux --initrd initramfs.cpio \
    --vmm ./capsa-vmm --memory-budget-mib 65536 > "$state/capsad.log" 2>&1 &
daemon=$!
for i in $(seq 100); do [ -S "$CAPSA_SOCKET" ] && break; sleep 0.1; done
./capsa image import busybox-oci --name busybox > /dev/null
./capsa-bench starts --runs "$runs" --idle "$idle" --capsa ./capsa --image busybox \
    --bundle busybox-bundle --peer "crun=$crun" --peer "runc=$runc" $peer_args \
    --json "$state/starts.json" 2>&1 || tail -20 "$state/capsad.log"
echo "=== JSON"
printf '{"restore": '; cat "$state/restore.json"; printf ',\n"starts": '; cat "$state/starts.json"; echo '}'
echo "=== END JSON"
kill "$daemon"
RUN
} > "$payload/run.sh"
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/bench-starts.log"
if [ "$nested" = 1 ]; then
    CAPSA_NESTED_TIMEOUT_SECS=2400 "$root/scripts/nested-kvm.sh" "$payload" "$log"
else
    sh "$payload/run.sh" > "$log" 2>&1
fi
sed -n '/^start to the agent/,/^results written/p;/^starting a container/,/^results written/p' "$log"
mkdir -p "$root/target/capsa"
payload_json "$log" "$root/target/capsa/bench-starts.json"
echo "results written to target/capsa/bench-starts.json"
