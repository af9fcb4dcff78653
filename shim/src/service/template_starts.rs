//! Template-backed starts in the task service: the plan at Create, the restore (or the
//! fallback to a cold start) at Start, and the background build at readiness.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::struct_::{Struct, Value};
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;

use super::{err, Service};
use crate::annotations::{Annotations, TemplateMode};
use crate::backend::{Backend, Events};
use crate::config::ShimConfig;
use crate::pool::Pool;
use crate::task::{Proc, TemplateTask};
use crate::templates::{Plan, Templates};
use crate::zygote::{MemPool, Request};

/// Event topics, documented in docs/configuration.md.
pub const RESTORED: &str = "/trenv/template/restored";
pub const FALLBACK: &str = "/trenv/template/fallback";
pub const BUILT: &str = "/trenv/template/built";
pub const BUILD_FAILED: &str = "/trenv/template/build-failed";

/// A template event: a google.protobuf.Struct of string fields (`ctr events` prints it).
fn event(fields: &[(&str, &str)]) -> Box<Struct> {
    let mut s = Struct::new();
    for (k, v) in fields {
        let mut val = Value::new();
        val.set_string_value((*v).to_string());
        s.fields.insert((*k).to_string(), val);
    }
    Box::new(s)
}

impl<B: Backend, E: Events> Service<B, E> {
    /// What a new container does with its template, from its spec before placement.
    pub(super) fn template_plan(
        &self,
        req: &api::CreateTaskRequest,
        bundle: &Path,
        annotations: &Annotations,
        config: &ShimConfig,
    ) -> Option<Plan> {
        let templates = self.templates.as_ref()?;
        // Most containers ask for no template: they pay nothing here.
        if annotations.template == TemplateMode::Off || !req.checkpoint.is_empty() {
            return None;
        }
        let path = bundle.join("config.json");
        let spec: serde_json::Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        let plan = templates.plan(
            annotations,
            &spec,
            &req.rootfs,
            &config.criu_path,
            req.terminal,
        )?;
        match &plan.miss {
            None => log::info!("{}: starts from template {}", req.id, plan.name),
            Some(reason) => {
                templates.missed(reason);
                log::info!(
                    "{}: template {} not used ({reason}){}",
                    req.id,
                    plan.name,
                    if plan.build && annotations.ready.is_some() {
                        "; built once this instance is ready"
                    } else if plan.build {
                        "; not built: the container has no io.trenv.ready"
                    } else {
                        ""
                    }
                );
                self.write_metrics();
            }
        }
        Some(plan)
    }

    pub(super) fn write_metrics(&self) {
        if let Some(pool) = &self.pool {
            pool.write_metrics();
        }
    }

    /// Publishes a template event (queued, like every event: the start it reports on does
    /// not wait for containerd).
    pub(super) fn publish_template(&self, topic: &str, fields: &[(&str, &str)]) {
        self.events.publish(topic, &self.namespace, event(fields));
    }

    /// Restores the init of `id` from its template; on any failure, undoes what the restore
    /// left and starts the init cold instead (same stdio). The pid and terminal master.
    pub(super) fn start_from_template(
        &self,
        id: &str,
        root: PathBuf,
        config: &ShimConfig,
        p: &Proc,
        tt: TemplateTask,
    ) -> TtrpcResult<(i32, Option<Arc<std::fs::File>>)> {
        let plan = tt
            .plan
            .clone()
            .ok_or_else(|| err(Code::INTERNAL, "template task without a plan"))?;
        let templates = self
            .templates
            .clone()
            .ok_or_else(|| err(Code::INTERNAL, "templates are off"))?;
        let (bundle, criu_opts) =
            self.with_proc(id, "", |t, _| (t.bundle.clone(), t.criu.clone()))?;
        let started = Instant::now();
        // Templates are for containers without a terminal: the stdio are containerd's FIFOs.
        let (stdio, fds) = self.open_stdio(id, p, config)?;
        let request = Request::RestoreTemplate {
            root: root.clone(),
            id: id.to_string(),
            bundle: bundle.clone(),
            criu: config.criu_path.clone(),
            store: templates.config().store.clone(),
            template: plan.name.clone(),
            work: Templates::work_dir(&root, id),
            stdio,
            systemd: config.systemd_cgroup,
            criu_opts,
            // Outside a pooled sandbox, namespace paths in the spec are the container's
            // own choice (a pod's): joined, as a cold start would.
            join_ipc_uts: tt.sandbox_uts.is_none(),
        };
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let res = self
            .backend
            .call(&request, &raw, self.timeouts.for_request(&request));
        drop(fds);
        let failure = match res {
            Ok(Some(pid)) => {
                let secs = started.elapsed().as_secs_f64();
                templates.restored(id, &plan.name, secs);
                if let Some(pool) = &self.pool {
                    pool.mark_template(id, &plan.name);
                }
                self.with_proc(id, "", |t, _| {
                    if let Some(tt) = t.template.as_mut() {
                        tt.restore = false;
                        tt.restored = Some(plan.name.clone());
                    }
                })?;
                self.watch_oom(id);
                log::info!(
                    "{id}: restored from template {} in {:.1} ms",
                    plan.name,
                    secs * 1e3
                );
                self.write_metrics();
                let pid_text = pid.to_string();
                self.publish_template(
                    RESTORED,
                    &[
                        ("container_id", id),
                        ("template", &plan.name),
                        ("pid", &pid_text),
                    ],
                );
                self.refill_spares(tt.spare_source.as_ref());
                return Ok((pid, None));
            }
            Ok(None) => ("restore".to_string(), "restore returned no pid".to_string()),
            Err(e) => (e.reason().to_string(), e.to_string()),
        };
        let (reason, message) = failure;
        log::warn!(
            "{id}: template {} unusable ({reason}): {message}; starting cold",
            plan.name
        );
        templates.fell_back(&plan.key, &reason);
        self.write_metrics();
        self.publish_template(
            FALLBACK,
            &[
                ("container_id", id),
                ("template", &plan.name),
                ("reason", &reason),
                ("error", &message),
            ],
        );
        // What the restore left: state, CRIU's root mount, the cgroup and its processes.
        let undo = Request::Delete {
            root: root.clone(),
            id: id.to_string(),
            force: true,
            bundle: Some(bundle.clone()),
        };
        if let Err(e) = self.call(&undo, &[]) {
            log::warn!("{id}: cleaning up after a failed template restore: {e}");
        }
        // A restore killed during CRIU left its staged tmpfs mounts behind.
        let work = Templates::work_dir(&root, id);
        for m in trenv_template::restore::sweep(&work) {
            log::info!("{id}: removed {} left by the killed restore", m.display());
        }
        let _ = std::fs::remove_dir_all(&work);
        // Only a damaged or outdated template is worth rebuilding: after a CRIU failure or
        // timeout the same template would fail again.
        let rebuild = matches!(
            reason.as_str(),
            "corrupt" | "stale" | "missing" | "pool-missing" | "pool" | "io"
        );
        self.with_proc(id, "", |t, _| {
            if let Some(tt) = t.template.as_mut() {
                tt.restore = false;
                tt.build = rebuild;
            }
        })?;
        let (pid, master) =
            self.launch(id, p, config, |console_socket, stdio| Request::Create {
                root: root.clone(),
                id: id.to_string(),
                bundle: bundle.clone(),
                console_socket,
                stdio,
                systemd: config.systemd_cgroup,
                no_pivot: config.no_pivot_root,
                sandbox_uts: tt.sandbox_uts.clone(),
            })?;
        let pid = pid.ok_or_else(|| err(Code::INTERNAL, "create returned no pid"))?;
        self.watch_oom(id);
        self.call(
            &Request::Start {
                root,
                id: id.to_string(),
            },
            &[],
        )?;
        Ok((pid, master))
    }

    /// After a cold start reached readiness: takes the task's template. The dump happens
    /// here, before Start returns, so the template holds the initialised state and nothing
    /// of a request (another tenant's data must never reach a template); the conversion into
    /// the store runs in the background at the pool's background priority. One build per key.
    pub(super) fn build_template(&self, id: &str, config: &ShimConfig) {
        let Some(templates) = self.templates.clone() else {
            return;
        };
        let Ok((root, criu_opts, Some(tt))) = self.with_proc(id, "", |t, _| {
            (t.root.clone(), t.criu.clone(), t.template.clone())
        }) else {
            return;
        };
        let Some(plan) = tt.plan.filter(|_| tt.build) else {
            return;
        };
        if !templates.begin_build(&plan.key) {
            log::info!("{id}: template {} is being built already", plan.name);
            return;
        }
        let cfg = templates.config().clone();
        let images = cfg
            .store
            .join(format!(".checkpoint-{id}-{}", std::process::id()));
        let job = BuildJob {
            spares: self.spare_filler.clone().zip(tt.spare_source.clone()),
            backend: self.backend.clone(),
            events: self.events.clone(),
            namespace: self.namespace.clone(),
            templates,
            pool: self.pool.clone(),
            tasks: self.tasks.clone(),
        };
        let started = Instant::now();
        let dump = Request::TemplateDump {
            root,
            id: id.to_string(),
            criu: config.criu_path.clone(),
            images: images.clone(),
            criu_opts,
            // A pod's namespaces stay the pod's; a pooled sandbox's are carried in the
            // images, as its restores expect (`join_ipc_uts` at restore is the mirror).
            in_joined_ipc_uts: tt.sandbox_uts.is_none(),
        };
        if let Err(e) = self
            .backend
            .call(&dump, &[], self.timeouts.for_request(&dump))
        {
            job.failed(id, &plan, &e);
            return;
        }
        log::info!(
            "{id}: checkpointed for template {} in {:.1} ms",
            plan.name,
            started.elapsed().as_secs_f64() * 1e3
        );
        let build = Request::Background {
            nice: config.pool.background_nice,
            request: Box::new(Request::BuildTemplate {
                criu: config.criu_path.clone(),
                store: cfg.store.clone(),
                name: plan.name.clone(),
                key: plan.key.clone(),
                images,
                pool: MemPool {
                    kind: cfg.pool_kind.clone(),
                    dir: cfg.pool_dir.clone(),
                    name: cfg.pool_name.clone(),
                    capacity: cfg.pool_capacity_mib << 20,
                },
            }),
        };
        let deadline = self.timeouts.for_request(&build);
        let id = id.to_string();
        let spawned = std::thread::Builder::new()
            .name("template-build".into())
            .spawn(move || job.run(&id, &plan, &build, deadline, started));
        if let Err(e) = spawned {
            log::warn!("template build thread: {e}");
        }
    }
}

/// A background build and what it reports to.
struct BuildJob<B: Backend, E: Events> {
    /// Where a spare of the new template goes, and what it is restored like.
    spares: Option<(
        Arc<super::spare_starts::Filler<B>>,
        Arc<crate::spares::Source>,
    )>,
    backend: Arc<B>,
    events: Arc<E>,
    namespace: String,
    templates: Arc<Templates>,
    pool: Option<Arc<Pool>>,
    tasks: Arc<crate::task::Tasks>,
}

impl<B: Backend, E: Events> BuildJob<B, E> {
    fn run(
        &self,
        id: &str,
        plan: &Plan,
        request: &Request,
        deadline: std::time::Duration,
        started: Instant,
    ) {
        log::info!(
            "{id}: building template {} (key {})",
            plan.name,
            &plan.key[..16.min(plan.key.len())]
        );
        if let Err(e) = self.backend.call(request, &[], deadline) {
            self.failed(id, plan, &e);
            return;
        }
        let secs = started.elapsed().as_secs_f64();
        self.templates.end_build(&plan.key, Ok(secs));
        log::info!("{id}: template {} built in {secs:.2}s", plan.name);
        let secs_text = format!("{secs:.3}");
        self.events.publish(
            BUILT,
            &self.namespace,
            event(&[
                ("container_id", id),
                ("template", &plan.name),
                ("seconds", &secs_text),
            ]),
        );
        self.write_metrics();
        if let Some((filler, source)) = &self.spares {
            filler.refill(source.clone());
        }
    }

    fn failed(&self, id: &str, plan: &Plan, e: &crate::zygote::ZygoteError) {
        let reason = e.reason().to_string();
        self.templates.end_build(&plan.key, Err(&reason));
        log::warn!(
            "{id}: building template {} failed ({reason}): {e}",
            plan.name
        );
        // A dump killed half-way leaves the container frozen.
        let paused = self
            .tasks
            .with_proc(id, "", |t, _| t.paused)
            .unwrap_or(true);
        if !paused {
            thaw(&self.tasks, id);
        }
        self.events.publish(
            BUILD_FAILED,
            &self.namespace,
            event(&[
                ("container_id", id),
                ("template", &plan.name),
                ("reason", &reason),
                ("error", &e.to_string()),
            ]),
        );
        self.write_metrics();
    }

    fn write_metrics(&self) {
        if let Some(pool) = &self.pool {
            pool.write_metrics();
        }
    }
}

/// Thaws the cgroup of task `id` (libcontainer's record of it).
fn thaw(tasks: &crate::task::Tasks, id: &str) {
    use libcgroups::common::CgroupManager;
    let Ok((root, systemd)) =
        tasks.with_proc(id, "", |t, _| (t.root.clone(), t.config.systemd_cgroup))
    else {
        return;
    };
    let res = libcontainer::container::Container::load(root.join(id))
        .map_err(|e| e.to_string())
        .and_then(|c| c.spec().map_err(|e| e.to_string()))
        .and_then(|s| {
            libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
                cgroup_path: s.cgroup_path,
                systemd_cgroup: systemd,
                container_name: id.to_string(),
            })
            .map_err(|e| e.to_string())
        })
        .and_then(|m| {
            m.freeze(libcgroups::common::FreezerState::Thawed)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = res {
        log::warn!("{id}: thawing after a failed template build: {e}");
    }
}
