#!/usr/bin/env bash
# Fills DATA, a docker-registry storage directory, with the OCI layout
# LAYOUT's "latest" image as library/busybox:latest: what a Docker Hub
# mirror serves for `busybox`. It pushes with skopeo to a registry run on
# loopback here for the purpose, then stops that registry.
#
#   scripts/registry-data.sh LAYOUT DATA
set -euo pipefail
layout=$1 data=$2
. "$(dirname "$0")/lib.sh"
need_packages docker-registry skopeo
rm -rf "$data"
mkdir -p "$data"
data=$(cd "$data" && pwd)
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
cat > "$work/config.yml" <<CONFIG
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $data
http:
  addr: 127.0.0.1:$port
CONFIG
docker-registry serve "$work/config.yml" > "$work/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break
    sleep 0.1
done
skopeo copy --quiet --dest-tls-verify=false \
    "oci:$layout:latest" "docker://127.0.0.1:$port/library/busybox:latest" >&2 ||
    { cat "$work/log" >&2; exit 1; }
