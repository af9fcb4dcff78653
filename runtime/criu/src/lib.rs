//! CRIU for trenv: the RPC driver over `criu swrk`, and checkpoint/restore of containers
//! with runc's semantics and image layout.

pub mod checkpoint;
pub mod driver;
pub mod image;
pub mod kdat;
pub mod restore;
pub mod version;

pub use driver::{rpc, Criu, CriuError};
