//! Deleting a container whose processes have all exited, inside the shim.
//!
//! libcontainer's delete re-discovers every cgroup hierarchy (parsing mountinfo once per v1
//! controller, some 600 system calls) in a forked worker, which takes 5-7 ms on the
//! critical path of every `ctr run --rm`. For the common case — init reaped by this shim,
//! cgroupfs driver, no poststop hooks, no Intel RDT — the work is a handful of rmdirs and
//! the removal of the state directory, which touch no process-global state and run here.
//! Anything else, or any failure (a cgroup still busy), is left to libcontainer's delete in
//! the zygote, with the state directory still in place.

use std::path::Path;

use libcontainer::container::Container;

/// Deletes the stopped container in `state_dir` if the fast path applies; returns whether
/// it did. On `false` nothing was removed that libcontainer's delete still needs.
pub fn delete_stopped(state_dir: &Path) -> bool {
    let Ok(container) = Container::load(state_dir.to_path_buf()) else {
        return false;
    };
    if container.systemd() || container.intel_rdt_dir().is_some() {
        return false;
    }
    let Ok(config) = container.spec() else {
        return false;
    };
    let has_poststop = config
        .hooks
        .as_ref()
        .and_then(|h| h.poststop().as_ref())
        .is_some_and(|p| !p.is_empty());
    if has_poststop {
        return false;
    }
    let Ok(mounts) = trenv_sandbox::cgroup::mounts() else {
        return false;
    };
    let relative = config
        .cgroup_path
        .strip_prefix("/")
        .unwrap_or(&config.cgroup_path);
    if relative.as_os_str().is_empty() {
        return false;
    }
    for mount in mounts {
        let dir = mount.join(relative);
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                log::debug!("fast delete: {dir:?}: {e}; using libcontainer");
                return false;
            }
        }
    }
    match std::fs::remove_dir_all(state_dir) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("fast delete: {state_dir:?}: {e}; using libcontainer");
            false
        }
    }
}
