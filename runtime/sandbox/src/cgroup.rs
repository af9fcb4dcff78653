//! A sandbox's cgroup: the same relative path in every mounted hierarchy (v1 controllers,
//! named v1 hierarchies and v2), as the container runtime would create it.

use std::path::{Path, PathBuf};
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
    #[error("no cgroup2 mount to set favordynmods on")]
    NoCgroup2,
    #[error("remounting {path} with favordynmods: {source}")]
    Remount { path: PathBuf, source: nix::Error },
    #[error("removing cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Mount points of every cgroup hierarchy: one per hierarchy, mounting its root. Bind
/// mounts of cgroup directories (sandbox cgroup views, other runtimes' containers) are not
/// hierarchies.
pub fn mounts() -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(hierarchy_mounts(&text))
}

fn hierarchy_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let f: Vec<&str> = pre.split_whitespace().collect();
            let (dev, root, mp) = (*f.get(2)?, *f.get(3)?, *f.get(4)?);
            let hierarchy = (fstype == "cgroup" || fstype == "cgroup2") && root == "/";
            (hierarchy && !seen.contains(&dev)).then(|| {
                seen.push(dev);
                PathBuf::from(mp)
            })
        })
        .collect()
}

/// Turns on `favordynmods` for the cgroup2 hierarchy (the whole of it on a v2 host, the
/// `unified` mount on a hybrid one). Moving a process into a cgroup then no longer waits
/// for an RCU grace period (10-15 ms, paid by every container start), at the price of
/// slightly dearer fork and exit; the kernel keeps one such setting for all hierarchies.
/// Returns false if it was already on. Host-wide: callers make it an operator's choice.
pub fn favor_dynmods() -> Result<bool, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mounts)?;
    let Some((mp, opts)) = text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        (post.next()? == "cgroup2").then_some(())?;
        let opts = post.nth(1)?.to_string();
        Some((PathBuf::from(pre.split_whitespace().nth(4)?), opts))
    }) else {
        return Err(CgroupError::NoCgroup2);
    };
    let mut keep: Vec<&str> = opts
        .split(',')
        .filter(|o| !matches!(*o, "rw" | "ro"))
        .collect();
    if keep.contains(&"favordynmods") {
        return Ok(false);
    }
    // A cgroup2 remount resets every flag it is not given: keep the current ones.
    keep.push("favordynmods");
    nix::mount::mount(
        None::<&str>,
        &mp,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT,
        Some(keep.join(",").as_str()),
    )
    .map_err(|source| CgroupError::Remount { path: mp, source })?;
    Ok(true)
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

/// A cgroup directory and every cgroup below it, deepest first.
fn subtree(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree(&e.path()));
            }
        }
    }
    if d.is_dir() {
        out.push(d.to_path_buf());
    }
    out
}

/// Pids in the cgroup or any cgroup below it (what an instance may have created there),
/// from any hierarchy that has it.
pub fn procs(rel: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs(rel)
        .unwrap_or_default()
        .iter()
        .flat_map(|d| subtree(d))
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
    // Cgroups an instance created below the sandbox's go with it, deepest first.
    for d in dirs(rel)?.iter().flat_map(|d| subtree(d)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Cgroups an instance made below a sandbox's are counted and removed with it.
    #[test]
    fn removal_takes_the_cgroups_below() {
        let rel = format!("trenv-unit-subtree-{}", nix::unistd::getpid());
        create(&format!("{rel}/inner/deeper")).expect("create");
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .expect("sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let procs_file = Path::new("/sys/fs/cgroup/memory")
            .join(&rel)
            .join("inner/deeper/cgroup.procs");
        std::fs::write(&procs_file, pid.to_string()).expect("join");
        assert_eq!(procs(&rel), vec![pid]);
        assert!(remove(&rel).is_err(), "a populated cgroup was removed");
        let _ = child.kill();
        let _ = child.wait();
        remove_when_empty(&rel, Duration::from_secs(2)).expect("remove");
        assert!(dirs(&rel).expect("dirs").iter().all(|d| !d.exists()));
    }

    fn cgroup2_options() -> Option<(PathBuf, String)> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        text.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let p: Vec<&str> = post.split_whitespace().collect();
            (p[0] == "cgroup2").then(|| {
                let mp = pre.split_whitespace().nth(4).unwrap();
                (PathBuf::from(mp), p[2].to_string())
            })
        })
    }

    #[test]
    fn favors_dynmods_keeping_other_flags() {
        let Some((mp, before)) = cgroup2_options() else {
            assert!(favor_dynmods().is_err(), "no cgroup2 mount: an error");
            return;
        };
        let was_on = before.split(',').any(|o| o == "favordynmods");
        assert_eq!(favor_dynmods().unwrap(), !was_on);
        let (_, after) = cgroup2_options().unwrap();
        for o in before.split(',') {
            assert!(after.split(',').any(|a| a == o), "{o} lost: {after}");
        }
        assert!(after.split(',').any(|o| o == "favordynmods"), "{after}");
        assert!(!favor_dynmods().unwrap(), "second call: already on");
        if !was_on {
            let restore: Vec<&str> = before.split(',').filter(|o| *o != "rw").collect();
            nix::mount::mount(
                None::<&str>,
                &mp,
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT,
                Some(restore.join(",").as_str()),
            )
            .unwrap();
        }
    }

    #[test]
    fn hierarchies_not_binds() {
        let info = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
40 38 0:26 /trenv/t/sb-1 /run/trenv/pool/t/cgroup-views/sb-1/memory ro - cgroup cgroup rw,memory
41 22 0:26 / /mnt/again rw - cgroup cgroup rw,memory
42 22 0:45 / /tmp tmpfs rw - tmpfs tmpfs rw";
        assert_eq!(
            hierarchy_mounts(info),
            vec![
                PathBuf::from("/sys/fs/cgroup/memory"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }
}
