//! `containerd-shim-trenv-v2`: the containerd task shim for trenv (`io.containerd.trenv.v2`).

mod annotations;
mod backend;
mod checkpoint_options;
mod config;
mod console;
mod lifetime;
mod metrics;
mod oom;
mod placement;
mod pool;
mod readiness;
mod rootfs;
mod service;
mod spares;
mod stdio;
mod task;
mod teardown;
mod templates;
mod zygote;

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigHandler, Signal};

use containerd_shim::{api, publisher::RemotePublisher, Config, ExitSignal, Flags, StartOpts};

/// Runtime type containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.trenv.v2";

struct Shim {
    namespace: String,
    id: String,
    /// The ttrpc socket this shim serves (`unix:///run/containerd/s/...`).
    socket: String,
    /// containerd's own socket.
    containerd: String,
    exit: Arc<ExitSignal>,
    /// Shared with the task service; taken back at exit to end and reap the zygote.
    zygote: service::SharedZygote,
    /// A second zygote for the pool, so sandbox work never queues container starts.
    pool_zygote: service::SharedZygote,
    pool: std::sync::Mutex<Option<Arc<pool::Pool>>>,
}

/// One shim serves every trenv task of a containerd namespace and owns its sandbox pool.
const GROUPING: &str = "trenv-pool";

/// Starts a zygote's process ahead of the first request; a failure is logged and retried
/// by that request.
fn prestart(z: &zygote::Zygote) {
    if let Err(e) = z.ensure_running() {
        log::error!("{e}");
    }
}

/// containerd-shim catches SIGPIPE (and SIGCHLD) through a self-pipe whose reading end the
/// `start` action closes before the handlers go. A signal in that window (a child exiting)
/// makes the handler write to the closed pipe, which raises SIGPIPE, whose handler writes
/// again: `shim start` spins for ever and containerd's create hangs. In a serving shim,
/// once containerd is gone (restarting), each log write to the log FIFO raises SIGPIPE,
/// whose log line raises the next. Ignored, a write to a closed pipe just fails with EPIPE.
/// Children get the default back (std resets it before exec).
fn ignore_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigIgn) } {
        log::warn!("ignoring SIGPIPE: {e}");
    }
}

fn pool_config(namespace: &str) -> Option<config::PoolConfig> {
    config::ShimConfig::from_default_file()
        .ok()
        .map(|c| c.pool)
        .filter(|p| p.serves(namespace))
}

fn pool_enabled(namespace: &str) -> bool {
    pool_config(namespace).is_some()
}

/// Asks the namespace's running shim, through its pool's control socket, to stay for the
/// task about to be handed to it. False when there is no such shim or it is retiring.
fn hold_pool_shim(namespace: &str) -> bool {
    use std::io::{BufRead, Write};
    let Some(cfg) = pool_config(namespace) else {
        return false;
    };
    let sock = cfg.state_dir.join(namespace).join("control.sock");
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if conn.write_all(b"hold\n").is_err() {
        return false;
    }
    let mut line = String::new();
    let _ = std::io::BufReader::new(&conn).read_line(&mut line);
    serde_json::from_str::<serde_json::Value>(line.trim())
        .map(|v| v["held"] == true)
        .unwrap_or(false)
}

/// The pool of this shim, unless it is disabled or cannot work (logged; tasks then run
/// without sandboxes).
fn make_pool(namespace: &str, zygote: service::SharedZygote) -> Option<Arc<pool::Pool>> {
    let (cfg, timeouts) = match config::ShimConfig::from_default_file() {
        Ok(c) => (c.pool, c.timeouts),
        Err(e) => {
            log::error!("sandbox pool disabled: {e}");
            return None;
        }
    };
    if !cfg.serves(namespace) {
        return None;
    }
    let ops = pool::Pool::network_of(&cfg).and_then(|network| {
        let exe = std::env::current_exe().map_err(|e| format!("shim executable: {e}"))?;
        Ok(pool::ZygoteOps {
            zygote,
            nice: cfg.background_nice,
            deadline: Duration::from_secs(timeouts.sandbox_secs.max(1)),
            exe,
            network,
            cgroup_parent: pool::Pool::cgroup_parent_of(namespace, &cfg),
            store: pool::Pool::store_of(namespace, &cfg),
            cgroup_view: cfg.cgroup_view,
        })
    });
    match ops.and_then(|ops| pool::Pool::new(namespace, cfg.clone(), Box::new(ops))) {
        Ok(p) => Some(p),
        Err(e) => {
            log::error!("sandbox pool disabled: {e}");
            None
        }
    }
}

impl containerd_shim::Shim for Shim {
    type T = service::Service<zygote::Zygote, backend::Publisher>;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ignore_sigpipe();
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
            containerd: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
            zygote: Arc::new(zygote::Zygote::new("task")),
            pool_zygote: Arc::new(zygote::Zygote::new("pool")),
            pool: std::sync::Mutex::new(None),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, GROUPING);
        // The namespace's shim is already running: serve this task too.
        let path = address.strip_prefix("unix://").unwrap_or(&address);
        if hold_pool_shim(&opts.namespace) {
            containerd_shim::util::write_address(&address)?;
            return Ok(address);
        }
        match std::os::unix::net::UnixStream::connect(path) {
            // A shim without a pool (none is held above) serves this task too.
            Ok(_) if !pool_enabled(&opts.namespace) => {
                containerd_shim::util::write_address(&address)?;
                return Ok(address);
            }
            Ok(_) => {}
            // Left by a shim that was killed. containerd-shim would probe it 200 times,
            // leaking a descriptor per probe in the new shim.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(path);
            }
            Err(_) => {}
        }
        let (_pid, address) = containerd_shim::spawn(opts, GROUPING, Vec::new())?;
        // containerd finds a running shim again after its own restart through this file
        // in the bundle.
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// Cleans up after a shim that died: the container and its rootfs mount.
    fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        let cwd = std::env::current_dir().unwrap_or_default();
        let dir = config::ShimConfig::load_saved(&cwd)
            .state_root(&self.namespace)
            .join(&self.id);
        if dir.join("state.json").exists() {
            match libcontainer::container::Container::load(dir) {
                Ok(mut c) => {
                    if let Err(e) = trenv_oci::lifecycle::delete(&mut c, true) {
                        log::warn!("deleting container {}: {e}", self.id);
                    }
                }
                Err(e) => log::warn!("loading container {}: {e}", self.id),
            }
        }
        let _ = nix::mount::umount2(&cwd.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        let mut resp = api::DeleteResponse::new();
        resp.exit_status = 128 + libc::SIGKILL as u32;
        Ok(resp)
    }

    fn wait(&mut self) {
        // Only now that the socket is ours: a shim that lost the race for it to another one
        // started at the same moment exits without leaving zygotes behind.
        prestart(&self.zygote);
        let pool = self.pool.lock().ok().and_then(|p| p.clone());
        if let Some(p) = &pool {
            prestart(&self.pool_zygote);
            p.start();
        }
        self.exit.wait();
        if let Some(p) = &pool {
            p.stop();
        }
        // The last events (a TaskDelete, a TaskExit) are still queued.
        if !backend::flush_events(Duration::from_secs(5)) {
            log::warn!("exiting with events not sent to containerd");
        }
        // Reaped here rather than left to init, so no zombie outlives the shim.
        for z in [&self.zygote, &self.pool_zygote] {
            z.shutdown();
        }
        // containerd-shim removes the socket only if it can still read the address file in
        // the bundle, which containerd may already have deleted; a stale socket would make
        // the next shim for the same id wait for it. Remove it here.
        // A retired shim has already given its socket path up (and removed `address`).
        let retired = pool.is_some() && !std::path::Path::new("address").exists();
        if let Some(path) = self.socket.strip_prefix("unix://").filter(|_| !retired) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let pool = make_pool(&self.namespace, self.pool_zygote.clone());
        if let Some(p) = &pool {
            // The first task's bundle, our working directory so far, goes away with it;
            // containerd-shim reads the `address` file from the working directory at exit.
            let moved = std::env::set_current_dir(p.dir())
                .and_then(|_| std::fs::write("address", &self.socket));
            if let Err(e) = moved {
                log::warn!("moving to {}: {e}", p.dir().display());
            }
        }
        if let Ok(mut slot) = self.pool.lock() {
            slot.clone_from(&pool);
        }
        let address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        service::Service::new(
            &self.namespace,
            self.zygote.clone(),
            backend::Publisher::new(publisher, address),
            self.exit.clone(),
            pool,
            &self.socket,
            &self.containerd,
        )
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some(trenv_sandbox::holder::HOLDER_ARG) => trenv_sandbox::holder::run(),
        Some(zygote::ZYGOTE_ARG) => zygote::serve(),
        _ => {}
    }
    containerd_shim::run::<Shim>(RUNTIME_ID, None);
}
