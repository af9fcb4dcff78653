//! The containerd task service.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::{self, Status};
use containerd_shim::event::Event;
use containerd_shim::monitor::{Subject, Topic};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use libcgroups::common::CgroupManager;

use crate::annotations::{Annotations, CriuAnnotations};
use crate::backend::{Backend, Events};
use crate::config::ShimConfig;
use crate::console::ConsoleSocket;
use crate::lifetime::Lifetime;
use crate::placement::{self, Plan};
use crate::pool::{Claim, Pool};
use crate::task::{Proc, Status as ProcStatus, Task, TaskError, Tasks, TemplateTask};
use crate::templates::Templates;
use crate::zygote::{FailureKind, Kind, Request, SandboxUts, Stdio, Zygote, ZygoteError};

/// The zygote, shared by the shim (which ends it at exit) and the task service.
pub type SharedZygote = Arc<Zygote>;

/// The containerd task service: a thin ttrpc adaptor (the `containerd_shim::Task` impl at
/// the end) over the task/process model, running container operations through a
/// [`Backend`] and reporting through [`Events`].
pub struct Service<B: Backend = Zygote, E: Events = crate::backend::Publisher> {
    tasks: Arc<Tasks>,
    backend: Arc<B>,
    events: Arc<E>,
    namespace: String,
    pool: Option<Arc<Pool>>,
    lifetime: Lifetime,
    timeouts: crate::config::Timeouts,
    /// Template-backed starts (`[templates]`); None in unit tests.
    templates: Option<Arc<Templates>>,
    /// Spare instances (`[templates] spares`); None when off or without a pool.
    spare_filler: Option<Arc<spare_starts::Filler<B>>>,
}

mod spare_starts;
mod template_starts;

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn task_err(e: TaskError) -> ttrpc::Error {
    let code = match e {
        TaskError::TaskNotFound(_) | TaskError::ProcNotFound { .. } => Code::NOT_FOUND,
        TaskError::TaskExists(_) | TaskError::ExecExists(_) => Code::ALREADY_EXISTS,
        TaskError::AlreadyStarted { .. } => Code::FAILED_PRECONDITION,
    };
    err(code, e.to_string())
}

/// The ttrpc status of a failed zygote request.
fn zygote_err(e: ZygoteError) -> ttrpc::Error {
    let code = match e.kind() {
        Kind::Op(FailureKind::NotFound) => Code::NOT_FOUND,
        Kind::Op(FailureKind::AlreadyExists) => Code::ALREADY_EXISTS,
        Kind::Op(FailureKind::FailedPrecondition) => Code::FAILED_PRECONDITION,
        Kind::Op(FailureKind::InvalidArgument) => Code::INVALID_ARGUMENT,
        Kind::Op(FailureKind::Internal) => Code::UNKNOWN,
        Kind::Deadline => Code::DEADLINE_EXCEEDED,
        Kind::Unavailable => Code::UNAVAILABLE,
    };
    err(code, e.to_string())
}

/// A pid as containerd's API carries it (pids are positive; 0 means none).
fn api_pid(pid: i32) -> u32 {
    u32::try_from(pid).unwrap_or(0)
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    // Below 10^9.
    t.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    t
}

/// Moves the shim into a cgroup (runc's `shim_cgroup` option), creating it if needed.
fn join_cgroup(path: &str) -> Result<(), String> {
    let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: PathBuf::from(path),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .map_err(|e| format!("shim cgroup {path}: {e}"))?;
    manager
        .add_task(nix::unistd::Pid::this())
        .map_err(|e| format!("joining shim cgroup {path}: {e}"))
}

/// Reports process exits to the task model and as TaskExit events.
pub struct ExitSink<E: Events> {
    tasks: Arc<Tasks>,
    events: Arc<E>,
    namespace: String,
}

impl<E: Events> Clone for ExitSink<E> {
    fn clone(&self) -> Self {
        Self {
            tasks: self.tasks.clone(),
            events: self.events.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

/// How long an exit waits for the process's output to be delivered (as runc's shim waits
/// for its I/O at Delete).
const OUTPUT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl<E: Events + 'static> ExitSink<E> {
    /// The process `pid` exited with `code` (0-255, 128 + signal when killed).
    ///
    /// The exit counts (Wait returns, TaskExit goes out) once the shim has copied all the
    /// process's output into containerd's FIFOs: a client that deletes the task when it
    /// learns of the exit (`ctr run --rm`) stops reading, and output copied after that is
    /// lost.
    pub fn exited(&self, pid: i32, code: u32) {
        let at = now();
        if let Some((out, err)) = self.tasks.streams_of(pid) {
            if !crate::console::wait_copied(&[&out, &err], std::time::Duration::ZERO) {
                let me = self.clone();
                let when = at.clone();
                let waited = std::thread::Builder::new()
                    .name("exit-output".into())
                    .spawn(move || {
                        if !crate::console::wait_copied(&[&out, &err], OUTPUT_GRACE) {
                            log::warn!("pid {pid} exited; its output is still being copied");
                        }
                        me.record(pid, code, when);
                    });
                match waited {
                    Ok(_) => return,
                    Err(e) => log::warn!("exit thread: {e}"),
                }
            }
        }
        self.record(pid, code, at);
    }

    fn record(&self, pid: i32, code: u32, at: Timestamp) {
        // Unknown pids (an exit before create returned, holders, loggers) are kept by the
        // task model for a later claim; exits during a Start are published after it.
        if let Some((tid, eid)) = self.tasks.exited(pid, (code, at.clone())) {
            self.publish_exit(&tid, &eid, pid, (code, at));
        }
    }

    pub fn publish_exit(&self, id: &str, exec_id: &str, pid: i32, (code, at): crate::task::Exit) {
        let ev = TaskExit {
            container_id: id.to_string(),
            id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
            pid: api_pid(pid),
            exit_status: code,
            exited_at: Some(at).into(),
            ..Default::default()
        };
        self.events
            .publish(&ev.topic(), &self.namespace, Box::new(ev));
    }
}

impl<B: Backend, E: Events> Service<B, E> {
    /// The service of a serving shim: exits come from the shim's reaper, and a pool shim
    /// watches containerd.
    pub fn new(
        namespace: &str,
        backend: Arc<B>,
        events: E,
        exit: Arc<ExitSignal>,
        pool: Option<Arc<Pool>>,
        socket: &str,
        containerd: &str,
    ) -> Self {
        let file = ShimConfig::from_default_file().unwrap_or_default();
        let mut s = Self::with_parts(
            namespace,
            backend,
            Arc::new(events),
            exit,
            pool,
            socket,
            file.timeouts,
        );
        let templates = Arc::new(Templates::new(file.templates));
        if let Some(pool) = &s.pool {
            let filler = (templates.config().spares > 0).then(|| {
                spare_starts::Filler::new(
                    s.backend.clone(),
                    pool.clone(),
                    templates.clone(),
                    s.timeouts.clone(),
                )
            });
            let (t, ns, spares) = (
                templates.clone(),
                namespace.to_string(),
                filler.as_ref().map(|f| f.spares.clone()),
            );
            pool.set_extra_metrics(Box::new(move || {
                let mut m = t.metrics(&ns);
                if let Some(s) = &spares {
                    m.push_str(&s.metrics(&ns));
                }
                m
            }));
            if let Some(f) = &filler {
                let f = f.clone();
                pool.set_on_drain(Box::new(move || f.discard_all(true)));
            }
            s.spare_filler = filler;
        }
        s.templates = Some(templates);
        s.watch_exits();
        s.lifetime.watch_containerd(containerd);
        s
    }

    /// A service over the given parts, without the reaper subscription: exits are reported
    /// through [`Service::exit_sink`].
    pub fn with_parts(
        namespace: &str,
        backend: Arc<B>,
        events: Arc<E>,
        exit: Arc<ExitSignal>,
        pool: Option<Arc<Pool>>,
        socket: &str,
        timeouts: crate::config::Timeouts,
    ) -> Self {
        let tasks = Arc::new(Tasks::default());
        let lifetime = Lifetime::new(tasks.clone(), exit, pool.clone(), socket);
        Self {
            tasks,
            backend,
            events,
            namespace: namespace.to_string(),
            pool,
            lifetime,
            timeouts,
            templates: None,
            spare_filler: None,
        }
    }

    /// Where process exits are reported.
    pub fn exit_sink(&self) -> ExitSink<E> {
        ExitSink {
            tasks: self.tasks.clone(),
            events: self.events.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// Puts a new container into a pooled sandbox by rewriting its spec, when the pool is
    /// on and the spec allows it. Pool problems never fail the container: it then runs
    /// in namespaces of its own, as with runc.
    fn place(
        &self,
        id: &str,
        bundle: &Path,
        config: &ShimConfig,
        annotations: &Annotations,
    ) -> TtrpcResult<Option<SandboxUts>> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        if !annotations.pool || config.systemd_cgroup {
            return Ok(None);
        }
        let path = bundle.join("config.json");
        let bad = |e: String| err(Code::INVALID_ARGUMENT, format!("{}: {e}", path.display()));
        let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let mut spec: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let (memory, tainted) = match placement::plan(&spec) {
            Plan::Pool { memory, tainted } => (memory, tainted),
            Plan::Bypass(reason) => {
                log::info!("{id}: not placed in a sandbox: {reason}");
                return Ok(None);
            }
        };
        let function = placement::function_key(&spec, annotations.function.as_deref());
        let claim = Claim {
            container: id,
            function: &function,
            memory,
            tainted,
        };
        let (sb, how) = match pool.acquire(&claim) {
            Ok(x) => x,
            Err(e) => {
                log::warn!("{id}: no sandbox ({e}); running in namespaces of its own");
                return Ok(None);
            }
        };
        placement::apply(&mut spec, &sb);
        let written = serde_json::to_vec(&spec)
            .map_err(|e| e.to_string())
            .and_then(|b| std::fs::write(&path, b).map_err(|e| e.to_string()));
        if let Err(e) = written {
            pool.release(id);
            return Err(err(Code::INTERNAL, format!("{}: {e}", path.display())));
        }
        log::info!(
            "{id}: sandbox {} ({how:?}, function {function:?}, ip {})",
            sb.id,
            sb.attachment.ip
        );
        Ok(Some(SandboxUts {
            ns: PathBuf::from(sb.holder.ns_path("uts")),
            hostname: spec["hostname"].as_str().map(str::to_string),
            domainname: spec["domainname"].as_str().map(str::to_string),
        }))
    }

    fn release_sandbox(&self, id: &str) {
        if let Some(pool) = &self.pool {
            pool.release(id);
        }
    }

    fn publish(&self, topic: String, event: Box<dyn MessageDyn>) {
        self.events.publish(&topic, &self.namespace, event);
    }

    /// Runs a request in the backend (a zygote worker), within the configured deadline for its kind.
    fn call(&self, req: &Request, fds: &[OwnedFd]) -> TtrpcResult<Option<i32>> {
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.backend
            .call(req, &raw, self.timeouts.for_request(req))
            .map_err(zygote_err)
    }

    /// Starts a process (init or exec) through the zygote, wiring its stdio: containerd's
    /// FIFOs directly, or a terminal whose master the shim keeps and copies from and to.
    fn launch(
        &self,
        id: &str,
        p: &Proc,
        config: &ShimConfig,
        request: impl FnOnce(Option<PathBuf>, Stdio) -> Request,
    ) -> TtrpcResult<(Option<i32>, Option<Arc<std::fs::File>>)> {
        if p.terminal {
            let console = ConsoleSocket::new()
                .map_err(|e| err(Code::INTERNAL, format!("console socket: {e}")))?;
            let pid = self.call(&request(Some(console.path.clone()), Stdio::default()), &[])?;
            let master = Arc::new(
                console
                    .receive()
                    .map_err(|e| err(Code::INTERNAL, e.to_string()))?,
            );
            crate::console::spawn_copy(master.clone(), &p.stdin, &p.stdout)
                .map_err(|e| err(Code::INTERNAL, format!("terminal I/O: {e}")))?;
            return Ok((pid, Some(master)));
        }
        let (stdio, fds) = self.open_stdio(id, p, config)?;
        let pid = self.call(&request(None, stdio), &fds)?;
        Ok((pid, None))
    }

    /// containerd's FIFOs (or log URIs) of a process without a terminal, opened for it.
    fn open_stdio(
        &self,
        id: &str,
        p: &Proc,
        config: &ShimConfig,
    ) -> TtrpcResult<(Stdio, Vec<OwnedFd>)> {
        let streams = crate::stdio::Streams {
            id,
            namespace: &self.namespace,
            stdin: &p.stdin,
            stdout: &p.stdout,
            stderr: &p.stderr,
            owner: (config.io_uid, config.io_gid),
            pipe_all: p.pipe_all,
        };
        crate::stdio::open(&streams)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("opening stdio: {e}")))
    }

    /// Records exits reported by the reaper and publishes TaskExit.
    fn watch_exits(&self) {
        let sub = match containerd_shim::monitor::monitor_subscribe(Topic::All) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot subscribe to exits: {e}");
                return;
            }
        };
        let sink = self.exit_sink();
        std::thread::spawn(move || {
            for ev in sub.rx.iter() {
                let Subject::Pid(pid) = ev.subject else {
                    continue;
                };
                // Exit statuses are 0-255 (128 + signal for a killed process).
                sink.exited(pid, u32::try_from(ev.exit_code).unwrap_or(255));
            }
        });
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Task, &mut Proc) -> T,
    ) -> TtrpcResult<T> {
        self.tasks.with_proc(id, exec_id, f).map_err(task_err)
    }

    /// Publishes TaskOOM whenever the task's memory cgroup kills a process.
    fn watch_oom(&self, id: &str) {
        let path = self.task_root(id).and_then(|(root, _)| {
            let c = libcontainer::container::Container::load(root.join(id))
                .map_err(|e| err(Code::NOT_FOUND, e.to_string()))?;
            c.spec()
                .map(|s| s.cgroup_path)
                .map_err(|e| err(Code::INTERNAL, e.to_string()))
        });
        let path = match path {
            Ok(p) => p,
            Err(e) => {
                log::warn!("no OOM events for {id}: {e}");
                return;
            }
        };
        self.watch_oom_at(id, &path);
    }

    /// The same, for a cgroup path known already.
    fn watch_oom_at(&self, id: &str, path: &Path) {
        let events = self.events.clone();
        let ns = self.namespace.clone();
        let container_id = id.to_string();
        let res = crate::oom::watch(path, move || {
            let ev = TaskOOM {
                container_id: container_id.clone(),
                ..Default::default()
            };
            events.publish(&ev.topic(), &ns, Box::new(ev));
        });
        if let Err(e) = res {
            log::warn!("no OOM events for {id}: {e}");
        }
    }

    /// The state root and configuration of a task.
    fn task_root(&self, id: &str) -> TtrpcResult<(PathBuf, ShimConfig)> {
        self.with_proc(id, "", |t, _| (t.root.clone(), t.config.clone()))
    }

    fn task_criu(&self, id: &str) -> TtrpcResult<CriuAnnotations> {
        self.with_proc(id, "", |t, _| t.criu.clone())
    }

    /// The cgroup of a task, as libcontainer recorded it. Reading and writing cgroup files
    /// touches no process-global state, so this runs in the shim itself.
    fn cgroup(&self, id: &str) -> TtrpcResult<libcgroups::common::AnyCgroupManager> {
        let (root, config) = self.task_root(id)?;
        let c = libcontainer::container::Container::load(root.join(id))
            .map_err(|e| err(Code::NOT_FOUND, format!("task {id}: {e}")))?;
        let spec = c.spec().map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path: spec.cgroup_path,
            systemd_cgroup: config.systemd_cgroup,
            container_name: id.to_string(),
        })
        .map_err(|e| err(Code::INTERNAL, e.to_string()))
    }
}

/// The task API, one method per ttrpc call.
impl<B: Backend, E: Events> Service<B, E> {
    pub fn connect(&self, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let pid = self
            .with_proc(&req.id, "", |_, p| api_pid(p.pid))
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    pub fn create(&self, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        let bundle = PathBuf::from(&req.bundle);
        if self.tasks.contains(&req.id) {
            return Err(task_err(TaskError::TaskExists(req.id.clone())));
        }
        let config = ShimConfig::for_task(req.options.as_ref())
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let annotations = Annotations::from_bundle(&bundle)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let criu = annotations.criu.clone();
        config
            .save(&bundle)
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        if let Some(cg) = &config.shim_cgroup {
            join_cgroup(cg).map_err(|e| err(Code::INTERNAL, e))?;
        }
        let root = config.state_root(&self.namespace);
        let checkpoint = (!req.checkpoint.is_empty()).then(|| PathBuf::from(&req.checkpoint));
        // Keyed by the spec as containerd wrote it, before placement rewrites it.
        let plan = self.template_plan(&req, &bundle, &annotations, &config);
        let restore = plan.as_ref().is_some_and(|p| p.restore());
        let spare_source =
            self.spare_source(&req, &bundle, &annotations, &config, plan.as_ref(), &root);
        if let Some(plan) = plan.as_ref().filter(|_| spare_source.is_some()) {
            let taken = self.create_from_spare(
                &req,
                &config,
                &annotations,
                plan,
                spare_source.clone(),
                &root,
            )?;
            if let Some(pid) = taken {
                return Ok(self.created(&req, pid));
            }
        }
        // Mounting the rootfs (an overlay mount, the larger part) and taking a sandbox
        // are independent: done side by side, a pool hit waits for the longer of the two.
        let (mounted, placed) = std::thread::scope(|s| {
            let mount = s.spawn(|| {
                crate::rootfs::mount_bundle(&bundle, &req.rootfs)
                    .map_err(|e| err(Code::INTERNAL, e))
            });
            let placed = self.place(&req.id, &bundle, &config, &annotations);
            let mounted = mount
                .join()
                .unwrap_or_else(|_| Err(err(Code::INTERNAL, "rootfs mount thread panicked")));
            (mounted, placed)
        });
        let (mounted, sandbox_uts) = match (mounted, placed) {
            (Ok(m), Ok(s)) => (m, s),
            (Err(e), placed) => {
                if matches!(placed, Ok(Some(_))) {
                    self.release_sandbox(&req.id);
                }
                return Err(e);
            }
            (Ok(m), Err(e)) => {
                if m {
                    crate::rootfs::unmount_bundle(&bundle);
                }
                return Err(e);
            }
        };
        let mut p = Proc {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            // A template may be taken from this init, or it is restored from one.
            pipe_all: plan.is_some(),
            ..Default::default()
        };
        // A task from a checkpoint is restored by Start, as runc's shim does: until then it
        // has no process.
        // Restored tasks go into sandboxes too: a checkpoint taken in one refers to its
        // network namespace as external, and CRIU needs one to put the process in.
        let pooled = sandbox_uts.is_some();
        // A task from a template is restored by Start too.
        if checkpoint.is_none() && !restore {
            let res = self.launch(&req.id, &p, &config, |console_socket, stdio| {
                Request::Create {
                    root: root.clone(),
                    id: req.id.clone(),
                    bundle: bundle.clone(),
                    console_socket,
                    stdio,
                    systemd: config.systemd_cgroup,
                    no_pivot: config.no_pivot_root,
                    sandbox_uts: sandbox_uts.clone(),
                }
            });
            match res {
                Ok((Some(pid), master)) => {
                    p.master = master;
                    p.pid = pid;
                }
                other => {
                    // Undo everything the failed create may have done, in reverse: the
                    // container (a worker that died or timed out half-way leaves its state
                    // and cgroups), the stdin copier, the rootfs, the sandbox.
                    let undo = Request::Delete {
                        root: root.clone(),
                        id: req.id.clone(),
                        force: true,
                        bundle: Some(bundle.clone()),
                    };
                    let exists = matches!(&other, Err(ttrpc::Error::RpcStatus(st))
                        if st.code() == Code::ALREADY_EXISTS);
                    if !exists {
                        if let Err(e) = self.call(&undo, &[]) {
                            log::warn!("{}: cleaning up after a failed create: {e}", req.id);
                        }
                    }
                    crate::console::release_stdin(&p.stdin);
                    if mounted {
                        crate::rootfs::unmount_bundle(&bundle);
                    }
                    if pooled {
                        self.release_sandbox(&req.id);
                    }
                    return Err(match other {
                        Err(e) => e,
                        Ok(_) => err(Code::INTERNAL, "create returned no pid"),
                    });
                }
            }
        }
        let pid = p.pid;
        {
            let mut task = Task {
                bundle: bundle.clone(),
                root,
                config,
                criu,
                rootfs_mounted: mounted,
                checkpoint,
                pooled,
                ready: annotations.ready.clone(),
                template: plan.map(|plan| TemplateTask {
                    restore,
                    build: plan.build,
                    plan: Some(plan),
                    restored: None,
                    sandbox_uts: sandbox_uts.clone(),
                    spare_source,
                }),
                ..Default::default()
            };
            task.procs.insert(String::new(), p);
            // Claims the init's exit if the reaper saw it already.
            self.tasks.insert(&req.id, task).map_err(task_err)?;
        }
        if pid != 0 {
            self.watch_oom(&req.id);
        }
        Ok(self.created(&req, pid))
    }

    /// Publishes TaskCreate for a created task; the answer to containerd.
    fn created(&self, req: &api::CreateTaskRequest, pid: i32) -> api::CreateTaskResponse {
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid: api_pid(pid),
            ..Default::default()
        };
        self.publish(ev.topic(), Box::new(ev));
        api::CreateTaskResponse {
            pid: api_pid(pid),
            ..Default::default()
        }
    }

    pub fn start(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let (root, config) = self.task_root(&req.id)?;
        let p = self.with_proc(&req.id, &req.exec_id, |_, p| p.clone())?;
        // Exits seen from here on are published after TaskStart.
        self.tasks
            .starting(&req.id, &req.exec_id)
            .map_err(task_err)?;
        let (pid, master) = match self.launch_started(&req, root, &config, &p) {
            Ok(x) => x,
            Err(e) => {
                if let Some(exit) = self.tasks.start_failed(&req.id, &req.exec_id) {
                    self.exit_sink()
                        .publish_exit(&req.id, &req.exec_id, p.pid, exit);
                }
                return Err(e);
            }
        };
        self.with_proc(&req.id, &req.exec_id, |_, p| p.master = master)?;
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid: api_pid(pid),
                ..Default::default()
            };
            self.publish(ev.topic(), Box::new(ev));
        } else {
            let ev = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: api_pid(pid),
                ..Default::default()
            };
            self.publish(ev.topic(), Box::new(ev));
        }
        if let Some(exit) = self.tasks.started(&req.id, &req.exec_id, pid) {
            self.exit_sink()
                .publish_exit(&req.id, &req.exec_id, pid, exit);
        }
        if req.exec_id.is_empty() && self.wait_ready(&req.id, pid, &config) {
            self.build_template(&req.id, &config);
        }
        Ok(api::StartResponse {
            pid: api_pid(pid),
            ..Default::default()
        })
    }

    /// With `io.trenv.ready`, returns once the started init is initialised — or has exited,
    /// or `[timeouts] ready_secs` ran out: the task runs either way, so Start succeeds and
    /// the reason is logged. Only this request waits; the shim serves others meanwhile.
    /// Whether the init became ready (false without `io.trenv.ready`).
    fn wait_ready(&self, id: &str, pid: i32, config: &ShimConfig) -> bool {
        let Ok((Some(ready), restored)) = self.with_proc(id, "", |t, _| {
            let restored = t.template.as_ref().is_some_and(|tt| tt.restored.is_some());
            (t.ready.clone(), restored)
        }) else {
            return false;
        };
        // A template is taken once its instance is ready, so an instance restored from one
        // is ready when it runs (a restored listening socket queues connections at once).
        if restored {
            return false;
        }
        let timeout = std::time::Duration::from_secs(config.timeouts.ready_secs.max(1));
        match ready.wait(pid, timeout) {
            Ok(took) => {
                log::info!("{id}: ready ({ready:?}) after {took:?}");
                true
            }
            Err(e) => {
                log::warn!("{id}: Start returns without {ready:?}: {e}");
                false
            }
        }
    }

    /// Runs the init (start or restore) or an exec; its pid and terminal master.
    fn launch_started(
        &self,
        req: &api::StartRequest,
        root: PathBuf,
        config: &ShimConfig,
        p: &Proc,
    ) -> TtrpcResult<(i32, Option<Arc<std::fs::File>>)> {
        let launched = if req.exec_id.is_empty() {
            let (bundle, checkpoint, template, spare) = self.with_proc(&req.id, "", |t, _| {
                (
                    t.bundle.clone(),
                    t.checkpoint.clone(),
                    t.template.clone(),
                    t.spare.is_some(),
                )
            })?;
            if spare {
                return Ok((self.start_spare(&req.id, p.pid)?, None));
            }
            if let Some(tt) = template.filter(|t| t.restore && checkpoint.is_none()) {
                return self.start_from_template(&req.id, root, config, p, tt);
            }
            match checkpoint {
                Some(image_path) => {
                    let criu_opts = self.task_criu(&req.id)?;
                    let (pid, master) =
                        self.launch(&req.id, p, config, |console_socket, stdio| {
                            Request::Restore {
                                root: root.clone(),
                                id: req.id.clone(),
                                bundle,
                                image_path,
                                work_path: config.criu_work_path.clone(),
                                criu: config.criu_path.clone(),
                                console_socket,
                                stdio,
                                systemd: config.systemd_cgroup,
                                criu_opts,
                            }
                        })?;
                    let pid = pid.ok_or_else(|| err(Code::INTERNAL, "restore returned no pid"))?;
                    self.with_proc(&req.id, "", |t, _| t.checkpoint = None)?;
                    self.watch_oom(&req.id);
                    (pid, master)
                }
                None => {
                    self.call(
                        &Request::Start {
                            root,
                            id: req.id.clone(),
                        },
                        &[],
                    )?;
                    (p.pid, p.master.clone())
                }
            }
        } else {
            let spec = p
                .spec
                .clone()
                .ok_or_else(|| err(Code::INTERNAL, "exec has no process spec"))?;
            let res = self.launch(&req.id, p, config, |console_socket, stdio| Request::Exec {
                root,
                id: req.id.clone(),
                process: spec.clone(),
                console_socket,
                stdio,
            });
            let _ = std::fs::remove_file(&spec);
            let (pid, master) = res?;
            (
                pid.ok_or_else(|| err(Code::INTERNAL, "exec returned no pid"))?,
                master,
            )
        };
        Ok(launched)
    }

    pub fn exec(&self, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        let bundle = self.with_proc(&req.id, "", |t, _| t.bundle.clone())?;
        if self.with_proc(&req.id, &req.exec_id, |_, _| ()).is_ok() {
            return Err(task_err(TaskError::ExecExists(req.exec_id.clone())));
        }
        let path = bundle.join(format!("exec-{}.json", req.exec_id));
        std::fs::write(&path, &spec.value)
            .map_err(|e| err(Code::INTERNAL, format!("writing {path:?}: {e}")))?;
        let p = Proc {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            spec: Some(path.clone()),
            ..Default::default()
        };
        if let Err(e) = self.tasks.insert_exec(&req.id, &req.exec_id, p) {
            let _ = std::fs::remove_file(&path);
            return Err(task_err(e));
        }
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(ev.topic(), Box::new(ev));
        Ok(api::Empty::new())
    }

    pub fn state(&self, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let (p, bundle, paused) = self.with_proc(&req.id, &req.exec_id, |t, p| {
            (p.clone(), t.bundle.clone(), t.paused)
        })?;
        let status = match p.status(paused) {
            ProcStatus::Stopped => Status::STOPPED,
            ProcStatus::Paused => Status::PAUSED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Created => Status::CREATED,
        };
        let mut r = api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: bundle.to_string_lossy().into_owned(),
            pid: api_pid(p.pid),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        r.status = status.into();
        if let Some((code, at)) = p.exit {
            r.exit_status = code;
            r.exited_at = Some(at).into();
        }
        Ok(r)
    }

    pub fn wait(&self, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (code, at) = self.tasks.wait(&req.id, &req.exec_id).map_err(task_err)?;
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: Some(at).into(),
            ..Default::default()
        })
    }

    pub fn kill(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let p = self.with_proc(&req.id, &req.exec_id, |_, p| p.clone())?;
        if p.exit.is_some() && !req.all {
            return Err(err(Code::NOT_FOUND, "process already finished"));
        }
        if req.exec_id.is_empty() {
            let (root, _) = self.task_root(&req.id)?;
            self.call(
                &Request::Kill {
                    root,
                    id: req.id.clone(),
                    signal: req.signal,
                    all: req.all,
                },
                &[],
            )?;
        } else {
            let sig = i32::try_from(req.signal)
                .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))
                .and_then(|s| {
                    nix::sys::signal::Signal::try_from(s)
                        .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))
                })
                .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
                .map_err(|e| err(Code::NOT_FOUND, format!("process already finished: {e}")))?;
        }
        Ok(api::Empty::new())
    }

    pub fn pids(&self, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = self
            .cgroup(&req.id)?
            .get_all_pids()
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|p| containerd_shim::protos::api::ProcessInfo {
                    pid: api_pid(p.as_raw()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    pub fn stats(&self, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let stats = self
            .cgroup(&req.id)?
            .stats()
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        let any = containerd_shim::util::convert_to_any(crate::metrics::for_host(&stats))
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    pub fn update(&self, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let value = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "update without resources"))?;
        let resources: libcontainer::oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&value)
                .map_err(|e| err(Code::INVALID_ARGUMENT, format!("invalid resources: {e}")))?;
        self.cgroup(&req.id)?
            .apply(&libcgroups::common::ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| err(Code::INTERNAL, format!("updating resources: {e}")))?;
        Ok(api::Empty::new())
    }

    pub fn pause(&self, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let (root, _) = self.task_root(&req.id)?;
        self.call(
            &Request::Pause {
                root,
                id: req.id.clone(),
            },
            &[],
        )?;
        self.with_proc(&req.id, "", |t, _| t.paused = true)?;
        let ev = TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish(ev.topic(), Box::new(ev));
        Ok(api::Empty::new())
    }

    pub fn resume(&self, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let (root, _) = self.task_root(&req.id)?;
        self.call(
            &Request::Resume {
                root,
                id: req.id.clone(),
            },
            &[],
        )?;
        self.with_proc(&req.id, "", |t, _| t.paused = false)?;
        let ev = TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish(ev.topic(), Box::new(ev));
        Ok(api::Empty::new())
    }

    pub fn delete(&self, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let p = self.with_proc(&req.id, &req.exec_id, |_, p| p.clone())?;
        crate::console::release_stdin(&p.stdin);
        if !req.exec_id.is_empty() {
            if p.started && p.exit.is_none() {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is running", req.exec_id),
                ));
            }
            self.tasks.remove_exec(&req.id, &req.exec_id, now());
            if let Some(spec) = p.spec {
                let _ = std::fs::remove_file(spec);
            }
        } else {
            let (root, _) = self.task_root(&req.id)?;
            let exited = p.exit.is_some();
            // A spare never started is frozen, and cgroup v1's freezer holds even SIGKILL.
            let frozen_spare = self.with_proc(&req.id, "", |t, _| t.spare.is_some())? && !p.started;
            if frozen_spare && !exited {
                if let Err(e) = self.thaw_spare(&req.id) {
                    log::warn!("{}: thawing before the delete: {e}", req.id);
                }
            }
            if !(exited && crate::teardown::delete_stopped(&root.join(&req.id))) {
                let bundle = self.with_proc(&req.id, "", |t, _| t.bundle.clone())?;
                self.call(
                    &Request::Delete {
                        root,
                        id: req.id.clone(),
                        force: true,
                        bundle: Some(bundle),
                    },
                    &[],
                )?;
            }
            if let Some(t) = &self.templates {
                t.deleted(&req.id);
            }
            // Waits on any of its processes return now.
            if let Some(t) = self.tasks.remove(&req.id, now()) {
                if t.rootfs_mounted {
                    crate::rootfs::unmount_bundle(&t.bundle);
                }
                if let Some(dir) = &t.spare {
                    crate::spares::remove_dir(dir);
                }
                if t.pooled {
                    self.release_sandbox(&req.id);
                }
            }
            let (code, at) = p.exit.clone().unwrap_or((0, now()));
            let ev = TaskDelete {
                container_id: req.id.clone(),
                pid: api_pid(p.pid),
                exit_status: code,
                exited_at: Some(at).into(),
                ..Default::default()
            };
            self.publish(ev.topic(), Box::new(ev));
        }
        let (code, at) = p.exit.unwrap_or((0, now()));
        Ok(api::DeleteResponse {
            pid: api_pid(p.pid),
            exit_status: code,
            exited_at: Some(at).into(),
            ..Default::default()
        })
    }

    pub fn checkpoint(&self, req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        let (root, config) = self.task_root(&req.id)?;
        let restored = self.with_proc(&req.id, "", |t, _| {
            t.template.as_ref().and_then(|tt| tt.restored.clone())
        })?;
        if let Some(name) = restored {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "task {} was restored from template {name}: its memory maps the template's \
                     pool, which CRIU cannot dump; checkpoint an instance started cold \
                     (io.trenv.template=off)",
                    req.id
                ),
            ));
        }
        let wanted = self.task_criu(&req.id)?;
        let opts = crate::checkpoint_options::decode(&req, &config, &wanted)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let done = self.call(
            &Request::Checkpoint {
                root,
                id: req.id.clone(),
                opts,
            },
            &[],
        );
        if let Err(e) = done {
            // A dump freezes the container first; one whose worker died or timed out
            // never thawed it.
            let paused = self.with_proc(&req.id, "", |t, _| t.paused).unwrap_or(true);
            if !paused {
                if let Err(t) = self.cgroup(&req.id).and_then(|m| {
                    m.freeze(libcgroups::common::FreezerState::Thawed)
                        .map_err(|e| err(Code::INTERNAL, e.to_string()))
                }) {
                    log::warn!("{}: thawing after a failed checkpoint: {t}", req.id);
                }
            }
            return Err(e);
        }
        let ev = containerd_shim::protos::events::task::TaskCheckpointed {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish(ev.topic(), Box::new(ev));
        Ok(api::Empty::new())
    }

    pub fn resize_pty(&self, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let master = self
            .with_proc(&req.id, &req.exec_id, |_, p| p.master.clone())?
            .ok_or_else(|| err(Code::FAILED_PRECONDITION, "process has no terminal"))?;
        crate::console::resize(&master, req.width, req.height)
            .map_err(|e| err(Code::INTERNAL, format!("resizing terminal: {e}")))?;
        Ok(api::Empty::new())
    }

    /// The process reads containerd's stdin FIFO itself (or through the terminal copier), so
    /// it sees EOF as soon as containerd closes its end; nothing of the shim holds it open.
    pub fn close_io(&self, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        self.with_proc(&req.id, &req.exec_id, |_, _| ())?;
        Ok(api::Empty::new())
    }

    pub fn shutdown(&self, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let empty = self.tasks.is_empty();
        // The shim of a pool outlives its tasks: it keeps the sandboxes warm.
        if empty && self.pool.as_ref().is_none_or(|p| p.may_exit()) {
            self.lifetime.retire();
        }
        Ok(api::Empty::new())
    }
}

/// ttrpc's view of the service: every call goes to the method of the same name.
impl<B: Backend, E: Events> containerd_shim::Task for Service<B, E> {
    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Service::connect(self, req)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        Service::create(self, req)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        Service::start(self, req)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Service::exec(self, req)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Service::state(self, req)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        Service::wait(self, req)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        Service::kill(self, req)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Service::pids(self, req)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Service::stats(self, req)
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Service::update(self, req)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Service::pause(self, req)
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Service::resume(self, req)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Service::delete(self, req)
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Service::checkpoint(self, req)
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        Service::resize_pty(self, req)
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        Service::close_io(self, req)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        Service::shutdown(self, req)
    }
}

#[cfg(test)]
mod tests;
