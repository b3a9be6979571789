#!/usr/bin/env bash
# Installs what building and testing Capsa needs on a Debian machine, then
# builds the guest kernel (cached) and the initramfs. Prints nothing to
# stdout but the paths of the kernel and the initramfs, one per line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

packages=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
          xz-utils cpio binutils busybox-static umoci e2fsprogs
          docker-registry skopeo openssl python3-prometheus-client curl iproute2
          containerd runc crun bsdutils debootstrap nftables
          containernetworking-plugins protobuf-compiler tmux)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    echo "setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi

"$root/guest-kernel/build.sh"
"$root/rootfs/build.sh"
