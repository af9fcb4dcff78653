//! What a container may leave behind: cgroups, mounts, processes.

use std::path::PathBuf;

/// Every directory of a cgroup path, across v1 controllers and the unified hierarchy.
pub fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let rel = rel.trim_start_matches('/');
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            let p = e.path().join(rel);
            if p.is_dir() {
                out.push(p);
            }
        }
    }
    let root = PathBuf::from("/sys/fs/cgroup").join(rel);
    if root.is_dir() && !out.contains(&root) {
        out.push(root);
    }
    out
}

/// Mount points whose path or source mentions `needle`.
pub fn mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Detaches every mount whose path or source mentions `dir`, deepest first.
pub fn unmount_under(dir: &str) {
    let mut mounts: Vec<String> = mounts_with(dir)
        .iter()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Pids whose command line mentions `needle`.
pub fn processes_with(needle: &str) -> Vec<i32> {
    let me = nix::unistd::getpid().as_raw();
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Asserts a container left no cgroup, mount or state behind.
pub fn assert_container_gone(rt: &crate::runtime::Runtime, id: &str) {
    let cg = cgroup_dirs(&crate::bundle::cgroup_path(id));
    assert!(cg.is_empty(), "cgroups of {id} left behind: {cg:?}");
    let m = mounts_with(id);
    assert!(m.is_empty(), "mounts of {id} left behind: {m:?}");
    assert!(
        !rt.root().join(id).exists(),
        "state directory of {id} left behind"
    );
}
