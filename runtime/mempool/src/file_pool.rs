//! Pools that are directories of region files: tmpfs, hugetlbfs and DAX filesystems.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{
    align_up, mapped_by, MemoryPool, PoolError, PoolInfo, PoolKind, Region, RegionWriter, Usage,
};

const LOCK_FILE: &str = ".lock";
const PAGE: u64 = 4096;

/// A pool kept as a directory of region files.
#[derive(Debug)]
pub struct FilePool {
    info: PoolInfo,
    /// The pool mounted its tmpfs itself (and [`FilePool::destroy`] unmounts it).
    own_mount: bool,
}

/// The filesystem type and options of the mount at exactly `dir`, if `dir` is a mount point.
fn mount_at(dir: &Path) -> Option<(String, String)> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount at a path is the visible one.
    info.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mp = pre.split_whitespace().nth(4)?;
        if Path::new(&unescape(mp)) != dir {
            return None;
        }
        let mut f = post.split_whitespace();
        let fstype = f.next()?.to_string();
        let _source = f.next();
        Some((fstype, f.next().unwrap_or_default().to_string()))
    })
}

/// mountinfo escapes spaces and a few other bytes as \ooo.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(char::from(v));
                i += 4;
                continue;
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    out
}

/// Creates a pool's directory.
fn create_dir(pool: &str, dir: &Path) -> Result<(), PoolError> {
    std::fs::create_dir_all(dir).map_err(|source| PoolError::Io {
        pool: pool.into(),
        what: "creating",
        path: dir.into(),
        source,
    })
}

/// Region names: safe as file names (letters, digits, `.`, `_`, `-`; no leading dot).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

impl FilePool {
    fn io(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PoolError {
        let (pool, path) = (self.info.name.clone(), path.to_path_buf());
        move |source| PoolError::Io {
            pool,
            what,
            path,
            source,
        }
    }

    /// A tmpfs pool at `dir` of `capacity` bytes: a tmpfs of that size is mounted there
    /// unless one already is (then its size is what it is).
    pub fn tmpfs(name: &str, dir: &Path, capacity: u64) -> Result<Self, PoolError> {
        if capacity == 0 {
            return Err(PoolError::Config("a tmpfs pool needs a capacity".into()));
        }
        create_dir(name, dir)?;
        let own_mount = match mount_at(dir) {
            Some((fs, _)) if fs == "tmpfs" => false,
            Some((fs, _)) => {
                return Err(PoolError::Config(format!(
                    "{} is a {fs} mount, not tmpfs",
                    dir.display()
                )))
            }
            None => {
                nix::mount::mount(
                    Some("trenv-mempool"),
                    dir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(format!("size={capacity},mode=0700").as_str()),
                )
                .map_err(|e| PoolError::Io {
                    pool: name.into(),
                    what: "mounting tmpfs on",
                    path: dir.into(),
                    source: e.into(),
                })?;
                true
            }
        };
        Ok(Self {
            info: PoolInfo {
                name: name.into(),
                kind: PoolKind::Tmpfs,
                dir: dir.into(),
                capacity,
                alignment: PAGE,
            },
            own_mount,
        })
    }

    /// A pool in a hugetlbfs mount at `dir` (mounted by the operator, with the page size
    /// wanted); extents are aligned to its huge page size.
    pub fn hugetlbfs(name: &str, dir: &Path, capacity: u64) -> Result<Self, PoolError> {
        match mount_at(dir) {
            Some((fs, _)) if fs == "hugetlbfs" => {}
            _ => {
                return Err(PoolError::Config(format!(
                    "{} is not a hugetlbfs mount",
                    dir.display()
                )))
            }
        }
        let st = nix::sys::statfs::statfs(dir).map_err(|e| PoolError::Io {
            pool: name.into(),
            what: "statfs",
            path: dir.into(),
            source: e.into(),
        })?;
        let alignment = u64::try_from(st.block_size()).unwrap_or(2 << 20);
        Ok(Self {
            info: PoolInfo {
                name: name.into(),
                kind: PoolKind::Hugetlbfs,
                dir: dir.into(),
                capacity,
                alignment,
            },
            own_mount: false,
        })
    }

    /// A pool in a directory of a DAX-capable filesystem (an ordinary directory works too,
    /// with page-cache pages instead of device pages; a log line says which it is).
    pub fn daxfs(name: &str, dir: &Path, capacity: u64) -> Result<Self, PoolError> {
        create_dir(name, dir)?;
        let dax = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(" - ") && l.contains("dax"));
        if !dax {
            tracing::info!(
                pool = name,
                dir = %dir.display(),
                "no DAX mount on this host: the pool's pages are page-cache pages"
            );
        }
        Ok(Self {
            info: PoolInfo {
                name: name.into(),
                kind: PoolKind::Daxfs,
                dir: dir.into(),
                capacity,
                alignment: PAGE,
            },
            own_mount: false,
        })
    }

    /// Opens a pool of `kind`.
    pub fn open(kind: PoolKind, name: &str, dir: &Path, capacity: u64) -> Result<Self, PoolError> {
        match kind {
            PoolKind::Tmpfs => Self::tmpfs(name, dir, capacity),
            PoolKind::Hugetlbfs => Self::hugetlbfs(name, dir, capacity),
            PoolKind::Daxfs => Self::daxfs(name, dir, capacity),
        }
    }

    /// The pool at `dir` if it is there already (for cleaning up: nothing is mounted or
    /// created).
    pub fn existing(kind: PoolKind, name: &str, dir: &Path, capacity: u64) -> Option<Self> {
        match kind {
            PoolKind::Tmpfs | PoolKind::Hugetlbfs => mount_at(dir).map(|_| ()),
            PoolKind::Daxfs => dir.is_dir().then_some(()),
        }?;
        Self::open(kind, name, dir, capacity).ok()
    }

    /// Removes every region (refused while any is mapped) and the tmpfs the pool mounted.
    pub fn destroy(self) -> Result<(), PoolError> {
        for r in self.regions()? {
            self.remove_region(&r)?;
        }
        if self.own_mount {
            nix::mount::umount2(&self.info.dir, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                PoolError::Io {
                    pool: self.info.name.clone(),
                    what: "unmounting",
                    path: self.info.dir.clone(),
                    source: e.into(),
                }
            })?;
            let _ = std::fs::remove_dir(&self.info.dir);
        }
        Ok(())
    }

    fn path(&self, name: &str) -> Result<PathBuf, PoolError> {
        if !valid_name(name) {
            return Err(PoolError::Config(format!("invalid region name {name:?}")));
        }
        Ok(self.info.dir.join(name))
    }

    /// Serialises region creation and removal among processes (builds run in parallel).
    fn lock(&self) -> Result<nix::fcntl::Flock<File>, PoolError> {
        let path = self.info.dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(self.io("opening lock", &path))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            PoolError::Io {
                pool: self.info.name.clone(),
                what: "locking",
                path: path.clone(),
                source: e.into(),
            }
        })
    }
}

/// Refuses a write of `data` at `offset` that would not fit a region of `size` bytes.
fn in_range(region: &str, offset: u64, data: &[u8], size: u64) -> Result<(), PoolError> {
    let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(PoolError::OutOfRange {
            region: region.into(),
            offset,
            len,
            size,
        });
    }
    Ok(())
}

/// Writes through the file (tmpfs, DAX filesystems).
struct FileWriter<'a> {
    file: &'a File,
    region: &'a str,
    size: u64,
}

impl RegionWriter for FileWriter<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        in_range(self.region, offset, data, self.size)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|source| PoolError::Io {
                pool: String::new(),
                what: "writing region",
                path: PathBuf::from(self.region),
                source,
            })
    }
}

/// Writes through a shared mapping (hugetlbfs files cannot be written with write(2)).
struct MapWriter<'a> {
    base: std::ptr::NonNull<libc::c_void>,
    region: &'a str,
    size: u64,
}

impl RegionWriter for MapWriter<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        in_range(self.region, offset, data, self.size)?;
        // In range of a mapping of `size` bytes, so it fits a usize.
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        // SAFETY: the mapping is `size` bytes long, shared and writable, and lives until the
        // writer is dropped; offset + len <= size was checked above, and `data` cannot
        // overlap a mapping made for this region alone.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().cast::<u8>().add(off),
                data.len(),
            );
        }
        Ok(())
    }
}

impl MemoryPool for FilePool {
    fn info(&self) -> PoolInfo {
        self.info.clone()
    }

    fn usage(&self) -> Result<Usage, PoolError> {
        let mut u = Usage::default();
        let dir = std::fs::read_dir(&self.info.dir).map_err(self.io("listing", &self.info.dir))?;
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == LOCK_FILE {
                continue;
            }
            if let Ok(m) = e.metadata() {
                u.used += m.blocks() * 512;
                if !name.starts_with('.') {
                    u.regions += 1;
                }
            }
        }
        Ok(u)
    }

    fn create_region(
        &self,
        name: &str,
        size: u64,
        reserve: u64,
        fill: &mut dyn FnMut(&mut dyn RegionWriter) -> Result<(), PoolError>,
    ) -> Result<Region, PoolError> {
        let path = self.path(name)?;
        let size = align_up(size.max(1), self.info.alignment);
        let _lock = self.lock()?;
        if path.exists() {
            return Err(PoolError::RegionExists {
                pool: self.info.name.clone(),
                region: name.into(),
            });
        }
        let used = self.usage()?.used;
        let need = align_up(reserve, self.info.alignment);
        if used.saturating_add(need) > self.info.capacity {
            return Err(PoolError::Full {
                pool: self.info.name.clone(),
                need,
                free: self.info.capacity.saturating_sub(used),
                capacity: self.info.capacity,
            });
        }
        let partial = self.info.dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_file(&partial);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&partial)
            .map_err(self.io("creating", &partial))?;
        let filled = (|| {
            file.set_len(size).map_err(self.io("sizing", &partial))?;
            match self.info.kind {
                PoolKind::Hugetlbfs => {
                    let len = std::num::NonZeroUsize::new(
                        usize::try_from(size)
                            .map_err(|_| PoolError::Config(format!("region of {size} bytes")))?,
                    )
                    .ok_or_else(|| PoolError::Config("empty region".into()))?;
                    // SAFETY: a fresh shared mapping of our own file; no other mapping of
                    // it exists, and it is unmapped below before the file is published.
                    let base = unsafe {
                        nix::sys::mman::mmap(
                            None,
                            len,
                            nix::sys::mman::ProtFlags::PROT_READ
                                | nix::sys::mman::ProtFlags::PROT_WRITE,
                            nix::sys::mman::MapFlags::MAP_SHARED,
                            &file,
                            0,
                        )
                    }
                    .map_err(|e| PoolError::Io {
                        pool: self.info.name.clone(),
                        what: "mapping",
                        path: partial.clone(),
                        source: e.into(),
                    })?;
                    let mut w = MapWriter {
                        base,
                        region: name,
                        size,
                    };
                    let r = fill(&mut w);
                    // SAFETY: `base` is the mapping made above, of `len` bytes; the writer
                    // holding it is gone.
                    let _ = unsafe { nix::sys::mman::munmap(base, len.get()) };
                    r
                }
                PoolKind::Tmpfs | PoolKind::Daxfs => fill(&mut FileWriter {
                    file: &file,
                    region: name,
                    size,
                }),
            }?;
            file.sync_all().map_err(self.io("syncing", &partial))?;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o444))
                .map_err(self.io("sealing", &partial))?;
            std::fs::rename(&partial, &path).map_err(self.io("publishing", &path))
        })();
        if let Err(e) = filled {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        drop(file);
        self.open_region(name)
    }

    fn open_region(&self, name: &str) -> Result<Region, PoolError> {
        let path = self.path(name)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PoolError::NoRegion {
                    pool: self.info.name.clone(),
                    region: name.into(),
                })
            }
            Err(e) => return Err(self.io("opening", &path)(e)),
        };
        let size = file.metadata().map_err(self.io("stat", &path))?.len();
        Ok(Region {
            name: name.into(),
            path,
            size,
            file,
        })
    }

    fn remove_region(&self, name: &str) -> Result<(), PoolError> {
        let path = self.path(name)?;
        let _lock = self.lock()?;
        if !path.exists() {
            return Err(PoolError::NoRegion {
                pool: self.info.name.clone(),
                region: name.into(),
            });
        }
        let pids = mapped_by(&path);
        if !pids.is_empty() {
            return Err(PoolError::InUse {
                pool: self.info.name.clone(),
                region: name.into(),
                pids,
            });
        }
        std::fs::remove_file(&path).map_err(self.io("removing", &path))
    }

    fn regions(&self) -> Result<Vec<String>, PoolError> {
        let dir = std::fs::read_dir(&self.info.dir).map_err(self.io("listing", &self.info.dir))?;
        let mut v: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(test)]
mod tests;
