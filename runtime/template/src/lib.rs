//! Memory templates: a function's initialised process state, checkpointed once, with its
//! private memory in a memory pool, restored many times with copy-on-write sharing.
//!
//! - [`convert`]: a CRIU image set -> a template image set + pool regions.
//! - [`store`]: templates on disk, content-addressed by key, named, verified and sealed.
//! - [`netns`]: the network namespace made the restore's to give (joined or fresh).
//! - [`restore`]: what a restore from a template adds to a CRIU restore.
//! - [`tmpfs`]: the container's tmpfs mounts, staged by trenv instead of CRIU's `tar`.
//! - [`key`]: what identifies a template (image, args, env, spec fields that shape the
//!   process state).
//!
//! Every failure has a short reason code ([`TemplateError::reason`]) that callers such as
//! the shim use to fall back to a cold start and to count why.

pub mod convert;
pub mod key;
pub mod netns;
pub mod restore;
pub mod store;
pub mod tmpfs;

use std::path::{Path, PathBuf};

pub use store::{Manifest, Prepared, Store};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no template {0:?}")]
    Missing(String),
    #[error("template {name:?} is corrupt: {detail}")]
    Corrupt { name: String, detail: String },
    #[error("template {name:?} was built with {built}, this host has {now}: rebuild it")]
    Stale {
        name: String,
        built: String,
        now: String,
    },
    #[error("template {name:?} is in use by processes {pids:?}")]
    InUse { name: String, pids: Vec<i32> },
    #[error("cannot make a template of this process: {0}")]
    Unsupported(String),
    #[error("invalid template name {0:?} (letters, digits, '.', '_', '-'; not starting with '.')")]
    InvalidName(String),
    #[error(transparent)]
    Pool(#[from] trenv_mempool::PoolError),
    #[error(transparent)]
    Image(#[from] trenv_criu::image::ImageError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TemplateError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A short, stable reason code (`io.trenv` level): what a caller falling back to a cold
    /// start reports and counts.
    pub fn reason(&self) -> &'static str {
        match self {
            TemplateError::Missing(_) => "missing",
            TemplateError::Corrupt { .. } => "corrupt",
            TemplateError::Stale { .. } => "stale",
            TemplateError::InUse { .. } => "in-use",
            TemplateError::Unsupported(_) => "unsupported",
            TemplateError::InvalidName(_) => "invalid-name",
            TemplateError::Pool(trenv_mempool::PoolError::Full { .. }) => "pool-full",
            TemplateError::Pool(trenv_mempool::PoolError::NoRegion { .. }) => "pool-missing",
            TemplateError::Pool(_) => "pool",
            TemplateError::Image(_) => "corrupt",
            TemplateError::Io { .. } => "io",
        }
    }
}

/// Template names follow the pool's region names.
pub use trenv_mempool::valid_name;
