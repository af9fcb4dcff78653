//! Test and benchmark harness: real binaries, real containerd, real CRIU, real cgroups.
//! Everything a test creates is named with "trenv-it" so leaks are easy to find.

pub mod bundle;
pub mod containerd;
pub mod cri;
pub mod docs;
pub mod http;
pub mod isolation;
pub mod leaks;
pub mod loadgen;
pub mod netns;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Root of the source tree.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cache for images built by examples/ (shared with `make setup`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TRENV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/trenv"))
}

/// A unique, readable id for containers and cgroups of one test.
pub fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this process may run the real thing (root, CRIU present).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "integration tests need root (run `make test`)"
    );
}
