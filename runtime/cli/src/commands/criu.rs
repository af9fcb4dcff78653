//! checkpoint, restore.

use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::unistd::Pid;
use trenv_criu::checkpoint::{self, CheckpointOptions};
use trenv_criu::restore::{self, RestoreOptions};
use trenv_criu::Criu;
use trenv_template::restore::Restoring;

use super::{load, process};
use crate::cli::{Checkpoint, Global, Restore};

pub fn checkpoint(g: &Global, a: &Checkpoint) -> Result<()> {
    let mut c = load(g, &a.id)?;
    let f = &a.criu;
    let opts = CheckpointOptions {
        image_path: f.image_path.clone(),
        work_path: f.work_path.clone(),
        parent_path: a.parent_path.clone(),
        leave_running: a.leave_running || a.pre_dump,
        pre_dump: a.pre_dump,
        tcp_established: f.tcp_established,
        ext_unix_sk: f.ext_unix_sk,
        shell_job: f.shell_job,
        file_locks: f.file_locks,
        link_remap: a.link_remap,
        lazy_pages: f.lazy_pages,
        status_fd: a.status_fd,
        page_server: a.page_server.clone(),
        manage_cgroups_mode: f.manage_cgroups_mode.clone(),
        empty_ns: f.empty_ns.clone(),
        auto_dedup: f.auto_dedup,
        skip_in_flight: false,
        // runc's checkpoint carries every namespace it does not share with the host.
        in_joined_ipc_uts: false,
    };
    checkpoint::checkpoint(&mut c, &Criu::new(&g.criu), &opts)
        .with_context(|| format!("checkpointing container {}", a.id))
}

pub fn restore(g: &Global, a: &Restore) -> Result<u8> {
    tracing::debug!("restore: start");
    if !a.detach && !a.no_subreaper {
        process::become_subreaper()?;
    }
    let f = &a.criu;
    let mut opts = RestoreOptions {
        id: a.id.clone(),
        state_root: g.root.clone(),
        bundle: a.bundle.clone(),
        image_path: f.image_path.clone(),
        work_path: f.work_path.clone(),
        pid_file: a.pid_file.clone(),
        console_socket: a.console_socket.clone(),
        systemd_cgroup: g.systemd_cgroup,
        tcp_established: f.tcp_established,
        ext_unix_sk: f.ext_unix_sk,
        shell_job: f.shell_job,
        file_locks: f.file_locks,
        lazy_pages: f.lazy_pages,
        manage_cgroups_mode: f.manage_cgroups_mode.clone(),
        empty_ns: f.empty_ns.clone(),
        auto_dedup: f.auto_dedup,
        lsm_profile: a.lsm_profile.clone(),
        lsm_mount_context: a.lsm_mount_context.clone(),
        ..Default::default()
    };
    // From a template: its checked image set and pool regions, and its tmpfs mounts staged
    // in the work directory (a fresh one unless given).
    let mut template_work: Option<PathBuf> = None;
    let prepared = match &a.template {
        Some(name) => {
            if f.auto_dedup {
                anyhow::bail!("--auto-dedup would punch holes into the template's images");
            }
            let store = super::template::open_at(&a.template_store)?;
            let criu = super::template::criu_version(g)?;
            let parent = g.root.join(".template-work");
            let work = match &f.work_path {
                Some(w) => w.clone(),
                None => {
                    let w = parent.join(format!("{}-{}", a.id, std::process::id()));
                    template_work = Some(w.clone());
                    w
                }
            };
            // What restores killed half-way staged goes first.
            let swept = match &template_work {
                None => trenv_template::tmpfs::sweep(&work),
                Some(_) => trenv_template::restore::sweep(&parent),
            };
            for s in swept {
                tracing::info!("removed {} left by a killed restore", s.display());
            }
            match Restoring::prepare(&store, name, &criu, &work) {
                Ok(r) => {
                    r.apply(&mut opts);
                    Some(r)
                }
                Err(e) => {
                    if let Some(w) = &template_work {
                        let _ = std::fs::remove_dir_all(w);
                    }
                    let reason = e.reason();
                    return Err(anyhow::Error::new(e).context(format!(
                        "restoring container {} from template {name} (reason: {reason})",
                        a.id
                    )));
                }
            }
        }
        None => None,
    };
    let restored = restore::restore(&Criu::new(&g.criu), &opts);
    drop(prepared);
    if let Some(w) = &template_work {
        // On failure only CRIU's log stays, where the error message points.
        if restored.is_ok() {
            let _ = std::fs::remove_dir_all(w);
        }
    }
    let mut r = restored.with_context(|| match &a.template {
        Some(t) => format!(
            "restoring container {} from template {t} (reason: criu)",
            a.id
        ),
        None => format!("restoring container {}", a.id),
    })?;
    if a.detach {
        return Ok(0);
    }
    let code = process::wait_foreground(Pid::from_raw(r.pid))?;
    r.container.refresh_status()?;
    trenv_oci::lifecycle::delete(&mut r.container, true)
        .with_context(|| format!("deleting container {}", a.id))?;
    Ok(code)
}
