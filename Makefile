# trenv — see README.md. All targets run as root.
SHELL := /bin/bash
CACHE ?= /var/cache/trenv
TRENV_BIN := target/release/trenv
export TRENV_CACHE := $(CACHE)
export PATH := /usr/local/sbin:/usr/local/bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup build images demo test unit integration lint bench leak-check clean

all: build

# Idempotent: installs Debian packages, builds CRIU (cached), builds and installs binaries.
setup:
	bash scripts/setup.sh

build:
	cargo build --release --workspace --bins

images:
	bash examples/busybox/build.sh $(CACHE)/images/busybox
	bash examples/python/build.sh $(CACHE)/images/python
	bash examples/python/build.sh $(CACHE)/images/python-node nodejs

demo: setup images
	bash examples/demo.sh

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

# The heavy-import function of the template benchmark has an image of its own.
bench: setup images build
	bash examples/python/build.sh $(CACHE)/images/python-numpy python3-numpy
	bash scripts/bench.sh

clean:
	cargo clean
