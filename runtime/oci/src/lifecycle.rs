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
}

/// Deletes a container. A failing poststop hook is only a warning, as the runtime
/// specification says ("the failure MUST be logged ... the remaining hooks and lifecycle
/// continue"): libcontainer's delete instead stops at the hook and keeps the state
/// directory, after which the container can never be deleted once its bundle is gone.
/// So the hooks are taken out of libcontainer's copy of the config, the container is
/// deleted, and then the hooks run here.
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
    let deleted = c.delete(force);
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

    /// A v1 memory cgroup with the OOM killer disabled reports `oom_kill_disable 1`.
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
