#!/usr/bin/env bash
# Builds a real-size test image: Debian bookworm (debootstrap minbase) with
# python3, packed as a one-layer OCI image with umoci, tagged "latest", and
# prints the path of its image layout directory. Cached under
# $CAPSA_CACHE_DIR (default ~/.cache/capsa) by this script's contents.
#
#   scripts/debian-image.sh
set -euo pipefail
cache=${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/images
key=$(sha256sum "$0" | cut -c1-16)
out="$cache/debian-python-$key"
if [ -f "$out/index.json" ]; then
    echo "debian-image: cached $out" >&2
    echo "$out"
    exit 0
fi
for p in debootstrap umoci; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >&2
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
umoci init --layout "$work/layout"
umoci new --image "$work/layout:latest"
umoci unpack --image "$work/layout:latest" "$work/bundle" > /dev/null
debootstrap --variant=minbase --include=python3 bookworm "$work/bundle/rootfs" \
    http://deb.debian.org/debian >&2
rm -rf "$work/bundle/rootfs/var/cache/apt/archives/"*.deb "$work/bundle/rootfs/var/lib/apt/lists/"*
umoci repack --image "$work/layout:latest" "$work/bundle" > /dev/null
umoci config --image "$work/layout:latest" --config.cmd /bin/bash \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --architecture amd64 --os linux
umoci gc --layout "$work/layout"
mkdir -p "$cache"
rm -rf "$out.new"
mv "$work/layout" "$out.new"
mv "$out.new" "$out"
echo "debian-image: built in $(( $(date +%s) - start )) s: $(du -sh "$out" | cut -f1)" >&2
echo "$out"
