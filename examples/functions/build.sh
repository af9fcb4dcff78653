#!/usr/bin/env bash
# Builds the FaaS function suite (in the spirit of FunctionBench/SeBS) offline from Debian packages.
#   build.sh OUT_DIR  ->  OUT_DIR/functions-oci.tar  one OCI image layout holding every function image
#                         OUT_DIR/debootstrap.log
# Each image docker.io/trenv/fn-<name>:latest = ONE shared base layer (debootstrap bookworm minbase +
# python3, python3-jinja2, python3-pil, python3-numpy, python3-networkx, nodejs; no recommends)
# + a small layer with the function's code under /app. Blobs are shared inside the layout.
# Import all of them at once (index.json carries the full names in org.opencontainers.image.ref.name
# and io.containerd.image.name, so no --base-name/--index-name is needed):
#   ctr -n NAMESPACE images import OUT_DIR/functions-oci.tar
# A function is every examples/functions/<name>/ with a handler.py (Python, served by lib/fnserver.py:
# CMD python3 /app/fnserver.py) or a server.js (Node.js: CMD node /app/server.js); an optional
# <name>/env holds extra KEY=VALUE lines for the image config. Each one must be listed in
# examples/functions/functions.toml (the manifest the load generator reads).
# Needs network access to deb.debian.org and takes a few minutes (debootstrap). Rebuilt only when
# this recipe or any file under examples/functions/ changes (the key is kept in OUT_DIR/.source).
set -euo pipefail
OUT="${1:?usage: build.sh OUT_DIR}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
INCLUDE="python3-minimal,python3,python3-jinja2,python3-pil,python3-numpy,python3-networkx,nodejs"
PREFIX="docker.io/trenv/fn-"
PATH_ENV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH=1686355200   # mtime of every file in the function layers (bookworm release day)
for tool in debootstrap umoci jq; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool missing (run \`make setup\` or apt-get install $tool)" >&2; exit 1; }
done

# Functions: directories with a handler.py or server.js; every one must be in the manifest.
FUNCS=()
for d in "$HERE"/*/; do
  f="$(basename "$d")"
  if [ -f "$d/handler.py" ] || [ -f "$d/server.js" ]; then
    grep -q "^image *= *\"$PREFIX$f:latest\"" "$HERE/functions.toml" \
      || { echo "build.sh: function $f is not listed in $HERE/functions.toml" >&2; exit 1; }
    FUNCS+=("$f")
  fi
done
[ "${#FUNCS[@]}" -gt 0 ] || { echo "build.sh: no functions found in $HERE" >&2; exit 1; }

# The manifest is not part of the key: its answers and limits do not change the images.
# Content key: the package set + every file under examples/functions/ (this script included).
SOURCE="bookworm-functions-v1-$( { echo "$INCLUDE"; cd "$HERE" && find . -type f ! -name '*.pyc' ! -name functions.toml -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)"
if [ -f "$OUT/.source" ] && [ "$(cat "$OUT/.source")" = "$SOURCE" ] && [ -f "$OUT/functions-oci.tar" ]; then
  echo "functions image up to date in $OUT"
  exit 0
fi
echo "building functions images (${FUNCS[*]}) in $OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
# debootstrap unmounts its /proc and /sys itself; if interrupted, never recurse into a mount.
cleanup() {
  awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
OCI="$WORK/oci"
START=$SECONDS

# 1. the shared base layer
umoci init --layout "$OCI"
umoci new --image "$OCI:base"
umoci unpack --image "$OCI:base" "$WORK/bundle" >/dev/null
R="$WORK/bundle/rootfs"
echo "[base] debootstrap bookworm (minbase + $INCLUDE) from $MIRROR, log: $OUT/debootstrap.log"
debootstrap --variant=minbase --include="$INCLUDE" bookworm "$R" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
  || { tail -n 30 "$OUT/debootstrap.log" >&2; echo "build.sh: debootstrap failed (log: $OUT/debootstrap.log)" >&2; exit 1; }
echo "[base] trimming rootfs ($(du -sh "$R" | cut -f1), $((SECONDS - START))s)"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/var/log/* "$R"/dev/* \
  "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old
find "$R/usr/share/doc" -type f ! -name copyright -delete
find "$R/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +   # translations
rm -f "$R/etc/hostname" "$R/etc/resolv.conf"   # copied from the build host
install -d "$R/app"
echo "[base] umoci repack ($(du -sh "$R" | cut -f1))"
umoci repack --image "$OCI:base" --history.created_by "debootstrap --variant=minbase --include=$INCLUDE bookworm" \
  "$WORK/bundle" >/dev/null
umoci config --image "$OCI:base" --config.env "$PATH_ENV" --config.workingdir /app >/dev/null

# 2. one small /app layer + config per function
for f in "${FUNCS[@]}"; do
  L="$WORK/layers/$f"
  install -d -m 0755 "$L/app"
  (cd "$HERE/$f" && find . -type f ! -name env ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
    | xargs -0 -I{} install -D -m 0644 {} "$L/app/{}")
  ENV=(--config.env PORT=8080)
  if [ -f "$HERE/$f/handler.py" ]; then
    install -m 0644 "$HERE/lib/fnserver.py" "$L/app/fnserver.py"
    # precompile with the image's own python3 (checked-hash: valid whatever the file mtimes)
    rm -rf "$R/tmp/app" && cp -a "$L/app" "$R/tmp/app"
    chroot "$R" python3 -m compileall -q -d /app --invalidation-mode checked-hash /tmp/app >/dev/null
    rm -rf "$L/app" && mv "$R/tmp/app" "$L/app"
    CMD=(--config.cmd python3 --config.cmd /app/fnserver.py)
    ENV+=(--config.env PYTHONDONTWRITEBYTECODE=1)
  else
    CMD=(--config.cmd node --config.cmd /app/server.js)
  fi
  if [ -f "$HERE/$f/env" ]; then
    while IFS= read -r kv; do [ -n "$kv" ] && ENV+=(--config.env "$kv"); done < <(grep -v '^#' "$HERE/$f/env")
  fi
  find "$L/app" -type d -exec chmod 0755 {} +
  tar --sort=name --numeric-owner --owner=0 --group=0 --mtime="@$EPOCH" -C "$L" -cf "$L.tar" app
  umoci raw add-layer --image "$OCI:base" --tag "fn-$f" --history.created_by "COPY functions/$f /app" "$L.tar"
  umoci config --image "$OCI:fn-$f" "${CMD[@]}" "${ENV[@]}" --config.workingdir /app \
    --config.exposedports 8080/tcp --config.label "org.opencontainers.image.title=fn-$f" >/dev/null
  echo "[fn-$f] /app layer $(du -sk "$L.tar" | cut -f1) KiB uncompressed, cmd: $(printf '%s ' "${CMD[@]}" | sed 's/--config.cmd //g')"
done

# 3. pack: drop the base tag, give every image its full name, one tar
echo "[pack] gc + index + tar"
umoci rm --image "$OCI:base"
umoci gc --layout "$OCI"
jq --arg p "$PREFIX" '.manifests |= map(
    (.annotations["org.opencontainers.image.ref.name"] | ltrimstr("fn-")) as $n
    | .annotations["org.opencontainers.image.ref.name"] = ($p + $n + ":latest")
    | .annotations["io.containerd.image.name"] = ($p + $n + ":latest"))' "$OCI/index.json" > "$WORK/index.json"
mv "$WORK/index.json" "$OCI/index.json"
[ "$(jq '.manifests | length' "$OCI/index.json")" = "${#FUNCS[@]}" ] || { echo "build.sh: index.json lost images" >&2; exit 1; }
rm -f "$OUT/functions-oci.tar"
tar -C "$OCI" -cf "$OUT/functions-oci.tar.tmp" . && mv "$OUT/functions-oci.tar.tmp" "$OUT/functions-oci.tar"
echo "$SOURCE" > "$OUT/.source"
echo "functions images: $OUT/functions-oci.tar ($(du -sh "$OUT/functions-oci.tar" | cut -f1), ${#FUNCS[@]} images, $((SECONDS - START))s)"
jq -r '.manifests[].annotations["org.opencontainers.image.ref.name"]' "$OCI/index.json" | sed 's/^/  /'
