#!/usr/bin/env bash
# After a test run: nothing named trenv may remain mounted, in a cgroup or running.
# Empty parent cgroups the tests used (/trenv-it) are removed first; a non-empty one is a leak.
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
for d in $(find /sys/fs/cgroup -maxdepth 3 -type d \( -name 'trenv-it' -o -name 'trenv-it-pool' \) 2>/dev/null | sort -r); do
  find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  rmdir "$d" 2>/dev/null || true
done
check "trenv mounts" "$(grep -i trenv /proc/self/mountinfo | grep -v '/var/cache/trenv' || true)"
check "trenv cgroups" "$(find /sys/fs/cgroup -maxdepth 4 -type d -iname '*trenv*' 2>/dev/null || true)"
check "trenv test processes" "$(ps -eo pid,args | grep -E 'trenv-it|criu-root|criu swrk' | grep -v -E 'grep|check-leaks' || true)"
check "trenv test state" "$(ls -d /run/trenv-it-* /tmp/trenv-it-* /run/containerd/trenv/trenv-it/* 2>/dev/null || true)"
check "sandbox holders" "$(ps -eo pid,args | grep trenv-sandbox-holder | grep -v grep || true)"
check "CNI address leases" "$(ls /var/lib/cni/networks/trenv 2>/dev/null | grep -v -E '^(lock|last_reserved_ip)' || true)"
check "shim console sockets" "$(ls /run/containerd/trenv/console 2>/dev/null || true)"
echo "leaks: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
