#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image offline: one static binary, /pause, as entrypoint,
# no shell and no PATH, like the pause images kubelet uses.
#   build.sh OUT_DIR   ->  OUT_DIR/pause-oci.tar (OCI layout, for `ctr images import`)
# Rebuilt only when pause.c or this script changes.
set -euo pipefail
OUT="${1:?usage: build.sh OUT_DIR}"
HERE="$(cd "$(dirname "$0")" && pwd)"
SOURCE="$(cat "$HERE/pause.c" "$HERE/build.sh" | sha256sum | cut -d' ' -f1)"
# shellcheck source=../image-lib.sh
. "$(dirname "$0")/../image-lib.sh"
image_cached pause "$OUT" "$SOURCE" pause-oci.tar && exit 0
echo "building pause image in $OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

umoci_scratch "$WORK"
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
