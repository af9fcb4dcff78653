# Shared steps of the offline image builds (sourced by examples/*/build.sh).

# image_cached NAME OUT SOURCE TAR: true (and says so) when OUT holds TAR built from SOURCE.
image_cached() {
  if [ -f "$2/.source" ] && [ "$(cat "$2/.source")" = "$3" ] && [ -f "$2/$4" ]; then
    echo "$1 image up to date in $2"
    return 0
  fi
  return 1
}

# umoci_scratch WORK: an empty single-image OCI layout at WORK/oci:latest, unpacked into
# WORK/bundle (its rootfs is WORK/bundle/rootfs).
umoci_scratch() {
  umoci init --layout "$1/oci"
  umoci new --image "$1/oci:latest"
  umoci unpack --image "$1/oci:latest" "$1/bundle" >/dev/null
}
