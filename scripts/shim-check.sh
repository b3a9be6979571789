#!/usr/bin/env bash
# containerd end to end with the Capsa shim (containerd-shim-capsa-v2):
# Debian's containerd with a config in a temporary directory, a busybox
# image built here and imported with `ctr image import`, then
#   - `ctr run --rm --runtime io.containerd.capsa.v2 IMAGE id echo hello`
#     prints hello;
#   - an exit code passes through `ctr run`;
#   - the container's /proc/version is the guest kernel's, not the host's;
#   - a bind-mounted host file arrives as a copy, a host directory is left
#     out with a warning;
#   - `ctr run -t` runs on a terminal of the size ctr's own has;
#   - `ctr task exec` into a running task, with its output and exit code;
#   - `ctr task ps` and `ctr task metrics` of a running task;
#   - two containers with one io.kubernetes.cri.sandbox-id share one VM;
#   - `ctr task kill` stops it, and `ctr task kill -s SIGKILL` with 137;
#   - a task whose VM is killed under it stops with 137 and can be deleted;
#   - a container over its memory limit is OOM-killed, with status 137 and
#     an OOM event; containerd sees every kind of task event;
#   - a bad shim config and a missing kernel are clear errors;
#   - nothing is left behind: no VMM, no sandbox directory, no mount.
# The bench suite times `ctr run --rm IMAGE ID true` with the Capsa shim
# and with io.containerd.runc.v2 in the same containerd (capsa-bench ctr),
# printing a table and writing target/capsa/bench-ctr.json.
# On a PVM host (README, "Hosts with PVM") it all runs on a KVM nested in
# QEMU, containerd and runc included.
#
#   scripts/shim-check.sh KERNEL INITRD [check|bench] [RUNS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
kernel=$1 initrd=$2 suite=${3:-check} runs=${4:-10}
case "$suite" in
    check) log_name=shim-check timeout=480 ;;
    bench) log_name=bench-ctr timeout=1800 ;;
    *) echo "shim-check: unknown suite $suite (check or bench)" >&2; exit 2 ;;
esac
log="${CAPSA_CACHE_DIR:-$HOME/.cache/capsa}/$log_name.log"
need_packages containerd runc bsdutils

bin=$("$root/scripts/build-static.sh" capsa-vmm containerd-shim-capsa-v2 capsa-benches)
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
mkdir -p "$payload/bin"
cp "$bin/capsa-vmm" "$bin/containerd-shim-capsa-v2" "$bin/capsa-bench" "$payload/bin/"
cp "$kernel" "$payload/vmlinux"
cp "$initrd" "$payload/initramfs.cpio"
"$root/scripts/busybox-image.sh" "$payload/layout" > /dev/null
(cd "$payload/layout" && tar cf ../busybox.tar .)
rm -rf "$payload/layout"
guest_kernel=$(grep -a -o -m1 'Linux version [^ ]* ([^)]*)' "$kernel")

nested=0
if "$root/scripts/kvm-is-pvm.sh"; then
    nested=1
    native_programs "$payload" containerd ctr containerd-shim-runc-v2 runc script
    # containerd's overlayfs snapshotter.
    export CAPSA_NESTED_MODULES="${CAPSA_NESTED_MODULES:-} fs/overlayfs/overlay"
fi
{
    printf 'nested=%q suite=%q runs=%q\n' "$nested" "$suite" "$runs"
    printf 'guest_kernel=%q\n' "$guest_kernel"
    printf 'install_native() {\n%s\n}\n' "$install_native"
    cat <<'RUN'
if [ "$nested" = 1 ]; then
    install_native
    mkdir -p /run /var/run /sys/fs/cgroup
    mount -t cgroup2 none /sys/fs/cgroup
    # Terminals, for ctr -t under script(1).
    mkdir -p /dev/pts
    mount -t devpts -o ptmxmode=0666 devpts /dev/pts
    # runc cannot pivot_root out of the outer machine's initramfs root.
    runc_args=--no-pivot
fi
export PATH=$PWD/bin:$PATH
here=$PWD
T=$(mktemp -d)
cat > "$T/config.toml" <<TOML
version = 2
root = "$T/root"
state = "$T/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$T/containerd.sock"
[ttrpc]
  address = "$T/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$T/opt"
TOML
cat > "$T/shim.toml" <<TOML
kernel = "$here/vmlinux"
initrd = "$here/initramfs.cpio"
cpus = 1
memory_mib = 256
TOML
containerd --config "$T/config.toml" > "$T/containerd.log" 2>&1 &
containerd_pid=$!
for i in $(seq 100); do [ -S "$T/containerd.sock" ] && break; sleep 0.1; done
image=docker.io/library/busybox:latest
c() { ctr --address "$T/containerd.sock" "$@"; }
capsa() { c run --runtime io.containerd.capsa.v2 --runtime-config-path "$T/shim.toml" "$@"; }
step() { name=$1; shift; echo "=== BEGIN $name"; "$@" 2>&1; echo "=== END $name exit=$?"; }
step import c image import --base-name docker.io/library/busybox busybox.tar

if [ "$suite" = bench ]; then
    capsa-bench ctr --runs "$runs" --address "$T/containerd.sock" --image "$image" \
        --runtime "capsa=io.containerd.capsa.v2 --runtime-config-path $T/shim.toml" \
        --runtime "runc=io.containerd.runc.v2 ${runc_args:-}" \
        --containerd-log "$T/containerd.log" --json "$T/bench.json" 2>&1
    echo "=== JSON"
    cat "$T/bench.json"
    echo
    echo "=== END JSON"
    kill "$containerd_pid"
    exit 0
fi

c events > "$T/events.log" 2>&1 &
events_pid=$!
step hello capsa --rm "$image" hello echo hello < /dev/null
step exit-code capsa --rm "$image" failing sh -c 'echo failing; exit 7' < /dev/null
kernels() {
    capsa --rm "$image" kernel cat /proc/version < /dev/null
    echo "outer: $(cat /proc/version)"
}
step kernel kernels
# A bound host file travels with the rootfs; a bound directory cannot.
binds() {
    printf '10.1.2.3 pod-peer\n' > "$T/hosts"
    capsa --rm --mount "type=bind,src=$T/hosts,dst=/etc/hosts,options=rbind:ro" \
        --mount "type=bind,src=$T,dst=/hostdir,options=rbind" "$image" binds \
        sh -c 'cat /etc/hosts; test -e /hostdir || echo no-hostdir' < /dev/null
    grep -e 'copied into the root filesystem' -e 'left out the bind mount' "$T/containerd.log"
}
step binds binds
# ctr -t needs a terminal of its own: script(1) gives it one, 30x100.
step tty script -q -e -c "stty rows 30 cols 100; ctr --address $T/containerd.sock run --rm -t \
    --runtime io.containerd.capsa.v2 --runtime-config-path $T/shim.toml $image tty \
    sh -c 'test -t 0 && echo stdin-is-a-terminal; stty size; exit 3'" /dev/null < /dev/null
running() {
    # PID 1 of a PID namespace ignores signals it has no handler for.
    capsa -d --null-io "$image" long sh -c 'trap "exit 0" TERM; while :; do sleep 1; done' || return 1
    c task exec --exec-id e1 long sh -c 'echo in-exec; echo to-stderr >&2; exit 4' < /dev/null
    echo "exec=$?"
    c task ps long
    c task metrics long
    c task ls
    c task kill long
    for i in $(seq 100); do c task ls | grep '^long .*STOPPED' > /dev/null && break; sleep 0.1; done
    c task ls
    c task delete long
    c container rm long
}
step running running
# Two containers of one pod (CRI's sandbox-id annotation): one VM.
vmms() {
    n=0
    for p in /proc/[0-9]*; do
        tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep '^[^ ]*capsa-vmm ' > /dev/null && n=$((n + 1))
    done
    echo "$n"
}
pod() {
    pod="--annotation io.kubernetes.cri.sandbox-id=pod1"
    capsa -d --null-io $pod "$image" pod1 sh -c 'trap "exit 0" TERM; while :; do sleep 1; done' || return 1
    echo "first: $(c task exec --exec-id b1 pod1 cat /proc/sys/kernel/random/boot_id < /dev/null)"
    echo "member: $(capsa --rm $pod "$image" member cat /proc/sys/kernel/random/boot_id < /dev/null)"
    echo "vmms=$(vmms)"
    c task ls
    c task kill pod1
    for i in $(seq 100); do c task ls | grep '^pod1 .*STOPPED' > /dev/null && break; sleep 0.1; done
    c task delete pod1
    c container rm pod1
}
step pod pod
killed() {
    capsa -d --null-io "$image" doomed sh -c 'trap "" TERM; sleep 600' || return 1
    c task kill -s SIGKILL doomed
    for i in $(seq 100); do c task ls | grep '^doomed .*STOPPED' > /dev/null && break; sleep 0.1; done
    c task delete doomed
    echo "deleted=$?"
    c container rm doomed
}
step killed killed
bad_config() {
    printf 'kernal = "x"\n' > "$T/bad.toml"
    c run --rm --runtime io.containerd.capsa.v2 --runtime-config-path "$T/bad.toml" "$image" bad true
    printf 'kernel = "/nonexistent/vmlinux"\ninitrd = "%s/initramfs.cpio"\n' "$here" > "$T/nokernel.toml"
    c run --rm --runtime io.containerd.capsa.v2 --runtime-config-path "$T/nokernel.toml" "$image" nokernel true
}
step bad-config bad_config
# Bounded at three times the limit, so that a limit not applied ends too.
step oom capsa --rm --memory-limit 16777216 "$image" oom \
    sh -c "x=\$(head -c 50331648 /dev/zero | tr '\\0' a); echo survived" < /dev/null
step events sh -c "kill $events_pid; cat $T/events.log"
# The VM dies under a running task: the task exits 137 and can be deleted.
vm_dies() {
    capsa -d --null-io "$image" victim sleep 600 || return 1
    for p in /proc/[0-9]*; do
        tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep '^[^ ]*capsa-vmm ' > /dev/null && kill -9 "${p#/proc/}"
    done
    for i in $(seq 100); do c task ls | grep '^victim .*STOPPED' > /dev/null && break; sleep 0.1; done
    c task ls
    c task delete victim
    echo "deleted=$?"
    c container rm victim
}
step vm-dies vm_dies
leftovers() {
    sleep 1
    for p in /proc/[0-9]*; do
        tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -e capsa-vmm -e shim-capsa > /dev/null &&
            echo "left: $p $(tr '\0' ' ' < "$p/cmdline")"
    done
    ls -A /run/capsa-shim 2>/dev/null | sed 's/^/left: sandbox dir /'
    grep " $T/state" /proc/mounts | sed 's/^/left: mount /'
    c task ls
    echo leftovers-checked
}
step leftovers leftovers
echo "=== containerd log"
grep -e 'root filesystem' -e capsa -e 'level=error' -e 'level=warn' "$T/containerd.log" | tail -60
kill "$containerd_pid"
RUN
} > "$payload/run.sh"

run_payload "$payload" "$log" "$timeout"

if [ "$suite" = bench ]; then
    sed -n '/^`ctr run --rm/,/^of which/p' "$log"
    payload_json "$log" "$root/target/capsa/bench-ctr.json"
    echo "results written to target/capsa/bench-ctr.json"
    exit
fi
check import "ctr imports the busybox image" exit_is import 0
check hello "ctr run --rm --runtime io.containerd.capsa.v2 echo hello prints hello" has hello '^hello$'
check hello "and exits 0" exit_is hello 0
check exit-code "a failing command's exit code passes through ctr" exit_is exit-code 7
check exit-code "with its output" has exit-code '^failing$'
check kernel "the container's /proc/version is the guest kernel's" has kernel "^$guest_kernel"
outer_differs() { ! section kernel | grep '^outer: ' | grep -F -- "$guest_kernel" > /dev/null; }
check kernel "not the host's" outer_differs
check binds "a bind-mounted host file is in the container" has binds '^10.1.2.3 pod-peer$'
check binds "said to be a copy in containerd's log" has binds 'hosts is copied into the root filesystem at /etc/hosts'
check binds "a bound host directory is left out, and the log says so" has binds 'left out the bind mount of host directory'
check binds "the container still runs" has binds '^no-hostdir$'
check tty "ctr run -t: stdin is a terminal" has tty 'stdin-is-a-terminal'
check tty "of ctr's terminal's size" has tty '30 100'
check tty "and the exit code passes through" exit_is tty 3
check running "ctr task exec runs in a running task" has running '^in-exec'
check running "with its stderr" has running '^to-stderr'
check running "and its exit code" has running '^exec=4$'
check running "ctr task ps lists its processes" has running '^PID'
check running "ctr task metrics reads its cgroup" has running 'memory\.usage_in_bytes\|memory.usage\|pids.current\|^METRIC'
check running "ctr task kill stops it" has running '^long .*STOPPED'
check running "and it is deleted" exit_is running 0
same_vm() {
    local first member
    first=$(section pod | sed -n 's/^first: //p') member=$(section pod | sed -n 's/^member: //p')
    [ -n "$first" ] && [ "$first" = "$member" ]
}
check pod "a pod's second container runs in the first one's VM (same boot id)" same_vm
check pod "one VMM for the pod" has pod '^vmms=1$'
check pod "and the pod ends cleanly" exit_is pod 0
check killed "kill -s SIGKILL ends a task that ignores SIGTERM" exit_is killed 0
check killed "with status 137" has killed 'exit code 137'
check vm-dies "a task whose VM is killed stops" has vm-dies '^victim .*STOPPED'
check vm-dies "with status 137, and is deleted" has vm-dies 'exit code 137'
check vm-dies "and removed" exit_is vm-dies 0
check oom "a container over its memory limit is killed, status 137" exit_is oom 137
check oom "and does not survive" not_has oom '^survived'
for topic in create start exec-added exec-started exit delete oom; do
    check events "containerd got /tasks/$topic events from the shim" has events " /tasks/$topic "
done
check bad-config "a misspelt shim config key is named" has bad-config 'unknown field `kernal`'
check bad-config "a missing guest kernel is named" has bad-config '/nonexistent/vmlinux does not exist'
no_leftovers() { has leftovers "^leftovers-checked$" && not_has leftovers "^left: "; }
check leftovers "no VMM, shim, sandbox directory or mount is left behind" no_leftovers
echo "shim-check: $passed passed, $failed failed"
[ "$failed" = 0 ]
