//! containerd-shim-trenv-v2 under a containerd restart and under concurrent starts.

use trenv_integration::containerd::{Containerd, BUSYBOX};
use trenv_integration::{require_root, unique_id};

use trenv_integration::containerd::TRENV_RUNTIME as RUNTIME;

/// CPU time (user + system, in clock ticks) a process has used; None once it has exited
/// (the zygotes' short-lived workers match the shim's command line too).
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A running task survives a containerd restart: same pid, still running, and reachable
/// again (exec, pause/resume, kill, wait, delete) once containerd is back. While containerd
/// is down the shim stays idle (with debug logging, whose log FIFO has lost its reader).
#[test]
fn task_survives_containerd_restart() {
    require_root();
    let mut c = Containerd::start_with_log_level("debug");
    c.import_busybox();
    let id = unique_id("shim-restart");
    c.run_detached(
        &id,
        &["sh", "-c", "echo alive > /tmp/mark; exec sleep 1000"],
    );
    let pid_of = |c: &Containerd| -> String {
        let ls = c.ctr_ok(&["task", "ls"]);
        ls.lines()
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next() == Some(id.as_str())).then(|| cols.next().unwrap_or("").to_string())
            })
            .unwrap_or_default()
    };
    let pid = pid_of(&c);
    assert!(!pid.is_empty());

    let shim = trenv_integration::leaks::processes_with(&format!("-id {id} "));
    assert!(!shim.is_empty(), "no shim for {id}");
    c.stop();
    let before: Vec<(i32, u64)> = shim
        .iter()
        .filter_map(|p| Some((*p, cpu_ticks(*p)?)))
        .collect();
    assert!(!before.is_empty(), "the shim is gone");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used: u64 = before
        .iter()
        .filter_map(|(p, t)| Some(cpu_ticks(*p)?.saturating_sub(*t)))
        .sum();
    assert!(
        used < 10,
        "the shim used {used} ticks of CPU in 1 s without containerd"
    );
    c.resume();

    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));
    assert_eq!(pid_of(&c), pid, "the task was restarted, not kept");
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        &id,
        "cat",
        "/tmp/mark",
    ]);
    assert_eq!(out.trim(), "alive");
    c.ctr_ok(&["task", "pause", &id]);
    c.wait_task(&id, "PAUSED");
    c.ctr_ok(&["task", "resume", &id]);
    c.wait_task(&id, "RUNNING");
    // Exit events reach the new containerd: the task is seen to stop.
    c.kill_and_remove(&id);
    c.assert_gone(&id);
}

/// 20 containers started at once all run, print their own output, exit with their own
/// code, and leave nothing behind.
#[test]
fn twenty_concurrent_containers() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let ids: Vec<String> = (0..20).map(|_| unique_id("shim-conc")).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let c = &c;
                s.spawn(move || {
                    let script = format!("echo hello-{n}; exit {}", n % 7);
                    let out = c.ctr(&[
                        "run",
                        "--rm",
                        "--runtime",
                        RUNTIME,
                        BUSYBOX,
                        id,
                        "sh",
                        "-c",
                        &script,
                    ]);
                    (n, out)
                })
            })
            .collect();
        for h in handles {
            let (n, out) = h.join().expect("thread");
            assert_eq!(
                out.status.code(),
                Some(i32::try_from(n % 7).expect("small")),
                "container {n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("hello-{n}\n"));
        }
    });
    for id in &ids {
        c.assert_gone(id);
    }
    // And the same number running side by side, then stopped together.
    std::thread::scope(|s| {
        for id in &ids {
            let c = &c;
            s.spawn(move || c.run_detached(id, &["sleep", "1000"]));
        }
    });
    std::thread::scope(|s| {
        for id in &ids {
            let c = &c;
            s.spawn(move || c.kill_and_remove(id));
        }
    });
    for id in &ids {
        c.assert_gone(id);
    }
}

/// `shim start` ends with the namespace shim's address even while signals rain on it. A
/// signal in the moment containerd-shim closes its signal pipe used to make it spin for
/// ever, and containerd's create with it.
#[test]
fn shim_start_ends_under_a_storm_of_signals() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-storm");
    c.run_detached(&id, &["sleep", "1000"]);
    let socket = c.socket().to_string_lossy().into_owned();
    let bundle = tempfile::tempdir().expect("bundle");
    let mut address = None;
    for round in 0..40 {
        let mut start = Command::new(trenv_integration::runtime::shim_bin())
            .args(["-namespace", c.namespace(), "-address", &socket])
            .args(["-publish-binary", "containerd", "-id"])
            .arg(format!("storm-{round}"))
            .arg("start")
            .current_dir(bundle.path())
            .env("TTRPC_ADDRESS", format!("{socket}.ttrpc"))
            .env("TRENV_SHIM_CONFIG", c.shim_config())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("shim start");
        let pid = Pid::from_raw(i32::try_from(start.id()).expect("pid"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while start.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = start.kill();
                let _ = start.wait();
                panic!("`shim start` (round {round}) still running after 10 s of SIGCHLD");
            }
            let _ = kill(pid, Signal::SIGCHLD);
        }
        let out = start.wait_with_output().expect("output");
        assert!(out.status.success(), "round {round}: {:?}", out.status);
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(got.starts_with("unix://"), "round {round}: {got:?}");
        // Every start hands the task to the one running shim.
        assert_eq!(address.get_or_insert_with(|| got.clone()), &got);
    }
    c.kill_and_remove(&id);
    c.assert_gone(&id);
}
