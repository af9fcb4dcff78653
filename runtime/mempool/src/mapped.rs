//! Which processes map a file: the answer to "may this region go?". Read from each process's
//! /proc/PID/maps (device and inode of every file mapping), so it is always current and
//! needs no reference counts that a killed process could leave behind.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Pids of the processes that map the file at `path` (none if it does not exist).
pub fn mapped_by(path: &Path) -> Vec<i32> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want_dev = format!("{major:02x}:{minor:02x}");
    let want_ino = meta.ino().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // Processes come and go while this runs; one that is gone maps nothing.
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        let maps_it = maps.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, _, _, dev, ino) = (f.next(), f.next(), f.next(), f.next(), f.next());
            dev == Some(want_dev.as_str()) && ino == Some(want_ino.as_str())
        });
        if maps_it {
            pids.push(pid);
        }
    }
    pids
}
