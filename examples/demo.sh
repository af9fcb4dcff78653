#!/usr/bin/env bash
# trenv demo (`make demo`): three FaaS functions under a bursty W1-like workload, served once
# by runc (containerd's runc shim, cold starts + keep-alive) and once by trenv (sandbox pool +
# memory templates), side by side. Expects `make setup images build` (the Makefile runs them).
#   DEMO_SECONDS   length of each workload run (default 75)
#   DEMO_FUNCTIONS functions from examples/functions/functions.toml (default hello,json,matrix)
#   DEMO_OUT       where results go (default target/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CACHE="${TRENV_CACHE:-/var/cache/trenv}"
SECONDS_PER_RUN="${DEMO_SECONDS:-75}"
FUNCTIONS="${DEMO_FUNCTIONS:-hello,json,matrix}"
OUT="${DEMO_OUT:-target/demo}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ -x target/release/trenv-bench ] || { echo "demo: target/release/trenv-bench missing; run 'make build'" >&2; exit 1; }
[ -f "$CACHE/images/functions/functions-oci.tar" ] || { echo "demo: function images missing; run 'make images'" >&2; exit 1; }

say "trenv demo: functions $FUNCTIONS, a W1-like bursty workload of ${SECONDS_PER_RUN} s, runc vs trenv"
cat <<TEXT
Each mode gets a private containerd. A small FaaS controller (trenv-bench) talks to it over
its gRPC API: a new instance per request when none of that function is idle, reuse of an idle
one otherwise, idle instances removed after 30 s.
  runc   io.containerd.runc.v2 + CNI: every new instance is a cold start.
  trenv  io.containerd.trenv.v2: instances are restored from each function's memory template
         (taken once, before the run) into pooled sandboxes, sharing its memory.
TEXT
say "running (a progress line per mode; the trenv mode first prepares the templates)"
target/release/trenv-bench \
  --modes runc,trenv --workloads w1 --functions "$FUNCTIONS" \
  --duration-secs "$SECONDS_PER_RUN" --concurrency 4 --cycles 4 \
  --out "$OUT" --fail-on-errors | tee "$OUT.txt"
say "done: summary $OUT/summary.json, raw samples $OUT/invocations.jsonl, plots in $OUT/plots/"
