//! The framing shared by CRIU's protobuf images: a magic header and length-prefixed
//! entries (criu/image.c, criu/protobuf.c).

use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message;

use super::magic;

/// Largest entry accepted: CRIU's own images stay far below (a `core` of a process with
/// many threads is some KiB); a bigger length means a corrupt file.
const MAX_ENTRY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a CRIU image: {0}")]
    Format(String),
    #[error("entry {index}: not a valid {message}: {source}")]
    Decode {
        index: usize,
        message: &'static str,
        source: protobuf::Error,
    },
    #[error("encoding {message}: {source}")]
    Encode {
        message: &'static str,
        source: protobuf::Error,
    },
    #[error("expected one {message} entry, found {found}")]
    EntryCount { message: &'static str, found: usize },
}

/// The magic words an image starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `inventory.img`: its type magic only.
    Single(u32),
    /// Every other protobuf image: the common (or service) magic, then the type magic.
    Double(u32, u32),
}

impl Header {
    /// The header of an ordinary image of the type `type_magic`.
    pub fn common(type_magic: u32) -> Self {
        Header::Double(magic::IMG_COMMON, type_magic)
    }

    /// The image type's magic.
    pub fn type_magic(&self) -> u32 {
        match *self {
            Header::Single(m) | Header::Double(_, m) => m,
        }
    }
}

/// An image as header + undecoded entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage {
    pub header: Header,
    pub entries: Vec<Vec<u8>>,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

impl RawImage {
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        let first =
            u32_at(bytes, 0).ok_or_else(|| ImageError::Format("shorter than its magic".into()))?;
        let (header, mut at) = if first == magic::IMG_COMMON || first == magic::IMG_SERVICE {
            let second =
                u32_at(bytes, 4).ok_or_else(|| ImageError::Format("header cut short".into()))?;
            (Header::Double(first, second), 8)
        } else if first == magic::INVENTORY {
            (Header::Single(first), 4)
        } else {
            return Err(ImageError::Format(format!("unknown magic {first:#010x}")));
        };
        let mut entries = Vec::new();
        while at < bytes.len() {
            let len = u32_at(bytes, at).ok_or_else(|| {
                ImageError::Format(format!("entry {} length cut short", entries.len()))
            })?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > MAX_ENTRY {
                return Err(ImageError::Format(format!(
                    "entry {} claims {len} bytes",
                    entries.len()
                )));
            }
            let body = bytes.get(at + 4..at + 4 + len).ok_or_else(|| {
                ImageError::Format(format!(
                    "entry {} ends past the end of the file",
                    entries.len()
                ))
            })?;
            entries.push(body.to_vec());
            at += 4 + len;
        }
        Ok(Self { header, entries })
    }

    pub fn read(path: &Path) -> Result<Self, ImageError> {
        let bytes = std::fs::read(path).map_err(|e| ImageError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(&bytes).map_err(|e| match e {
            ImageError::Format(m) => ImageError::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        let mut out = Vec::new();
        match self.header {
            Header::Single(m) => out.extend_from_slice(&m.to_le_bytes()),
            Header::Double(a, b) => {
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&b.to_le_bytes());
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            let len = u32::try_from(e.len())
                .ok()
                .filter(|l| usize::try_from(*l).is_ok_and(|l| l <= MAX_ENTRY))
                .ok_or_else(|| ImageError::Format(format!("entry {i} too large")))?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(e);
        }
        Ok(out)
    }

    /// Writes the image to a temporary file beside `path`, then renames it over `path`, so a
    /// reader never sees half an image.
    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        let bytes = self.to_bytes()?;
        let werr = |e| ImageError::Write {
            path: path.to_path_buf(),
            source: e,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&bytes).map_err(werr)?;
        f.sync_data().map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
    }

    /// Decodes entry `index` as `M`.
    pub fn decode<M: Message>(&self, index: usize) -> Result<M, ImageError> {
        let bytes = self.entries.get(index).ok_or(ImageError::EntryCount {
            message: M::NAME,
            found: self.entries.len(),
        })?;
        M::parse_from_bytes(bytes).map_err(|e| ImageError::Decode {
            index,
            message: M::NAME,
            source: e,
        })
    }
}
