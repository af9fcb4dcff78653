//! Node memory of a run: Σ PSS of every process under the run's parent cgroup (instances,
//! spares, sandbox holders), the parent cgroup's usage, and the template memory pool.
//!
//! Template pages are counted once: the pool's used bytes are added whole, so the pool's pages
//! that instances map are left out of their PSS (their copy-on-write copies stay in).

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
    text.lines().find_map(|l| kib_field(l, "Pss")).unwrap_or(0)
}

/// The device of the filesystem at `dir` as smaps prints it (`major:minor`, hex).
pub fn smaps_device(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(dir).ok()?.dev();
    // Linux's dev_t encoding (glibc's gnu_dev_major / gnu_dev_minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Some(format!("{major:02x}:{minor:02x}"))
}

fn kib_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .strip_prefix(':')?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// PSS of a process in KiB without the pool's pages: in a mapping of a file on `device`,
/// only the private (copy-on-write) pages count. 0 if the process is gone.
pub fn pss_without_device_kib(pid: u32, device: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map(|text| smaps_pss_without_device_kib(&text, device))
        .unwrap_or(0)
}

fn smaps_pss_without_device_kib(text: &str, device: &str) -> u64 {
    let mut total = 0;
    let mut in_pool = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A VMA header: range perms offset dev inode [path].
            let dev = words.nth(2).unwrap_or("");
            let inode = words.next().unwrap_or("0");
            in_pool = dev == device && inode != "0";
            continue;
        }
        let field = if in_pool { "Anonymous" } else { "Pss" };
        if let Some(kib) = kib_field(line, field) {
            total += kib;
        }
    }
    total
}

/// (Σ PSS KiB, cgroup usage KiB, processes) under `parent`; with `pool_device`, the pages of
/// files on that device are left out (see [`pss_without_device_kib`]).
pub fn under(parent: &str, pool_device: Option<&str>) -> (u64, u64, usize) {
    let Some((dir, v1)) = memory_dir(parent) else {
        return (0, 0, 0);
    };
    let mut pids = Vec::new();
    pids_below(&dir, &mut pids);
    let pss = pids
        .iter()
        .map(|p| match pool_device {
            Some(dev) => pss_without_device_kib(*p, dev),
            None => pss_kib(*p),
        })
        .sum();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_mapping_counts_only_its_copies() {
        // A file on a tmpfs of its own (as the pool is), mapped privately and one page
        // written: left out as "the pool" it leaves that page; counted, it adds every page.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount a tmpfs");
            return;
        }
        let dir = std::env::temp_dir().join(format!("trenv-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mount tmpfs");
        let path = dir.join("region");
        std::fs::write(&path, vec![7u8; 64 * 4096]).expect("write");
        let dev = smaps_device(&dir).expect("device");
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: a fresh private mapping of a file we own; only this test touches it and it
        // is unmapped before returning.
        let map = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(64 * 4096).expect("len"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
                &file,
                0,
            )
        }
        .expect("mmap");
        let base = map.cast::<u8>().as_ptr();
        for page in 0..64 {
            // SAFETY: every offset is inside the 64-page readable mapping.
            let _ = unsafe { base.add(page * 4096).read_volatile() };
        }
        // SAFETY: the mapping is 64 pages long and writable.
        unsafe { base.write_volatile(1) };
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let with = smaps_pss_without_device_kib(&smaps, "00:00");
        let without = smaps_pss_without_device_kib(&smaps, &dev);
        // SAFETY: the mapping made above, not used afterwards.
        unsafe { nix::sys::mman::munmap(map, 64 * 4096) }.expect("munmap");
        nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH).expect("umount");
        std::fs::remove_dir_all(&dir).ok();
        let diff = with.saturating_sub(without);
        assert!(
            (60 * 4..=64 * 4).contains(&diff),
            "pool pages left out: {diff} KiB (with {with}, without {without})"
        );
    }
}
