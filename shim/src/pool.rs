//! The sandbox pool of one containerd namespace, owned by its long-lived shim.
//!
//! Policy (as in the TrEnv prototype): a container gets (1) the most recently used idle
//! sandbox that last served the same function ("hit"), else (2) the least recently used
//! idle sandbox of any function ("repurpose"), else (3) a sandbox created on the spot
//! ("miss"). Released sandboxes are purged and verified by a background worker before they
//! are idle again; one that fails is destroyed. The worker also keeps `min_idle` sandboxes
//! ready, replaces sandboxes whose holder died, and enforces the node memory bound.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use trenv_sandbox::cni::Network;
use trenv_sandbox::{self as sandbox, holder::Holder, Sandbox, State, Store};

use crate::config::PoolConfig;
use crate::service::SharedZygote;
use crate::zygote::Request;

/// How a container obtained its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquisition {
    Hit,
    Repurpose,
    Miss,
}

impl Acquisition {
    fn label(self) -> &'static str {
        match self {
            Acquisition::Hit => "hit",
            Acquisition::Repurpose => "repurpose",
            Acquisition::Miss => "miss",
        }
    }
}

/// What a container asks of the pool.
pub struct Claim<'a> {
    pub container: &'a str,
    pub function: &'a str,
    /// Declared memory limit in bytes (0 = none).
    pub memory: u64,
    /// The container may change state the purge cannot reset (network admin rights):
    /// its sandbox is destroyed instead of reused.
    pub tainted: bool,
}

struct InUse {
    sandbox: Sandbox,
    memory: u64,
    tainted: bool,
}

#[derive(Default)]
struct Counters {
    acquisitions: HashMap<&'static str, u64>,
    purges: u64,
    purge_failures: u64,
    holders_lost: u64,
    created: u64,
    destroyed: u64,
    /// Acquisition latency histogram: counts per bucket upper bound, sum, count.
    latency_buckets: Vec<u64>,
    latency_sum: f64,
    latency_count: u64,
}

const LATENCY_BOUNDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Default)]
struct Inner {
    /// Least recently used at the front.
    idle: VecDeque<Sandbox>,
    in_use: HashMap<String, InUse>,
    /// Released, waiting for the worker to purge them.
    releasing: VecDeque<InUse>,
    /// Sandboxes being created or purged right now.
    busy: usize,
    draining: bool,
    adopted: bool,
    counters: Counters,
}

impl Inner {
    fn total(&self) -> usize {
        self.idle.len() + self.in_use.len() + self.releasing.len() + self.busy
    }

    fn memory_in_use(&self, cfg: &PoolConfig) -> u64 {
        let used: u64 = self.in_use.values().map(|u| u.memory).sum();
        used + (self.idle.len() as u64) * cfg.idle_cost_mib * MIB
    }

    fn over_memory(&self, cfg: &PoolConfig) -> bool {
        cfg.memory_limit_mib > 0 && self.memory_in_use(cfg) > cfg.memory_limit_mib * MIB
    }
}

const MIB: u64 = 1 << 20;

/// Runs the pool's operations in the pool's own zygote: purging enters namespaces, and
/// the CNI plugins must be waited for by their parent, not by the shim's reaper.
pub struct Ops {
    pub zygote: SharedZygote,
    /// Nice value of background requests (`pool.background_nice`).
    pub nice: i32,
    /// Deadline of each request (`timeouts.sandbox_secs`).
    pub deadline: Duration,
}

/// Whether a container start waits for a request, or it is the pool's background work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    Waited,
    Background,
}

impl Ops {
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

    fn create(
        &self,
        id: &str,
        exe: &Path,
        parent: &str,
        net: &Network,
        urgency: Urgency,
    ) -> Result<Sandbox, String> {
        let req = Request::CreateSandbox {
            id: id.to_string(),
            exe: exe.to_path_buf(),
            cgroup_parent: parent.to_string(),
            network: net.clone(),
        };
        let data = self.call(req, urgency)?;
        serde_json::from_value(data.unwrap_or_default()).map_err(|e| e.to_string())
    }

    fn destroy(&self, sb: &Sandbox, net: &Network) -> Result<(), String> {
        let req = Request::DestroySandbox {
            sandbox: Box::new(sb.clone()),
            network: net.clone(),
        };
        self.call(req, Urgency::Background).map(|_| ())
    }

    fn purge(&self, holder: &Holder) -> Result<(), String> {
        let req = Request::PurgeSandbox { holder: *holder };
        self.call(req, Urgency::Background).map(|_| ())
    }
}
/// Called whenever the pool became empty with nothing in use.
pub type OnEmpty = Box<dyn Fn() + Send + Sync>;

pub struct Pool {
    cfg: PoolConfig,
    namespace: String,
    store: Store,
    network: Network,
    exe: PathBuf,
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Signalled once sandboxes of an earlier shim are adopted.
    adopted: Condvar,
    ops: Ops,
    on_empty: Mutex<Option<OnEmpty>>,
    stop: AtomicBool,
    /// The ownership lock file, locked while this shim owns the pool.
    owner: Mutex<Option<std::fs::File>>,
    /// (retiring, held until): `shim start` holds the shim for the task it hands it, so
    /// the shim cannot retire between handing out its address and the task's Create.
    lease: Mutex<(bool, Instant)>,
}

/// How long a control client may take to send its command or read the answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a `hold` from `shim start` keeps the shim from retiring.
const HOLD: Duration = Duration::from_secs(2);

fn random_id() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("sb-{hex}")
}

impl Pool {
    /// A pool for `namespace`; `None` (with the reason logged) when it cannot work, e.g.
    /// a broken CNI config: containers then run without sandboxes rather than fail.
    pub fn new(namespace: &str, cfg: PoolConfig, ops: Ops) -> Result<Arc<Self>, String> {
        if !(0..=19).contains(&cfg.background_nice) {
            return Err(format!(
                "pool.background_nice is {}; it must be 0-19",
                cfg.background_nice
            ));
        }
        let bin = cfg.cni_bin_dir.clone();
        let network = match &cfg.cni_config {
            Some(p) => Network::load(p, &bin).map_err(|e| e.to_string())?,
            None => Network::builtin(&cfg.subnet, &bin),
        }
        .with_timeout(Duration::from_secs(cfg.cni_timeout_secs.max(1)));
        let exe = std::env::current_exe().map_err(|e| format!("shim executable: {e}"))?;
        let store = Store::new(&cfg.state_dir, namespace);
        std::fs::create_dir_all(&store.dir)
            .map_err(|e| format!("creating {}: {e}", store.dir.display()))?;
        Ok(Arc::new(Self {
            cfg,
            namespace: namespace.to_string(),
            store,
            network,
            exe,
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
            adopted: Condvar::new(),
            ops,
            on_empty: Mutex::new(None),
            stop: AtomicBool::new(false),
            owner: Mutex::new(None),
            lease: Mutex::new((false, Instant::now())),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.store.dir
    }

    pub fn set_on_empty(&self, f: OnEmpty) {
        if let Ok(mut g) = self.on_empty.lock() {
            *g = Some(f);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counts possibly stale, never unsafe.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the worker, which adopts sandboxes left by an earlier shim, serves the
    /// control socket and keeps the pool.
    pub fn start(self: &Arc<Self>) {
        let p = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("pool-worker".into())
            .spawn(move || p.worker())
        {
            log::error!("starting the pool worker: {e}");
        }
    }

    /// Once the pool is ours: the files a retiring shim may have removed with its state.
    fn publish_state(self: &Arc<Self>) {
        let saved = serde_json::to_vec_pretty(&self.network)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                std::fs::create_dir_all(&self.store.dir)?;
                std::fs::write(self.store.dir.join("network.json"), b)
            });
        if let Err(e) = saved {
            log::warn!("writing network.json: {e}");
        }
        let p = self.clone();
        let _ = std::fs::remove_file(self.control_path());
        match UnixListener::bind(self.control_path()) {
            Ok(l) => {
                let _ = std::thread::Builder::new()
                    .name("pool-control".into())
                    .spawn(move || p.serve_control(l));
            }
            Err(e) => log::error!("pool control socket: {e}"),
        }
    }

    fn control_path(&self) -> PathBuf {
        self.store.dir.join("control.sock")
    }

    /// Stops the background threads; sandboxes stay for the next shim to adopt. An empty
    /// pool leaves nothing behind: no state directory, no parent cgroups.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_all();
        let _ = std::fs::remove_file(self.control_path());
        let owner = self.owner.lock().map(|o| o.is_some()).unwrap_or(false);
        if owner && self.lock().total() == 0 && self.store.list().0.is_empty() {
            sandbox::cgroup::remove_parents(&self.cgroup_parent(), 2);
            // Never recurse into a mounted view (it binds live cgroup directories).
            sandbox::cgroup_view::remove_all(&self.store.views());
            let _ = std::fs::remove_dir_all(&self.store.dir);
        } else {
            self.write_metrics();
        }
    }

    fn cgroup_parent(&self) -> String {
        format!(
            "{}/{}",
            self.cfg.cgroup_parent.trim_end_matches('/'),
            self.namespace
        )
    }

    /// A sandbox for a container.
    pub fn acquire(&self, claim: &Claim) -> Result<(Sandbox, Acquisition), String> {
        let started = Instant::now();
        {
            // The first containers of a restarted shim get the sandboxes it adopts, rather
            // than new ones next to them.
            let g = self.lock();
            let _ = self
                .adopted
                .wait_timeout_while(g, Duration::from_secs(5), |g| !g.adopted);
        }
        let (mut sb, how) = loop {
            let mut g = self.lock();
            if g.draining {
                drop(g);
                break (self.create_now(Urgency::Waited)?, Acquisition::Miss);
            }
            let same = g
                .idle
                .iter()
                .rposition(|s| s.function.as_deref() == Some(claim.function));
            let (picked, how) = match same {
                Some(i) => (g.idle.remove(i), Acquisition::Hit),
                None => (g.idle.pop_front(), Acquisition::Repurpose),
            };
            match picked {
                Some(sb) if sb.holder.alive() => break (sb, how),
                Some(dead) => {
                    g.counters.holders_lost += 1;
                    log::warn!(
                        "sandbox {}: holder {} died; replaced",
                        dead.id,
                        dead.holder.pid
                    );
                    g.releasing.push_back(InUse {
                        sandbox: dead,
                        memory: 0,
                        tainted: true,
                    });
                    self.wake.notify_all();
                }
                None => {
                    if g.total() >= self.cfg.max_sandboxes {
                        return Err(format!(
                            "pool full: {} sandboxes (max_sandboxes)",
                            g.total()
                        ));
                    }
                    g.busy += 1;
                    drop(g);
                    let r = self.create_now(Urgency::Waited);
                    self.lock().busy -= 1;
                    break (r?, Acquisition::Miss);
                }
            }
        };
        sb.state = State::InUse;
        sb.function = Some(claim.function.to_string());
        sb.container = Some(claim.container.to_string());
        sb.last_used = sandbox::unix_now();
        if let Err(e) = self.store.save(&sb) {
            log::warn!("{e}");
        }
        self.publish_address(claim.container, &sb);
        let elapsed = started.elapsed().as_secs_f64();
        let mut g = self.lock();
        let c = &mut g.counters;
        *c.acquisitions.entry(how.label()).or_default() += 1;
        if c.latency_buckets.is_empty() {
            c.latency_buckets = vec![0; LATENCY_BOUNDS.len()];
        }
        for (i, b) in LATENCY_BOUNDS.iter().enumerate() {
            if elapsed <= *b {
                c.latency_buckets[i] += 1;
            }
        }
        c.latency_sum += elapsed;
        c.latency_count += 1;
        g.in_use.insert(
            claim.container.to_string(),
            InUse {
                sandbox: sb.clone(),
                memory: claim.memory,
                tainted: claim.tainted,
            },
        );
        // Over the memory bound the worker evicts idle sandboxes.
        self.wake.notify_all();
        Ok((sb, how))
    }

    /// The container's sandbox goes back to the pool (after a purge) or away.
    pub fn release(&self, container: &str) {
        let _ = std::fs::remove_file(self.store.container_file(container));
        let mut g = self.lock();
        if let Some(mut u) = g.in_use.remove(container) {
            u.sandbox.state = State::Purging;
            if let Err(e) = self.store.save(&u.sandbox) {
                log::warn!("{e}");
            }
            g.releasing.push_back(u);
            self.wake.notify_all();
        }
    }

    /// Destroys every idle sandbox now and every other one when its container is gone;
    /// the pool stays empty for the rest of this shim's life. Returns how many it destroyed.
    pub fn drain(&self) -> usize {
        let idle: Vec<Sandbox> = {
            let mut g = self.lock();
            g.draining = true;
            g.busy += g.idle.len();
            g.idle.drain(..).collect()
        };
        let n = idle.len();
        for sb in idle {
            self.destroy(&sb);
            self.lock().busy -= 1;
        }
        self.wake.notify_all();
        self.check_empty();
        n
    }

    fn create_now(&self, urgency: Urgency) -> Result<Sandbox, String> {
        let id = random_id();
        let parent = self.cgroup_parent();
        let mut sb = self
            .ops
            .create(&id, &self.exe, &parent, &self.network, urgency)
            .map_err(|e| format!("creating sandbox: {e}"))?;
        if self.cfg.cgroup_view {
            if let Err(e) = sb.build_cgroup_view(&self.store.cgroup_view_dir(&id)) {
                log::warn!("sandbox {id}: {e}; its instances mount their own cgroups");
            }
        }
        if let Err(e) = self.store.save(&sb) {
            log::warn!("{e}");
        }
        self.lock().counters.created += 1;
        Ok(sb)
    }

    fn destroy(&self, sb: &Sandbox) {
        if let Err(e) = self.ops.destroy(sb, &self.network) {
            log::warn!("destroying sandbox {}: {e}", sb.id);
        }
        self.store.remove(&sb.id);
        self.lock().counters.destroyed += 1;
    }

    /// Purges a released sandbox and checks it; an error means it must be destroyed.
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
        self.ops.purge(&sb.holder)?;
        sb.check_empty()
    }

    fn worker(self: Arc<Self>) {
        // Purges, refills and evictions run behind container starts.
        crate::zygote::set_nice(self.cfg.background_nice);
        if self.cfg.cgroup_favor_dynmods {
            match sandbox::cgroup::favor_dynmods() {
                Ok(true) => log::info!("cgroup2 remounted with favordynmods"),
                Ok(false) => {}
                Err(e) => log::warn!("pool.cgroup_favor_dynmods: {e}"),
            }
        }
        self.adopt();
        self.publish_state();
        let mut last_check = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let released = self.lock().releasing.pop_front();
            if let Some(u) = released {
                self.lock().busy += 1;
                self.finish_release(u);
                self.lock().busy -= 1;
                self.write_metrics();
                self.check_empty();
                continue;
            }
            if last_check.elapsed() > Duration::from_secs(1) {
                self.check_holders();
                last_check = Instant::now();
            }
            if self.evict_one() || self.refill_one() {
                self.write_metrics();
                continue;
            }
            self.write_metrics();
            let g = self.lock();
            if g.releasing.is_empty() {
                let _ = self.wake.wait_timeout(g, Duration::from_secs(1));
            }
        }
    }

    fn finish_release(&self, u: InUse) {
        let mut sb = u.sandbox;
        let keep = {
            let g = self.lock();
            !u.tainted
                && !g.draining
                && g.idle.len() < self.cfg.max_idle
                && !g.over_memory(&self.cfg)
        };
        if !keep {
            self.destroy(&sb);
            return;
        }
        match self.purge(&mut sb) {
            Ok(()) => {
                sb.state = State::Idle;
                sb.served += 1;
                sb.last_used = sandbox::unix_now();
                if let Err(e) = self.store.save(&sb) {
                    log::warn!("{e}");
                }
                let mut g = self.lock();
                g.counters.purges += 1;
                // A drain that began during the purge wants no idle sandbox.
                if g.draining {
                    drop(g);
                    self.destroy(&sb);
                    return;
                }
                g.idle.push_back(sb);
            }
            Err(e) => {
                log::warn!("sandbox {}: purge failed, destroying it: {e}", sb.id);
                self.lock().counters.purge_failures += 1;
                self.destroy(&sb);
            }
        }
    }

    /// Takes the pool's ownership lock, held until this process exits. A shim that is
    /// retiring may still hold it for a moment; its sandboxes must not be adopted meanwhile.
    fn lock_ownership(&self) -> bool {
        match self.store.lock_owner(Duration::from_secs(10)) {
            Ok(file) => {
                if let Ok(mut o) = self.owner.lock() {
                    *o = Some(file);
                }
                true
            }
            Err(e) => {
                log::warn!("{e}; not adopting the pool of {}", self.namespace);
                false
            }
        }
    }

    /// Re-takes idle sandboxes of an earlier shim of this namespace; destroys the rest.
    fn adopt(&self) {
        if !self.lock_ownership() {
            self.lock().adopted = true;
            self.adopted.notify_all();
            return;
        }
        let (records, bad) = self.store.list();
        for e in bad {
            log::warn!("ignoring {e}");
        }
        let known: Vec<String> = {
            let g = self.lock();
            g.idle
                .iter()
                .map(|s| s.id.clone())
                .chain(g.in_use.values().map(|u| u.sandbox.id.clone()))
                .collect()
        };
        for mut sb in records.into_iter().filter(|s| !known.contains(&s.id)) {
            if sb.state == State::Idle && sb.check_empty().is_ok() {
                log::info!("adopting idle sandbox {}", sb.id);
                if let Some(v) = sb.cgroup_view.clone() {
                    if !sandbox::cgroup_view::is_built(&v) {
                        if let Err(e) = sb.build_cgroup_view(&v) {
                            log::warn!("sandbox {}: {e}", sb.id);
                        }
                    }
                }
                self.lock().idle.push_back(sb);
            } else {
                log::info!(
                    "destroying sandbox {} left {} by an earlier shim",
                    sb.id,
                    sb.state
                );
                self.destroy(&sb);
            }
        }
        self.lock().adopted = true;
        self.adopted.notify_all();
    }

    fn check_holders(&self) {
        let dead: Vec<Sandbox> = {
            let mut g = self.lock();
            let (alive, dead): (VecDeque<_>, VecDeque<_>) =
                g.idle.drain(..).partition(|s| s.holder.alive());
            g.idle = alive;
            g.counters.holders_lost += dead.len() as u64;
            g.busy += dead.len();
            dead.into_iter().collect()
        };
        for sb in dead {
            log::warn!(
                "sandbox {}: holder {} died; replacing it",
                sb.id,
                sb.holder.pid
            );
            self.destroy(&sb);
            self.lock().busy -= 1;
        }
    }

    /// Destroys the least recently used idle sandbox while over the memory bound.
    fn evict_one(&self) -> bool {
        let victim = {
            let mut g = self.lock();
            if !g.over_memory(&self.cfg) {
                return false;
            }
            let v = g.idle.pop_front();
            if v.is_some() {
                g.busy += 1;
            }
            v
        };
        match victim {
            Some(sb) => {
                log::info!("evicting idle sandbox {} (memory bound)", sb.id);
                self.destroy(&sb);
                self.lock().busy -= 1;
                true
            }
            None => false,
        }
    }

    fn refill_one(&self) -> bool {
        {
            let mut g = self.lock();
            let want = g.adopted
                && !g.draining
                && g.idle.len() + g.busy < self.cfg.min_idle
                && g.total() < self.cfg.max_sandboxes
                && !g.over_memory(&self.cfg);
            if !want {
                return false;
            }
            g.busy += 1;
        }
        let r = self.create_now(Urgency::Background);
        let mut g = self.lock();
        g.busy -= 1;
        match r {
            // A drain that began during the creation wants no idle sandbox.
            Ok(sb) if g.draining => {
                drop(g);
                self.destroy(&sb);
                self.check_empty();
                false
            }
            Ok(sb) => {
                g.idle.push_back(sb);
                true
            }
            Err(e) => {
                drop(g);
                log::warn!("refilling the pool: {e}");
                // Do not spin on a persistent failure (e.g. a broken CNI plugin).
                std::thread::sleep(Duration::from_secs(1));
                false
            }
        }
    }

    /// Keeps the shim from retiring for a moment; false if it is already retiring.
    pub fn hold(&self) -> bool {
        let Ok(mut l) = self.lease.lock() else {
            return false;
        };
        if l.0 {
            return false;
        }
        l.1 = Instant::now() + HOLD;
        true
    }

    /// How long the shim stays after containerd went away with no task left.
    pub fn orphan_grace(&self) -> Duration {
        Duration::from_secs(self.cfg.orphan_grace_secs)
    }

    /// Marks the shim as retiring unless a `hold` is in force; no hold succeeds afterwards.
    pub fn begin_retire(&self) -> bool {
        let Ok(mut l) = self.lease.lock() else {
            return false;
        };
        if Instant::now() < l.1 {
            return false;
        }
        l.0 = true;
        true
    }

    /// The shim may end: nothing in the pool and nothing to keep warm (drained, or
    /// `min_idle` is 0).
    pub fn may_exit(&self) -> bool {
        let g = self.lock();
        g.total() == 0 && (g.draining || self.cfg.min_idle == 0)
    }

    fn check_empty(&self) {
        if self.may_exit() {
            if let Ok(g) = self.on_empty.lock() {
                if let Some(f) = g.as_ref() {
                    f();
                }
            }
        }
    }

    /// Publishes where a platform reaches the container: `<pool dir>/containers/<id>`.
    fn publish_address(&self, container: &str, sb: &Sandbox) {
        let path = self.store.container_file(container);
        let body = serde_json::json!({
            "sandbox": sb.id,
            "ip": sb.attachment.ip,
            "cidr": sb.attachment.cidr,
            "network": sb.network,
        });
        let write = || -> std::io::Result<()> {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&path, body.to_string())
        };
        if let Err(e) = write() {
            log::warn!("publishing address of {container}: {e}");
        }
    }

    /// Serves the control socket: each client on a thread of its own, with a deadline for
    /// its command, so a client that connects and says nothing blocks nobody.
    fn serve_control(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let p = self.clone();
            let spawned = std::thread::Builder::new()
                .name("pool-control-client".into())
                .spawn(move || p.answer_control(conn));
            if let Err(e) = spawned {
                log::warn!("pool control: {e}");
            }
        }
    }

    fn answer_control(&self, mut conn: std::os::unix::net::UnixStream) {
        let _ = conn.set_read_timeout(Some(CONTROL_TIMEOUT));
        let _ = conn.set_write_timeout(Some(CONTROL_TIMEOUT));
        let mut line = String::new();
        if let Err(e) = BufReader::new(&conn).read_line(&mut line) {
            log::debug!("pool control: {e}");
            return;
        }
        let reply = match line.trim() {
            "drain" => serde_json::json!({ "destroyed": self.drain() }),
            "ping" => serde_json::json!({ "pid": std::process::id() }),
            "hold" => serde_json::json!({ "held": self.hold() }),
            other => serde_json::json!({ "error": format!("unknown command {other:?}") }),
        };
        let _ = writeln!(conn, "{reply}");
    }

    /// Prometheus text exposition in `<pool dir>/metrics.prom` (a node_exporter textfile
    /// collector can pick it up).
    pub fn write_metrics(&self) {
        let text = {
            let g = self.lock();
            let c = &g.counters;
            let mut t = String::new();
            let ns = &self.namespace;
            t.push_str("# HELP trenv_pool_acquisitions_total Sandboxes handed to containers, by how they were obtained.\n# TYPE trenv_pool_acquisitions_total counter\n");
            for how in ["hit", "repurpose", "miss"] {
                let v = c.acquisitions.get(how).copied().unwrap_or(0);
                t.push_str(&format!(
                    "trenv_pool_acquisitions_total{{namespace=\"{ns}\",result=\"{how}\"}} {v}\n"
                ));
            }
            for (name, help, v) in [
                (
                    "purges",
                    "Sandboxes purged and returned to the pool.",
                    c.purges,
                ),
                (
                    "purge_failures",
                    "Sandboxes destroyed because a purge or its check failed.",
                    c.purge_failures,
                ),
                (
                    "holders_lost",
                    "Idle sandboxes whose holder process died.",
                    c.holders_lost,
                ),
                ("created", "Sandboxes created.", c.created),
                ("destroyed", "Sandboxes destroyed.", c.destroyed),
            ] {
                t.push_str(&format!(
                    "# HELP trenv_pool_{name}_total {help}\n# TYPE trenv_pool_{name}_total counter\ntrenv_pool_{name}_total{{namespace=\"{ns}\"}} {v}\n"
                ));
            }
            t.push_str("# HELP trenv_pool_sandboxes Sandboxes by state.\n# TYPE trenv_pool_sandboxes gauge\n");
            for (state, v) in [
                ("idle", g.idle.len()),
                ("in-use", g.in_use.len()),
                ("purging", g.releasing.len()),
            ] {
                t.push_str(&format!(
                    "trenv_pool_sandboxes{{namespace=\"{ns}\",state=\"{state}\"}} {v}\n"
                ));
            }
            t.push_str("# HELP trenv_pool_acquire_seconds Time to obtain a sandbox for a container.\n# TYPE trenv_pool_acquire_seconds histogram\n");
            for (i, b) in LATENCY_BOUNDS.iter().enumerate() {
                let v = c.latency_buckets.get(i).copied().unwrap_or(0);
                t.push_str(&format!(
                    "trenv_pool_acquire_seconds_bucket{{namespace=\"{ns}\",le=\"{b}\"}} {v}\n"
                ));
            }
            t.push_str(&format!(
                "trenv_pool_acquire_seconds_bucket{{namespace=\"{ns}\",le=\"+Inf\"}} {n}\ntrenv_pool_acquire_seconds_sum{{namespace=\"{ns}\"}} {s}\ntrenv_pool_acquire_seconds_count{{namespace=\"{ns}\"}} {n}\n",
                n = c.latency_count,
                s = c.latency_sum
            ));
            t
        };
        let path = self.store.dir.join("metrics.prom");
        let tmp = self.store.dir.join(".metrics.prom.tmp");
        if std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}
