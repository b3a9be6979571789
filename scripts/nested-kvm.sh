#!/usr/bin/env bash
# Runs a payload on a real KVM inside a QEMU (TCG) machine with emulated AMD
# SVM: for hosts whose own /dev/kvm cannot run a stock Linux guest (README,
# "Hosts with PVM"). The outer machine runs Debian's kernel and kvm-amd from
# a busybox initramfs; PAYLOAD_DIR is copied to /payload and its run.sh is
# executed there with /dev/kvm ready. The outer console goes to LOG.
# CAPSA_NESTED_MODULES lists more modules to load, as paths under the
# kernel's module tree without .ko (drivers/net/tun, say).
# CAPSA_NESTED_SCRIPT names another script of PAYLOAD_DIR to run as run.sh,
# so that several machines can run side by side from one payload (each has
# its own stage, disk and initramfs; the kernel package is fetched once).
#
#   scripts/nested-kvm.sh PAYLOAD_DIR LOG
set -euo pipefail
payload=$1 log=$2
cache="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested"
mkdir -p "$cache"

# Under a lock: machines started side by side would race for dpkg's.
(
    flock 9
    need=()
    for p in qemu-system-x86 busybox-static cpio; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
    fi
) 9> "$cache/.apt.lock"

host_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
host_dir="$cache/$host_pkg"
(
    flock 9
    if [ ! -f "$host_dir/.done" ]; then
        rm -rf "$host_dir" && mkdir -p "$host_dir"
        (cd "$host_dir" && apt-get download "$host_pkg" >&2 && dpkg-deb -x ./*.deb x && rm ./*.deb)
        touch "$host_dir/.done"
    fi
) 9> "$cache/.download.lock"
modules=$(echo "$host_dir"/x/lib/modules/*/kernel)

stage=$(mktemp -d)
outer_cpio="$stage.cpio"
trap 'rm -rf "$stage" "$outer_cpio"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,modules}
cp /bin/busybox "$stage/bin/"
for applet in sh mount insmod echo cat poweroff timeout sleep mkdir dd rm ls grep; do
    ln -s busybox "$stage/bin/$applet"
done
load=()
# KVM, taps on a bridge for groups' networks with capsad's nftables filter
# (conntrack, masquerade and DNAT, bridge metadata, local-address lookups,
# connection counts) and veth pairs for the tests'
# namespaces, and a virtio disk with ext4 for /tmp (below).
for m in virt/lib/irqbypass arch/x86/kvm/kvm drivers/crypto/ccp/ccp arch/x86/kvm/kvm-amd \
         drivers/net/tun net/llc/llc net/802/stp net/bridge/bridge drivers/net/veth \
         crypto/crc32c_generic lib/libcrc32c net/netfilter/nfnetlink net/netfilter/nf_tables \
         net/ipv4/netfilter/nf_defrag_ipv4 net/ipv6/netfilter/nf_defrag_ipv6 \
         net/netfilter/nf_conntrack net/netfilter/nft_ct net/netfilter/nf_nat \
         net/netfilter/nft_chain_nat net/netfilter/nft_masq net/bridge/netfilter/nft_meta_bridge \
         net/netfilter/nft_nat net/netfilter/nft_fib net/ipv4/netfilter/nft_fib_ipv4 \
         net/ipv6/netfilter/nft_fib_ipv6 net/netfilter/nft_fib_inet net/netfilter/nf_conncount \
         net/netfilter/nft_connlimit \
         drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         lib/crc16 fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4 \
         ${CAPSA_NESTED_MODULES:-}; do
    cp "$modules/$m.ko" "$stage/modules/"
    load+=("$(basename "$m")")
done
cp -a "$payload" "$stage/payload"
if [ -n "${CAPSA_NESTED_SCRIPT:-}" ]; then
    cp "$payload/$CAPSA_NESTED_SCRIPT" "$stage/payload/run.sh"
fi
cat > "$stage/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# No page of a microVM's memory moves while it runs (see boot_outer).
echo 0 > /proc/sys/vm/compaction_proactiveness
for m in $(cat /modules/order); do insmod /modules/$m.ko; done
# /tmp (capsad's state in the suites and benchmarks) on a disk, as on a
# real host: a VMM's writes to its disks are page cache that writeback
# frees, not tmpfs pages charged to its cgroup for good.
mount -t ext4 /dev/vda /tmp || mount -t tmpfs tmp /tmp
export PATH=/payload/bin:/bin
cd /payload && sh ./run.sh
echo "=== nested-kvm: payload done"
poweroff -f
INIT
chmod +x "$stage/init"
printf '%s\n' "${load[@]}" > "$stage/modules/order"
(cd "$stage" && find . | cpio --quiet -o -H newc -R 0:0) > "$outer_cpio"

# Stops QEMU once the payload has printed nothing for
# CAPSA_NESTED_STALL_SECS: a hung outer machine costs that, not the whole
# CAPSA_NESTED_TIMEOUT_SECS. Payloads print at least once a minute or so.
# The outer machine does freeze now and then, both vCPUs spinning, as a
# microVM starts or stops; QEMU's own -M microvm guests set it off as well,
# and neither kvm_amd's npt=0 or vgif=0 nor a single vCPU prevents it.
# Only the payload's lines count as output: a frozen outer kernel goes on
# printing its own complaints ("soft lockup - CPU#0 stuck for 730s", RCU
# stalls) every half minute, which once held a frozen machine for the
# whole timeout (CI, 2400 s).
watch_for_stall() {
    local limit=${CAPSA_NESTED_STALL_SECS:-240} last=-1 quiet=0 size
    while sleep 10; do
        size=$(grep -c -v -E 'soft lockup|rcu_(preempt|sched)|rcu: |^\s*$' "$log" 2>/dev/null || true)
        if [ "$size" != "$last" ]; then
            last=$size quiet=0
            continue
        fi
        quiet=$((quiet + 10))
        if [ "$quiet" -ge "$limit" ]; then
            echo "nested-kvm: no output for ${limit}s: stopping the outer machine" | tee -a "$log" >&2
            kill "$(cat "$stage/qemu.pid" 2>/dev/null)" 2>/dev/null || true
            return
        fi
    done
}

boot_outer() {
    echo "nested-kvm: booting the outer machine (QEMU TCG, emulated SVM)" >&2
    : > "$log"
    rm -f "$stage/qemu.pid"
    watch_for_stall &
    local watcher=$!
    # transparent_hugepage=never: the outer kernel's khugepaged locked a
    # CPU up once ("soft lockup ... [khugepaged]") with microVMs running;
    # it does not prevent the freezes described above.
    # QEMU's firmware writes terminal escapes before the payload's first line.
    # A fresh sparse disk for the outer machine's /tmp at each boot
    # (crc32c_generic is loaded for ext4 above).
    rm -f "$stage/tmp.img"
    truncate -s 16G "$stage/tmp.img"
    mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$stage/tmp.img"
    timeout "${CAPSA_NESTED_TIMEOUT_SECS:-600}" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 3072 -nodefaults \
        -no-user-config -nographic -serial stdio -no-reboot -pidfile "$stage/qemu.pid" \
        -drive "file=$stage/tmp.img,if=virtio,format=raw,cache=unsafe" \
        -kernel "$(echo "$host_dir"/x/boot/vmlinuz-*)" -initrd "$outer_cpio" \
        -append "console=ttyS0 quiet panic=-1 transparent_hugepage=never" | stdbuf -oL tr -d '\r' >> "$log" || true
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
}

# This emulated SVM is not fully reliable under load (README, "Hosts with
# PVM"): now and then the outer machine resets in the middle of a payload,
# or a microVM triple-faults early in boot or hangs. No payload expects any
# of these (a payload reports a run it had to time out as "exit=124", GNU
# timeout's status, or "exit=143", busybox's), so such a run is repeated,
# up to CAPSA_NESTED_ATTEMPTS times in all, and each failed log is kept.
attempts=${CAPSA_NESTED_ATTEMPTS:-3}
for attempt in $(seq "$attempts"); do
    boot_outer
    if ! grep -q '^=== nested-kvm: payload done' "$log"; then
        why="the outer machine stopped before the payload finished"
    elif grep -q -E -e 'capsa-vmm: guest triple-faulted' -e ' exit=(124|143)$' "$log"; then
        why="a microVM triple-faulted or timed out"
    else
        break
    fi
    cp "$log" "$log.attempt-$attempt"
    echo "nested-kvm: $why (log kept in $log.attempt-$attempt)" >&2
    if [ "$attempt" -lt "$attempts" ]; then
        echo "nested-kvm: running the payload again" >&2
    fi
done
