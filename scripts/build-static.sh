#!/usr/bin/env bash
# Builds workspace packages as static release binaries (glibc linked in:
# there is no musl target here) and prints the directory they land in.
# Passing --target keeps the flag away from build scripts and proc macros,
# which must stay dynamic.
#
#   scripts/build-static.sh PACKAGE...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=x86_64-unknown-linux-gnu
packages=()
for p in "$@"; do packages+=(-p "$p"); done
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --quiet --release --locked "${packages[@]}" --target "$target" \
    --manifest-path "$root/Cargo.toml" >&2
echo "$root/target/$target/release"
