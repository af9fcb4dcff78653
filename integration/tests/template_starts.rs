//! Template-backed starts through a real containerd, real CNI and real CRIU: the first
//! instance of a function starts cold and builds its template at readiness, later ones are
//! restored from it into pooled sandboxes; every template problem falls back to a cold
//! start; nothing leaks over many cycles.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use trenv_integration::containerd::{Containerd, Events, PYTHON, TRENV_RUNTIME};
use trenv_integration::isolation::DIRTY;
use trenv_integration::{leaks, require_root, unique_id, wait_for};

const PYTHON_NODE: &str = "docker.io/local/python-node:latest";

const FUNCTION: &str = trenv_integration::http::COUNTING_FUNCTION;

/// A private containerd with a small pool and templates of its own, busybox and Python.
fn template_containerd(top: &str) -> Containerd {
    template_containerd_with("min_idle = 1\nmax_idle = 4", top, "")
}

/// The same with these `[pool]` and `[templates]` (or later tables) lines, read when the
/// shim starts.
fn template_containerd_with(pool: &str, top: &str, templates: &str) -> Containerd {
    let c = Containerd::start();
    c.set_shim_config(top, pool, templates);
    c.import_busybox();
    c.import_python();
    c
}

/// Containers each test's containerd ran, by its pool cgroup: tests run side by side and
/// share the namespace's state directory, so a leftover check looks only at its own.
static STARTED: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

fn record_started(c: &Containerd, id: &str) {
    STARTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((c.pool_cgroup(), id.to_string()));
}

fn started_by(c: &Containerd, name: &str) -> bool {
    let me = c.pool_cgroup();
    STARTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(owner, id)| *owner == me && name.contains(id.as_str()))
}

/// `ctr run -d` of the function with `io.trenv.template=MODE`, until the task runs; how
/// long `ctr run` took.
fn run_fn(c: &Containerd, id: &str, mode: &str, image: &str, flags: &[&str]) -> Duration {
    record_started(c, id);
    let template = format!("io.trenv.template={mode}");
    let mut all = vec![
        "run",
        "-d",
        "--runtime",
        TRENV_RUNTIME,
        "--annotation",
        &template,
        "--annotation",
        "io.trenv.ready=http:8080/ready",
        "--memory-limit",
        "268435456",
        "--env",
        "FN=f1",
    ];
    all.extend_from_slice(flags);
    all.extend_from_slice(&[image, id, "python3", "-c", FUNCTION]);
    let t = Instant::now();
    c.ctr_ok(&all);
    let took = t.elapsed();
    c.wait_task(id, "RUNNING");
    took
}

/// What the pool published for a container.
fn published(c: &Containerd, id: &str) -> Value {
    let path = c.pool_dir().join("containers").join(id);
    let text = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&path).ok()
    })
    .unwrap_or_else(|| panic!("no address published for {id}"));
    serde_json::from_str(&text).expect("published JSON")
}

fn ip(c: &Containerd, id: &str) -> String {
    published(c, id)["ip"].as_str().expect("ip").to_string()
}

/// GET `path` from the host, retried for a while; the function's answer.
fn get(ip: &str, path: &str) -> String {
    trenv_integration::http::get_body(ip, 8080, path, Duration::from_secs(10))
}

fn trenv(args: &[&str]) -> std::process::Output {
    Command::new(trenv_integration::runtime::trenv_bin())
        .args(args)
        .output()
        .expect("trenv")
}

/// `trenv template ls --format json` of this containerd's store.
fn templates(c: &Containerd) -> Vec<Value> {
    let store = c.template_store();
    let out = trenv(&[
        "template",
        "ls",
        "--store",
        &store.to_string_lossy(),
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("template ls JSON")
}

fn wait_metric(c: &Containerd, name: &str, at_least: f64) {
    if let Err(now) = c.wait_pool_metric(name, at_least) {
        panic!(
            "{name} is {now}, below {at_least}; shim log:\n{}",
            template_log(c)
        );
    }
}

/// The shim's log lines about templates.
fn template_log(c: &Containerd) -> String {
    c.log()
        .lines()
        .filter(|l| l.contains("template") || l.contains("restore"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn event(events: &Events, topic: &str, id: &str) -> String {
    events
        .wait(topic, id, Duration::from_secs(90))
        .unwrap_or_else(|| panic!("no {topic} event for {id}: {}", events.text()))
}

/// Starts the first instance cold and waits until its template is built; its id.
fn build_first(c: &Containerd, events: &Events, mode: &str, image: &str) -> String {
    let id = unique_id("tpl-first");
    run_fn(c, &id, mode, image, &[]);
    event(events, "/trenv/template/built", &id);
    id
}

fn remove(c: &Containerd, id: &str) {
    c.kill_and_remove(id);
    c.assert_gone(id);
}

fn assert_no_template_leftovers(c: &Containerd) {
    let root = PathBuf::from(format!(
        "/run/containerd/trenv/{}/.template-work",
        trenv_integration::containerd::NAMESPACE
    ));
    let left: Vec<_> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| started_by(c, &p.to_string_lossy()))
        .collect();
    assert!(left.is_empty(), "restore work directories left: {left:?}");
    let store = c.template_store();
    let checkpoints: Vec<_> = std::fs::read_dir(&store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".checkpoint-"))
        .map(|e| e.path())
        .collect();
    assert!(
        checkpoints.is_empty(),
        "build checkpoints left: {checkpoints:?}"
    );
    let staged: Vec<_> = leaks::mounts_with(".tmpfs-")
        .into_iter()
        .filter(|m| started_by(c, m))
        .collect();
    assert!(staged.is_empty(), "staged tmpfs mounts left: {staged:?}");
}

#[test]
fn first_start_builds_the_template_and_the_second_is_restored() {
    require_root();
    let c = template_containerd("");
    let events = c.events();
    let a = unique_id("tpl-a");
    let cold_took = run_fn(&c, &a, "auto", PYTHON, &[]);
    // Answers at once: Start waited for readiness, and for the template's checkpoint, so
    // the template holds the initialised state (count=0: the probe does not count) and none
    // of this request.
    assert_eq!(get(&ip(&c, &a), "/"), "fn=f1 count=1 state=16777216");
    event(&events, "/trenv/template/built", &a);
    let listed = templates(&c);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let name = listed[0]["names"][0].as_str().expect("name").to_string();
    assert!(name.starts_with("auto-"), "{name}");
    wait_metric(
        &c,
        "trenv_template_builds_total{namespace=\"trenv-it\"}",
        1.0,
    );

    let b = unique_id("tpl-b");
    let warm_took = run_fn(&c, &b, "auto", PYTHON, &[]);
    let restored = event(&events, "/trenv/template/restored", &b);
    assert!(restored.contains(&name), "{restored}");
    // Restored into its own sandbox, answering on its sandbox's IP with its own state: the
    // template's count (0: the probe does not count) plus this request.
    let ip_b = ip(&c, &b);
    assert_ne!(ip_b, ip(&c, &a));
    assert_eq!(get(&ip_b, "/"), "fn=f1 count=1 state=16777216");
    assert_eq!(get(&ip_b, "/"), "fn=f1 count=2 state=16777216");
    assert!(get(&ip(&c, &a), "/").contains("count=2"));
    assert!(
        warm_took * 2 < cold_took,
        "restored start {warm_took:?} not faster than cold {cold_took:?}"
    );
    wait_metric(
        &c,
        "trenv_template_restores_total{namespace=\"trenv-it\"}",
        1.0,
    );
    assert!(c.pool_metric("trenv_template_instances{namespace=\"trenv-it\"}") >= 1.0);
    let sb = published(&c, &b)["sandbox"]
        .as_str()
        .expect("sandbox")
        .to_string();
    let inspect = c.sandbox_cmd(&["inspect", &sb]);
    let inspect = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.contains(&format!("\"template\": \"{name}\"")),
        "{inspect}"
    );
    let listed = templates(&c);
    assert!(
        !listed[0]["instances"]
            .as_array()
            .expect("instances")
            .is_empty(),
        "{listed:?}"
    );

    // An ordinary task: exec, ps, pause/resume, metrics, OOM events.
    c.assert_exec_works(&b, "python3");
    c.assert_ps_pause_resume(&b);
    c.ctr_ok(&["task", "metrics", &b]);
    let oom = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "oom",
        &b,
        "python3",
        "-c",
        "x = bytearray(512 << 20)",
    ]);
    assert!(!oom.status.success());
    event(&events, "/tasks/oom", &b);
    // Checkpointing a restored instance is refused plainly, and it keeps running.
    let ck = c.ctr(&["task", "checkpoint", &b]);
    assert!(!ck.status.success());
    let why = String::from_utf8_lossy(&ck.stderr);
    assert!(why.contains("restored from template"), "{why}");
    assert_eq!(get(&ip_b, "/"), "fn=f1 count=3 state=16777216");
    remove(&c, &b);
    remove(&c, &a);
    assert_no_template_leftovers(&c);
}

#[test]
fn sixteen_concurrent_restores_keep_their_own_state() {
    require_root();
    let c = template_containerd("");
    let events = c.events();
    let first = build_first(&c, &events, "auto", PYTHON);
    remove(&c, &first);
    let ids: Vec<String> = (0..16).map(|i| unique_id(&format!("tpl-c{i}"))).collect();
    std::thread::scope(|s| {
        for id in &ids {
            let c = &c;
            s.spawn(move || run_fn(c, id, "auto", PYTHON, &[]));
        }
    });
    for (k, id) in ids.iter().enumerate() {
        event(&events, "/trenv/template/restored", id);
        let ip = ip(&c, id);
        let mut last = String::new();
        for _ in 0..=k {
            last = get(&ip, "/");
        }
        assert_eq!(
            last,
            format!("fn=f1 count={} state=16777216", k + 1),
            "{id}"
        );
    }
    for id in &ids {
        remove(&c, id);
    }
    assert_no_template_leftovers(&c);
}

#[test]
fn a_restored_instance_sees_nothing_of_the_sandbox_previous_function() {
    require_root();
    let c = template_containerd_with("min_idle = 0\nmax_idle = 1", "", "");
    let events = c.events();
    let first = build_first(&c, &events, "auto", PYTHON);
    remove(&c, &first);
    let a = unique_id("tpl-dirty");
    record_started(&c, &a);
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        TRENV_RUNTIME,
        "--cap-add",
        "CAP_SYS_ADMIN",
        "--annotation",
        "io.trenv.ready=file:/tmp/ready",
        PYTHON,
        &a,
        "python3",
        "-c",
        DIRTY,
    ]);
    c.wait_task(&a, "RUNNING");
    let sb = published(&c, &a)["sandbox"].clone();
    c.kill_and_remove(&a);
    let idle = wait_for(Duration::from_secs(10), || {
        let out = c.sandbox_cmd(&["ls", "--format", "json"]);
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        list.iter()
            .any(|s| s["id"] == sb && s["state"] == "idle")
            .then_some(())
    });
    assert!(idle.is_some(), "sandbox {sb} not idle again");

    let b = unique_id("tpl-clean");
    run_fn(&c, &b, "auto", PYTHON, &[]);
    event(&events, "/trenv/template/restored", &b);
    assert_eq!(
        published(&c, &b)["sandbox"],
        sb,
        "not placed in A's sandbox"
    );
    let check = |cmd: &str| c.exec_ok(&b, &unique_id("x"), &["sh", "-c", cmd]);
    assert_ne!(check("hostname").trim(), "tenant-a", "hostname left");
    trenv_integration::isolation::assert_no_dirty_ipc_or_files(check);
    let ps = check("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done");
    assert!(!ps.contains("sleep 1000"), "{ps}");
    // Only the function's own listening socket (port 8080 = 1F90), not A's 9999 (270F).
    let tcp = check("cat /proc/net/tcp | awk '$4 == \"0A\" {print $2}'");
    assert!(tcp.contains(":1F90") && !tcp.contains(":270F"), "{tcp}");
    assert!(get(&ip(&c, &b), "/").contains("count=1"));
    remove(&c, &b);
    assert_no_template_leftovers(&c);
}

#[test]
fn templates_follow_the_image_and_are_not_shared_across_keys() {
    require_root();
    let c = template_containerd("");
    c.import_python_image(
        &trenv_integration::bundle::node_image(),
        "docker.io/local/python-node",
    );
    let events = c.events();
    let py = build_first(&c, &events, "auto", PYTHON);
    let node = build_first(&c, &events, "auto", PYTHON_NODE);
    let listed = templates(&c);
    assert_eq!(listed.len(), 2, "one template per image: {listed:?}");
    assert_ne!(listed[0]["key"], listed[1]["key"]);
    // Different args are another key too: no restore from either template.
    let other = unique_id("tpl-env");
    run_fn(&c, &other, "auto", PYTHON, &["--env", "EXTRA=1"]);
    assert!(events
        .wait("/trenv/template/restored", &other, Duration::from_secs(2))
        .is_none());
    // Each image's instance is restored from its own template, on its own rootfs.
    let n2 = unique_id("tpl-node2");
    run_fn(&c, &n2, "auto", PYTHON_NODE, &[]);
    event(&events, "/trenv/template/restored", &n2);
    assert!(c.exec_ok(&n2, "v", &["node", "--version"]).starts_with('v'));
    let p2 = unique_id("tpl-py2");
    run_fn(&c, &p2, "auto", PYTHON, &[]);
    event(&events, "/trenv/template/restored", &p2);
    let no_node = c.ctr(&["task", "exec", "--exec-id", "v", &p2, "node", "--version"]);
    assert!(!no_node.status.success(), "python image has node");
    // A named template is shared by name and listed under it.
    let named = build_first(&c, &events, "shared-fn", PYTHON);
    let listed = templates(&c);
    assert!(
        listed.iter().any(|t| t["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "shared-fn"))),
        "{listed:?}"
    );
    let n3 = unique_id("tpl-named");
    run_fn(&c, &n3, "shared-fn", PYTHON, &[]);
    event(&events, "/trenv/template/restored", &n3);
    for id in [&py, &node, &other, &n2, &p2, &named, &n3] {
        remove(&c, id);
    }
    assert_no_template_leftovers(&c);
}

/// Runs an instance that must fall back (or miss) with `reason`, answer correctly, and
/// leave nothing; with `rebuilt`, its template is built again once it is ready.
fn assert_cold_with(c: &Containerd, events: &Events, reason: &str, fallback: bool, rebuilt: bool) {
    let id = unique_id("tpl-fb");
    run_fn(c, &id, "auto", PYTHON, &[]);
    if fallback {
        let ev = event(events, "/trenv/template/fallback", &id);
        assert!(ev.contains(reason), "{ev}");
        wait_metric(
            c,
            &format!(
                "trenv_template_fallbacks_total{{namespace=\"trenv-it\",reason=\"{reason}\"}}"
            ),
            1.0,
        );
    } else {
        wait_metric(
            c,
            &format!("trenv_template_misses_total{{namespace=\"trenv-it\",reason=\"{reason}\"}}"),
            1.0,
        );
    }
    assert!(get(&ip(c, &id), "/").contains("count=1"), "{reason}");
    if rebuilt {
        event(events, "/trenv/template/built", &id);
    }
    remove(c, &id);
}

/// The template works again: an instance is restored from it.
fn assert_restored(c: &Containerd, events: &Events) {
    let ok = unique_id("tpl-ok");
    run_fn(c, &ok, "auto", PYTHON, &[]);
    event(events, "/trenv/template/restored", &ok);
    remove(c, &ok);
}

#[test]
fn template_problems_fall_back_to_cold_starts() {
    require_root();
    let c = template_containerd("");
    let events = c.events();
    let first = build_first(&c, &events, "auto", PYTHON);
    remove(&c, &first);
    let region = |c: &Containerd| -> PathBuf {
        let store = c.template_store();
        let m = trenv(&[
            "template",
            "ls",
            "--store",
            &store.to_string_lossy(),
            "--format",
            "json",
        ]);
        let list: Vec<Value> = serde_json::from_slice(&m.stdout).expect("ls");
        let name = list[0]["names"][0].as_str().expect("name").to_string();
        let out = trenv(&[
            "template",
            "inspect",
            "--store",
            &store.to_string_lossy(),
            &name,
        ]);
        let manifest: Value = serde_json::from_slice(&out.stdout).expect("inspect");
        PathBuf::from(manifest["regions"][0]["path"].as_str().expect("region"))
    };

    // A corrupted region: detected by the restore, cold start, rebuilt at readiness.
    let r = region(&c);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&r)
        .expect("region");
    f.write_all(&[0xA5; 4096]).expect("corrupt");
    drop(f);
    assert_cold_with(&c, &events, "corrupt", true, true);
    wait_metric(
        &c,
        "trenv_template_builds_total{namespace=\"trenv-it\"}",
        2.0,
    );
    assert_restored(&c, &events);

    // The memory pool gone (its tmpfs unmounted): cold, then rebuilt in a new pool.
    nix::mount::umount2(&c.mempool_dir(), nix::mount::MntFlags::MNT_DETACH).expect("umount");
    assert_cold_with(&c, &events, "pool-missing", true, true);
    wait_metric(
        &c,
        "trenv_template_builds_total{namespace=\"trenv-it\"}",
        3.0,
    );

    // A template recorded for another CRIU: stale, cold, rebuilt.
    let store = c.template_store();
    let by_key = store.join("by-key");
    for e in std::fs::read_dir(&by_key).expect("by-key").flatten() {
        let m = e.path().join("manifest.json");
        if let Ok(text) = std::fs::read_to_string(&m) {
            let mut v: Value = serde_json::from_str(&text).expect("manifest");
            v["criu"] = Value::String("0.0.1".into());
            std::fs::write(&m, serde_json::to_vec(&v).expect("json")).expect("write");
        }
    }
    assert_cold_with(&c, &events, "stale", false, true);
    wait_metric(
        &c,
        "trenv_template_builds_total{namespace=\"trenv-it\"}",
        4.0,
    );
    assert_restored(&c, &events);

    // No CRIU: nothing tried, cold start.
    c.set_shim_config(
        "criu_path = \"/nonexistent/criu\"",
        "min_idle = 1\nmax_idle = 4",
        "",
    );
    assert_cold_with(&c, &events, "criu-missing", false, false);
    c.set_shim_config("", "min_idle = 1\nmax_idle = 4", "");
    assert_no_template_leftovers(&c);
}

/// A template that does not fit the memory pool fails its build, not the instance: it keeps
/// serving, the next instance starts cold, and nothing is left in the pool or the store.
#[test]
fn a_full_memory_pool_fails_the_build_not_the_instance() {
    require_root();
    let c = template_containerd_with("min_idle = 1\nmax_idle = 4", "", "pool_capacity_mib = 4");
    let events = c.events();
    let a = unique_id("tpl-full");
    run_fn(&c, &a, "tiny", PYTHON, &[]);
    let ev = event(&events, "/trenv/template/build-failed", &a);
    assert!(ev.contains("pool-full"), "{ev}");
    wait_metric(
        &c,
        "trenv_template_build_failures_total{namespace=\"trenv-it\",reason=\"pool-full\"}",
        1.0,
    );
    assert_eq!(get(&ip(&c, &a), "/"), "fn=f1 count=1 state=16777216");
    let b = unique_id("tpl-full2");
    run_fn(&c, &b, "tiny", PYTHON, &[]);
    assert!(get(&ip(&c, &b), "/").contains("count=1"));
    assert!(templates(&c).is_empty(), "{:?}", templates(&c));
    assert_eq!(mempool_used(&c), 0, "pool space left");
    for id in [&a, &b] {
        remove(&c, id);
    }
    assert_no_template_leftovers(&c);
}

/// A restore CRIU cannot finish in time is killed: the start falls back to cold within the
/// deadline, and the shim keeps serving other tasks meanwhile.
#[test]
fn a_hung_restore_is_bounded_and_other_tasks_go_on() {
    require_root();
    let c = template_containerd_with(
        "min_idle = 1\nmax_idle = 4",
        "",
        "[timeouts]\ntemplate_restore_secs = 5",
    );
    let events = c.events();
    let first = build_first(&c, &events, "auto", PYTHON);
    // A CRIU that hangs on restore (a template build never reaches it: it ran already).
    let dir = c.dir().join("hung-criu");
    std::fs::create_dir_all(&dir).expect("dir");
    let criu = dir.join("criu");
    std::fs::write(&criu, "#!/bin/sh\nsleep 999.5\n").expect("script");
    std::fs::set_permissions(&criu, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    c.set_shim_config(
        &format!("criu_path = \"{}\"", criu.display()),
        "min_idle = 1\nmax_idle = 4",
        "[timeouts]\ntemplate_restore_secs = 5",
    );
    let hung = unique_id("tpl-hung");
    let other = unique_id("tpl-other");
    let started = Instant::now();
    std::thread::scope(|s| {
        let c = &c;
        let h = s.spawn(|| run_fn(c, &hung, "auto", PYTHON, &[]));
        std::thread::sleep(Duration::from_millis(300));
        // Meanwhile: another container starts and the first answers.
        c.run_detached(&other, &["sleep", "100"]);
        assert!(get(&ip(c, &first), "/").contains("count="));
        h.join().expect("hung start");
    });
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let ev = event(&events, "/trenv/template/fallback", &hung);
    assert!(ev.contains("timeout"), "{ev}");
    assert!(get(&ip(&c, &hung), "/").contains("count=1"));
    assert!(leaks::processes_with(&criu.to_string_lossy()).is_empty());
    assert!(leaks::processes_with("sleep 999.5").is_empty());
    for id in [&hung, &other, &first] {
        remove(&c, id);
    }
    assert_no_template_leftovers(&c);
}

fn shim_pid(c: &Containerd) -> i32 {
    let socket = c.socket().to_string_lossy().into_owned();
    let pids: Vec<i32> = leaks::processes_with(&socket)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("containerd-shim-trenv-v2") && !c.contains("zygote"))
        })
        .collect();
    *pids.iter().min().expect("shim")
}

/// (open fds, RSS KiB) of a process.
fn usage(pid: i32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    (fds, rss)
}

/// A directory and every directory below it.
fn walk(d: &std::path::Path) -> Vec<PathBuf> {
    let mut out = vec![d.to_path_buf()];
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// Processes in this containerd's sandbox cgroups (memory hierarchy, or the unified one).
fn pool_processes(c: &Containerd) -> usize {
    let mut pids = std::collections::BTreeSet::new();
    for d in leaks::cgroup_dirs(&c.pool_cgroup()) {
        for sub in walk(&d) {
            let procs = std::fs::read_to_string(sub.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().map(str::to_string));
        }
    }
    pids.len()
}

fn mempool_used(c: &Containerd) -> u64 {
    let st = nix::sys::statvfs::statvfs(&c.mempool_dir()).expect("statvfs");
    (st.blocks() - st.blocks_free()) * st.fragment_size()
}

#[test]
fn restarts_keep_templates_and_cycles_leave_nothing_behind() {
    require_root();
    let mut c = template_containerd("");
    let events = c.events();
    let first = build_first(&c, &events, "auto", PYTHON);
    remove(&c, &first);

    // containerd restarts: the shim and its templates stay.
    drop(events);
    c.stop();
    c.resume();
    let events = c.events();
    let a = unique_id("tpl-after-ctrd");
    run_fn(&c, &a, "auto", PYTHON, &[]);
    event(&events, "/trenv/template/restored", &a);
    remove(&c, &a);
    // The shim restarts (drained, it exits; the next container starts a new one).
    drop(events);
    c.drain_pool().expect("drain");
    let events = c.events();
    let b = unique_id("tpl-after-shim");
    run_fn(&c, &b, "auto", PYTHON, &[]);
    event(&events, "/trenv/template/restored", &b);
    remove(&c, &b);

    let cycle = |n: usize| {
        for _ in 0..n {
            let id = unique_id("tpl-cyc");
            run_fn(&c, &id, "auto", PYTHON, &[]);
            c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
            c.wait_task(&id, "STOPPED");
            c.ctr_ok(&["task", "delete", &id]);
            c.ctr_ok(&["containers", "delete", &id]);
        }
    };
    cycle(10);
    let shim = shim_pid(&c);
    let dir = c.dir().to_string_lossy().into_owned();
    // What this containerd's containers and sandboxes hold; purges run in the background,
    // so a count is compared once they settled.
    let held = || {
        let cgroups: usize = leaks::cgroup_dirs(&c.pool_cgroup())
            .iter()
            .map(|d| walk(d).len())
            .sum();
        (leaks::mounts_with(&dir).len(), cgroups, pool_processes(&c))
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = held();
    let (fds0, rss0) = usage(shim);
    let pool0 = mempool_used(&c);
    cycle(190);
    let settled = wait_for(Duration::from_secs(20), || (held() == before).then_some(()));
    assert!(settled.is_some(), "held: {before:?} -> {:?}", held());
    let (fds1, rss1) = usage(shim);
    assert!(fds1 <= fds0 + 4, "shim fds: {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 8 * 1024, "shim RSS KiB: {rss0} -> {rss1}");
    assert_eq!(mempool_used(&c), pool0, "pool space");
    let restores = c.pool_metric("trenv_template_restores_total{namespace=\"trenv-it\"}");
    assert!(restores >= 199.0, "{restores} restores");
    assert_no_template_leftovers(&c);
    // Sandboxes stay bounded: no netns or holder piles up.
    let sandboxes = c.sandbox_cmd(&["ls", "--format", "json"]);
    let list: Vec<Value> = serde_json::from_slice(&sandboxes.stdout).expect("ls");
    assert!(list.len() <= 5, "{} sandboxes", list.len());
}

/// Cgroup directories of this containerd's sandboxes that hold a spare (their sandbox
/// records name a `trenv-spare-` container).
fn spare_cgroups(c: &Containerd) -> Vec<String> {
    let out = c.sandbox_cmd(&["ls", "--format", "json"]);
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("sandbox ls");
    list.iter()
        .filter(|s| {
            s["container"]
                .as_str()
                .is_some_and(|c| c.starts_with("trenv-spare-"))
        })
        .filter_map(|s| s["cgroup"].as_str())
        .map(str::to_string)
        .collect()
}

/// Whether a cgroup is frozen (cgroup v2's cgroup.events, or v1's freezer).
fn frozen(cg: &str) -> bool {
    leaks::cgroup_dirs(cg).iter().any(|d| {
        std::fs::read_to_string(d.join("cgroup.events")).is_ok_and(|t| t.contains("frozen 1"))
            || std::fs::read_to_string(d.join("freezer.state")).is_ok_and(|t| t.trim() == "FROZEN")
    })
}

/// SIGKILL to every process of a cgroup.
fn kill_cgroup(cg: &str) {
    for d in leaks::cgroup_dirs(cg) {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn spares_serve_starts_and_dead_ones_are_replaced_by_a_restore() {
    require_root();
    let c = template_containerd_with("min_idle = 1\nmax_idle = 4", "", "spares = 1");
    let events = c.events();
    let spares = "trenv_template_spares{namespace=\"trenv-it\"}";
    let first = build_first(&c, &events, "auto", PYTHON);
    // The build makes a spare, frozen in a sandbox of its own.
    wait_metric(&c, spares, 1.0);
    let held = spare_cgroups(&c);
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(frozen(&held[0]), "{} is not frozen", held[0]);

    // The next start takes it over: its own sandbox IP, fresh state, its output in the
    // container's log, exec, pause and resume work.
    let a = unique_id("tpl-spare");
    let log = c.dir().join(format!("{a}.log"));
    let log_uri = format!("file://{}", log.display());
    let took = run_fn(&c, &a, "auto", PYTHON, &["--log-uri", &log_uri]);
    let line = event(&events, "/trenv/template/restored", &a);
    assert!(line.contains("\"spare\""), "{line}");
    let a_ip = ip(&c, &a);
    assert_ne!(a_ip, ip(&c, &first));
    assert_eq!(get(&a_ip, "/"), "fn=f1 count=1 state=16777216");
    assert_eq!(get(&a_ip, "/"), "fn=f1 count=2 state=16777216");
    let logged = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("served 2"))
    });
    assert_eq!(logged.as_deref(), Some("served 1\nserved 2\n"));
    c.ctr_ok(&["task", "pause", &a]);
    assert_eq!(c.task_status(&a).as_deref(), Some("PAUSED"));
    c.ctr_ok(&["task", "resume", &a]);
    assert_eq!(get(&a_ip, "/"), "fn=f1 count=3 state=16777216");
    assert_eq!(
        c.exec_ok(
            &a,
            "x",
            &["sh", "-c", "echo $FN; cat /proc/1/cmdline | head -c 7"]
        ),
        "f1\npython3"
    );
    assert_eq!(c.task_status(&a).as_deref(), Some("RUNNING"));
    eprintln!("spare start: ctr run -d took {took:?}");

    // A spare that died is discarded; the start restores instead.
    wait_metric(&c, spares, 1.0);
    // Frozen, it dies only once thawed (cgroup v1): the kill is pending.
    for cg in spare_cgroups(&c) {
        kill_cgroup(&cg);
    }
    let b = unique_id("tpl-nospare");
    run_fn(&c, &b, "auto", PYTHON, &[]);
    let line = event(&events, "/trenv/template/restored", &b);
    assert!(!line.contains("\"spare\""), "{line}");
    assert_eq!(get(&ip(&c, &b), "/"), "fn=f1 count=1 state=16777216");
    wait_metric(
        &c,
        "trenv_template_spares_discarded_total{namespace=\"trenv-it\"}",
        1.0,
    );

    for id in [&first, &a, &b] {
        remove(&c, id);
    }
    // A drain discards the spares with everything else.
    wait_metric(&c, spares, 1.0);
    drop(events);
    c.drain_pool().expect("drain");
    let root = PathBuf::from(format!(
        "/run/containerd/trenv/{}",
        trenv_integration::containerd::NAMESPACE
    ));
    let left: Vec<_> = std::fs::read_dir(root.join(".template-spares"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain(
            std::fs::read_dir(&root)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("trenv-spare-"))
                .map(|e| e.path()),
        )
        .collect();
    assert!(left.is_empty(), "spares left: {left:?}");
    let mounts = leaks::mounts_with(".template-spares");
    assert!(mounts.is_empty(), "spare mounts left: {mounts:?}");
    assert_no_template_leftovers(&c);
}
