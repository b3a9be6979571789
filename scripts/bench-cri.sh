#!/usr/bin/env bash
# The CRI benchmark: a pod and its first container through containerd's
# CRI plugin, as kubelet starts one (RunPodSandbox, CreateContainer,
# StartContainer; then StopPodSandbox and RemovePodSandbox), with runtime
# handler capsa (the Capsa shim, a microVM per pod) and runc, same
# containerd, same image, same CNI network (Debian's bridge and host-local
# plugins); capsa-bench cri. runc runs a real pause container: a busybox
# image whose entrypoint sleeps, built here. Prints a table and writes
# target/capsa/bench-cri.json. On a PVM host (README, "Hosts with PVM")
# it all runs on a KVM nested in QEMU, containerd and runc included.
#
#   scripts/bench-cri.sh KERNEL INITRD [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
kernel=$1 initrd=$2 runs=${3:-5}
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/bench-cri.log"
need_packages containerd runc containernetworking-plugins umoci

bin=$("$root/scripts/build-static.sh" capsa-vmm containerd-shim-capsa-v2 capsa-benches)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
mkdir -p "$payload/bin"
cp "$bin/capsa-vmm" "$bin/containerd-shim-capsa-v2" "$bin/capsa-bench" "$payload/bin/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/busybox-image.sh" "$payload/layout" > /dev/null
# The pause image: busybox, sleeping.
umoci config --image "$payload/layout:latest" --tag pause \
    --config.entrypoint /bin/sleep --config.cmd 2147483647
(cd "$payload/layout" && tar cf ../busybox.tar .)
rm -rf "$payload/layout"

nested=0
cni=/usr/lib/cni
if "$root/scripts/kvm-is-pvm.sh"; then
    nested=1
    native_programs "$payload" containerd ctr containerd-shim-runc-v2 runc \
        "$cni/bridge" "$cni/host-local" "$cni/loopback"
    cni=
    # containerd's overlayfs snapshotter; tc for the shim's pod networks.
    export CAPSA_NESTED_MODULES="${CAPSA_NESTED_MODULES:-} fs/overlayfs/overlay net/sched/sch_ingress net/sched/cls_u32 net/sched/act_mirred"
fi
{
    printf 'nested=%q runs=%q cni=%q\n' "$nested" "$runs" "$cni"
    printf 'install_native() {\n%s\n}\n' "$install_native"
    printf '%s\n' "$start_containerd"
    cat <<'RUN'
if [ "$nested" = 1 ]; then
    install_native
    mkdir -p /run /var/run /sys/fs/cgroup /etc
    mount -t cgroup2 none /sys/fs/cgroup
    # The CRI plugin copies both into each pod.
    [ -e /etc/hosts ] || echo '127.0.0.1 localhost' > /etc/hosts
    [ -e /etc/resolv.conf ] || : > /etc/resolv.conf
    ip link set lo up 2>/dev/null || true
    cni=$PWD/bin
fi
export PATH=$PWD/bin:$PATH
T=$(mktemp -d)
mkdir -p "$T/cni"
cat > "$T/cni/10-bench.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "capsa-bench", "plugins": [{"type": "bridge",
 "bridge": "cni-bench0", "isGateway": true, "ipMasq": false,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.98.0.0/24"}]],
          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$T/cni-ipam"}}]}
JSON
cri='plugins."io.containerd.grpc.v1.cri"'
start_containerd "$T" '' "$(cat <<TOML
[$cri]
  sandbox_image = "docker.io/library/busybox:pause"
  disable_apparmor = true
[$cri.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[$cri.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[$cri.containerd.runtimes.runc.options]
  NoPivotRoot = $([ "$nested" = 1 ] && echo true || echo false)
[$cri.containerd.runtimes.capsa]
  runtime_type = "io.containerd.capsa.v2"
[$cri.containerd.runtimes.capsa.options]
  ConfigPath = "$T/shim.toml"
[$cri.cni]
  bin_dir = "$cni"
  conf_dir = "$T/cni"
TOML
)"
# Root filesystems on disks (the shim's default streams them).
echo 'rootfs_disks = 4' >> "$T/shim.toml"
ctr --address "$T/containerd.sock" -n k8s.io image import \
    --base-name docker.io/library/busybox busybox.tar

capsa-bench cri --runs "$runs" --address "$T/containerd.sock" \
    --handler capsa=capsa --handler runc=runc \
    --logs "$T/pod-logs" --json "$T/bench.json" 2>&1 || tail -n 40 "$T/containerd.log"
echo "=== JSON"
cat "$T/bench.json"
echo
echo "=== END JSON"
kill "$containerd_pid"

RUN
} > "$payload/run.sh"

run_payload "$payload" "$log" 1800
sed -n '/^a pod and its first container/,/^$/p' "$log"
payload_json "$log" "$root/target/capsa/bench-cri.json"
echo "results written to target/capsa/bench-cri.json"
