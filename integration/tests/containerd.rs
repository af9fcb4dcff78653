//! containerd 1.6's stock runc shim (io.containerd.runc.v2) driving the trenv binary.

use std::time::Duration;

use trenv_integration::containerd::{Containerd, BUSYBOX};
use trenv_integration::leaks::{cgroup_dirs, mounts_with, processes_with};
use trenv_integration::runtime::trenv_bin;
use trenv_integration::{require_root, unique_id, wait_for};

fn trenv() -> String {
    trenv_bin().to_string_lossy().into_owned()
}

fn assert_task_gone(c: &Containerd, id: &str) {
    let cg = cgroup_dirs(&format!(
        "/{}/{id}",
        trenv_integration::containerd::NAMESPACE
    ));
    assert!(cg.is_empty(), "cgroups of {id} left: {cg:?}");
    let m = mounts_with(id);
    assert!(m.is_empty(), "mounts of {id} left: {m:?}");
    let gone = wait_for(Duration::from_secs(5), || {
        processes_with(&format!("-id {id}"))
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "shim of {id} still running");
    let out = c.ctr_ok(&["containers", "list", "-q"]);
    assert!(!out.lines().any(|l| l == id), "container {id} still listed");
}

#[test]
fn ctr_run_prints_output_and_exit_code() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("ctr-run");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        &trenv(),
        BUSYBOX,
        &id,
        "sh",
        "-c",
        "echo hello from trenv; echo $(hostname); exit 7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello from trenv"), "{stdout}");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_task_gone(&c, &id);
}

#[test]
fn ctr_task_exec_and_kill() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("ctr-exec");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runc-binary",
        &trenv(),
        BUSYBOX,
        &id,
        "sleep",
        "1000",
    ]);
    c.wait_task(&id, "RUNNING");

    // The runc shim really drives trenv: trenv reads its own state under the shim's root.
    let st = std::process::Command::new(trenv_bin())
        .args([
            "--root",
            &format!(
                "/run/containerd/runc/{}",
                trenv_integration::containerd::NAMESPACE
            ),
            "state",
            &id,
        ])
        .output()
        .expect("trenv state");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("json");
    assert_eq!(st["status"], "running");

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

    // ps through containerd lists the init.
    let ps = c.ctr_ok(&["task", "ps", &id]);
    assert!(ps.lines().count() >= 2, "{ps}");

    // pause/resume through the shim.
    c.ctr_ok(&["task", "pause", &id]);
    assert_eq!(c.task_status(&id).as_deref(), Some("PAUSED"));
    c.ctr_ok(&["task", "resume", &id]);
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));

    c.kill_and_remove(&id);
    assert_task_gone(&c, &id);
}

#[test]
fn ctr_task_checkpoint_through_the_runc_shim() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("ctr-ckpt");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runc-binary",
        &trenv(),
        BUSYBOX,
        &id,
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.05; done",
    ]);
    let counting = wait_for(Duration::from_secs(10), || {
        let out = c.ctr(&["task", "exec", "--exec-id", "r1", &id, "cat", "/tmp/c"]);
        let n: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        (n > 3).then_some(())
    });
    assert!(counting.is_some());
    // containerd pauses the task, has trenv dump it with --leave-running, then resumes it.
    c.ctr_ok(&["task", "checkpoint", &id]);
    let images = c.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with(&format!("containerd.io/checkpoint/{id}:"))),
        "{images}"
    );
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));
    let before: u64 = c
        .ctr_ok(&["task", "exec", "--exec-id", "r2", &id, "cat", "/tmp/c"])
        .trim()
        .parse()
        .expect("count");
    std::thread::sleep(Duration::from_millis(300));
    let after: u64 = c
        .ctr_ok(&["task", "exec", "--exec-id", "r3", &id, "cat", "/tmp/c"])
        .trim()
        .parse()
        .expect("count");
    assert!(
        after > before,
        "not counting after checkpoint: {before} -> {after}"
    );
    c.kill_and_remove(&id);
    assert_task_gone(&c, &id);
}
