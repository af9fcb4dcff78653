//! create, start, run, state, kill, delete, list.

use anyhow::{bail, Context, Result};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use serde::Serialize;

use super::{exists, load, process, rootfs_of, write_json};
use crate::cli::{Create, Delete, Global, Kill, List, Run};

/// The `state` output runc prints (and go-runc parses).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuncState {
    oci_version: String,
    id: String,
    pid: i32,
    status: ContainerStatus,
    bundle: std::path::PathBuf,
    rootfs: std::path::PathBuf,
    created: Option<chrono::DateTime<chrono::Utc>>,
    owner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<std::collections::HashMap<String, String>>,
}

impl RuncState {
    fn of(c: &Container) -> Self {
        let status = c.status();
        let pid = match status {
            ContainerStatus::Stopped => 0,
            _ => c.pid().map(|p| p.as_raw()).unwrap_or(0),
        };
        Self {
            oci_version: c.state.oci_version.clone(),
            id: c.id().to_string(),
            pid,
            status,
            bundle: c.bundle().clone(),
            rootfs: rootfs_of(c.bundle()),
            created: c.created(),
            owner: c
                .creator()
                .map(|o| o.to_string_lossy().into_owned())
                .unwrap_or_default(),
            annotations: c.state.annotations.clone(),
        }
    }
}

fn build(g: &Global, a: &Create, detach: bool) -> Result<Container> {
    if exists(g, &a.id)? {
        bail!("container {} already exists", a.id);
    }
    // Fail early with a readable message rather than libcontainer's deep one.
    trenv_oci::bundle::Bundle::load(&a.bundle)?;
    trenv_oci::lifecycle::check_oom_score_adj(&a.bundle)?;
    let container = ContainerBuilder::new(a.id.clone(), SyscallType::default())
        .with_executor(trenv_oci::executor::Executor::new())
        .with_root_path(&g.root)?
        .with_pid_file(a.pid_file.as_ref())?
        .with_console_socket(a.console_socket.as_ref())
        .with_preserved_fds(a.preserve_fds)
        .validate_id()?
        .as_init(&a.bundle)
        .with_systemd(g.systemd_cgroup)
        .with_detach(detach)
        .with_no_pivot(a.no_pivot)
        .build()?;
    if let Err(e) = trenv_oci::lifecycle::apply_oom_killer_setting(&container) {
        let mut c = container;
        let _ = trenv_oci::lifecycle::delete(&mut c, true);
        return Err(e.into());
    }
    Ok(container)
}

pub fn create(g: &Global, a: &Create) -> Result<()> {
    build(g, a, true).with_context(|| format!("creating container {}", a.id))?;
    Ok(())
}

pub fn start(g: &Global, id: &str) -> Result<()> {
    let mut c = load(g, id)?;
    c.start()
        .with_context(|| format!("starting container {id}"))?;
    Ok(())
}

pub fn run(g: &Global, a: &Run) -> Result<u8> {
    if !a.detach && !a.no_subreaper {
        process::become_subreaper()?;
    }
    let mut c = build(g, &a.create, a.detach)
        .with_context(|| format!("creating container {}", a.create.id))?;
    if let Err(e) = c.start() {
        let _ = trenv_oci::lifecycle::delete(&mut c, true);
        return Err(e).with_context(|| format!("starting container {}", a.create.id));
    }
    if a.detach {
        return Ok(0);
    }
    let pid = c.pid().context("container has no init pid")?;
    let code = process::wait_foreground(pid)?;
    if !a.keep {
        c.refresh_status()?;
        trenv_oci::lifecycle::delete(&mut c, true)
            .with_context(|| format!("deleting container {}", a.create.id))?;
    }
    Ok(code)
}

pub fn state(g: &Global, id: &str) -> Result<()> {
    let c = load(g, id)?;
    write_json(&RuncState::of(&c))
}

pub fn kill(g: &Global, a: &Kill) -> Result<()> {
    let mut c = load(g, &a.id)?;
    let sig = libcontainer::signal::Signal::try_from(a.signal.as_str())
        .with_context(|| format!("invalid signal {:?}", a.signal))?;
    if !a.all && c.status() == ContainerStatus::Stopped {
        bail!("container not running");
    }
    c.kill(sig, a.all)
        .with_context(|| format!("signalling container {}", a.id))?;
    Ok(())
}

pub fn delete(g: &Global, a: &Delete) -> Result<()> {
    if !exists(g, &a.id)? {
        if a.force {
            return Ok(());
        }
        bail!("container {} does not exist", a.id);
    }
    let mut c = load(g, &a.id)?;
    trenv_oci::lifecycle::delete(&mut c, a.force)
        .with_context(|| format!("deleting container {}", a.id))?;
    Ok(())
}

pub fn list(g: &Global, a: &List) -> Result<()> {
    let mut states = Vec::new();
    if g.root.exists() {
        let mut ids: Vec<String> = std::fs::read_dir(&g.root)
            .with_context(|| format!("reading {:?}", g.root))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("state.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        for id in ids {
            match load(g, &id) {
                Ok(c) => states.push(RuncState::of(&c)),
                Err(e) => tracing::warn!("skipping {id}: {e:#}"),
            }
        }
    }
    match a.format.as_str() {
        "json" => write_json(&states),
        "table" => {
            if a.quiet {
                for s in &states {
                    println!("{}", s.id);
                }
                return Ok(());
            }
            println!(
                "{:<24} {:<8} {:<10} {:<40} {:<32} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &states {
                let status = serde_json::to_value(s.status)?;
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {:<32} {}",
                    s.id,
                    s.pid,
                    status.as_str().unwrap_or("unknown"),
                    s.bundle.display(),
                    s.created.map(|c| c.to_rfc3339()).unwrap_or_default(),
                    s.owner
                );
            }
            Ok(())
        }
        other => bail!("invalid format {other:?} (table or json)"),
    }
}
