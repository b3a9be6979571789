#!/usr/bin/env bash
# The virtio device integration check: boots a microVM whose init is
# capsa-io-probe and checks, from both sides, that
#   - virtio-blk: pattern data the host wrote reads back in the guest, and
#     data the guest wrote reads back on the host, byte for byte;
#   - virtio-vsock: 32 concurrent echo streams guest-initiated and 32
#     host-initiated, and BULK bytes each way through one stream, checked;
#   - virtio-net: the guest pings and TCP-connects to an address on a tap
#     inside a network namespace this test creates;
#   - virtio-rng: getrandom does not block at boot and hw_random is virtio.
# On a PVM host (README, "Hosts with PVM") it runs on a KVM nested in QEMU;
# elsewhere on this host's KVM. Needs root (network namespaces, taps).
#
#   scripts/device-check.sh KERNEL [BULK_BYTES]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kernel=$1 bulk=${2:-1073741824}
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/device-check.log"

dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >&2
bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-io-probe)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
"$root/rootfs/build.sh" --add "$bin/capsa-io-probe=bin/capsa-io-probe" \
    --add /bin/busybox=bin/busybox "$payload/initramfs.cpio" > /dev/null
cp "$bin/capsa-vmm" "$bin/capsa-io-probe" "$payload/"
cp "$kernel" "$payload/vmlinux"
nested=0
if "$root/scripts/kvm-is-pvm.sh"; then
    nested=1
    "$root/scripts/nested-add-program.sh" "$payload" ip
fi

blk=4194304
steps="rng blk-read=vdb:$blk:11 blk-write=vda:$blk:12 vsock-serve=6000:32"
steps="$steps vsock-connect=5000:32:1048576 vsock-bulk=5000:$bulk"
steps="$steps net=10.0.2.15/24:10.0.2.1:7000 vsock-wait"
# Runs in the payload directory with \$work for its files and \$ip as iproute2.
payload_dir=$payload
[ "$nested" = 1 ] && payload_dir=/payload
cat > "$payload/check.sh" <<RUN
mkdir -p /run /var/run \$work
cd "$payload_dir"
dd if=/dev/zero of=\$work/vda.img bs=1M count=8 2>/dev/null
dd if=/dev/zero of=\$work/vdb.img bs=1M count=8 2>/dev/null
./capsa-io-probe fill \$work/vdb.img $blk 11
# 32 echo streams plus the two bulk transfers, guest-initiated.
./capsa-io-probe serve-unix \$work/vsock.sock_5000 34 > \$work/serve-unix.out 2>&1 &
\$ip netns add capsa-test || exit 1
in_ns() { \$ip netns exec capsa-test "\$@"; }
in_ns \$ip tuntap add capsa-tap0 mode tap
in_ns \$ip addr add 10.0.2.1/24 dev capsa-tap0
in_ns \$ip link set capsa-tap0 up
in_ns \$ip link set lo up
in_ns ./capsa-io-probe serve-tcp 10.0.2.1:7000 1 > \$work/serve-tcp.out 2>&1 &
./capsa-io-probe connect-vsock \$work/vsock.sock 6000 32 1048576 > \$work/connect.out 2>&1 &
echo "=== BEGIN vm"
timeout 600 \$ip netns exec capsa-test ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio \\
    --memory-mib 256 --cpus 2 --disk \$work/vda.img --disk \$work/vdb.img,ro \\
    --net capsa-tap0,mac=02:ca:95:00:00:02 --vsock \$work/vsock.sock \\
    --cmdline "quiet rdinit=/bin/capsa-io-probe -- $steps" 2>&1
echo "=== END vm exit=\$?"
sleep 1
echo "=== HOST verify-vda \$(./capsa-io-probe verify \$work/vda.img $blk 12 2>&1)"
for f in serve-unix serve-tcp connect; do echo "=== HOST \$f \$(cat \$work/\$f.out)"; done
\$ip netns delete capsa-test
RUN
mkdir -p "$(dirname "$log")"
if [ "$nested" = 1 ]; then
    # The outer shell is busybox, whose own ip applet would win over PATH.
    printf 'work=/tmp/check ip=/payload/bin/ip\n. ./check.sh\n' > "$payload/run.sh"
    CAPSA_NESTED_TIMEOUT_SECS=1200 \
        "$root/scripts/nested-kvm.sh" "$payload" "$log"
else
    work="$payload/work" ip=$(command -v ip) timeout 1200 sh "$payload/check.sh" > "$log" 2>&1 || true
fi

passed=0 failed=0
check() {
    local what=$1 pattern=$2
    if grep -q -- "$pattern" "$log"; then
        passed=$((passed + 1)); echo "ok   $what"
    else
        failed=$((failed + 1)); echo "FAIL $what"
    fi
}
grep -E '^(PROBE|=== (END|HOST))' "$log" || true
check "VMM exits 0 on power-off" '^=== END vm exit=0$'
check "getrandom ready at boot, hw_random is virtio" '^PROBE rng ok'
check "host-written disk reads back in the guest" '^PROBE blk-read ok'
check "guest-written disk reads back on the host" "^=== HOST verify-vda verify: $blk bytes match"
check "32 guest-initiated vsock streams" '^PROBE vsock-connect ok 32 streams'
check "bulk vsock transfer both ways, checked" "^PROBE vsock-bulk ok bytes=$bulk"
check "32 host-initiated vsock streams (guest side)" '^PROBE vsock-wait ok served 32'
check "32 host-initiated vsock streams (host side)" '^=== HOST connect connect-vsock: 32 streams'
check "host vsock server saw every stream intact" '^=== HOST serve-unix serve-unix: served 34'
check "ping and TCP over virtio-net to a tap in a netns" '^PROBE net ok pinged'
check "no guest step failed" '^PROBE done failed=0$'
echo "device-check: $passed passed, $failed failed (outer console: $log)"
[ "$failed" = 0 ]
