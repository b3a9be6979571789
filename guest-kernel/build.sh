#!/usr/bin/env bash
# Builds the Capsa guest kernel (uncompressed ELF vmlinux with a PVH entry)
# from Debian's linux-source-6.1 with capsa.config applied on allnoconfig.
#
#   guest-kernel/build.sh          build if needed, print the vmlinux path
#   guest-kernel/build.sh --path   print where the vmlinux for the current
#                                  config lives, without building
#
# The result is cached under $CAPSA_CACHE_DIR (default ~/.cache/capsa) keyed by
# a hash of the config fragment, this script and the source package version,
# so a rebuild happens only when one of them changes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/capsa.config"
pkg=linux-source-6.1
cache="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/kernel"

src_version=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)
if [ -z "$src_version" ] || [ ! -f "/usr/src/$pkg.tar.xz" ]; then
    if [ "${1:-}" = "--path" ]; then
        echo "guest-kernel: $pkg is not installed; run guest-kernel/build.sh" >&2
        exit 1
    fi
    echo "guest-kernel: installing $pkg and the kernel build dependencies" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "$pkg" build-essential flex bison bc libelf-dev libssl-dev xz-utils >&2
    src_version=$(dpkg-query -W -f='${Version}' "$pkg")
fi

key=$( { cat "$fragment" "$0"; echo "$pkg $src_version"; } | sha256sum | cut -c1-16)
out="$cache/$key"
if [ "${1:-}" = "--path" ]; then
    echo "$out/vmlinux"
    exit 0
fi
if [ -f "$out/vmlinux" ]; then
    echo "guest-kernel: cached build $key" >&2
    echo "$out/vmlinux"
    exit 0
fi

mkdir -p "$cache"
src="$cache/src-$src_version"
if [ ! -f "$src/.extracted" ]; then
    echo "guest-kernel: extracting $pkg $src_version" >&2
    rm -rf "$src" && mkdir -p "$src"
    tar -xf "/usr/src/$pkg.tar.xz" -C "$src" --strip-components=1
    touch "$src/.extracted"
fi

build="$cache/build-$key"
rm -rf "$build" && mkdir -p "$build"
start=$(date +%s)
make -s -C "$src" O="$build" KCONFIG_ALLCONFIG="$fragment" allnoconfig >&2

# Kconfig silently drops options whose dependencies are unmet: refuse to
# produce a kernel that lacks something the fragment asked for.
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) ;; *) continue ;; esac
    if ! grep -qx "$line" "$build/.config"; then
        echo "guest-kernel: $line did not survive Kconfig" >&2
        missing=1
    fi
done < "$fragment"
if grep -q '^CONFIG_MODULES=y' "$build/.config"; then
    echo "guest-kernel: loadable modules must stay off" >&2
    missing=1
fi
[ "$missing" = 0 ] || exit 1

make -s -C "$src" O="$build" -j"$(nproc)" vmlinux >&2
end=$(date +%s)

tmp="$out.tmp"
rm -rf "$tmp" && mkdir -p "$tmp"
cp "$build/vmlinux" "$tmp/vmlinux"
cp "$build/.config" "$tmp/config"
size=$(stat -c %s "$tmp/vmlinux")
printf 'source=%s %s\nbuild_seconds=%s\nvmlinux_bytes=%s\n' \
    "$pkg" "$src_version" "$((end - start))" "$size" > "$tmp/build-info"
rm -rf "$out" && mv "$tmp" "$out"
rm -rf "$build"
echo "guest-kernel: built $key in $((end - start)) s, vmlinux $size bytes" >&2
echo "$out/vmlinux"
