#!/usr/bin/env bash
# make kmod-test: builds pseudo-mm-kmod for every installed Debian kernel ABI and tests it in
# a qemu guest of that kernel (software emulation: no KVM here). The guest is a busybox
# initramfs with the module and the static test program; its /init prints the test's
# RESULT line, checks that the module cannot be unloaded while a process maps a template,
# measures fault costs (BENCH line: through the module against a plain private mapping of
# the same pool file), then runs the DAX backend's tests on two emulated NVDIMMs (qemu
# nvdimm): one made a device-DAX device (/dev/dax0.0) and one an ext4 file system mounted
# with -o dax; then an end-to-end restore from a template (pseudo-mm-kmod/tests/restore-e2e.sh:
# CRIU, the trenv binary and the CRIU plugin in the guest) with a tmpfs pool and with a pool
# on the fsdax file system; then the RDMA backend against pmm-memserver over Soft-RoCE (rxe
# on the guest's virtio NIC), killing the server in the middle of a process's faults; and
# powers off. A kernel oops, BUG or WARNING fails the run. Bounded: 300 s
# per guest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK="${KMOD_WORK:-$ROOT/target/kmod-test}"
rm -rf "$WORK"
mkdir -p "$WORK"

bash scripts/setup-kmod.sh
make -s -C pseudo-mm-kmod OUT="$WORK/build" all
gcc -static -O2 -Wall -Wextra -Werror -o "$WORK/pmm_test" pseudo-mm-kmod/tests/pmm_test.c
make -s -C pseudo-mm-kmod OUT="$WORK" memserver
# The guest runs the real trenv binary and CRIU plugin (and the CRIU that make setup installs).
cargo build -q --release -p trenv --bin trenv && cargo build -q --release -p trenv-criu-plugin
CRIU=/usr/local/sbin/criu
[ -x "$CRIU" ] || { echo "kmod-test: no $CRIU (run make setup)" >&2; exit 1; }

# Copies a dynamically linked program into the initramfs with the libraries it loads.
copy_program() {
  local root=$1 prog=$2 lib
  mkdir -p "$root$(dirname "$prog")"
  cp -L "$prog" "$root$prog"
  for lib in $(ldd "$prog" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# Copies modules and what they depend on, decompressed, for kernel $ver.
copy_modules() {
  local root=$1 ver=$2 m ko dst deps
  shift 2
  for m in "$@"; do
    # A module the guest needs and the kernel lacks fails here, not as a puzzle in the guest
    # (built-in ones print "builtin" and are skipped).
    deps=$(modprobe -C /dev/null -S "$ver" --show-depends "$m") ||
      { echo "kmod-test: $ver has no module $m" >&2; exit 1; }
    for ko in $(echo "$deps" | awk '$1 == "insmod" {print $2}'); do
      dst="$root/modules/$(basename "${ko%.xz}")"
      dst="${dst%.zst}"
      [ -f "$dst" ] && continue
      case "$ko" in
        *.xz) xz -dc "$ko" > "$dst" ;;
        *.zst) zstd -qdc "$ko" > "$dst" ;;
        *) cp "$ko" "$dst" ;;
      esac
      echo "$(basename "$dst")" >> "$root/modules/order"
    done
  done
}

status=0
# KMOD_KERNELS=6.1.0-57 (a glob) tests one kernel only; KMOD_TESTS="rdma" (a subset of
# base dax rdma) runs only those parts.
TESTS="${KMOD_TESTS:-base dax rdma}"
want() { [[ " $TESTS " == *" $1 "* ]]; }
for hdr in /usr/src/linux-headers-${KMOD_KERNELS:-*}-amd64; do
  ver="${hdr#/usr/src/linux-headers-}"
  kernel="/boot/vmlinuz-$ver"
  [ -f "$kernel" ] || { echo "kmod-test: no $kernel for headers $ver" >&2; status=1; continue; }
  echo "kmod-test: kernel $ver"
  init="$WORK/initramfs-$ver"
  mkdir -p "$init"/{bin,dev,proc,sys,tmp}
  cp /bin/busybox "$init/bin/busybox"
  for applet in sh mount umount insmod rmmod sed sleep kill cat grep dmesg poweroff mkdir echo ls head rm touch tail ifconfig setsid; do
    ln -sf busybox "$init/bin/$applet"
  done
  cp "$WORK/build/$ver/pseudo_mm.ko" "$WORK/pmm_test" "$init/"
  mkdir -p "$init/modules"
  copy_modules "$init" "$ver" nfit nd_pmem dax_pmem device_dax ext4 \
    nf_tables veth tun unix_diag inet_diag tcp_diag udp_diag netlink_diag af_packet_diag \
    rdma_cm virtio_pci virtio_net crc32_generic rdma_rxe rdma_ucm
  copy_program "$init" /usr/bin/ndctl
  copy_program "$init" /usr/sbin/mke2fs
  copy_program "$init" "$CRIU"
  strip -o "$init/trenv" target/release/trenv
  copy_program "$init" /lib/x86_64-linux-gnu/libgcc_s.so.1
  for lib in $(ldd target/release/trenv | grep -o '/[^ ]*'); do copy_program "$init" "$lib"; done
  mkdir -p "$init/plugins" "$init/run" "$init/var/lib"
  cp target/release/libtrenv_criu_plugin.so "$init/plugins/"
  cp pseudo-mm-kmod/tests/restore-e2e.sh "$init/restore-e2e.sh"
  # Soft-RoCE: the rdma tool, the memory server, and libibverbs' rxe provider.
  copy_program "$init" /usr/bin/rdma
  cp "$WORK/pmm-memserver" "$init/pmm-memserver"
  for lib in $(ldd "$WORK/pmm-memserver" | grep -o '/[^ ]*'); do copy_program "$init" "$lib"; done
  copy_program "$init" /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
  mkdir -p "$init/etc/libibverbs.d"
  cp /etc/libibverbs.d/rxe.driver "$init/etc/libibverbs.d/"
  cat > "$init/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "KERNEL $(cat /proc/sys/kernel/osrelease)"
# The module links against the RDMA core (rdma_cm, ib_core): everything is loaded first.
for m in $(cat /modules/order); do insmod "/modules/$m"; done
want() { grep -qw "$1" /tests; }
if ! insmod /pseudo_mm.ko; then
  echo "RESULT insmod failed"
fi
if want base; then
  /pmm_test > /tmp/out 2>&1
  cat /tmp/out
  tpl=$(sed -n 's/^TEMPLATE //p' /tmp/out)
  /pmm_test hold "$tpl" > /tmp/hold 2>&1 &
  holder=$!
  sleep 2
  if rmmod pseudo_mm 2>/dev/null; then echo "UNLOAD-WHILE-MAPPED allowed"; else echo "UNLOAD-WHILE-MAPPED refused"; fi
  kill "$holder"
  wait "$holder"
  if rmmod pseudo_mm; then echo "UNLOAD ok"; else echo "UNLOAD failed"; fi
  insmod /pseudo_mm.ko && /pmm_test bench
fi
if want dax; then
  # DAX: two emulated NVDIMMs, one device DAX, one ext4 with -o dax.
  sleep 1
  /usr/bin/ndctl create-namespace -f -e namespace0.0 -m devdax -a 4K >/dev/null
  /usr/bin/ndctl create-namespace -f -e namespace1.0 -m fsdax >/dev/null
  dax=$(ls -d /sys/bus/dax/devices/dax* | head -1)
  if [ -n "$dax" ]; then
    /pmm_test dax "/dev/${dax##*/}" $(( $(cat "$dax/size") / 4096 ))
  else
    echo "RESULT no device DAX"
  fi
  pmem=$(ls /dev/pmem* | head -1)
  mkdir -p /mnt/dax
  if [ -n "$pmem" ] && /usr/sbin/mke2fs -q -t ext4 -b 4096 -F "$pmem" && mount -t ext4 -o dax "$pmem" /mnt/dax; then
    /pmm_test dax /mnt/dax/pool
  else
    echo "RESULT no fsdax file system"
  fi
  # End to end: dump, template, restore through the plugin; DRAM pool, then the fsdax one.
  # CRIU's kernel-feature probes need a loopback and the modules loaded above.
  ifconfig lo 127.0.0.1 up
  /pmm_test reap /restore-e2e.sh tmpfs /pools/tmpfs
  /pmm_test reap /restore-e2e.sh daxfs /mnt/dax/pool-e2e
  umount /mnt/dax
fi
if want rdma; then
  # RDMA: Soft-RoCE on the virtio NIC; server and client in this guest (rxe loops back).
  ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up
  if /usr/bin/rdma link add rxe0 type rxe netdev eth0; then
    /pmm_test fill /rdma-pool 4096
    /pmm-memserver -p 7471 /rdma-pool > /tmp/memserver.log 2>&1 &
    srv=$!
    i=0; while ! grep -q LISTENING /tmp/memserver.log && [ "$i" -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    cat /tmp/memserver.log
    /pmm_test rdma 10.0.2.15 7471 "$srv"
    kill -9 "$srv" 2>/dev/null
    sed 's/^/RDMA server: /' /tmp/memserver.log
  else
    echo "RESULT no Soft-RoCE"
  fi
fi
dmesg | grep -E "BUG|WARNING|Oops|bad page|pseudo_mm" | sed 's/^/DMESG /'
poweroff -f
INIT
  chmod +x "$init/init"
  echo "$TESTS" > "$init/tests"
  (cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/init-$ver.cpio.gz"
  log="$WORK/serial-$ver.log"
  for nv in 0 1; do truncate -s 128M "$WORK/nvdimm$nv-$ver.img"; done
  timeout -k 5 300 qemu-system-x86_64 -accel tcg -smp 2 -nographic -no-reboot \
    -machine pc,nvdimm=on -m 768M,slots=2,maxmem=2G \
    -object "memory-backend-file,id=mem0,share=on,mem-path=$WORK/nvdimm0-$ver.img,size=128M" \
    -device nvdimm,id=nv0,memdev=mem0 \
    -object "memory-backend-file,id=mem1,share=on,mem-path=$WORK/nvdimm1-$ver.img,size=128M" \
    -device nvdimm,id=nv1,memdev=mem1 \
    -nic user,model=virtio-net-pci \
    -kernel "$kernel" -initrd "$WORK/init-$ver.cpio.gz" \
    -append "console=ttyS0 panic=-1 panic_on_oops=1 quiet" </dev/null > "$log" 2>&1 || true
  grep -E "^(KERNEL|RESULT|FAIL|UNLOAD|BENCH|DMESG|E2E|RDMA|LISTENING|CONNECTED)" "$log" | tr -d '\r' || true
  ok=1
  # One test run for the page-cache backend, two for DAX (device, fsdax), one for RDMA.
  expect=0
  if want base; then
    expect=$((expect + 1))
    grep -q "UNLOAD-WHILE-MAPPED refused" "$log" || ok=0
    grep -q "UNLOAD ok" "$log" || ok=0
  fi
  if want dax; then
    expect=$((expect + 2))
    grep -q "E2E tmpfs done" "$log" || ok=0
    grep -q "E2E daxfs done" "$log" || ok=0
  fi
  want rdma && expect=$((expect + 1))
  [ "$(grep -c "RESULT pass=[0-9]* fail=0" "$log")" = "$expect" ] || ok=0
  grep -q "E2E FAIL" "$log" && ok=0
  if grep -E "^DMESG" "$log" | grep -v -E "loading out-of-tree|taints kernel|module verification failed" | grep -qE "BUG|WARNING|Oops|bad page"; then ok=0; fi
  if [ "$ok" = 1 ]; then echo "kmod-test: $ver passed"; else echo "kmod-test: $ver FAILED (serial log: $log)"; status=1; fi
done
# Fault costs and restore times, as a Markdown section (KMOD_DOCS=docs/benchmarks.md puts it
# there).
python3 scripts/kmod-results.py "$WORK" > "$WORK/results.md" || status=1
if [ -n "${KMOD_DOCS:-}" ] && [ "$status" = 0 ]; then python3 scripts/kmod-results.py "$WORK" "$KMOD_DOCS"; fi
exit "$status"
