//! containerd-shim-trenv-v2 driven by a private containerd through `ctr`.

use std::time::Duration;

use trenv_integration::containerd::{Containerd, BUSYBOX, COUNTER, NAMESPACE};
use trenv_integration::netns::http_get;
use trenv_integration::runtime::shim_bin;
use trenv_integration::{require_root, unique_id, wait_for};

use trenv_integration::containerd::TRENV_RUNTIME as RUNTIME;

#[test]
fn run_by_runtime_name_and_by_path() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let shim = shim_bin().to_string_lossy().into_owned();
    for runtime in [RUNTIME, shim.as_str()] {
        let id = unique_id("shim-run");
        let out = c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            runtime,
            BUSYBOX,
            &id,
            "sh",
            "-c",
            "echo out; echo err >&2; exit 5",
        ]);
        assert_eq!(
            out.status.code(),
            Some(5),
            "{runtime}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
        c.assert_gone(&id);
    }
}

#[test]
fn exec_kill_wait_pause_resume_ps() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-exec");
    c.run_detached(&id, &["sleep", "1000"]);
    // The shim really runs trenv's libcontainer state, not runc's.
    assert!(std::path::Path::new(&format!(
        "/run/containerd/trenv/{NAMESPACE}/{id}/state.json"
    ))
    .exists());

    c.assert_exec_works(&id, "sleep");
    // An exec id may be reused once the previous one is gone.
    let out = c.ctr(&["task", "exec", "--exec-id", "e1", &id, "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    c.assert_ps_pause_resume(&id);

    c.kill_and_remove(&id);
    c.assert_gone(&id);

    // A running task deleted with --force: containerd kills it, the shim cleans up.
    let id = unique_id("shim-force");
    c.run_detached(&id, &["sleep", "1000"]);
    c.ctr_ok(&["task", "delete", "--force", &id]);
    c.ctr_ok(&["containers", "delete", &id]);
    c.assert_gone(&id);
}

#[test]
fn bad_requests_get_errors() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-bad");
    c.run_detached(&id, &["sleep", "1000"]);
    // Unknown task.
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x",
        "trenv-it-no-such-task",
        "true",
    ]);
    assert!(!out.status.success());
    // An exec id that is in use.
    c.ctr_ok(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "dup",
        &id,
        "sleep",
        "1000",
    ]);
    let out = c.ctr(&["task", "exec", "--exec-id", "dup", &id, "true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A command that does not exist in the image: the exec fails, the task lives on.
    let out = c.ctr(&["task", "exec", "--exec-id", "x1", &id, "/no/such/binary"]);
    assert!(!out.status.success());
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    c.wait_task(&id, "STOPPED");
    // Killing an exited task is an error containerd understands, not a hang.
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["containers", "delete", &id]);
    c.assert_gone(&id);
}

#[test]
fn metrics_and_checkpoint_through_the_shim() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-ckpt");
    c.run_detached(&id, &["sh", "-c", COUNTER]);
    let m: serde_json::Value =
        serde_json::from_str(&c.ctr_ok(&["task", "metrics", "--format", "json", &id]))
            .expect("json");
    assert!(
        m["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0,
        "{m}"
    );
    assert!(m["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{m}");

    c.assert_checkpoint_keeps_running(&id);
    c.kill_and_remove(&id);
    c.assert_gone(&id);
}

/// A malformed trenv annotation or shim config fails Create with the reason, and leaves
/// nothing behind.
#[test]
fn malformed_annotations_and_config_are_rejected() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let config = c.dir().join("bad-shim.toml");
    std::fs::write(&config, "criu_paht = \"/usr/sbin/criu\"\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--annotation", "io.trenv.criu.file-locks=maybe"],
            "expected true or false",
        ),
        (
            &["--annotation", "io.trenv.ready=http:8080"],
            "expected tcp:<port>, http:<port><path>",
        ),
        (
            &["--annotation", "io.trenv.criu.tcp=true"],
            "unknown annotation",
        ),
        (
            &["--runtime-config-path", &config],
            "unknown field `criu_paht`",
        ),
        (
            &["--runtime-config-path", "/nonexistent/shim.toml"],
            "reading shim config",
        ),
    ];
    for (extra, expected) in cases {
        let id = unique_id("shim-badanno");
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[BUSYBOX, &id, "true"]);
        let out = c.ctr(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        let _ = c.ctr(&["containers", "delete", &id]);
        c.assert_gone(&id);
    }
    // A well-formed config file is applied: io_uid owns the process's stdio pipes. It is a
    // file of its own: the shim's default file also holds the pool settings, which
    // `shim start` reads to find the namespace's running shim.
    let good = c.dir().join("good-shim.toml");
    std::fs::write(&good, "io_uid = 1234\nio_gid = 1234\n").expect("config");
    let id = unique_id("shim-cfg");
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        &good.to_string_lossy(),
        BUSYBOX,
        &id,
        "stat",
        "-L",
        "-c",
        "%u:%g",
        "/proc/self/fd/1",
    ]);
    assert_eq!(out.trim(), "1234:1234");
    c.assert_gone(&id);
}

/// `ctr container checkpoint --task` then `ctr container restore --live`: the restored task
/// continues from the checkpointed memory, not from a fresh start.
#[test]
fn container_checkpoint_then_restore_through_ctr() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-restore");
    c.run_detached(&id, &["sh", "-c", COUNTER]);
    let read = |e: &str| c.counter(&id, e);
    c.counter_reaching(&id, 30).expect("counter");
    let image = format!("trenv-it/{id}-ckpt:latest");
    // With the rw layer, so that /tmp/c exists at restore even if the dump caught the
    // loop with it open (CRIU reopens the files a process has open).
    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", &id, &image]);
    let at_checkpoint = read("r0");
    c.kill_and_remove(&id);

    c.ctr_ok(&["containers", "restore", "--live", "--rw", &id, &image]);
    c.wait_task(&id, "RUNNING");
    // A loop started afresh would have counted to a handful by now; the restored one
    // continues from the checkpointed count.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let restored = c.counter_reaching(&id, 1).expect("restored");
    assert!(
        restored + 5 >= at_checkpoint && restored >= 20,
        "restored count {restored}, checkpointed {at_checkpoint}"
    );
    let later = read("r2");
    assert!(later >= restored);
    c.kill_and_remove(&id);
    c.assert_gone(&id);
    c.ctr_ok(&["images", "rm", &image]);
}

/// A container exceeding its memory limit is OOM-killed and containerd gets TaskOOM.
#[test]
fn oom_kill_publishes_task_oom() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let events = c.events();
    let id = unique_id("shim-oom");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "16777216",
        BUSYBOX,
        &id,
        "sh",
        "-c",
        "x=a; while true; do x=$x$x; done",
    ]);
    assert_eq!(out.status.code(), Some(137));
    let oom = events.wait("/tasks/oom", &id, Duration::from_secs(5));
    assert!(oom.is_some(), "no /tasks/oom for {id}:\n{}", events.text());
    // A container that stays within its limit gets none.
    let calm = unique_id("shim-nooom");
    c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "16777216",
        BUSYBOX,
        &calm,
        "true",
    ]);
    assert!(events
        .wait("/tasks/exit", &calm, Duration::from_secs(5))
        .is_some());
    assert!(events
        .wait("/tasks/oom", &calm, Duration::from_millis(200))
        .is_none());
    c.assert_gone(&id);
    c.assert_gone(&calm);
}

/// The pid of a running task, from `ctr task ls`.
fn task_pid(c: &Containerd, id: &str) -> String {
    let ls = c.ctr_ok(&["task", "ls"]);
    ls.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no task {id}: {ls}"))
        .to_string()
}

/// A server listening on TCP in a pooled sandbox is checkpointed through containerd and
/// restored; the restored server answers from its sandbox's network.
#[test]
fn a_tcp_server_checkpoints_and_restores_through_ctr() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-tcp");
    c.run_detached(
        &id,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo served-$$ > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    let pid = task_pid(&c, &id);
    let before =
        wait_for(Duration::from_secs(10), || http_get(&pid, "/")).expect("httpd never answered");
    let image = format!("trenv-it/{id}-ckpt:latest");
    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", &id, &image]);
    c.kill_and_remove(&id);
    c.ctr_ok(&["containers", "restore", "--live", "--rw", &id, &image]);
    c.wait_task(&id, "RUNNING");
    let pid = task_pid(&c, &id);
    let after = wait_for(Duration::from_secs(10), || http_get(&pid, "/"))
        .expect("restored httpd never answered");
    assert_eq!(after, before);
    c.kill_and_remove(&id);
    c.assert_gone(&id);
    c.ctr_ok(&["images", "rm", &image]);
}

/// `io.trenv.ready`: `ctr run -d` returns once the server answers, not when its process
/// starts; a process that exits first does not hold Start.
#[test]
fn start_returns_when_the_container_is_ready() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    // `ctr run -d` with an io.trenv.ready annotation; how long it took.
    let run_ready = |id: &str, ready: &str, script: &str| {
        let t = std::time::Instant::now();
        let annotation = format!("io.trenv.ready={ready}");
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--annotation",
            &annotation,
            BUSYBOX,
            id,
            "sh",
            "-c",
            script,
        ]);
        t.elapsed()
    };
    let id = unique_id("shim-ready");
    let took = run_ready(
        &id,
        "http:8080/",
        "sleep 1; mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    assert!(
        took >= Duration::from_millis(900),
        "returned after {took:?}"
    );
    // Answering already: one try, no retries.
    let pid = task_pid(&c, &id);
    assert_eq!(http_get(&pid, "/").as_deref(), Some("ok\n"));

    let quitter = unique_id("shim-ready-exit");
    let took = run_ready(&quitter, "tcp:9", "sleep 0.3; exit 3");
    assert!(took < Duration::from_secs(10), "{took:?}");
    c.wait_task(&quitter, "STOPPED");
    c.ctr_ok(&["task", "delete", &quitter]);
    c.ctr_ok(&["containers", "delete", &quitter]);
    c.assert_gone(&quitter);
    c.kill_and_remove(&id);
    c.assert_gone(&id);
}
