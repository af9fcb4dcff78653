//! What the pool does to sandboxes, behind a trait: the pool's policy (which sandbox a
//! container gets, when one is kept, purged, evicted or replaced) is tested with a fake,
//! and the real operations run in the pool's own zygote.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use trenv_sandbox::cni::Network;
use trenv_sandbox::{self as sandbox, Sandbox, Store};

use crate::service::SharedZygote;
use crate::zygote::Request;

/// Whether a container start waits for a request, or it is the pool's background work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Waited,
    Background,
}

/// The operations the pool's policy needs.
pub trait SandboxOps: Send + Sync {
    /// Creates the sandbox `id`: holder, cgroup, network (and its cgroup view).
    fn create(&self, id: &str, urgency: Urgency) -> Result<Sandbox, String>;
    /// Tears a sandbox down, best effort.
    fn destroy(&self, sb: &Sandbox) -> Result<(), String>;
    /// Purges a released sandbox and verifies it; an error means it must be destroyed.
    fn purge(&self, sb: &mut Sandbox) -> Result<(), String>;
    /// Whether its holder still runs.
    fn alive(&self, sb: &Sandbox) -> bool;
    /// Whether a sandbox recorded by an earlier shim can be taken over as idle (made
    /// ready again if needed).
    fn adoptable(&self, sb: &mut Sandbox) -> bool;
    /// The network sandboxes are attached to.
    fn network(&self) -> &Network;
}

/// The real operations. Sandbox creation, purge and teardown run in the pool's zygote:
/// purging enters namespaces, and CNI plugins must be waited for by their parent, not by
/// the shim's reaper.
pub struct ZygoteOps {
    pub zygote: SharedZygote,
    /// Nice value of background requests (`pool.background_nice`).
    pub nice: i32,
    /// Deadline of each request (`timeouts.sandbox_secs`).
    pub deadline: Duration,
    /// The holder executable (this shim).
    pub exe: PathBuf,
    pub network: Network,
    /// `<cgroup_parent>/<namespace>`.
    pub cgroup_parent: String,
    pub store: Store,
    /// Build a cgroup view per sandbox (`pool.cgroup_view`).
    pub cgroup_view: bool,
}

impl ZygoteOps {
    fn call(&self, req: Request, urgency: Urgency) -> Result<Option<serde_json::Value>, String> {
        let req = match urgency {
            Urgency::Background if self.nice != 0 => Request::Background {
                nice: self.nice,
                request: Box::new(req),
            },
            _ => req,
        };
        self.zygote
            .call(&req, &[], self.deadline)
            .map(|a| a.data)
            .map_err(|e| e.to_string())
    }
}

impl SandboxOps for ZygoteOps {
    fn create(&self, id: &str, urgency: Urgency) -> Result<Sandbox, String> {
        let req = Request::CreateSandbox {
            id: id.to_string(),
            exe: self.exe.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            network: self.network.clone(),
        };
        let data = self.call(req, urgency)?;
        let mut sb: Sandbox =
            serde_json::from_value(data.unwrap_or_default()).map_err(|e| e.to_string())?;
        if self.cgroup_view {
            if let Err(e) = sb.build_cgroup_view(&self.store.cgroup_view_dir(id)) {
                log::warn!("sandbox {id}: {e}; its instances mount their own cgroups");
            }
        }
        Ok(sb)
    }

    fn destroy(&self, sb: &Sandbox) -> Result<(), String> {
        let req = Request::DestroySandbox {
            sandbox: Box::new(sb.clone()),
            network: self.network.clone(),
        };
        self.call(req, Urgency::Background).map(|_| ())
    }

    fn purge(&self, sb: &mut Sandbox) -> Result<(), String> {
        // A PID namespace dies with its init, but processes may still be exiting.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = sandbox::purge::kill_all(&sb.cgroup, sb.holder.netns, sb.holder.pid);
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("processes {left:?} do not die"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        sb.renew_cgroup().map_err(|e| e.to_string())?;
        let req = Request::PurgeSandbox { holder: sb.holder };
        self.call(req, Urgency::Background)?;
        sb.check_empty()
    }

    fn alive(&self, sb: &Sandbox) -> bool {
        sb.holder.alive()
    }

    fn adoptable(&self, sb: &mut Sandbox) -> bool {
        if sb.check_empty().is_err() {
            return false;
        }
        if let Some(v) = sb.cgroup_view.clone() {
            if !sandbox::cgroup_view::is_built(&v) {
                if let Err(e) = sb.build_cgroup_view(&v) {
                    log::warn!("sandbox {}: {e}", sb.id);
                }
            }
        }
        true
    }

    fn network(&self) -> &Network {
        &self.network
    }
}
