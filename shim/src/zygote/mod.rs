//! The zygote: a single-threaded helper process that runs libcontainer operations for the shim.
//!
//! libcontainer changes process-global state (signal dispositions, the working directory,
//! environment, rlimits during clone) and calls fork/clone, which is unsafe in a process that
//! already runs ttrpc threads. So the shim starts the zygote — its own executable, re-run
//! with [`ZYGOTE_ARG`], hence single threaded whenever it is (re)started — and for every
//! request the zygote forks a short-lived worker that performs one operation and answers on
//! the request's own reply channel. Requests run side by side: a long checkpoint does not
//! hold up the starts of other tasks. Container inits created by a worker are re-parented
//! to the shim (a child subreaper) when the worker exits, so the shim reaps them.
//!
//! Faults end in errors, never in a wait without end: a worker that dies is reported with its
//! exit status, every request has a deadline after which its worker's process group is
//! killed, and a zygote that is gone is started again by the next request.

mod protocol;
mod server;
mod worker;

use std::io::{BufRead, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio as ProcStdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::SockType;
use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag};
use nix::unistd::Pid;

#[cfg(test)]
pub use protocol::Failure;
pub use protocol::{Answer, CheckpointRequest, FailureKind, MemPool, Request, SandboxUts, Stdio};
pub use server::run as serve;
pub use worker::set_nice;

/// First argument that makes the shim executable run as a zygote (socket on fd 3).
pub const ZYGOTE_ARG: &str = "trenv-zygote";
/// The descriptor the zygote's request socket is given on.
const SOCKET_FD: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("starting the {name} zygote: {source}")]
    Spawn {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("{op}: talking to the zygote: {source}")]
    Channel {
        op: &'static str,
        source: nix::Error,
    },
    #[error("{op}: {source}")]
    Frame {
        op: &'static str,
        source: protocol::FrameError,
    },
    #[error("{op}: the zygote worker ended without answering ({status})")]
    WorkerDied { op: &'static str, status: String },
    #[error("{op}: no answer within {}s; its worker was killed", .after.as_secs())]
    Deadline { op: &'static str, after: Duration },
    #[error("{op}: {source}")]
    Failed {
        op: &'static str,
        source: protocol::Failure,
    },
}

impl ZygoteError {
    /// What kind of failure this is, for the caller's error code.
    pub fn kind(&self) -> Kind {
        match self {
            ZygoteError::Failed { source, .. } => Kind::Op(source.kind),
            ZygoteError::Deadline { .. } => Kind::Deadline,
            ZygoteError::Spawn { .. }
            | ZygoteError::Channel { .. }
            | ZygoteError::WorkerDied { .. } => Kind::Unavailable,
            ZygoteError::Frame { .. } => Kind::Op(FailureKind::Internal),
        }
    }

    /// The short reason of a failed template operation: the worker's, or how it ended.
    pub fn reason(&self) -> &str {
        match self {
            ZygoteError::Failed { source, .. } => source.reason.as_deref().unwrap_or("error"),
            ZygoteError::Deadline { .. } => "timeout",
            ZygoteError::WorkerDied { .. } => "worker-died",
            _ => "unavailable",
        }
    }
}

/// Broad classes of [`ZygoteError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The operation ran and failed.
    Op(FailureKind),
    /// The operation did not finish in time.
    Deadline,
    /// The operation could not be run or its worker died.
    Unavailable,
}

/// A running zygote: its request socket and pid.
struct Conn {
    sock: OwnedFd,
    pid: Pid,
}

/// The shim's handle on one zygote. Shared by every thread of the shim; requests do not
/// wait for each other.
pub struct Zygote {
    name: &'static str,
    conn: Mutex<Option<Conn>>,
}

impl Zygote {
    /// A handle on the zygote `name` (used in logs and errors); its process starts with
    /// [`Zygote::ensure_running`] or the first request.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            conn: Mutex::new(None),
        }
    }

    /// Starts the zygote process unless it runs.
    pub fn ensure_running(&self) -> Result<(), ZygoteError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if conn.is_none() {
            *conn = Some(start(self.name)?);
        }
        Ok(())
    }

    /// Runs one request with the given descriptors, waiting at most `deadline`.
    pub fn call(
        &self,
        req: &Request,
        fds: &[RawFd],
        deadline: Duration,
    ) -> Result<Answer, ZygoteError> {
        let op = req.name();
        let frame_err = |source| ZygoteError::Frame { op, source };
        let msg = protocol::encode(req).map_err(frame_err)?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|source| ZygoteError::Channel { op, source })?;
        let mut all = vec![theirs.as_raw_fd()];
        all.extend_from_slice(fds);
        self.send(op, &msg, &all)?;
        drop(theirs);
        wait_reply(op, &ours, deadline)
    }

    /// Sends on the running zygote, starting a new one if it is gone.
    fn send(&self, op: &'static str, msg: &[u8], fds: &[RawFd]) -> Result<(), ZygoteError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for attempt in 0..2 {
            if conn.is_none() {
                log::info!("starting the {} zygote", self.name);
                *conn = Some(start(self.name)?);
            }
            let Some(c) = conn.as_ref() else { continue };
            let cmsgs = [ControlMessage::ScmRights(fds)];
            match sendmsg::<()>(
                c.sock.as_raw_fd(),
                &[IoSlice::new(msg)],
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(e @ (nix::Error::EPIPE | nix::Error::ECONNREFUSED | nix::Error::ENOTCONN))
                    if attempt == 0 =>
                {
                    log::warn!("the {} zygote (pid {}) is gone: {e}", self.name, c.pid);
                    // The shim's reaper collects it.
                    let _ = kill(c.pid, Signal::SIGKILL);
                    *conn = None;
                }
                Err(source) => return Err(ZygoteError::Channel { op, source }),
            }
        }
        Err(ZygoteError::Channel {
            op,
            source: nix::Error::EPIPE,
        })
    }

    /// Ends the zygote (it exits when its socket closes) and reaps it; kills it if it does
    /// not exit within a second.
    pub fn shutdown(&self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let Some(c) = self.conn.lock().ok().and_then(|mut c| c.take()) else {
            return;
        };
        let pid = c.pid;
        drop(c.sock);
        for _ in 0..100 {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
                // Exited, or already collected by the shim's reaper.
                _ => return,
            }
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}

/// Starts a zygote process: this executable with [`ZYGOTE_ARG`], its request socket on
/// [`SOCKET_FD`], its stderr a pipe whose lines go to the shim's log.
fn start(name: &'static str) -> Result<Conn, ZygoteError> {
    let spawn_err = |source| ZygoteError::Spawn { name, source };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| spawn_err(e.into()))?;
    let exe = std::env::current_exe().map_err(spawn_err)?;
    let mut cmd = Command::new(exe);
    cmd.arg(ZYGOTE_ARG)
        .arg(name)
        .stdin(ProcStdio::null())
        .stdout(ProcStdio::null())
        .stderr(ProcStdio::piped())
        .current_dir("/");
    if log::log_enabled!(log::Level::Debug) {
        cmd.env(server::DEBUG_ENV, "1");
    }
    let theirs_fd = theirs.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls dup2, which is
    // async-signal-safe; dup2 clears close-on-exec on the new descriptor.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::dup2(theirs_fd, SOCKET_FD)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    drop(theirs);
    let pid =
        Pid::from_raw(i32::try_from(child.id()).map_err(|e| spawn_err(std::io::Error::other(e)))?);
    if let Some(stderr) = child.stderr.take() {
        forward_log(name, stderr);
    }
    // Not waited here: the shim's reaper collects every child.
    drop(child);
    log::info!("{name} zygote started (pid {pid})");
    Ok(Conn { sock: ours, pid })
}

/// Copies the zygote's and its workers' log lines (`<level> <message>`) into the shim log.
fn forward_log(name: &'static str, stderr: std::process::ChildStderr) {
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-zygote-log"))
        .spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (level, msg) = server::parse_log_line(&line);
                log::log!(level, "{name} zygote: {msg}");
            }
        });
    if let Err(e) = spawned {
        log::warn!("no log from the {name} zygote: {e}");
    }
}

/// Reads the request's reply channel until the outcome is known or the deadline passes.
fn wait_reply(op: &'static str, chan: &OwnedFd, deadline: Duration) -> Result<Answer, ZygoteError> {
    let end = Instant::now() + deadline;
    let mut worker: Option<i32> = None;
    let mut buf = vec![0u8; protocol::MAX_MSG];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let mut pfd = [PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let ready = match poll(&mut pfd, PollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(source) => return Err(ZygoteError::Channel { op, source }),
        };
        if ready == 0 {
            if Instant::now() < end {
                continue;
            }
            if let Some(pid) = worker {
                // The worker leads its own process group: CRIU, CNI plugins and a
                // half-created container go with it.
                log::warn!(
                    "{op}: deadline of {}s passed, killing worker {pid}",
                    deadline.as_secs()
                );
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
            return Err(ZygoteError::Deadline {
                op,
                after: deadline,
            });
        }
        let n = match nix::sys::socket::recv(chan.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(source) => return Err(ZygoteError::Channel { op, source }),
        };
        if n == 0 {
            // Every holder of the other end is gone: the worker died with the zygote.
            return Err(ZygoteError::WorkerDied {
                op,
                status: "the zygote is gone too".into(),
            });
        }
        let reply: protocol::Reply =
            protocol::decode(&buf[..n]).map_err(|source| ZygoteError::Frame { op, source })?;
        match reply {
            protocol::Reply::Started { pid } => worker = Some(pid),
            protocol::Reply::Done(Ok(answer)) => return Ok(answer),
            protocol::Reply::Done(Err(source)) => return Err(ZygoteError::Failed { op, source }),
            protocol::Reply::Exited { status } => {
                return Err(ZygoteError::WorkerDied { op, status })
            }
        }
    }
}
