#!/usr/bin/env bash
# Copies a dynamically linked host program and the libraries it needs into
# a nested-KVM payload (scripts/nested-kvm.sh), and writes PAYLOAD/bin/NAME,
# a wrapper that runs it with those libraries: the outer machine has none.
#
#   scripts/nested-add-program.sh PAYLOAD_DIR PROGRAM [NAME]
set -euo pipefail
payload=$1 program=$(command -v "$2") name=${3:-$(basename "$2")}
mkdir -p "$payload/lib" "$payload/programs" "$payload/bin"
cp "$program" "$payload/programs/$name"
ldd "$program" | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
    cp -L "$lib" "$payload/lib/"
done
cat > "$payload/bin/$name" <<WRAP
#!/bin/sh
exec /payload/lib/ld-linux-x86-64.so.2 --library-path /payload/lib /payload/programs/$name "\$@"
WRAP
chmod +x "$payload/bin/$name"
