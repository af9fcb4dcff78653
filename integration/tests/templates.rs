//! Memory templates through the `trenv` binary with real CRIU 4.2.1: a Python HTTP server
//! (the project's offline Debian + Python image) is checkpointed after start-up, made a
//! template in a tmpfs pool, and restored 16 times at once; every instance serves, keeps its
//! own state, and they share the template's memory. A Node server's heap, turned into a
//! template, stays correct while V8 collects and gives pages back with madvise.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use trenv_integration::bundle::{cgroup_path, default_config, node_image, python_image};
use trenv_integration::leaks::{assert_container_gone, mounts_with, processes_with};
use trenv_integration::netns::{http_get, loopback_up};
use trenv_integration::runtime::Runtime;
use trenv_integration::{require_root, unique_id, wait_for};

/// The function: a Python HTTP server holding 32 MiB of state (shared with the benchmark).
const SERVER: &str = include_str!("../bench/template_server.py");

/// A Node HTTP server with a large heap, for what V8's garbage collector does under a
/// template (it gives heap pages back with madvise).
const NODE_SERVER: &str = r#"
const http = require('http');
const crypto = require('crypto');
const big = Buffer.alloc(16 << 20);
for (let i = 0; i < big.length; i += 512) big[i] = (i >> 9) & 255;
let objs = [];
for (let i = 0; i < 300000; i++) objs.push({ i, s: 'v' + i });
const digest = () => crypto.createHash('sha256').update(big).digest('hex') + '|' +
  objs.length + '|' + objs[123456].s + '|' + objs.reduce((a, o) => a + o.i, 0);
function churn() {
  // Garbage by the hundred megabytes, a full collection that returns pages to the kernel,
  // then fresh memory that must read as zeros.
  let made = 0;
  for (let r = 0; r < 10; r++) {
    let junk = [];
    for (let i = 0; i < 50000; i++) junk.push({ i, t: 'x'.repeat(i % 64) });
    made += junk.length;
  }
  objs = objs.map(o => ({ i: o.i, s: o.s }));
  global.gc();
  const z = Buffer.alloc(8 << 20);
  for (let i = 0; i < z.length; i++) if (z[i] !== 0) throw new Error('Buffer.alloc not zero');
  const arr = new Float64Array(1 << 20);
  for (let i = 0; i < arr.length; i++) if (arr[i] !== 0) throw new Error('typed array not zero');
  return made + '|' + digest();
}
http.createServer((req, res) => {
  let body;
  try {
    body = req.url === '/sum' ? digest() : req.url === '/churn' ? churn() : 'hello';
  } catch (e) {
    body = 'error: ' + e.message;
  }
  // No keep-alive: a checkpoint right after an answer must find no open connection.
  res.setHeader('Connection', 'close');
  res.end(body);
}).listen(8080);
"#;

/// A function to make templates of: its image, its command and its server source.
struct Function {
    image: PathBuf,
    args: &'static [&'static str],
    file: &'static str,
    source: &'static str,
}

impl Function {
    fn python() -> Self {
        Self {
            image: python_image(),
            args: &["python3", "/app/server.py"],
            file: "server.py",
            source: SERVER,
        }
    }

    fn node() -> Self {
        Self {
            image: node_image(),
            args: &["node", "--expose-gc", "/app/server.js"],
            file: "server.js",
            source: NODE_SERVER,
        }
    }
}

/// Everything a test needs: a state root, a store, a pool, the app directory. The pool's
/// tmpfs is unmounted on drop.
struct Setup {
    rt: Runtime,
    dir: tempfile::TempDir,
    function: Function,
}

impl Setup {
    fn new() -> Self {
        Self::with(Function::python())
    }

    fn with(function: Function) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trenv-it-tpl-")
            .tempdir()
            .expect("tmp");
        std::fs::create_dir_all(dir.path().join("app")).expect("app");
        std::fs::write(dir.path().join("app").join(function.file), function.source)
            .expect("server");
        Self {
            rt: Runtime::trenv(),
            dir,
            function,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn store(&self) -> String {
        self.path("store").to_string_lossy().into_owned()
    }

    fn pool_dir(&self) -> String {
        self.path("pool").to_string_lossy().into_owned()
    }

    /// A bundle (config.json only) running the server on the shared read-only Python rootfs.
    fn bundle(&self, id: &str) -> PathBuf {
        let b = self.path(&format!("bundles/{id}"));
        std::fs::create_dir_all(&b).expect("bundle");
        let mut cfg = default_config(id, self.function.args);
        cfg["root"] = json!({ "path": self.function.image.join("rootfs"), "readonly": true });
        cfg["mounts"].as_array_mut().expect("mounts").push(json!({
            "destination": "/app", "type": "bind", "source": self.path("app"),
            "options": ["rbind", "ro"]
        }));
        cfg["mounts"].as_array_mut().expect("mounts").push(json!({
            "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]
        }));
        std::fs::write(b.join("config.json"), cfg.to_string()).expect("config");
        b
    }

    fn template(&self, args: &[&str]) -> std::process::Output {
        let mut c = self.rt.cmd();
        c.args(["template"]).args(args);
        c.env("TRENV_TEMPLATE_STORE", self.store())
            .env("TRENV_MEMPOOL_DIR", self.pool_dir())
            .env("TRENV_MEMPOOL_CAPACITY", "1G");
        c.output().expect("trenv template")
    }

    fn template_ok(&self, args: &[&str]) -> String {
        let out = self.template(args);
        assert!(
            out.status.success(),
            "trenv template {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn restore(&self, template: &str, id: &str) -> std::process::Output {
        self.restore_in(template, id, None)
    }

    /// A restore whose bundle joins the network namespace at `netns` (as a pooled sandbox's
    /// does) instead of having its own.
    fn restore_in(&self, template: &str, id: &str, netns: Option<&str>) -> std::process::Output {
        let bundle = self.bundle(id);
        if let Some(path) = netns {
            let file = bundle.join("config.json");
            let mut cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&file).expect("config")).expect("json");
            for ns in cfg["linux"]["namespaces"]
                .as_array_mut()
                .expect("namespaces")
            {
                if ns["type"] == "network" {
                    ns["path"] = json!(path);
                }
            }
            std::fs::write(&file, cfg.to_string()).expect("config");
        }
        let mut c = self.rt.cmd();
        c.args([
            "restore",
            "--detach",
            "--template",
            template,
            "--template-store",
        ])
        .arg(self.store())
        .arg("--bundle")
        .arg(&bundle)
        .arg(id);
        c.output().expect("trenv restore")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let pool = self.path("pool");
        let _ = Command::new("umount").arg("-l").arg(&pool).status();
    }
}

fn pid_of(rt: &Runtime, id: &str) -> i64 {
    rt.state(id)["pid"].as_i64().expect("pid")
}

/// A GET inside the network namespace of `pid` (its loopback brought up first).
fn get(pid: i64, path: &str) -> Option<String> {
    let pid = pid.to_string();
    loopback_up(&pid);
    http_get(&pid, path)
}

/// kB of a field of /proc/PID/smaps_rollup.
fn rollup(pid: i64, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The CRIU log a failed restore points at.
fn criu_log(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr).replace("\\\"", "\"");
    text.split("CRIU log \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|log| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        })
        .unwrap_or_default()
}

fn kill_and_delete(rt: &Runtime, id: &str) {
    let _ = rt.run(&["kill", id, "KILL"]);
    let _ = wait_for(Duration::from_secs(10), || {
        (rt.status(id) == "stopped").then_some(())
    });
    rt.ok(&["delete", "--force", id]);
    assert_container_gone(rt, id);
}

/// Runs the server, checkpoints it once it answers, builds template `name` from it.
fn make_template(s: &Setup, name: &str) -> String {
    let id = unique_id("tpl-src");
    let bundle = s.bundle(&id);
    s.rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &bundle.to_string_lossy(),
        &id,
    ]);
    let pid = pid_of(&s.rt, &id);
    let sum =
        wait_for(Duration::from_secs(60), || get(pid, "/sum")).expect("server never answered");
    // The server closes its side of the probe's connection after answering; a dump before
    // that would meet a connected socket.
    let settled = wait_for(Duration::from_secs(10), || {
        let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
        let open = tcp
            .lines()
            .skip(1)
            .any(|l| matches!(l.split_whitespace().nth(3), Some("01" | "08")));
        (!open).then_some(())
    });
    assert!(settled.is_some(), "the probe's connection never closed");
    let images = s.path(&format!("ckpt-{name}"));
    s.rt.ok(&["checkpoint", "--image-path", &images.to_string_lossy(), &id]);
    assert_container_gone(&s.rt, &id);
    s.template_ok(&[
        "build",
        "--from-checkpoint",
        &images.to_string_lossy(),
        "--bundle",
        &bundle.to_string_lossy(),
        "--name",
        name,
    ]);
    sum
}

#[test]
fn sixteen_instances_restore_from_one_template_and_share_it() {
    require_root();
    let s = Setup::new();
    let sum = make_template(&s, "py");
    let ls: serde_json::Value =
        serde_json::from_str(&s.template_ok(&["ls", "--format", "json"])).expect("ls json");
    assert_eq!(ls[0]["names"], json!(["py"]), "{ls}");
    assert!(
        ls[0]["pool_bytes"].as_u64().expect("pool bytes") >= 32 << 20,
        "{ls}"
    );

    // The container's own tmpfs mounts are staged by trenv at restore, /dev too (the masked
    // paths, binds of its /dev/null, are made by CRIU from the staged mount).
    let m: serde_json::Value =
        serde_json::from_str(&s.template_ok(&["inspect", "py"])).expect("inspect json");
    let staged: Vec<&str> = m["report"]["tmpfs"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["mountpoint"].as_str()).collect())
        .unwrap_or_default();
    assert!(staged.contains(&"/tmp") && staged.contains(&"/dev"), "{m}");

    let ids: Vec<String> = (0..16).map(|i| unique_id(&format!("tpl-{i}"))).collect();
    let outs: Vec<std::process::Output> = std::thread::scope(|sc| {
        let hs: Vec<_> = ids
            .iter()
            .map(|id| {
                let s = &s;
                sc.spawn(move || s.restore("py", id))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for (id, out) in ids.iter().zip(&outs) {
        assert!(
            out.status.success(),
            "restore {id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            criu_log(&out.stderr)
        );
    }
    let pids: Vec<i64> = ids.iter().map(|id| pid_of(&s.rt, id)).collect();
    // Masked paths are still binds of the (staged) /dev/null.
    let masked =
        std::fs::metadata(format!("/proc/{}/root/proc/timer_list", pids[0])).expect("timer_list");
    assert!(masked.file_type().is_char_device(), "{masked:?}");
    assert_eq!(masked.rdev(), nix::sys::stat::makedev(1, 3));
    // Each in its own container's cgroup (CRIU leaves a flat template's cgroups to trenv).
    for (id, &pid) in ids.iter().zip(&pids) {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cg.lines()
                .any(|l| (l.contains(":memory:") || l.starts_with("0::"))
                    && l.ends_with(id.as_str())),
            "{id}: {cg}"
        );
    }
    // Every instance serves the template's state and then its own.
    for (i, &pid) in pids.iter().enumerate() {
        assert_eq!(
            get(pid, "/sum").as_deref(),
            Some(sum.as_str()),
            "instance {i}"
        );
        assert_eq!(get(pid, "/count").as_deref(), Some("1"));
        // /tmp as the checkpoint had it (staged by trenv, not CRIU's tar).
        assert_eq!(
            get(pid, "/tmpfile").as_deref(),
            Some("init"),
            "instance {i}"
        );
        assert_eq!(
            get(pid, &format!("/write/inst{i:02}")).as_deref(),
            Some("ok")
        );
    }
    for (i, &pid) in pids.iter().enumerate() {
        let tag = format!("inst{i:02}");
        let hex: String = tag.bytes().map(|b| format!("{b:02x}")).collect();
        let read = get(pid, "/read").unwrap_or_default();
        assert!(
            read.starts_with(&hex) && read.ends_with(&format!("|{tag}")),
            "instance {i} sees another's writes: {read}"
        );
        assert_eq!(get(pid, "/count").as_deref(), Some("2"));
        assert_eq!(
            get(pid, "/tmpfile"),
            Some(tag),
            "instance {i}: /tmp is shared"
        );
    }
    let rss: u64 = pids.iter().map(|&p| rollup(p, "Rss:")).sum();
    let pss: u64 = pids.iter().map(|&p| rollup(p, "Pss:")).sum();
    println!("16 instances: RSS {} MiB, PSS {} MiB", rss >> 10, pss >> 10);
    // Each instance holds the 32 MiB array and the interpreter's heap: shared, they cost a
    // fraction of their RSS.
    assert!(
        pss * 3 < rss,
        "little sharing: PSS {pss} kB of RSS {rss} kB"
    );

    // In use: the template stays.
    let out = s.template(&["rm", "py"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    for id in &ids {
        kill_and_delete(&s.rt, id);
    }
    s.template_ok(&["rm", "py"]);
    assert!(s.template_ok(&["ls"]).lines().count() == 1);
    assert!(processes_with(&s.store()).is_empty());
}

#[test]
fn a_damaged_template_is_refused_with_its_reason_and_leaves_nothing() {
    require_root();
    let s = Setup::new();
    make_template(&s, "bad");
    let manifest: serde_json::Value =
        serde_json::from_str(&s.template_ok(&["inspect", "bad"])).expect("inspect");
    let region = PathBuf::from(manifest["regions"][0]["path"].as_str().expect("region"));
    let mut bytes = std::fs::read(&region).expect("region");
    let at = bytes.iter().position(|b| *b != 0).expect("data");
    bytes[at] ^= 0x5a;
    std::fs::write(&region, &bytes).expect("write");
    let id = unique_id("tpl-bad");
    let out = s.restore("bad", &id);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reason: corrupt") && err.contains("digest mismatch"),
        "{err}"
    );
    assert!(s.rt.fail(&["state", &id]).contains("does not exist"));
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory{}", cgroup_path(&id))).exists());
    assert!(mounts_with(&id).is_empty());
    let out = s.restore("nope", &id);
    assert!(String::from_utf8_lossy(&out.stderr).contains("reason: missing"));
    std::fs::remove_file(&region).expect("rm region");
    let out = s.restore("bad", &id);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reason: pool-missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.template_ok(&["rm", "bad"]);
}

/// `--from-container` checkpoints a running container (it keeps running) and builds the
/// template keyed by its bundle's spec; a second build of the same container state only
/// adds a name.
#[test]
fn a_running_container_becomes_a_template_and_keeps_running() {
    require_root();
    let s = Setup::new();
    let id = unique_id("tpl-live");
    let b = trenv_integration::bundle::Bundle::new(
        &id,
        &["sh", "-c", "x=$(seq 1 50000); while true; do sleep 1; done"],
    );
    s.rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    std::thread::sleep(Duration::from_millis(500));
    s.template_ok(&["build", "--from-container", &id, "--name", "live"]);
    assert_eq!(s.rt.status(&id), "running");
    s.template_ok(&["build", "--from-container", &id, "--name", "live2"]);
    let ls: serde_json::Value =
        serde_json::from_str(&s.template_ok(&["ls", "--format", "json"])).expect("ls");
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    assert_eq!(ls[0]["names"], json!(["live", "live2"]));
    let copy = b.clone_as(&unique_id("tpl-live-r"));
    let rid = copy.id.clone();
    let mut c = s.rt.cmd();
    c.args([
        "restore",
        "--detach",
        "--template",
        "live",
        "--template-store",
    ])
    .arg(s.store())
    .arg("--bundle")
    .arg(copy.path())
    .arg(&rid);
    let out = c.output().expect("restore");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        criu_log(&out.stderr)
    );
    assert_eq!(s.rt.status(&rid), "running");
    let maps =
        std::fs::read_to_string(format!("/proc/{}/maps", pid_of(&s.rt, &rid))).expect("maps");
    assert!(
        maps.contains(&s.pool_dir()),
        "nothing mapped from the pool:\n{maps}"
    );
    kill_and_delete(&s.rt, &rid);
    kill_and_delete(&s.rt, &id);
    for n in ["live", "live2"] {
        s.template_ok(&["rm", n]);
    }
    s.template_ok(&["gc"]);
}

/// MADV_DONTNEED on a template-backed mapping brings back the template's data, not zeros.
/// V8 gives pages of its heap back that way after a full collection: instances restored from
/// a template churn through hundreds of megabytes, collect, and check that new memory reads
/// as zeros and their state is intact, several times over.
#[test]
fn a_node_heap_from_a_template_survives_garbage_collection() {
    require_root();
    let s = Setup::with(Function::node());
    let sum = make_template(&s, "node");
    let ids: Vec<String> = (0..2)
        .map(|i| unique_id(&format!("tpl-node-{i}")))
        .collect();
    // The second instance joins a network namespace made beforehand, as in a pooled sandbox.
    let netns = NetNs::new(&unique_id("tpl-netns"));
    let mut churned = None;
    for (n, id) in ids.iter().enumerate() {
        let joined = (n == 1).then(|| netns.path());
        let out = s.restore_in("node", id, joined.as_deref());
        assert!(
            out.status.success(),
            "restore {id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            criu_log(&out.stderr)
        );
        let pid = pid_of(&s.rt, id);
        if let Some(path) = &joined {
            let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).expect("netns");
            assert_eq!(ino(&format!("/proc/{pid}/ns/net")), ino(path), "{id}");
        }
        assert_eq!(get(pid, "/sum").as_deref(), Some(sum.as_str()), "{id}");
        for round in 0..3 {
            let got = get(pid, "/churn").unwrap_or_default();
            assert!(!got.starts_with("error"), "{id} round {round}: {got}");
            // Every round of every instance computes the same answer.
            let want = churned.get_or_insert_with(|| got.clone());
            assert_eq!(&got, want, "{id} round {round}");
        }
        assert_eq!(get(pid, "/sum").as_deref(), Some(sum.as_str()), "{id}");
    }
    // ... which is what a cold instance computes too.
    let cold = unique_id("tpl-node-cold");
    let bundle = s.bundle(&cold);
    s.rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &bundle.to_string_lossy(),
        &cold,
    ]);
    let pid = pid_of(&s.rt, &cold);
    wait_for(Duration::from_secs(60), || get(pid, "/sum")).expect("cold node never answered");
    assert_eq!(get(pid, "/churn"), churned);
    for id in ids.iter().chain([&cold]) {
        kill_and_delete(&s.rt, id);
    }
    s.template_ok(&["rm", "node"]);
}

/// A named network namespace (`ip netns`) with its loopback up, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(name: &str) -> Self {
        let st = Command::new("ip").args(["netns", "add", name]).status();
        assert!(st.is_ok_and(|s| s.success()), "ip netns add {name}");
        let ns = Self(name.to_string());
        let st = Command::new("ip")
            .args(["-n", name, "link", "set", "lo", "up"])
            .status();
        assert!(st.is_ok_and(|s| s.success()));
        ns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
