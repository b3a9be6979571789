#!/usr/bin/env bash
# Boots Capsa microVMs on a real KVM that runs inside a QEMU (TCG) machine
# with emulated AMD SVM, for hosts whose own /dev/kvm cannot run a stock
# Linux guest (see README, "Hosts with PVM"). It checks what the KVM
# integration tests in vmm/tests/boot.rs check: 1 and 2 vCPUs reach the
# agent's ready line with the right CPU count and MemTotal and the VMM exits
# 0 on power-off; a guest panic exits 2 with the panic text.
#
#   scripts/boot-check-nested.sh KERNEL INITRD
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kernel=$1 initrd=$2
cache="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/nested"
mkdir -p "$cache"

need=()
for p in qemu-system-x86 busybox-static cpio; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

# The outer machine runs Debian's own kernel with its kvm-amd module.
host_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
host_dir="$cache/$host_pkg"
if [ ! -f "$host_dir/.done" ]; then
    rm -rf "$host_dir" && mkdir -p "$host_dir"
    (cd "$host_dir" && apt-get download "$host_pkg" >&2 && dpkg-deb -x ./*.deb x && rm ./*.deb)
    touch "$host_dir/.done"
fi
modules=$(echo "$host_dir"/x/lib/modules/*/kernel)

target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --quiet --release --locked -p capsa-vmm --target "$target" \
    --manifest-path "$root/Cargo.toml" >&2

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,capsa,modules}
cp /bin/busybox "$stage/bin/"
for applet in sh mount insmod echo poweroff; do ln -s busybox "$stage/bin/$applet"; done
for m in virt/lib/irqbypass arch/x86/kvm/kvm drivers/crypto/ccp/ccp arch/x86/kvm/kvm-amd; do
    cp "$modules/$m.ko" "$stage/modules/"
done
cp "$root/target/$target/release/capsa-vmm" "$kernel" "$initrd" "$stage/capsa/"
kname=$(basename "$kernel") iname=$(basename "$initrd")
cat > "$stage/init" <<INIT
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in irqbypass kvm ccp kvm-amd; do insmod /modules/\$m.ko; done
run() {
    name=\$1; shift
    echo "=== BEGIN \$name"
    /capsa/capsa-vmm --kernel /capsa/$kname --initrd /capsa/$iname --memory-mib 128 "\$@" 2>&1
    echo "=== END \$name exit=\$?"
}
run boot-1cpu --cpus 1 --cmdline "quiet capsa.exit_after_ready=1"
run boot-2cpu --cpus 2 --cmdline "quiet capsa.exit_after_ready=1"
run panic --cpus 1 --cmdline "quiet rdinit=/does-not-exist root=/dev/nothing"
poweroff -f
INIT
chmod +x "$stage/init"
(cd "$stage" && find . | cpio --quiet -o -H newc -R 0:0) > "$cache/outer.cpio"

log="$cache/outer.log"
echo "boot-check-nested: booting the outer machine (QEMU TCG, emulated SVM)" >&2
timeout 900 qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2048 -nodefaults \
    -no-user-config -nographic -serial stdio -no-reboot \
    -kernel "$(echo "$host_dir"/x/boot/vmlinuz-*)" -initrd "$cache/outer.cpio" \
    -append "console=ttyS0 quiet panic=-1" | tr -d '\r' > "$log" || true

# QEMU's firmware leaves terminal escapes before the first line: no ^ on BEGIN.
section() { sed -n "/=== BEGIN $1\$/,/^=== END $1 /p" "$log"; }
passed=0 failed=0
check() {
    local name=$1 what=$2; shift 2
    if "$@"; then
        passed=$((passed + 1)); echo "ok   $name: $what"
    else
        failed=$((failed + 1)); echo "FAIL $name: $what"; section "$name" | tail -40
    fi
}
exit_is() { section "$1" | grep -q "^=== END $1 exit=$2\$"; }
ready_cpus() { section "$1" | grep -q "^CAPSA_READY {\"cpus\":$2,"; }
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
    section panic | grep -q 'capsa-vmm: guest kernel panicked' &&
        section panic | grep -q 'Kernel panic - not syncing'
}
check panic "VMM exits 2 on a guest panic" exit_is panic 2
check panic "panic text in the console tail" panic_reported
echo "nested-boot: $passed passed, $failed failed"
[ "$failed" = 0 ]
