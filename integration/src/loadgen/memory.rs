//! Node memory of a run: Σ PSS of every process under the run's parent cgroup (instances,
//! spares, sandbox holders), the parent cgroup's usage, and the template memory pool.

use std::path::{Path, PathBuf};

/// The parent cgroup's directory in the memory hierarchy (v1) or the unified one (v2).
fn memory_dir(parent: &str) -> Option<(PathBuf, bool)> {
    let rel = parent.trim_start_matches('/');
    let v1 = Path::new("/sys/fs/cgroup/memory").join(rel);
    if Path::new("/sys/fs/cgroup/memory/memory.usage_in_bytes").exists() {
        return Some((v1, true));
    }
    let v2 = Path::new("/sys/fs/cgroup").join(rel);
    Some((v2, false))
}

fn pids_below(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pids_below(&e.path(), out);
            }
        }
    }
}

/// PSS of a process in KiB (0 if it is gone).
pub fn pss_kib(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (Σ PSS KiB, cgroup usage KiB, processes) under `parent`.
pub fn under(parent: &str) -> (u64, u64, usize) {
    let Some((dir, v1)) = memory_dir(parent) else {
        return (0, 0, 0);
    };
    let mut pids = Vec::new();
    pids_below(&dir, &mut pids);
    let pss = pids.iter().map(|p| pss_kib(*p)).sum();
    let file = if v1 {
        "memory.usage_in_bytes"
    } else {
        "memory.current"
    };
    let usage = std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        >> 10;
    (pss, usage, pids.len())
}

/// Used bytes of the filesystem at `dir` (the template memory pool, a tmpfs), KiB.
pub fn used_kib(dir: &Path) -> u64 {
    // Not mounted yet: the directory's own filesystem is not the pool.
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            let d = dir.to_string_lossy();
            m.lines()
                .any(|l| l.split_whitespace().nth(4) == Some(d.as_ref()))
        })
        .unwrap_or(false);
    if !mounted {
        return 0;
    }
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => {
            let used = s.blocks().saturating_sub(s.blocks_free());
            used.saturating_mul(s.fragment_size()) >> 10
        }
        Err(_) => 0,
    }
}
