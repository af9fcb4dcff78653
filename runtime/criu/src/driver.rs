//! A driver for CRIU's RPC protocol over `criu swrk`.
//!
//! `rust-criu` supplies the generated protobuf messages; the conversation is ours because
//! restore needs things its high-level client does not give: notification handlers that carry
//! state (cgroup placement, pid capture), file descriptors received with a notification
//! (`orphan-pts-master`), the restored pid from the final response, and a hook that runs
//! between spawning CRIU and sending the request (to move CRIU into the container's cgroup).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use protobuf::{Message, MessageField};
pub use rust_criu::rust_criu_protobuf::rpc;

/// Largest RPC message CRIU sends (responses are small; this is generous).
const MAX_MSG: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot start criu at {path:?}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("criu RPC I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("criu RPC system call failed: {0}")]
    Sys(#[from] nix::Error),
    #[error("malformed criu RPC message: {0}")]
    Protobuf(#[from] protobuf::Error),
    #[error("criu closed the RPC connection without answering (it may have crashed)")]
    Closed,
    #[error("unexpected criu response {got:?} to a {sent:?} request")]
    Unexpected {
        sent: rpc::Criu_req_type,
        got: rpc::Criu_req_type,
    },
    #[error("criu {op} failed: {message}")]
    Failed { op: &'static str, message: String },
    #[error("handling criu notification {script:?} failed: {reason}")]
    Notify { script: String, reason: String },
}

/// A notification from CRIU (action-script hook) and any file descriptor sent with it.
pub struct Notification<'a> {
    pub script: &'a str,
    pub pid: i32,
    pub fd: Option<OwnedFd>,
}

/// Where to find CRIU. The default is `criu` on `PATH`.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
}

impl Default for Criu {
    fn default() -> Self {
        Self {
            path: PathBuf::from("criu"),
        }
    }
}

impl Criu {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a `criu swrk` worker. `keep_fds` are descriptors of ours that the worker must
    /// inherit (e.g. namespaces or stdio handed over through `inherit_fd`).
    pub fn spawn(&self, keep_fds: &[RawFd]) -> Result<Session, CriuError> {
        self.spawn_in(keep_fds, &[])
    }

    /// [`Criu::spawn`], with the worker in `namespaces` (descriptors of ours, each with its
    /// CLONE_NEW* type): what it restores without a namespace of its own ends up there, and
    /// what it dumps in the same namespaces as itself is not part of the images.
    pub fn spawn_in(
        &self,
        keep_fds: &[RawFd],
        namespaces: &[(RawFd, libc::c_int)],
    ) -> Result<Session, CriuError> {
        let namespaces = namespaces.to_vec();
        if let Err(e) = crate::kdat::prepare(Path::new(crate::kdat::DIR)) {
            tracing::debug!("CRIU's kernel-feature cache at {}: {e}", crate::kdat::DIR);
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let child_fd = theirs.as_raw_fd();
        let keep: Vec<RawFd> = keep_fds.iter().copied().chain([child_fd]).collect();
        let mut cmd = Command::new(&self.path);
        cmd.arg("swrk").arg(child_fd.to_string());
        // SAFETY: the closure only calls fcntl(2) and setns(2), which are async-signal-safe,
        // on descriptors that stay open in the parent for the duration of spawn().
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for (ns, kind) in &namespaces {
                    if libc::setns(*ns, *kind) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| CriuError::Spawn {
            path: self.path.clone(),
            source,
        })?;
        drop(theirs);
        Ok(Session { sock: ours, child })
    }

    /// Asks CRIU for its version as (major, minor, sublevel).
    pub fn version(&self) -> Result<(i32, i32, i32), CriuError> {
        let mut session = self.spawn(&[])?;
        let resp = session.call(rpc::Criu_req_type::VERSION, None, |_| Ok(()))?;
        session.finish();
        let v = resp.version.clone().unwrap_or_default();
        Ok((v.major_number(), v.minor_number(), v.sublevel()))
    }
}

/// One `criu swrk` worker and its RPC socket.
pub struct Session {
    sock: OwnedFd,
    child: Child,
}

impl Session {
    /// The worker's pid, e.g. to place it into a cgroup before a restore.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one request and runs the conversation to its final response, answering every
    /// notification with the result of `on_notify`.
    pub fn call<F>(
        &mut self,
        req_type: rpc::Criu_req_type,
        opts: Option<rpc::Criu_opts>,
        mut on_notify: F,
    ) -> Result<rpc::Criu_resp, CriuError>
    where
        F: FnMut(Notification<'_>) -> Result<(), String>,
    {
        let mut req = rpc::Criu_req::new();
        req.set_type(req_type);
        if let Some(o) = opts {
            req.opts = MessageField::some(o);
        }
        self.send(&req)?;
        loop {
            let (resp, fd) = self.recv()?;
            if resp.type_() == rpc::Criu_req_type::NOTIFY {
                let n = resp.notify.clone().unwrap_or_default();
                let script = n.script().to_string();
                let outcome = on_notify(Notification {
                    script: &script,
                    pid: n.pid(),
                    fd,
                });
                let mut ack = rpc::Criu_req::new();
                ack.set_type(rpc::Criu_req_type::NOTIFY);
                ack.set_notify_success(outcome.is_ok());
                self.send(&ack)?;
                if let Err(reason) = outcome {
                    // CRIU aborts on a failed notification; drain its final answer, then report
                    // our reason, which is more useful than CRIU's generic one.
                    let _ = self.recv();
                    return Err(CriuError::Notify { script, reason });
                }
                continue;
            }
            if resp.type_() != req_type {
                return Err(CriuError::Unexpected {
                    sent: req_type,
                    got: resp.type_(),
                });
            }
            if !resp.success() {
                let op = match req_type {
                    rpc::Criu_req_type::DUMP => "dump",
                    rpc::Criu_req_type::RESTORE => "restore",
                    rpc::Criu_req_type::VERSION => "version",
                    _ => "request",
                };
                let mut message = String::new();
                // CRIU reports its first error; without CAP_SYS_RESOURCE that is a harmless
                // RLIMIT_NOFILE complaint that hides the real cause, so leave it out.
                if !resp.cr_errmsg().is_empty() && !is_noise(resp.cr_errmsg()) {
                    message.push_str(resp.cr_errmsg().trim());
                }
                if resp.cr_errno() != 0 {
                    if !message.is_empty() {
                        message.push_str(": ");
                    }
                    message.push_str(&io::Error::from_raw_os_error(resp.cr_errno()).to_string());
                }
                if message.is_empty() {
                    message.push_str("see the CRIU log");
                }
                return Err(CriuError::Failed { op, message });
            }
            return Ok(resp);
        }
    }

    /// Closes the socket and reaps the worker.
    pub fn finish(mut self) {
        // CRIU exits when it sees the end of the conversation.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.child.wait();
    }

    fn send(&self, req: &rpc::Criu_req) -> Result<(), CriuError> {
        let buf = req.write_to_bytes()?;
        let n = nix::unistd::write(&self.sock, &buf)?;
        if n != buf.len() {
            return Err(CriuError::Io(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write on criu socket",
            )));
        }
        Ok(())
    }

    fn recv(&self) -> Result<(rpc::Criu_resp, Option<OwnedFd>), CriuError> {
        let mut buf = vec![0u8; MAX_MSG];
        let (len, mut fds) = trenv_oci::fdpass::recv_with_fds(self.sock.as_raw_fd(), &mut buf)?;
        if len == 0 {
            return Err(CriuError::Closed);
        }
        let resp = rpc::Criu_resp::parse_from_bytes(&buf[..len])?;
        let fd = if fds.is_empty() {
            None
        } else {
            Some(fds.swap_remove(0))
        };
        Ok((resp, fd))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session dropped on an error path must not leave a worker behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CRIU's name for the external-namespace key of a namespace kind, as runc spells it, so
/// checkpoints are interchangeable with runc's ("extRootNetNS", "extRootPidNS").
pub fn external_ns_key(kind: &str) -> String {
    let mut c = kind.chars();
    match c.next() {
        Some(f) => format!("extRoot{}{}NS", f.to_uppercase(), c.as_str()),
        None => String::from("extRootNS"),
    }
}

/// The `empty_ns` mask for `--empty-ns` words. The network namespace is always included, as
/// runc does: the runtime does not manage network devices (a platform's CNI does), so CRIU
/// restores a container's own network namespace empty instead of replaying links, addresses
/// and firewall rules through `ip`/`iptables-restore` (tens of milliseconds per restore).
/// Joined (external) network namespaces are inherited as they are.
pub fn empty_ns_mask(words: &[String]) -> Result<u32, String> {
    let mut mask = libc::CLONE_NEWNET as u32;
    for w in words {
        match w.as_str() {
            "network" | "net" => mask |= libc::CLONE_NEWNET as u32,
            other => return Err(format!("--empty-ns supports only 'network', not {other:?}")),
        }
    }
    Ok(mask)
}

/// Maps runc's `--manage-cgroups-mode` words onto CRIU's enum.
pub fn cgroup_mode(word: &str) -> Option<rpc::Criu_cg_mode> {
    Some(match word {
        "soft" => rpc::Criu_cg_mode::SOFT,
        "full" => rpc::Criu_cg_mode::FULL,
        "strict" => rpc::Criu_cg_mode::STRICT,
        "ignore" => rpc::Criu_cg_mode::IGNORE,
        _ => return None,
    })
}

/// CRIU error lines that are expected on hosts without CAP_SYS_RESOURCE.
fn is_noise(line: &str) -> bool {
    line.contains("RLIMIT_NOFILE")
}

/// The last error lines of a CRIU log (timestamps stripped, indented), for error messages
/// that say why, not just "failed".
pub fn log_errors(log: &Path, max_lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !is_noise(l))
        .map(|l| match l.split_once(") ") {
            Some((ts, rest)) if ts.starts_with('(') => rest,
            _ => l,
        })
        .collect();
    let start = errors.len().saturating_sub(max_lines);
    errors[start..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_keys_match_runc() {
        assert_eq!(external_ns_key("net"), "extRootNetNS");
        assert_eq!(external_ns_key("pid"), "extRootPidNS");
    }

    #[test]
    fn network_is_always_empty() {
        assert_eq!(empty_ns_mask(&[]), Ok(libc::CLONE_NEWNET as u32));
        assert!(empty_ns_mask(&["network".into()]).is_ok());
        assert!(empty_ns_mask(&["pid".into()]).is_err());
    }

    #[test]
    fn cgroup_modes() {
        assert_eq!(cgroup_mode("soft"), Some(rpc::Criu_cg_mode::SOFT));
        assert_eq!(cgroup_mode("bogus"), None);
    }
}
