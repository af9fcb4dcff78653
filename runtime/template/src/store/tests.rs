//! Templates of real processes: a Python process with heap, brk, anonymous mmaps, a thread,
//! a mapped file, a grows-down mapping and an MADV_HUGEPAGE area is dumped by the installed
//! CRIU, made a template in a tmpfs pool, and restored by stock CRIU through `--inherit-fd`;
//! its memory checksum must be what it was before the dump.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trenv_mempool::FilePool;

use super::*;

const PROGRAM: &str = r#"
import hashlib, mmap, os, signal, sys, threading, time
out = sys.argv[1]
data = bytearray(os.urandom(1 << 20)) * 6
small = [bytes([i % 251]) * 97 for i in range(20000)]
anon = mmap.mmap(-1, 3 << 20)
anon.write(os.urandom(3 << 20))
with open(out + ".file", "wb") as f:
    f.write(os.urandom(1 << 16))
mapped = mmap.mmap(os.open(out + ".file", os.O_RDONLY), 0, prot=mmap.PROT_READ)
down = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100)
down.write(b"g" * (1 << 16))
huge = mmap.mmap(-1, 4 << 20)
huge.madvise(mmap.MADV_HUGEPAGE)
huge.write(os.urandom(4 << 20))
stop = threading.Event()
t = threading.Thread(target=stop.wait, daemon=True)
t.start()
def report(sig, frm):
    h = hashlib.sha256()
    for part in (data, b"".join(small), anon[:], mapped[:], down[:], huge[:]):
        h.update(part)
    with open(out + ".tmp", "w") as f:
        f.write(h.hexdigest())
    os.rename(out + ".tmp", out)
signal.signal(signal.SIGUSR1, report)
open(out + ".ready", "w").close()
while True:
    time.sleep(1)
"#;

fn wait_file(p: &Path) -> String {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(s) = std::fs::read_to_string(p) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never appeared", p.display());
}

fn checksum(pid: i32, out: &Path) -> String {
    let _ = std::fs::remove_file(out);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    wait_file(out)
}

struct Fixture {
    tmp: tempfile::TempDir,
    pool: Option<FilePool>,
    store: Store,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pool = FilePool::tmpfs("test", &tmp.path().join("pool"), 256 << 20).unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        Self {
            tmp,
            pool: Some(pool),
            store,
        }
    }

    fn pool(&self) -> &FilePool {
        self.pool.as_ref().unwrap()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// Starts the program, takes its checksum, dumps it (which ends it); the checksum.
    fn dump(&self, dir: &str) -> (PathBuf, String) {
        let out = self.path(&format!("{dir}.sum"));
        let mut child = Command::new("setsid")
            .args(["python3", "-c", PROGRAM])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // Killed however this test ends (a dump ends it anyway).
        let _guard = KillOnDrop(pid);
        wait_file(&PathBuf::from(format!("{}.ready", out.display())));
        let sum = checksum(pid, &out);
        let images = self.path(dir);
        std::fs::create_dir_all(&images).unwrap();
        let st = Command::new("criu")
            .args(["dump", "--shell-job", "-t", &pid.to_string(), "-D"])
            .arg(&images)
            .args(["-o", "dump.log"])
            .status()
            .unwrap();
        assert!(
            st.success(),
            "{}",
            std::fs::read_to_string(images.join("dump.log")).unwrap_or_default()
        );
        child.wait().unwrap();
        (images, sum)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            let _ = p.destroy();
        }
    }
}

struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn criu_version() -> String {
    let out = Command::new("criu").arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        .unwrap()
}

/// Restores a prepared template with the criu CLI; the restored pid.
fn restore(p: &Prepared, work: &Path) -> i32 {
    let pidfile = work.join("pid");
    let mut cmd = Command::new("criu");
    cmd.args(["restore", "--shell-job", "-d", "-D"])
        .arg(&p.images)
        .arg("-W")
        .arg(work)
        .args(["-o", "restore.log", "--pidfile"])
        .arg(&pidfile);
    let mut fds = Vec::new();
    for (i, (key, f)) in p.inherit.iter().enumerate() {
        let n = 100 + i32::try_from(i).unwrap();
        cmd.arg("--inherit-fd").arg(format!("fd[{n}]:{key}"));
        fds.push((f.as_raw_fd(), n));
    }
    // SAFETY: dup2 is async-signal-safe; the descriptors stay open in the parent until
    // spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &fds {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let st = cmd.status().unwrap();
    assert!(
        st.success(),
        "criu restore: {}",
        std::fs::read_to_string(work.join("restore.log")).unwrap_or_default()
    );
    std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_template_restores_the_same_memory_from_the_pool() {
    let f = Fixture::new();
    let (images, before) = f.dump("dump");
    let criu = criu_version();
    let (m, built) = f.store.build(&images, "py", None, f.pool(), &criu).unwrap();
    assert!(built);
    // The source is untouched, the template holds the pages in the pool.
    assert!(images
        .join("pagemap-".to_string() + &m.regions[0].pid.to_string() + ".img")
        .exists());
    let moved: u64 = m.regions.iter().map(|r| r.data).sum();
    assert!(moved >= 9 << 20, "only {moved} bytes moved: {:?}", m.report);
    assert!(m.report.pages_left < moved / 4, "{:?}", m.report);
    assert!(m.report.kept.contains_key("stack") || m.report.kept.contains_key("grows down"));
    assert_eq!(
        f.pool().usage().unwrap().used,
        m.regions.iter().map(|r| r.data).sum::<u64>()
    );

    let work = f.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let p = f.store.prepare("py", &criu).unwrap();
    let pid = restore(&p, &work);
    let after = checksum(pid, &f.path("dump.sum"));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let region = m.regions[0].path.to_string_lossy().into_owned();
    let mapped = maps.lines().filter(|l| l.ends_with(&region)).count();
    // The template is in use: it stays.
    let e = f.store.remove("py").unwrap_err();
    assert_eq!(e.reason(), "in-use", "{e}");
    kill(pid);
    assert_eq!(after, before, "restored memory differs");
    assert!(mapped >= 3, "region mapped {mapped} times:\n{maps}");
    f.store.remove("py").unwrap();
    assert_eq!(f.store.manifest("py").unwrap_err().reason(), "missing");
    assert_eq!(f.pool().usage().unwrap().regions, 0);
}

#[test]
fn damaged_or_stale_templates_are_refused_with_their_reason() {
    let f = Fixture::new();
    let (images, _) = f.dump("dump");
    let criu = criu_version();
    let (m, _) = f.store.build(&images, "t", None, f.pool(), &criu).unwrap();
    f.store.check("t", &criu).unwrap();
    assert_eq!(f.store.check("t", "3.17").unwrap_err().reason(), "stale");
    assert_eq!(
        f.store.check("nope", &criu).unwrap_err().reason(),
        "missing"
    );

    // A flipped byte in the pool region.
    let region = &m.regions[0].path;
    let mut bytes = std::fs::read(region).unwrap();
    let at = bytes.iter().position(|b| *b != 0).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(region, &bytes).unwrap();
    let e = f.store.prepare("t", &criu).unwrap_err();
    assert_eq!(e.reason(), "corrupt", "{e}");
    bytes[at] ^= 0xff;
    std::fs::write(region, &bytes).unwrap();
    f.store.check("t", &criu).unwrap();

    // Truncated, then deleted.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(region)
        .unwrap();
    file.set_len(4096).unwrap();
    assert_eq!(f.store.check("t", &criu).unwrap_err().reason(), "corrupt");
    std::fs::remove_file(region).unwrap();
    assert_eq!(
        f.store.check("t", &criu).unwrap_err().reason(),
        "pool-missing"
    );

    // A damaged image.
    let (images2, _) = f.dump("dump2");
    f.store.build(&images2, "u", None, f.pool(), &criu).unwrap();
    let key = f.store.resolve("u").unwrap();
    let inv = f
        .store
        .root()
        .join("by-key")
        .join(&key)
        .join("images/inventory.img");
    let mut b = std::fs::read(&inv).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&inv, b).unwrap();
    assert_eq!(f.store.check("u", &criu).unwrap_err().reason(), "corrupt");

    // gc takes the broken template's leftovers once its names are gone.
    std::fs::remove_file(f.store.root().join("names/t")).unwrap();
    let removed = f.store.gc(Some(f.pool())).unwrap();
    assert!(
        removed.iter().any(|r| r.starts_with("unnamed template")),
        "{removed:?}"
    );
}

#[test]
fn concurrent_builds_of_one_key_make_one_template() {
    let f = Fixture::new();
    let (images, _) = f.dump("dump");
    let criu = criu_version();
    let results: Vec<(Manifest, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let (store, pool, images, criu) = (&f.store, f.pool(), &images, &criu);
                s.spawn(move || {
                    store
                        .build(images, &format!("n{i}"), Some("k".repeat(64)), pool, criu)
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|(_, built)| *built).count(), 1);
    assert!(results.windows(2).all(|w| w[0].0 == w[1].0));
    let listed = f.store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].names, ["n0", "n1", "n2"]);
    for n in ["n0", "n1"] {
        f.store.remove(n).unwrap();
        assert_eq!(
            f.pool().usage().unwrap().regions,
            1,
            "removed with a name left"
        );
    }
    f.store.remove("n2").unwrap();
    assert_eq!(f.pool().usage().unwrap().regions, 0);
}

#[test]
fn a_hugetlbfs_pool_is_refused_before_anything_is_made() {
    let f = Fixture::new();
    let (images, _) = f.dump("dump");
    let huge = f.path("huge");
    std::fs::create_dir(&huge).unwrap();
    nix::mount::mount(
        Some("none"),
        &huge,
        Some("hugetlbfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(&huge);
    let pool = FilePool::hugetlbfs("huge", &huge, 64 << 20).unwrap();
    let e = f
        .store
        .build(&images, "h", None, &pool, &criu_version())
        .unwrap_err();
    assert_eq!(e.reason(), "unsupported", "{e}");
    assert!(e.to_string().contains("tmpfs pool"), "{e}");
    assert!(pool.regions().unwrap().is_empty());
    assert!(f.store.list().unwrap().is_empty());
}
