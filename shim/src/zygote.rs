//! The zygote: a single-threaded helper process that runs libcontainer operations for the shim.
//!
//! libcontainer changes process-global state (signal dispositions, the working directory,
//! environment, rlimits during clone) and calls fork/clone, which is unsafe in a process that
//! already runs ttrpc threads. So the shim forks the zygote first, while it is still single
//! threaded. For every request the zygote forks a short-lived worker that performs one
//! operation and answers on the shared socket; the zygote itself never runs libcontainer.
//! Container inits created by a worker are re-parented to the shim (a child subreaper) when
//! the worker exits, so the shim reaps them and reports their exits. No binary is executed.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};
use serde::{Deserialize, Serialize};

const MAX_MSG: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("zygote socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("zygote message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the zygote process is gone")]
    Gone,
    #[error("{0}")]
    Op(String),
}

/// Which of stdin, stdout, stderr accompany a request as descriptors, in that order.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The UTS namespace of a pooled sandbox, which the container joins: libcontainer sets
/// the spec's names only in a new UTS namespace, so the worker sets them first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SandboxUts {
    pub ns: PathBuf,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
}

/// One libcontainer operation.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Create {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: Stdio,
        systemd: bool,
        no_pivot: bool,
        sandbox_uts: Option<SandboxUts>,
    },
    /// Runs `request` at a lower CPU priority: the pool's background work (purges,
    /// refills) must not take CPU from container starts on small nodes.
    Background {
        nice: i32,
        request: Box<Request>,
    },
    /// Purges a released sandbox's IPC and UTS namespaces.
    PurgeSandbox {
        holder: trenv_runtime::sandbox::holder::Holder,
    },
    /// Creates a sandbox (holder, cgroup, CNI); answers with its record. CNI plugins run
    /// here rather than in the shim, whose reaper would collect them before they are waited.
    CreateSandbox {
        id: String,
        exe: PathBuf,
        cgroup_parent: String,
        network: trenv_runtime::sandbox::cni::Network,
    },
    DestroySandbox {
        sandbox: Box<trenv_runtime::sandbox::Sandbox>,
        network: trenv_runtime::sandbox::cni::Network,
    },
    /// Restores a checkpoint as the task's init; the stdio descriptors replace the
    /// checkpointed process's stdio pipes.
    Restore {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        image_path: PathBuf,
        work_path: Option<PathBuf>,
        criu: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: Stdio,
        systemd: bool,
        criu_opts: crate::annotations::CriuAnnotations,
    },
    Start {
        root: PathBuf,
        id: String,
    },
    Exec {
        root: PathBuf,
        id: String,
        process: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: Stdio,
    },
    Kill {
        root: PathBuf,
        id: String,
        signal: u32,
        all: bool,
    },
    Pause {
        root: PathBuf,
        id: String,
    },
    Resume {
        root: PathBuf,
        id: String,
    },
    Delete {
        root: PathBuf,
        id: String,
        force: bool,
    },
    Checkpoint {
        root: PathBuf,
        id: String,
        opts: CheckpointRequest,
    },
}

/// The checkpoint options containerd sends (runc's CheckpointOptions), in serialisable form.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CheckpointRequest {
    pub criu: PathBuf,
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Ok {
        pid: Option<i32>,
        #[serde(default)]
        data: Option<serde_json::Value>,
    },
    Err(String),
}

/// The shim's end of the zygote.
pub struct Zygote {
    /// Closing it ends the zygote.
    sock: OwnedFd,
    pid: nix::unistd::Pid,
}

impl Zygote {
    /// Forks the zygote. Must be called while the process is still single threaded.
    pub fn spawn() -> Result<Self, ZygoteError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // SAFETY: the caller guarantees no other thread exists, so the child may run
        // arbitrary code.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(ours);
                serve(theirs);
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                Ok(Self {
                    sock: ours,
                    pid: child,
                })
            }
        }
    }

    /// Ends the zygote (it exits when its socket closes) and reaps it; kills it if it does
    /// not exit within a second (a worker stuck in an operation).
    pub fn shutdown(self) {
        use nix::sys::wait::WaitPidFlag;
        let pid = self.pid;
        drop(self.sock);
        for _ in 0..100 {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                // Exited, or already collected by the shim's reaper.
                _ => return,
            }
        }
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }

    /// Runs one request with the given descriptors; returns the pid it produced, if any.
    pub fn call(&self, req: &Request, fds: &[RawFd]) -> Result<Option<i32>, ZygoteError> {
        self.exchange(req, fds).map(|(pid, _)| pid)
    }

    /// Runs one request that answers with data.
    pub fn call_data(&self, req: &Request) -> Result<Option<serde_json::Value>, ZygoteError> {
        self.exchange(req, &[]).map(|(_, data)| data)
    }

    fn exchange(
        &self,
        req: &Request,
        fds: &[RawFd],
    ) -> Result<(Option<i32>, Option<serde_json::Value>), ZygoteError> {
        let msg = serde_json::to_vec(req)?;
        let cmsgs = if fds.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(fds)]
        };
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )?;
        let (buf, _) = recv(&self.sock)?;
        match serde_json::from_slice(&buf)? {
            Response::Ok { pid, data } => Ok((pid, data)),
            Response::Err(e) => Err(ZygoteError::Op(e)),
        }
    }
}

fn recv(sock: &OwnedFd) -> Result<(Vec<u8>, Vec<OwnedFd>), ZygoteError> {
    let mut buf = vec![0u8; MAX_MSG];
    let (n, fds) = trenv_runtime::fdpass::recv_with_fds(sock.as_raw_fd(), &mut buf)?;
    if n == 0 {
        return Err(ZygoteError::Gone);
    }
    buf.truncate(n);
    Ok((buf, fds))
}

fn reply(sock: &OwnedFd, resp: &Response) {
    if let Ok(msg) = serde_json::to_vec(resp) {
        let _ = nix::unistd::write(sock, &msg);
    }
}

/// The zygote's loop: one forked worker per request, answered before the next is read.
/// Closes every inherited descriptor but `keep`, and points stdio at /dev/null. The shim's
/// start-up pipes must not be held open by the zygote, or containerd waits for their EOF.
fn detach_descriptors(keep: RawFd) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing descriptors this single-threaded process inherited; nothing in
            // it uses them.
            unsafe { libc::close(fd) };
        }
    }
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for target in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

fn serve(sock: OwnedFd) -> ! {
    detach_descriptors(sock.as_raw_fd());
    // The shim starts in its first task's bundle, which is removed with that task; a
    // worker in a deleted directory cannot resolve relative paths (libcontainer's getcwd).
    let _ = std::env::set_current_dir("/");
    // Handlers inherited from the shim would report our workers' exits to the shim.
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPIPE,
    ] {
        // SAFETY: restoring default dispositions has no memory-safety preconditions.
        let _ = unsafe { signal(s, SigHandler::SigDfl) };
    }
    loop {
        let (buf, fds) = match recv(&sock) {
            Ok(m) => m,
            Err(_) => std::process::exit(0),
        };
        let req: Request = match serde_json::from_slice(&buf) {
            Ok(r) => r,
            Err(e) => {
                reply(&sock, &Response::Err(format!("bad request: {e}")));
                continue;
            }
        };
        // SAFETY: the zygote is single threaded.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let resp = match respond(req, fds) {
                    Ok((pid, data)) => Response::Ok { pid, data },
                    Err(e) => Response::Err(format!("{e:#}")),
                };
                reply(&sock, &resp);
                std::process::exit(0);
            }
            Ok(ForkResult::Parent { child }) => {
                drop(fds);
                let _ = waitpid(child, None);
            }
            Err(e) => reply(&sock, &Response::Err(format!("zygote fork: {e}"))),
        }
    }
}

fn take_stdio(builder: ContainerBuilder, stdio: Stdio, fds: Vec<OwnedFd>) -> ContainerBuilder {
    let mut fds = fds.into_iter();
    let mut b = builder;
    if stdio.stdin {
        if let Some(fd) = fds.next() {
            b = b.with_stdin(fd);
        }
    }
    if stdio.stdout {
        if let Some(fd) = fds.next() {
            b = b.with_stdout(fd);
        }
    }
    if stdio.stderr {
        if let Some(fd) = fds.next() {
            b = b.with_stderr(fd);
        }
    }
    b
}

type Answer = (Option<i32>, Option<serde_json::Value>);

fn respond(req: Request, fds: Vec<OwnedFd>) -> anyhow::Result<Answer> {
    use trenv_runtime::sandbox::Sandbox;
    match req {
        Request::Background { nice, request } => {
            // This worker is a fresh process: the priority goes with it.
            set_nice(nice);
            respond(*request, fds)
        }
        Request::CreateSandbox {
            id,
            exe,
            cgroup_parent,
            network,
        } => {
            let sb = Sandbox::create(&id, &exe, &cgroup_parent, &network)?;
            Ok((Some(sb.holder.pid), Some(serde_json::to_value(sb)?)))
        }
        Request::DestroySandbox { sandbox, network } => {
            sandbox.destroy(&network)?;
            Ok((None, None))
        }
        other => perform(other, fds).map(|pid| (pid, None)),
    }
}

/// Lowers the calling thread's CPU priority (a nice value, 0-19); failures only cost speed.
pub fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid and setpriority have no memory-safety preconditions; on Linux
    // PRIO_PROCESS with a thread id applies to that thread only.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if r != 0 {
        log::warn!("setting nice {nice}: {}", std::io::Error::last_os_error());
    }
}

fn enter_uts(uts: &SandboxUts) -> anyhow::Result<()> {
    use anyhow::Context;
    let f = std::fs::File::open(&uts.ns).with_context(|| format!("opening {:?}", uts.ns))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWUTS).context("joining sandbox UTS")?;
    if let Some(h) = &uts.hostname {
        nix::unistd::sethostname(h).context("setting hostname")?;
    }
    if let Some(d) = &uts.domainname {
        std::fs::write("/proc/sys/kernel/domainname", d).context("setting domainname")?;
    }
    Ok(())
}

fn load(root: &std::path::Path, id: &str) -> anyhow::Result<Container> {
    let mut c = Container::load(root.join(id))?;
    c.refresh_status()?;
    Ok(c)
}

/// Runs in a worker process.
fn perform(req: Request, fds: Vec<OwnedFd>) -> anyhow::Result<Option<i32>> {
    match req {
        Request::Create {
            root,
            id,
            bundle,
            console_socket,
            stdio,
            systemd,
            no_pivot,
            sandbox_uts,
        } => {
            if let Some(uts) = sandbox_uts {
                enter_uts(&uts)?;
            }
            let b = ContainerBuilder::new(id, SyscallType::default())
                .with_executor(DefaultExecutor {})
                .with_root_path(root)?
                .with_console_socket(console_socket.as_ref());
            let c = take_stdio(b, stdio, fds)
                .validate_id()?
                .as_init(bundle)
                .with_systemd(systemd)
                .with_no_pivot(no_pivot)
                .with_detach(true)
                .build()?;
            Ok(c.pid().map(|p| p.as_raw()))
        }
        Request::Restore {
            root,
            id,
            bundle,
            image_path,
            work_path,
            criu,
            console_socket,
            stdio,
            systemd,
            criu_opts,
        } => {
            // CRIU gives the restored process the worker's own stdio in place of the old
            // pipes; this worker is about to exit, so it can hand its fds 0-2 over.
            let mut fds = fds.into_iter();
            for (n, wanted) in [stdio.stdin, stdio.stdout, stdio.stderr]
                .into_iter()
                .enumerate()
            {
                if let Some(fd) = wanted.then(|| fds.next()).flatten() {
                    nix::unistd::dup2(fd.as_raw_fd(), n as RawFd)?;
                }
            }
            let opts = trenv_runtime::restore::RestoreOptions {
                id,
                state_root: root,
                bundle,
                image_path,
                work_path,
                shell_job: console_socket.is_some(),
                console_socket,
                systemd_cgroup: systemd,
                tcp_established: criu_opts.tcp_established,
                ext_unix_sk: criu_opts.ext_unix_sk,
                file_locks: criu_opts.file_locks,
                manage_cgroups_mode: criu_opts.manage_cgroups_mode,
                ..Default::default()
            };
            let r = trenv_runtime::restore::restore(&trenv_runtime::criu::Criu::new(&criu), &opts)?;
            Ok(Some(r.pid))
        }
        Request::Start { root, id } => {
            load(&root, &id)?.start()?;
            Ok(None)
        }
        Request::Exec {
            root,
            id,
            process,
            console_socket,
            stdio,
        } => {
            let b = ContainerBuilder::new(id, SyscallType::default())
                .with_executor(DefaultExecutor {})
                .with_root_path(root)?
                .with_console_socket(console_socket.as_ref());
            let pid = take_stdio(b, stdio, fds)
                .validate_id()?
                .as_tenant()
                .with_detach(true)
                .with_process(Some(process))
                .build()?;
            Ok(Some(pid.as_raw()))
        }
        Request::Kill {
            root,
            id,
            signal,
            all,
        } => {
            let sig = libcontainer::signal::Signal::try_from(signal as i32)?;
            load(&root, &id)?.kill(sig, all)?;
            Ok(None)
        }
        Request::Pause { root, id } => {
            load(&root, &id)?.pause()?;
            Ok(None)
        }
        Request::Resume { root, id } => {
            load(&root, &id)?.resume()?;
            Ok(None)
        }
        Request::Checkpoint { root, id, opts } => {
            let mut c = load(&root, &id)?;
            let o = trenv_runtime::checkpoint::CheckpointOptions {
                image_path: opts.image_path,
                work_path: opts.work_path,
                leave_running: !opts.exit,
                tcp_established: opts.open_tcp,
                ext_unix_sk: opts.external_unix_sockets,
                shell_job: opts.terminal,
                file_locks: opts.file_locks,
                empty_ns: opts.empty_namespaces,
                manage_cgroups_mode: opts.cgroups_mode,
                ..Default::default()
            };
            trenv_runtime::checkpoint::checkpoint(
                &mut c,
                &trenv_runtime::criu::Criu::new(&opts.criu),
                &o,
            )?;
            Ok(None)
        }
        Request::PurgeSandbox { holder } => {
            trenv_runtime::sandbox::purge::namespaces(&holder)?;
            Ok(None)
        }
        Request::CreateSandbox { .. }
        | Request::DestroySandbox { .. }
        | Request::Background { .. } => {
            anyhow::bail!("sandbox requests are answered by respond()")
        }
        Request::Delete { root, id, force } => {
            if root.join(&id).join("state.json").exists() {
                load(&root, &id)?.delete(force)?;
            }
            Ok(None)
        }
    }
}
