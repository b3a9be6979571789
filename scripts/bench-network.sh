#!/usr/bin/env bash
# Benchmark: TCP throughput into a running group through its published
# port, from another host (a namespace of its own behind a veth, which the
# packet filter's DNAT serves) and from the host itself (capsad's
# userspace proxy, on loopback), and straight to its address on the
# bridge, with host loopback as the reference. The group
# runs `capsa-bench sink` (the busybox image with capsa-bench added).
# capsad runs in a network namespace of the benchmark's own. Prints a
# table and writes target/capsa/bench-network.json; on a PVM host it all
# runs inside the nested QEMU machine.
#
#   scripts/bench-network.sh [MIB_PER_RUN] [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
mib=${1:-32} runs=${2:-5}
{ read -r kernel; read -r initrd; } < <("$root/scripts/setup.sh")
bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-daemon capsa-cli capsa-benches)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-vmm" "$bin/capsad" "$bin/capsa" "$bin/capsa-bench" "$payload/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
# (Not `umoci insert`: Debian's umoci 0.4 writes that layer's tar without
# its final padding and end blocks, which GNU tar and the agent refuse.)
"$root/scripts/busybox-image.sh" "$payload/bench-oci" "$bin/capsa-bench:bin/capsa-bench" > /dev/null
nested=0 dir=$payload tools=""
if "$root/scripts/kvm-is-pvm.sh"; then
    nested=1 dir=/payload tools=/payload/bin/
    "$root/scripts/nested-add-program.sh" "$payload" ip
    # capsad makes each group's scratch disk with it.
    "$root/scripts/nested-add-program.sh" "$payload" mkfs.ext4
    # capsad builds its packet filter with it.
    "$root/scripts/nested-add-program.sh" "$payload" nft
fi
{
    printf 'cd %q\n' "$dir"
    printf 'ip=%qip mib=%q runs=%q\n' "$tools" "$mib" "$runs"
    cat <<'RUN'
mkdir -p /run /var/run
$ip netns add capsa-bench
$ip netns exec capsa-bench $ip link set lo up
# The other host: a namespace behind a veth, as a client on the LAN.
$ip netns add capsa-bench-peer
$ip -n capsa-bench link add uplink0 type veth peer name peer0 netns capsa-bench-peer
$ip -n capsa-bench addr add 192.0.2.1/24 dev uplink0
$ip -n capsa-bench link set uplink0 up
$ip -n capsa-bench-peer addr add 192.0.2.2/24 dev peer0
$ip -n capsa-bench-peer link set peer0 up
$ip -n capsa-bench-peer link set lo up
state=$(mktemp -d)
export CAPSA_SOCKET=$state/capsad.sock
$ip netns exec capsa-bench ./capsad --root "$state/root" --socket "$CAPSA_SOCKET" \
    --kernel vmlinux --initrd initramfs.cpio --vmm ./capsa-vmm > "$state/capsad.log" 2>&1 &
daemon=$!
for i in $(seq 100); do [ -S "$CAPSA_SOCKET" ] && break; sleep 0.1; done
./capsa image import bench-oci --name bench > /dev/null
./capsa run -d --name sink --memory 256 -p 0.0.0.0:15001:5001 bench \
    /bin/capsa-bench sink --listen 0.0.0.0:5001
address=$(./capsa inspect sink | sed -n 's/.*"ip": "\([0-9.]*\)".*/\1/p')
for i in $(seq 100); do ./capsa logs sink 2>/dev/null | grep -q listening && break; sleep 0.2; done
$ip netns exec capsa-bench ./capsa-bench network --mib "$mib" --runs "$runs" \
    --target "published port, DNAT=192.0.2.1:15001@capsa-bench-peer" \
    --target "published port, proxy=127.0.0.1:15001" --target "group address=$address:5001" \
    --json "$state/bench.json" 2>&1
echo "=== JSON"
cat "$state/bench.json"
echo
echo "=== END JSON"
./capsa stop sink > /dev/null; ./capsa rm sink > /dev/null
kill "$daemon"
$ip netns delete capsa-bench
$ip netns delete capsa-bench-peer
RUN
} > "$payload/run.sh"
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/bench-network.log"
if [ "$nested" = 1 ]; then
    CAPSA_NESTED_TIMEOUT_SECS=1800 "$root/scripts/nested-kvm.sh" "$payload" "$log"
else
    sh "$payload/run.sh" > "$log" 2>&1
fi
sed -n '/^TCP throughput/,/^results written/p' "$log"
mkdir -p "$root/target/capsa"
payload_json "$log" "$root/target/capsa/bench-network.json"
echo "results written to target/capsa/bench-network.json"
