//! Spare instances: template-backed instances restored ahead of demand.
//!
//! A restore costs a start ~20 ms even when every page is mapped from the template: CRIU's
//! start-up, the process tree, namespaces, files and mounts. With `[templates] spares = N`
//! the shim keeps up to N instances of each template in use restored in pooled sandboxes,
//! frozen (cgroup freezer: the process cannot tell), with stdio pipes whose other ends the
//! shim holds. Create of a container with the same key takes one over: the sandbox and the
//! runtime state are renamed to the container, its limits applied and its streams connected;
//! Start thaws it. The taken spare is replaced in the background.
//!
//! A spare runs on a rootfs of its own: an overlay of the same image layers (the same lower
//! directories containerd mounts for the container) with a private upper directory, since
//! a process cannot be moved to another root once it runs. Its writes land there and are
//! discarded with it, not in the container's snapshot (documented). Only overlay rootfs
//! mounts can be re-made that way; other snapshotters get no spares.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use containerd_shim::protos::api::Mount;

use crate::stdio::ShimEnds;
use crate::templates::Plan;
use crate::zygote::SandboxUts;

/// Directory (under the state root) of spares' bundles, rootfs and upper directories.
pub const DIR: &str = ".template-spares";
/// Runtime ids of spares start with this, then the shim's pid and a counter.
pub const PREFIX: &str = "trenv-spare-";

/// What it takes to restore another instance like a container: its spec before placement
/// and its rootfs mounts, with what Create knew about it.
#[derive(Debug, Clone)]
pub struct Source {
    /// Spares are kept by this: the template key and the [`fingerprint`] of the spec.
    pub key: String,
    pub plan: Plan,
    pub spec: serde_json::Value,
    pub rootfs: Vec<Mount>,
    pub annotations: crate::annotations::Annotations,
    pub config: crate::config::ShimConfig,
    pub root: PathBuf,
}

/// A restored, frozen instance waiting for a container.
#[derive(Debug)]
pub struct Spare {
    /// Its runtime id (and pool claim) until a container takes it over.
    pub id: String,
    pub template: String,
    pub pid: i32,
    /// Holds `bundle/` (config.json and the rootfs mount point), `upper/` and `work/`.
    pub dir: PathBuf,
    /// libcontainer state root it was restored under.
    pub root: PathBuf,
    pub ends: ShimEnds,
    pub sandbox_uts: Option<SandboxUts>,
    /// The freezer file that thaws it, and what to write there.
    pub thaw: Option<(PathBuf, &'static str)>,
    /// The limits (`linux.resources`) and cgroup path of its placed spec.
    pub resources: serde_json::Value,
    pub cgroup: PathBuf,
}

impl Spare {
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }

    /// The process is still there: not gone, not a zombie waiting for the reaper, and no
    /// SIGKILL pending (cgroup v1's freezer holds a kill until the thaw).
    pub fn alive(&self) -> bool {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return false;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let killed = |mask: String| {
            u64::from_str_radix(&mask, 16).is_ok_and(|m| m & (1 << (libc::SIGKILL - 1)) != 0)
        };
        !field("State:").starts_with('Z') && !killed(field("SigPnd:")) && !killed(field("ShdPnd:"))
    }
}

#[derive(Default)]
struct Counters {
    made: u64,
    taken: u64,
    discarded: u64,
    failed: u64,
}

#[derive(Default)]
struct State {
    ready: HashMap<String, Vec<Spare>>,
    /// Keys a fill runs for.
    filling: HashSet<String>,
    /// Set by a drain: no more spares.
    closed: bool,
    counters: Counters,
}

/// The shim's spares, by template key.
pub struct Spares {
    target: usize,
    state: Mutex<State>,
}

impl Spares {
    pub fn new(target: usize) -> Self {
        Self {
            target,
            state: Mutex::new(State::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.target > 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Lists and counters only: a panicking holder leaves nothing half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A spare for `key` (a [`Source::key`]), if one is ready.
    pub fn take(&self, key: &str) -> Option<Spare> {
        let mut g = self.lock();
        let spare = g.ready.get_mut(key)?.pop()?;
        g.counters.taken += 1;
        Some(spare)
    }

    /// Claims the next fill of `key`; false when one runs, enough are ready or spares are
    /// closed.
    pub fn begin_fill(&self, key: &str) -> bool {
        let mut g = self.lock();
        let have = g.ready.get(key).map_or(0, Vec::len);
        if g.closed || self.target == 0 || have >= self.target || g.filling.contains(key) {
            return false;
        }
        g.filling.insert(key.to_string())
    }

    /// Ends a fill of `key`. A spare made after a drain closed the spares comes back for
    /// the caller to discard; so does one beyond the target.
    pub fn end_fill(&self, key: &str, made: Result<Spare, ()>) -> Option<Spare> {
        let mut g = self.lock();
        g.filling.remove(key);
        match made {
            Err(()) => {
                g.counters.failed += 1;
                None
            }
            Ok(spare) => {
                let have = g.ready.get(key).map_or(0, Vec::len);
                if g.closed || have >= self.target {
                    return Some(spare);
                }
                g.counters.made += 1;
                g.ready.entry(key.to_string()).or_default().push(spare);
                None
            }
        }
    }

    /// Whether `key` could use another spare.
    pub fn wanted(&self, key: &str) -> bool {
        let g = self.lock();
        !g.closed && g.ready.get(key).map_or(0, Vec::len) < self.target
    }

    pub fn discarded(&self, n: usize) {
        self.lock().counters.discarded += n as u64;
    }

    /// Every ready spare, for discarding; with `close`, no spare is made from now on.
    pub fn take_all(&self, close: bool) -> Vec<Spare> {
        let mut g = self.lock();
        g.closed |= close;
        g.ready.drain().flat_map(|(_, v)| v).collect()
    }

    /// Prometheus text for the pool's metrics file.
    pub fn metrics(&self, ns: &str) -> String {
        let g = self.lock();
        let ready: usize = g.ready.values().map(Vec::len).sum();
        let c = &g.counters;
        let mut t = format!(
            "# HELP trenv_template_spares Spare instances ready (restored, frozen).\n\
             # TYPE trenv_template_spares gauge\n\
             trenv_template_spares{{namespace=\"{ns}\"}} {ready}\n"
        );
        for (name, help, v) in [
            ("made", "Spare instances restored.", c.made),
            ("taken", "Starts served by a spare instance.", c.taken),
            (
                "discarded",
                "Spare instances discarded (dead, drained, not needed).",
                c.discarded,
            ),
            ("failed", "Spare restores that failed.", c.failed),
        ] {
            t.push_str(&format!(
                "# HELP trenv_template_spares_{name}_total {help}\n\
                 # TYPE trenv_template_spares_{name}_total counter\n\
                 trenv_template_spares_{name}_total{{namespace=\"{ns}\"}} {v}\n"
            ));
        }
        t
    }
}

/// What of a container's spec (before placement) a spare must have been restored for: all
/// of it but the cgroup path (named after the container) and the resources (applied when
/// the spare is taken over). Mounts, capabilities, devices, security profiles must match:
/// a restore re-creates them from the spare's spec, not the container's.
pub fn fingerprint(spec: &serde_json::Value) -> serde_json::Value {
    let mut v = spec.clone();
    if let Some(linux) = v.get_mut("linux").and_then(|l| l.as_object_mut()) {
        linux.remove("cgroupsPath");
        linux.remove("resources");
    }
    v
}

/// The key spares of a container are kept under: its template key and a hash of its spec's
/// [`fingerprint`] (within one shim: the hash need not be stable across builds).
pub fn key_of(template_key: &str, spec: &serde_json::Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fingerprint(spec).to_string().hash(&mut h);
    format!("{template_key}:{:016x}", h.finish())
}

/// The container's rootfs mounts with a private upper and work directory under `dir`:
/// the same image, a writable layer of the spare's own. None for anything but one overlay.
pub fn private_rootfs(mounts: &[Mount], dir: &Path) -> Option<Vec<Mount>> {
    let [m] = mounts else {
        return None;
    };
    if m.type_ != "overlay" {
        return None;
    }
    let mut options: Vec<String> = m
        .options
        .iter()
        .filter(|o| !o.starts_with("upperdir=") && !o.starts_with("workdir="))
        .cloned()
        .collect();
    if !options.iter().any(|o| o.starts_with("lowerdir=")) {
        return None;
    }
    // A read-only view has no upper directory; the spare's stays read-only too.
    if m.options.iter().any(|o| o.starts_with("upperdir=")) {
        options.push(format!("upperdir={}", dir.join("upper").display()));
        options.push(format!("workdir={}", dir.join("work").display()));
    }
    let mut out = m.clone();
    out.options = options;
    Some(vec![out])
}

/// Hands the runtime state of spare `from` to container `to`: libcontainer keeps a
/// container's state in `<root>/<id>/state.json`, which names the id.
pub fn rename_state(root: &Path, from: &str, to: &str) -> std::io::Result<()> {
    let (src, dst) = (root.join(from), root.join(to));
    // A container's own state is never replaced.
    std::fs::create_dir(&dst)?;
    std::fs::remove_dir(&dst)?;
    let path = src.join("state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
    state["id"] = serde_json::Value::String(to.to_string());
    let bytes = serde_json::to_vec(&state).map_err(std::io::Error::other)?;
    std::fs::write(&path, bytes)?;
    std::fs::rename(&src, &dst)
}

/// The file that thaws a placed spec's cgroup, and the value: cgroup v2's `cgroup.freeze`
/// or v1's freezer. None for a systemd-style path or an unknown layout.
pub fn thaw_file(spec: &serde_json::Value) -> Option<(PathBuf, &'static str)> {
    let path = spec["linux"]["cgroupsPath"].as_str()?;
    if !path.starts_with('/') {
        return None;
    }
    let rel = path.trim_start_matches('/');
    let v2 = Path::new("/sys/fs/cgroup").join(rel).join("cgroup.freeze");
    let v1 = Path::new("/sys/fs/cgroup/freezer")
        .join(rel)
        .join("freezer.state");
    if v1.exists() {
        Some((v1, "THAWED"))
    } else if v2.exists() {
        Some((v2, "0"))
    } else {
        None
    }
}

/// Reads every readable mapping of a (frozen) process through `/proc/<pid>/mem`, so that
/// its page tables map the template's pages before it runs: the first request of a restored
/// instance otherwise takes a fault per page it touches (~2 ms for a Python server). Reads
/// never copy a page (private file pages stay shared) and change nothing the process can
/// see. Returns the bytes read.
pub fn prefault(pid: i32) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = line.split_whitespace().nth(5).unwrap_or_default();
        // The kernel's own pages, and device memory, are left alone.
        if !perms.starts_with('r') || name.starts_with("[v") || name.starts_with("/dev/") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(mut at), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        while at < end {
            let n = usize::try_from(end - at).map_or(buf.len(), |left| left.min(buf.len()));
            match mem.read_at(&mut buf[..n], at) {
                Ok(0) | Err(_) => break,
                Ok(got) => {
                    total += got as u64;
                    at += got as u64;
                }
            }
        }
    }
    Ok(total)
}

/// Unmounts and removes what a spare had on disk.
pub fn remove_dir(dir: &Path) {
    let rootfs = dir.join("bundle").join("rootfs");
    // Not mounted (a failed fill) is fine.
    let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing spare directory {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(t: &str, o: &[&str]) -> Mount {
        Mount {
            type_: t.into(),
            source: "overlay".into(),
            options: o.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_private_rootfs_keeps_the_layers_and_replaces_the_writable_one() {
        let m = mount(
            "overlay",
            &[
                "index=off",
                "workdir=/s/7/work",
                "upperdir=/s/7/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ],
        );
        let got = private_rootfs(&[m], Path::new("/spare")).expect("overlay");
        assert_eq!(
            got[0].options,
            [
                "index=off",
                "lowerdir=/s/2/fs:/s/1/fs",
                "upperdir=/spare/upper",
                "workdir=/spare/work"
            ]
        );
        let ro = mount("overlay", &["lowerdir=/s/2/fs:/s/1/fs"]);
        let got = private_rootfs(&[ro], Path::new("/spare")).expect("read-only view");
        assert_eq!(got[0].options, ["lowerdir=/s/2/fs:/s/1/fs"]);
        assert!(private_rootfs(&[mount("bind", &["rbind"])], Path::new("/x")).is_none());
        assert!(private_rootfs(&[], Path::new("/x")).is_none());
        let two = [
            mount("overlay", &["lowerdir=/a"]),
            mount("overlay", &["lowerdir=/b"]),
        ];
        assert!(private_rootfs(&two, Path::new("/x")).is_none());
    }

    #[test]
    fn fingerprints_ignore_the_cgroup_path_and_limits_only() {
        let a = serde_json::json!({"process": {"args": ["f"]}, "mounts": [{"destination": "/d"}],
            "linux": {"cgroupsPath": "/ns/a", "resources": {"cpu": {"shares": 2}}}});
        let mut b = a.clone();
        b["linux"]["cgroupsPath"] = "/ns/b".into();
        b["linux"]["resources"] = serde_json::json!({"cpu": {"shares": 9}});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(key_of("k", &a), key_of("k", &b));
        b["mounts"][0]["source"] = "/other-tenant".into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(key_of("k", &a), key_of("k", &b));
    }

    #[test]
    fn renaming_state_moves_it_and_never_replaces_a_container() {
        let d = tempfile::tempdir().expect("tempdir");
        let from = d.path().join("trenv-spare-1");
        std::fs::create_dir(&from).expect("mkdir");
        std::fs::write(from.join("state.json"), r#"{"id":"trenv-spare-1","pid":7}"#)
            .expect("state");
        std::fs::create_dir(d.path().join("taken")).expect("mkdir");
        assert!(rename_state(d.path(), "trenv-spare-1", "taken").is_err());
        rename_state(d.path(), "trenv-spare-1", "c1").expect("rename");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("c1/state.json")).expect("read"))
                .expect("json");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["pid"], 7);
        assert!(!from.exists());
    }

    fn spare(id: &str) -> Spare {
        Spare {
            id: id.into(),
            template: "t".into(),
            pid: 1,
            dir: PathBuf::from("/nonexistent"),
            root: PathBuf::from("/nonexistent"),
            ends: ShimEnds::default(),
            sandbox_uts: None,
            thaw: None,
            resources: serde_json::Value::Null,
            cgroup: PathBuf::new(),
        }
    }

    #[test]
    fn fills_stop_at_the_target_and_after_a_drain() {
        let s = Spares::new(1);
        assert!(s.begin_fill("k"));
        assert!(!s.begin_fill("k"), "one fill per key at a time");
        assert!(s.end_fill("k", Ok(spare("a"))).is_none());
        assert!(!s.begin_fill("k"), "target reached");
        assert!(s.wanted("other"));
        assert_eq!(s.take("k").map(|x| x.id), Some("a".into()));
        assert!(s.take("k").is_none());
        assert!(s.begin_fill("k"));
        assert!(s.end_fill("k", Err(())).is_none());
        assert!(s.begin_fill("k"));
        assert_eq!(s.take_all(true).len(), 0);
        let back = s.end_fill("k", Ok(spare("b")));
        assert_eq!(
            back.map(|x| x.id),
            Some("b".into()),
            "closed: back to discard"
        );
        assert!(!s.begin_fill("k"));
        assert!(!Spares::new(0).begin_fill("k"));
        let m = s.metrics("ns");
        assert!(
            m.contains("trenv_template_spares{namespace=\"ns\"} 0"),
            "{m}"
        );
        assert!(
            m.contains("trenv_template_spares_taken_total{namespace=\"ns\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("trenv_template_spares_failed_total{namespace=\"ns\"} 1"),
            "{m}"
        );
    }
}
