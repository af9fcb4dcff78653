//! The runc command set on the trenv binary: create/start/state/kill/delete, run, exec, ps,
//! pause/resume, events, update, features, spec.

use std::time::Duration;

use trenv_integration::bundle::{cgroup_path, Bundle};
use trenv_integration::leaks::{assert_container_gone, cgroup_dirs};
use trenv_integration::runtime::Runtime;
use trenv_integration::{require_root, unique_id, wait_for};

fn wait_status(rt: &Runtime, id: &str, want: &str) {
    // The container may not exist yet when a concurrent `run` is still creating it.
    let got = wait_for(Duration::from_secs(10), || {
        let out = rt.run(&["state", id]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["status"] == want).then_some(())
    });
    assert!(got.is_some(), "{id} never became {want}: {}", rt.state(id));
}

#[test]
fn create_start_kill_delete_with_states() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("life");
    let b = Bundle::new(&id, &["sleep", "1000"]);
    let bundle = b.path().to_string_lossy().into_owned();
    let pid_file = b.path().join("init.pid");

    rt.detached(&[
        "create",
        "--bundle",
        &bundle,
        "--pid-file",
        &pid_file.to_string_lossy(),
        &id,
    ]);
    let st = rt.state(&id);
    assert_eq!(st["status"], "created");
    assert_eq!(st["id"], id.as_str());
    assert_eq!(st["bundle"], bundle.as_str());
    assert_eq!(st["rootfs"], b.rootfs().to_string_lossy().as_ref());
    assert!(st["ociVersion"].is_string());
    assert!(st["created"].is_string());
    let pid = st["pid"].as_i64().expect("pid");
    assert!(pid > 0);
    let written: i64 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid number");
    assert_eq!(written, pid);
    assert!(!cgroup_dirs(&cgroup_path(&id)).is_empty(), "no cgroup");

    rt.ok(&["start", &id]);
    wait_status(&rt, &id, "running");
    // The init really runs the bundle's process.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert_eq!(cmdline, b"sleep\x001000\x00");

    rt.ok(&["kill", &id, "KILL"]);
    wait_status(&rt, &id, "stopped");
    assert_eq!(rt.state(&id)["pid"], 0);
    let e = rt.fail(&["kill", &id, "TERM"]);
    assert!(e.contains("not running"), "{e}");

    rt.ok(&["delete", &id]);
    let e = rt.fail(&["state", &id]);
    assert!(e.contains("does not exist"), "{e}");
    assert_container_gone(&rt, &id);
    // Orphaned inits are reaped by the host's init; it must at least not be running.
    let dead = wait_for(Duration::from_secs(5), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });
    assert!(dead.is_some(), "init {pid} still alive");
}

#[test]
fn run_propagates_output_and_exit_code() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("run");
    let b = Bundle::new(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    let out = rt.run(&["run", "--bundle", &b.path().to_string_lossy(), &id]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
    assert_container_gone(&rt, &id);
}

#[test]
fn run_forwards_signals_and_reports_signal_deaths() {
    require_root();
    let rt = Runtime::trenv();
    // A signal sent to `trenv run` reaches the container's init.
    let id = unique_id("run-fwd");
    let b = Bundle::new(
        &id,
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while :; do sleep 0.05; done",
        ],
    );
    let mut child = rt
        .cmd()
        .args(["run", "--bundle", &b.path().to_string_lossy(), &id])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    wait_status(&rt, &id, "running");
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    assert_eq!(child.wait().expect("wait").code(), Some(42));
    assert_container_gone(&rt, &id);

    // Death by signal is reported like a shell does (128 + N).
    let id = unique_id("run-sig");
    let b = Bundle::new(&id, &["sleep", "1000"]);
    let mut child = rt
        .cmd()
        .args(["run", "--bundle", &b.path().to_string_lossy(), &id])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    wait_status(&rt, &id, "running");
    rt.ok(&["kill", &id, "9"]);
    assert_eq!(child.wait().expect("wait").code(), Some(137));
    assert_container_gone(&rt, &id);
}

#[test]
fn run_keep_leaves_a_stopped_container() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("keep");
    let b = Bundle::new(&id, &["true"]);
    let out = rt.run(&[
        "run",
        "--keep",
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    assert!(out.status.success());
    assert_eq!(rt.status(&id), "stopped");
    rt.ok(&["delete", &id]);
    assert_container_gone(&rt, &id);
}

#[test]
fn exec_ps_pause_resume_events_update() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("exec");
    let b = Bundle::new(
        &id,
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tick; sleep 0.05; done",
        ],
    );
    rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    wait_status(&rt, &id, "running");

    // exec: own exit code, container's namespaces and rootfs, extra env.
    let out = rt.run(&["exec", &id, "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    let out = rt.ok(&[
        "exec",
        "--env",
        "GREETING=hi",
        &id,
        "sh",
        "-c",
        "echo $GREETING $(hostname) $(cat /proc/1/comm)",
    ]);
    assert_eq!(out.trim(), "hi trenv-it sh");
    let host_pidns = std::fs::read_link("/proc/self/ns/pid").expect("ns");
    let out = rt.ok(&["exec", &id, "readlink", "/proc/self/ns/pid"]);
    assert_ne!(
        out.trim(),
        host_pidns.to_string_lossy(),
        "exec ran outside the pid namespace"
    );

    // ps
    let init = rt.state(&id)["pid"].as_i64().expect("pid");
    let pids: Vec<i64> =
        serde_json::from_str(&rt.ok(&["ps", "--format", "json", &id])).expect("json");
    assert!(pids.contains(&init), "{pids:?} lacks {init}");
    let table = rt.ok(&["ps", &id]);
    assert!(table.starts_with("UID") || table.contains("PID"), "{table}");
    assert!(table.contains(&init.to_string()), "{table}");

    // pause freezes the process: the tick file stops changing.
    rt.ok(&["pause", &id]);
    assert_eq!(rt.status(&id), "paused");
    let tick = b.rootfs().join("tick");
    let before = std::fs::read_to_string(&tick).expect("tick");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        std::fs::read_to_string(&tick).expect("tick"),
        before,
        "ticked while paused"
    );
    rt.ok(&["resume", &id]);
    assert_eq!(rt.status(&id), "running");
    let moved = wait_for(Duration::from_secs(5), || {
        (std::fs::read_to_string(&tick).ok()? != before).then_some(())
    });
    assert!(moved.is_some(), "no progress after resume");

    // events --stats speaks runc's format.
    let ev: serde_json::Value =
        serde_json::from_str(&rt.ok(&["events", "--stats", &id])).expect("json");
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["id"], id.as_str());
    assert!(
        ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0,
        "{ev}"
    );
    assert!(
        ev["data"]["pids"]["current"].as_u64().unwrap_or(0) >= 1,
        "{ev}"
    );

    // update changes the live cgroup.
    rt.ok(&["update", "--memory", "67108864", "--pids-limit", "50", &id]);
    let ev: serde_json::Value =
        serde_json::from_str(&rt.ok(&["events", "--stats", &id])).expect("json");
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 67108864, "{ev}");
    assert_eq!(ev["data"]["pids"]["limit"], 50, "{ev}");
    let res = b.path().join("res.json");
    std::fs::write(&res, r#"{"memory":{"limit":33554432}}"#).expect("write");
    rt.ok(&["update", "--resources", &res.to_string_lossy(), &id]);
    let ev: serde_json::Value =
        serde_json::from_str(&rt.ok(&["events", "--stats", &id])).expect("json");
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 33554432, "{ev}");

    // kill --all reaches every process, including a detached exec.
    rt.detached(&["exec", "--detach", &id, "sleep", "1000"]);
    let pids: Vec<i64> =
        serde_json::from_str(&rt.ok(&["ps", "--format", "json", &id])).expect("json");
    assert!(pids.len() >= 2, "{pids:?}");
    rt.ok(&["kill", "--all", &id, "KILL"]);
    let all_dead = wait_for(Duration::from_secs(5), || {
        pids.iter()
            .all(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                stat.is_empty() || stat.contains(") Z ")
            })
            .then_some(())
    });
    assert!(all_dead.is_some(), "kill --all left some of {pids:?}");
    wait_status(&rt, &id, "stopped");
    rt.ok(&["delete", &id]);
    assert_container_gone(&rt, &id);

    // delete --force removes a running container.
    let id = unique_id("force");
    let b = Bundle::new(&id, &["sleep", "1000"]);
    rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    let e = rt.fail(&["delete", &id]);
    assert!(e.contains(&id), "{e}");
    rt.ok(&["delete", "--force", &id]);
    assert_container_gone(&rt, &id);
}

#[test]
fn list_shows_containers() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("list");
    let b = Bundle::new(&id, &["sleep", "1000"]);
    rt.detached(&["create", "--bundle", &b.path().to_string_lossy(), &id]);
    let v: serde_json::Value =
        serde_json::from_str(&rt.ok(&["list", "--format", "json"])).expect("json");
    assert_eq!(v[0]["id"], id.as_str());
    assert_eq!(v[0]["status"], "created");
    assert_eq!(rt.ok(&["list", "-q"]).trim(), id);
    rt.ok(&["delete", "--force", &id]);
    assert_container_gone(&rt, &id);
}

#[test]
fn features_and_spec() {
    require_root();
    let rt = Runtime::trenv();
    let f: serde_json::Value = serde_json::from_str(&rt.ok(&["features"])).expect("json");
    assert!(f["ociVersionMax"].is_string());
    let ns = f["linux"]["namespaces"].as_array().expect("namespaces");
    assert!(ns.iter().any(|n| n == "pid"));
    assert!(f["linux"]["capabilities"]
        .as_array()
        .expect("caps")
        .iter()
        .any(|c| c == "CAP_SYS_ADMIN"));

    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().to_string_lossy().into_owned();
    rt.ok(&["spec", "--bundle", &d]);
    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("config.json")).expect("read"),
    )
    .expect("json");
    assert!(spec["process"]["args"].is_array());
    let e = rt.fail(&["spec", "--bundle", &d]);
    assert!(e.contains("exists"), "{e}");
}

/// A failing poststop hook is a warning (runtime spec): delete finishes, the state is
/// gone, the hook ran. Even with the bundle already removed, delete --force finishes.
#[test]
fn failing_poststop_hook_does_not_stop_delete() {
    require_root();
    let rt = Runtime::trenv();
    for remove_bundle in [false, true] {
        let id = unique_id("poststop");
        let b = Bundle::new(&id, &["true"]);
        let ran = b.path().with_extension("hook-ran");
        let ran_path = ran.to_string_lossy().into_owned();
        b.edit(|c| {
            c["hooks"] = serde_json::json!({
                "poststop": [
                    {"path": "/bin/sh", "args": ["sh", "-c", format!("touch {ran_path}; exit 3")]},
                ]
            });
        });
        let bundle = b.path().to_string_lossy().into_owned();
        rt.detached(&["create", "--bundle", &bundle, &id]);
        if remove_bundle {
            std::fs::remove_file(b.path().join("config.json")).expect("remove config");
        }
        rt.ok(&["delete", "--force", &id]);
        assert!(ran.exists(), "the poststop hook did not run");
        let _ = std::fs::remove_file(&ran);
        assert!(
            !rt.root().join(&id).exists(),
            "state directory of {id} left after delete"
        );
        assert_container_gone(&rt, &id);
    }
}

/// `linux.resources.memory.disableOOMKiller` reaches the memory cgroup (v1:
/// memory.oom_control).
#[test]
fn disable_oom_killer_is_applied() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("oomoff");
    let b = Bundle::new(&id, &["sleep", "1000"]);
    b.edit(|c| {
        c["linux"]["resources"]["memory"] =
            serde_json::json!({"limit": 64 * 1024 * 1024, "disableOOMKiller": true});
    });
    let bundle = b.path().to_string_lossy().into_owned();
    rt.detached(&["create", "--bundle", &bundle, &id]);
    let control = std::path::Path::new("/sys/fs/cgroup/memory")
        .join(cgroup_path(&id).trim_start_matches('/'))
        .join("memory.oom_control");
    let text = std::fs::read_to_string(&control).expect("memory.oom_control");
    rt.ok(&["delete", "--force", &id]);
    assert!(text.contains("oom_kill_disable 1"), "{text}");
    assert_container_gone(&rt, &id);
}

/// A process given by path runs without `PATH` in its environment (pause, distroless and
/// scratch images set none), as under runc; a bare name without `PATH` is refused clearly.
#[test]
fn a_process_given_by_path_needs_no_path_variable() {
    require_root();
    for rt in [Runtime::trenv(), Runtime::runc()] {
        let id = unique_id("no-path");
        let b = Bundle::new(&id, &["/bin/sh", "-c", "echo ran; exit 3"]);
        b.edit(|c| c["process"]["env"] = serde_json::json!(["TERM=xterm"]));
        let out = rt.run(&["run", "--bundle", &b.path().to_string_lossy(), &id]);
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).as_ref()
            ),
            (Some(3), "ran\n"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_container_gone(&rt, &id);
    }
    let rt = Runtime::trenv();
    let id = unique_id("no-path-bare");
    let b = Bundle::new(&id, &["sh", "-c", "exit 0"]);
    b.edit(|c| c["process"]["env"] = serde_json::json!(["TERM=xterm"]));
    let out = rt.run(&["run", "--bundle", &b.path().to_string_lossy(), &id]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PATH"), "{err}");
    assert_container_gone(&rt, &id);
}
