#!/usr/bin/env bash
# What `make kmod-test` needs beyond `make setup`: qemu (software emulation), a Debian kernel
# with its headers for each tested ABI, and the module checkers. Idempotent.
set -euo pipefail
need=(qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static cpio kmod sparse gzip xz-utils zstd ndctl e2fsprogs
  librdmacm-dev libibverbs-dev ibverbs-providers iproute2)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-kmod: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The second ABI: Debian 12's 6.12 kernel (bookworm-backports), named exactly so that nothing
# else is pulled in; the newest one the archive has.
if ! ls /usr/src/linux-headers-6.12.*-amd64 >/dev/null 2>&1; then
  v612=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | cut -d' ' -f1 |
    sed 's/^linux-image-//' | sort -V | tail -1)
  if [ -z "$v612" ]; then
    apt-get update -qq
    v612=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | cut -d' ' -f1 |
      sed 's/^linux-image-//' | sort -V | tail -1)
  fi
  if [ -n "$v612" ]; then
    echo "setup-kmod: installing kernel $v612"
    apt-get install -y -qq --no-install-recommends "linux-image-$v612" "linux-headers-$v612"
  else
    echo "setup-kmod: no 6.12 kernel in the archive; testing the 6.1 ABI only" >&2
  fi
fi
