#!/usr/bin/env bash
# The micro-benchmarks (`make bench-micro`): the runtime CLI and shim against runc, networked
# starts with the sandbox pool, template restores and single function starts. Arguments go to
# trenv-microbench (e.g. --runs 10). Writes target/bench/micro-summary.json and
# docs/benchmarks-micro.md. Needs root, runc and criu.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [ ! -x target/release/trenv ] || [ ! -x target/release/trenv-microbench ]; then
  echo "bench: release binaries missing, building them" >&2
  cargo build --release --workspace --bins
fi

export TRENV_BIN=target/release/trenv
target/release/trenv-microbench "$@"
# Networked starts through the containerd API: pool hit / miss vs runc.v2 with CNI.
/usr/bin/python3 integration/bench/pool_bench.py
# A Python function from a memory template vs cold start and plain CRIU restore.
/usr/bin/python3 integration/bench/template_bench.py
# Function starts through the containerd API: template-backed vs cold (runc, pool) vs plain CRIU.
/usr/bin/python3 integration/bench/function_bench.py
