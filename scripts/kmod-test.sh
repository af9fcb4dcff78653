#!/usr/bin/env bash
# make kmod-test: builds pseudo-mm-kmod for every installed Debian kernel ABI and tests it in
# a qemu guest of that kernel (software emulation: no KVM here). The guest is a busybox
# initramfs with the module and the static test program; its /init prints the test's
# RESULT line, checks that the module cannot be unloaded while a process maps a template,
# measures fault costs (BENCH line: through the module against a plain private mapping of
# the same pool file), and powers off. A kernel oops, BUG or WARNING fails the run. Bounded: 300 s per guest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK="${KMOD_WORK:-$ROOT/target/kmod-test}"
rm -rf "$WORK"
mkdir -p "$WORK"

bash scripts/setup-kmod.sh
make -s -C pseudo-mm-kmod OUT="$WORK/build" all
gcc -static -O2 -Wall -Wextra -Werror -o "$WORK/pmm_test" pseudo-mm-kmod/tests/pmm_test.c

status=0
for hdr in /usr/src/linux-headers-*-amd64; do
  ver="${hdr#/usr/src/linux-headers-}"
  kernel="/boot/vmlinuz-$ver"
  [ -f "$kernel" ] || { echo "kmod-test: no $kernel for headers $ver" >&2; status=1; continue; }
  echo "kmod-test: kernel $ver"
  init="$WORK/initramfs-$ver"
  mkdir -p "$init"/{bin,dev,proc,sys,tmp}
  cp /bin/busybox "$init/bin/busybox"
  for applet in sh mount insmod rmmod sed sleep kill cat grep dmesg poweroff mkdir echo; do
    ln -sf busybox "$init/bin/$applet"
  done
  cp "$WORK/build/$ver/pseudo_mm.ko" "$WORK/pmm_test" "$init/"
  cat > "$init/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "KERNEL $(cat /proc/sys/kernel/osrelease)"
if insmod /pseudo_mm.ko; then
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
else
  echo "RESULT insmod failed"
fi
dmesg | grep -E "BUG|WARNING|Oops|bad page|pseudo_mm" | sed 's/^/DMESG /'
poweroff -f
INIT
  chmod +x "$init/init"
  (cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/init-$ver.cpio.gz"
  log="$WORK/serial-$ver.log"
  timeout -k 5 300 qemu-system-x86_64 -accel tcg -m 512M -smp 2 -nographic -no-reboot \
    -kernel "$kernel" -initrd "$WORK/init-$ver.cpio.gz" \
    -append "console=ttyS0 panic=-1 panic_on_oops=1 quiet" </dev/null > "$log" 2>&1 || true
  grep -E "^(KERNEL|RESULT|FAIL|UNLOAD|BENCH|DMESG)" "$log" | tr -d '\r' || true
  ok=1
  grep -q "RESULT pass=[0-9]* fail=0" "$log" || ok=0
  grep -q "UNLOAD-WHILE-MAPPED refused" "$log" || ok=0
  grep -q "UNLOAD ok" "$log" || ok=0
  if grep -E "^DMESG" "$log" | grep -v -E "loading out-of-tree|taints kernel|module verification failed" | grep -qE "BUG|WARNING|Oops|bad page"; then ok=0; fi
  if [ "$ok" = 1 ]; then echo "kmod-test: $ver passed"; else echo "kmod-test: $ver FAILED (serial log: $log)"; status=1; fi
done
exit "$status"
