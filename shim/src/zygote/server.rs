//! The zygote process: reads requests, forks one worker each, reports how workers end.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{send, MsgFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::protocol::{self, Failure, FailureKind, Reply, Request};
use super::SOCKET_FD;

/// Set by the shim when its own log level is debug.
pub const DEBUG_ENV: &str = "TRENV_ZYGOTE_DEBUG";

/// A worker being waited for: its pid, a pidfd that becomes readable when it ends, and the
/// zygote's copy of its reply channel.
struct Running {
    pid: Pid,
    pidfd: OwnedFd,
    reply: OwnedFd,
}

/// Log records of the zygote and its workers go to stderr, a pipe to the shim, one line
/// each: the level's first letter, a space, the message.
struct LineLogger;

impl log::Log for LineLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let letter = &r.level().as_str()[..1];
        let msg = r.args().to_string().replace('\n', " ");
        let line = format!("{letter} [{}] {msg}\n", std::process::id());
        let fd = LOG_FD.load(Ordering::Relaxed);
        // SAFETY: LOG_FD is a descriptor this process opened for its log and never closes
        // (close-on-exec takes it away from container processes when they exec); a
        // ManuallyDrop File borrows it without closing it.
        let mut log = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let _ = log.write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: LineLogger = LineLogger;

/// Where [`LineLogger`] writes: a close-on-exec copy of the zygote's stderr (the shim reads
/// it), not descriptor 2. A container's init or exec process is forked from a worker and
/// logs from libcontainer after its descriptor 2 became the container's stderr, until it
/// execs; written to descriptor 2, such lines ("close_range; preserve_fds=0") went into the
/// container's output.
static LOG_FD: AtomicI32 = AtomicI32::new(2);

/// Splits a line written by [`LineLogger`] into its level and message.
pub fn parse_log_line(line: &str) -> (log::Level, &str) {
    let level = match line.as_bytes().first() {
        Some(b'E') => log::Level::Error,
        Some(b'W') => log::Level::Warn,
        Some(b'I') => log::Level::Info,
        Some(b'D') => log::Level::Debug,
        Some(b'T') => log::Level::Trace,
        _ => return (log::Level::Info, line),
    };
    match line.split_once(' ') {
        Some((tag, msg)) if tag.len() == 1 => (level, msg),
        _ => (log::Level::Info, line),
    }
}

/// Closes every inherited descriptor but stdio and the request socket.
fn close_inherited() {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd > 2 && fd != SOCKET_FD {
            // SAFETY: closing descriptors this freshly executed, single-threaded process
            // inherited; nothing in it uses them.
            unsafe { libc::close(fd) };
        }
    }
}

/// The zygote's main: serves requests until the shim closes the socket.
pub fn run() -> ! {
    close_inherited();
    // SAFETY: descriptor SOCKET_FD was set up by the shim for this process alone and is
    // owned by nothing else here.
    let sock = unsafe { OwnedFd::from_raw_fd(SOCKET_FD) };
    let _ = nix::fcntl::fcntl(
        sock.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    if let Ok(fd) = nix::fcntl::fcntl(2, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)) {
        LOG_FD.store(fd, Ordering::Relaxed);
    }
    let debug = std::env::var_os(DEBUG_ENV).is_some();
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(if debug {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Info
        });
    }
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPIPE,
    ] {
        // SAFETY: restoring default dispositions has no memory-safety preconditions.
        let _ = unsafe { signal(s, SigHandler::SigDfl) };
    }
    let mut running: Vec<Running> = Vec::new();
    loop {
        let (sock_ready, ended) = match wait_events(&sock, &running) {
            Ok(x) => x,
            Err(e) => {
                log::error!("zygote poll: {e}");
                std::process::exit(1);
            }
        };
        for i in ended.into_iter().rev() {
            let w = running.swap_remove(i);
            drop(w.pidfd);
            report_exit(w.pid, &w.reply);
        }
        if !sock_ready {
            continue;
        }
        let mut buf = vec![0u8; protocol::MAX_MSG];
        let (n, mut fds) = match trenv_oci::fdpass::recv_with_fds(sock.as_raw_fd(), &mut buf) {
            Ok(m) => m,
            Err(nix::Error::EINTR) => continue,
            Err(_) => std::process::exit(0),
        };
        if n == 0 {
            // The shim closed the socket: running workers finish on their own.
            std::process::exit(0);
        }
        if fds.is_empty() {
            log::error!("request without a reply channel dropped");
            continue;
        }
        let reply = fds.remove(0);
        let req: Request = match protocol::decode(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                answer(
                    &reply,
                    &Reply::Done(Err(Failure {
                        kind: FailureKind::InvalidArgument,
                        message: format!("bad request: {e}"),
                        reason: None,
                    })),
                );
                continue;
            }
        };
        // SAFETY: the zygote is single threaded (the forwarding of its log is the shim's).
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(sock);
                // Other requests' channels must see EOF when their own worker ends, not
                // when this one does.
                drop(running);
                let own = nix::unistd::getpid().as_raw();
                let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
                answer(&reply, &Reply::Started { pid: own });
                let outcome = super::worker::respond(req, fds);
                answer(&reply, &Reply::Done(outcome));
                std::process::exit(0);
            }
            Ok(ForkResult::Parent { child }) => {
                drop(fds);
                match pidfd_open(child) {
                    Ok(pidfd) => running.push(Running {
                        pid: child,
                        pidfd,
                        reply,
                    }),
                    Err(e) => {
                        // Without a pidfd this worker is waited for here, before the next
                        // request: slower, still correct.
                        log::warn!("pidfd_open({child}): {e}");
                        report_exit(child, &reply);
                    }
                }
            }
            Err(e) => answer(
                &reply,
                &Reply::Done(Err(Failure {
                    kind: FailureKind::Internal,
                    message: format!("zygote fork: {e}"),
                    reason: None,
                })),
            ),
        }
    }
}

/// Waits until a request arrives or workers end; returns both, the latter as indices.
fn wait_events(sock: &OwnedFd, running: &[Running]) -> nix::Result<(bool, Vec<usize>)> {
    loop {
        let mut pfds = Vec::with_capacity(running.len() + 1);
        pfds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
        pfds.extend(
            running
                .iter()
                .map(|w| PollFd::new(w.pidfd.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut pfds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let ready = |p: &PollFd| p.revents().is_some_and(|r| !r.is_empty());
        let sock_ready = ready(&pfds[0]);
        let ended = pfds[1..]
            .iter()
            .enumerate()
            .filter(|(_, p)| ready(p))
            .map(|(i, _)| i)
            .collect();
        return Ok((sock_ready, ended));
    }
}

/// Reaps a worker and reports how it ended on its reply channel. The shim reads this only
/// when the worker did not answer itself.
fn report_exit(pid: Pid, reply: &OwnedFd) {
    let status = match waitpid(pid, None) {
        Ok(s @ WaitStatus::Signaled(..)) => {
            // Killed mid-operation: what it started (CRIU, CNI plugins, a half-created
            // container) is in its process group and must not outlive it.
            let _ = nix::sys::signal::kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
            describe(s)
        }
        Ok(s) => describe(s),
        Err(e) => format!("not waitable: {e}"),
    };
    if status != "exited with status 0" {
        log::debug!("worker {pid} {status}");
    }
    answer(reply, &Reply::Exited { status });
}

fn describe(s: WaitStatus) -> String {
    match s {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
        other => format!("{other:?}"),
    }
}

/// Sends one reply; a reader that has gone away (EPIPE) is not an error.
fn answer(chan: &OwnedFd, reply: &Reply) {
    match protocol::encode(reply) {
        Ok(bytes) => {
            let _ = send(chan.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL);
        }
        Err(e) => {
            let fallback = Reply::Done(Err(Failure {
                kind: FailureKind::Internal,
                message: format!("answer could not be sent: {e}"),
                reason: None,
            }));
            if let Ok(bytes) = protocol::encode(&fallback) {
                let _ = send(chan.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL);
            }
        }
    }
}

fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_keep_their_level() {
        assert_eq!(
            parse_log_line("W [12] purge slow"),
            (log::Level::Warn, "[12] purge slow")
        );
        assert_eq!(parse_log_line("E boom"), (log::Level::Error, "boom"));
        assert_eq!(
            parse_log_line("panicked at x"),
            (log::Level::Info, "panicked at x")
        );
        assert_eq!(parse_log_line(""), (log::Level::Info, ""));
    }

    #[test]
    fn exit_statuses_are_described() {
        let pid = Pid::from_raw(1);
        assert_eq!(describe(WaitStatus::Exited(pid, 3)), "exited with status 3");
        assert_eq!(
            describe(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            "killed by SIGKILL"
        );
    }
}
