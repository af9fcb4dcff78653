//! A small FaaS controller over containerd, as a platform's node agent would be: an instance
//! per request when none is idle, reuse of an idle instance of the same function, a
//! keep-alive, and a node memory bound (declared limits of live instances) kept by evicting
//! the least recently used idle instances.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::types::Descriptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::client::{Client, ImageConfig};
use super::cni::Cni;
use super::manifest::Function;
use super::report::{path, Invocation, MemorySample, Phases};
use super::trace::Arrival;

/// What runs the functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// io.containerd.runc.v2 with CNI: cold starts and keep-alive.
    Runc,
    /// trenv's shim restoring an ordinary CRIU checkpoint of each function (every page copied).
    Criu,
    /// trenv's shim with its sandbox pool, no templates: cold function init in warm sandboxes.
    TrenvPool,
    /// trenv's shim with the pool, memory templates and spare instances.
    Trenv,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Runc, Mode::Criu, Mode::TrenvPool, Mode::Trenv];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Runc => "runc",
            Mode::Criu => "criu",
            Mode::TrenvPool => "trenv-pool",
            Mode::Trenv => "trenv",
        }
    }

    pub fn parse(s: &str) -> Result<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| anyhow!("unknown mode {s:?} (known: runc, criu, trenv-pool, trenv)"))
    }

    pub fn runtime(self) -> &'static str {
        match self {
            Mode::Runc => "io.containerd.runc.v2",
            _ => "io.containerd.trenv.v2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Idle instances older than this are removed.
    pub keep_alive: Duration,
    /// Σ declared memory limits of live instances stays under this (MiB).
    pub node_memory_mib: u64,
    /// A request waits at most this long for an instance and for its answer.
    pub request_timeout: Duration,
    /// An instance must answer its health check this soon after its start.
    pub start_timeout: Duration,
    /// Requests in flight at most; later arrivals queue (and their latency shows it).
    pub max_in_flight: usize,
    /// Instance starts under way at once (0: no bound). Requests beyond it wait for a start
    /// to finish or an instance of their function to come free: without the bound, a node
    /// whose starts slow down under load starts ever more instances for the requests that
    /// queue meanwhile, and collapses.
    pub max_starts: u64,
    /// Print a live progress line.
    pub progress: bool,
    /// Spare instances per template the shim keeps (trenv mode).
    pub spares: usize,
}

/// A function as the controller knows it.
pub struct FunctionState {
    pub spec: Function,
    /// Its image, or why it cannot be used (every request then fails with that).
    pub image: std::result::Result<ImageConfig, String>,
}

struct Instance {
    function: usize,
    ip: IpAddr,
    busy: bool,
    last_used: Instant,
    netns: Option<String>,
}

#[derive(Default)]
struct State {
    live: HashMap<String, Instance>,
    /// Memory reserved by live and starting instances (MiB).
    reserved_mib: u64,
    starting: u64,
}

enum Got {
    Warm(String, IpAddr),
    New(String),
}

/// Live numbers for the progress line.
#[derive(Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    e2e: Mutex<Vec<f64>>,
    last_mib: Mutex<f64>,
}

pub struct Controller {
    pub mode: Mode,
    workload: Mutex<String>,
    client: Client,
    functions: Vec<FunctionState>,
    base_spec: serde_json::Value,
    cgroup_parent: String,
    pool_dir: PathBuf,
    mempool_dir: PathBuf,
    /// Where the instances' output goes, a file each.
    logs: PathBuf,
    cni: Option<Cni>,
    opts: Options,
    state: Mutex<State>,
    freed: Notify,
    seq: AtomicU64,
    /// Container id → path told by trenv's events (template, spare, fallback).
    told: Mutex<HashMap<String, String>>,
    /// Container id → template built (true) or failed (false).
    built: Mutex<HashMap<String, bool>>,
    teardowns: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    progress: Progress,
    /// Function index → its checkpoint (criu mode).
    checkpoints: Mutex<HashMap<usize, Descriptor>>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One HTTP/1.0 GET: (status, body).
pub async fn http_get(
    ip: IpAddr,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect((ip, port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: function\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("no answer within {timeout:?}"))??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "not an HTTP answer: {:?}",
                text.chars().take(60).collect::<String>()
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: Mode,
        workload: &str,
        client: Client,
        functions: Vec<FunctionState>,
        base_spec: serde_json::Value,
        cgroup_parent: &str,
        pool_dir: PathBuf,
        mempool_dir: PathBuf,
        logs: PathBuf,
        cni: Option<Cni>,
        opts: Options,
    ) -> Arc<Self> {
        Arc::new(Self {
            mode,
            workload: Mutex::new(workload.to_string()),
            client,
            functions,
            base_spec,
            cgroup_parent: cgroup_parent.to_string(),
            pool_dir,
            mempool_dir,
            logs,
            cni,
            opts,
            state: Mutex::new(State::default()),
            freed: Notify::new(),
            seq: AtomicU64::new(0),
            told: Mutex::new(HashMap::new()),
            built: Mutex::new(HashMap::new()),
            teardowns: Mutex::new(Vec::new()),
            progress: Progress::default(),
            checkpoints: Mutex::new(HashMap::new()),
        })
    }

    /// The workload that the next [`Controller::run`] replays (for the records).
    pub fn set_workload(&self, name: &str) {
        *self
            .workload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = name.to_string();
    }

    fn workload(&self) -> String {
        self.workload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Functions whose image cannot be used, and why.
    pub fn unusable(&self) -> Vec<String> {
        self.functions
            .iter()
            .filter_map(|f| {
                f.image
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", f.spec.name))
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows trenv's events: which containers were restored, and templates built.
    pub async fn follow_events(self: &Arc<Self>) -> Result<()> {
        let mut rx = self.client.trenv_events().await?;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            while let Some((topic, f)) = rx.recv().await {
                let Some(id) = f.get("container_id").cloned() else {
                    continue;
                };
                let told = match topic.as_str() {
                    "/trenv/template/restored" if f.get("spare").is_some_and(|s| s == "true") => {
                        path::SPARE
                    }
                    "/trenv/template/restored" => path::TEMPLATE,
                    "/trenv/template/fallback" => path::FALLBACK,
                    "/trenv/template/built" | "/trenv/template/build-failed" => {
                        let ok = topic.ends_with("built");
                        me.built
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(id, ok);
                        continue;
                    }
                    _ => continue,
                };
                me.told
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id, told.to_string());
            }
        });
        Ok(())
    }

    fn spec(
        &self,
        f: &FunctionState,
        image: &ImageConfig,
        id: &str,
        template: bool,
    ) -> serde_json::Value {
        let mut s = self.base_spec.clone();
        let args = f.spec.args.clone().unwrap_or_else(|| image.args.clone());
        s["process"]["args"] = args.into();
        s["process"]["env"] = image.env.clone().into();
        s["process"]["cwd"] = if image.cwd.is_empty() {
            "/".into()
        } else {
            image.cwd.clone().into()
        };
        s["process"]["terminal"] = false.into();
        s["root"] = serde_json::json!({"path": "rootfs", "readonly": false});
        s["linux"]["cgroupsPath"] = format!("{}/{id}", self.cgroup_parent).into();
        s["linux"]["resources"]["memory"] = serde_json::json!({"limit": f.spec.memory_mib << 20});
        let mut ann = serde_json::json!({"io.trenv.function": f.spec.name});
        if template {
            ann["io.trenv.template"] = "auto".into();
            ann["io.trenv.ready"] = format!("http:{}{}", f.spec.port, f.spec.health).into();
        }
        s["annotations"] = ann;
        s
    }

    fn new_id(&self, f: &FunctionState) -> String {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        // The pid keeps ids (and the runc instances' network namespaces, named after them)
        // apart between runs on one host.
        format!(
            "{}-{}-{}-{n}",
            self.mode.name(),
            f.spec.name,
            std::process::id()
        )
    }

    /// The address and placement the pool published for a container.
    fn published(&self, id: &str) -> Result<(IpAddr, Option<String>)> {
        let p = self.pool_dir.join("containers").join(id);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("{id}: no published address ({})", p.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let ip = v["ip"]
            .as_str()
            .ok_or_else(|| anyhow!("{id}: published record without ip"))?;
        Ok((ip.parse()?, v["placement"].as_str().map(str::to_string)))
    }

    /// Starts an instance and waits until it is ready: (ip, pid, phases, path).
    async fn start(
        &self,
        fi: usize,
        id: &str,
        template: bool,
    ) -> Result<(IpAddr, u32, Phases, String, Option<String>)> {
        let f = &self.functions[fi];
        let image = f.image.as_ref().map_err(|e| anyhow!("{e}"))?;
        let mut spec = self.spec(f, image, id, template);
        let t0 = Instant::now();
        let mut netns = None;
        let mut runc_ip = None;
        if let Some(cni) = &self.cni {
            let name = format!("trenv-bench-{id}");
            let (path, ip) = {
                let (name, id) = (name.clone(), id.to_string());
                let cni = Cni {
                    bridge: cni.bridge.clone(),
                    subnet: cni.subnet.clone(),
                };
                tokio::task::spawn_blocking(move || cni.attach(&name, &id)).await??
            };
            if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
                for n in ns.iter_mut() {
                    if n["type"] == "network" {
                        n["path"] = path.clone().into();
                    }
                }
            }
            netns = Some(name);
            runc_ip = Some(ip.parse::<IpAddr>()?);
        }
        let t_net = Instant::now();
        let r = self
            .start_task(f, image, id, &spec, runc_ip, netns.is_some())
            .await;
        match r {
            Ok((ip, pid, marks, placement)) => {
                let (t_container, t_task, t_run, t_ready) = marks;
                let phases = Phases {
                    network_ms: ms(t_net - t0),
                    container_ms: ms(t_container - t_net),
                    task_create_ms: ms(t_task - t_container),
                    task_start_ms: ms(t_run - t_task),
                    ready_ms: ms(t_ready - t_run),
                };
                let restored = self.mode == Mode::Criu
                    && self
                        .checkpoints
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .contains_key(&fi);
                let path = match (restored, placement.as_deref()) {
                    (true, _) => path::CRIU,
                    (_, Some("hit")) => path::POOL,
                    (_, Some("repurpose")) => path::REPURPOSE,
                    _ => path::COLD,
                };
                Ok((ip, pid, phases, path.to_string(), netns))
            }
            Err(e) => {
                self.remove(id.to_string(), netns).await;
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn start_task(
        &self,
        f: &FunctionState,
        image: &ImageConfig,
        id: &str,
        spec: &serde_json::Value,
        runc_ip: Option<IpAddr>,
        _networked: bool,
    ) -> Result<(
        IpAddr,
        u32,
        (Instant, Instant, Instant, Instant),
        Option<String>,
    )> {
        let mounts = self
            .client
            .create_container(
                id,
                &f.spec.image,
                &image.chain_id,
                self.mode.runtime(),
                spec,
                &[("io.trenv.bench", "1")],
            )
            .await?;
        let t_container = Instant::now();
        let checkpoint = if self.mode == Mode::Criu {
            let fi = self
                .functions
                .iter()
                .position(|x| x.spec.name == f.spec.name);
            let cps = self
                .checkpoints
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            fi.and_then(|i| cps.get(&i).cloned())
        } else {
            None
        };
        let log = self.logs.join(format!("{id}.log"));
        let pid = self
            .client
            .create_task(id, mounts, checkpoint, Some(&log))
            .await?;
        let t_task = Instant::now();
        let pid = match self.client.start_task(id).await? {
            0 => pid,
            p => p,
        };
        let t_run = Instant::now();
        let (ip, placement) = match runc_ip {
            Some(ip) => (ip, None),
            None => self.published(id)?,
        };
        let deadline = t_run + self.opts.start_timeout;
        let mut last_look = Instant::now();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{id}: not ready within {:?}", self.opts.start_timeout);
            }
            match http_get(
                ip,
                f.spec.port,
                &f.spec.health,
                left.min(Duration::from_secs(2)),
            )
            .await
            {
                Ok((200, _)) => break,
                _ => {
                    // A function that crashes fails its start at once, not at the deadline.
                    if last_look.elapsed() > Duration::from_millis(50) {
                        if self.client.task_exited(id).await {
                            let out = std::fs::read_to_string(&log).unwrap_or_default();
                            let tail: Vec<&str> = out.lines().rev().take(3).collect();
                            bail!(
                                "{id}: the function exited before it was ready (its last output: {:?})",
                                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                            );
                        }
                        last_look = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        Ok((
            ip,
            pid,
            (t_container, t_task, t_run, Instant::now()),
            placement,
        ))
    }

    /// Removes an instance in the background; `finish` waits for all removals.
    fn evict(
        &self,
        id: String,
        netns: Option<String>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let client = self.client.clone();
        let cni = self.cni.as_ref().map(|c| Cni {
            bridge: c.bridge.clone(),
            subnet: c.subnet.clone(),
        });
        async move {
            if let Err(e) = client.remove(&id).await {
                eprintln!("trenv-bench: {e}");
            }
            if let (Some(cni), Some(ns)) = (cni, netns) {
                let _ = tokio::task::spawn_blocking(move || cni.detach(&ns, &id)).await;
            }
        }
    }

    async fn remove(&self, id: String, netns: Option<String>) {
        self.evict(id, netns).await;
    }

    fn evict_later(&self, id: String, netns: Option<String>) {
        let h = tokio::spawn(self.evict(id, netns));
        self.teardowns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(h);
    }

    /// An idle instance of the function, or room (memory) for a new one.
    async fn acquire(&self, fi: usize) -> Result<Got> {
        let need = self.functions[fi].spec.memory_mib;
        let deadline = Instant::now() + self.opts.request_timeout;
        loop {
            let notified = self.freed.notified();
            let mut victims = Vec::new();
            let got = {
                let mut g = self.lock();
                let idle = g
                    .live
                    .iter_mut()
                    .filter(|(_, i)| i.function == fi && !i.busy)
                    .max_by_key(|(_, i)| i.last_used);
                if let Some((id, inst)) = idle {
                    inst.busy = true;
                    Some(Got::Warm(id.clone(), inst.ip))
                } else if self.opts.max_starts > 0 && g.starting >= self.opts.max_starts {
                    // Starts already fill the node: wait for one of them, or for an instance
                    // of the function to come free, whichever is first.
                    None
                } else {
                    // Evict least recently used idle instances until the new one fits.
                    while g.reserved_mib + need > self.opts.node_memory_mib {
                        let lru = g
                            .live
                            .iter()
                            .filter(|(_, i)| !i.busy)
                            .min_by_key(|(_, i)| i.last_used)
                            .map(|(id, _)| id.clone());
                        let Some(id) = lru else { break };
                        if let Some(inst) = g.live.remove(&id) {
                            g.reserved_mib -= self.functions[inst.function].spec.memory_mib;
                            victims.push((id, inst.netns));
                        }
                    }
                    if g.reserved_mib + need <= self.opts.node_memory_mib {
                        g.reserved_mib += need;
                        g.starting += 1;
                        Some(Got::New(self.new_id(&self.functions[fi])))
                    } else {
                        None
                    }
                }
            };
            for (id, ns) in victims {
                self.evict_later(id, ns);
            }
            if let Some(g) = got {
                return Ok(g);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                bail!(
                    "no room for an instance within {:?} (node memory bound {} MiB, at most {} starts at once)",
                    self.opts.request_timeout,
                    self.opts.node_memory_mib,
                    self.opts.max_starts
                );
            }
        }
    }

    fn release(&self, id: &str, healthy: bool) {
        let mut g = self.lock();
        if healthy {
            if let Some(i) = g.live.get_mut(id) {
                i.busy = false;
                i.last_used = Instant::now();
            }
        } else if let Some(inst) = g.live.remove(id) {
            g.reserved_mib -= self.functions[inst.function].spec.memory_mib;
            drop(g);
            self.evict_later(id.to_string(), inst.netns);
        }
        self.freed.notify_waiters();
    }

    /// One invocation, from its arrival to its answer.
    async fn invoke(self: Arc<Self>, a: Arrival, seq: u64, t0: Instant) -> Invocation {
        let f = &self.functions[a.function];
        let arrival = t0 + a.at;
        let sent = Instant::now();
        let mut inv = Invocation {
            mode: self.mode.name().into(),
            workload: self.workload(),
            function: f.spec.name.clone(),
            seq,
            arrival_ms: ms(a.at),
            queued_ms: ms(sent.saturating_duration_since(arrival)),
            path: path::NONE.into(),
            start_ms: 0.0,
            exec_ms: 0.0,
            e2e_ms: 0.0,
            ok: false,
            error: None,
            instance: String::new(),
            phases: None,
        };
        let result: Result<()> = async {
            if let Err(e) = &f.image {
                bail!("{e}");
            }
            let (id, ip) = match self.acquire(a.function).await? {
                Got::Warm(id, ip) => {
                    inv.path = path::WARM.into();
                    (id, ip)
                }
                Got::New(id) => {
                    inv.instance = id.clone();
                    let r = self.start(a.function, &id, self.mode == Mode::Trenv).await;
                    let mut g = self.lock();
                    g.starting -= 1;
                    // A start slot came free.
                    self.freed.notify_waiters();
                    match r {
                        Ok((ip, _pid, phases, p, netns)) => {
                            g.live.insert(
                                id.clone(),
                                Instance {
                                    function: a.function,
                                    ip,
                                    busy: true,
                                    last_used: Instant::now(),
                                    netns,
                                },
                            );
                            inv.path = p;
                            inv.phases = Some(phases);
                            (id, ip)
                        }
                        Err(e) => {
                            g.reserved_mib -= f.spec.memory_mib;
                            drop(g);
                            self.freed.notify_waiters();
                            return Err(e.context("start"));
                        }
                    }
                }
            };
            inv.instance = id.clone();
            inv.start_ms = ms(sent.elapsed());
            let t_exec = Instant::now();
            let r = http_get(ip, f.spec.port, &f.spec.request, self.opts.request_timeout).await;
            inv.exec_ms = ms(t_exec.elapsed());
            match r {
                Ok((200, body)) if body.trim_end() == f.spec.answer => {
                    self.release(&id, true);
                    Ok(())
                }
                Ok((status, body)) => {
                    self.release(&id, true);
                    bail!(
                        "wrong answer: status {status}, body {:?}",
                        body.chars().take(80).collect::<String>()
                    )
                }
                Err(e) => {
                    self.release(&id, false);
                    Err(e.context("request"))
                }
            }
        }
        .await;
        inv.e2e_ms = ms(arrival.elapsed().max(sent.elapsed()));
        match result {
            Ok(()) => inv.ok = true,
            Err(e) => {
                inv.error = Some(format!("{e:#}"));
                self.progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.progress.done.fetch_add(1, Ordering::Relaxed);
        if inv.ok {
            self.progress
                .e2e
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(inv.e2e_ms);
        }
        inv
    }

    /// Removes idle instances past the keep-alive.
    fn reap(&self) {
        let ttl = self.opts.keep_alive;
        let mut out = Vec::new();
        {
            let mut g = self.lock();
            let old: Vec<String> = g
                .live
                .iter()
                .filter(|(_, i)| !i.busy && i.last_used.elapsed() >= ttl)
                .map(|(id, _)| id.clone())
                .collect();
            for id in old {
                if let Some(inst) = g.live.remove(&id) {
                    g.reserved_mib -= self.functions[inst.function].spec.memory_mib;
                    out.push((id, inst.netns));
                }
            }
        }
        for (id, ns) in out {
            self.evict_later(id, ns);
        }
        self.freed.notify_waiters();
    }

    fn spares(&self) -> u64 {
        let Ok(text) = std::fs::read_to_string(self.pool_dir.join("metrics.prom")) else {
            return 0;
        };
        text.lines()
            .filter(|l| l.starts_with("trenv_template_spares{"))
            .filter_map(|l| {
                l.split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum()
    }

    fn sample(&self, t: f64) -> MemorySample {
        let pool = if self.mode == Mode::Trenv {
            super::memory::used_kib(&self.mempool_dir)
        } else {
            0
        };
        let device = (pool > 0)
            .then(|| super::memory::smaps_device(&self.mempool_dir))
            .flatten();
        let (pss, usage, _) = super::memory::under(&self.cgroup_parent, device.as_deref());
        let instances = {
            let g = self.lock();
            g.live.len() as u64 + g.starting
        } + self.spares();
        #[allow(clippy::cast_precision_loss)]
        let mib = |k: u64| super::report::round2(k as f64 / 1024.0);
        MemorySample {
            mode: self.mode.name().into(),
            workload: self.workload(),
            t_s: super::report::round2(t),
            instances,
            node_mib: mib(pss + pool),
            cgroup_mib: mib(usage),
            pool_mib: mib(pool),
        }
    }

    fn print_progress(&self, total: usize, t: f64, last: bool) {
        use std::io::IsTerminal as _;
        let tty = std::io::stderr().is_terminal();
        // Without a terminal, a line every 5 s (and the last one).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let second = t.max(0.0) as u64;
        if !tty && !last && !second.is_multiple_of(5) {
            return;
        }
        let done = self.progress.done.load(Ordering::Relaxed);
        let errors = self.progress.errors.load(Ordering::Relaxed);
        let inflight = self.progress.in_flight.load(Ordering::Relaxed);
        let d = super::report::Dist::of(
            &self
                .progress
                .e2e
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mib = *self
            .progress
            .last_mib
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = self.lock().live.len();
        let (start, end) = if tty {
            ("\r", if last { "\n" } else { "" })
        } else {
            ("", "\n")
        };
        eprint!(
            "{start}  {:<10} {:<5} {done:>5}/{total:<5} in flight {inflight:>3} | e2e P50 {:>7.1} P99 {:>7.1} ms | {mib:>7.0} MiB | {live:>3} instances | {errors} errors | {t:>5.0} s {end}",
            self.mode.name(),
            self.workload(),
            d.p50,
            d.p99
        );
    }

    /// Replays `arrivals`; returns every invocation and the per-second memory samples. Ends
    /// with every instance removed.
    pub async fn run(
        self: &Arc<Self>,
        arrivals: Vec<Arrival>,
    ) -> (Vec<Invocation>, Vec<MemorySample>) {
        let t0 = Instant::now();
        let total = arrivals.len();
        self.progress.done.store(0, Ordering::Relaxed);
        self.progress.errors.store(0, Ordering::Relaxed);
        self.progress
            .e2e
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let stop = Arc::new(tokio::sync::Notify::new());
        let samples = Arc::new(Mutex::new(Vec::new()));
        let ticker = {
            let me = Arc::clone(self);
            let samples = Arc::clone(&samples);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop.notified() => return,
                    }
                    let t = t0.elapsed().as_secs_f64();
                    me.reap();
                    let m2 = Arc::clone(&me);
                    if let Ok(s) = tokio::task::spawn_blocking(move || m2.sample(t)).await {
                        *me.progress
                            .last_mib
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = s.node_mib;
                        samples
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(s);
                    }
                    if me.opts.progress {
                        me.print_progress(total, t, false);
                    }
                }
            })
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(self.opts.max_in_flight.max(1)));
        let mut running = Vec::with_capacity(total);
        for (seq, a) in arrivals.into_iter().enumerate() {
            tokio::time::sleep_until((t0 + a.at).into()).await;
            let Ok(permit) = Arc::clone(&gate).acquire_owned().await else {
                break;
            };
            let me = Arc::clone(self);
            me.progress.in_flight.fetch_add(1, Ordering::Relaxed);
            running.push(tokio::spawn(async move {
                let inv = Arc::clone(&me).invoke(a, seq as u64, t0).await;
                me.progress.in_flight.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
                inv
            }));
        }
        let mut out = Vec::with_capacity(total);
        for h in running {
            if let Ok(inv) = h.await {
                out.push(inv);
            }
        }
        stop.notify_one();
        let _ = ticker.await;
        if self.opts.progress {
            self.print_progress(total, t0.elapsed().as_secs_f64(), true);
        }
        self.finish().await;
        // Events of the last starts may trail their answers by a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let told = self
            .told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for inv in &mut out {
            if inv.path != path::WARM {
                if let Some(p) = told.get(&inv.instance) {
                    inv.path = p.clone();
                }
            }
        }
        let samples = std::mem::take(
            &mut *samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        (out, samples)
    }

    /// Removes every instance and waits for all removals.
    pub async fn finish(&self) {
        let all: Vec<(String, Option<String>)> = {
            let mut g = self.lock();
            g.reserved_mib = 0;
            g.live.drain().map(|(id, i)| (id, i.netns)).collect()
        };
        for (id, ns) in all {
            self.evict_later(id, ns);
        }
        let hs = std::mem::take(
            &mut *self
                .teardowns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for h in hs {
            let _ = tokio::time::timeout(Duration::from_secs(60), h).await;
        }
    }

    /// Prepares a mode before its measured run: a CRIU checkpoint of each function (criu),
    /// or its memory template (trenv), taken from one initialised instance. Returns notes on
    /// what could not be prepared.
    pub async fn prepare(self: &Arc<Self>) -> Vec<String> {
        let mut notes = Vec::new();
        if !matches!(self.mode, Mode::Criu | Mode::Trenv) {
            return notes;
        }
        let me = Arc::clone(self);
        let n = self.functions.len();
        let mut checkpoints = BTreeMap::new();
        for fi in 0..n {
            let name = self.functions[fi].spec.name.clone();
            if self.functions[fi].image.is_err() {
                continue;
            }
            let id = format!("prepare-{}-{name}", self.mode.name());
            if self.opts.progress {
                eprintln!(
                    "  {}: preparing {name} ({})",
                    self.mode.name(),
                    if self.mode == Mode::Criu {
                        "checkpoint"
                    } else {
                        "template"
                    }
                );
            }
            let r: Result<()> = async {
                // The checkpoint is taken of an ordinary (non-template) start.
                let (_, _, _, _, netns) = me.start(fi, &id, self.mode == Mode::Trenv).await?;
                let outcome = if self.mode == Mode::Criu {
                    match self.client.checkpoint(&id).await {
                        Ok(d) => {
                            checkpoints.insert(fi, d);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        let b = self
                            .built
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(&id)
                            .copied();
                        match b {
                            Some(true) => break Ok(()),
                            Some(false) => {
                                break Err(anyhow!("template build failed (see the shim's log)"))
                            }
                            None if Instant::now() > deadline => {
                                break Err(anyhow!("template not built within 120 s"))
                            }
                            None => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                };
                self.remove(id.clone(), netns).await;
                outcome
            }
            .await;
            if let Err(e) = r {
                notes.push(format!(
                    "{name}: not prepared ({e:#}); its starts fall back to cold starts"
                ));
            }
        }
        // Only the criu mode keeps descriptors (the trenv shim keeps its templates itself).
        self.checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(checkpoints);
        if self.mode == Mode::Trenv && self.opts.spares > 0 {
            // Spares are restored after each template is built; let them settle.
            let deadline = Instant::now() + Duration::from_secs(30);
            let want = (n * self.opts.spares) as u64;
            while self.spares() < want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        notes
    }
}
