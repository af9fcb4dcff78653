#!/usr/bin/env bash
# Builds a minimal Debian bookworm + python3 OCI image with a tiny HTTP function.
#   build.sh OUT_DIR [PACKAGE...]
#                      ->  OUT_DIR/rootfs/ (plain rootfs for bundles)
#                          OUT_DIR/python-oci.tar (OCI layout, for `ctr images import`)
# Extra Debian packages (e.g. python3-numpy for the heavy-import benchmark) go into the image.
# Needs network access to deb.debian.org and takes a few minutes (debootstrap).
# Rebuilt only when this recipe or server.py changes (the key is kept in OUT_DIR/.source).
set -euo pipefail
OUT="${1:?usage: build.sh OUT_DIR [PACKAGE...]}"
shift
EXTRA=("$@")
INCLUDE="python3-minimal,python3"
FLAVOUR="python3"
if [ "${#EXTRA[@]}" -gt 0 ]; then
  INCLUDE="$INCLUDE$(printf ',%s' "${EXTRA[@]}")"
  FLAVOUR="$FLAVOUR$(printf '+%s' "${EXTRA[@]}")"
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
command -v debootstrap >/dev/null || { echo "build.sh: debootstrap missing (run \`make setup\` or apt-get install debootstrap)" >&2; exit 1; }

# /app/server.py: answers GET / with "hello from <hostname>", no per-request logging.
SERVER_PY="$(cat <<'EOF'
import os, socket
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from %s\n" % socket.gethostname()).encode() if self.path == "/" else b"not found\n"
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass

port = int(os.environ.get("PORT", "8080"))
print("listening on 0.0.0.0:%d" % port, flush=True)
HTTPServer(("0.0.0.0", port), Handler).serve_forever()
EOF
)"
SOURCE="bookworm-$FLAVOUR-v1-$(printf '%s\n' "$SERVER_PY" | sha256sum | cut -d' ' -f1)"
if [ -f "$OUT/.source" ] && [ "$(cat "$OUT/.source")" = "$SOURCE" ] && [ -f "$OUT/python-oci.tar" ]; then
  echo "python image up to date in $OUT"
  exit 0
fi
echo "building python image in $OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
# debootstrap unmounts its /proc and /sys itself; if interrupted, never recurse into a mount.
cleanup() {
  awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:latest"
umoci unpack --image "$WORK/oci:latest" "$WORK/bundle" >/dev/null
R="$WORK/bundle/rootfs"
echo "debootstrap bookworm (minbase + $INCLUDE) from $MIRROR, log: $OUT/debootstrap.log"
debootstrap --variant=minbase --include="$INCLUDE" bookworm "$R" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
  || { tail -n 30 "$OUT/debootstrap.log" >&2; echo "build.sh: debootstrap failed (log: $OUT/debootstrap.log)" >&2; exit 1; }
echo "trimming rootfs ($(du -sh "$R" | cut -f1))"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/var/log/* "$R"/dev/* \
  "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old
find "$R/usr/share/doc" -type f ! -name copyright -delete
find "$R/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +   # translations
rm -f "$R/etc/hostname" "$R/etc/resolv.conf"   # copied from the build host
install -d "$R/app"
printf '%s\n' "$SERVER_PY" > "$R/app/server.py"
echo "umoci repack ($(du -sh "$R" | cut -f1))"
umoci repack --image "$WORK/oci:latest" "$WORK/bundle" >/dev/null
umoci config --image "$WORK/oci:latest" --config.cmd python3 --config.cmd /app/server.py \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --config.workingdir / >/dev/null

rm -rf "$OUT/rootfs" "$OUT/python-oci.tar"
cp -a "$R" "$OUT/rootfs"
tar -C "$WORK/oci" -cf "$OUT/python-oci.tar" .
echo "$SOURCE" > "$OUT/.source"
echo "python image: $OUT/python-oci.tar, rootfs: $OUT/rootfs"
