#!/usr/bin/env bash
# After a test run: nothing named trenv may remain mounted, in a cgroup or running.
# Every cgroup below the parents the tests share (/trenv-it, /trenv-it-pool) is a leak,
# empty or not: it is counted before anything is removed. The shared parents themselves are
# removed afterwards when empty, so the next run starts clean.
set -u
fail=0
pass=0
check() { # name, findings
  if [ -n "$2" ]; then
    echo "LEAK: $1:"; echo "$2" | sed 's/^/    /'; fail=$((fail+1))
  else
    echo "ok: no $1"; pass=$((pass+1))
  fi
}
parents=$(find /sys/fs/cgroup -maxdepth 2 -type d \( -name 'trenv-it' -o -name 'trenv-it-pool' \) 2>/dev/null | sort)
below=""
for d in $parents; do
  below+="$(find "$d" -mindepth 1 -type d 2>/dev/null)"$'\n'
done
others=$(find /sys/fs/cgroup -maxdepth 4 -type d -iname '*trenv*' 2>/dev/null | while read -r d; do
  skip=0
  for p in $parents; do case "$d/" in "$p"/*) skip=1 ;; esac; done
  [ "$skip" = 0 ] && echo "$d"
done)
check "trenv mounts" "$(grep -i trenv /proc/self/mountinfo | grep -v '/var/cache/trenv' || true)"
check "trenv cgroups" "$(printf '%s\n%s\n' "$below" "$others" | sed '/^$/d' | sort -u)"
check "trenv test processes" "$(ps -eo pid,args | grep -E 'trenv-it|criu-root|criu swrk' | grep -v -E 'grep|check-leaks' || true)"
check "trenv test state" "$(ls -d /run/trenv-it-* /tmp/trenv-it-* /run/containerd/trenv/trenv-it/* 2>/dev/null || true)"
check "sandbox holders" "$(ps -eo pid,args | grep trenv-sandbox-holder | grep -v grep || true)"
check "trenv zygotes" "$(ps -eo pid,args | grep trenv-zygote | grep -v grep || true)"
check "CNI address leases" "$(ls /var/lib/cni/networks/trenv 2>/dev/null | grep -v -E '^(lock|last_reserved_ip)' || true)"
check "CNI address leases of test pods" "$(ls /var/lib/cni/networks/trenv-it-pods 2>/dev/null | grep -v -E '^(lock|last_reserved_ip)' || true)"
check "pod network namespaces" "$(ls /var/run/netns 2>/dev/null | grep '^cni-' || true)"
check "shim console sockets" "$(ls /run/containerd/trenv/console 2>/dev/null || true)"
for d in $parents; do rmdir "$d" 2>/dev/null || true; done
echo "leaks: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
