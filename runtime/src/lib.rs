//! trenv runtime library: a runc-compatible OCI runtime on libcontainer, with CRIU
//! checkpoint/restore driven over CRIU's RPC protocol.

pub mod bundle;
pub mod checkpoint;
pub mod criu;
pub mod fdpass;
pub mod lifecycle;
pub mod logging;
pub mod restore;
pub mod sandbox;
pub mod stats;
