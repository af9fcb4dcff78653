#!/usr/bin/env bash
# Builds a small busybox OCI image offline from Debian's busybox-static.
#   build.sh OUT_DIR   ->  OUT_DIR/rootfs/ (plain rootfs for bundles)
#                          OUT_DIR/busybox-oci.tar (OCI layout, for `ctr images import`)
# Rebuilt only when the busybox binary changes (the digest is kept in OUT_DIR/.source).
set -euo pipefail
OUT="${1:?usage: build.sh OUT_DIR}"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
[ -x "$BUSYBOX" ] || { echo "build.sh: $BUSYBOX missing (apt-get install busybox-static)" >&2; exit 1; }
SOURCE="$(sha256sum "$BUSYBOX" | cut -d' ' -f1)-v1"
# shellcheck source=../image-lib.sh
. "$(dirname "$0")/../image-lib.sh"
image_cached busybox "$OUT" "$SOURCE" busybox-oci.tar && exit 0
echo "building busybox image in $OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

umoci_scratch "$WORK"
R="$WORK/bundle/rootfs"
mkdir -p "$R"/{bin,sbin,etc,tmp,proc,sys,dev,root,var/run,usr/bin,usr/sbin}
chmod 1777 "$R/tmp"
install -m 0755 "$BUSYBOX" "$R/bin/busybox"
"$BUSYBOX" --list-full | while read -r applet; do
  [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$R/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
printf 'hosts: files dns\n' > "$R/etc/nsswitch.conf"
umoci repack --image "$WORK/oci:latest" "$WORK/bundle" >/dev/null
umoci config --image "$WORK/oci:latest" --config.cmd /bin/sh \
  --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin --config.workingdir / >/dev/null

rm -rf "$OUT/rootfs" "$OUT/busybox-oci.tar"
cp -a "$R" "$OUT/rootfs"
tar -C "$WORK/oci" -cf "$OUT/busybox-oci.tar" .
echo "$SOURCE" > "$OUT/.source"
echo "busybox image: $OUT/busybox-oci.tar, rootfs: $OUT/rootfs"
