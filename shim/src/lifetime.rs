//! When the shim ends. A shim without a pool ends with its last task; a pool shim outlives
//! its tasks (it keeps sandboxes warm) and ends when its pool is drained, or when containerd
//! has been gone for the pool's orphan grace period. Retiring gives the socket path up first,
//! so new tasks start a new shim instead of reaching one that is going away.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::ExitSignal;

use crate::pool::Pool;
use crate::task::Tasks;

/// How long a retiring shim still accepts requests on connections made before its socket
/// was removed (containerd connects right after `shim start` returned the address).
const RETIRE_GRACE: Duration = Duration::from_millis(200);

/// What decides the shim's end: its tasks, its pool and its exit signal.
#[derive(Clone)]
pub struct Lifetime {
    tasks: Arc<Tasks>,
    exit: Arc<ExitSignal>,
    pool: Option<Arc<Pool>>,
    /// This shim's ttrpc socket address (`unix://...`).
    socket: String,
}

impl Lifetime {
    pub fn new(
        tasks: Arc<Tasks>,
        exit: Arc<ExitSignal>,
        pool: Option<Arc<Pool>>,
        socket: &str,
    ) -> Self {
        let l = Self {
            tasks,
            exit,
            pool,
            socket: socket.to_string(),
        };
        if let Some(pool) = &l.pool {
            // A drained pool ends the shim once no task is left.
            let me = l.clone();
            pool.set_on_empty(Box::new(move || me.retire()));
        }
        l
    }

    /// No task left, and no pool that keeps the shim.
    fn idle(&self) -> bool {
        self.tasks.is_empty() && self.pool.as_ref().is_none_or(|p| p.may_exit())
    }

    /// Ends the shim (in the background) if it has nothing to do; a task that arrived
    /// through a connection made just before keeps it alive until that task ends.
    pub fn retire(&self) {
        if !self.idle() {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || {
            // A task handed to this shim by `shim start` is on its way: stay, and check
            // again when the hold has run out.
            while let Some(p) = &me.pool {
                if p.begin_retire() {
                    break;
                }
                std::thread::sleep(RETIRE_GRACE);
                if !me.idle() {
                    return;
                }
            }
            // The socket path is free for the next shim from now on; the `address` file
            // in our working directory goes too, or containerd-shim (and `wait`) would
            // remove the next shim's socket when this one exits.
            let _ = std::fs::remove_file("address");
            if let Some(path) = me.socket.strip_prefix("unix://") {
                let _ = std::fs::remove_file(path);
            }
            std::thread::sleep(RETIRE_GRACE);
            if me.idle() {
                me.exit.signal();
            }
        });
    }

    /// A pool shim outlives containerd by design (it keeps sandboxes warm across a
    /// containerd restart), but not for ever: once containerd (`address`) has been
    /// unreachable for `pool.orphan_grace_secs` while no task was left, the pool is
    /// drained, which ends the shim.
    pub fn watch_containerd(&self, address: &str) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let grace = pool.orphan_grace();
        if grace.is_zero() || address.is_empty() {
            return;
        }
        let path = PathBuf::from(address.strip_prefix("unix://").unwrap_or(address));
        let tasks = self.tasks.clone();
        let every = (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let spawned = std::thread::Builder::new()
            .name("containerd-watch".into())
            .spawn(move || {
                let mut orphaned_since: Option<Instant> = None;
                loop {
                    std::thread::sleep(every);
                    let idle = tasks.is_empty();
                    if !idle || std::os::unix::net::UnixStream::connect(&path).is_ok() {
                        orphaned_since = None;
                        continue;
                    }
                    let since = *orphaned_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= grace {
                        log::warn!(
                            "containerd ({}) unreachable for {}s and no task left: draining the pool",
                            path.display(),
                            grace.as_secs()
                        );
                        pool.drain();
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("not watching containerd: {e}");
        }
    }
}
