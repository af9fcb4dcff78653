//! The `kmod` backend: pool regions mapped through the pseudo_mm kernel module
//! (`pseudo-mm-kmod/`, `/dev/pseudo_mm`) instead of as files.
//!
//! A region file of a pool (tmpfs, or a file on a `-o dax` file system) or a device-DAX
//! device is registered with the module as a *backend*; a *template* lists page ranges of
//! backends, one per VMA it stands for; a restored process maps range `i` of template `t`
//! privately at [`map_offset`]`(t, i)` of the device. Read faults map the backend's own page
//! (device memory for DAX: never copied into DRAM), writes copy. The layouts and request
//! numbers follow `pseudo-mm-kmod/include/uapi/linux/pseudo_mm.h`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where the module's device is.
pub const DEVICE: &str = "/dev/pseudo_mm";

const MAGIC: u64 = 0x1c;
const REGION_BITS: u32 = 12;
/// Ranges per template (the low bits of a map offset's page number).
pub const MAX_REGIONS: usize = 1 << REGION_BITS;
/// Template ids run from 1 to this (`PSEUDO_MM_MAX_TEMPLATES`).
pub const MAX_TEMPLATES: u32 = 4095;

/// Backend kinds the module reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Pages come from the page cache (tmpfs): DRAM shared by every instance.
    PageCache,
    /// Pages are device memory (PMem, CXL) mapped as they are.
    Dax,
    /// Pages come from a memory server over RDMA, fetched at their first fault and kept.
    Rdma,
}

#[derive(Debug, thiserror::Error)]
pub enum PseudoMmError {
    #[error(
        "cannot open {path}: {source} (is the pseudo_mm module loaded? `make kmod-test` builds it)"
    )]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pseudo_mm: {what}: {detail}")]
    Request {
        what: String,
        detail: String,
        errno: i32,
    },
}

#[repr(C)]
#[derive(Default)]
struct BackendReq {
    fd: i32,
    id: u32,
    pages: u64,
    flags: u32,
    kind: u32,
}

#[repr(C)]
#[derive(Default)]
struct TemplateReq {
    flags: u32,
    id: u32,
    tag: u64,
}

/// A template as the module has it now (`struct pseudo_mm_template_info`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TemplateInfo {
    pub id: u32,
    flags: u32,
    /// What its creator gave [`PseudoMm::create_template`].
    pub tag: u64,
    /// Pages of all its ranges.
    pub pages: u64,
    pub regions: u32,
    /// Live mmaps of it.
    pub mappings: u32,
    /// The backend of its first range (0: none).
    pub backend: u32,
    reserved: u32,
}

/// `PSEUDO_MM_TEMPLATE_AT_ID`.
const TEMPLATE_AT_ID: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct RegionReq {
    template_id: u32,
    backend_id: u32,
    pgoff: u64,
    pages: u64,
    flags: u32,
    index: u32,
}

/// The module's gauges and counters (`struct pseudo_mm_stats`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub templates: u64,
    pub backends: u64,
    pub regions: u64,
    pub vmas: u64,
    pub read_faults: u64,
    pub write_faults: u64,
    pub bad_faults: u64,
    pub around_pages: u64,
    pub dax_pages: u64,
    pub pinned_pages: u64,
    pub rdma_fetches: u64,
    pub rdma_errors: u64,
}

#[repr(C)]
#[derive(Default)]
struct RemoteReq {
    addr: u32, // network order
    port: u16, // network order
    flags: u16,
    timeout_ms: u32,
    id: u32,
    pages: u64,
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (MAGIC << 8) | nr
}
const WRITE: u64 = 1;
const READ: u64 = 2;
const REGISTER_BACKEND: u64 = ioc(READ | WRITE, 1, std::mem::size_of::<BackendReq>());
const UNREGISTER_BACKEND: u64 = ioc(WRITE, 2, std::mem::size_of::<u32>());
const CREATE_TEMPLATE: u64 = ioc(READ | WRITE, 3, std::mem::size_of::<TemplateReq>());
const ADD_REGION: u64 = ioc(READ | WRITE, 4, std::mem::size_of::<RegionReq>());
const DELETE_TEMPLATE: u64 = ioc(WRITE, 5, std::mem::size_of::<u32>());
const STATS: u64 = ioc(READ, 6, std::mem::size_of::<Stats>());
const REGISTER_REMOTE: u64 = ioc(READ | WRITE, 7, std::mem::size_of::<RemoteReq>());
const TEMPLATE_INFO: u64 = ioc(READ | WRITE, 8, std::mem::size_of::<TemplateInfo>());

/// mmap(2) offset in bytes of range `index` of template `template`.
pub fn map_offset(template: u32, index: u32) -> u64 {
    ((u64::from(template) << REGION_BITS) | u64::from(index)) << 12
}

/// The template and range a map offset names (the inverse of [`map_offset`]), if it names
/// one: page-aligned, and a template id the module can give.
pub fn parse_map_offset(offset: u64) -> Option<(u32, u32)> {
    if !offset.is_multiple_of(4096) {
        return None;
    }
    let page = offset >> 12;
    let template = u32::try_from(page >> REGION_BITS)
        .ok()
        .filter(|t| (1..=MAX_TEMPLATES).contains(t))?;
    let index = u32::try_from(page & ((1 << REGION_BITS) - 1)).ok()?;
    Some((template, index))
}

impl PseudoMmError {
    /// The template is mapped, or the backend used by a template (EBUSY).
    pub fn is_busy(&self) -> bool {
        matches!(self, PseudoMmError::Request { errno, .. } if *errno == libc::EBUSY)
    }

    /// The template id asked for is another template's (EEXIST).
    pub fn is_taken(&self) -> bool {
        matches!(self, PseudoMmError::Request { errno, .. } if *errno == libc::EEXIST)
    }

    /// No such template or backend (ENOENT): deleted, or the module was reloaded.
    pub fn is_missing(&self) -> bool {
        matches!(self, PseudoMmError::Request { errno, .. } if *errno == libc::ENOENT)
    }
}

/// An open `/dev/pseudo_mm`.
#[derive(Debug)]
pub struct PseudoMm {
    dev: File,
}

impl PseudoMm {
    pub fn open() -> Result<Self, PseudoMmError> {
        Self::open_at(Path::new(DEVICE))
    }

    pub fn open_at(path: &Path) -> Result<Self, PseudoMmError> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| PseudoMmError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self { dev })
    }

    /// The device, e.g. to hand to CRIU (`--inherit-fd`).
    pub fn file(&self) -> &File {
        &self.dev
    }

    fn ioctl<T>(
        &self,
        request: u64,
        arg: &mut T,
        what: impl FnOnce() -> String,
    ) -> Result<(), PseudoMmError> {
        // SAFETY: `request` is one of the module's requests, whose argument is a `T` with the
        // layout of the uapi struct (or a u32); `arg` is a live, exclusive reference to one,
        // which the kernel reads and writes only within its size.
        let rc = unsafe {
            libc::ioctl(
                self.dev.as_raw_fd(),
                request as libc::c_ulong,
                arg as *mut T,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        let detail = match err.raw_os_error() {
            Some(libc::EINVAL) => format!("invalid argument: {err}"),
            Some(libc::ENOENT) => "no such template or backend (module reloaded?)".into(),
            Some(libc::EBUSY) => "still mapped by a process, or used by a template".into(),
            Some(libc::ETXTBSY) => "the backend file is open for writing".into(),
            Some(libc::ENOSPC) => "the module's table is full".into(),
            Some(libc::ENOTTY) => "request unknown to the loaded module (version mismatch)".into(),
            Some(libc::EEXIST) => "the template id is another template's".into(),
            _ => err.to_string(),
        };
        Err(PseudoMmError::Request {
            what: what(),
            detail,
            errno: err.raw_os_error().unwrap_or(0),
        })
    }

    /// Registers `file` (opened read-only, no writers) as a backend; `pages` = 0 uses the
    /// file's size (a device-DAX device needs its size given).
    pub fn register_backend(
        &self,
        file: &File,
        pages: u64,
    ) -> Result<(u32, BackendKind), PseudoMmError> {
        let mut req = BackendReq {
            fd: file.as_raw_fd(),
            pages,
            ..Default::default()
        };
        self.ioctl(REGISTER_BACKEND, &mut req, || {
            "registering a backend".into()
        })?;
        let kind = match req.kind {
            2 => BackendKind::Dax,
            3 => BackendKind::Rdma,
            _ => BackendKind::PageCache,
        };
        Ok((req.id, kind))
    }

    /// Connects to the memory server (`pmm-memserver`) at `server` and registers what it
    /// exports as a backend; `timeout_ms` bounds connecting and each page fetch (0: the
    /// module's 5 s). Returns the backend and its pages.
    pub fn register_remote(
        &self,
        server: std::net::SocketAddrV4,
        timeout_ms: u32,
    ) -> Result<(u32, u64), PseudoMmError> {
        let mut req = RemoteReq {
            addr: u32::from(*server.ip()).to_be(),
            port: server.port().to_be(),
            timeout_ms,
            ..Default::default()
        };
        self.ioctl(REGISTER_REMOTE, &mut req, || {
            format!("connecting to the memory server {server}")
        })?;
        Ok((req.id, req.pages))
    }

    pub fn unregister_backend(&self, id: u32) -> Result<(), PseudoMmError> {
        let mut id_arg = id;
        self.ioctl(UNREGISTER_BACKEND, &mut id_arg, || {
            format!("unregistering backend {id}")
        })
    }

    /// A new, empty template named `tag` by its creator. Ids start over when the module is
    /// reloaded: whoever keeps an id beyond that checks the tag ([`Self::template_info`])
    /// before mapping or deleting by it.
    pub fn create_template(&self, tag: u64) -> Result<u32, PseudoMmError> {
        let mut req = TemplateReq {
            tag,
            ..Default::default()
        };
        self.ioctl(CREATE_TEMPLATE, &mut req, || "creating a template".into())?;
        Ok(req.id)
    }

    /// [`Self::create_template`] under the id `id`, e.g. the one images name, made again
    /// after a reload; fails ([`PseudoMmError::is_taken`]) if `id` is another template's.
    pub fn create_template_at(&self, id: u32, tag: u64) -> Result<(), PseudoMmError> {
        let mut req = TemplateReq {
            flags: TEMPLATE_AT_ID,
            id,
            tag,
        };
        self.ioctl(CREATE_TEMPLATE, &mut req, || {
            format!("creating template {id}")
        })
    }

    pub fn template_info(&self, id: u32) -> Result<TemplateInfo, PseudoMmError> {
        let mut info = TemplateInfo {
            id,
            ..Default::default()
        };
        self.ioctl(TEMPLATE_INFO, &mut info, || {
            format!("reading template {id}")
        })?;
        Ok(info)
    }

    /// Adds pages `pgoff..pgoff + pages` of `backend` to `template`; returns the range's index.
    pub fn add_region(
        &self,
        template: u32,
        backend: u32,
        pgoff: u64,
        pages: u64,
    ) -> Result<u32, PseudoMmError> {
        let mut req = RegionReq {
            template_id: template,
            backend_id: backend,
            pgoff,
            pages,
            ..Default::default()
        };
        self.ioctl(ADD_REGION, &mut req, || {
            format!("adding pages {pgoff}+{pages} of backend {backend} to template {template}")
        })?;
        Ok(req.index)
    }

    pub fn delete_template(&self, id: u32) -> Result<(), PseudoMmError> {
        let mut id_arg = id;
        self.ioctl(DELETE_TEMPLATE, &mut id_arg, || {
            format!("deleting template {id}")
        })
    }

    pub fn stats(&self) -> Result<Stats, PseudoMmError> {
        let mut s = Stats::default();
        self.ioctl(STATS, &mut s, || "reading stats".into())?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers the C header gives (`_IOWR(0x1c, 1, struct pseudo_mm_backend)` and
    /// so on), computed by hand from the struct sizes in the header.
    #[test]
    fn requests_match_the_uapi_header() {
        assert_eq!(std::mem::size_of::<BackendReq>(), 24);
        assert_eq!(std::mem::size_of::<RegionReq>(), 32);
        assert_eq!(std::mem::size_of::<Stats>(), 96);
        assert_eq!(std::mem::size_of::<RemoteReq>(), 24);
        assert_eq!(std::mem::size_of::<TemplateReq>(), 16);
        assert_eq!(std::mem::size_of::<TemplateInfo>(), 40);
        assert_eq!(REGISTER_BACKEND, 0xc018_1c01);
        assert_eq!(UNREGISTER_BACKEND, 0x4004_1c02);
        assert_eq!(CREATE_TEMPLATE, 0xc010_1c03);
        assert_eq!(ADD_REGION, 0xc020_1c04);
        assert_eq!(DELETE_TEMPLATE, 0x4004_1c05);
        assert_eq!(STATS, 0x8060_1c06);
        assert_eq!(REGISTER_REMOTE, 0xc018_1c07);
        assert_eq!(TEMPLATE_INFO, 0xc028_1c08);
    }

    #[test]
    fn map_offsets_round_trip() {
        assert_eq!(map_offset(1, 0), 1 << 24);
        assert_eq!(map_offset(3, 5), ((3 << 12) | 5) << 12);
        assert_eq!(parse_map_offset(map_offset(4095, 4095)), Some((4095, 4095)));
    }

    #[test]
    fn offsets_name_template_ranges() {
        assert_eq!(parse_map_offset(((3 << 12) | 5) << 12), Some((3, 5)));
        assert_eq!(parse_map_offset(5 << 12), None, "template 0 does not exist");
        assert_eq!(
            parse_map_offset((4096 << 12) << 12),
            None,
            "past the last template"
        );
        assert_eq!(parse_map_offset(((1 << 12) << 12) + 1), None, "unaligned");
    }

    #[test]
    fn a_missing_device_says_what_to_do() {
        let err = PseudoMm::open_at(Path::new("/nonexistent/pseudo_mm")).unwrap_err();
        assert!(err.to_string().contains("module loaded"), "{err}");
    }
}
