//! The holder: a process that does nothing but keep a sandbox's namespaces alive.
//!
//! It is the shim's own executable re-run with [`HOLDER_ARG`]; the namespaces are unshared
//! between fork and exec, so they exist as soon as the spawn returns. Processes are
//! identified by pid and start time, so a recycled pid is never mistaken for the holder.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// First argument that turns the executable into a holder.
pub const HOLDER_ARG: &str = "trenv-sandbox-holder";

/// Namespaces a sandbox owns. Each instance gets its own PID and mount namespaces inside them.
pub const SANDBOX_NAMESPACES: [&str; 3] = ["net", "ipc", "uts"];

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("spawning sandbox holder {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("reading /proc/{pid}: {source}")]
    Proc { pid: i32, source: std::io::Error },
}

/// A live holder process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: i32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    /// Inode of its network namespace.
    pub netns: u64,
}

fn start_time(pid: i32) -> std::io::Result<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses; fields follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("malformed stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().and_then(|s| s.chars().next()).unwrap_or('?');
    let start = fields
        .get(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed stat"))?;
    Ok((start, state))
}

/// Inode of a process's namespace of the given kind.
pub fn ns_inode(pid: i32, kind: &str) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))?.ino())
}

impl Holder {
    /// Spawns a holder from `exe` in new net, IPC, UTS and mount namespaces.
    pub fn spawn(exe: &Path) -> Result<Self, HolderError> {
        let spawn_err = |source| HolderError::Spawn {
            exe: exe.display().to_string(),
            source,
        };
        let mut cmd = Command::new(exe);
        cmd.arg(HOLDER_ARG)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/");
        // SAFETY: the closure runs between fork and exec and only makes system calls
        // (setsid, unshare), which are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                nix::sched::unshare(
                    CloneFlags::CLONE_NEWNET
                        | CloneFlags::CLONE_NEWIPC
                        | CloneFlags::CLONE_NEWUTS
                        | CloneFlags::CLONE_NEWNS,
                )?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        // Kernel pids are below 2^22, so this never fails.
        let pid = i32::try_from(child.id()).map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let proc_err = |source| HolderError::Proc { pid, source };
        let (start_time, _) = start_time(pid).map_err(proc_err)?;
        let netns = ns_inode(pid, "net").map_err(proc_err)?;
        Ok(Self {
            pid,
            start_time,
            netns,
        })
    }

    /// Whether the holder still runs (not a zombie, not a recycled pid, same netns).
    pub fn alive(&self) -> bool {
        matches!(start_time(self.pid), Ok((t, s)) if t == self.start_time && s != 'Z')
            && ns_inode(self.pid, "net").ok() == Some(self.netns)
    }

    /// Path of one of its namespaces.
    pub fn ns_path(&self, kind: &str) -> String {
        format!("/proc/{}/ns/{kind}", self.pid)
    }

    /// Kills the holder and waits (up to a second) until it is gone or a zombie.
    pub fn kill(&self) {
        if !self.alive() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The holder's main: wait for a signal, forever.
pub fn run() -> ! {
    loop {
        nix::unistd::pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable_and_alive() {
        let pid = nix::unistd::getpid().as_raw();
        let (t, state) = start_time(pid).unwrap();
        assert_eq!(start_time(pid).unwrap().0, t);
        assert_ne!(state, 'Z');
        let me = Holder {
            pid,
            start_time: t,
            netns: ns_inode(pid, "net").unwrap(),
        };
        assert!(me.alive());
        assert!(!Holder {
            start_time: t + 1,
            ..me
        }
        .alive());
    }
}
