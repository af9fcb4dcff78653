//! containerd 1.6's stock runc shim (io.containerd.runc.v2) driving the trenv binary.

use trenv_integration::containerd::{Containerd, BUSYBOX, COUNTER};
use trenv_integration::runtime::trenv_bin;
use trenv_integration::{require_root, unique_id};

fn trenv() -> String {
    trenv_bin().to_string_lossy().into_owned()
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
    c.assert_gone(&id);
}

#[test]
fn ctr_task_exec_and_kill() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("ctr-exec");
    c.run_detached_with(&["--runc-binary", &trenv()], &id, &["sleep", "1000"]);

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

    c.assert_exec_works(&id, "sleep");
    c.assert_ps_pause_resume(&id);

    c.kill_and_remove(&id);
    c.assert_gone(&id);
}

#[test]
fn ctr_task_checkpoint_through_the_runc_shim() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("ctr-ckpt");
    c.run_detached_with(&["--runc-binary", &trenv()], &id, &["sh", "-c", COUNTER]);
    assert!(c.counter_reaching(&id, 4).is_some());
    // containerd pauses the task, has trenv dump it with --leave-running, then resumes it.
    c.assert_checkpoint_keeps_running(&id);
    c.kill_and_remove(&id);
    c.assert_gone(&id);
}
