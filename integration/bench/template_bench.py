#!/usr/bin/python3
"""`make bench`, part 3: Python functions restored from a memory template.

Two Python HTTP servers on the project's offline Debian images, each with 32 MiB of state:
  python    python3 with a bytearray and a 100 000-entry dict (integration/bench/template_server.py)
  numpy     python3 + numpy: the heavy import a template saves (template_server_numpy.py)
timed from the start of the runtime command to the server's first correct answer to /probe
(a digest of one byte of every page of the state: cheap to compute, but it touches all of it):
  cold      `trenv run -d`: a fresh interpreter imports and initialises
  criu      `trenv restore -d` of an ordinary checkpoint (CRIU writes every page)
  template  `trenv restore -d --template` (CRIU maps the pool's pages copy-on-write)
Every restored instance's full-state digest (/sum) is checked after the timed answer. Runs
interleave (cold, criu, template, cold, ...), each instance killed and deleted (untimed)
before the next. All instances join one network namespace with its loopback up, which this
script runs in (nsenter --net), so the answer is read straight from 127.0.0.1:8080. Where a
template restore's time goes comes from CRIU's restore.log of every timed run. Then 16 live
instances per mode, each in a network namespace of its own: the sum of their PSS and of their
cgroups' memory.

Appends its section to docs/benchmarks-micro.md and writes target/bench/template.json.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CACHE = os.environ.get("TRENV_CACHE", "/var/cache/trenv")
TRENV = os.path.join(ROOT, os.environ.get("TRENV_BIN", "target/release/trenv"))
NETNS = "trenv-bench-tpl"
FUNCTIONS = {
    # name: (image under $CACHE/images, server source)
    "python": ("python", "integration/bench/template_server.py"),
    "numpy": ("python-numpy", "integration/bench/template_server_numpy.py"),
}


def spec(rootfs, app, cgroup, netns):
    ns = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
          {"type": "network", "path": netns} if netns else {"type": "network"}]
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                    "args": ["python3", "/app/server.py"],
                    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "cwd": "/",
                    "noNewPrivileges": True},
        "root": {"path": rootfs, "readonly": True},
        "hostname": "fn",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/app", "type": "bind", "source": app, "options": ["rbind", "ro"]},
        ],
        "linux": {"cgroupsPath": cgroup, "namespaces": ns,
                  "resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


class Bench:
    def __init__(self, d, netns_path, function="python"):
        image, server = FUNCTIONS[function]
        self.d = d
        self.root = os.path.join(d, "state")
        self.store = os.path.join(d, "store")
        self.pool = os.path.join(d, "pool")
        self.app = os.path.join(d, "app")
        os.makedirs(self.app)
        with open(os.path.join(self.app, "server.py"), "w") as f:
            f.write(open(os.path.join(ROOT, server)).read())
        self.rootfs = os.path.join(CACHE, "images", image, "rootfs")
        self.netns = netns_path
        self.n = 0

    def trenv(self, *args, check=True, detached=False):
        e = dict(os.environ, TRENV_TEMPLATE_STORE=self.store, TRENV_MEMPOOL_DIR=self.pool,
                 TRENV_MEMPOOL_CAPACITY="2G")
        if detached:
            # A detached container keeps the stdio it is given: /dev/null (a pipe would be
            # read to an end that never comes, a host file cannot be checkpointed); trenv's
            # own errors go to its log file.
            log = os.path.join(self.d, "trenv.log")
            r = subprocess.run([TRENV, "--root", self.root, "--log", log, *args], env=e,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            r.stderr = open(log, "rb").read()[-4000:] if os.path.exists(log) else b""
        else:
            r = subprocess.run([TRENV, "--root", self.root, *args], env=e,
                               stdin=subprocess.DEVNULL, capture_output=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"trenv {' '.join(args)}: {r.stderr.decode()}")
        return r

    def bundle(self, own_netns=False):
        self.n += 1
        cid = f"tb-{os.getpid()}-{self.n}"
        b = os.path.join(self.d, "bundles", cid)
        os.makedirs(b)
        with open(os.path.join(b, "config.json"), "w") as f:
            json.dump(spec(self.rootfs, self.app, f"/trenv-bench-tpl/{cid}",
                           None if own_netns else self.netns), f)
        return cid, b

    def remove(self, cid):
        self.trenv("kill", cid, "KILL", check=False)
        for _ in range(200):
            r = self.trenv("state", cid, check=False)
            if r.returncode != 0 or b'"stopped"' in r.stdout:
                break
            time.sleep(0.01)
        self.trenv("delete", "--force", cid, check=False)
        shutil.rmtree(os.path.join(self.d, "bundles", cid), ignore_errors=True)


def get(path, timeout=0.5):
    s = socket.create_connection(("127.0.0.1", 8080), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return data.split(b"\r\n\r\n", 1)[-1].decode()


def until_answer(want, deadline=60.0):
    """Until /probe answers `want` (None: any answer: a cold instance's state is its own)."""
    t = time.monotonic()
    while time.monotonic() - t < deadline:
        try:
            got = get("/probe")
            if got == want or (want is None and "|" in got):
                return
        except OSError:
            pass
        time.sleep(0.0005)
    raise RuntimeError("no correct answer")


# Phases of a CRIU restore, each ending at the first restore.log line containing its marker.
PHASES = [
    ("setup", "mnt: Restoring mount namespace"),  # cgroup yard, images, fork, namespaces
    ("mounts", "Running post-setup-namespaces scripts"),  # the container's mount table
    ("files+memory", "Running post-restore scripts"),  # files, VMAs, pages, restorer
    ("finish", "Restore finished successfully"),  # network unlock, tasks released
]


def criu_phases(log):
    """Milliseconds per phase of one restore.log, and CRIU's total."""
    out, prev = {}, 0.0
    t = 0.0
    try:
        lines = open(log).read().splitlines()
    except OSError:
        return {}
    for name, marker in PHASES:
        for line in lines:
            if marker in line and line.startswith("("):
                t = float(line[1:line.index(")")])
                break
        out[name] = (t - prev) * 1000
        prev = t
    out["criu total"] = t * 1000
    return out


def stats(samples):
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return {"p50_ms": round(statistics.median(s), 2), "p99_ms": round(p99, 2),
            "mean_ms": round(statistics.mean(s), 2), "n": len(s)}


def rollup(pid, field):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cgroup_memory(cid):
    for p in (f"/sys/fs/cgroup/memory/trenv-bench-tpl/{cid}/memory.usage_in_bytes",
              f"/sys/fs/cgroup/trenv-bench-tpl/{cid}/memory.current"):
        try:
            return int(open(p).read()) // 1024
        except OSError:
            continue
    return 0


def inner(a):
    return {"runs": a.runs,
            "functions": {f: measure(a, f) for f in a.functions.split(",")}}


def measure(a, function):
    d = tempfile.mkdtemp(prefix="trenv-bench-tpl-")
    b = Bench(d, f"/var/run/netns/{NETNS}", function)
    ckpt = os.path.join(d, "ckpt")
    try:
        # The function's initialised state, checkpointed once; the template made from it.
        cid, bdir = b.bundle()
        b.trenv("run", "--detach", "--bundle", bdir, cid, detached=True)
        want = None
        t = time.monotonic()
        while want is None and time.monotonic() - t < 60:
            try:
                want = get("/probe", timeout=2)
                want_sum = get("/sum", timeout=10)
            except OSError:
                time.sleep(0.01)
        b.trenv("checkpoint", "--image-path", ckpt, cid)
        t = time.monotonic()
        b.trenv("template", "build", "--from-checkpoint", ckpt, "--bundle", bdir, "--name", "fn")
        build_s = time.monotonic() - t
        shutil.rmtree(os.path.join(d, "bundles", cid), ignore_errors=True)
        manifest = json.loads(b.trenv("template", "inspect", "fn").stdout)

        def cold(cid, bdir):
            return ["run", "--detach", "--bundle", bdir, cid]

        def criu(cid, bdir):
            return ["restore", "--detach", "--image-path", ckpt,
                    "--work-path", os.path.join(d, "work", cid), "--bundle", bdir, cid]

        def template(cid, bdir):
            return ["restore", "--detach", "--template", "fn", "--template-store", b.store,
                    "--work-path", os.path.join(d, "work", cid), "--bundle", bdir, cid]

        modes = {"cold": cold, "criu": criu, "template": template}
        first, command = {m: [] for m in modes}, {m: [] for m in modes}
        phases = {p: [] for p, _ in PHASES + [("criu total", None), ("trenv", None)]}
        total = a.runs + a.warmup
        for i in range(total):
            for m, argv in modes.items():
                cid, bdir = b.bundle()
                t = time.monotonic()
                b.trenv(*argv(cid, bdir), detached=True)
                t_cmd = time.monotonic()
                until_answer(None if m == "cold" else want)
                t_ans = time.monotonic()
                if m != "cold" and get("/sum", timeout=10) != want_sum:
                    raise RuntimeError(f"{m} instance {cid}: state differs from the checkpoint's")
                if i >= a.warmup:
                    command[m].append((t_cmd - t) * 1000)
                    first[m].append((t_ans - t) * 1000)
                    if m == "template":
                        ph = criu_phases(os.path.join(d, "work", cid, "restore.log"))
                        if ph:
                            for k, v in ph.items():
                                phases[k].append(v)
                            phases["trenv"].append((t_cmd - t) * 1000 - ph["criu total"])
                b.remove(cid)
                shutil.rmtree(os.path.join(d, "work", cid), ignore_errors=True)
            if (i + 1) % 10 == 0 or i + 1 == total:
                line = ", ".join(f"{m} {statistics.median(v):.1f}" for m, v in first.items() if v)
                print(f"template_bench: {function}: {i + 1}/{total} rounds; P50 ms so far: {line}",
                      file=sys.stderr, flush=True)

        # 16 live instances per mode, each in its own network namespace.
        memory = {}
        for m, argv in modes.items():
            ids = []
            for _ in range(16):
                cid, bdir = b.bundle(own_netns=True)
                b.trenv(*argv(cid, bdir), detached=True)
                ids.append(cid)
            time.sleep(2 if m == "cold" else 0.5)  # cold instances finish initialising
            pids = [json.loads(b.trenv("state", c).stdout)["pid"] for c in ids]
            if m == "cold":
                # Initialised = answering; wait for each (its loopback is down until set).
                for p in pids:
                    subprocess.run(["nsenter", "-t", str(p), "-n", "ip", "link", "set", "lo", "up"])
                    subprocess.run(["nsenter", "-t", str(p), "-n", "curl", "-s", "--retry", "50",
                                    "--retry-connrefused", "--retry-delay", "0",
                                    "http://127.0.0.1:8080/sum"], capture_output=True)
            memory[m] = {"pss_kib": sum(rollup(p, "Pss:") for p in pids),
                         "rss_kib": sum(rollup(p, "Rss:") for p in pids),
                         "cgroup_kib": sum(cgroup_memory(c) for c in ids)}
            print(f"template_bench: {function}: 16 x {m}: {memory[m]}", file=sys.stderr,
                  flush=True)
            for c in ids:
                b.remove(c)
        b.trenv("template", "rm", "fn")
        return {
            "build_s": round(build_s, 2),
            "template_phases_p50_ms": {k: round(statistics.median(v), 2)
                                       for k, v in phases.items() if v},
            "template": {"pool_mib": sum(r["data"] for r in manifest["regions"]) >> 20,
                         "image_kib": manifest["report"]["pages_left"] >> 10,
                         "kept": manifest["report"]["kept"]},
            "first_answer": {m: stats(v) for m, v in first.items()},
            "command": {m: stats(v) for m, v in command.items()},
            "memory16": memory,
        }
    finally:
        # Whatever a failed run left running goes first.
        for c in b.trenv("list", "-q", check=False).stdout.decode().split():
            b.remove(c)
        subprocess.run(["umount", "-l", b.pool], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        # The instances' cgroups go once their last processes are reaped.
        for _ in range(20):
            subprocess.run("find /sys/fs/cgroup -depth -type d -path '*trenv-bench-tpl*' "
                           "-exec rmdir {} + 2>/dev/null", shell=True)
            if not subprocess.run("find /sys/fs/cgroup -type d -path '*trenv-bench-tpl*'",
                                  shell=True, capture_output=True).stdout:
                break
            time.sleep(0.5)


DESCRIBE = {
    "python": "Python HTTP server (Debian python3, 32 MiB of state in a bytearray and a "
              "100 000-entry dict)",
    "numpy": "Python HTTP server that imports numpy (Debian python3-numpy) and keeps 32 MiB "
             "of state in a numpy array",
}


def met(ok):
    return "met" if ok else "not met"


def render_function(name, r, runs):
    f, c, m = r["first_answer"], r["command"], r["memory16"]
    ratio = lambda a, b, k: round(f[a][k] / f[b][k], 2)
    mem_saving = round(100 * (1 - m["template"]["pss_kib"] / m["cold"]["pss_kib"]), 1)
    lines = ["", f"### {name}: {DESCRIBE[name]}", "",
             f"{runs} starts per mode; template built in {r['build_s']} s: "
             f"{r['template']['pool_mib']} MiB in the pool, {r['template']['image_kib']} KiB of "
             "pages left in the images.", "",
             "| mode | first answer P50 | P99 | command P50 | command P99 |",
             "|---|---|---|---|---|"]
    for k in ("cold", "criu", "template"):
        lines.append(f"| {k} | {f[k]['p50_ms']} ms | {f[k]['p99_ms']} ms | "
                     f"{c[k]['p50_ms']} ms | {c[k]['p99_ms']} ms |")
    r10 = ratio("criu", "template", "p50_ms") >= 10 and ratio("criu", "template", "p99_ms") >= 10
    lines += ["", f"- criu / template: P50 {ratio('criu', 'template', 'p50_ms')}×, "
              f"P99 {ratio('criu', 'template', 'p99_ms')}× (goal ≥ 10×: {met(r10)})",
              f"- cold / template: P50 {ratio('cold', 'template', 'p50_ms')}×, "
              f"P99 {ratio('cold', 'template', 'p99_ms')}×",
              f"- template P50 {f['template']['p50_ms']} ms (goal ≤ 10 ms: "
              f"{met(f['template']['p50_ms'] <= 10)})"]
    ph = r.get("template_phases_p50_ms", {})
    if ph:
        lines += ["- where a template restore's command goes (P50 per phase, ms; CRIU's from its "
                  "restore.log): " + ", ".join(f"{k} {v}" for k, v in ph.items()) +
                  ". \"trenv\" is the command's time outside CRIU's log: trenv itself, CRIU's "
                  "exec and start-up, and CRIU's exit."]
    lines += ["", "16 live instances, each in its own network namespace:", "",
              "| mode | sum of PSS | sum of RSS | sum of cgroup memory |", "|---|---|---|---|"]
    for k in ("cold", "criu", "template"):
        lines.append(f"| {k} | {m[k]['pss_kib'] >> 10} MiB | {m[k]['rss_kib'] >> 10} MiB | "
                     f"{m[k]['cgroup_kib'] >> 10} MiB |")
    lines += ["", f"- template vs cold, PSS: {mem_saving}% less (goal ≥ 60%: "
              f"{met(mem_saving >= 60)})."]
    return lines


def render(r):
    lines = ["", "## Function restore from a memory template", "",
             "`make bench` (integration/bench/template_bench.py; starts interleaved per mode, "
             "each instance deleted before the next). Time from the start of the trenv command "
             "until the server's first correct answer to /probe on 127.0.0.1:8080 (a digest of "
             "one byte of every page of its state; all instances join one network namespace); "
             "every restored instance's full-state digest is checked afterwards. cold: `trenv "
             "run`; criu: `trenv restore` of an ordinary checkpoint; template: `trenv restore "
             "--template` (tmpfs pool). Read-only rootfs, /dev and /tmp tmpfs. Run on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."]
    for name, fr in r["functions"].items():
        lines += render_function(name, fr, r["runs"])
    lines += ["", "cgroup memory counts the pool's shared pages in the cgroup that touched them "
              "first (the pool's tmpfs is charged to the builder), so template instances' "
              "cgroups hold only their own copies."]
    return "\n".join(lines) + "\n"


def draw(r, out_base):
    """Bar charts of the run: first-answer P50/P99 per mode and the memory of 16 instances,
    per function, as out_base.png and out_base.svg. Skipped (with a note) without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("template_bench: matplotlib missing, no chart", file=sys.stderr)
        return []
    names = list(r["functions"])
    modes = ["cold", "criu", "template"]
    colors = {"cold": "#9e9e9e", "criu": "#5b8cc9", "template": "#e07b39"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.26
    for j, m in enumerate(modes):
        xs = [i + (j - 1) * width for i in range(len(names))]
        p50 = [r["functions"][n]["first_answer"][m]["p50_ms"] for n in names]
        p99 = [r["functions"][n]["first_answer"][m]["p99_ms"] for n in names]
        ax1.bar(xs, p50, width, color=colors[m], label=m)
        ax1.scatter(xs, p99, color="black", marker="_", s=200, zorder=3,
                    label="P99" if j == 0 else None)
        for x, v in zip(xs, p50):
            ax1.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
        pss = [r["functions"][n]["memory16"][m]["pss_kib"] / 1024 for n in names]
        ax2.bar(xs, pss, width, color=colors[m], label=m)
        for x, v in zip(xs, pss):
            ax2.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.legend(fontsize=8)
    ax1.set_ylabel("ms")
    ax1.set_title(f"start to first correct answer (P50 bars, P99 ticks; {r['runs']} runs)")
    ax2.set_ylabel("MiB")
    ax2.set_title("16 live instances: sum of PSS")
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = f"{out_base}.{ext}"
        fig.savefig(path, dpi=110)
        paths.append(path)
    plt.close(fig)
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--functions", default=",".join(FUNCTIONS),
                    help="comma-separated: " + ", ".join(FUNCTIONS))
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--draw", metavar="JSON",
                    help="only draw the charts of a saved run (target/bench/template.json)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        json.dump(inner(a), sys.stdout)
        return
    chart = os.path.join(ROOT, "docs/img/template-bench")
    if a.draw:
        os.makedirs(os.path.dirname(chart), exist_ok=True)
        print("\n".join(draw(json.load(open(a.draw)), chart)))
        return
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True)
        # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup mounts.
        argv = ["nsenter", f"--net=/var/run/netns/{NETNS}", sys.executable,
                os.path.abspath(__file__),
                "--inner", "--runs", str(a.runs), "--warmup", str(a.warmup),
                "--functions", a.functions]
        out = subprocess.run(argv, stdout=subprocess.PIPE, check=True)
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    r = json.loads(out.stdout)
    if a.no_report:
        json.dump(r, sys.stdout, indent=2)
        return
    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench/template.json"), "w") as f:
        json.dump(r, f, indent=2)
    os.makedirs(os.path.dirname(chart), exist_ok=True)
    md = render(r)
    if draw(r, chart):
        md += "\n![template bench](img/template-bench.svg)\n"
    with open(os.path.join(ROOT, "docs/benchmarks-micro.md"), "a") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
