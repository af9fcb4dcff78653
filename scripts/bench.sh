#!/usr/bin/env bash
# Runs the trenv vs runc benchmark (`make bench`); arguments go to trenv-bench (e.g. --runs 10).
# Expects release binaries (the Makefile builds them first) and builds them only if missing.
# Writes target/bench/summary.json and docs/benchmarks.md. Needs root, runc and criu.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [ ! -x target/release/trenv ] || [ ! -x target/release/trenv-bench ]; then
  echo "bench: release binaries missing, building them" >&2
  cargo build --release --workspace --bins
fi

export TRENV_BIN=target/release/trenv
target/release/trenv-bench "$@"
# Networked starts through the containerd API: pool hit / miss vs runc.v2 with CNI.
/usr/bin/python3 integration/bench/pool_bench.py
# A Python function from a memory template vs cold start and plain CRIU restore.
/usr/bin/python3 integration/bench/template_bench.py
# Function starts through the containerd API: template-backed vs cold (runc, pool) vs plain CRIU.
/usr/bin/python3 integration/bench/function_bench.py
