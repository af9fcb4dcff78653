#!/usr/bin/env bash
# Idempotent system setup for trenv on Debian 12 (run as root).
# Installs Debian packages, builds CRIU from the Debian source tarball (cached under
# /var/cache/trenv keyed by version), builds the Rust workspace and installs the binaries.
set -euo pipefail

CRIU_VERSION="${CRIU_VERSION:-4.2.1}"
CACHE="${TRENV_CACHE:-/var/cache/trenv}"
PREFIX="${PREFIX:-/usr/local}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STAMP_DIR="$CACHE/stamps"

step() { printf '\n==> [setup] %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$CACHE" "$STAMP_DIR"

APT_PACKAGES=(
  # container stack
  containerd runc umoci busybox-static debootstrap containernetworking-plugins iproute2 iptables
  # runtime build deps
  build-essential pkg-config libseccomp-dev libclang-dev protobuf-compiler
  # CRIU build deps
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev python3-protobuf libnl-3-dev
  libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev
  # tests and tooling; the benchmark's containerd API client (python3-grpcio)
  jq xz-utils curl psmisc procps util-linux python3-grpcio
  # benchmark charts (PNG + SVG): matplotlib for the micro-benchmarks, the DejaVu font for
  # trenv-bench's plots; summary.json's schema check in the tests
  python3-matplotlib fonts-dejavu-core python3-jsonschema
)

missing_packages() {
  local p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

step "Debian packages"
mapfile -t MISSING < <(missing_packages)
if [ "${#MISSING[@]}" -gt 0 ]; then
  echo "installing: ${MISSING[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}"
else
  echo "all ${#APT_PACKAGES[@]} packages present"
fi

step "CRIU $CRIU_VERSION"
# The build is cached under $CACHE/criu-<version>: the binary, and the image message
# definitions (images/*.proto) that the trenv-criu crate's build script compiles.
CRIU_DIR="$CACHE/criu-$CRIU_VERSION"
CRIU_BIN="$CRIU_DIR/criu"
# CRIU caches what it detects about the kernel (~40 ms per call here) in RUNDIR/criu.kdat, but
# only on tmpfs; /run is not tmpfs on every host (it is not on these VMs), so the cache lives
# in a root-only directory on /dev/shm, which trenv creates before calling CRIU
# (runtime/criu/src/kdat.rs). A build with other flags is rebuilt.
CRIU_RUNDIR=/dev/shm/trenv-criu
CRIU_FLAGS="RUNDIR=$CRIU_RUNDIR"
criu_ok() {
  command -v criu >/dev/null 2>&1 && [ "$(criu --version 2>/dev/null | awk '/^Version:/{print $2}')" = "$CRIU_VERSION" ]
}
if [ ! -x "$CRIU_BIN" ] || ! ls "$CRIU_DIR"/images/*.proto >/dev/null 2>&1 ||
   [ "$(cat "$CRIU_DIR/build-flags" 2>/dev/null)" != "$CRIU_FLAGS" ]; then
  # 4.2.x is in sid only; its source builds with bookworm's build deps.
  SRC_LIST=/etc/apt/sources.list.d/trenv-sid-src.list
  if [ ! -f "$SRC_LIST" ]; then
    echo "deb-src http://deb.debian.org/debian sid main" > "$SRC_LIST"
    apt-get update -q
  fi
  BUILD="$CACHE/criu-build"
  rm -rf "$BUILD"; mkdir -p "$BUILD"
  echo "downloading criu $CRIU_VERSION source from Debian"
  ( cd "$BUILD" && apt-get source --download-only "criu=$CRIU_VERSION-1" ) || true
  TARBALL="$(ls "$BUILD"/criu_"$CRIU_VERSION".orig.tar.* 2>/dev/null | head -n1 || true)"
  [ -n "$TARBALL" ] || die "could not download criu_$CRIU_VERSION.orig tarball from Debian sid sources"
  tar -C "$BUILD" -xf "$TARBALL"
  SRC="$(find "$BUILD" -maxdepth 1 -mindepth 1 -type d -name 'criu*' | head -n1)"
  echo "building CRIU in $SRC (about 1-2 minutes on 2 cores; log: $BUILD/build.log)"
  make -C "$SRC" -j"$(nproc)" "$CRIU_FLAGS" criu >"$BUILD/build.log" 2>&1 || { tail -n 30 "$BUILD/build.log"; die "CRIU build failed (log: $BUILD/build.log)"; }
  rm -rf "$CRIU_DIR.tmp"; mkdir -p "$CRIU_DIR.tmp/images"
  install -m 0755 "$SRC/criu/criu" "$CRIU_DIR.tmp/criu"
  cp "$SRC"/images/*.proto "$CRIU_DIR.tmp/images/"
  echo "$CRIU_FLAGS" > "$CRIU_DIR.tmp/build-flags"
  rm -rf "$CRIU_DIR"; mv "$CRIU_DIR.tmp" "$CRIU_DIR"
  rm -rf "$BUILD"
else
  echo "using cached build $CRIU_BIN"
fi
if criu_ok && cmp -s "$(command -v criu)" "$CRIU_BIN"; then
  echo "criu $CRIU_VERSION already installed at $(command -v criu)"
else
  install -m 0755 "$CRIU_BIN" "$PREFIX/sbin/criu"
  echo "installed criu $CRIU_VERSION at $PREFIX/sbin/criu"
fi
install -d -m 0700 "$CRIU_RUNDIR"
if ! criu check >/tmp/trenv-criu-check.log 2>&1; then
  cat /tmp/trenv-criu-check.log >&2
  die "'criu check' failed: CRIU cannot checkpoint/restore on this kernel"
fi
echo "criu check: $(tail -n1 /tmp/trenv-criu-check.log)"

# containerd's gRPC API bindings for the benchmark client (integration/bench), from PyPI.
CONTAINERD_PY_VERSION=1.5.3
CONTAINERD_PY="$CACHE/python/containerd-$CONTAINERD_PY_VERSION"
step "containerd API for Python $CONTAINERD_PY_VERSION"
if [ -f "$CONTAINERD_PY/containerd/__init__.py" ]; then
  echo "present in $CONTAINERD_PY"
else
  rm -rf "$CONTAINERD_PY.tmp"
  /usr/bin/python3 -m pip install -q --no-deps --break-system-packages \
    --target "$CONTAINERD_PY.tmp" "containerd==$CONTAINERD_PY_VERSION"
  mv "$CONTAINERD_PY.tmp" "$CONTAINERD_PY"
  echo "installed in $CONTAINERD_PY"
fi

if [ "${TRENV_SETUP_SYSTEM_ONLY:-0}" = 1 ]; then step "done (system only)"; exit 0; fi

step "Rust workspace (release build)"
cd "$ROOT"
cargo build --release --workspace --bins

step "install binaries to $PREFIX/bin"
for b in trenv containerd-shim-trenv-v2; do
  install -m 0755 "target/release/$b" "$PREFIX/bin/$b"
  echo "installed $PREFIX/bin/$b"
done

step "done"
