#!/usr/bin/env python3
"""Turns the serial logs of `make kmod-test` into a Markdown section: fault costs per page
(module vs plain mappings, page cache and DAX) and restore times from a template vs plain
CRIU, per kernel, with ratios. Usage: kmod-results.py WORKDIR [DOCS.md]; without DOCS.md the
section goes to stdout, with it the section between its markers is replaced."""
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- kmod-test:begin -->", "<!-- kmod-test:end -->"


def kv(line):
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)}


def parse(log):
    text = log.read_text(errors="replace").replace("\r", "")
    # The console's terminal resets (ESC c, ESC [...) precede the first line.
    text = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", text)
    out = {"kernel": None, "bench": {}, "dax_dev": {}, "dax_file": {}, "e2e": {}, "device": {},
           "rdma": {}, "sigbus_ms": None}
    for line in text.splitlines():
        if line.startswith("KERNEL "):
            out["kernel"] = line.split()[1]
        elif line.startswith("BENCH pages"):
            out["bench"] = kv(line)
        elif line.startswith("BENCH-DAX device"):
            out["dax_dev"] = kv(line)
        elif line.startswith("BENCH-DAX file"):
            out["dax_file"] = kv(line)
        elif line.startswith("BENCH-RDMA"):
            out["rdma"] = kv(line)
        m = re.match(r"RDMA server killed: reader got SIGBUS after ([0-9.]+) ms", line)
        if m:
            out["sigbus_ms"] = float(m.group(1))
        m = re.match(r"E2E (\w+)-(plain|template) (Restore time|Pages restored|TIME wall):? ([0-9.]+)", line)
        if m:
            pool, mode, what, val = m.groups()
            out["e2e"].setdefault((pool, mode), {})[what] = float(val)
        m = re.match(r"E2E (\w+) template pid=\d+ pages=(\d+) wrong=0 device=(\d+) device_after_write=(\d+)", line)
        if m:
            out["device"][m.group(1)] = tuple(int(x) for x in m.groups()[1:])
    return out


def us(ns):
    return f"{ns / 1000:.1f} µs"


def ratio(a, b):
    return f"{a / b:.1f}×" if a and b else "–"


def section(runs):
    lines = [BEGIN, "## pseudo_mm in the qemu guest (`make kmod-test`)", ""]
    lines += [
        "Produced by `KMOD_DOCS=docs/benchmarks.md make kmod-test`: each Debian kernel booted",
        "in qemu under software emulation (TCG) on this 2-core machine, so absolute numbers are",
        "only indicative; compare within a row. Fault costs are per page, best of 5 runs over",
        "4096 pages (page cache) or 1024 pages (DAX), one access per page; RDMA: 64 pages. Restores: a process",
        "with 64 MiB of private memory; *CRIU* is CRIU's own restore time (`--display-stats`),",
        "*wall* the whole `criu restore` command (CRIU's start-up dominates it under TCG).",
        "",
        "| kernel | read, page cache: module / plain private map | read, fsdax: module / plain private map | read, device DAX: module | first write, fsdax: module / plain | first write, device DAX |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        b, d, f = r["bench"], r["dax_dev"], r["dax_file"]
        lines.append(
            f"| {r['kernel']} | {us(b.get('read_template', 0))} / {us(b.get('read_file', 0))} "
            f"| {us(f.get('read_template', 0))} / {us(f.get('read_file', 0))} "
            f"(**{ratio(f.get('read_file'), f.get('read_template'))} faster**) "
            f"| {us(d.get('read_template', 0))} "
            f"| {us(f.get('write_template', 0))} / {us(f.get('write_file', 0))} "
            f"| {us(d.get('write_template', 0))} |"
        )
    lines += [
        "",
        "| kernel | pool | plain CRIU: CRIU / wall, pages written | template through the module: CRIU / wall, pages written | CRIU restore time ratio | restored pages that are device pages |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        for pool in ("tmpfs", "daxfs"):
            p = r["e2e"].get((pool, "plain"), {})
            t = r["e2e"].get((pool, "template"), {})
            dev = r["device"].get(pool)
            devs = f"{dev[1]} of {dev[0]} ({dev[2]} after one write)" if dev else "–"
            lines.append(
                f"| {r['kernel']} | {pool} "
                f"| {p.get('Restore time', 0) / 1000:.1f} / {p.get('TIME wall', 0):.0f} ms, {p.get('Pages restored', 0):.0f} "
                f"| {t.get('Restore time', 0) / 1000:.1f} / {t.get('TIME wall', 0):.0f} ms, {t.get('Pages restored', 0):.0f} "
                f"| **{ratio(p.get('Restore time'), t.get('Restore time'))}** | {devs} |"
            )
    lines += [
        "",
        "| kernel | remote pages, first touch, per page (one RDMA READ per 16 pages, Soft-RoCE) | same pages, cached in the module | server killed mid-faults: SIGBUS after |",
        "| --- | --- | --- | --- |",
    ]
    for r in runs:
        q = r["rdma"]
        sig = f"{r['sigbus_ms']:.0f} ms (timeout 2 s)" if r["sigbus_ms"] is not None else "–"
        lines.append(f"| {r['kernel']} | {us(q.get('fetch', 0))} | {us(q.get('cached', 0))} | {sig} |")
    lines += [
        "",
        "Reads through the module beat the kernel's own private mapping of an fsdax file, whose",
        "DAX fault path maps one page per trap, because the module maps 16 pages per trap. On",
        "tmpfs the kernel's fault-around (which maps up to 16 cached pages without a call into",
        "the file system) is still cheaper per page than the module's. A first write costs about",
        "the same or less through the module: it is a page copy. The restore from a template writes no page of",
        "the 16384 (only the few left in the images) and, on the fsdax pool, leaves every page on",
        "the device until the process writes it. Remote pages cost a round trip per 16 pages the",
        "first time (Soft-RoCE is the kernel's software RDMA, here under emulation), then are local; a",
        "lost server costs the faulting access one timeout, and later faults fail at once.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main():
    work = Path(sys.argv[1])
    runs = [parse(p) for p in sorted(work.glob("serial-*.log"))]
    runs = [r for r in runs if r["kernel"]]
    text = section(runs)
    if len(sys.argv) < 3:
        sys.stdout.write(text)
        return
    docs = Path(sys.argv[2])
    old = docs.read_text() if docs.exists() else "# trenv benchmarks\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    docs.write_text(new)
    print(f"kmod-results: {docs} updated")


if __name__ == "__main__":
    main()
