//! A sandbox's cgroup: the same relative path in every mounted hierarchy (v1 controllers,
//! named v1 hierarchies and v2), as the container runtime would create it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading mountinfo: {0}")]
    Mounts(std::io::Error),
    #[error("creating cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Mount points of every cgroup hierarchy.
pub fn mounts() -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect())
}

fn dirs(rel: &str) -> Result<Vec<PathBuf>, CgroupError> {
    let rel = rel.trim_start_matches('/');
    Ok(mounts()
        .map_err(CgroupError::Mounts)?
        .into_iter()
        .map(|m| m.join(rel))
        .collect())
}

pub fn create(rel: &str) -> Result<(), CgroupError> {
    for d in dirs(rel)? {
        std::fs::create_dir_all(&d).map_err(|source| CgroupError::Create { path: d, source })?;
    }
    Ok(())
}

/// Pids in the cgroup, from any hierarchy that has it.
pub fn procs(rel: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs(rel)
        .unwrap_or_default()
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the cgroup from every hierarchy (missing is fine).
pub fn remove(rel: &str) -> Result<(), CgroupError> {
    let mut first = None;
    for d in dirs(rel)? {
        match std::fs::remove_dir(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                first.get_or_insert(CgroupError::Remove { path: d, source: e });
            }
            _ => {}
        }
    }
    first.map_or(Ok(()), Err)
}

/// Removes the cgroup, retrying while killed processes are still leaving it.
pub fn remove_when_empty(rel: &str, timeout: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    loop {
        match remove(rel) {
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Removes the parent directories of pool cgroups once they are empty (`rel` and up to
/// `levels` of its parents).
pub fn remove_parents(rel: &str, levels: usize) {
    let mut p = PathBuf::from(rel.trim_start_matches('/'));
    for _ in 0..levels {
        if p.as_os_str().is_empty() {
            break;
        }
        for m in mounts().unwrap_or_default() {
            let _ = std::fs::remove_dir(m.join(&p));
        }
        if !p.pop() {
            break;
        }
    }
}
