//! OCI bundles and the parts of the container life cycle where trenv corrects libcontainer:
//! what the `trenv` CLI, the CRIU code and the shim share.

pub mod bundle;
pub mod executor;
pub mod fdpass;
pub mod lifecycle;
