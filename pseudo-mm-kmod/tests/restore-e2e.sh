#!/bin/sh
# End-to-end restore from a template in the kmod-test guest (run by /init under
# `pmm_test reap`): a worker process with 64 MiB of private memory is dumped by CRIU, made a
# template with `trenv template build --kmod` in the pool given ($1 kind, $2 directory), and
# restored three ways, each checked by asking the worker about its memory:
#   plain     stock CRIU restore of the dump (pages written into fresh memory)
#   template  CRIU with the trenv plugin, memory mapped through /dev/pseudo_mm
#   redump    the template-backed process dumped again and restored (plugin hooks both ways)
# then the module is reloaded: with the template's id given to another template (tmpfs), and
# with it free, so that the store makes the template again from the pool (daxfs).
# Restores run with --display-stats: CRIU's own restore time and pages written are printed
# with the wall time of the whole command. Prints E2E lines; any "E2E FAIL" fails the run.
kind=$1 pooldir=$2
D=/e2e-$kind
CRIU="/usr/local/sbin/criu"
PLUGINS=/plugins
rm -rf "$D"
mkdir -p "$D/img" "$D/img2" "$D/work" "$D/store" "$pooldir"

fail() { echo "E2E FAIL $kind: $*"; for f in "$D"/work/*.log "$D"/img*/*.log; do [ -f "$f" ] && grep -E "Error|Warn" "$f" | grep -v "Diag module" | tail -6 | sed "s|^|E2E LOG ${f##*/}: |"; done; exit 1; }

ask() { # $1 = label, $2 = pid: the worker's report, as an E2E line
  rm -f "$D/out"
  touch "$D/go"
  i=0
  while [ ! -f "$D/out" ]; do
    i=$((i + 1)); [ "$i" -gt 200 ] && fail "$1: the worker does not answer"
    sleep 0.05
  done
  echo "E2E $kind $1 $(cat "$D/out")"
  grep -q "wrong=0 " "$D/out" || fail "$1: memory differs from the dumped process's"
}

stop() { # kill and wait until the pid is free for the next restore
  kill -9 "$1"
  i=0
  while [ -d "/proc/$1" ]; do i=$((i + 1)); [ "$i" -gt 100 ] && fail "pid $1 stays"; sleep 0.05; done
}

setsid /pmm_test worker "$D" </dev/null >"$D/worker.log" 2>&1 &
i=0; while [ ! -f "$D/ready" ]; do i=$((i + 1)); [ "$i" -gt 100 ] && fail "no worker"; sleep 0.05; done
pid=$(cat "$D/ready")
$CRIU dump -t "$pid" -D "$D/img" -L "$PLUGINS" -o dump.log || fail "dump"
i=0; while [ -d "/proc/$pid" ]; do i=$((i + 1)); [ "$i" -gt 100 ] && fail "dumped worker stays"; sleep 0.05; done

/trenv --criu "$CRIU" template build --from-checkpoint "$D/img" --name worker --kmod --pool-kind "$kind" \
  --pool-dir "$pooldir" --pool-capacity 256M --store "$D/store" 2>&1 | sed "s/^/E2E $kind build: /"
images=$(ls -d "$D"/store/by-key/*/images 2>/dev/null)
[ -n "$images" ] || fail "no template"
/pmm_test stats | sed "s/^/E2E $kind after build: /"
templates() { /pmm_test stats | sed -n 's/.*templates=\([0-9]*\).*/\1/p'; }
built=$(templates)

/pmm_test time wall $CRIU restore -D "$D/img" -W "$D/work" -o plain.log -d --display-stats \
  --pidfile "$D/plain.pid" | grep -E "TIME|Restore time|Pages restored" | sed "s/^/E2E $kind-plain /"
[ -f "$D/plain.pid" ] || fail "plain restore"
ask plain "$(cat "$D/plain.pid")"
stop "$(cat "$D/plain.pid")"

/pmm_test time wall $CRIU restore -D "$images" -W "$D/work" -o template.log -d --display-stats \
  --pidfile "$D/template.pid" -L "$PLUGINS" --inherit-fd "fd[3]:dev/pseudo_mm" 3</dev/pseudo_mm |
  grep -E "TIME|Restore time|Pages restored" | sed "s/^/E2E $kind-template /"
[ -f "$D/template.pid" ] || fail "template restore"
tpid=$(cat "$D/template.pid")
grep -c pseudo_mm "/proc/$tpid/maps" | sed "s/^/E2E $kind template: mappings of the device: /"
ask template "$tpid"
/pmm_test stats | sed "s/^/E2E $kind while restored: /"
# Taken out of the template, the instance goes while the module keeps the template.
$CRIU dump -v4 -t "$tpid" -D "$D/img2" -L "$PLUGINS" -o dump.log || fail "dump of the template-backed process"
i=0; while [ -d "/proc/$tpid" ]; do i=$((i + 1)); [ "$i" -gt 100 ] && fail "dumped instance stays"; sleep 0.05; done
n=$(grep -c "plugin is available" "$D/img2/dump.log")
[ "$n" -gt 0 ] || fail "the plugin did not claim the device mappings at dump"
echo "E2E $kind redump: $n device mappings claimed by the plugin"
$CRIU restore -D "$D/img2" -W "$D/work" -o redump.log -d --pidfile "$D/redump.pid" -L "$PLUGINS" \
  --inherit-fd "fd[3]:dev/pseudo_mm" 3</dev/pseudo_mm || fail "restore of the redump"
ask redump "$(cat "$D/redump.pid")"
stop "$(cat "$D/redump.pid")"

# A reloaded module (as after a reboot) has forgotten the template, and gives ids from 1
# again. tmpfs: the worker's id is taken by another template first, and the store must
# refuse the worker rather than restore another's memory, and its rm must leave the other
# alone. daxfs: the id is free, the store makes the template again from the pool on use
# (the pool on the device outlives the module), and a restore works as before.
manifest_id() { sed -n 's/.*"template": \([0-9]*\).*/\1/p' "$1"/by-key/*/manifest.json | head -1; }
wid=$(manifest_id "$D/store")
[ -n "$wid" ] || fail "no module template in the worker's manifest"
reload() {
  rmmod pseudo_mm || fail "unloading with unmapped templates"
  insmod /pseudo_mm.ko || fail "reloading the module"
}
backends() { /pmm_test stats | sed -n 's/.*backends=\([0-9]*\).*/\1/p'; }
reload
if [ "$kind" = tmpfs ]; then
  /pmm_test take-ids "$wid" >/dev/null || fail "taking ids"
  if out=$(/trenv --criu "$CRIU" template verify worker --store "$D/store" 2>&1); then
    fail "verify accepts a template whose id is another template's"
  fi
  echo "$out" | grep -q "gave its id to another template" || fail "verify after reload said: $out"
  echo "E2E $kind reload: verify refuses the worker: $out"
  before=$(templates)
  /trenv --criu "$CRIU" template rm worker --store "$D/store" || fail "template rm after reload"
  [ "$(templates)" -eq "$before" ] || fail "rm of the worker deleted template $wid, another template's"
  echo "E2E $kind reload: template $wid is another's; the worker is refused, and its rm left the other"
  reload
else
  out=$(/trenv --criu "$CRIU" template verify worker --store "$D/store" 2>&1) || fail "verify after reload: $out"
  [ "$(templates)" -eq 1 ] || fail "the template was not made again"
  /pmm_test time wall $CRIU restore -D "$images" -W "$D/work" -o rearmed.log -d --pidfile "$D/rearmed.pid" \
    -L "$PLUGINS" --inherit-fd "fd[3]:dev/pseudo_mm" 3</dev/pseudo_mm | grep -E "TIME" | sed "s/^/E2E $kind-rearmed /"
  [ -f "$D/rearmed.pid" ] || fail "restore from the template made again"
  ask rearmed "$(cat "$D/rearmed.pid")"
  stop "$(cat "$D/rearmed.pid")"
  /trenv --criu "$CRIU" template rm worker --store "$D/store" || fail "template rm"
  /pmm_test stats | sed "s/^/E2E $kind after rm: /"
  [ "$(templates)" -eq 0 ] && [ "$(backends)" -eq 0 ] || fail "template rm left the module's template or backend"
  echo "E2E $kind reload: the template was made again from the pool, restored, and released by rm"
fi
echo "E2E $kind done"
