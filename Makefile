# trenv — see README.md. All targets run as root.
SHELL := /bin/bash
CACHE ?= /var/cache/trenv
TRENV_BIN := target/release/trenv
export TRENV_CACHE := $(CACHE)
export PATH := /usr/local/sbin:/usr/local/bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup build plugin install-plugin images demo demo-runtime test unit integration lint bench bench-micro leak-check kmod-test clean

all: build

# Idempotent: installs Debian packages, builds CRIU (cached), builds and installs binaries.
setup:
	bash scripts/setup.sh

build:
	cargo build --release --workspace --bins
	$(MAKE) -s plugin

# The CRIU plugin for templates mapped through the pseudo_mm module (criu-plugin/README.md).
plugin:
	cargo build --release -p trenv-criu-plugin

# Where CRIU loads plugins from by default; needed for `trenv template build --kmod` templates.
install-plugin: plugin
	install -D -m 0644 target/release/libtrenv_criu_plugin.so /usr/lib/criu/libtrenv_criu_plugin.so

images:
	bash examples/busybox/build.sh $(CACHE)/images/busybox
	bash examples/pause/build.sh $(CACHE)/images/pause
	bash examples/python/build.sh $(CACHE)/images/python
	bash examples/python/build.sh $(CACHE)/images/python-node nodejs
	bash examples/functions/build.sh $(CACHE)/images/functions

# The main job: functions under a bursty workload, runc vs trenv, side by side.
demo: setup images build
	bash examples/demo.sh

# The runtime on its own: a container through containerd with trenv, checkpoint and restore.
demo-runtime: setup images
	bash examples/runtime-demo.sh

unit:
	cargo test --release --workspace --exclude trenv-integration

integration: build images
	TRENV_BIN=$(TRENV_BIN) cargo test --release -p trenv-integration -- --test-threads=2

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

leak-check:
	bash scripts/check-leaks.sh

test: setup images
	$(MAKE) unit
	$(MAKE) integration
	$(MAKE) leak-check

# The function suite under W1, W2 and an Azure-like trace in all four modes (about 20 min),
# then pod starts through CRI (runc, trenv, trenv with templates; about 5 min); regenerates
# docs/benchmarks.md. BENCH_ARGS adds trenv-bench flags.
bench: setup images build
	target/release/trenv-bench --modes runc,criu,trenv-pool,trenv --workloads w1,w2,azure \
	  --duration-secs 60 --docs docs/benchmarks.md $(BENCH_ARGS)
	target/release/trenv-podbench --pods 100 --docs docs/benchmarks.md

# Micro-benchmarks of single starts and restores (docs/benchmarks-micro.md). The heavy-import
# function of the template benchmark has an image of its own.
bench-micro: setup images build
	bash examples/python/build.sh $(CACHE)/images/python-numpy python3-numpy
	bash scripts/bench-micro.sh

# The pseudo_mm kernel module: built for each Debian kernel ABI (6.1, 6.12) and tested in a qemu
# guest of that kernel (software emulation, about 1 min a kernel: the module's tests, device
# DAX and fsdax on emulated NVDIMMs, and a CRIU dump/template/restore through the plugin),
# checked with sparse.
kmod-test:
	bash scripts/kmod-test.sh
	$(MAKE) -s -C pseudo-mm-kmod check OUT=$(CURDIR)/target/kmod-check

clean:
	cargo clean
