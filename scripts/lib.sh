# Shell shared by the benchmarks (and the e2e runner's nested payload);
# sourced, not run.
#   need_packages PKG...            installs the Debian packages missing
#   native_programs PAYLOAD PROG... copies host programs and their libraries
#                                   into PAYLOAD/bin and PAYLOAD/lib, for a
#                                   nested run to install where the loader
#                                   looks (install_native in the payload):
#                                   programs that re-execute /proc/self/exe
#                                   (runc, containerd's shims) cannot run
#                                   behind nested-add-program's wrapper
#   run_payload PAYLOAD LOG SECS    runs PAYLOAD/run.sh in PAYLOAD, nested on
#                                   a PVM host (scripts/nested-kvm.sh), its
#                                   output in LOG
#   payload_json LOG OUT            copies the "=== JSON" block of LOG to OUT
#   $start_containerd               shell text for a payload's run script:
#                                   start_containerd DIR TOP TABLES writes
#                                   DIR/config.toml (root, state and sockets
#                                   in DIR; TOP's keys, TABLES' tables) and
#                                   DIR/shim.toml (the payload's vmlinux and
#                                   initramfs.cpio, 1 vCPU, 256 MiB), starts
#                                   containerd (log DIR/containerd.log, PID
#                                   $containerd_pid) and waits for its socket

need_packages() {
    local need=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
    fi
}

native_programs() {
    local payload=$1 program lib; shift
    mkdir -p "$payload/bin" "$payload/lib"
    for program in "$@"; do
        program=$(command -v "$program")
        cp "$program" "$payload/bin/"
        ldd "$program" | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
            cp -L "$lib" "$payload/lib/"
        done
    done
}

# The payload's half of native_programs, as shell text for its run script.
install_native='mkdir -p /lib/x86_64-linux-gnu /lib64
cp lib/* /lib/x86_64-linux-gnu/
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2'

start_containerd='start_containerd() {
    local dir=$1 top=$2 tables=$3
    cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
$top
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
$tables
TOML
    cat > "$dir/shim.toml" <<TOML
kernel = "$PWD/vmlinux"
initrd = "$PWD/initramfs.cpio"
cpus = 1
memory_mib = 256
TOML
    containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
    containerd_pid=$!
    for _ in $(seq 100); do [ -S "$dir/containerd.sock" ] && break; sleep 0.1; done
}'

run_payload() {
    local payload=$1 log=$2 secs=$3 scripts
    scripts=$(dirname "${BASH_SOURCE[0]}")
    if "$scripts/kvm-is-pvm.sh"; then
        CAPSA_NESTED_TIMEOUT_SECS=$secs "$scripts/nested-kvm.sh" "$payload" "$log"
    else
        (cd "$payload" && timeout "$secs" sh ./run.sh) > "$log" 2>&1 || true
    fi
}

payload_json() {
    mkdir -p "$(dirname "$2")"
    sed -n '/^=== JSON$/,/^=== END JSON$/p' "$1" | sed '1d;$d' > "$2"
}
