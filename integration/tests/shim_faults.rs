//! Faults injected into the shim's helpers for real: killed zygotes and workers, a CRIU
//! and a CNI plugin that hang, a containerd that goes away. Each ends in a clear error or
//! a recovery within a bounded time, the shim keeps serving its other tasks, and nothing
//! is left behind.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use trenv_integration::containerd::{Containerd, BUSYBOX, TRENV_RUNTIME as RUNTIME};
use trenv_integration::leaks::processes_with;
use trenv_integration::{require_root, unique_id, wait_for};

/// Children of `parent` whose command line contains `needle`.
fn children_with(parent: i32, needle: &str) -> Vec<i32> {
    processes_with(needle)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// The pid of this containerd's namespace shim (the one serving `id`).
fn shim_pid(c: &Containerd) -> i32 {
    let socket = c.socket().to_string_lossy().into_owned();
    let pids: Vec<i32> = processes_with(&socket)
        .into_iter()
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("containerd-shim-trenv-v2") && !cmd.contains("trenv-zygote")
        })
        .collect();
    assert_eq!(pids.len(), 1, "expected one shim, found {pids:?}");
    pids[0]
}

/// Asserts the processes are gone (or zombies of a parent that is gone too).
fn assert_all_gone(pids: &[i32]) {
    let gone = wait_for(Duration::from_secs(5), || {
        pids.iter()
            .all(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
            })
            .then_some(())
    });
    assert!(gone.is_some(), "still running: {pids:?}");
}

/// Makes the shim use a CRIU that hangs (a shell script, not exec'd, so the script's unique
/// path stays in its command line); `top_level` is added to the top of the shim config.
/// Returns the marker that finds the hung CRIU among processes.
fn hanging_criu(c: &Containerd, name: &str, top_level: &str) -> String {
    let hang = c.dir().join(name);
    write_script(&hang, "sleep 1000");
    let pool = std::fs::read_to_string(c.shim_config()).expect("shim config");
    std::fs::write(
        c.shim_config(),
        format!("criu_path = \"{}\"\n{top_level}{pool}", hang.display()),
    )
    .expect("shim config");
    hang.to_string_lossy().into_owned()
}

/// `ctr task checkpoint` of `id` into this containerd's directory.
fn checkpoint(c: &Containerd, id: &str) -> std::process::Output {
    let images = c.dir().join("ck");
    c.ctr(&[
        "task",
        "checkpoint",
        "--image-path",
        &images.to_string_lossy(),
        id,
    ])
}

/// Whether no process whose command line holds `marker` is left within 5 s.
fn gone_soon(marker: &str) -> bool {
    wait_for(Duration::from_secs(5), || {
        processes_with(marker).is_empty().then_some(())
    })
    .is_some()
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// `ctr run --rm` of a short busybox command; returns how long it took.
fn run_once(c: &Containerd, id: &str) -> Duration {
    let t = Instant::now();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "echo",
        "ok",
    ]);
    assert!(
        out.status.success(),
        "ctr run {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    t.elapsed()
}

/// Killing both zygotes of the namespace shim (every child that is not a sandbox holder)
/// does not wedge it: new containers start, the running one stays reachable, and a drain
/// removes every sandbox holder and cgroup.
#[test]
fn killed_zygotes_are_replaced_and_drain_still_cleans_up() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("fault-zyg");
    c.run_detached(&id, &["sleep", "1000"]);
    let shim = shim_pid(&c);
    let zygotes = children_with(shim, "trenv-zygote");
    assert_eq!(zygotes.len(), 2, "task and pool zygotes: {zygotes:?}");
    for z in &zygotes {
        kill9(*z);
    }
    let gone = wait_for(Duration::from_secs(5), || {
        zygotes
            .iter()
            .all(|z| !Path::new(&format!("/proc/{z}")).exists())
            .then_some(())
    });
    assert!(gone.is_some(), "zygotes {zygotes:?} still there");

    // A new container starts (through a new zygote), and the old task is still served.
    let t = Instant::now();
    run_once(&c, &unique_id("fault-zyg-after"));
    assert!(t.elapsed() < Duration::from_secs(20));
    let new = children_with(shim, "trenv-zygote");
    assert!(
        !new.is_empty() && new.iter().all(|z| !zygotes.contains(z)),
        "no new zygote: {new:?}"
    );
    assert_eq!(shim_pid(&c), shim, "the shim itself was replaced");
    c.assert_exec_works(&id, "sleep");
    c.kill_and_remove(&id);
    c.assert_gone(&id);
    let holders = children_with(shim, "trenv-sandbox-holder");
    assert!(!holders.is_empty(), "the pool has no sandbox");
    c.drain_pool().expect("drain after zygote loss");
    assert_all_gone(&holders);
    let cgroups = trenv_integration::leaks::cgroup_dirs(&c.pool_cgroup());
    let sandbox_cgroups: Vec<_> = cgroups
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.path().is_dir())
        .map(|e| e.path())
        .collect();
    assert!(
        sandbox_cgroups.is_empty(),
        "sandbox cgroups left: {sandbox_cgroups:?}"
    );
}

/// A CRIU that hangs: the checkpoint fails with DEADLINE_EXCEEDED after the configured
/// `timeouts.criu_secs`, the hung CRIU is killed, the container keeps running (thawed),
/// and other containers start normally while the checkpoint hangs.
#[test]
fn a_hanging_criu_ends_in_a_deadline_and_blocks_no_other_task() {
    require_root();
    let c = Containerd::start();
    let marker = hanging_criu(&c, "hanging-criu", "[timeouts]\ncriu_secs = 4\n");
    c.import_busybox();
    let id = unique_id("fault-criu");
    c.run_detached(&id, &["sh", "-c", trenv_integration::containerd::COUNTER]);
    // Baseline start times before the hang.
    let normal: Vec<Duration> = (0..3)
        .map(|_| run_once(&c, &unique_id("fault-criu-base")))
        .collect();
    let t = Instant::now();
    let outcome = std::thread::scope(|s| {
        let h = s.spawn(|| checkpoint(&c, &id));
        // While CRIU hangs, other tasks start.
        let hung = wait_for(Duration::from_secs(3), || {
            (!processes_with(&marker).is_empty()).then_some(())
        });
        assert!(hung.is_some(), "the CRIU wrapper never ran");
        let during: Vec<Duration> = (0..3)
            .map(|_| run_once(&c, &unique_id("fault-criu-during")))
            .collect();
        let during_done = t.elapsed();
        let out = h.join().expect("checkpoint thread");
        (out, during, during_done)
    });
    let (out, during, during_done) = outcome;
    let took = t.elapsed();
    assert!(
        !out.status.success(),
        "checkpoint with a hanging CRIU succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no answer within 4s") || stderr.contains("DeadlineExceeded"),
        "unexpected error: {stderr}"
    );
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(20),
        "checkpoint ended after {took:?}"
    );
    assert!(
        during_done < Duration::from_secs(4),
        "starts during the checkpoint waited for it ({during_done:?}; normal {normal:?}, during {during:?})"
    );
    eprintln!("starts: normal {normal:?}, during a hung checkpoint {during:?}");
    // The hung CRIU went with its worker; the container runs on.
    assert!(
        gone_soon(&marker),
        "hung CRIU left: {:?}",
        processes_with(&marker)
    );
    let a = c.counter(&id, "count-1");
    std::thread::sleep(Duration::from_millis(300));
    let b = c.counter(&id, "count-2");
    assert!(
        b > a,
        "the container stays frozen after the failed checkpoint ({a} -> {b})"
    );
    c.kill_and_remove(&id);
    c.assert_gone(&id);
    c.drain_pool().expect("drain");
}

/// A zygote worker killed in the middle of a checkpoint: the client gets an error naming
/// the signal at once, and what the worker started (CRIU) goes with it.
#[test]
fn a_worker_killed_mid_checkpoint_is_reported() {
    require_root();
    let c = Containerd::start();
    let marker = hanging_criu(&c, "slow-criu", "");
    c.import_busybox();
    let id = unique_id("fault-worker");
    c.run_detached(&id, &["sleep", "1000"]);
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| checkpoint(&c, &id));
        let criu = wait_for(Duration::from_secs(10), || {
            processes_with(&marker).first().copied()
        })
        .expect("CRIU never started");
        // Its parent is the zygote worker running the checkpoint.
        let stat = std::fs::read_to_string(format!("/proc/{criu}/stat")).expect("stat");
        let worker: i32 = stat[stat.rfind(')').expect("stat") + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("ppid");
        kill9(worker);
        h.join().expect("checkpoint thread")
    });
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ended without answering") && stderr.contains("SIGKILL"),
        "unexpected error: {stderr}"
    );
    assert!(gone_soon(&marker), "CRIU outlived its worker");
    c.assert_exec_works(&id, "sleep");
    c.kill_and_remove(&id);
    c.assert_gone(&id);
    c.drain_pool().expect("drain");
}

/// A CNI plugin that hangs is killed after `pool.cni_timeout_secs`; containers run without
/// a sandbox meanwhile, and nothing of the failed sandboxes is left (holders, cgroups,
/// plugin processes, address leases).
#[test]
fn a_hanging_cni_plugin_is_killed_and_undone() {
    require_root();
    let c = Containerd::start();
    let bin = c.dir().join("cni-bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for p in ["bridge", "host-local", "loopback"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p))
            .expect("symlink");
    }
    write_script(&bin.join("hang"), "sleep 1000");
    let marker = bin.join("hang").to_string_lossy().into_owned();
    let net = unique_id("trenv-hang");
    let conf = c.dir().join("hang.conflist");
    std::fs::write(
        &conf,
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": net,
            "plugins": [
                {"type": "bridge", "bridge": "trenvhang0", "isGateway": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.78.0.0/24"}]]}},
                {"type": "hang"}
            ]
        })
        .to_string(),
    )
    .expect("conflist");
    c.set_pool_config(&format!(
        "min_idle = 1\nmax_idle = 2\ncni_config = \"{}\"\ncni_bin_dir = \"{}\"\ncni_timeout_secs = 2",
        conf.display(),
        bin.display()
    ));
    c.import_busybox();
    let t = Instant::now();
    run_once(&c, &unique_id("fault-cni"));
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "start took {:?}",
        t.elapsed()
    );
    c.drain_pool().expect("drain");
    assert!(
        gone_soon(&marker),
        "hung plugin left: {:?}",
        processes_with(&marker)
    );
    let leases: Vec<_> = std::fs::read_dir(Path::new("/var/lib/cni/networks").join(&net))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
        .collect();
    assert!(leases.is_empty(), "address leases left: {leases:?}");
    let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&net));
    let _ = std::process::Command::new("ip")
        .args(["link", "del", "trenvhang0"])
        .status();
    let log = std::fs::read_to_string(c.dir().join("containerd.log")).unwrap_or_default();
    assert!(
        log.contains("did not finish within 2s"),
        "no timeout reported in the shim log"
    );
}

/// A pool shim whose containerd is gone, with no task left, drains its pool and exits
/// after `pool.orphan_grace_secs`.
#[test]
fn an_orphaned_pool_shim_drains_and_exits() {
    require_root();
    let mut c = Containerd::start();
    c.set_pool_config("min_idle = 1\nmax_idle = 4\norphan_grace_secs = 2");
    c.import_busybox();
    run_once(&c, &unique_id("fault-orphan"));
    let shim = shim_pid(&c);
    let holders = wait_for(Duration::from_secs(10), || {
        Some(children_with(shim, "trenv-sandbox-holder")).filter(|h| !h.is_empty())
    })
    .expect("the pool has no sandbox");
    c.stop();
    let t = Instant::now();
    let exited = wait_for(Duration::from_secs(30), || {
        (!Path::new(&format!("/proc/{shim}")).exists()).then_some(())
    });
    assert!(
        exited.is_some(),
        "the orphaned shim {shim} is still running"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "exited before its grace period"
    );
    assert_all_gone(&holders);
    assert!(!c.pool_dir().exists(), "pool state left");
    c.resume();
}

/// A zygote worker killed while it creates a container (held in a createRuntime hook):
/// `ctr run` fails at once with the worker's fate, the half-made container is deleted
/// (hook, state, cgroup) and the next container starts.
#[test]
fn a_worker_killed_mid_create_is_reported_and_undone() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let hook = c.dir().join("slow-create-hook.sh");
    write_script(&hook, "sleep 1000");
    // `ctr run --config` takes the whole spec, rootfs included: a busybox directory.
    let rootfs = c.dir().join("slow-create-rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    let spec_text = c.ctr_ok(&["oci", "spec"]);
    let mut spec: serde_json::Value = serde_json::from_str(&spec_text).expect("spec");
    spec["root"]["path"] = serde_json::json!(rootfs.to_string_lossy());
    spec["hooks"]["createRuntime"] = serde_json::json!([{ "path": hook.to_string_lossy() }]);
    spec["process"]["args"] = serde_json::json!(["/bin/busybox", "sleep", "1000"]);
    let config = c.dir().join("slow-create.json");
    std::fs::write(&config, spec.to_string()).expect("spec file");
    let id = unique_id("fault-create");
    let mut ctr = c.ctr_cmd();
    ctr.args(["run", "--rm", "--runtime", RUNTIME, "--config"])
        .arg(&config)
        .arg(&id);
    let mut child = ctr
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ctr run");
    let marker = hook.to_string_lossy().into_owned();
    let hung = wait_for(Duration::from_secs(20), || {
        processes_with(&marker).first().copied()
    })
    .expect("the createRuntime hook never ran");
    // The hook's parent is the worker (libcontainer runs hooks from the runtime process).
    let worker = std::fs::read_to_string(format!("/proc/{hung}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.split_whitespace().nth(1)?.parse::<i32>().ok()
        })
        .expect("hook's parent");
    let cmd = std::fs::read(format!("/proc/{worker}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmd).contains("trenv-zygote"),
        "the hook's parent {worker} is not a zygote worker"
    );
    let t = Instant::now();
    kill9(worker);
    let out = wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten())
        .map(|_| child.wait_with_output().expect("ctr output"))
        .expect("ctr run did not return after its worker was killed");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ended without answering") && stderr.contains("SIGKILL"),
        "unclear error: {stderr}"
    );
    println!("ctr run returned {:?} after the kill", t.elapsed());
    assert!(gone_soon(&marker), "the hook survived its worker");
    c.assert_gone(&id);
    run_once(&c, &unique_id("fault-after-create"));
}

/// A `binary://` logger that dies: the container's writes fail with EPIPE (nothing in the
/// shim holds the pipe open, so it never blocks on a full pipe; its init, pid 1 of its
/// namespace, ignores SIGPIPE and carries on), its task ends normally, and the shim serves on.
#[test]
fn a_dying_logger_blocks_neither_its_container_nor_the_shim() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let logger = c.dir().join("dying-logger.sh");
    // Signals readiness (closes fd 5), reads one line, then dies.
    write_script(&logger, "exec 5>&-\nhead -n1 <&3 >/dev/null\nexit 1");
    let id = unique_id("fault-logger");
    let t = Instant::now();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &format!("binary://{}", logger.display()),
        BUSYBOX,
        &id,
        "sh",
        "-c",
        // 1 MiB after the logger is gone: far more than a pipe holds.
        "echo first; sleep 0.5; i=0; while [ $i -lt 256 ]; do head -c 4096 /dev/zero; i=$((i+1)); done; exit 7",
    ]);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gone_soon(&logger.to_string_lossy()));
    c.assert_gone(&id);
    run_once(&c, &unique_id("fault-after-logger"));
}

/// The client reading a task's output goes away (ctr killed): the task's writes fail with
/// EPIPE or block, but the task stays manageable — kill, wait and delete work and the
/// shim serves on.
#[test]
fn a_vanished_stdout_reader_leaves_the_task_manageable() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("fault-epipe");
    let mut ctr = c.ctr_cmd();
    ctr.args(["run", "--runtime", RUNTIME, BUSYBOX, &id])
        .args(["sh", "-c", "while true; do echo spam; done"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = ctr.spawn().expect("ctr run");
    {
        use std::io::Read;
        let mut first = [0u8; 64];
        let out = child.stdout.as_mut().expect("stdout");
        out.read_exact(&mut first).expect("first output");
        assert!(String::from_utf8_lossy(&first).contains("spam"));
    }
    kill9(i32::try_from(child.id()).expect("pid"));
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(300));
    // Whether the writer died of SIGPIPE or blocks on a full pipe, the task answers.
    let t = Instant::now();
    let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    c.wait_task(&id, "STOPPED");
    c.ctr_ok(&["task", "rm", &id]);
    c.ctr_ok(&["container", "rm", &id]);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    c.assert_gone(&id);
    run_once(&c, &unique_id("fault-after-epipe"));
}
