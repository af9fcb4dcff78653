//! containerd-shim-trenv-v2 driven by a private containerd through `ctr`.

use std::time::Duration;

use trenv_integration::containerd::{Containerd, BUSYBOX, NAMESPACE};
use trenv_integration::leaks::{cgroup_dirs, mounts_with, processes_with};
use trenv_integration::runtime::shim_bin;
use trenv_integration::{require_root, unique_id, wait_for};

/// containerd's name for the trenv runtime; resolved through containerd's PATH.
const RUNTIME: &str = "io.containerd.trenv.v2";

fn assert_gone(c: &Containerd, id: &str) {
    let gone = wait_for(Duration::from_secs(5), || {
        processes_with(&format!("-id {id} "))
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "shim of {id} still running");
    let cg = cgroup_dirs(&format!("/{NAMESPACE}/{id}"));
    assert!(cg.is_empty(), "cgroups of {id} left: {cg:?}");
    let m = mounts_with(id);
    assert!(m.is_empty(), "mounts of {id} left: {m:?}");
    assert!(
        !std::path::Path::new(&format!("/run/containerd/trenv/{NAMESPACE}/{id}")).exists(),
        "state of {id} left"
    );
    let listed = c.ctr_ok(&["containers", "list", "-q"]);
    assert!(!listed.lines().any(|l| l == id), "{id} still listed");
}

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
        assert_gone(&c, &id);
    }
}

#[test]
fn exec_kill_wait_pause_resume_ps() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-exec");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        &id,
        "sleep",
        "1000",
    ]);
    c.wait_task(&id, "RUNNING");
    // The shim really runs trenv's libcontainer state, not runc's.
    assert!(std::path::Path::new(&format!(
        "/run/containerd/trenv/{NAMESPACE}/{id}/state.json"
    ))
    .exists());

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo exec-out; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("exec-out"));
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        &id,
        "cat",
        "/proc/1/cmdline",
    ]);
    assert!(out.starts_with("sleep"), "{out}");
    // An exec id may be reused once the previous one is gone.
    let out = c.ctr(&["task", "exec", "--exec-id", "e1", &id, "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ps = c.ctr_ok(&["task", "ps", &id]);
    assert!(ps.lines().count() >= 2, "{ps}");

    c.ctr_ok(&["task", "pause", &id]);
    assert_eq!(c.task_status(&id).as_deref(), Some("PAUSED"));
    c.ctr_ok(&["task", "resume", &id]);
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));

    c.kill_and_remove(&id);
    assert_gone(&c, &id);
}

#[test]
fn bad_requests_get_errors() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-bad");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        &id,
        "sleep",
        "1000",
    ]);
    c.wait_task(&id, "RUNNING");
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
    // A command that does not exist in the image: the exec fails, the task lives on.
    let out = c.ctr(&["task", "exec", "--exec-id", "x1", &id, "/no/such/binary"]);
    assert!(!out.status.success());
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    c.wait_task(&id, "STOPPED");
    // Killing an exited task is an error containerd understands, not a hang.
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(!out.status.success());
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["containers", "delete", &id]);
    assert_gone(&c, &id);
}

#[test]
fn metrics_and_checkpoint_through_the_shim() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-ckpt");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        &id,
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.05; done",
    ]);
    c.wait_task(&id, "RUNNING");
    let m: serde_json::Value =
        serde_json::from_str(&c.ctr_ok(&["task", "metrics", "--format", "json", &id]))
            .expect("json");
    assert!(
        m["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0,
        "{m}"
    );
    assert!(m["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{m}");

    c.ctr_ok(&["task", "checkpoint", &id]);
    let images = c.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with(&format!("containerd.io/checkpoint/{id}:"))),
        "{images}"
    );
    // The task keeps running after a checkpoint without --exit.
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));
    let read = |e: &str| -> u64 {
        c.ctr_ok(&["task", "exec", "--exec-id", e, &id, "cat", "/tmp/c"])
            .trim()
            .parse()
            .expect("count")
    };
    let before = read("r1");
    std::thread::sleep(Duration::from_millis(300));
    assert!(read("r2") > before);
    c.kill_and_remove(&id);
    assert_gone(&c, &id);
}
