//! Purging a sandbox between functions, and checking that the purge worked.
//!
//! Everything an instance can leave behind in the namespaces a sandbox keeps: processes
//! (found by network namespace, so one that left the cgroup is found too), listening
//! sockets, System V IPC objects, POSIX message queues, hostname and domain name. The
//! instance's rootfs, tmpfs mounts and /dev/shm live in its own mount namespace and
//! vanish with it; cgroup limits and counters go with the cgroup, which is re-created.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use super::holder::Holder;

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("entering the sandbox's {kind} namespace: {source}")]
    Enter {
        kind: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("purge left {0}")]
    Residue(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PurgeError {
    let what = what.into();
    move |source| PurgeError::Sys { what, source }
}

/// Ids in a /proc/sysvipc table (second column; the first line is a header).
fn sysv_ids(table: &str) -> Result<Vec<i32>, PurgeError> {
    let path = format!("/proc/sysvipc/{table}");
    let text = std::fs::read_to_string(&path).map_err(sys(format!("reading {path}")))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect())
}

fn remove_sysv() -> Result<(), PurgeError> {
    for id in sysv_ids("shm")? {
        // SAFETY: IPC_RMID takes no buffer; a stale id only yields an error.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    }
    for id in sysv_ids("sem")? {
        // SAFETY: as above; semctl's variadic argument is unused for IPC_RMID.
        unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
    }
    for id in sysv_ids("msg")? {
        // SAFETY: as above.
        unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    }
    let left: usize = ["shm", "sem", "msg"]
        .iter()
        .map(|t| sysv_ids(t).map(|v| v.len()))
        .sum::<Result<usize, _>>()?;
    if left > 0 {
        return Err(PurgeError::Residue(format!("{left} System V IPC objects")));
    }
    Ok(())
}

/// POSIX message queues belong to the IPC namespace; they are reached through an mqueue
/// mount made, in a private mount namespace, over /tmp.
fn remove_mqueues() -> Result<(), PurgeError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| sys("unshare mount namespace")(e.into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| sys("making mounts private")(e.into()))?;
    let dir = Path::new("/tmp");
    mount(
        Some("mqueue"),
        dir,
        Some("mqueue"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| sys("mounting mqueue")(e.into()))?;
    let entries = |d: &Path| -> Result<Vec<PathBuf>, PurgeError> {
        Ok(std::fs::read_dir(d)
            .map_err(sys("listing message queues"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect())
    };
    for q in entries(dir)? {
        let _ = std::fs::remove_file(q);
    }
    let left = entries(dir)?.len();
    if left > 0 {
        return Err(PurgeError::Residue(format!("{left} POSIX message queues")));
    }
    Ok(())
}

fn uts_names() -> Result<(String, String), PurgeError> {
    let host = nix::unistd::gethostname()
        .map_err(|e| sys("gethostname")(e.into()))?
        .to_string_lossy()
        .into_owned();
    let domain = std::fs::read_to_string("/proc/sys/kernel/domainname")
        .map_err(sys("reading domainname"))?
        .trim()
        .to_string();
    Ok((host, domain))
}

/// Purges the IPC and UTS namespaces of a sandbox: removes all System V objects and POSIX
/// queues, and gives it the host's hostname and domain name again (what a new UTS
/// namespace starts with). Enters the namespaces, so it must run in a single-threaded
/// process that is thrown away afterwards.
pub fn namespaces(holder: &Holder) -> Result<(), PurgeError> {
    let (host, domain) = uts_names()?;
    for (kind, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
    ] {
        let f = std::fs::File::open(holder.ns_path(kind))
            .map_err(|source| PurgeError::Enter { kind, source })?;
        setns(f, flag).map_err(|e| PurgeError::Enter {
            kind,
            source: e.into(),
        })?;
    }
    remove_sysv()?;
    remove_mqueues()?;
    nix::unistd::sethostname(&host).map_err(|e| sys("sethostname")(e.into()))?;
    std::fs::write("/proc/sys/kernel/domainname", &domain).map_err(sys("setting domainname"))?;
    if uts_names()? != (host, domain) {
        return Err(PurgeError::Residue("a changed hostname".into()));
    }
    Ok(())
}

/// Pids (other than `except`) whose network namespace has inode `netns`.
pub fn processes_in_netns(netns: u64, except: i32) -> Vec<i32> {
    let target = format!("net:[{netns}]");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != except)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.as_os_str() == target.as_str())
        })
        .collect()
}

/// Whether `pid` is in the cgroup `rel` (path below a hierarchy root), or below it, in
/// some hierarchy.
fn in_cgroup(pid: i32, rel: &str) -> bool {
    let want = format!("/{}", rel.trim_start_matches('/'));
    let below = format!("{want}/");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|t| {
        t.lines().any(|l| {
            l.splitn(3, ':')
                .nth(2)
                .is_some_and(|p| p == want || p.starts_with(&below))
        })
    })
}

fn in_netns(pid: i32, netns: u64) -> bool {
    super::holder::ns_inode(pid, "net").ok() == Some(netns)
}

/// SIGKILLs every process of a sandbox: those in its cgroup and those in its network
/// namespace but the holder (a process that left the cgroup is found too). Each is
/// signalled through a pidfd opened *before* checking that the pid still belongs to the
/// sandbox, so a pid recycled by an unrelated process after it was listed is never hit.
/// Returns the pids signalled; the caller waits for them to go.
pub fn kill_all(cgroup: &str, netns: u64, holder: i32) -> Vec<i32> {
    let mut candidates = super::cgroup::procs(cgroup);
    candidates.extend(processes_in_netns(netns, holder));
    candidates.sort_unstable();
    candidates.dedup();
    candidates
        .into_iter()
        .filter(|&pid| pid != holder)
        .filter(|&pid| {
            let Ok(fd) = pidfd_open(pid) else {
                // Gone already.
                return false;
            };
            if !(in_cgroup(pid, cgroup) || in_netns(pid, netns)) {
                return false;
            }
            // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number, a null info
            // pointer (meaning "as kill(2) would") and flags 0.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            r == 0
        })
        .collect()
}

fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Number of listening TCP sockets and bound UDP sockets in the holder's network namespace.
pub fn open_sockets(holder_pid: i32) -> usize {
    let netns = PathBuf::from(format!("/proc/{holder_pid}/ns/net"));
    match super::sockets::listening_or_bound(&netns) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("{e}; reading /proc/{holder_pid}/net instead");
            proc_sockets(holder_pid)
        }
    }
}

/// The same count from the /proc tables, which walk host-wide hashes: slower.
fn proc_sockets(holder_pid: i32) -> usize {
    let count = |table: &str, listen_only: bool| {
        std::fs::read_to_string(format!("/proc/{holder_pid}/net/{table}"))
            .map(|t| {
                t.lines()
                    .skip(1)
                    // field 3 is the state; 0A is LISTEN
                    .filter(|l| !listen_only || l.split_whitespace().nth(3) == Some("0A"))
                    .count()
            })
            .unwrap_or(0)
    };
    count("tcp", true) + count("tcp6", true) + count("udp", false) + count("udp6", false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_processes_by_netns() {
        let me = nix::unistd::getpid().as_raw();
        let ino = super::super::holder::ns_inode(me, "net").unwrap();
        assert!(processes_in_netns(ino, -1).contains(&me));
        assert!(!processes_in_netns(ino, me).contains(&me));
        assert!(processes_in_netns(1, -1).is_empty());
    }

    /// Processes in the cgroup are killed, the holder and processes outside are not.
    #[test]
    fn kill_all_signals_only_the_sandbox() {
        use std::process::Command;
        let rel = format!("trenv-unit-kill-{}", nix::unistd::getpid());
        super::super::cgroup::create(&rel).expect("cgroup");
        let mut inside = Command::new("sleep").arg("100").spawn().expect("sleep");
        let mut outside = Command::new("sleep").arg("100").spawn().expect("sleep");
        let mut holder = Command::new("sleep").arg("100").spawn().expect("sleep");
        let pid = |c: &std::process::Child| i32::try_from(c.id()).expect("pid");
        for c in [&inside, &holder] {
            let procs = std::path::Path::new("/sys/fs/cgroup/memory")
                .join(&rel)
                .join("cgroup.procs");
            std::fs::write(&procs, pid(c).to_string()).expect("join cgroup");
        }
        // A netns inode no process has: only the cgroup counts.
        let killed = kill_all(&rel, 1, pid(&holder));
        assert_eq!(killed, vec![pid(&inside)]);
        let status = inside.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(
            outside.try_wait().expect("try_wait").is_none(),
            "outside killed"
        );
        assert!(
            holder.try_wait().expect("try_wait").is_none(),
            "holder killed"
        );
        for mut c in [outside, holder] {
            let _ = c.kill();
            let _ = c.wait();
        }
        super::super::cgroup::remove(&rel).expect("remove cgroup");
    }
}
