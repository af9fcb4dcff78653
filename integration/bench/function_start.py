#!/usr/bin/python3
"""Function starts through containerd's gRPC API (no ctr): Create -> first correct answer.

One case per run of this script (the function is a Python HTTP server, see function_bench.py):
  runc      io.containerd.runc.v2 in a fresh network namespace attached by the same CNI
            plugins (a platform's CNI integration): cold start
  pool      trenv shim, pooled sandbox, no template: cold function init in a warm sandbox
  template  trenv shim with io.trenv.template=auto (+ io.trenv.ready): restored from the
            function's template into a pooled sandbox; the first warm-up start builds it
  spare     as template, with [templates] spares = 1: the start takes over an instance
            restored ahead (frozen in its own sandbox); before each start the client waits,
            untimed, until the replacement spare is ready, and 50 ms more (a platform
            between bursts)
  criu      trenv shim, task created from an ordinary CRIU checkpoint of the function (taken
            through the API once): a plain restore, every page copied
Each start: snapshot prepare + container create, task create, task start, then GETs of
/count until the instance answers "1" (its own first request). Teardown is not timed.
With --memory N, N more instances are started and kept, and their memory is measured.
Prints one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pool_start  # noqa: E402  (the shared containerd API client)
from pool_start import Client, attach_netns, published_ip, release_netns, teardown  # noqa: E402

import grpc  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402
from containerd.services.containers.v1 import containers_pb2 as C  # noqa: E402
from containerd.services.snapshots.v1 import snapshots_pb2 as S  # noqa: E402
from containerd.services.tasks.v1 import tasks_pb2 as T  # noqa: E402

PHASES = ("network", "container", "task_create", "task_start", "answer")


def count_is_one(ip, deadline, path=b"/count", want=b"1"):
    import socket
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, 8080), timeout=0.5) as s:
                s.sendall(b"GET " + path + b" HTTP/1.0\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if b" 200 " in data:
                    return data.rsplit(b"\r\n\r\n", 1)[-1] == want
        except OSError:
            pass
        time.sleep(0.0005)
    return False


def rollup(pid, field):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cgroup_kib(pid):
    """Memory charged to the cgroup of `pid` (v1 memory controller, else the unified one)."""
    try:
        lines = open(f"/proc/{pid}/cgroup").read().splitlines()
    except OSError:
        return 0
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            f = f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes"
            break
        if ctrls == "":
            f = f"/sys/fs/cgroup{path}/memory.current"
    else:
        return 0
    try:
        return int(open(f).read()) >> 10
    except (OSError, ValueError):
        return 0


def wait_metric(path, name, at_least, timeout, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for line in open(path):
                if line.startswith(name) and float(line.split()[-1]) >= at_least:
                    return True
        except OSError:
            pass
        time.sleep(poll)
    return False


class Starter:
    def __init__(self, a):
        self.a = a
        self.c = Client(a.address, a.namespace)
        self.chain = self.c.chain_id(a.image)
        with open(a.spec) as f:
            self.base = json.load(f)
        self.base["root"]["readonly"] = False
        self.runtime = "io.containerd.runc.v2" if a.case == "runc" else "io.containerd.trenv.v2"
        self.checkpoint = None
        self.netns = {}

    def spec(self, cid):
        spec = json.loads(json.dumps(self.base))
        spec["process"]["args"] = ["python3", "-c", self.a.server]
        spec["process"]["terminal"] = False
        spec["linux"]["cgroupsPath"] = f"/{self.a.namespace}/{cid}"
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": 512 << 20}
        ann = {"io.trenv.function": self.a.function}
        if self.a.case in ("template", "spare"):
            ann["io.trenv.template"] = "auto"
            ann["io.trenv.ready"] = "http:8080/"
        spec["annotations"] = ann
        return spec

    def start(self, cid, fresh=False):
        """Starts one instance; (ip, pid, marks). `fresh`: wait for an answer that changes
        no state (the instance a checkpoint is taken of)."""
        spec = self.spec(cid)
        c = self.c
        t0 = time.monotonic()
        ip = None
        if self.a.case == "runc":
            ns = f"trenv-bench-{cid}"
            self.netns[cid] = ns
            ip = attach_netns(ns, cid, self.a.subnet, spec)
        t_net = time.monotonic()
        mounts = c.snapshots.Prepare(S.PrepareSnapshotRequest(
            snapshotter="overlayfs", key=cid, parent=self.chain), metadata=c.md).mounts
        c.containers.Create(C.CreateContainerRequest(container=C.Container(
            id=cid, image=self.a.image, runtime=C.Container.Runtime(name=self.runtime),
            spec=any_pb2.Any(type_url=pool_start.SPEC_TYPE, value=json.dumps(spec).encode()),
            snapshotter="overlayfs", snapshot_key=cid)), metadata=c.md)
        t_container = time.monotonic()
        req = T.CreateTaskRequest(container_id=cid, rootfs=mounts)
        if self.checkpoint is not None:
            req.checkpoint.CopyFrom(self.checkpoint)
        pid = c.tasks.Create(req, metadata=c.md).pid
        t_task = time.monotonic()
        pid = c.tasks.Start(T.StartRequest(container_id=cid), metadata=c.md).pid or pid
        t_run = time.monotonic()
        if ip is None:
            ip = published_ip(self.a.pool_dir, cid)
        probe = (b"/", b"hello") if fresh else (b"/count", b"1")
        if not count_is_one(ip, t_run + 30, *probe):
            raise RuntimeError(f"{cid}: no correct answer from {ip}")
        t_answer = time.monotonic()
        return ip, pid, (t0, t_net, t_container, t_task, t_run, t_answer)

    def stop(self, cid):
        teardown(self.c, cid)
        ns = self.netns.pop(cid, None)
        if ns:
            release_netns(ns, cid, self.a.subnet)

    def take_checkpoint(self):
        """An ordinary checkpoint of one initialised instance, through the API."""
        cid = f"bench-ckpt-{os.getpid()}"
        self.start(cid, fresh=True)
        r = self.c.tasks.Checkpoint(T.CheckpointTaskRequest(container_id=cid), metadata=self.c.md)
        for d in r.descriptors:
            if d.media_type.endswith("criu.tar"):
                self.checkpoint = d
        self.stop(cid)
        if self.checkpoint is None:
            raise RuntimeError(f"no CRIU checkpoint in {list(r.descriptors)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--namespace", default="trenv-bench")
    ap.add_argument("--case", choices=["runc", "pool", "template", "spare", "criu"], required=True)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory", type=int, default=0, help="live instances to measure")
    ap.add_argument("--image", required=True)
    ap.add_argument("--server", required=True, help="the function's Python source")
    ap.add_argument("--function", default="fn")
    ap.add_argument("--spec", required=True, help="base OCI spec (trenv spec)")
    ap.add_argument("--pool-dir", help="the trenv pool's state dir for the namespace")
    ap.add_argument("--subnet", default="10.77.0.0/16")
    a = ap.parse_args()
    with open(a.server) as f:
        a.server = f.read()

    s = Starter(a)
    keeper = f"bench-keep-{os.getpid()}"
    s.c.snapshots.View(S.ViewSnapshotRequest(snapshotter="overlayfs", key=keeper,
                                             parent=s.chain), metadata=s.c.md)
    result = {"ms": [], "task_ms": [], "errors": 0, "phases_ms": {k: [] for k in PHASES},
              "memory": None}
    if a.case == "criu":
        s.take_checkpoint()
    metrics = os.path.join(a.pool_dir or "", "metrics.prom")
    for i in range(a.warmup + a.runs):
        cid = f"bench-{a.case}-{os.getpid()}-{i}"
        if a.case == "spare" and i > 0:
            if not wait_metric(metrics, "trenv_template_spares{", 1, 10, poll=0.01):
                print("function_start: no spare ready", file=sys.stderr)
            time.sleep(0.05)  # the fill's worker and CRIU exit after the spare is ready
        try:
            _, _, marks = s.start(cid)
            if i >= a.warmup:
                result["ms"].append((marks[-1] - marks[0]) * 1000)
                # From the task's Create (containerd's CreateTask) on.
                result["task_ms"].append((marks[-1] - marks[2]) * 1000)
                for k, m0, m1 in zip(PHASES, marks, marks[1:]):
                    result["phases_ms"][k].append((m1 - m0) * 1000)
        except (grpc.RpcError, RuntimeError, subprocess.CalledProcessError) as e:
            result["errors"] += 1
            print(f"function_start: {e}", file=sys.stderr)
        finally:
            s.stop(cid)
        if i == 0 and a.case in ("template", "spare"):
            # The first instance's template is built in the background once it is ready.
            if not wait_metric(metrics, "trenv_template_builds_total", 1, 120):
                print("function_start: template not built", file=sys.stderr)
        if (i + 1) % 50 == 0:
            print(f"function_start: {a.case}: {i + 1}/{a.warmup + a.runs}", file=sys.stderr)
    if a.memory:
        live = []
        try:
            for i in range(a.memory):
                cid = f"bench-mem-{a.case}-{os.getpid()}-{i}"
                live.append(cid)
                _, pid, _ = s.start(cid)
                live[-1] = (cid, pid)
            time.sleep(1)
            pids = [p for _, p in live]
            result["memory"] = {
                "instances": len(pids),
                "pss_kib": sum(rollup(p, "Pss") for p in pids),
                "rss_kib": sum(rollup(p, "Rss") for p in pids),
                "cgroup_kib": sum(cgroup_kib(p) for p in pids),
            }
        except (grpc.RpcError, RuntimeError) as e:
            print(f"function_start: memory: {e}", file=sys.stderr)
        finally:
            for x in live:
                s.stop(x[0] if isinstance(x, tuple) else x)
    try:
        for line in open(metrics):
            if line.startswith("trenv_template_spares_taken_total"):
                result["spares_taken"] = int(float(line.split()[-1]))
    except OSError:
        pass
    s.c.snapshots.Remove(S.RemoveSnapshotRequest(snapshotter="overlayfs", key=keeper),
                         metadata=s.c.md)
    s.c.leases.Delete(pool_start.L.DeleteRequest(id=s.c.lease), metadata=s.c.md[:1])
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
