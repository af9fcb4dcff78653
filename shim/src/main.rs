//! `containerd-shim-trenv-v2`: the containerd task shim for trenv (`io.containerd.trenv.v2`).

mod annotations;
mod config;
mod console;
mod metrics;
mod oom;
mod service;
mod stdio;
mod teardown;
mod zygote;

use std::sync::Arc;

use nix::sys::signal::{SigHandler, Signal};

use containerd_shim::{api, publisher::RemotePublisher, Config, ExitSignal, Flags, StartOpts};

/// Runtime type containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.trenv.v2";

struct Shim {
    namespace: String,
    id: String,
    /// The ttrpc socket this shim serves (`unix:///run/containerd/s/...`).
    socket: String,
    exit: Arc<ExitSignal>,
    /// Shared with the task service; taken back at exit to end and reap the zygote.
    zygote: service::SharedZygote,
}

impl containerd_shim::Shim for Shim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        // The serving shim forks its zygote now, before the ttrpc server starts threads.
        let zygote = if args.action.is_empty() {
            match zygote::Zygote::spawn() {
                Ok(z) => Some(z),
                Err(e) => {
                    log::error!("starting the zygote: {e}");
                    None
                }
            }
        } else {
            None
        };
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
            zygote: Arc::new(std::sync::Mutex::new(zygote)),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
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
                    if let Err(e) = c.delete(true) {
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
        self.exit.wait();
        // Reaped here rather than left to init, so no zombie outlives the shim.
        if let Some(z) = self.zygote.lock().ok().and_then(|mut z| z.take()) {
            z.shutdown();
        }
        // containerd-shim removes the socket only if it can still read the address file in
        // the bundle, which containerd may already have deleted; a stale socket would make
        // the next shim for the same id wait for it. Remove it here.
        if let Some(path) = self.socket.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        // containerd-shim catches SIGPIPE and logs every one at debug level. Once containerd
        // is gone (restarting), each log write to the shim's log FIFO raises SIGPIPE, whose
        // log line raises the next: a busy loop until containerd returns. Ignored, a write
        // to a closed pipe just fails with EPIPE.
        // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
        if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigIgn) } {
            log::warn!("ignoring SIGPIPE: {e}");
        }
        service::Service::new(
            &self.namespace,
            self.zygote.clone(),
            publisher,
            self.exit.clone(),
        )
    }
}

fn main() {
    containerd_shim::run::<Shim>(RUNTIME_ID, None);
}
