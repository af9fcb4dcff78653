#!/usr/bin/python3
"""`make bench`, part 4: function starts through containerd's API, template vs cold.

For each function (the Python servers of template_bench.py, on the project's offline Debian
images) and each case of function_start.py — runc (io.containerd.runc.v2 + CNI, cold),
pool (trenv pool hit, cold function init), template (trenv, restored from the function's
memory template into a pool hit), criu (trenv, plain restore of an ordinary checkpoint) —
starts a private containerd, measures Create -> first correct answer over --runs starts,
and for runc and template the memory of 16 live instances. Appends the results to
docs/benchmarks-micro.md, writes target/bench/function.json and docs/img/function-bench.{png,svg}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_bench import CACHE, NS, PYLIB, ROOT, start_containerd, stats, stop_containerd  # noqa: E402

BENCH = os.path.join(ROOT, "integration", "bench")
# name: (image directory under $CACHE/images, image name, server source)
FUNCTIONS = {
    "python": ("python", "docker.io/local/python:latest", "template_server.py"),
    "numpy": ("python-numpy", "docker.io/local/python-numpy:latest", "template_server_numpy.py"),
}
CASES = ("runc", "pool", "template", "spare", "criu")
MEMORY_CASES = ("runc", "template")
GOAL_P50_MS, GOAL_P99_MS, GOAL_SPEEDUP, GOAL_MEMORY = 10.0, 20.0, 10.0, 60.0


def run_case(function, case, a):
    image_dir, image, server = FUNCTIONS[function]
    d = tempfile.mkdtemp(prefix="trenv-bench-fn-")
    subprocess.run([f"{ROOT}/target/release/trenv", "spec", "--bundle", d], check=True)
    pool = ("min_idle = 4\nmax_idle = 8" if case != "runc" else "enabled = false") + (
        f'\n[templates]\nstore = "{d}/templates"\npool_dir = "{d}/mempool"\n'
        'pool_name = "bench"\npool_capacity_mib = 2048\n'
        + ("spares = 1\n" if case == "spare" else ""))
    print(f"function_bench: {function}: {case}: {a.runs} starts (+{a.warmup} warm-up)",
          file=sys.stderr)
    p = start_containerd(d, pool)
    try:
        ctr = ["ctr", "--address", f"{d}/c.sock", "--namespace", NS]
        tar = os.path.join(CACHE, "images", image_dir, "python-oci.tar")
        subprocess.run(ctr + ["images", "import", "--base-name", image.rsplit(":", 1)[0], tar],
                       check=True, capture_output=True)
        time.sleep(2)  # let the pool fill
        cmd = ["/usr/bin/python3", os.path.join(BENCH, "function_start.py"),
               "--address", f"{d}/c.sock", "--namespace", NS, "--case", case,
               "--runs", str(a.runs), "--warmup", str(a.warmup),
               "--memory", str(16 if case in MEMORY_CASES else 0),
               "--image", image, "--server", os.path.join(BENCH, server),
               "--function", function, "--spec", os.path.join(d, "config.json"),
               "--pool-dir", f"{d}/pool/{NS}"]
        out = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=PYLIB),
                             stdout=subprocess.PIPE, check=True)
        r = json.loads(out.stdout)
        acquire = None
        try:
            text = open(f"{d}/pool/{NS}/metrics.prom").read()
            s = [float(x.split()[-1]) for x in text.splitlines()
                 if x.startswith("trenv_pool_acquire_seconds_sum")]
            n = [float(x.split()[-1]) for x in text.splitlines()
                 if x.startswith("trenv_pool_acquire_seconds_count")]
            if s and n and n[0]:
                acquire = round(s[0] / n[0] * 1000, 2)
        except OSError:
            pass
    finally:
        stop_containerd(p, d)
        subprocess.run(["umount", "-l", f"{d}/mempool"], capture_output=True)
        subprocess.run(["rm", "-rf", d])
        remove_bench_cgroups()
    res = {"first_answer": stats(r["ms"]), "from_task_create": stats(r.get("task_ms", [])),
           "phases": {k: stats(v) for k, v in r["phases_ms"].items()},
           "memory16": r["memory"], "errors": r["errors"], "acquire_mean_ms": acquire,
           "spares_taken": r.get("spares_taken")}
    print(f"function_bench: {function}: {case}: " + json.dumps(res), file=sys.stderr)
    return res


def remove_bench_cgroups():
    """The drained pool's parent cgroups (empty by now), in every hierarchy."""
    roots = [os.path.join("/sys/fs/cgroup", h) for h in os.listdir("/sys/fs/cgroup")]
    for root in roots + ["/sys/fs/cgroup"]:
        for rel in (f"trenv-bench/{NS}", "trenv-bench"):
            try:
                os.rmdir(os.path.join(root, rel))
            except OSError:
                pass


def met(ok):
    return "met" if ok else "**not met**"


def render(r):
    lines = ["", "## Function starts through containerd: memory templates", "",
             "Command: `/usr/bin/python3 integration/bench/function_bench.py` (the last part of "
             "`make bench`; function_start.py is the containerd API client; a private containerd per case; each instance deleted "
             "before the next). Time from the client's first call (snapshot prepare) to the "
             "instance's first correct answer to `GET /count` (\"1\": its own first request) "
             "on its IP from the host. runc: io.containerd.runc.v2 in a network namespace "
             "attached by the same CNI plugins; pool: trenv, warm sandbox, cold function "
             "init; template: trenv, `io.trenv.template=auto` + `io.trenv.ready`, restored "
             "into a warm sandbox; spare: template with `[templates] spares = 1`, the start "
             "takes over an instance restored ahead and frozen in its own sandbox (the client "
             "waits, untimed, for the replacement before each start); criu: trenv, task "
             "created from an ordinary checkpoint "
             "(pages copied). \"From task Create\" leaves out the client's snapshot prepare "
             "and container create (containerd's metadata, ~3 ms, the same in every case). "
             "Run on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {r['runs']} starts per "
             "case.", ""]
    for name, fr in r["functions"].items():
        lines += [f"### {name}", "", "| case | P50 ms | P99 ms | mean ms | from task Create: "
                  "P50 ms | P99 ms | errors |", "|---|---|---|---|---|---|---|"]
        for case in CASES:
            x = fr.get(case)
            if not x or not x["first_answer"]:
                continue
            f, t = x["first_answer"], x.get("from_task_create") or {}
            lines.append(f"| {case} | {f['p50_ms']} | {f['p99_ms']} | {f['mean_ms']} | "
                         f"{t.get('p50_ms', '')} | {t.get('p99_ms', '')} | {x['errors']} |")
        base = fr.get("runc")
        for case in ("template", "spare"):
            t = fr.get(case)
            if not (t and base and t["first_answer"] and base["first_answer"]):
                continue
            tf, bf = t["first_answer"], base["first_answer"]
            sp50 = round(bf["p50_ms"] / tf["p50_ms"], 1)
            sp99 = round(bf["p99_ms"] / tf["p99_ms"], 1)
            lines += ["", f"- {case} vs runc: {sp50}x at P50, {sp99}x at P99 "
                      f"(goal ≥ {GOAL_SPEEDUP:.0f}x: {met(min(sp50, sp99) >= GOAL_SPEEDUP)}); "
                      f"{case} P50 {tf['p50_ms']} ms (goal ≤ {GOAL_P50_MS:.0f}: "
                      f"{met(tf['p50_ms'] <= GOAL_P50_MS)}), P99 {tf['p99_ms']} ms (goal ≤ "
                      f"{GOAL_P99_MS:.0f}: {met(tf['p99_ms'] <= GOAL_P99_MS)})"
                      + (f"; from task Create: P50 {t['from_task_create']['p50_ms']} ms, P99 "
                         f"{t['from_task_create']['p99_ms']} ms."
                         if t.get("from_task_create") else ".")]
            ph = ", ".join(f"{k} {v['p50_ms']}" for k, v in t["phases"].items() if v)
            what = ("task_start is the restore" if case == "template" else
                    f"task_create takes the spare over, task_start thaws it; "
                    f"{t.get('spares_taken')} starts (warm-up included) were served by a spare")
            lines.append(f"- {case}, P50 per phase (ms): {ph}; the pool's acquisition "
                         f"(inside task_create) averaged {t['acquire_mean_ms']} ms; {what}.")
        mem = {c: fr[c]["memory16"] for c in MEMORY_CASES if fr.get(c) and fr[c]["memory16"]}
        if mem:
            lines += ["", "16 live instances:", "",
                      "| case | sum of PSS | sum of RSS | sum of cgroup memory |",
                      "|---|---|---|---|"]
            for c, m in mem.items():
                lines.append(f"| {c} | {m['pss_kib'] >> 10} MiB | {m['rss_kib'] >> 10} MiB | "
                             f"{m['cgroup_kib'] >> 10} MiB |")
            if "runc" in mem and "template" in mem and mem["runc"]["pss_kib"]:
                saving = round(100 * (1 - mem["template"]["pss_kib"] / mem["runc"]["pss_kib"]))
                lines += ["", f"- template vs runc, PSS: {saving}% less (goal ≥ "
                          f"{GOAL_MEMORY:.0f}%: {met(saving >= GOAL_MEMORY)})."]
        lines.append("")
    return "\n".join(lines) + "\n"


def draw(r, out_base):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("function_bench: matplotlib missing, no chart", file=sys.stderr)
        return []
    names = list(r["functions"])
    colors = {"runc": "#9e9e9e", "pool": "#7cb07c", "template": "#e07b39", "spare": "#b03a2e",
              "criu": "#5b8cc9"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.16
    for j, case in enumerate(CASES):
        xs = [i + (j - (len(CASES) - 1) / 2) * width for i in range(len(names))]
        got = [r["functions"][n].get(case) for n in names]
        p50 = [g["first_answer"]["p50_ms"] if g and g["first_answer"] else 0 for g in got]
        p99 = [g["first_answer"]["p99_ms"] if g and g["first_answer"] else 0 for g in got]
        ax1.bar(xs, p50, width, color=colors[case], label=case)
        ax1.scatter(xs, p99, color="black", marker="_", s=150, zorder=3,
                    label="P99" if j == 0 else None)
        for x, v in zip(xs, p50):
            ax1.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=7)
        if case in MEMORY_CASES:
            pss = [(g["memory16"] or {}).get("pss_kib", 0) / 1024 if g else 0 for g in got]
            ax2.bar(xs, pss, width, color=colors[case], label=case)
            for x, v in zip(xs, pss):
                ax2.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=7)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.legend(fontsize=8)
    ax1.set_ylabel("ms")
    ax1.set_title(f"Create to first correct answer (P50 bars, P99 ticks; {r['runs']} starts)",
                  fontsize=9)
    ax2.set_ylabel("MiB")
    ax2.set_title("16 live instances: sum of PSS", fontsize=9)
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
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--functions", default=",".join(FUNCTIONS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args()
    r = {"runs": a.runs, "functions": {}}
    for fn in a.functions.split(","):
        r["functions"][fn] = {}
        for case in a.cases.split(","):
            r["functions"][fn][case] = run_case(fn, case, a)
    if a.no_report:
        json.dump(r, sys.stdout, indent=2)
        return
    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench/function.json"), "w") as f:
        json.dump(r, f, indent=2)
    chart = os.path.join(ROOT, "docs/img/function-bench")
    os.makedirs(os.path.dirname(chart), exist_ok=True)
    md = render(r)
    if draw(r, chart):
        md += "\n![function bench](img/function-bench.svg)\n"
    with open(os.path.join(ROOT, "docs/benchmarks-micro.md"), "a") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
