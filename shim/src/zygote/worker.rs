//! What a zygote worker does: one libcontainer, CRIU or sandbox operation per process.

use std::os::fd::{AsRawFd, OwnedFd};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;

use super::protocol::{Answer, Failure, FailureKind, Request, SandboxUts, Stdio};

/// Gives the new process all three streams: those that came with the request and /dev/null
/// for the others, as runc does. A stream left out would be whatever the worker has there,
/// or closed, and a process whose stdout is closed may write its output into the first
/// socket it opens.
fn take_stdio(
    builder: ContainerBuilder,
    stdio: Stdio,
    fds: Vec<OwnedFd>,
    terminal: bool,
) -> anyhow::Result<ContainerBuilder> {
    // A terminal's pty is all three streams.
    if terminal {
        return Ok(builder);
    }
    let [stdin, stdout, stderr]: [OwnedFd; 3] = full_stdio(stdio, fds)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("stdio: three descriptors expected"))?;
    Ok(builder
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr))
}

/// Performs `req` and says how it went, with the kind of a failure classified for the
/// caller's error code.
pub fn respond(req: Request, fds: Vec<OwnedFd>) -> Result<Answer, Failure> {
    // A write to a closed pipe or socket is an error to report, not a reason to die. Only
    // workers that create container processes keep the default: an ignored SIGPIPE would
    // be inherited by the container's processes through exec.
    if !matches!(req.name(), "create" | "exec") {
        // SAFETY: setting a disposition to SIG_IGN has no memory-safety preconditions.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigIgn,
            )
        };
    }
    run(req, fds).map_err(|e| Failure {
        kind: classify(&e),
        message: format!("{e:#}"),
        reason: template_reason(&e),
    })
}

/// The short reason of a failed template operation, from the typed errors in its chain.
fn template_reason(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        if let Some(t) = cause.downcast_ref::<trenv_template::TemplateError>() {
            return Some(t.reason().to_string());
        }
        if let Some(r) = cause.downcast_ref::<trenv_criu::restore::RestoreError>() {
            return Some(
                match r {
                    trenv_criu::restore::RestoreError::Criu { .. } => "criu",
                    _ => "restore",
                }
                .to_string(),
            );
        }
        if cause.downcast_ref::<trenv_criu::CriuError>().is_some()
            || cause
                .downcast_ref::<trenv_criu::checkpoint::CheckpointError>()
                .is_some()
        {
            return Some("criu".to_string());
        }
    }
    None
}

/// The three stdio descriptors a new or restored process gets: those that came with the
/// request, and /dev/null for the ones that did not (CRIU needs one for every checkpointed
/// pipe). A new container's init swaps it for the container's own /dev/null, read-write
/// (`trenv_oci::executor`).
fn full_stdio(stdio: Stdio, fds: Vec<OwnedFd>) -> anyhow::Result<Vec<OwnedFd>> {
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(3);
    for wanted in [stdio.stdin, stdio.stdout, stdio.stderr] {
        let fd = match wanted.then(|| fds.next()).flatten() {
            Some(fd) => fd,
            None => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into(),
        };
        out.push(fd);
    }
    Ok(out)
}

fn raw3(fds: &[OwnedFd]) -> Option<[std::os::fd::RawFd; 3]> {
    match fds {
        [a, b, c] => Some([a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()]),
        _ => None,
    }
}

/// What every restore of a task's init asks of CRIU: the task, its bundle, the container's
/// CRIU annotations and its new stdio.
fn restore_options(
    id: String,
    state_root: std::path::PathBuf,
    bundle: std::path::PathBuf,
    systemd: bool,
    criu_opts: super::protocol::CriuAnnotations,
    stdio: &[OwnedFd],
) -> trenv_criu::restore::RestoreOptions {
    trenv_criu::restore::RestoreOptions {
        id,
        state_root,
        bundle,
        systemd_cgroup: systemd,
        tcp_established: criu_opts.tcp_established,
        ext_unix_sk: criu_opts.ext_unix_sk,
        file_locks: criu_opts.file_locks,
        manage_cgroups_mode: criu_opts.manage_cgroups_mode,
        stdio: raw3(stdio),
        ..Default::default()
    }
}

/// The installed CRIU's version as templates record it ("4.2.1").
fn criu_version(criu: &trenv_criu::Criu) -> anyhow::Result<String> {
    let (a, b, c) = criu.cached_version()?;
    Ok(format!("{a}.{b}.{c}"))
}

/// The kind of a failure, from the typed errors in its chain.
fn classify(e: &anyhow::Error) -> FailureKind {
    for cause in e.chain() {
        if let Some(l) = cause.downcast_ref::<LibcontainerError>() {
            return match l {
                LibcontainerError::Exist => FailureKind::AlreadyExists,
                LibcontainerError::NoDirectory => FailureKind::NotFound,
                LibcontainerError::IncorrectStatus(_) => FailureKind::FailedPrecondition,
                LibcontainerError::InvalidID(_)
                | LibcontainerError::InvalidInput(_)
                | LibcontainerError::MissingSpec(_)
                | LibcontainerError::InvalidSpec(_) => FailureKind::InvalidArgument,
                _ => continue,
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::NotFound {
                return FailureKind::NotFound;
            }
        }
    }
    FailureKind::Internal
}

fn run(req: Request, fds: Vec<OwnedFd>) -> anyhow::Result<Answer> {
    use trenv_sandbox::Sandbox;
    match req {
        Request::Background { nice, request } => {
            // This worker is a fresh process: the priority goes with it.
            set_nice(nice);
            run(*request, fds)
        }
        Request::CreateSandbox {
            id,
            exe,
            cgroup_parent,
            network,
        } => {
            let sb = Sandbox::create(&id, &exe, &cgroup_parent, &network)?;
            Ok(Answer {
                pid: Some(sb.holder.pid),
                data: Some(serde_json::to_value(sb)?),
            })
        }
        Request::DestroySandbox { sandbox, network } => {
            sandbox.destroy(&network)?;
            Ok(Answer::default())
        }
        other => perform(other, fds).map(|pid| Answer { pid, data: None }),
    }
}

/// Lowers the calling thread's CPU priority (a nice value, 0-19); failures only cost speed.
pub fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    let Ok(tid) = libc::id_t::try_from(nix::unistd::gettid().as_raw()) else {
        return;
    };
    // SAFETY: setpriority has no memory-safety preconditions; on Linux PRIO_PROCESS with a
    // thread id applies to that thread only.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
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
    trenv_oci::lifecycle::refresh_status(&mut c)?;
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
            trenv_oci::lifecycle::check_oom_score_adj(&bundle)?;
            if let Some(uts) = sandbox_uts {
                enter_uts(&uts)?;
            }
            let b = ContainerBuilder::new(id, SyscallType::default())
                .with_executor(trenv_oci::executor::Executor::new())
                .with_root_path(root)?
                .with_console_socket(console_socket.as_ref());
            let c = take_stdio(b, stdio, fds, console_socket.is_some())?
                .validate_id()?
                .as_init(bundle)
                .with_systemd(systemd)
                .with_no_pivot(no_pivot)
                .with_detach(true)
                .build()?;
            if let Err(e) = trenv_oci::lifecycle::apply_oom_killer_setting(&c) {
                let mut c = c;
                let _ = trenv_oci::lifecycle::delete(&mut c, true);
                return Err(e.into());
            }
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
            let stdio = full_stdio(stdio, fds)?;
            let opts = trenv_criu::restore::RestoreOptions {
                image_path,
                work_path,
                shell_job: console_socket.is_some(),
                console_socket,
                ..restore_options(id, root, bundle, systemd, criu_opts, &stdio)
            };
            let r = trenv_criu::restore::restore(&trenv_criu::Criu::new(&criu), &opts)?;
            Ok(Some(r.pid))
        }
        Request::RestoreTemplate {
            root,
            id,
            bundle,
            criu,
            store,
            template,
            work,
            stdio,
            systemd,
            criu_opts,
            join_ipc_uts,
        } => {
            use anyhow::Context;
            let stdio = full_stdio(stdio, fds)?;
            let criu = trenv_criu::Criu::new(&criu);
            let version = criu_version(&criu)?;
            let store = trenv_template::Store::open(&store)?;
            if let Some(parent) = work.parent() {
                for s in trenv_template::restore::sweep(parent) {
                    log::info!("removed {} left by a killed restore", s.display());
                }
            }
            let restoring =
                trenv_template::restore::Restoring::prepare(&store, &template, &version, &work)?;
            let mut opts = restore_options(id, root, bundle, systemd, criu_opts, &stdio);
            opts.join_ipc_uts = join_ipc_uts;
            restoring.apply(&mut opts);
            let r = trenv_criu::restore::restore(&criu, &opts)
                .with_context(|| format!("restoring from template {template}"));
            drop(restoring);
            // On failure CRIU's log stays, where the error points.
            if r.is_ok() {
                let _ = std::fs::remove_dir_all(&work);
            }
            Ok(Some(r?.pid))
        }
        Request::TemplateDump {
            root,
            id,
            criu,
            images,
            criu_opts,
            in_joined_ipc_uts,
        } => {
            use anyhow::Context;
            let mut c = load(&root, &id)?;
            let o = trenv_criu::checkpoint::CheckpointOptions {
                image_path: images.clone(),
                leave_running: true,
                tcp_established: criu_opts.tcp_established,
                ext_unix_sk: criu_opts.ext_unix_sk,
                file_locks: criu_opts.file_locks,
                manage_cgroups_mode: criu_opts.manage_cgroups_mode,
                // Requests arriving while the dump runs are the running instance's, not
                // the template's.
                skip_in_flight: true,
                in_joined_ipc_uts,
                ..Default::default()
            };
            let dumped =
                trenv_criu::checkpoint::checkpoint(&mut c, &trenv_criu::Criu::new(&criu), &o)
                    .with_context(|| format!("checkpointing {id} for a template"));
            if dumped.is_err() {
                let _ = std::fs::remove_dir_all(&images);
            }
            dumped?;
            Ok(None)
        }
        Request::BuildTemplate {
            criu,
            store,
            name,
            key,
            images,
            pool,
        } => {
            use anyhow::Context;
            let built = (|| -> anyhow::Result<()> {
                let version = criu_version(&trenv_criu::Criu::new(&criu))?;
                let store = trenv_template::Store::open(&store)?;
                match store.check(&name, &version) {
                    // Built meanwhile (another shim, an earlier build): nothing to do.
                    Ok(m) if m.key == key => return Ok(()),
                    Ok(_) => {}
                    Err(e) => {
                        if matches!(e.reason(), "corrupt" | "stale" | "pool-missing" | "pool") {
                            // The damaged template goes first, or the build would find its
                            // key built and only add the name.
                            log::info!("template {name}: replacing it ({e})");
                            if let Err(r) = store.remove(&name) {
                                log::warn!("template {name}: removing it: {r}");
                            }
                        }
                    }
                }
                let kind: trenv_mempool::PoolKind = pool.kind.parse()?;
                let mempool =
                    trenv_mempool::FilePool::open(kind, &pool.name, &pool.dir, pool.capacity)?;
                store
                    .build(&images, &name, Some(key), &mempool, &version)
                    .with_context(|| format!("building template {name}"))?;
                Ok(())
            })();
            let _ = std::fs::remove_dir_all(&images);
            built?;
            Ok(None)
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
                .with_executor(trenv_oci::executor::Executor::new())
                .with_root_path(root)?
                .with_console_socket(console_socket.as_ref());
            let pid = take_stdio(b, stdio, fds, console_socket.is_some())?
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
            let sig = libcontainer::signal::Signal::try_from(i32::try_from(signal)?)?;
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
            let o = trenv_criu::checkpoint::CheckpointOptions {
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
            trenv_criu::checkpoint::checkpoint(&mut c, &trenv_criu::Criu::new(&opts.criu), &o)?;
            Ok(None)
        }
        Request::PurgeSandbox { holder } => {
            trenv_sandbox::purge::namespaces(&holder)?;
            Ok(None)
        }
        Request::CreateSandbox { .. }
        | Request::DestroySandbox { .. }
        | Request::Background { .. } => {
            anyhow::bail!("sandbox requests are answered by run()")
        }
        Request::Delete {
            root,
            id,
            force,
            bundle,
        } => {
            if root.join(&id).join("state.json").exists() {
                trenv_oci::lifecycle::delete(&mut load(&root, &id)?, force)?;
            } else if trenv_criu::restore::remove_half_restored(&root, &id, bundle.as_deref()) {
                log::info!("{id}: removed what a killed restore left");
            }
            Ok(None)
        }
    }
}
