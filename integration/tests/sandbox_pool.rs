//! The sandbox pool through a real containerd with real CNI: reuse across images, purge
//! between functions, networking, exhaustion, restarts, drain, broken holders, leaks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use trenv_integration::containerd::{Containerd, BUSYBOX, PYTHON, TRENV_RUNTIME};
use trenv_integration::isolation::DIRTY;
use trenv_integration::{leaks, require_root, unique_id, wait_for};

/// `ctr run -d --runtime trenv FLAGS IMAGE ID ARGS`, waiting until the task runs.
fn run(c: &Containerd, flags: &[&str], image: &str, id: &str, args: &[&str]) {
    let mut all = vec!["run", "-d", "--runtime", TRENV_RUNTIME];
    all.extend_from_slice(flags);
    all.extend_from_slice(&[image, id]);
    all.extend_from_slice(args);
    c.ctr_ok(&all);
    c.wait_task(id, "RUNNING");
}

/// A private containerd whose trenv shim starts with these `[pool]` settings, with busybox.
fn pool_containerd(pool_toml: &str) -> Containerd {
    let c = Containerd::start();
    c.set_pool_config(pool_toml);
    c.import_busybox();
    c
}

/// `ctr run --rm --runtime trenv busybox ID true`.
fn run_rm(c: &Containerd, id: &str) {
    c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        TRENV_RUNTIME,
        BUSYBOX,
        id,
        "true",
    ]);
}

/// What the pool published for a container (`<pool>/containers/<id>`).
fn published(c: &Containerd, id: &str) -> Value {
    let path = c.pool_dir().join("containers").join(id);
    let text = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&path).ok()
    })
    .unwrap_or_else(|| panic!("no address published for {id}"));
    serde_json::from_str(&text).expect("published JSON")
}

fn sandboxes(c: &Containerd) -> Vec<Value> {
    let out = c.sandbox_cmd(&["ls", "--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ls JSON")
}

fn sandbox(c: &Containerd, id: &str) -> Option<Value> {
    sandboxes(c).into_iter().find(|s| s["id"] == id)
}

/// Waits until the sandbox is idle again (purged) after its container was deleted.
fn wait_idle(c: &Containerd, id: &str) {
    let idle = wait_for(Duration::from_secs(10), || {
        sandbox(c, id).filter(|s| s["state"] == "idle").map(|_| ())
    });
    assert!(
        idle.is_some(),
        "sandbox {id} not idle: {:?}",
        sandbox(c, id)
    );
}

/// A plain HTTP GET over TCP from the host, retried while the server starts.
fn http_get(ip: &str, port: u16) -> String {
    trenv_integration::http::get(ip, port, "/", Duration::from_secs(10))
}

fn ctr_fails(c: &Containerd, args: &[&str]) -> String {
    let out = c.ctr(args);
    assert!(!out.status.success(), "ctr {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn memory_limit(cgroup: &str) -> String {
    let path = Path::new("/sys/fs/cgroup/memory")
        .join(cgroup.trim_start_matches('/'))
        .join("memory.limit_in_bytes");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn busybox_then_python_share_one_sandbox() {
    require_root();
    let c = pool_containerd("min_idle = 0\nmax_idle = 2");
    c.import_python();
    let a = unique_id("pool-a");
    run(
        &c,
        &[
            "--memory-limit",
            "67108864",
            "--annotation",
            "io.trenv.function=web-a",
        ],
        BUSYBOX,
        &a,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-a > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    let pa = published(&c, &a);
    let ip = pa["ip"].as_str().expect("ip").to_string();
    assert!(http_get(&ip, 8080).contains("hello-a"));
    let sb = pa["sandbox"].as_str().expect("sandbox").to_string();
    let holder = sandbox(&c, &sb).expect("record")["holder"].clone();
    c.kill_and_remove(&a);
    wait_idle(&c, &sb);

    let b = unique_id("pool-b");
    run(
        &c,
        &["--memory-limit", "33554432", "--env", "FOO=bar-b"],
        PYTHON,
        &b,
        &[],
    );
    let pb = published(&c, &b);
    assert_eq!(pb["sandbox"], pa["sandbox"], "B did not get A's sandbox");
    assert_eq!(pb["ip"], pa["ip"]);
    let record = sandbox(&c, &sb).expect("record");
    assert_eq!(
        record["holder"], holder,
        "same holder and network namespace"
    );
    assert_eq!(record["state"], "in-use");
    assert_eq!(record["container"].as_str(), Some(b.as_str()));
    assert!(http_get(&ip, 8080).contains("hello from"));
    // B's own rootfs, env and PID namespace (it is PID 1); A's files are not there.
    let init = c.exec_ok(&b, "e1", &["cat", "/proc/1/cmdline"]);
    assert!(init.starts_with("python3"), "{init}");
    let env = c.exec_ok(
        &b,
        "e2",
        &[
            "sh",
            "-c",
            "echo $FOO; cat /etc/debian_version; ls /www 2>&1 || true",
        ],
    );
    assert!(env.starts_with("bar-b\n"), "{env}");
    assert!(env.contains("No such file"), "{env}");
    assert_eq!(
        memory_limit(record["cgroup"].as_str().expect("cgroup")),
        "33554432"
    );
    assert!(
        c.pool_metric("trenv_pool_acquisitions_total{namespace=\"trenv-it\",result=\"repurpose\"}")
            >= 1.0
    );
    c.kill_and_remove(&b);
    c.assert_gone(&a);
    c.assert_gone(&b);
}

#[test]
fn purge_leaves_nothing_for_the_next_function() {
    require_root();
    let c = pool_containerd("min_idle = 0\nmax_idle = 1");
    c.import_python();
    let a = unique_id("dirty-a");
    run(
        &c,
        &["--cap-add", "CAP_SYS_ADMIN"],
        PYTHON,
        &a,
        &["python3", "-c", DIRTY],
    );
    let ready = wait_for(Duration::from_secs(10), || {
        c.ctr(&["task", "exec", "--exec-id", "r", &a, "cat", "/tmp/ready"])
            .status
            .success()
            .then_some(())
    });
    assert!(ready.is_some(), "A did not get ready");
    let seen = c.exec_ok(
        &a,
        "e1",
        &["sh", "-c", "hostname; cat /proc/sysvipc/shm | wc -l"],
    );
    assert_eq!(seen, "tenant-a\n2\n", "A's changes are in place");
    let sb = published(&c, &a)["sandbox"].clone();
    c.kill_and_remove(&a);
    wait_idle(&c, sb.as_str().expect("sandbox"));

    let b = unique_id("clean-b");
    run(&c, &[], BUSYBOX, &b, &["sleep", "999"]);
    assert_eq!(
        published(&c, &b)["sandbox"],
        sb,
        "B did not get A's sandbox"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let check = |cmd: &str| c.exec_ok(&b, &unique_id("x"), &["sh", "-c", cmd]);
    assert_eq!(check("hostname").trim(), host.trim(), "hostname not reset");
    trenv_integration::isolation::assert_no_dirty_ipc_or_files(check);
    let ps = check("ps -o pid,args");
    assert!(
        !ps.contains("sleep 1000") && !ps.contains("python3"),
        "{ps}"
    );
    // No listening socket left in the shared network namespace (LISTEN is state 0A).
    let tcp = check("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$4 == \"0A\"' | wc -l");
    assert_eq!(tcp.trim(), "0", "listening sockets left");
    c.kill_and_remove(&b);
    c.assert_gone(&b);
}

/// A listening socket left in a sandbox's network namespace by a process outside it (here
/// the test, which created it there and left) survives the purge's kills: the check must
/// catch it, and the sandbox must be destroyed rather than handed to the next function.
#[test]
fn a_socket_the_purge_cannot_remove_destroys_the_sandbox() {
    require_root();
    let c = pool_containerd("min_idle = 0\nmax_idle = 1");
    // With min_idle = 0 an empty pool lets its shim retire, which removes metrics.prom
    // with the pool's state; a task outside the pool keeps the shim (and the file) for
    // the checks below.
    let keeper = unique_id("sock-keep");
    run(
        &c,
        &["--annotation", "io.trenv.pool=off"],
        BUSYBOX,
        &keeper,
        &["sleep", "999"],
    );
    let a = unique_id("sock-a");
    run(&c, &[], BUSYBOX, &a, &["sleep", "999"]);
    let sb = published(&c, &a)["sandbox"]
        .as_str()
        .expect("sandbox")
        .to_string();
    let holder = sandbox(&c, &sb).expect("record")["holder"]["pid"]
        .as_i64()
        .expect("holder pid");
    let netns = format!("/proc/{holder}/ns/net");
    let planted = std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).expect("sandbox netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::net::TcpListener::bind("0.0.0.0:7777").expect("listen in the sandbox")
    })
    .join()
    .expect("planting thread");
    let failures = "trenv_pool_purge_failures_total{namespace=\"trenv-it\"}";
    let before = c.pool_metric(failures);
    c.kill_and_remove(&a);
    let destroyed = wait_for(Duration::from_secs(10), || {
        sandbox(&c, &sb).is_none().then_some(())
    });
    assert!(destroyed.is_some(), "kept: {:?}", sandbox(&c, &sb));
    // metrics.prom is rewritten by the pool worker after the teardown.
    let counted = wait_for(Duration::from_secs(5), || {
        (c.pool_metric(failures) > before).then_some(())
    });
    assert!(
        counted.is_some(),
        "purge failure not counted: {}\n{}",
        std::fs::read_to_string(c.pool_dir().join("metrics.prom")).unwrap_or_default(),
        c.log()
            .lines()
            .filter(|l| l.contains("sandbox") || l.contains("purge"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(planted);
    let b = unique_id("sock-b");
    run(&c, &[], BUSYBOX, &b, &["sleep", "999"]);
    assert_ne!(published(&c, &b)["sandbox"], sb.as_str(), "reused");
    c.kill_and_remove(&b);
    c.assert_gone(&b);
    c.kill_and_remove(&keeper);
    c.assert_gone(&keeper);
}

/// The read-only cgroup mount CRI, nerdctl and `runc spec` put in specs.
const CGROUP_MOUNT: &str =
    "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev";

/// v1 hierarchies under /sys/fs/cgroup (what a container's cgroup mount shows).
fn v1_hierarchies() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut names: Vec<String> = info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split_whitespace().nth(4)?;
            (post.starts_with("cgroup ") && mp.starts_with("/sys/fs/cgroup/"))
                .then(|| mp.rsplit('/').next().unwrap_or_default().to_string())
        })
        .collect();
    names.sort();
    names
}

#[test]
fn each_instance_sees_its_own_fresh_cgroup() {
    require_root();
    let c = pool_containerd("min_idle = 0\nmax_idle = 1");
    let a = unique_id("cg-a");
    let mount = ["--mount", CGROUP_MOUNT];
    let limit_a = ["--memory-limit", "67108864"];
    run(
        &c,
        &[&mount[..], &limit_a[..]].concat(),
        BUSYBOX,
        &a,
        &["sleep", "999"],
    );
    let sb = published(&c, &a)["sandbox"].clone();
    let sh = |id: &str, cmd: &str| c.exec_ok(id, &unique_id("x"), &["sh", "-c", cmd]);
    let hierarchies = v1_hierarchies();
    let views = || leaks::mounts_with(&c.pool_dir().join("cgroup-views").display().to_string());
    if !hierarchies.is_empty() {
        // one view per sandbox: its tmpfs and one bind per hierarchy
        assert_eq!(views().len(), 1 + hierarchies.len(), "{:?}", views());
        let listed: Vec<String> = sh(&a, "ls /sys/fs/cgroup")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert_eq!(listed, hierarchies);
    }
    assert_eq!(
        sh(&a, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes").trim(),
        "67108864"
    );
    // the container's processes, seen from its PID namespace
    let procs = sh(&a, "cat /sys/fs/cgroup/memory/cgroup.procs");
    assert!(procs.lines().any(|l| l == "1"), "{procs}");
    assert!(
        sh(&a, "mkdir /sys/fs/cgroup/memory/escape 2>&1; echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes 2>&1; true")
            .contains("Read-only"),
        "the cgroup mount is writable"
    );
    // charge 24 MiB to A's cgroup (tmpfs pages count against it)
    sh(
        &a,
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count=24 2>/dev/null; sync",
    );
    let peak_a: u64 = sh(&a, "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes")
        .trim()
        .parse()
        .expect("max usage");
    assert!(peak_a >= 24 << 20, "{peak_a}");
    c.kill_and_remove(&a);
    wait_idle(&c, sb.as_str().expect("sandbox"));

    let b = unique_id("cg-b");
    let limit_b = ["--memory-limit", "33554432"];
    run(
        &c,
        &[&mount[..], &limit_b[..]].concat(),
        BUSYBOX,
        &b,
        &["sleep", "999"],
    );
    assert_eq!(
        published(&c, &b)["sandbox"],
        sb,
        "B did not get A's sandbox"
    );
    assert_eq!(
        sh(&b, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes").trim(),
        "33554432",
        "B sees A's limit"
    );
    let peak_b: u64 = sh(&b, "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes")
        .trim()
        .parse()
        .expect("max usage");
    assert!(peak_b < 16 << 20, "B sees A's counters: {peak_b}");
    if !hierarchies.is_empty() {
        assert_eq!(
            views().len(),
            1 + hierarchies.len(),
            "views stacked: {:?}",
            views()
        );
    }
    c.kill_and_remove(&b);
    c.assert_gone(&b);
}

#[test]
fn exhausted_and_full_pools_never_fail_a_container() {
    require_root();
    let c = pool_containerd("min_idle = 0\nmax_idle = 4\nmax_sandboxes = 2");
    let ids: Vec<String> = (0..3).map(|i| unique_id(&format!("full{i}"))).collect();
    for id in &ids {
        run(&c, &[], BUSYBOX, id, &["sleep", "1000"]);
    }
    // The idle pool was empty: two new sandboxes, then the pool is full and the third
    // container runs in namespaces of its own.
    let s0 = published(&c, &ids[0])["sandbox"].clone();
    let s1 = published(&c, &ids[1])["sandbox"].clone();
    assert_ne!(s0, s1);
    assert!(!c.pool_dir().join("containers").join(&ids[2]).exists());
    assert_eq!(
        c.pool_metric("trenv_pool_acquisitions_total{namespace=\"trenv-it\",result=\"miss\"}"),
        2.0
    );
    c.assert_exec_works(&ids[2], "sleep");
    c.kill_and_remove(&ids[0]);
    wait_idle(&c, s0.as_str().expect("id"));
    // Opting out leaves the idle sandbox alone; the next container of the function gets it.
    let off = unique_id("pool-off");
    run(
        &c,
        &["--annotation", "io.trenv.pool=off"],
        BUSYBOX,
        &off,
        &["sleep", "1000"],
    );
    assert!(!c.pool_dir().join("containers").join(&off).exists());
    let again = unique_id("again");
    run(&c, &[], BUSYBOX, &again, &["sleep", "1000"]);
    assert_eq!(published(&c, &again)["sandbox"], s0);
    assert_eq!(
        c.pool_metric("trenv_pool_acquisitions_total{namespace=\"trenv-it\",result=\"hit\"}"),
        1.0
    );
    for id in [&ids[1], &ids[2], &off, &again] {
        c.kill_and_remove(id);
        c.assert_gone(id);
    }
}

fn shim_pids(c: &Containerd) -> Vec<i32> {
    leaks::processes_with(&c.socket().to_string_lossy())
}

#[test]
fn shim_and_containerd_restarts_keep_the_pool() {
    require_root();
    let mut c = pool_containerd("min_idle = 1\nmax_idle = 2");
    let first = unique_id("first");
    run_rm(&c, &first);
    wait_for(Duration::from_secs(10), || {
        sandboxes(&c)
            .iter()
            .any(|s| s["state"] == "idle")
            .then_some(())
    })
    .expect("idle sandboxes");
    // The shim dies (with its zygotes); the next container starts a new one, which adopts
    // the idle sandboxes.
    for pid in shim_pids(&c) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(wait_for(Duration::from_secs(5), || shim_pids(&c)
        .is_empty()
        .then_some(()))
    .is_some());
    // What the killed shim left idle (a purge may have finished since the first look).
    let idle: Vec<Value> = sandboxes(&c)
        .into_iter()
        .filter(|s| s["state"] == "idle")
        .map(|s| s["id"].clone())
        .collect();
    assert!(!idle.is_empty(), "no idle sandbox left by the killed shim");
    let after = unique_id("after-shim");
    run(&c, &[], BUSYBOX, &after, &["sleep", "1000"]);
    let sb = published(&c, &after)["sandbox"].clone();
    assert!(
        idle.contains(&sb),
        "{sb} is not one of the adopted {idle:?}"
    );
    c.stop();
    c.resume();
    c.assert_exec_works(&after, "sleep");
    c.kill_and_remove(&after);
    let last = unique_id("after-ctrd");
    run_rm(&c, &last);
    c.assert_gone(&after);
    c.assert_gone(&last);
}

#[test]
fn killed_holder_is_detected_and_replaced() {
    require_root();
    let c = pool_containerd("min_idle = 1\nmax_idle = 1");
    let first = unique_id("holder1");
    run_rm(&c, &first);
    let victim = wait_for(Duration::from_secs(10), || {
        sandboxes(&c).into_iter().find(|s| s["state"] == "idle")
    })
    .expect("an idle sandbox");
    let ip = victim["attachment"]["ip"].as_str().expect("ip").to_string();
    let pid = i32::try_from(victim["holder"]["pid"].as_i64().expect("pid")).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill holder");
    let replaced = wait_for(Duration::from_secs(10), || {
        let all = sandboxes(&c);
        (!all.iter().any(|s| s["id"] == victim["id"]) && all.iter().any(|s| s["state"] == "idle"))
            .then_some(())
    });
    assert!(
        replaced.is_some(),
        "holder loss not handled: {:?}",
        sandboxes(&c)
    );
    let lost = "trenv_pool_holders_lost_total{namespace=\"trenv-it\"}";
    if let Err(now) = c.wait_pool_metric(lost, 1.0) {
        panic!("{lost} is {now} after the holder was replaced");
    }
    // Its address went back to IPAM (unless a new sandbox got the same one).
    let lease = Path::new("/var/lib/cni/networks/trenv").join(&ip);
    let holder_of_ip = std::fs::read_to_string(&lease).unwrap_or_default();
    assert!(
        !holder_of_ip.contains(victim["id"].as_str().expect("id")),
        "IP of the dead sandbox kept"
    );
    let next = unique_id("holder2");
    run_rm(&c, &next);
    c.assert_gone(&next);
}

#[test]
fn malformed_pool_annotations_are_rejected() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    for (i, annotation) in [
        "io.trenv.pool=maybe",
        "io.trenv.function=",
        "io.trenv.poool=on",
    ]
    .iter()
    .enumerate()
    {
        let id = unique_id(&format!("badpool{i}"));
        let err = ctr_fails(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                TRENV_RUNTIME,
                "--annotation",
                annotation,
                BUSYBOX,
                &id,
                "true",
            ],
        );
        let key = annotation.split('=').next().unwrap_or_default();
        assert!(
            err.contains(key),
            "error for {annotation} does not name it: {err}"
        );
        let _ = c.ctr(&["containers", "delete", &id]);
        c.assert_gone(&id);
    }
}

#[test]
fn drain_empties_the_pool_while_containers_run() {
    require_root();
    let c = pool_containerd("min_idle = 2\nmax_idle = 4");
    let id = unique_id("drain");
    run(&c, &[], BUSYBOX, &id, &["sleep", "1000"]);
    let refilled = wait_for(Duration::from_secs(10), || {
        (sandboxes(&c)
            .iter()
            .filter(|s| s["state"] == "idle")
            .count()
            >= 2)
            .then_some(())
    });
    assert!(refilled.is_some(), "pool not refilled: {:?}", sandboxes(&c));
    let out = c.sandbox_cmd(&["drain"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("drained 2 idle"));
    let left = sandboxes(&c);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["state"], "in-use");
    // The container is untouched and the shim still serves it.
    c.assert_exec_works(&id, "sleep");
    c.kill_and_remove(&id);
    // With the last container gone, the drained pool's shim ends and leaves nothing.
    c.drain_pool().expect("drained pool ends cleanly");
    assert!(cgroup_children(&format!("{}/trenv-it", c.pool_cgroup())).is_empty());
    c.assert_gone(&id);
}

fn cgroup_children(rel: &str) -> Vec<PathBuf> {
    std::fs::read_dir(Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/')))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn shim_usage(c: &Containerd) -> (i64, usize, u64) {
    let mut conn = std::os::unix::net::UnixStream::connect(c.pool_dir().join("control.sock"))
        .expect("control socket");
    conn.write_all(b"ping\n").expect("ping");
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&conn), &mut reply).expect("reply");
    let v: Value = serde_json::from_str(reply.trim()).expect("ping reply");
    let pid = v["pid"].as_i64().expect("pid");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    (pid, fds, rss_kb)
}

/// Pids other than `except` in the network namespace with inode `netns`.
fn in_netns(netns: u64, except: i32) -> Vec<i32> {
    let target = format!("net:[{netns}]");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != except)
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/ns/net"))
                .is_ok_and(|l| l.to_string_lossy() == target)
        })
        .collect()
}

#[test]
fn two_hundred_cycles_leave_nothing_behind() {
    require_root();
    let c = pool_containerd("min_idle = 1\nmax_idle = 2");
    let cycle = |i: usize| {
        let id = unique_id(&format!("cycle{i}"));
        run_rm(&c, &id);
    };
    for i in 0..20 {
        cycle(i);
    }
    let (pid0, fds0, rss0) = shim_usage(&c);
    for i in 20..200 {
        cycle(i);
    }
    // Let the last purge finish.
    std::thread::sleep(Duration::from_millis(500));
    let (pid1, fds1, rss1) = shim_usage(&c);
    assert_eq!(pid0, pid1, "the pool's shim was replaced during the cycles");
    assert!(
        fds1 <= fds0 + 2,
        "shim descriptors grew from {fds0} to {fds1}"
    );
    assert!(
        rss1 <= rss0 + 2048,
        "shim RSS grew from {rss0} kB to {rss1} kB"
    );
    let all = sandboxes(&c);
    assert!(all.len() <= 3, "{} sandboxes after 200 cycles", all.len());
    let served: u64 = all.iter().filter_map(|s| s["served"].as_u64()).sum();
    assert!(
        served >= 150,
        "sandboxes served only {served} of 200 containers"
    );
    // Exactly one cgroup per sandbox, nothing else: no process in any sandbox.
    assert_eq!(
        cgroup_children(&format!("{}/trenv-it", c.pool_cgroup())).len(),
        all.len()
    );
    for s in &all {
        let netns = s["holder"]["netns"].as_u64().expect("netns");
        let pid = i32::try_from(s["holder"]["pid"].as_i64().expect("pid")).expect("pid");
        let inside = in_netns(netns, pid);
        assert!(
            inside.is_empty(),
            "processes {inside:?} in sandbox {}",
            s["id"]
        );
    }
    // No rootfs left mounted; the only mounts are the sandboxes' cgroup views, one each
    // (a tmpfs and a bind per v1 hierarchy), not one per cycle.
    let views = c.pool_dir().join("cgroup-views").display().to_string();
    let (view_mounts, other): (Vec<String>, Vec<String>) =
        leaks::mounts_with(&c.dir().to_string_lossy())
            .into_iter()
            .partition(|m| m.contains(&views));
    assert!(other.is_empty(), "{other:?}");
    let per_view = if v1_hierarchies().is_empty() {
        0
    } else {
        1 + v1_hierarchies().len()
    };
    assert_eq!(view_mounts.len(), all.len() * per_view, "{view_mounts:?}");
    assert!(!c
        .pool_dir()
        .join("containers")
        .read_dir()
        .map(|mut d| d.next().is_some())
        .unwrap_or(false));
}
