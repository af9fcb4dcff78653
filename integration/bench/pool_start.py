#!/usr/bin/python3
"""Start latency of networked containers through containerd's gRPC API (no ctr).

One case per run of this script:
  pool    trenv shim; the container gets a pooled sandbox (network already attached)
  runc    io.containerd.runc.v2; a fresh network namespace attached with the same CNI
          network (bridge + host-local + loopback) before the container is created, as a
          platform's CNI integration does
Each start: snapshot prepare -> container create -> task create -> task start (= "running"),
then TCP connects + HTTP GET until busybox httpd answers (= "http"). Teardown is not timed.
Prints one JSON object: {"running_ms": [...], "http_ms": [...], "errors": N}.
"""

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import grpc
from google.protobuf import any_pb2

from containerd.services.containers.v1 import containers_pb2 as C, containers_pb2_grpc as Cg
from containerd.services.content.v1 import content_pb2 as CT, content_pb2_grpc as CTg
from containerd.services.images.v1 import images_pb2 as I, images_pb2_grpc as Ig
from containerd.services.leases.v1 import leases_pb2 as L, leases_pb2_grpc as Lg
from containerd.services.snapshots.v1 import snapshots_pb2 as S, snapshots_pb2_grpc as Sg
from containerd.services.tasks.v1 import tasks_pb2 as T, tasks_pb2_grpc as Tg

SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
HTTPD = "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"
CNI_BIN = "/usr/lib/cni"
# Consecutive parts of "running": the client's own netns + CNI (runc case only), snapshot
# prepare + container record, task create (shim start + runtime create), task start.
PHASES = ("network", "container", "task_create", "task_start")


def cni(command, plugin, conf, cid, netns, ifname):
    conf = dict(conf, name="trenv", cniVersion="1.0.0")
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
        "CNI_IFNAME": ifname, "CNI_PATH": CNI_BIN, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    out = subprocess.run([os.path.join(CNI_BIN, plugin)], input=json.dumps(conf).encode(),
                         env=env, capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"CNI {plugin} {command}: {out.stdout.decode()} {out.stderr.decode()}")
    return json.loads(out.stdout or b"{}")


def bridge_conf(subnet):
    return {"type": "bridge", "bridge": "trenv0", "isGateway": True, "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}}


def attach_netns(netns, cid, subnet, spec):
    """A new named network namespace with lo and eth0 attached by CNI, as a platform's CNI
    integration makes for runc; points the spec at it and returns eth0's IP."""
    subprocess.run(["ip", "netns", "add", netns], check=True)
    path = f"/var/run/netns/{netns}"
    cni("ADD", "loopback", {"type": "loopback"}, cid, path, "lo")
    res = cni("ADD", "bridge", bridge_conf(subnet), cid, path, "eth0")
    for n in spec["linux"]["namespaces"]:
        if n["type"] == "network":
            n["path"] = path
    return res["ips"][0]["address"].split("/")[0]


def release_netns(netns, cid, subnet):
    path = f"/var/run/netns/{netns}"
    try:
        cni("DEL", "bridge", bridge_conf(subnet), cid, path, "eth0")
        cni("DEL", "loopback", {"type": "loopback"}, cid, path, "lo")
    except RuntimeError as e:
        print(f"bench: {e}", file=sys.stderr)
    subprocess.run(["ip", "netns", "del", netns], check=False)


class Client:
    def __init__(self, address, namespace):
        self.ch = grpc.insecure_channel("unix://" + address)
        self.ns = namespace
        # Everything this client creates belongs to one lease, so containerd's garbage
        # collector leaves the snapshots alone; deleting the lease releases them.
        self.leases = Lg.LeasesStub(self.ch)
        self.lease = f"trenv-bench-{os.getpid()}"
        self.leases.Create(L.CreateRequest(id=self.lease),
                           metadata=(("containerd-namespace", namespace),))
        self.md = (("containerd-namespace", namespace), ("containerd-lease", self.lease))
        self.containers = Cg.ContainersStub(self.ch)
        self.tasks = Tg.TasksStub(self.ch)
        self.snapshots = Sg.SnapshotsStub(self.ch)
        self.content = CTg.ContentStub(self.ch)
        self.images = Ig.ImagesStub(self.ch)

    def read(self, digest):
        return b"".join(r.data for r in self.content.Read(
            CT.ReadContentRequest(digest=digest), metadata=self.md))

    def chain_id(self, ref):
        img = self.images.Get(I.GetImageRequest(name=ref), metadata=self.md).image
        manifest = json.loads(self.read(img.target.digest))
        if "manifests" in manifest:
            manifest = json.loads(self.read(manifest["manifests"][0]["digest"]))
        config = json.loads(self.read(manifest["config"]["digest"]))
        ids = config["rootfs"]["diff_ids"]
        chain = ids[0]
        for d in ids[1:]:
            chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
        return chain


def http_ok(ip, deadline):
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, 8080), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(256):
                    return True
        except OSError:
            pass
        time.sleep(0.0005)
    return False


def published_ip(pool_dir, cid):
    path = os.path.join(pool_dir, "containers", cid)
    with open(path) as f:
        return json.load(f)["ip"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--namespace", default="trenv-bench")
    ap.add_argument("--case", choices=["pool", "runc"], required=True)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--image", default="docker.io/local/busybox:latest")
    ap.add_argument("--spec", required=True, help="base OCI spec (trenv spec)")
    ap.add_argument("--pool-dir", help="the trenv pool's state dir for the namespace")
    ap.add_argument("--subnet", default="10.77.0.0/16")
    ap.add_argument("--function", default="httpd")
    a = ap.parse_args()

    c = Client(a.address, a.namespace)
    chain = c.chain_id(a.image)
    with open(a.spec) as f:
        base = json.load(f)
    base["root"]["readonly"] = False
    runtime = "io.containerd.trenv.v2" if a.case == "pool" else "io.containerd.runc.v2"
    # A view on the image keeps its unpacked snapshot referenced (through the lease).
    keeper = f"bench-keep-{os.getpid()}"
    c.snapshots.View(S.ViewSnapshotRequest(snapshotter="overlayfs", key=keeper, parent=chain),
                     metadata=c.md)
    result = {"running_ms": [], "http_ms": [], "errors": 0,
              "phases_ms": {k: [] for k in PHASES}}
    for i in range(a.warmup + a.runs):
        cid = f"bench-{a.case}-{os.getpid()}-{i}"
        netns = None
        spec = json.loads(json.dumps(base))
        spec["process"]["args"] = ["sh", "-c", HTTPD]
        spec["process"]["terminal"] = False
        spec["linux"]["cgroupsPath"] = f"/{a.namespace}/{cid}"
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": 128 << 20}
        spec["annotations"] = {"io.trenv.function": a.function}
        try:
            t0 = time.monotonic()
            if a.case == "runc":
                netns = f"trenv-bench-{cid}"
                ip = attach_netns(netns, cid, a.subnet, spec)
            t_net = time.monotonic()
            mounts = c.snapshots.Prepare(S.PrepareSnapshotRequest(
                snapshotter="overlayfs", key=cid, parent=chain), metadata=c.md).mounts
            c.containers.Create(C.CreateContainerRequest(container=C.Container(
                id=cid, image=a.image, runtime=C.Container.Runtime(name=runtime),
                spec=any_pb2.Any(type_url=SPEC_TYPE, value=json.dumps(spec).encode()),
                snapshotter="overlayfs", snapshot_key=cid)), metadata=c.md)
            t_container = time.monotonic()
            c.tasks.Create(T.CreateTaskRequest(container_id=cid, rootfs=mounts), metadata=c.md)
            t_task = time.monotonic()
            c.tasks.Start(T.StartRequest(container_id=cid), metadata=c.md)
            t_run = time.monotonic()
            if a.case == "pool":
                ip = published_ip(a.pool_dir, cid)
            if not http_ok(ip, t_run + 10):
                raise RuntimeError(f"{cid}: no HTTP answer from {ip}")
            t_http = time.monotonic()
            if i >= a.warmup:
                result["running_ms"].append((t_run - t0) * 1000)
                result["http_ms"].append((t_http - t0) * 1000)
                marks = (t0, t_net, t_container, t_task, t_run)
                for k, a0, a1 in zip(PHASES, marks, marks[1:]):
                    result["phases_ms"][k].append((a1 - a0) * 1000)
        except Exception as e:  # counted, reported, and the run goes on
            result["errors"] += 1
            print(f"pool_start: {e}", file=sys.stderr)
        finally:
            teardown(c, cid)
            if netns:
                release_netns(netns, cid, a.subnet)
        if (i + 1) % 50 == 0:
            print(f"pool_start: {a.case}: {i + 1}/{a.warmup + a.runs}", file=sys.stderr)
    c.snapshots.Remove(S.RemoveSnapshotRequest(snapshotter="overlayfs", key=keeper),
                       metadata=c.md)
    c.leases.Delete(L.DeleteRequest(id=c.lease), metadata=c.md[:1])
    json.dump(result, sys.stdout)


def teardown(c, cid):
    def quiet(f):
        try:
            f()
        except grpc.RpcError:
            pass
    quiet(lambda: c.tasks.Kill(T.KillRequest(container_id=cid, signal=9, all=True), metadata=c.md))
    quiet(lambda: c.tasks.Wait(T.WaitRequest(container_id=cid), metadata=c.md, timeout=10))
    quiet(lambda: c.tasks.Delete(T.DeleteTaskRequest(container_id=cid), metadata=c.md))
    quiet(lambda: c.containers.Delete(C.DeleteContainerRequest(id=cid), metadata=c.md))
    quiet(lambda: c.snapshots.Remove(S.RemoveSnapshotRequest(snapshotter="overlayfs", key=cid),
                                     metadata=c.md))


if __name__ == "__main__":
    main()
