//! Checkpoint and restore through the trenv binary with real CRIU.

use std::path::Path;
use std::time::Duration;

use trenv_integration::bundle::Bundle;
use trenv_integration::leaks::{assert_container_gone, processes_with};
use trenv_integration::netns::{http_get, loopback_up};
use trenv_integration::runtime::Runtime;
use trenv_integration::{require_root, unique_id, wait_for};

/// Appends an ever-growing count to /count; its memory (the shell variable) is the state
/// a restore must carry over.
const COUNTER: &[&str] = &[
    "sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i >> /count; sleep 0.05; done",
];

fn counts(rootfs: &Path) -> Vec<u64> {
    std::fs::read_to_string(rootfs.join("count"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn wait_count_above(rootfs: &Path, n: u64) {
    let ok = wait_for(Duration::from_secs(10), || {
        (counts(rootfs).last().copied().unwrap_or(0) > n).then_some(())
    });
    assert!(ok.is_some(), "count in {rootfs:?} never passed {n}");
}

/// The counter never restarted: every line is the previous one plus one.
fn assert_continuous(rootfs: &Path) {
    let c = counts(rootfs);
    for w in c.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "count restarted or skipped in {rootfs:?}: {c:?}"
        );
    }
}

fn start_counter(rt: &Runtime, id: &str) -> Bundle {
    let b = Bundle::new(id, COUNTER);
    rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &b.path().to_string_lossy(),
        id,
    ]);
    wait_count_above(&b.rootfs(), 3);
    b
}

fn kill_and_delete(rt: &Runtime, id: &str) {
    rt.ok(&["kill", id, "KILL"]);
    let stopped = wait_for(Duration::from_secs(10), || {
        (rt.status(id) == "stopped").then_some(())
    });
    assert!(stopped.is_some(), "{id} did not stop");
    rt.ok(&["delete", id]);
    assert_container_gone(rt, id);
}

#[test]
fn restored_container_continues_the_count() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("ckpt");
    let b = start_counter(&rt, &id);
    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    let img = images.path().to_string_lossy().into_owned();

    rt.ok(&["checkpoint", "--image-path", &img, &id]);
    // Without --leave-running the container is gone, like runc.
    assert!(rt.fail(&["state", &id]).contains("does not exist"));
    assert_container_gone(&rt, &id);
    let at_checkpoint = *counts(&b.rootfs()).last().expect("counted");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counts(&b.rootfs()).last().copied(),
        Some(at_checkpoint),
        "still counting after checkpoint"
    );
    assert!(Path::new(&img).join("descriptors.json").exists());

    let pid_file = images.path().join("restored.pid");
    rt.detached(&[
        "restore",
        "--detach",
        "--image-path",
        &img,
        "--bundle",
        &b.path().to_string_lossy(),
        "--pid-file",
        &pid_file.to_string_lossy(),
        &id,
    ]);
    let st = rt.state(&id);
    assert_eq!(st["status"], "running");
    let pid: i64 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(st["pid"], pid);
    wait_count_above(&b.rootfs(), at_checkpoint + 3);
    assert_continuous(&b.rootfs());

    // The restored container is a normal container: exec, checkpoint again, kill, delete.
    let out = rt.ok(&["exec", &id, "cat", "/proc/1/cmdline"]);
    assert!(out.starts_with("sh"), "{out}");
    kill_and_delete(&rt, &id);
}

#[test]
fn one_checkpoint_restores_twice_with_leave_running() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("twice");
    let b = start_counter(&rt, &id);
    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    let img = images.path().to_string_lossy().into_owned();

    rt.ok(&["checkpoint", "--leave-running", "--image-path", &img, &id]);
    assert_eq!(rt.status(&id), "running");
    // Two more containers from the same image set, each on a copy of the rootfs as of now.
    let ids = [unique_id("twice-a"), unique_id("twice-b")];
    let bundles: Vec<Bundle> = ids.iter().map(|i| b.clone_as(i)).collect();
    let base = *counts(&bundles[0].rootfs()).last().expect("counted");
    for (cid, cb) in ids.iter().zip(&bundles) {
        let work = images.path().join(format!("work-{cid}"));
        rt.detached(&[
            "restore",
            "--detach",
            "--image-path",
            &img,
            "--work-path",
            &work.to_string_lossy(),
            "--bundle",
            &cb.path().to_string_lossy(),
            cid,
        ]);
        assert!(work.join("restore.log").exists());
    }
    for (cid, cb) in ids.iter().zip(&bundles) {
        assert_eq!(rt.status(cid), "running");
        wait_count_above(&cb.rootfs(), base + 3);
        // The copy holds the original's lines up to `base` (it kept counting after the
        // checkpoint); the restored process then goes on from the checkpointed value, which
        // lies between 4 (we waited for 3) and base + 1, never from 1.
        let c = counts(&cb.rootfs());
        let restart = c
            .windows(2)
            .position(|w| w[1] != w[0] + 1)
            .map(|i| i + 1)
            .unwrap_or(usize::try_from(base).expect("count"));
        let resumed_at = c[restart];
        assert!(
            resumed_at > 3 && resumed_at <= base + 1,
            "{cid} resumed at {resumed_at} (copy ended at {base}): {c:?}"
        );
        for w in c[restart..].windows(2) {
            assert_eq!(w[1], w[0] + 1, "{cid} skipped or restarted: {c:?}");
        }
    }
    // The original kept running and the three are distinct process trees.
    let pids: Vec<i64> = [id.clone(), ids[0].clone(), ids[1].clone()]
        .iter()
        .map(|i| rt.state(i)["pid"].as_i64().expect("pid"))
        .collect();
    assert_ne!(pids[0], pids[1]);
    assert_ne!(pids[1], pids[2]);
    for cid in ids.iter().chain([&id]) {
        kill_and_delete(&rt, cid);
    }
}

#[test]
fn foreground_restore_waits_and_reports_exit_code() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("fg");
    // Exits with a code only after it has been restored (the flag file appears later).
    let b = Bundle::new(
        &id,
        &[
            "sh",
            "-c",
            "while [ ! -e /go ]; do sleep 0.05; done; exit 9",
        ],
    );
    rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    let img = images.path().to_string_lossy().into_owned();
    rt.ok(&["checkpoint", "--image-path", &img, &id]);
    std::fs::write(b.rootfs().join("go"), b"").expect("flag");
    let out = rt.run(&[
        "restore",
        "--image-path",
        &img,
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_container_gone(&rt, &id);
    assert!(processes_with(&id).is_empty());
}

/// A named network namespace (`ip netns`), deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(name: &str) -> Self {
        let st = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip netns add");
        assert!(st.success());
        Self(name.to_string())
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ns_inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("ns").ino()
}

#[test]
fn restore_honours_bind_mounts_joined_netns_and_cgroup_limits() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("ext");
    let netns = NetNs::new(&format!("trenv-it-{}", unique_id("netns")));
    let data1 = tempfile::Builder::new()
        .prefix("trenv-it-data-")
        .tempdir()
        .expect("tmp");
    let data2 = tempfile::Builder::new()
        .prefix("trenv-it-data-")
        .tempdir()
        .expect("tmp");
    let b = Bundle::new(
        &id,
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i >> /data/count; sleep 0.05; done",
        ],
    );
    let set_source = |dir: &Path| {
        let src = dir.to_string_lossy().into_owned();
        let ns = netns.path();
        b.edit(|v| {
            let mounts = v["mounts"].as_array_mut().expect("mounts");
            mounts.retain(|m| m["destination"] != "/data");
            mounts.push(serde_json::json!({
                "destination": "/data", "type": "bind", "source": src, "options": ["rbind", "rw"]
            }));
            for n in v["linux"]["namespaces"].as_array_mut().expect("ns") {
                if n["type"] == "network" {
                    n["path"] = serde_json::json!(ns);
                }
            }
            v["linux"]["resources"]["memory"] = serde_json::json!({ "limit": 67108864 });
        });
    };
    set_source(data1.path());
    rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    wait_count_above(data1.path(), 3);
    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    let img = images.path().to_string_lossy().into_owned();
    rt.ok(&["checkpoint", "--image-path", &img, &id]);
    let at_checkpoint = *counts(data1.path()).last().expect("counted");

    // Restore with the bind mount pointing somewhere else: CRIU takes the source given now.
    set_source(data2.path());
    rt.detached(&[
        "restore",
        "--detach",
        "--image-path",
        &img,
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    let pid = rt.state(&id)["pid"].as_i64().expect("pid");
    wait_count_above(data2.path(), at_checkpoint + 2);
    let first = counts(data2.path())[0];
    assert!(
        first > 3 && first <= at_checkpoint + 1,
        "resumed at {first}, checkpoint at {at_checkpoint}"
    );
    assert_continuous(data2.path());
    assert_eq!(counts(data1.path()).last().copied(), Some(at_checkpoint));

    // Joined network namespace is the same one, not a copy.
    assert_eq!(
        ns_inode(&format!("/proc/{pid}/ns/net")),
        ns_inode(&netns.path())
    );
    // Restored into its own cgroup, with the spec's memory limit.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(cg.contains(&format!("/trenv-it/{id}")), "{cg}");
    let ev: serde_json::Value =
        serde_json::from_str(&rt.ok(&["events", "--stats", &id])).expect("json");
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 67108864, "{ev}");
    kill_and_delete(&rt, &id);
}

#[test]
fn lazy_pages_restore_with_a_lazy_pages_daemon() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("lazy");
    let b = start_counter(&rt, &id);
    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    let img = images.path().join("img");
    let work = images.path().join("work");
    std::fs::create_dir_all(&work).expect("work");
    rt.ok(&["checkpoint", "--image-path", &img.to_string_lossy(), &id]);
    let at_checkpoint = *counts(&b.rootfs()).last().expect("counted");
    // The daemon serves pages from the images through userfaultfd; it exits when done.
    let mut daemon = std::process::Command::new("criu")
        .args(["lazy-pages", "-D"])
        .arg(&img)
        .arg("--work-dir")
        .arg(&work)
        .args(["-o", "lazy.log"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("criu lazy-pages");
    let sock = work.join("lazy-pages.socket");
    assert!(wait_for(Duration::from_secs(5), || sock.exists().then_some(())).is_some());
    rt.detached(&[
        "restore",
        "--detach",
        "--lazy-pages",
        "--image-path",
        &img.to_string_lossy(),
        "--work-path",
        &work.to_string_lossy(),
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    wait_count_above(&b.rootfs(), at_checkpoint + 3);
    assert_continuous(&b.rootfs());
    let log = std::fs::read_to_string(work.join("restore.log")).expect("log");
    assert!(log.contains("Lazy restore skips"), "restore was not lazy");
    kill_and_delete(&rt, &id);
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// Receives the pty master a runtime sends to a console socket, on a background thread.
fn console_receiver(path: &Path) -> std::thread::JoinHandle<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind console socket");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("recvmsg");
        for c in msg.cmsgs().expect("cmsgs") {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the descriptor was just received and is owned by nobody else.
                return unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
            }
        }
        panic!("no descriptor received on the console socket");
    })
}

/// Reads from a pty master until `needle` shows up (or 10 s pass).
fn read_until(master: &std::os::fd::OwnedFd, needle: &str) -> String {
    use std::io::Read;
    let mut f = std::fs::File::from(master.try_clone().expect("dup"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(needle) && std::time::Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    seen
}

#[test]
fn terminal_container_restores_onto_a_new_console() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("tty");
    let b = Bundle::new(
        &id,
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.05; done",
        ],
    );
    b.edit(|v| v["process"]["terminal"] = serde_json::json!(true));
    let sockdir = tempfile::Builder::new()
        .prefix("trenv-it-con-")
        .tempdir()
        .expect("tmp");
    let sock1 = sockdir.path().join("c1.sock");
    let rx1 = console_receiver(&sock1);
    rt.detached(&[
        "run",
        "--detach",
        "--console-socket",
        &sock1.to_string_lossy(),
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    let master1 = rx1.join().expect("console 1");
    assert!(read_until(&master1, "tick-5").contains("tick-5"));

    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    let img = images.path().to_string_lossy().into_owned();
    rt.ok(&["checkpoint", "--image-path", &img, &id]);
    drop(master1);

    let sock2 = sockdir.path().join("c2.sock");
    let rx2 = console_receiver(&sock2);
    rt.detached(&[
        "restore",
        "--detach",
        "--console-socket",
        &sock2.to_string_lossy(),
        "--image-path",
        &img,
        "--bundle",
        &b.path().to_string_lossy(),
        &id,
    ]);
    let master2 = rx2.join().expect("console 2");
    // The restored shell keeps counting, on the new terminal.
    let out = read_until(&master2, "tick-");
    let n: Vec<u64> = out
        .split("tick-")
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        n.first().is_some_and(|v| *v > 5),
        "restored output: {out:?}"
    );
    kill_and_delete(&rt, &id);
}

/// A process listening on TCP (busybox httpd) is checkpointed and restored; the restored
/// server answers. CRIU 4.1.1 cannot dump inet sockets on kernels from 6.16 on.
#[test]
fn a_tcp_server_is_checkpointed_and_restored() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("ckpt-tcp");
    let b = Bundle::new(
        &id,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo served-$$ > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    let bundle = b.path().to_string_lossy().into_owned();
    rt.detached(&["run", "--detach", "--bundle", &bundle, &id]);
    let pid = rt.state(&id)["pid"].as_i64().expect("pid").to_string();
    // The container's own network namespace has only a loopback, down until set up.
    assert!(loopback_up(&pid));
    let before =
        wait_for(Duration::from_secs(10), || http_get(&pid, "/")).expect("httpd never answered");
    assert!(before.starts_with("served-"), "{before}");

    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    let img = images.path().to_string_lossy().into_owned();
    rt.ok(&["checkpoint", "--image-path", &img, "--leave-running", &id]);
    assert_eq!(http_get(&pid, "/").as_deref(), Some(before.as_str()));
    kill_and_delete(&rt, &id);

    let pid_file = images.path().join("restored.pid");
    rt.detached(&[
        "restore",
        "--detach",
        "--image-path",
        &img,
        "--bundle",
        &bundle,
        "--pid-file",
        &pid_file.to_string_lossy(),
        &id,
    ]);
    let pid = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .to_string();
    assert!(loopback_up(&pid));
    // The same server (its page names its pid in the first run) answers from the restored
    // listening socket, in the restored container's new network namespace.
    let after = wait_for(Duration::from_secs(10), || http_get(&pid, "/"))
        .expect("restored httpd never answered");
    assert_eq!(after, before);
    kill_and_delete(&rt, &id);
}
