//! Repurposable sandboxes: a holder process keeping network, IPC and UTS namespaces, a
//! cgroup and a CNI attachment alive between function instances.
//!
//! This module holds one sandbox's life cycle (create, purge, destroy) and its record on
//! disk; the pool policy lives in the shim. Records are JSON files under
//! `<pool root>/<containerd namespace>/sandboxes/`, read by `trenv sandbox`.

pub mod cgroup;
pub mod cgroup_view;
pub mod cni;
pub mod holder;
pub mod purge;
pub mod sockets;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use cni::{Attachment, Network};
use holder::Holder;

/// Default root of pool state; `<root>/<namespace>/` belongs to one shim.
pub const DEFAULT_POOL_ROOT: &str = "/run/trenv/pool";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Holder(#[from] holder::HolderError),
    #[error(transparent)]
    Cni(#[from] cni::CniError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Purge(#[from] purge::PurgeError),
    #[error(transparent)]
    CgroupView(#[from] cgroup_view::ViewError),
    #[error("sandbox record {path}: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error("pool {path} is owned by a running shim")]
    Owned { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// In the pool, purged, ready to be handed out.
    Idle,
    /// Serving a container.
    InUse,
    /// Being purged after its container was deleted.
    Purging,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Idle => "idle",
            State::InUse => "in-use",
            State::Purging => "purging",
        })
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// One sandbox, as recorded on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub state: State,
    pub holder: Holder,
    /// Cgroup path (relative to each hierarchy's root) instances run in.
    pub cgroup: String,
    pub network: String,
    pub attachment: Attachment,
    /// Unix seconds.
    pub created: u64,
    pub last_used: u64,
    /// Function key of the instance it serves or served last.
    pub function: Option<String>,
    /// Container it serves (in use) or served last.
    pub container: Option<String>,
    /// Instances it has served.
    pub served: u64,
    /// Its prebuilt `/sys/fs/cgroup` for instances (cgroup v1 hosts; see `cgroup_view`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_view: Option<PathBuf>,
    /// Memory template the instance it serves (or served last) was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

impl Sandbox {
    /// Creates a sandbox: holder, cgroup, network. Undoes what it did on failure.
    pub fn create(
        id: &str,
        holder_exe: &Path,
        cgroup_parent: &str,
        network: &Network,
    ) -> Result<Self, SandboxError> {
        let holder = Holder::spawn(holder_exe)?;
        let cgroup = format!("{}/{id}", cgroup_parent.trim_end_matches('/'));
        if let Err(e) = cgroup::create(&cgroup) {
            holder.kill();
            return Err(e.into());
        }
        let attachment = match network.add(id, Path::new(&holder.ns_path("net"))) {
            Ok(a) => a,
            Err(e) => {
                holder.kill();
                let _ = cgroup::remove(&cgroup);
                return Err(e.into());
            }
        };
        let now = unix_now();
        Ok(Self {
            id: id.to_string(),
            state: State::Idle,
            holder,
            cgroup,
            network: network.name.clone(),
            attachment,
            created: now,
            last_used: now,
            function: None,
            container: None,
            served: 0,
            cgroup_view: None,
            template: None,
        })
    }

    /// Builds the sandbox's cgroup view at `dir`. Without one (an error, or a v2-only
    /// host) instances get the runtime's own cgroup mount, which works the same, slower.
    pub fn build_cgroup_view(&mut self, dir: &Path) -> Result<(), SandboxError> {
        self.cgroup_view = None;
        if cgroup_view::prepare(dir, &self.cgroup)? {
            self.cgroup_view = Some(dir.to_path_buf());
        }
        Ok(())
    }

    /// Replaces the cgroup with a fresh one (default limits, zero counters), once the
    /// processes of the last instance have left it, and rebuilds the view onto it.
    pub fn renew_cgroup(&mut self) -> Result<(), SandboxError> {
        let view = self.cgroup_view.take();
        if let Some(v) = &view {
            cgroup_view::remove(v);
        }
        cgroup::remove_when_empty(&self.cgroup, std::time::Duration::from_secs(1))?;
        cgroup::create(&self.cgroup)?;
        if let Some(v) = view {
            self.build_cgroup_view(&v)?;
        }
        Ok(())
    }

    /// Tears a sandbox down: its processes, network, holder and cgroup. Best effort and
    /// idempotent; returns the first error after trying every step.
    pub fn destroy(&self, network: &Network) -> Result<(), SandboxError> {
        let alive = self.holder.alive();
        purge::kill_all(&self.cgroup, self.holder.netns, self.holder.pid);
        // DEL while the namespace still exists removes the veth cleanly; without it the
        // plugins still release the address.
        let netns = if alive {
            self.holder.ns_path("net")
        } else {
            String::new()
        };
        let cni = network.del(&self.id, Path::new(&netns), Some(&self.attachment));
        self.holder.kill();
        // Its bind mounts would keep the cgroup directories busy.
        if let Some(v) = &self.cgroup_view {
            cgroup_view::remove(v);
        }
        // Whatever is still in any hierarchy's copy of the cgroup (or below it) is killed
        // again on every try: a process that was exiting, or one that another hierarchy's
        // move left behind, must not keep the cgroup for ever.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let cg = loop {
            match cgroup::remove(&self.cgroup) {
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!("sandbox {}: {e}; retrying", self.id);
                    purge::kill_all(&self.cgroup, self.holder.netns, self.holder.pid);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => break r,
            }
        };
        cni?;
        cg?;
        Ok(())
    }

    /// Whether a new instance may be placed in it: holder alive, nothing else running.
    pub fn check_empty(&self) -> Result<(), String> {
        if !self.holder.alive() {
            return Err(format!("holder {} is gone", self.holder.pid));
        }
        let procs = purge::processes_in_netns(self.holder.netns, self.holder.pid);
        if !procs.is_empty() {
            return Err(format!(
                "processes {procs:?} still in its network namespace"
            ));
        }
        let cg = cgroup::procs(&self.cgroup);
        if !cg.is_empty() {
            return Err(format!("processes {cg:?} still in its cgroup"));
        }
        let sockets = purge::open_sockets(self.holder.pid);
        if sockets > 0 {
            return Err(format!("{sockets} listening or bound sockets"));
        }
        Ok(())
    }
}

/// The records of one pool (`<root>/<namespace>`).
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn new(root: &Path, namespace: &str) -> Self {
        Self {
            dir: root.join(namespace),
        }
    }

    fn sandboxes(&self) -> PathBuf {
        self.dir.join("sandboxes")
    }

    fn record_err(path: &Path, reason: impl ToString) -> SandboxError {
        SandboxError::Record {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    /// Writes a record atomically (readers never see half a file).
    pub fn save(&self, sb: &Sandbox) -> Result<(), SandboxError> {
        let dir = self.sandboxes();
        std::fs::create_dir_all(&dir).map_err(|e| Self::record_err(&dir, e))?;
        let path = dir.join(format!("{}.json", sb.id));
        let tmp = dir.join(format!(".{}.json.tmp", sb.id));
        let json = serde_json::to_vec_pretty(sb).map_err(|e| Self::record_err(&path, e))?;
        std::fs::write(&tmp, json).map_err(|e| Self::record_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Self::record_err(&path, e))
    }

    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.sandboxes().join(format!("{id}.json")));
    }

    pub fn load(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let path = self.sandboxes().join(format!("{id}.json"));
        let bytes = std::fs::read(&path).map_err(|e| Self::record_err(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Self::record_err(&path, e))
    }

    /// All records, oldest first; unreadable ones are reported by name.
    pub fn list(&self) -> (Vec<Sandbox>, Vec<SandboxError>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.sandboxes()) else {
            return (ok, bad);
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) else {
                continue;
            };
            match self.load(id) {
                Ok(sb) => ok.push(sb),
                Err(err) => bad.push(err),
            }
        }
        ok.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        (ok, bad)
    }

    /// Takes the pool's ownership lock (`owner.lock`, flock), waiting up to `wait` for a
    /// shim that holds it. Whoever holds it may adopt or destroy the pool's sandboxes.
    pub fn lock_owner(&self, wait: std::time::Duration) -> Result<std::fs::File, SandboxError> {
        use std::os::fd::AsRawFd;
        let path = self.dir.join("owner.lock");
        std::fs::create_dir_all(&self.dir).map_err(|e| Self::record_err(&self.dir, e))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Self::record_err(&path, e))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(file);
            }
            if std::time::Instant::now() >= deadline {
                return Err(SandboxError::Owned { path });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Where a sandbox's cgroup view is built.
    pub fn cgroup_view_dir(&self, id: &str) -> PathBuf {
        self.views().join(id)
    }

    /// The directory of all cgroup views of this pool.
    pub fn views(&self) -> PathBuf {
        self.dir.join("cgroup-views")
    }

    /// Where the address of a container's sandbox is published for platforms.
    pub fn container_file(&self, container: &str) -> PathBuf {
        self.dir.join("containers").join(container)
    }
}
