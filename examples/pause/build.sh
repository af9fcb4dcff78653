#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image offline: one static binary, /pause, as entrypoint,
# no shell and no PATH, like the pause images kubelet uses.
#   build.sh OUT_DIR   ->  OUT_DIR/pause-oci.tar (OCI layout, for `ctr images import`)
# Rebuilt only when pause.c or this script changes.
set -euo pipefail
OUT="${1:?usage: build.sh OUT_DIR}"
HERE="$(cd "$(dirname "$0")" && pwd)"
SOURCE="$(cat "$HERE/pause.c" "$HERE/build.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$OUT/.source" ] && [ "$(cat "$OUT/.source")" = "$SOURCE" ] && [ -f "$OUT/pause-oci.tar" ]; then
  echo "pause image up to date in $OUT"
  exit 0
fi
echo "building pause image in $OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:latest"
umoci unpack --image "$WORK/oci:latest" "$WORK/bundle" >/dev/null
R="$WORK/bundle/rootfs"
gcc -static -Os -s -Wall -Werror -o "$R/pause" "$HERE/pause.c"
"$R/pause" -v
umoci repack --image "$WORK/oci:latest" "$WORK/bundle" >/dev/null
# umoci new sets a default PATH; a pause image has none.
umoci config --image "$WORK/oci:latest" --clear=config.env --config.entrypoint /pause \
  --config.user 65535:65535 >/dev/null

rm -f "$OUT/pause-oci.tar"
tar -C "$WORK/oci" -cf "$OUT/pause-oci.tar" .
echo "$SOURCE" > "$OUT/.source"
echo "pause image: $OUT/pause-oci.tar"
