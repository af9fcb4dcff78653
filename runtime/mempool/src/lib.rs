//! Memory pools: where template memory lives.
//!
//! A template's private memory is moved out of CRIU's page images into a *region* of a pool:
//! one file per template process, holding one page-aligned extent per converted VMA (sparse
//! where the VMA had no pages). Restored instances map their extents `MAP_PRIVATE`, so they
//! all share the region's pages and copy on write. Every backend here is a directory of
//! region files on a filesystem that can be mapped:
//!
//! - [`PoolKind::Tmpfs`]: local DRAM. The pool mounts a tmpfs of its own (its size is the
//!   pool's capacity, enforced by the kernel too; exec allowed, unlike /dev/shm or /run on
//!   many hosts, so JIT pages can be converted).
//! - [`PoolKind::Hugetlbfs`]: local DRAM in huge pages (a hugetlbfs mount given by the
//!   operator); extents are aligned to the huge page size and filled through mappings.
//! - [`PoolKind::Daxfs`]: a directory on a DAX-capable filesystem (`-o dax` on PMem or CXL
//!   memory): read faults map device pages directly, writes copy into DRAM.
//!
//! [`pseudo_mm`] is the `kmod` backend: the same region files (or a device-DAX device)
//! mapped through the pseudo_mm kernel module instead of as files, so that a restored
//! process's template pages stay device pages and the module accounts for them.

mod file_pool;
mod mapped;
pub mod pseudo_mm;

pub use file_pool::{valid_name, FilePool};
pub use mapped::mapped_by;

use std::fs::File;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    Tmpfs,
    Hugetlbfs,
    Daxfs,
}

impl std::fmt::Display for PoolKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolKind::Tmpfs => "tmpfs",
            PoolKind::Hugetlbfs => "hugetlbfs",
            PoolKind::Daxfs => "daxfs",
        })
    }
}

impl std::str::FromStr for PoolKind {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        match s {
            "tmpfs" => Ok(PoolKind::Tmpfs),
            "hugetlbfs" => Ok(PoolKind::Hugetlbfs),
            "daxfs" => Ok(PoolKind::Daxfs),
            other => Err(PoolError::Config(format!(
                "unknown pool kind {other:?} (tmpfs, hugetlbfs or daxfs)"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool configuration: {0}")]
    Config(String),
    #[error("pool {pool}: {what} {path}: {source}")]
    Io {
        pool: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pool {pool} is full: {need} bytes needed, {free} of {capacity} free")]
    Full {
        pool: String,
        need: u64,
        free: u64,
        capacity: u64,
    },
    #[error("pool {pool} has no region {region:?}")]
    NoRegion { pool: String, region: String },
    #[error("pool {pool} already has a region {region:?}")]
    RegionExists { pool: String, region: String },
    #[error("region {region:?} of pool {pool} is mapped by processes {pids:?}")]
    InUse {
        pool: String,
        region: String,
        pids: Vec<i32>,
    },
    #[error("region {region:?}: write of {len} bytes at {offset} is outside its {size} bytes")]
    OutOfRange {
        region: String,
        offset: u64,
        len: u64,
        size: u64,
    },
}

/// What a pool is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub kind: PoolKind,
    pub dir: PathBuf,
    /// Bytes of memory the pool may hold.
    pub capacity: u64,
    /// Extents start at multiples of this (the page or huge page size).
    pub alignment: u64,
}

/// What a pool holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Bytes of memory the regions take (allocated blocks, not their sparse sizes).
    pub used: u64,
    pub regions: usize,
}

/// A region being filled; dropped unfinished, it is removed.
pub trait RegionWriter {
    /// Writes `data` at `offset` of the region.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), PoolError>;
}

/// A finished region, open for mapping.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    /// Where the region file is; the path CRIU's image names (and the key it is inherited
    /// under at restore).
    pub path: PathBuf,
    /// Logical size (the sum of its extents).
    pub size: u64,
    /// Opened read-only.
    pub file: File,
}

/// One pool of template memory.
pub trait MemoryPool: Send + Sync {
    fn info(&self) -> PoolInfo;

    fn usage(&self) -> Result<Usage, PoolError>;

    /// Creates the region `name` of `size` bytes, reserving `reserve` bytes of the pool's
    /// capacity for the data `fill` writes into it. The region appears (read-only) only
    /// when `fill` succeeded; on any failure nothing is left.
    fn create_region(
        &self,
        name: &str,
        size: u64,
        reserve: u64,
        fill: &mut dyn FnMut(&mut dyn RegionWriter) -> Result<(), PoolError>,
    ) -> Result<Region, PoolError>;

    fn open_region(&self, name: &str) -> Result<Region, PoolError>;

    /// Removes a region; refused while a process maps it.
    fn remove_region(&self, name: &str) -> Result<(), PoolError>;

    /// Names of the pool's regions.
    fn regions(&self) -> Result<Vec<String>, PoolError>;
}

/// Rounds `n` up to a multiple of `align` (a power of two).
pub fn align_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}
