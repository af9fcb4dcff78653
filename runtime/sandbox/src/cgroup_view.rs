//! The `/sys/fs/cgroup` a pooled container sees on a cgroup v1 host, built once per
//! sandbox instead of once per start.
//!
//! On v1 the runtime builds a container's cgroup mount from a tmpfs and one bind mount per
//! hierarchy of the container's cgroup, after reading mountinfo and the process's cgroups:
//! about a quarter of a pooled start. A sandbox's cgroup path never changes, so the same
//! tree is built next to the sandbox record (again after each purge, which re-creates the
//! cgroup) and the container's spec binds it with one recursive, read-only bind mount. The
//! container sees exactly what the runtime would have mounted.
//!
//! On a v2-only host the runtime mounts cgroup2 with a single mount; no view is built.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("cgroup view {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup view {path}: mounting {what}: {source}")]
    Mount {
        path: PathBuf,
        what: String,
        source: nix::Error,
    },
}

/// Where the container mounts its cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// v1 hierarchies mounted under `/sys/fs/cgroup/` (mount point, name in the view). Empty on
/// a v2-only host.
pub fn hierarchies() -> Vec<(PathBuf, String)> {
    trenv_oci::bundle::cgroup_v1_mounts()
        .into_iter()
        .filter_map(|mp| {
            let name = Path::new(&mp).file_name()?.to_str()?.to_string();
            Some((PathBuf::from(mp), name))
        })
        .collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ViewError + '_ {
    move |source| ViewError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mount_err<'a>(dir: &'a Path, what: &'a str) -> impl FnOnce(nix::Error) -> ViewError + 'a {
    move |source| ViewError::Mount {
        path: dir.to_path_buf(),
        what: what.to_string(),
        source,
    }
}

const RO: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Builds the view of cgroup `rel` (relative to each hierarchy's root) at `dir`, replacing
/// any earlier one. Returns false, building nothing, on a host without v1 hierarchies.
pub fn prepare(dir: &Path, rel: &str) -> Result<bool, ViewError> {
    let hierarchies = hierarchies();
    if hierarchies.is_empty() {
        return Ok(false);
    }
    remove(dir);
    build(dir, rel, &hierarchies).inspect_err(|_| remove(dir))?;
    Ok(true)
}

fn build(dir: &Path, rel: &str, hierarchies: &[(PathBuf, String)]) -> Result<(), ViewError> {
    let rel = rel.trim_start_matches('/');
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        base,
        Some("mode=755,size=64k"),
    )
    .map_err(mount_err(dir, "tmpfs"))?;
    // Private: the host's later mount events must not reach the view, nor the containers'
    // copies of it reach the host.
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(mount_err(dir, "propagation"))?;
    for (mp, name) in hierarchies {
        let target = dir.join(name);
        std::fs::create_dir(&target).map_err(io_err(&target))?;
        let source = mp.join(rel);
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(mount_err(dir, name))?;
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | RO,
            None::<&str>,
        )
        .map_err(mount_err(dir, name))?;
        // Co-mounted controllers (`cpu,cpuacct`) are also reachable by each name.
        if name.contains(',') {
            for part in name.split(',') {
                let link = dir.join(part);
                std::os::unix::fs::symlink(name, &link).map_err(io_err(&link))?;
            }
        }
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | RO,
        None::<&str>,
    )
    .map_err(mount_err(dir, "read-only"))
}

/// Unmounts and removes a view (missing is fine). The detach releases every bind mount at
/// once, so the sandbox's cgroup can be removed right after.
pub fn remove(dir: &Path) {
    let _ = umount2(dir, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(dir);
}

/// Removes every view under `root` (a pool's views directory) and the directory itself.
pub fn remove_all(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            remove(&e.path());
        }
    }
    let _ = std::fs::remove_dir(root);
}

/// Whether `dir` holds a built view (a mount point, as opposed to a bare directory left
/// by a crash).
pub fn is_built(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(d), Some(Ok(p))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) else {
        return false;
    };
    d.dev() != p.dev()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_removes_a_view() {
        let hierarchies = hierarchies();
        if hierarchies.is_empty() {
            return; // v2-only host: nothing to build
        }
        let rel = format!("trenv-view-test-{}", std::process::id());
        for (mp, _) in &hierarchies {
            std::fs::create_dir_all(mp.join(&rel)).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("view");
        assert!(prepare(&dir, &rel).unwrap());
        assert!(is_built(&dir));
        for (mp, name) in &hierarchies {
            use std::os::unix::fs::MetadataExt;
            let seen = std::fs::metadata(dir.join(name)).unwrap();
            let real = std::fs::metadata(mp.join(&rel)).unwrap();
            assert_eq!((seen.dev(), seen.ino()), (real.dev(), real.ino()), "{name}");
            // read-only: the container cannot change its own limits through it
            let err = std::fs::create_dir(dir.join(name).join("x")).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{name}");
        }
        // a second prepare replaces the first without stacking mounts
        assert!(prepare(&dir, &rel).unwrap());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let top = format!(" {} ", dir.display());
        assert_eq!(mounts.lines().filter(|l| l.contains(&top)).count(), 1);
        remove(&dir);
        assert!(!dir.exists());
        for (mp, _) in &hierarchies {
            std::fs::remove_dir(mp.join(&rel)).unwrap();
        }
    }
}
