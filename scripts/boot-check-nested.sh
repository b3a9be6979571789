#!/usr/bin/env bash
# Boots Capsa microVMs on a real KVM nested in QEMU (scripts/nested-kvm.sh),
# for hosts whose own /dev/kvm cannot run a stock Linux guest (README,
# "Hosts with PVM"). It checks what the KVM
# integration tests in vmm/tests/boot.rs check: 1 and 2 vCPUs reach the
# agent's ready line with the right CPU count and MemTotal and the VMM exits
# 0 on power-off; a guest panic exits 2 with the panic text; the agent
# answers its ttrpc API over vsock and powers off on request; and the
# agent runs containers from a busybox OCI image built here with umoci
# (capsa-agent-check: output, exit codes, signals, exec, TTY, memory limit,
# localhost between containers, isolation, bad requests, corrupt layers).
#
#   scripts/boot-check-nested.sh KERNEL INITRD
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
kernel=$1 initrd=$2
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested/boot-check.log"
# The container scenarios add a few minutes under emulation; a run that
# hangs (see README, "Hosts with PVM") is cut at this and tried again.
export CAPSA_NESTED_TIMEOUT_SECS="${CAPSA_NESTED_TIMEOUT_SECS:-600}"

bin=$("$root/scripts/build-static.sh" capsa-vmm capsa-io-probe capsa-guest-client)

payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
cp "$bin/capsa-vmm" "$bin/capsa-io-probe" "$bin/capsa-agent-check" "$payload/"
"$root/scripts/busybox-image.sh" "$payload/busybox-oci" > /dev/null
"$root/scripts/nested-add-program.sh" "$payload" ip
# An empty ext4 disk for the sandbox's block volume.
truncate -s 16M "$payload/data.img"
mkfs.ext4 -q -F "$payload/data.img"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
cat > "$payload/run.sh" <<'RUN'
run() {
    name=$1; shift
    echo "=== BEGIN $name"
    timeout 120 ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio --memory-mib 128 "$@" 2>&1
    echo "=== END $name exit=$?"
}
run boot-1cpu --cpus 1 --cmdline "quiet capsa.exit_after_ready=1"
run boot-2cpu --cpus 2 --cmdline "quiet capsa.exit_after_ready=1"
run panic --cpus 1 --cmdline "quiet rdinit=/does-not-exist root=/dev/nothing"
# The agent's API over vsock, as the host reaches it: version, ping, shutdown.
echo "=== BEGIN agent-api"
timeout 120 ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio --memory-mib 128 \
    --vsock /tmp/agent.sock > /tmp/agent-vm.out 2>&1 &
vm=$!
./capsa-io-probe agent-check /tmp/agent.sock 2>&1
wait $vm
echo "=== END agent-api exit=$?"
# Containers from the busybox image: the scenarios of capsa-agent-check,
# with a NIC on a tap in a network namespace of this test's own for the
# sandbox's interface and route.
echo "=== BEGIN containers"
ip=/payload/bin/ip
mkdir -p /run /var/run
$ip netns add capsa-sandbox
$ip netns exec capsa-sandbox $ip tuntap add capsa-tap1 mode tap
$ip netns exec capsa-sandbox $ip addr add 10.0.3.1/24 dev capsa-tap1
$ip netns exec capsa-sandbox $ip link set capsa-tap1 up
timeout 600 $ip netns exec capsa-sandbox ./capsa-vmm --kernel vmlinux --initrd initramfs.cpio \
    --cpus 2 --memory-mib 512 --net capsa-tap1,mac=02:ca:95:00:00:03 \
    --disk data.img,id=capsa-data \
    --vsock /tmp/containers.sock > /tmp/containers-vm.out 2>&1 &
vm=$!
timeout 540 ./capsa-agent-check --socket /tmp/containers.sock --image busybox-oci \
    --nic 02:ca:95:00:00:03 --host-address 10.0.3.1 --ext4-disk capsa-data 2>&1
wait $vm
status=$?
$ip netns delete capsa-sandbox
echo "--- the VM's console, last lines"
tail -30 /tmp/containers-vm.out
echo "=== END containers exit=$status"
RUN
"$root/scripts/nested-kvm.sh" "$payload" "$log"

# QEMU's firmware leaves terminal escapes before the first line: no ^ on BEGIN.
ready_cpus() { section "$1" | grep "^CAPSA_READY {\"cpus\":$2," > /dev/null; }
mem_ok() {
    local kib
    kib=$(section "$1" | sed -n 's/^CAPSA_READY .*"mem_total_kib":\([0-9]*\).*/\1/p')
    [ -n "$kib" ] && [ "$kib" -ge $((96 * 1024)) ] && [ "$kib" -lt $((128 * 1024)) ]
}
for cpus in 1 2; do
    name="boot-${cpus}cpu"
    check "$name" "VMM exits 0 on guest power-off" exit_is "$name" 0
    check "$name" "ready line reports $cpus CPUs" ready_cpus "$name" "$cpus"
    check "$name" "MemTotal consistent with 128 MiB" mem_ok "$name"
done
panic_reported() {
    section panic | grep 'capsa-vmm: guest kernel panicked' > /dev/null &&
        section panic | grep 'Kernel panic - not syncing' > /dev/null
}
check panic "VMM exits 2 on a guest panic" exit_is panic 2
agent_answers() { section agent-api | grep '^agent-check: api_version=[0-9]* .* shutdown=ok$' > /dev/null; }
check agent-api "agent answers version and ping over vsock" agent_answers
check agent-api "VMM exits 0 after the agent's shutdown call" exit_is agent-api 0
check panic "panic text in the console tail" panic_reported
scenarios=$(section containers | grep -c '^agent-check: .* ok' || true)
no_failures() { section containers | grep '^agent-check: done failed=0$' > /dev/null; }
check containers "all container scenarios pass ($scenarios ok)" no_failures
check containers "VMM exits 0 after the agent stops its containers and powers off" exit_is containers 0
echo "nested-boot: $passed passed, $failed failed"
[ "$failed" = 0 ]
