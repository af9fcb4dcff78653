#!/usr/bin/python3
"""`make bench`, part 2: networked container starts through containerd's API.

Starts private containerd instances and, with pool_start.py as the API client, measures
  pool hit   trenv, warm pool (min_idle 4): a purged sandbox with its network is reused
  pool miss  trenv, no idle sandboxes (min_idle 0, max_idle 0): holder + cgroup + CNI per start
  runc+CNI   io.containerd.runc.v2 with a netns attached by the same CNI plugins
  pool hit while checkpointing
             pool hits while another task of the same shim is checkpointed over and over,
             each checkpoint taking over 2 s (CRIU behind a 2 s delay): independent tasks
             must not wait for each other (goal: P99 within 2x of plain pool hits)
in the same run, and appends the results to docs/benchmarks-micro.md and target/bench/pool.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CACHE = os.environ.get("TRENV_CACHE", "/var/cache/trenv")
PYLIB = os.path.join(CACHE, "python", "containerd-1.5.3")
NS = "trenv-bench"
GOAL = 3.0
# Starts during another task's checkpoint: at most this times the plain P99.
CONCURRENCY_GOAL = 2.0
BASE_CASES = ("pool-hit", "pool-miss", "runc-cni")


def start_containerd(d, pool_toml, top_toml=""):
    with open(os.path.join(d, "config.toml"), "w") as f:
        f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{d}/c.sock"\n[ttrpc]\n  address = "{d}/c.sock.ttrpc"\n')
    with open(os.path.join(d, "shim.toml"), "w") as f:
        f.write(f'{top_toml}[pool]\nstate_dir = "{d}/pool"\ncgroup_parent = "/trenv-bench"\n{pool_toml}\n')
    env = dict(os.environ, TRENV_SHIM_CONFIG=os.path.join(d, "shim.toml"),
               PATH=f"{ROOT}/target/release:/usr/local/sbin:/usr/local/bin:{os.environ['PATH']}")
    log = open(os.path.join(d, "containerd.log"), "w")
    p = subprocess.Popen(["containerd", "--config", os.path.join(d, "config.toml")],
                         env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    ctr = ["ctr", "--address", f"{d}/c.sock", "--namespace", NS]
    for _ in range(200):
        if subprocess.run(ctr + ["version"], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    tar = os.path.join(CACHE, "images", "busybox", "busybox-oci.tar")
    subprocess.run(ctr + ["images", "import", "--base-name", "docker.io/local/busybox", tar],
                   check=True, capture_output=True)
    return p


def stop_containerd(p, d):
    subprocess.run([f"{ROOT}/target/release/trenv", "sandbox", "drain", "--namespace", NS,
                    "--pool-root", f"{d}/pool"], capture_output=True)
    time.sleep(1)
    p.terminate()
    p.wait()
    subprocess.run(["pkill", "-9", "-f", f"{d}/c.sock"], check=False)
    subprocess.run(["umount", "-R", "-l", f"{d}/root"], capture_output=True)


class Checkpointer:
    """Checkpoints a running busybox task of the shim in a loop, on a thread of its own."""

    def __init__(self, d):
        import threading
        self.ctr = ["ctr", "--address", f"{d}/c.sock", "--namespace", NS]
        self.d, self.stop, self.took = d, threading.Event(), []
        subprocess.run(self.ctr + ["run", "-d", "--runtime", "io.containerd.trenv.v2",
                                   "docker.io/local/busybox:latest", "ckpt-bg", "sleep", "100000"],
                       check=True, capture_output=True)
        self.content = set(self.digests())
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        time.sleep(0.5)  # the first checkpoint is under way

    def digests(self):
        out = subprocess.run(self.ctr + ["content", "ls", "-q"], capture_output=True, text=True)
        return out.stdout.split()

    def loop(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            t = time.monotonic()
            r = subprocess.run(self.ctr + ["task", "checkpoint", "--image-path",
                                           f"{self.d}/ck{n}", "ckpt-bg"], capture_output=True)
            if r.returncode == 0:
                self.took.append((time.monotonic() - t) * 1000)
            else:
                print(f"pool_bench: checkpoint failed: {r.stderr.decode().strip()}",
                      file=sys.stderr)
            subprocess.run(["rm", "-rf", f"{self.d}/ck{n}"])
            # ctr records each checkpoint's spec as content; the next identical one would
            # be refused as "already exists".
            new = [x for x in self.digests() if x not in self.content]
            if new:
                subprocess.run(self.ctr + ["content", "rm"] + new, capture_output=True)

    def finish(self):
        self.stop.set()
        self.thread.join(timeout=30)
        subprocess.run(self.ctr + ["task", "kill", "-s", "SIGKILL", "ckpt-bg"], capture_output=True)
        time.sleep(0.5)
        subprocess.run(self.ctr + ["task", "rm", "-f", "ckpt-bg"], capture_output=True)
        subprocess.run(self.ctr + ["container", "rm", "ckpt-bg"], capture_output=True)
        return self.took


def run_case(d, case, runs, warmup, spec):
    env = dict(os.environ, PYTHONPATH=PYLIB)
    cmd = ["/usr/bin/python3", os.path.join(ROOT, "integration/bench/pool_start.py"),
           "--address", f"{d}/c.sock", "--namespace", NS, "--case", case,
           "--runs", str(runs), "--warmup", str(warmup), "--spec", spec,
           "--pool-dir", f"{d}/pool/{NS}"]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True)
    return json.loads(out.stdout)


def stats(samples):
    s = sorted(samples)
    if not s:
        return None
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return {"p50_ms": round(statistics.median(s), 2), "p99_ms": round(p99, 2),
            "mean_ms": round(statistics.mean(s), 2), "n": len(s)}


def acquisition(d):
    """P50 upper bound of the pool's acquisition histogram (metrics.prom)."""
    try:
        text = open(f"{d}/pool/{NS}/metrics.prom").read()
    except OSError:
        return None
    buckets, count = [], 0
    for line in text.splitlines():
        if line.startswith("trenv_pool_acquire_seconds_bucket") and 'le="+Inf"' not in line:
            le = float(line.split('le="')[1].split('"')[0])
            buckets.append((le, float(line.split()[-1])))
        if line.startswith("trenv_pool_acquire_seconds_count"):
            count = float(line.split()[-1])
    for le, n in sorted(buckets):
        if count and n >= count / 2:
            return le * 1000
    return None


def cgroup2():
    """(mount point, super options) of the cgroup2 mount, or None."""
    for line in open("/proc/self/mountinfo"):
        pre, _, post = line.partition(" - ")
        f = post.split()
        if f and f[0] == "cgroup2":
            return pre.split()[4], f[2]
    return None


def set_favordynmods(on):
    """Host tuning for every runtime of a pass (see pool.cgroup_favor_dynmods)."""
    cg = cgroup2()
    if cg is None:
        return False
    mp, opts = cg
    keep = [o for o in opts.split(",") if o not in ("rw", "ro", "favordynmods")]
    if on:
        keep.append("favordynmods")
    r = subprocess.run(["mount", "-t", "cgroup2", "-o", ",".join(["remount"] + keep), "none", mp],
                       capture_output=True)
    return r.returncode == 0


def holder_memory(d):
    """PSS (KiB) of each idle sandbox's holder process."""
    out = []
    sdir = f"{d}/pool/{NS}/sandboxes"
    for name in os.listdir(sdir) if os.path.isdir(sdir) else []:
        try:
            pid = json.load(open(os.path.join(sdir, name)))["holder"]["pid"]
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    out.append(int(line.split()[1]))
        except (OSError, ValueError, KeyError):
            pass
    return out


def run_pass(a, tuned):
    results, acq, memory, checkpoints = {}, {}, {}, []
    cases = [("pool-hit", "min_idle = 4\nmax_idle = 8", "pool"),
             ("pool-miss", "min_idle = 0\nmax_idle = 0", "pool"),
             ("runc-cni", "enabled = false", "runc"),
             ("pool-hit-checkpointing", "min_idle = 4\nmax_idle = 8", "pool")]
    wanted = a.cases.split(",")
    label = "favordynmods" if tuned else "default"
    for name, pool_toml, case in cases:
        if name not in wanted:
            continue
        d = tempfile.mkdtemp(prefix="trenv-bench-pool-")
        subprocess.run([f"{ROOT}/target/release/trenv", "spec", "--bundle", d], check=True)
        print(f"pool_bench: {label}: {name}: {a.runs} starts (+{a.warmup} warm-up)",
              file=sys.stderr)
        top = ""
        if name.endswith("-checkpointing"):
            slow = os.path.join(d, "slow-criu")
            with open(slow, "w") as f:
                f.write("#!/bin/sh\nsleep 2\nexec criu \"$@\"\n")
            os.chmod(slow, 0o755)
            top = f'criu_path = "{slow}"\n'
        p = start_containerd(d, pool_toml, top)
        ck = None
        try:
            if case == "pool" and "min_idle = 4" in pool_toml:
                time.sleep(2)  # let the pool fill
            if top:
                ck = Checkpointer(d)
            r = run_case(d, case, a.runs, a.warmup, os.path.join(d, "config.json"))
            if ck:
                checkpoints = ck.finish()
                ck = None
            acq[name] = acquisition(d)
            if name == "pool-hit":
                time.sleep(1)  # the last instance's sandbox back in the pool
                memory["holder_pss_kib"] = holder_memory(d)
        finally:
            if ck:
                ck.finish()
            stop_containerd(p, d)
            subprocess.run(["rm", "-rf", d])
        results[name] = {"running": stats(r["running_ms"]), "http": stats(r["http_ms"]),
                         "phases": {k: stats(v) for k, v in r["phases_ms"].items()},
                         "errors": r["errors"]}
        print(f"pool_bench: {label}: {name}: " + json.dumps(results[name]), file=sys.stderr)
    ratios = {}
    for name in ("pool-hit", "pool-miss"):
        for what in ("running", "http"):
            t, b = results.get(name, {}).get(what), results.get("runc-cni", {}).get(what)
            if t and b:
                ratios[f"{name}/{what}"] = {
                    "p50": round(b["p50_ms"] / t["p50_ms"], 2),
                    "p99": round(b["p99_ms"] / t["p99_ms"], 2)}
    concurrency = None
    plain, busy = results.get("pool-hit"), results.get("pool-hit-checkpointing")
    if plain and busy and plain["running"] and busy["running"]:
        concurrency = {"checkpoints": len(checkpoints),
                       "checkpoint_ms": stats(checkpoints),
                       "p50_ratio": round(busy["running"]["p50_ms"] / plain["running"]["p50_ms"], 2),
                       "p99_ratio": round(busy["running"]["p99_ms"] / plain["running"]["p99_ms"], 2)}
    return {"host": label, "results": results, "runc_over_trenv": ratios,
            "acquisition_p50_upper_ms": acq, "memory": memory, "concurrency": concurrency}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cases", default="pool-hit,pool-miss,runc-cni,pool-hit-checkpointing",
                    help="comma-separated subset to run (the report needs the first three)")
    ap.add_argument("--hosts", default="default,favordynmods",
                    help="host settings to run every case under")
    ap.add_argument("--no-report", action="store_true",
                    help="print the results only; leave docs/benchmarks-micro.md alone")
    a = ap.parse_args()
    if not os.path.isdir(PYLIB):
        sys.exit(f"pool_bench: {PYLIB} missing: run `make setup`")
    before = cgroup2()
    passes = []
    try:
        for host in a.hosts.split(","):
            tuned = host == "favordynmods"
            if not set_favordynmods(tuned) and tuned:
                print("pool_bench: cannot set favordynmods; skipping that pass", file=sys.stderr)
                continue
            passes.append(run_pass(a, tuned))
    finally:
        if before is not None:
            set_favordynmods("favordynmods" in before[1].split(","))
    # Parent cgroups of the runs (runc leaves `/trenv-bench`, the pool its own parents).
    subprocess.run("find /sys/fs/cgroup -maxdepth 3 -depth -type d -path '*trenv-bench*' "
                   "-exec rmdir {} + 2>/dev/null", shell=True)
    summary = {"runs": a.runs, "goal_min_ratio": GOAL, "passes": passes}
    if a.no_report or any(any(c not in x["results"] for c in BASE_CASES) for x in passes):
        json.dump(summary, sys.stdout, indent=2)
        return
    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench/pool.json"), "w") as f:
        json.dump(summary, f, indent=2)
    md = render(summary)
    with open(os.path.join(ROOT, "docs/benchmarks-micro.md"), "a") as f:
        f.write(md)
    print(md)


def render(s):
    lines = ["", "## Networked starts through the containerd API (sandbox pool)", "",
             f"`make bench` (integration/bench/pool_bench.py, {s['runs']} starts per case after "
             "warm-up, one at a time, each deleted before the next). Client: containerd's gRPC API "
             "(snapshot prepare, container create, task create, task start), not ctr. "
             "\"running\" = until Start returned; \"http\" = until busybox httpd in the container "
             "answered a GET on its IP from the host. runc-cni: io.containerd.runc.v2 with a netns "
             "attached by the same CNI plugins (bridge + host-local + loopback) before create. "
             "Every case runs under two host settings: the kernel's default, and cgroup2 "
             "`favordynmods` (`pool.cgroup_favor_dynmods`; it speeds up every runtime's cgroup "
             "moves, so runc-cni runs with it too)."]
    for x in s["passes"]:
        r = x["results"]
        lines += ["", f"### host: {x['host']}", "",
                  "| case | running P50 | running P99 | http P50 | http P99 | errors |",
                  "|---|---|---|---|---|---|"]
        for name in BASE_CASES + ("pool-hit-checkpointing",):
            if name not in r:
                continue
            c = r[name]
            if c["running"] is None:
                lines.append(f"| {name} | - | - | - | - | {c['errors']} |")
                continue
            lines.append(f"| {name} | {c['running']['p50_ms']} ms | {c['running']['p99_ms']} ms | "
                         f"{c['http']['p50_ms']} ms | {c['http']['p99_ms']} ms | {c['errors']} |")
        lines += ["", "Where \"running\" goes (P50 per phase, ms): "
                  + "; ".join(f"{name}: " + ", ".join(
                      f"{k} {v['p50_ms']}" for k, v in r[name]["phases"].items()
                      if v and v["p50_ms"] > 0) for name in ("pool-hit", "pool-miss", "runc-cni")
                      if r[name]["running"]), "",
                  f"runc-cni / trenv (goal ≥ {s['goal_min_ratio']}× for pool hits at P50 and P99):", ""]
        for k, v in x["runc_over_trenv"].items():
            met = ("met" if v["p50"] >= s["goal_min_ratio"] and v["p99"] >= s["goal_min_ratio"]
                   else "not met")
            note = f" ({met})" if k.startswith("pool-hit") else ""
            lines.append(f"- {k}: P50 {v['p50']}×, P99 {v['p99']}×{note}")
        acq = x["acquisition_p50_upper_ms"]
        lines += ["", "Sandbox acquisition inside the shim (pool histogram, P50 bucket upper "
                  "bound): " + ", ".join(f"{k} ≤ {v} ms" for k, v in acq.items() if v is not None)]
        pss = x["memory"].get("holder_pss_kib") or []
        if pss:
            lines += ["", f"Idle sandbox memory: holder process PSS {min(pss)}-{max(pss)} KiB "
                      f"({len(pss)} idle sandboxes); its cgroup is empty while idle."]
        cc = x.get("concurrency")
        if cc:
            met = "met" if cc["p99_ratio"] <= CONCURRENCY_GOAL else "not met"
            took = cc["checkpoint_ms"]
            lines += ["", "Concurrency (pool-hit-checkpointing): pool hits while another task of "
                      f"the same shim was checkpointed {cc['checkpoints']} times in a row "
                      f"(each {took['p50_ms'] if took else '-'} ms at P50: CRIU behind a 2 s "
                      f"delay) — P50 {cc['p50_ratio']}×, P99 {cc['p99_ratio']}× the plain "
                      f"pool hits (goal ≤ {CONCURRENCY_GOAL}× at P99: {met})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
