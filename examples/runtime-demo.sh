#!/usr/bin/env bash
# trenv runtime demo (`make demo-runtime`): a container through containerd with trenv as the runtime, then a checkpoint
# and restore with trenv, showing the restored process carry on where it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${TRENV_CACHE:-/var/cache/trenv}"
TRENV="${TRENV_BIN:-$ROOT/target/release/trenv}"
IMAGE_DIR="$CACHE/images/busybox"
WORK="$(mktemp -d /run/trenv-demo.XXXXXX)"
NS=trenv-demo
CTRD_PID=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  set +e
  "$TRENV" --root "$WORK/state" delete --force demo-counter >/dev/null 2>&1
  if [ -n "$CTRD_PID" ]; then
    ctr --address "$WORK/containerd.sock" -n "$NS" task kill -s SIGKILL demo-bg >/dev/null 2>&1
    # The namespace's pool shim outlives containerd by design: drain it (it then exits).
    "$TRENV" sandbox drain --namespace "$NS" >/dev/null 2>&1
    for _ in $(seq 100); do pgrep -f "containerd-shim-trenv-v2 -namespace $NS " >/dev/null || break; sleep 0.1; done
    kill "$CTRD_PID" 2>/dev/null; wait "$CTRD_PID" 2>/dev/null
  fi
  grep "$WORK" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
  for d in /sys/fs/cgroup/*/"$NS" /sys/fs/cgroup/"$NS" /sys/fs/cgroup/*/trenv-demo-counter; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$TRENV" ] || { echo "demo: $TRENV missing; run 'make setup'" >&2; exit 1; }
bash "$ROOT/examples/busybox/build.sh" "$IMAGE_DIR" >/dev/null

say "1. A private containerd $(containerd --version | awk '{print $3}')"
cat > "$WORK/config.toml" <<TOML
version = 2
root = "$WORK/root"
state = "$WORK/cstate"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$WORK/containerd.sock"
TOML
PATH="$(dirname "$TRENV"):$PATH" containerd --config "$WORK/config.toml" >"$WORK/containerd.log" 2>&1 &
CTRD_PID=$!
CTR=(ctr --address "$WORK/containerd.sock" -n "$NS")
for _ in $(seq 100); do "${CTR[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
"${CTR[@]}" images import --base-name docker.io/local/busybox "$IMAGE_DIR/busybox-oci.tar" >/dev/null
echo "imported docker.io/local/busybox:latest (built offline from Debian's busybox-static)"

say "2. ctr run with trenv as the OCI runtime (containerd's runc shim drives trenv)"
echo "\$ ctr run --rm --runc-binary $TRENV docker.io/local/busybox:latest demo sh -c '...'"
set +e
"${CTR[@]}" run --rm --runc-binary "$TRENV" docker.io/local/busybox:latest demo \
  sh -c 'echo "hello from a trenv container: hostname=$(hostname) pid=$$ kernel=$(uname -r)"; exit 3'
code=$?
set -e
echo "container exit code: $code (propagated through containerd)"

say "2b. the same through trenv's own shim (runtime io.containerd.trenv.v2, no runtime exec per call)"
echo "\$ ctr run --rm --runtime io.containerd.trenv.v2 docker.io/local/busybox:latest demo2 sh -c '...'"
set +e
start=$(date +%s%N)
"${CTR[@]}" run --rm --runtime io.containerd.trenv.v2 docker.io/local/busybox:latest demo2 \
  sh -c 'echo "hello from the trenv shim: pid=$$"; exit 4'
code=$?
set -e
echo "exit code: $code; ctr run took $(( ($(date +%s%N) - start) / 1000000 )) ms end to end"

say "3. exec into a running container"
"${CTR[@]}" run -d --runc-binary "$TRENV" docker.io/local/busybox:latest demo-bg sleep 600 >/dev/null
"${CTR[@]}" task exec --exec-id e1 demo-bg sh -c 'echo "exec sees init: $(cat /proc/1/cmdline | tr "\0" " ")"'
"${CTR[@]}" task ls
"${CTR[@]}" task kill -s SIGKILL demo-bg
for _ in $(seq 50); do "${CTR[@]}" task ls | grep -q 'demo-bg.*STOPPED' && break; sleep 0.1; done
"${CTR[@]}" task delete demo-bg >/dev/null
"${CTR[@]}" containers delete demo-bg

say "4. Checkpoint and restore with trenv (CRIU $(criu --version | awk '/Version/{print $2}') over RPC)"
B="$WORK/bundle"
mkdir -p "$B"
cp -a "$IMAGE_DIR/rootfs" "$B/rootfs"
"$TRENV" spec --bundle "$B"
jq '.process.terminal=false | .root.readonly=false | .linux.cgroupsPath="/trenv-demo-counter/c"
    | .process.args=["sh","-c","i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.1; done"]' \
  "$B/config.json" > "$B/config.tmp" && mv "$B/config.tmp" "$B/config.json"
T=("$TRENV" --root "$WORK/state")
# The container inherits stdio: give it /dev/null (a host file could not be checkpointed).
"${T[@]}" --log "$WORK/trenv.log" run --detach --bundle "$B" demo-counter </dev/null >/dev/null 2>&1 \
  || { cat "$WORK/trenv.log" >&2; exit 1; }
sleep 1.5
echo "counter before checkpoint: $(cat "$B/rootfs/count")"
start=$(date +%s%N)
"${T[@]}" checkpoint --image-path "$WORK/images" demo-counter
echo "checkpointed in $(( ($(date +%s%N) - start) / 1000000 )) ms; container stopped; count frozen at $(cat "$B/rootfs/count")"
sleep 1
start=$(date +%s%N)
"${T[@]}" --log "$WORK/trenv.log" restore --detach --image-path "$WORK/images" --bundle "$B" demo-counter \
  </dev/null >/dev/null 2>&1 || { cat "$WORK/trenv.log" >&2; exit 1; }
echo "restored in $(( ($(date +%s%N) - start) / 1000000 )) ms"
sleep 1
echo "counter after restore: $(cat "$B/rootfs/count") (carried on from its checkpointed memory)"
"${T[@]}" state demo-counter | jq -c '{id, status, pid}'
"${T[@]}" delete --force demo-counter

say "done: everything cleaned up"
