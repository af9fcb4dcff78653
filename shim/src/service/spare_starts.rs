//! Spare instances in the task service: filling them in the background, a Create taking one
//! over, and discarding them (dead, drained). See [`crate::spares`].

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use containerd_shim::api;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use libcgroups::common::CgroupManager;

use super::{err, Service};
use crate::annotations::Annotations;
use crate::backend::{Backend, Events};
use crate::config::{ShimConfig, Timeouts};
use crate::placement::{self, Plan as Placement};
use crate::pool::{Claim, Pool};
use crate::spares::{self, Source, Spare, Spares};
use crate::task::{Proc, Task, TemplateTask};
use crate::templates::{Plan, Templates};
use crate::zygote::{Request, SandboxUts, Stdio};

/// How long after a start its replacement spare's restore begins.
const REFILL_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Fills and discards spares; shared with the threads that do it.
pub struct Filler<B: Backend> {
    backend: Arc<B>,
    pool: Arc<Pool>,
    templates: Arc<Templates>,
    pub spares: Arc<Spares>,
    timeouts: Timeouts,
    /// Leftovers of an earlier shim were removed.
    swept: AtomicBool,
    next: AtomicU64,
}

/// The cgroup manager of a spec's cgroup path.
fn cgroup_of(
    spec_path: &Path,
    systemd: bool,
    name: &str,
) -> Result<libcgroups::common::AnyCgroupManager, String> {
    let spec = libcontainer::oci_spec::runtime::Spec::load(spec_path)
        .map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .ok_or_else(|| format!("{}: no cgroupsPath", spec_path.display()))?;
    libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: path,
        systemd_cgroup: systemd,
        container_name: name.to_string(),
    })
    .map_err(|e| e.to_string())
}

impl<B: Backend> Filler<B> {
    pub fn new(
        backend: Arc<B>,
        pool: Arc<Pool>,
        templates: Arc<Templates>,
        timeouts: Timeouts,
    ) -> Arc<Self> {
        let target = templates.config().spares;
        Arc::new(Self {
            backend,
            pool,
            templates,
            spares: Arc::new(Spares::new(target)),
            timeouts,
            swept: AtomicBool::new(false),
            next: AtomicU64::new(0),
        })
    }

    /// Makes another spare like `source` in the background, unless one is being made or
    /// enough are ready.
    pub fn refill(self: &Arc<Self>, source: Arc<Source>) {
        self.refill_after(source, std::time::Duration::ZERO);
    }

    /// The same, after `delay`: a restore started at once would compete with the start
    /// that just took a spare (CPU, and the kernel's cgroup and mount locks).
    pub fn refill_after(self: &Arc<Self>, source: Arc<Source>, delay: std::time::Duration) {
        if !self.spares.begin_fill(&source.key) {
            return;
        }
        let me = self.clone();
        let key = source.key.clone();
        let spawned = std::thread::Builder::new()
            .name("template-spare".into())
            .spawn(move || {
                std::thread::sleep(delay);
                let key = source.key.clone();
                let started = Instant::now();
                let made = me.make(&source).map_err(|e| {
                    log::warn!("spare of template {}: {e}", source.plan.name);
                });
                if let Ok(s) = &made {
                    log::info!(
                        "spare {} of template {} ready (pid {}) in {:.1} ms",
                        s.id,
                        s.template,
                        s.pid,
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
                if let Some(extra) = me.spares.end_fill(&key, made) {
                    me.discard(extra);
                }
                me.pool.write_metrics();
            });
        if let Err(e) = spawned {
            log::warn!("spare thread: {e}");
            let _ = self.spares.end_fill(&key, Err(()));
        }
    }

    /// Restores one instance like `source` into a sandbox of its own and freezes it.
    fn make(&self, source: &Source) -> Result<Spare, String> {
        self.sweep_once(&source.root);
        let id = format!(
            "{}{}-{}",
            spares::PREFIX,
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let dir = source.root.join(spares::DIR).join(&id);
        let mut acquired = false;
        let mut restoring = false;
        let made = self.restore_into(source, &id, &dir, &mut acquired, &mut restoring);
        if made.is_err() {
            self.undo(&source.root, &id, &dir, acquired, restoring);
        }
        made
    }

    fn restore_into(
        &self,
        source: &Source,
        id: &str,
        dir: &Path,
        acquired: &mut bool,
        restoring: &mut bool,
    ) -> Result<Spare, String> {
        let cfg = &source.config;
        let bundle = dir.join("bundle");
        for d in [bundle.join("rootfs"), dir.join("upper"), dir.join("work")] {
            std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let mounts = spares::private_rootfs(&source.rootfs, dir)
            .ok_or("its rootfs is not one overlay mount")?;
        crate::rootfs::mount_bundle(&bundle, &mounts)?;
        let mut spec = source.spec.clone();
        let Placement::Pool { memory, tainted } = placement::plan(&spec) else {
            return Err("its spec cannot go into a sandbox".into());
        };
        let function = placement::function_key(&spec, source.annotations.function.as_deref());
        let claim = Claim {
            container: id,
            function: &function,
            memory,
            tainted,
        };
        let (sb, _) = self.pool.acquire(&claim)?;
        *acquired = true;
        placement::apply(&mut spec, &sb);
        let bytes = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
        std::fs::write(bundle.join("config.json"), bytes)
            .map_err(|e| format!("writing the spare's spec: {e}"))?;
        let all = Stdio {
            stdin: true,
            stdout: true,
            stderr: true,
        };
        let (fds, ends) = crate::stdio::pipes(all, (cfg.io_uid, cfg.io_gid))
            .map_err(|e| format!("stdio pipes: {e}"))?;
        let restore = Request::RestoreTemplate {
            root: source.root.clone(),
            id: id.to_string(),
            bundle: bundle.clone(),
            criu: cfg.criu_path.clone(),
            store: self.templates.config().store.clone(),
            template: source.plan.name.clone(),
            work: Templates::work_dir(&source.root, id),
            stdio: all,
            systemd: cfg.systemd_cgroup,
            criu_opts: source.annotations.criu.clone(),
            // Spares are restored into pooled sandboxes, whose namespaces the images carry.
            join_ipc_uts: false,
        };
        let deadline = self.timeouts.for_request(&restore);
        let request = Request::Background {
            nice: cfg.pool.background_nice,
            request: Box::new(restore),
        };
        *restoring = true;
        let raw: Vec<_> = fds.iter().map(OwnedFd::as_raw_fd).collect();
        let pid = self
            .backend
            .call(&request, &raw, deadline)
            .map_err(|e| format!("restore: {e}"))?
            .ok_or("restore returned no pid")?;
        drop(fds);
        // Frozen, it neither runs nor can tell it waited.
        cgroup_of(&bundle.join("config.json"), cfg.systemd_cgroup, id)
            .and_then(|m| {
                m.freeze(libcgroups::common::FreezerState::Frozen)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| format!("freezing: {e}"))?;
        if let Err(e) = spares::prefault(pid) {
            log::debug!("{id}: prefaulting: {e}");
        }
        self.pool.mark_template(id, &source.plan.name);
        let thaw = spares::thaw_file(&spec);
        Ok(Spare {
            thaw,
            resources: spec["linux"]["resources"].clone(),
            cgroup: std::path::PathBuf::from(
                spec["linux"]["cgroupsPath"].as_str().unwrap_or_default(),
            ),

            id: id.to_string(),
            template: source.plan.name.clone(),
            pid,
            dir: dir.to_path_buf(),
            root: source.root.clone(),
            ends,
            sandbox_uts: Some(SandboxUts {
                ns: std::path::PathBuf::from(sb.holder.ns_path("uts")),
                hostname: spec["hostname"].as_str().map(str::to_string),
                domainname: spec["domainname"].as_str().map(str::to_string),
            }),
        })
    }

    /// Removes what a spare (or a failed fill) holds: its processes and runtime state, the
    /// staged mounts of its restore, its sandbox, its rootfs and directory.
    fn undo(&self, root: &Path, id: &str, dir: &Path, acquired: bool, restoring: bool) {
        if restoring {
            // cgroup v1's freezer holds even SIGKILL until the thaw.
            let config = dir.join("bundle").join("config.json");
            if config.exists() {
                if let Err(e) = cgroup_of(&config, false, id).and_then(|m| {
                    m.freeze(libcgroups::common::FreezerState::Thawed)
                        .map_err(|e| e.to_string())
                }) {
                    log::debug!("{id}: thawing the spare: {e}");
                }
            }
            let delete = Request::Delete {
                root: root.to_path_buf(),
                id: id.to_string(),
                force: true,
                bundle: Some(dir.join("bundle")),
            };
            if let Err(e) = self
                .backend
                .call(&delete, &[], self.timeouts.for_request(&delete))
            {
                log::warn!("{id}: removing the spare: {e}");
            }
            let work = Templates::work_dir(root, id);
            trenv_template::restore::sweep(&work);
            let _ = std::fs::remove_dir_all(&work);
        }
        if acquired {
            self.pool.release(id);
        }
        spares::remove_dir(dir);
    }

    pub fn discard(&self, spare: Spare) {
        log::info!("discarding spare {} (pid {})", spare.id, spare.pid);
        let Spare {
            id,
            dir,
            root,
            ends,
            ..
        } = spare;
        drop(ends);
        self.undo(&root, &id, &dir, true, true);
        self.spares.discarded(1);
        self.pool.write_metrics();
    }

    /// Discards every ready spare; with `close`, for good (a drain).
    pub fn discard_all(&self, close: bool) {
        for s in self.spares.take_all(close) {
            self.discard(s);
        }
    }

    /// Removes spares an earlier shim left (it was killed): their runtime state and
    /// processes, rootfs and directories. Their sandboxes were in use, so the pool
    /// destroys them when it adopts the earlier shim's records.
    fn sweep_once(&self, root: &Path) {
        if self.swept.swap(true, Ordering::SeqCst) {
            return;
        }
        let mine = format!("{}{}-", spares::PREFIX, std::process::id());
        let theirs = |name: &str| name.starts_with(spares::PREFIX) && !name.starts_with(&mine);
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if theirs(&name) {
                log::info!("removing spare {name} left by an earlier shim");
                let dir = root.join(spares::DIR).join(&name);
                self.undo(root, &name, &dir, false, true);
            }
        }
        let dirs = root.join(spares::DIR);
        for e in std::fs::read_dir(&dirs).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if theirs(&name) {
                spares::remove_dir(&e.path());
            }
        }
    }
}

impl<B: Backend, E: Events> Service<B, E> {
    /// What a spare of this container is restored from, when spares are on and the
    /// container is one a spare can stand in for.
    pub(super) fn spare_source(
        &self,
        req: &api::CreateTaskRequest,
        bundle: &Path,
        annotations: &Annotations,
        config: &ShimConfig,
        plan: Option<&Plan>,
        root: &Path,
    ) -> Option<Arc<Source>> {
        let filler = self.spare_filler.as_ref()?;
        let plan = plan?;
        if !filler.spares.enabled() || plan.key.is_empty() || req.terminal {
            return None;
        }
        let spec = std::fs::read(bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        Some(Arc::new(Source {
            key: spares::key_of(&plan.key, &spec),
            plan: plan.clone(),
            spec,
            rootfs: req.rootfs.to_vec(),
            annotations: annotations.clone(),
            config: config.clone(),
            root: root.to_path_buf(),
        }))
    }

    /// Starts making a spare like this task's instance, when it has a usable template: in
    /// a while, so that the restore does not slow down the start that just happened.
    pub(super) fn refill_spares(&self, source: Option<&Arc<Source>>) {
        if let (Some(filler), Some(source)) = (&self.spare_filler, source) {
            if filler.spares.wanted(&source.key) {
                filler.refill_after(source.clone(), REFILL_DELAY);
            }
        }
    }

    /// Create of a container whose template has a spare ready: the spare becomes the
    /// container's init. None when there is no live spare (the usual Create goes on).
    pub(super) fn create_from_spare(
        &self,
        req: &api::CreateTaskRequest,
        config: &ShimConfig,
        annotations: &Annotations,
        plan: &Plan,
        source: Option<Arc<Source>>,
        root: &Path,
    ) -> TtrpcResult<Option<i32>> {
        let Some(filler) = self.spare_filler.clone() else {
            return Ok(None);
        };
        if !plan.restore() || req.terminal {
            return Ok(None);
        }
        let started = Instant::now();
        let Some(source) = source else {
            return Ok(None);
        };
        let key = source.key.clone();
        let spare = loop {
            let Some(s) = filler.spares.take(&key) else {
                return Ok(None);
            };
            if s.alive() && s.root == root {
                break s;
            }
            log::warn!("spare {} (pid {}) is gone; discarded", s.id, s.pid);
            filler.discard(s);
        };
        // The gauge drops now (a platform waiting for a spare must not see this one), but
        // the file is written off the start's path.
        let pool = filler.pool.clone();
        let _ = std::thread::Builder::new()
            .name("spare-metrics".into())
            .spawn(move || pool.write_metrics());
        let id = req.id.as_str();
        if let Err(e) = self.take_over(req, config, &source, &spare) {
            log::warn!(
                "{id}: taking over spare {}: {e}; restoring instead",
                spare.id
            );
            filler.discard(spare);
            return Ok(None);
        }
        let Spare {
            id: spare_id,
            template,
            pid,
            dir,
            ends,
            sandbox_uts,
            thaw,
            cgroup,
            ..
        } = spare;
        let streams = crate::stdio::Streams {
            id,
            namespace: &self.namespace,
            stdin: &req.stdin,
            stdout: &req.stdout,
            stderr: &req.stderr,
            owner: (config.io_uid, config.io_gid),
            pipe_all: false,
        };
        // The process is the container's now: a failure from here on fails the Create, and
        // the instance goes with everything it holds under the container's name.
        let fail = |e: containerd_shim::protos::ttrpc::Error| {
            filler.undo(root, id, &dir, true, true);
            e
        };
        crate::stdio::attach(&streams, ends)
            .map_err(|e| fail(err(Code::INVALID_ARGUMENT, format!("opening stdio: {e}"))))?;
        let p = Proc {
            pid,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            ..Default::default()
        };
        let mut task = Task {
            bundle: dir.join("bundle"),
            root: root.to_path_buf(),
            config: config.clone(),
            criu: annotations.criu.clone(),
            rootfs_mounted: true,
            pooled: true,
            ready: annotations.ready.clone(),
            template: Some(TemplateTask {
                plan: Some(plan.clone()),
                restored: Some(template.clone()),
                sandbox_uts,
                spare_source: Some(source.clone()),
                ..Default::default()
            }),
            spare: Some(dir.clone()),
            spare_thaw: thaw,
            ..Default::default()
        };
        task.procs.insert(String::new(), p);
        self.tasks
            .insert(id, task)
            .map_err(|e| fail(super::task_err(e)))?;
        let secs = started.elapsed().as_secs_f64();
        if let Some(t) = &self.templates {
            t.restored(id, &template, secs);
        }
        self.watch_oom_at(id, &cgroup);
        log::info!(
            "{id}: took over spare {spare_id} of template {template} in {:.2} ms",
            secs * 1e3
        );
        let pid_text = pid.to_string();
        self.publish_template(
            super::template_starts::RESTORED,
            &[
                ("container_id", id),
                ("template", &template),
                ("pid", &pid_text),
                ("spare", "true"),
            ],
        );
        Ok(Some(pid))
    }

    /// Renames the spare's sandbox and runtime state to the container and gives its cgroup
    /// the container's limits.
    fn take_over(
        &self,
        req: &api::CreateTaskRequest,
        config: &ShimConfig,
        source: &Source,
        spare: &Spare,
    ) -> Result<(), String> {
        let pool = self.pool.as_ref().ok_or("no pool")?;
        pool.transfer(&spare.id, &req.id)?;
        let renamed = spares::rename_state(&spare.root, &spare.id, &req.id)
            .map_err(|e| format!("runtime state: {e}"));
        let limited = renamed.and_then(|()| {
            // The same limits as the spare's (the usual case: the memory limit is part of
            // the key) need no cgroup writes.
            let wanted = &source.spec["linux"]["resources"];
            if *wanted == spare.resources {
                return Ok(());
            }
            let wanted: Option<libcontainer::oci_spec::runtime::LinuxResources> =
                serde_json::from_value(wanted.clone()).map_err(|e| format!("resources: {e}"))?;
            let resources = wanted.unwrap_or_default();
            cgroup_of(
                &spare.bundle().join("config.json"),
                config.systemd_cgroup,
                &req.id,
            )?
            .apply(&libcgroups::common::ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| format!("limits: {e}"))
        });
        if let Err(e) = limited {
            // Back to the spare's names, for the discard.
            let _ = spares::rename_state(&spare.root, &req.id, &spare.id);
            let _ = pool.transfer(&req.id, &spare.id);
            return Err(e);
        }
        Ok(())
    }

    /// Start of a task that took over a spare: thaws it, then has the spare replaced (the
    /// replacement's fill writes the metrics when it ends).
    pub(super) fn start_spare(&self, id: &str, pid: i32) -> TtrpcResult<i32> {
        self.thaw_spare(id)?;
        let source = self.with_proc(id, "", |t, _| {
            t.template.as_ref().and_then(|tt| tt.spare_source.clone())
        })?;
        self.refill_spares(source.as_ref());
        Ok(pid)
    }

    /// Thaws the cgroup of a task that took over a spare: one write to the freezer file
    /// found when the spare was frozen, else through libcgroups.
    pub(super) fn thaw_spare(&self, id: &str) -> TtrpcResult<()> {
        let file = self.with_proc(id, "", |t, _| t.spare_thaw.clone())?;
        if let Some((path, value)) = file {
            if std::fs::write(&path, value).is_ok() {
                return Ok(());
            }
        }
        self.cgroup(id)?
            .freeze(libcgroups::common::FreezerState::Thawed)
            .map_err(|e| err(Code::INTERNAL, format!("thawing: {e}")))
    }
}
