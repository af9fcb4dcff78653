//! Standard streams through containerd-shim-trenv-v2: an interactive terminal and log URIs.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use trenv_integration::containerd::{Containerd, BUSYBOX};
use trenv_integration::{require_root, unique_id, wait_for};

use trenv_integration::containerd::TRENV_RUNTIME as RUNTIME;

/// Reads from a pty master until `needle` shows up or the time is over.
fn read_until(master: &mut std::fs::File, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !seen.contains(needle) {
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(master),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    seen
}

/// `ctr run -t` on a real pseudo-terminal: the container gets a tty, input typed on the
/// terminal reaches its shell, its output comes back, and the exit code is the shell's.
#[test]
fn interactive_terminal() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("shim-tty");
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    let mut cmd = c.ctr_cmd();
    cmd.args([
        "run",
        "-t",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        &id,
        "sh",
    ])
    .stdin(Stdio::from(slave.try_clone().expect("dup")))
    .stdout(Stdio::from(slave.try_clone().expect("dup")))
    .stderr(Stdio::from(slave.try_clone().expect("dup")));
    let slave_fd = slave.as_raw_fd();
    // SAFETY: setsid and ioctl are async-signal-safe; the slave stays open until spawn.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::ioctl(slave_fd, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("ctr run -t");
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    // The prompt shows the shell is reading the terminal.
    let prompt = read_until(&mut master, "# ", Duration::from_secs(10));
    assert!(prompt.contains("# "), "no prompt: {prompt:?}");
    master
        .write_all(b"tty; echo sum-$((40+2)); exit 7\n")
        .expect("type");
    let out = read_until(&mut master, "sum-42", Duration::from_secs(10));
    assert!(out.contains("sum-42"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "not a terminal: {out:?}");
    let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten())
        .expect("ctr run -t did not end");
    assert_eq!(status.code(), Some(7));
    c.assert_gone(&id);
}

/// `--log-uri file://` appends stdout and stderr to a file; `binary://` hands them to a
/// logging binary on fds 3 and 4 with CONTAINER_ID set.
#[test]
fn file_and_binary_log_uris() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let log = c.dir().join("logs/file.log");
    let id = unique_id("shim-filelog");
    c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &format!("file://{}", log.display()),
        BUSYBOX,
        &id,
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2",
    ]);
    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(
        text.contains("to-stdout") && text.contains("to-stderr"),
        "{text}"
    );
    c.assert_gone(&id);

    let dir = c.dir().join("binlog");
    std::fs::create_dir_all(&dir).expect("dir");
    let logger = dir.join("logger.sh");
    std::fs::write(
        &logger,
        format!(
            "#!/bin/sh\n\
             echo \"$CONTAINER_NAMESPACE/$CONTAINER_ID $*\" > {d}/meta\n\
             cat <&3 > {d}/out 5>&- &\n\
             cat <&4 > {d}/err 5>&- &\n\
             exec 5>&-\n\
             wait\n",
            d = dir.display()
        ),
    )
    .expect("logger");
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let id = unique_id("shim-binlog");
    c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &format!("binary://{}?mode=test", logger.display()),
        BUSYBOX,
        &id,
        "sh",
        "-c",
        "echo bin-out; echo bin-err >&2",
    ]);
    let read = |name: &str, want: &str| {
        wait_for(Duration::from_secs(5), || {
            let t = std::fs::read_to_string(dir.join(name)).ok()?;
            t.contains(want).then_some(t)
        })
        .unwrap_or_else(|| panic!("{name} never contained {want:?}"))
    };
    read("out", "bin-out");
    read("err", "bin-err");
    read("meta", &format!("/{id} mode test"));
    c.assert_gone(&id);
}

/// Whether `path` shows up in the container within `timeout`.
fn file_appears(c: &Containerd, id: &str, path: &str, timeout: Duration) -> bool {
    wait_for(timeout, || {
        c.ctr(&["task", "exec", "--exec-id", "check", id, "test", "-e", path])
            .status
            .success()
            .then_some(())
    })
    .is_some()
}

/// A detached container (`ctr run -d`: ctr's FIFO readers go when it exits) keeps running
/// while it writes: its output is dropped, it neither dies of EPIPE nor blocks on a full
/// pipe.
#[test]
fn output_without_a_reader_is_dropped_not_fatal() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let id = unique_id("io-detached");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        &id,
        "sh",
        "-c",
        // 400 KB to each stream, more than a pipe and a FIFO hold, by writers that fail on
        // a write error (head exits non-zero on EPIPE).
        "sleep 1; yes stdout-line | head -c 400000 && yes stderr-line | head -c 400000 >&2 \
         && touch /done; sleep 100",
    ]);
    assert!(
        file_appears(&c, &id, "/done", Duration::from_secs(20)),
        "the writer did not finish"
    );
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));
    c.kill_and_remove(&id);
    c.assert_gone(&id);
}

/// A container started without streams (`ctr run --null-io`) can still write to its stdout
/// and stderr, through trenv's shim and through runc's shim driving the trenv binary: writes
/// are discarded, not refused (a process whose output is a read-only /dev/null fails on
/// its first write, and Python exits 120).
#[test]
fn a_container_without_streams_writes_into_nothing() {
    require_root();
    let c = Containerd::start();
    c.import_busybox();
    let trenv = trenv_integration::runtime::trenv_bin();
    let runc_shim = ["--runc-binary", trenv.to_str().expect("utf-8 path")];
    for (name, runtime) in [
        ("trenv-shim", &["--runtime", RUNTIME][..]),
        ("runc-shim", &runc_shim[..]),
    ] {
        let id = unique_id(&format!("io-null-{name}"));
        let mut args = vec!["run", "-d", "--null-io"];
        args.extend_from_slice(runtime);
        args.extend_from_slice(&[
            BUSYBOX,
            &id,
            "sh",
            "-c",
            "echo out && echo err >&2 && touch /done; sleep 100",
        ]);
        c.ctr_ok(&args);
        c.wait_task(&id, "RUNNING");
        let done = file_appears(&c, &id, "/done", Duration::from_secs(10));
        let fds = c.exec_ok(&id, "fds", &["ls", "-l", "/proc/1/fd/"]);
        assert!(done, "{name}: a write failed; the init's fds: {fds}");
        c.kill_and_remove(&id);
        c.assert_gone(&id);
    }
}
