//! Parts of the container life cycle where libcontainer 0.7 differs from runc and the
//! runtime specification; both the `trenv` CLI and the shim go through these.

use std::path::Path;

use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::oci_spec::runtime::Spec;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Container(#[from] LibcontainerError),
    #[error("reading the spec of {bundle}: {reason}")]
    Spec { bundle: String, reason: String },
    #[error("disabling the OOM killer of cgroup {cgroup}: {source}")]
    OomKiller {
        cgroup: String,
        source: std::io::Error,
    },
    #[error("saving the runtime config of {id}: {reason}")]
    Config { id: String, reason: String },
    #[error(
        "process.oomScoreAdj {wanted} is below this runtime's own ({current}), and lowering it \
         needs CAP_SYS_RESOURCE, which this runtime does not have (runc fails the same way); \
         raise the value, or with containerd's CRI plugin set restrict_oom_score_adj = true"
    )]
    OomScoreAdj { wanted: i64, current: i64 },
}

/// CAP_SYS_RESOURCE's bit in the capability sets of /proc/PID/status.
const CAP_SYS_RESOURCE: u32 = 24;

/// Refuses, with a reason, a spec whose `process.oomScoreAdj` this process cannot set:
/// libcontainer writes it into its own /proc/self/oom_score_adj first and reports only "io
/// error". Where the runtime runs without CAP_SYS_RESOURCE (containerd inside a container,
/// some VMs) a pod sandbox of CRI, which asks for -998, is the common case. Costs a read of
/// /proc/self/status when the capability is there, the spec only when it is not.
pub fn check_oom_score_adj(bundle: &Path) -> Result<(), LifecycleError> {
    if can_lower_oom_score_adj() {
        return Ok(());
    }
    let config = bundle.join("config.json");
    let spec_err = |reason: String| LifecycleError::Spec {
        bundle: bundle.display().to_string(),
        reason,
    };
    let text = std::fs::read(&config).map_err(|e| spec_err(e.to_string()))?;
    let spec: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| spec_err(e.to_string()))?;
    let Some(wanted) = spec["process"]["oomScoreAdj"].as_i64() else {
        return Ok(());
    };
    let current = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    if wanted < current {
        return Err(LifecycleError::OomScoreAdj { wanted, current });
    }
    Ok(())
}

/// Whether this process may lower OOM score adjustments (has CAP_SYS_RESOURCE).
pub fn can_lower_oom_score_adj() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    has_capability(&status, CAP_SYS_RESOURCE)
}

/// Whether the effective set (`CapEff:` of a /proc status text) has capability `bit`; an
/// unreadable set counts as having it (the write then reports its own error).
fn has_capability(status: &str, bit: u32) -> bool {
    let set = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    match set {
        Some(set) => set & (1u64 << bit) != 0,
        None => true,
    }
}

/// Deletes a container. A failing poststop hook is only a warning, as the runtime
/// specification says ("the failure MUST be logged ... the remaining hooks and lifecycle
/// continue"): libcontainer's delete instead stops at the hook and keeps the state
/// directory, after which the container can never be deleted once its bundle is gone.
/// So the hooks are taken out of libcontainer's copy of the config, the container is
/// deleted, and then the hooks run here.
/// libcontainer lost a race with the container's init exiting: the process was there when
/// it looked and its /proc entry gone when it read it. Looking again finds it stopped.
fn vanished(e: &LibcontainerError) -> bool {
    matches!(e, LibcontainerError::Procfs(procfs::ProcError::NotFound(_)))
}

/// [`Container::refresh_status`], looking again if the init exited while it looked.
pub fn refresh_status(c: &mut Container) -> Result<(), LibcontainerError> {
    match c.refresh_status() {
        Err(e) if vanished(&e) => c.refresh_status(),
        r => r,
    }
}

pub fn delete(c: &mut Container, force: bool) -> Result<(), LifecycleError> {
    let poststop = match c.spec() {
        Ok(mut config) => {
            let hooks = config
                .hooks
                .as_ref()
                .and_then(|h| h.poststop().clone())
                .filter(|h| !h.is_empty());
            if hooks.is_some() {
                if let Some(h) = config.hooks.as_mut() {
                    h.set_poststop(None);
                }
                config.save(&c.root).map_err(|e| LifecycleError::Config {
                    id: c.id().to_string(),
                    reason: e.to_string(),
                })?;
            }
            hooks
        }
        // libcontainer's delete copes with a missing config itself.
        Err(_) => None,
    };
    let state = c.state.clone();
    let deleted = match c.delete(force) {
        // Nothing is deleted before the status is known.
        Err(e) if vanished(&e) => c.delete(force),
        r => r,
    };
    if let Err(e) = &deleted {
        // Nothing deleted: the hooks belong in the config for the next try.
        if let (Some(hooks), Ok(mut config)) = (&poststop, c.spec()) {
            if let Some(h) = config.hooks.as_mut() {
                h.set_poststop(Some(hooks.clone()));
            }
            let _ = config.save(&c.root);
        }
        tracing::debug!("delete of {} failed: {e}", c.id());
    }
    deleted?;
    if let Some(hooks) = poststop {
        if let Err(e) = libcontainer::hooks::run_hooks(Some(&hooks), Some(&state), None, None, None)
        {
            tracing::warn!("poststop hook of {} failed: {e}", state.id);
        }
    }
    Ok(())
}

/// Applies `linux.resources.memory.disableOOMKiller`, which libcontainer 0.7 ignores (it
/// always writes false). cgroup v1 has `memory.oom_control`; cgroup v2 has no way to
/// disable the OOM killer, so there it is a warning, as with crun.
pub fn apply_oom_killer_setting(c: &Container) -> Result<(), LifecycleError> {
    let bundle = c.bundle();
    let spec = Spec::load(bundle.join("config.json")).map_err(|e| LifecycleError::Spec {
        bundle: bundle.display().to_string(),
        reason: e.to_string(),
    })?;
    let disable = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.disable_oom_killer())
        .unwrap_or(false);
    if !disable {
        return Ok(());
    }
    let cgroup = c.spec()?.cgroup_path;
    disable_oom_killer(&cgroup)
}

fn disable_oom_killer(cgroup: &Path) -> Result<(), LifecycleError> {
    let rel = cgroup.strip_prefix("/").unwrap_or(cgroup);
    let err = |source| LifecycleError::OomKiller {
        cgroup: cgroup.display().to_string(),
        source,
    };
    for m in crate::bundle::cgroup_v1_mounts() {
        let m = std::path::PathBuf::from(m);
        let control = m.join(rel).join("memory.oom_control");
        if control.exists() {
            return std::fs::write(&control, "1").map_err(err);
        }
    }
    tracing::warn!(
        "disableOOMKiller is not supported on cgroup v2 (cgroup {}); the OOM killer stays on",
        cgroup.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The race libcontainer loses, played out: a process found, then gone before its stat
    /// is read.
    #[test]
    fn a_process_gone_between_looking_and_reading_is_recognised() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .expect("sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let found = procfs::process::Process::new(pid).expect("found");
        child.kill().expect("kill");
        child.wait().expect("reaped");
        let e = LibcontainerError::from(found.stat().expect_err("gone"));
        assert!(vanished(&e), "{e:?}");
        let other = LibcontainerError::from(procfs::ProcError::PermissionDenied(None));
        assert!(!vanished(&other));
    }

    /// A v1 memory cgroup with the OOM killer disabled reports `oom_kill_disable 1`.
    #[test]
    fn capabilities_are_read_from_the_effective_set() {
        let with = "Name:\tx\nCapPrm:\t0\nCapEff:\t000001ffffffffff\n";
        let without = "CapEff:\t000001fffeffffff\n";
        assert!(has_capability(with, CAP_SYS_RESOURCE));
        assert!(!has_capability(without, CAP_SYS_RESOURCE));
        assert!(has_capability("no sets here", CAP_SYS_RESOURCE));
    }

    #[test]
    fn disables_the_oom_killer_in_a_v1_memory_cgroup() {
        let root = Path::new("/sys/fs/cgroup/memory");
        assert!(
            root.join("memory.oom_control").exists(),
            "this test needs a cgroup v1 memory hierarchy at {}",
            root.display()
        );
        let rel = format!("trenv-unit-oom-{}", std::process::id());
        let dir = root.join(&rel);
        std::fs::create_dir(&dir).expect("create cgroup");
        let r = disable_oom_killer(Path::new(&format!("/{rel}")));
        let text = std::fs::read_to_string(dir.join("memory.oom_control")).unwrap_or_default();
        std::fs::remove_dir(&dir).expect("remove cgroup");
        r.expect("disable");
        assert!(text.contains("oom_kill_disable 1"), "{text}");
    }
}
