//! CRIU image files: their framing and the messages templates rewrite.
//!
//! Every image but `inventory` starts with two magic numbers (the common or service magic,
//! then the image type's own); `inventory` has its type magic only; `pages-*.img` are raw page
//! data with no header at all. After the header come entries, each a little-endian u32
//! length and that many bytes of protobuf. The messages are generated at build time from
//! the `images/*.proto` of the CRIU that `make setup` built, and keep fields this code does
//! not know (`special_fields`), so a rewrite loses nothing CRIU wrote.
//!
//! Only images whose entries are plain messages can go through [`Image`]: some image types
//! (pipe data, ghost files, socket queues) carry raw payloads after their entries. Copy
//! those byte for byte.

mod framing;

pub use framing::{Header, ImageError, RawImage};

/// CRIU's image messages, generated from its `images/*.proto`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    unused_qualifications
)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/criu_images/mod.rs"));
}

use std::path::Path;

use protobuf::Message;

/// The messages templates work with, under Rust names.
pub use proto::cgroup::Cgroup_entry as CgroupEntry;
pub use proto::core::Task_kobj_ids_entry as TaskKobjIdsEntry;
pub use proto::fdinfo::{Fd_types as FdTypes, File_entry as FileEntry};
pub use proto::fown::Fown_entry as FownEntry;
pub use proto::inventory::Inventory_entry as InventoryEntry;
pub use proto::mm::Mm_entry as MmEntry;
pub use proto::mnt::{Fstype, Mnt_entry as MntEntry};
pub use proto::pagemap::{Pagemap_entry as PagemapEntry, Pagemap_head as PagemapHead};
pub use proto::pstree::Pstree_entry as PstreeEntry;
pub use proto::regfile::Reg_file_entry as RegFileEntry;
pub use proto::vma::Vma_entry as VmaEntry;

/// Magic numbers (criu/include/magic.h).
pub mod magic {
    /// First word of ordinary images.
    pub const IMG_COMMON: u32 = 0x5456_4319;
    /// First word of service images (inventory-like files CRIU keeps for itself).
    pub const IMG_SERVICE: u32 = 0x5510_5940;
    pub const INVENTORY: u32 = 0x5831_3116;
    pub const PSTREE: u32 = 0x5027_3030;
    pub const MM: u32 = 0x5749_2820;
    pub const PAGEMAP: u32 = 0x5608_4025;
    pub const FILES: u32 = 0x5630_3138;
    pub const MNTS: u32 = 0x5556_3928;
    pub const CGROUP: u32 = 0x5938_3330;
    pub const IDS: u32 = 0x5443_2030;
}

/// An image whose entries are all messages of one type.
#[derive(Debug, Clone, PartialEq)]
pub struct Image<M: Message> {
    pub header: Header,
    pub entries: Vec<M>,
}

impl<M: Message> Image<M> {
    /// Decodes the raw image's entries as `M`.
    pub fn from_raw(raw: &RawImage) -> Result<Self, ImageError> {
        let entries = (0..raw.entries.len())
            .map(|i| raw.decode::<M>(i))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            header: raw.header,
            entries,
        })
    }

    pub fn read(path: &Path) -> Result<Self, ImageError> {
        Self::from_raw(&RawImage::read(path)?)
    }

    pub fn to_raw(&self) -> Result<RawImage, ImageError> {
        let entries = self
            .entries
            .iter()
            .map(|m| {
                m.write_to_bytes().map_err(|e| ImageError::Encode {
                    message: M::NAME,
                    source: e,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(RawImage {
            header: self.header,
            entries,
        })
    }

    /// Writes the image atomically (a temporary file renamed over `path`).
    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        self.to_raw()?.write(path)
    }

    /// The only entry of a one-entry image (inventory, mm-*, core-*).
    pub fn single(&self) -> Result<&M, ImageError> {
        match self.entries.as_slice() {
            [one] => Ok(one),
            other => Err(ImageError::EntryCount {
                message: M::NAME,
                found: other.len(),
            }),
        }
    }
}

/// `pagemap-<id>.img`: a head naming the `pages-<n>.img`, then one entry per run of pages.
/// Page data of the runs marked present is stored in that order, back to back, in the
/// pages image; an entry's offset there is the sum of the present runs before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pagemap {
    pub header: Header,
    pub head: PagemapHead,
    pub entries: Vec<PagemapEntry>,
}

/// Pagemap entry flags (criu/include/pagemap.h).
pub mod pe_flags {
    pub const PARENT: u32 = 1 << 0;
    pub const LAZY: u32 = 1 << 1;
    pub const PRESENT: u32 = 1 << 2;
}

impl Pagemap {
    pub fn read(path: &Path) -> Result<Self, ImageError> {
        let raw = RawImage::read(path)?;
        if raw.entries.is_empty() {
            return Err(ImageError::EntryCount {
                message: "pagemap_head",
                found: 0,
            });
        }
        let head = raw.decode(0)?;
        let entries = (1..raw.entries.len())
            .map(|i| raw.decode(i))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            header: raw.header,
            head,
            entries,
        })
    }

    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        let encode = |m: &dyn protobuf::MessageDyn, name: &'static str| {
            m.write_to_bytes_dyn().map_err(|e| ImageError::Encode {
                message: name,
                source: e,
            })
        };
        let mut entries = vec![encode(&self.head, "pagemap_head")?];
        for e in &self.entries {
            entries.push(encode(e, "pagemap_entry")?);
        }
        RawImage {
            header: self.header,
            entries,
        }
        .write(path)
    }
}

/// Number of pages of a pagemap entry: `nr_pages` in newer images, `compat_nr_pages` in
/// older ones.
pub fn entry_pages(e: &PagemapEntry) -> u64 {
    e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages()))
}

/// Whether the entry's pages are stored in the pages image (not in a parent, not a hole).
pub fn entry_present(e: &PagemapEntry) -> bool {
    match e.flags {
        Some(f) => f & pe_flags::PRESENT != 0,
        // Images from before flags: present unless in the parent.
        None => !e.in_parent(),
    }
}

#[cfg(test)]
mod tests;
