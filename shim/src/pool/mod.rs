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
use trenv_sandbox::{self as sandbox, Sandbox, State, Store};

use crate::config::PoolConfig;

mod ops;
pub use ops::{SandboxOps, Urgency, ZygoteOps};

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

/// Called whenever the pool became empty with nothing in use.
pub type OnEmpty = Box<dyn Fn() + Send + Sync>;
/// Prometheus text added to the pool's metrics file.
pub type ExtraMetrics = Box<dyn Fn() -> String + Send + Sync>;

pub struct Pool {
    cfg: PoolConfig,
    namespace: String,
    store: Store,
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Signalled once sandboxes of an earlier shim are adopted.
    adopted: Condvar,
    ops: Box<dyn SandboxOps>,
    on_empty: Mutex<Option<OnEmpty>>,
    stop: AtomicBool,
    /// The ownership lock file, locked while this shim owns the pool.
    owner: Mutex<Option<std::fs::File>>,
    /// (retiring, held until): `shim start` holds the shim for the task it hands it, so
    /// the shim cannot retire between handing out its address and the task's Create.
    lease: Mutex<(bool, Instant)>,
    extra_metrics: Mutex<Option<ExtraMetrics>>,
    /// Run when a drain begins: what holds sandboxes without a container (spares) lets go.
    on_drain: Mutex<Option<OnEmpty>>,
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
    pub fn new(
        namespace: &str,
        cfg: PoolConfig,
        ops: Box<dyn SandboxOps>,
    ) -> Result<Arc<Self>, String> {
        if !(0..=19).contains(&cfg.background_nice) {
            return Err(format!(
                "pool.background_nice is {}; it must be 0-19",
                cfg.background_nice
            ));
        }
        let store = Self::store_of(namespace, &cfg);
        std::fs::create_dir_all(&store.dir)
            .map_err(|e| format!("creating {}: {e}", store.dir.display()))?;
        Ok(Arc::new(Self {
            cfg,
            namespace: namespace.to_string(),
            store,
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
            adopted: Condvar::new(),
            ops,
            on_empty: Mutex::new(None),
            stop: AtomicBool::new(false),
            owner: Mutex::new(None),
            lease: Mutex::new((false, Instant::now())),
            extra_metrics: Mutex::new(None),
            on_drain: Mutex::new(None),
        }))
    }

    /// The records of the pool of `namespace`.
    pub fn store_of(namespace: &str, cfg: &PoolConfig) -> Store {
        Store::new(&cfg.state_dir, namespace)
    }

    /// The network of the pool's sandboxes: the configured conflist or the built-in bridge.
    pub fn network_of(cfg: &PoolConfig) -> Result<Network, String> {
        let bin = cfg.cni_bin_dir.clone();
        let network = match &cfg.cni_config {
            Some(p) => Network::load(p, &bin).map_err(|e| e.to_string())?,
            None => Network::builtin(&cfg.subnet, &bin),
        };
        Ok(network.with_timeout(Duration::from_secs(cfg.cni_timeout_secs.max(1))))
    }

    /// `<cgroup_parent>/<namespace>`, the parent of the pool's sandbox cgroups.
    pub fn cgroup_parent_of(namespace: &str, cfg: &PoolConfig) -> String {
        format!("{}/{namespace}", cfg.cgroup_parent.trim_end_matches('/'))
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
        let saved = serde_json::to_vec_pretty(self.ops.network())
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
            // The pool owns `<cgroup_parent>/<namespace>`: with no sandbox left, whatever
            // empty cgroup is still below it is a leftover (rmdir never removes a populated
            // one) and goes too.
            if let Err(e) = sandbox::cgroup::remove(&self.cgroup_parent()) {
                log::warn!("pool cgroups: {e}");
            }
            sandbox::cgroup::remove_parents(&self.cgroup_parent(), 2);
            // Never recurse into a mounted view (it binds live cgroup directories).
            sandbox::cgroup_view::remove_all(&self.store.views());
            let _ = std::fs::remove_dir_all(&self.store.dir);
        } else {
            self.write_metrics();
        }
    }

    fn cgroup_parent(&self) -> String {
        Self::cgroup_parent_of(&self.namespace, &self.cfg)
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
                break (self.create_miss(g)?, Acquisition::Miss);
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
                Some(sb) if self.ops.alive(&sb) => break (sb, how),
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
                    break (self.create_miss(g)?, Acquisition::Miss);
                }
            }
        };
        sb.state = State::InUse;
        sb.template = None;
        sb.function = Some(claim.function.to_string());
        sb.container = Some(claim.container.to_string());
        sb.last_used = sandbox::unix_now();
        if let Err(e) = self.store.save(&sb) {
            log::warn!("{e}");
        }
        self.publish_address(claim.container, &sb, Some(how));
        let elapsed = started.elapsed().as_secs_f64();
        let mut g = self.lock();
        if how == Acquisition::Miss {
            // Counted as busy until it is counted as in use, so the pool never looks empty
            // (and the shim never retires) in between.
            g.busy -= 1;
        }
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

    /// Records that the instance in `container`'s sandbox was restored from `template`
    /// (shown by `trenv sandbox inspect`).
    pub fn mark_template(&self, container: &str, template: &str) {
        let mut g = self.lock();
        if let Some(u) = g.in_use.get_mut(container) {
            u.sandbox.template = Some(template.to_string());
            if let Err(e) = self.store.save(&u.sandbox) {
                log::warn!("{e}");
            }
        }
    }

    /// What a drain runs first (once).
    pub fn set_on_drain(&self, f: OnEmpty) {
        *self
            .on_drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(f);
    }

    /// Hands the sandbox of `from` (a spare instance) to container `to`, with its address.
    pub fn transfer(&self, from: &str, to: &str) -> Result<(), String> {
        let sb = {
            let mut g = self.lock();
            if g.in_use.contains_key(to) {
                return Err(format!("container {to} has a sandbox already"));
            }
            let mut u = g
                .in_use
                .remove(from)
                .ok_or_else(|| format!("{from} has no sandbox"))?;
            u.sandbox.container = Some(to.to_string());
            let sb = u.sandbox.clone();
            g.in_use.insert(to.to_string(), u);
            sb
        };
        if let Err(e) = self.store.save(&sb) {
            log::warn!("{e}");
        }
        let _ = std::fs::remove_file(self.store.container_file(from));
        self.publish_address(to, &sb, None);
        Ok(())
    }

    /// More metrics appended to the pool's (the shim's template counters).
    pub fn set_extra_metrics(&self, f: ExtraMetrics) {
        *self
            .extra_metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(f);
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
        let hook = self
            .on_drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(f) = hook {
            f();
        }
        let idle: Vec<Sandbox> = {
            let mut g = self.lock();
            g.draining = true;
            g.busy += g.idle.len();
            g.idle.drain(..).collect()
        };
        let n = idle.len();
        for sb in idle {
            self.destroy_busy(&sb);
        }
        self.wake.notify_all();
        // With nothing to destroy, nothing above checked.
        self.check_empty();
        n
    }

    /// A new sandbox for a container that found no idle one. It is counted (busy) while it
    /// is created and until [`Pool::acquire`] counts it as in use; a failure uncounts it and
    /// may leave a draining pool empty, so it checks.
    fn create_miss(&self, mut g: MutexGuard<'_, Inner>) -> Result<Sandbox, String> {
        g.busy += 1;
        drop(g);
        let r = self.create_now(Urgency::Waited);
        if r.is_err() {
            self.uncount_busy();
        }
        r
    }

    /// Ends a piece of pool work counted as busy. The last one of a draining pool ends the
    /// shim: a drain that found work counted left the exit to whoever ends it.
    fn uncount_busy(&self) {
        self.lock().busy -= 1;
        self.check_empty();
    }

    /// Destroys a sandbox counted as busy, then ends that piece of work.
    fn destroy_busy(&self, sb: &Sandbox) {
        self.destroy(sb);
        self.uncount_busy();
    }

    fn create_now(&self, urgency: Urgency) -> Result<Sandbox, String> {
        let id = random_id();
        let sb = self
            .ops
            .create(&id, urgency)
            .map_err(|e| format!("creating sandbox: {e}"))?;
        if let Err(e) = self.store.save(&sb) {
            log::warn!("{e}");
        }
        self.lock().counters.created += 1;
        Ok(sb)
    }

    fn destroy(&self, sb: &Sandbox) {
        if let Err(e) = self.ops.destroy(sb) {
            log::warn!("destroying sandbox {}: {e}", sb.id);
        }
        self.store.remove(&sb.id);
        self.lock().counters.destroyed += 1;
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
                self.uncount_busy();
                self.write_metrics();
                continue;
            }
            if last_check.elapsed() > Duration::from_secs(1) {
                if self.check_holders() {
                    // Counted before the refill, which may take a while.
                    self.write_metrics();
                }
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
        match self.ops.purge(&mut sb) {
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
            if sb.state == State::Idle && self.ops.adoptable(&mut sb) {
                log::info!("adopting idle sandbox {}", sb.id);
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

    /// Destroys idle sandboxes whose holder died; true when there were any.
    fn check_holders(&self) -> bool {
        let dead: Vec<Sandbox> = {
            let mut g = self.lock();
            let (alive, dead): (VecDeque<_>, VecDeque<_>) =
                g.idle.drain(..).partition(|s| self.ops.alive(s));
            g.idle = alive;
            g.counters.holders_lost += dead.len() as u64;
            g.busy += dead.len();
            dead.into_iter().collect()
        };
        let lost = !dead.is_empty();
        for sb in dead {
            log::warn!(
                "sandbox {}: holder {} died; replacing it",
                sb.id,
                sb.holder.pid
            );
            self.destroy_busy(&sb);
        }
        lost
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
                self.destroy_busy(&sb);
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
        match r {
            // A drain (or the shim's exit) that began during the creation wants no idle
            // sandbox. It stays counted (busy) until it is gone, or the shim could retire
            // (or stop) before it is.
            Ok(sb) if g.draining || self.stop.load(Ordering::SeqCst) => {
                drop(g);
                self.destroy_busy(&sb);
                false
            }
            Ok(sb) => {
                g.busy -= 1;
                g.idle.push_back(sb);
                true
            }
            Err(e) => {
                drop(g);
                log::warn!("refilling the pool: {e}");
                self.uncount_busy();
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

    /// Publishes where a platform reaches the container: `<pool dir>/containers/<id>`,
    /// with how its sandbox was had (`placement`: hit, repurpose, miss; absent for a
    /// sandbox handed over from a spare instance), which a platform may count.
    fn publish_address(&self, container: &str, sb: &Sandbox, how: Option<Acquisition>) {
        let path = self.store.container_file(container);
        let mut body = serde_json::json!({
            "sandbox": sb.id,
            "ip": sb.attachment.ip,
            "cidr": sb.attachment.cidr,
            "network": sb.network,
        });
        if let Some(how) = how {
            body["placement"] = how.label().into();
        }
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
        let extra = self
            .extra_metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|f| f())
            .unwrap_or_default();
        let text = text + &extra;
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

#[cfg(test)]
mod tests {
    //! The pool's policy against a fake: no process, cgroup or network is touched.

    use std::collections::HashSet;

    use super::*;
    use trenv_sandbox::cni::Attachment;
    use trenv_sandbox::holder::Holder;

    /// Sandboxes that exist only as records; what happened to them is kept for asserts.
    #[derive(Default)]
    struct Fake {
        network: Option<Network>,
        log: Mutex<Vec<String>>,
        dead: Mutex<HashSet<String>>,
        failing_purge: Mutex<HashSet<String>>,
        next_pid: Mutex<i32>,
        /// Creations take this long and then fail.
        failing_create: Mutex<Option<Duration>>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                network: Some(Network::builtin("10.99.0.0/16", Path::new("/nonexistent"))),
                ..Default::default()
            }
        }
        fn note(&self, what: String) {
            self.log.lock().expect("log").push(what);
        }
        fn events(&self, kind: &str) -> Vec<String> {
            let log = self.log.lock().expect("log");
            log.iter()
                .filter_map(|l| l.strip_prefix(&format!("{kind} ")).map(str::to_string))
                .collect()
        }
    }

    impl SandboxOps for Arc<Fake> {
        fn create(&self, id: &str, _urgency: Urgency) -> Result<Sandbox, String> {
            self.note(format!("create {id}"));
            if let Some(d) = *self.failing_create.lock().map_err(|e| e.to_string())? {
                std::thread::sleep(d);
                return Err("no address left".into());
            }
            let mut pid = self.next_pid.lock().map_err(|e| e.to_string())?;
            *pid += 1;
            Ok(Sandbox {
                id: id.to_string(),
                state: State::Idle,
                holder: Holder {
                    pid: *pid,
                    start_time: 1,
                    netns: 1,
                },
                cgroup: format!("/fake/{id}"),
                network: "fake".into(),
                attachment: Attachment {
                    ip: "10.99.0.2".into(),
                    cidr: "10.99.0.2/16".into(),
                    result: serde_json::Value::Null,
                },
                created: 0,
                last_used: 0,
                function: None,
                container: None,
                served: 0,
                cgroup_view: None,
                template: None,
            })
        }
        fn destroy(&self, sb: &Sandbox) -> Result<(), String> {
            self.note(format!("destroy {}", sb.id));
            Ok(())
        }
        fn purge(&self, sb: &mut Sandbox) -> Result<(), String> {
            self.note(format!("purge {}", sb.id));
            if self
                .failing_purge
                .lock()
                .map_err(|e| e.to_string())?
                .contains(&sb.id)
            {
                return Err("left a process".into());
            }
            Ok(())
        }
        fn alive(&self, sb: &Sandbox) -> bool {
            !self.dead.lock().expect("dead").contains(&sb.id)
        }
        fn adoptable(&self, _sb: &mut Sandbox) -> bool {
            true
        }
        fn network(&self) -> &Network {
            self.network.as_ref().expect("network")
        }
    }

    fn pool(cfg: PoolConfig) -> (Arc<Pool>, Arc<Fake>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = PoolConfig {
            state_dir: dir.path().to_path_buf(),
            ..cfg
        };
        let fake = Arc::new(Fake::new());
        let p = Pool::new("ns", cfg, Box::new(fake.clone())).expect("pool");
        p.lock().adopted = true;
        (p, fake, dir)
    }

    fn claim<'a>(container: &'a str, function: &'a str, memory: u64) -> Claim<'a> {
        Claim {
            container,
            function,
            memory,
            tainted: false,
        }
    }

    /// Runs what the worker would do with released sandboxes.
    fn settle(p: &Pool) {
        loop {
            // The guard must be gone before finish_release locks again.
            let next = p.lock().releasing.pop_front();
            let Some(u) = next else { break };
            p.finish_release(u);
        }
    }

    #[test]
    fn miss_then_hit_for_the_same_function_then_repurpose_for_another() {
        let (p, _fake, _d) = pool(PoolConfig::default());
        let (a, how) = p.acquire(&claim("c1", "f", 0)).expect("acquire");
        assert_eq!(how, Acquisition::Miss);
        p.release("c1");
        settle(&p);
        let (b, how) = p.acquire(&claim("c2", "f", 0)).expect("acquire");
        assert_eq!((how, &b.id), (Acquisition::Hit, &a.id));
        p.release("c2");
        settle(&p);
        let (c, how) = p.acquire(&claim("c3", "g", 0)).expect("acquire");
        assert_eq!((how, &c.id), (Acquisition::Repurpose, &a.id));
        assert_eq!(c.function.as_deref(), Some("g"));
        assert_eq!(c.container.as_deref(), Some("c3"));
    }

    #[test]
    fn hits_take_the_most_recently_used_and_repurposing_the_least() {
        let (p, _fake, _d) = pool(PoolConfig::default());
        let ids: Vec<String> = ["c1", "c2", "c3"]
            .iter()
            .map(|c| p.acquire(&claim(c, "f", 0)).expect("acquire").0.id)
            .collect();
        // Released in order: c1's sandbox is the least recently used.
        for c in ["c1", "c2", "c3"] {
            p.release(c);
        }
        settle(&p);
        let (hit, _) = p.acquire(&claim("d1", "f", 0)).expect("acquire");
        assert_eq!(hit.id, ids[2]);
        let (other, how) = p.acquire(&claim("d2", "g", 0)).expect("acquire");
        assert_eq!((how, &other.id), (Acquisition::Repurpose, &ids[0]));
    }

    #[test]
    fn a_full_pool_refuses_and_max_idle_destroys_extra_releases() {
        let (p, fake, _d) = pool(PoolConfig {
            max_sandboxes: 2,
            max_idle: 1,
            ..Default::default()
        });
        p.acquire(&claim("c1", "f", 0)).expect("acquire");
        p.acquire(&claim("c2", "f", 0)).expect("acquire");
        let full = p.acquire(&claim("c3", "f", 0));
        assert!(full.is_err_and(|e| e.contains("pool full")));
        p.release("c1");
        p.release("c2");
        settle(&p);
        assert_eq!(p.lock().idle.len(), 1);
        assert_eq!(fake.events("destroy").len(), 1);
        assert_eq!(fake.events("purge").len(), 1, "the extra one is not purged");
    }

    #[test]
    fn tainted_and_failed_purges_are_destroyed_not_reused() {
        let (p, fake, _d) = pool(PoolConfig::default());
        let (a, _) = p
            .acquire(&Claim {
                tainted: true,
                ..claim("c1", "f", 0)
            })
            .expect("acquire");
        let (b, _) = p.acquire(&claim("c2", "f", 0)).expect("acquire");
        fake.failing_purge
            .lock()
            .expect("lock")
            .insert(b.id.clone());
        p.release("c1");
        p.release("c2");
        settle(&p);
        assert!(p.lock().idle.is_empty());
        assert_eq!(fake.events("destroy"), vec![a.id, b.id]);
        assert_eq!(p.lock().counters.purge_failures, 1);
    }

    #[test]
    fn a_dead_holder_is_skipped_and_replaced() {
        let (p, fake, _d) = pool(PoolConfig::default());
        let (a, _) = p.acquire(&claim("c1", "f", 0)).expect("acquire");
        p.release("c1");
        settle(&p);
        fake.dead.lock().expect("lock").insert(a.id.clone());
        let (b, how) = p.acquire(&claim("c2", "f", 0)).expect("acquire");
        assert_ne!(b.id, a.id);
        assert_eq!(how, Acquisition::Miss);
        assert_eq!(p.lock().counters.holders_lost, 1);
        settle(&p);
        assert!(fake.events("destroy").contains(&a.id));
    }

    #[test]
    fn the_memory_bound_evicts_least_recently_used_idle_sandboxes() {
        let (p, fake, _d) = pool(PoolConfig {
            memory_limit_mib: 100,
            idle_cost_mib: 10,
            min_idle: 0,
            ..Default::default()
        });
        let old = p.acquire(&claim("c1", "f", 0)).expect("acquire").0;
        let new = p.acquire(&claim("c2", "f", 0)).expect("acquire").0;
        p.release("c1");
        p.release("c2");
        settle(&p);
        assert!(
            !p.evict_one(),
            "20 MiB of idle sandboxes are within 100 MiB"
        );
        // A container declaring 95 MiB takes one sandbox: 95 + 10 for the other > 100.
        let taken = p.acquire(&claim("big", "f", 95 << 20)).expect("acquire").0;
        assert_eq!(taken.id, new.id, "a hit takes the most recent");
        assert!(p.evict_one());
        assert_eq!(fake.events("destroy"), vec![old.id]);
        assert!(!p.evict_one(), "nothing idle is left to evict");
        assert!(!p.refill_one(), "no refill over the bound");
    }

    #[test]
    fn min_idle_is_refilled_and_a_drain_empties_the_pool() {
        let (p, fake, _d) = pool(PoolConfig {
            min_idle: 2,
            ..Default::default()
        });
        assert!(p.refill_one());
        assert!(p.refill_one());
        assert!(!p.refill_one(), "min_idle reached");
        p.acquire(&claim("c1", "f", 0)).expect("acquire");
        assert_eq!(p.drain(), 1);
        assert!(!p.refill_one(), "a drained pool is not refilled");
        // Containers still get sandboxes of their own; released ones are destroyed.
        let (_, how) = p.acquire(&claim("c2", "f", 0)).expect("acquire");
        assert_eq!(how, Acquisition::Miss);
        p.release("c1");
        p.release("c2");
        settle(&p);
        assert_eq!(p.lock().total(), 0);
        assert!(p.may_exit());
        assert_eq!(fake.events("create").len(), fake.events("destroy").len());
    }

    #[test]
    fn a_miss_that_fails_during_a_drain_still_ends_the_shim() {
        let (p, fake, _d) = pool(PoolConfig::default());
        let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let e = ended.clone();
        p.set_on_empty(Box::new(move || {
            e.fetch_add(1, Ordering::SeqCst);
        }));
        *fake.failing_create.lock().expect("lock") = Some(Duration::from_millis(300));
        let missing = {
            let p = p.clone();
            std::thread::spawn(move || p.acquire(&claim("c1", "f", 0)))
        };
        // The drain finds the miss counted and leaves the end to it.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(p.drain(), 0);
        assert_eq!(
            ended.load(Ordering::SeqCst),
            0,
            "a sandbox is being created"
        );
        assert!(missing.join().expect("thread").is_err());
        assert!(p.may_exit());
        assert_eq!(
            ended.load(Ordering::SeqCst),
            1,
            "the failed miss ends the shim"
        );
    }

    #[test]
    fn a_miss_is_counted_until_it_is_in_use() {
        let (p, _fake, _d) = pool(PoolConfig::default());
        p.acquire(&claim("c1", "f", 0)).expect("acquire");
        let g = p.lock();
        assert_eq!((g.busy, g.in_use.len(), g.total()), (0, 1, 1));
    }
}
