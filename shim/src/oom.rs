//! OOM notifications for a task's memory cgroup, turned into TaskOOM events.
//!
//! cgroup v1: an eventfd registered through `cgroup.event_control` for `memory.oom_control`;
//! the kernel signals it on every OOM in the cgroup and once more when the cgroup is
//! removed. cgroup v2: inotify on `memory.events`, whose `oom_kill` counter is compared.
//! Each watched task gets one thread, which ends when its cgroup is removed.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libcgroups::common::CgroupSetup;
use libcgroups::v1::ControllerType;

#[derive(Debug, thiserror::Error)]
pub enum OomError {
    #[error("finding the memory cgroup: {0}")]
    Setup(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OomError {
    let path = path.to_path_buf();
    move |source| OomError::Io { what, path, source }
}

/// Calls `on_oom` for every OOM kill in the cgroup at `cgroup_path` (the spec's
/// cgroupsPath), from a background thread, until the cgroup is removed.
pub fn watch(cgroup_path: &Path, on_oom: impl Fn() + Send + 'static) -> Result<(), OomError> {
    let relative = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    let setup =
        libcgroups::common::get_cgroup_setup().map_err(|e| OomError::Setup(e.to_string()))?;
    match setup {
        CgroupSetup::Legacy | CgroupSetup::Hybrid => {
            let mount = libcgroups::v1::util::get_subsystem_mount_point(&ControllerType::Memory)
                .map_err(|e| OomError::Setup(e.to_string()))?;
            watch_v1(mount.join(relative), on_oom)
        }
        CgroupSetup::Unified => watch_v2(
            Path::new(libcgroups::common::DEFAULT_CGROUP_ROOT).join(relative),
            on_oom,
        ),
    }
}

/// Whether the cgroup of a v1 `memory.oom_control` held open still exists: once it is
/// removed, reads through the descriptor fail, even if a cgroup of the same path was
/// created again (a pooled sandbox's is).
fn v1_alive(control: &std::fs::File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 128];
    control.read_at(&mut buf, 0).is_ok()
}

fn watch_v1(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<(), OomError> {
    let control = dir.join("memory.oom_control");
    let oom_control = std::fs::File::open(&control).map_err(io("opening", &control))?;
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(io("creating an eventfd for", &control)(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a new descriptor owned by nobody else.
    let event = unsafe { OwnedFd::from_raw_fd(raw) };
    let register = dir.join("cgroup.event_control");
    std::fs::write(
        &register,
        format!("{} {}", event.as_raw_fd(), oom_control.as_raw_fd()),
    )
    .map_err(io("registering with", &register))?;
    std::thread::spawn(move || {
        let mut file = std::fs::File::from(event);
        let mut buf = [0u8; 8];
        while file.read_exact(&mut buf).is_ok() {
            // The eventfd counts notifications: one per OOM, one for the cgroup's removal.
            // Both may be read at once when the OOM killed the init and the cgroup was
            // removed right after.
            let count = u64::from_ne_bytes(buf);
            if v1_alive(&oom_control) {
                on_oom();
            } else {
                if count >= 2 {
                    on_oom();
                }
                break;
            }
        }
    });
    Ok(())
}

fn oom_kills(events: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(events).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

fn watch_v2(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<(), OomError> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let events = dir.join("memory.events");
    let mut seen = oom_kills(&events).ok_or_else(|| OomError::Io {
        what: "reading",
        path: events.clone(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| OomError::Io {
        what: "watching",
        path: events.clone(),
        source: e.into(),
    })?;
    inotify
        .add_watch(
            &events,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_IGNORED,
        )
        .map_err(|e| OomError::Io {
            what: "watching",
            path: events.clone(),
            source: e.into(),
        })?;
    std::thread::spawn(move || {
        while let Ok(batch) = inotify.read_events() {
            if batch
                .iter()
                .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
            {
                break;
            }
            match oom_kills(&events) {
                Some(n) if n > seen => {
                    seen = n;
                    on_oom();
                }
                Some(_) => {}
                None => break,
            }
        }
    });
    Ok(())
}
