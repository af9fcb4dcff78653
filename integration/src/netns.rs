//! Reaching a server inside a container's network namespace from the host.

use std::process::Command;

/// Brings up the loopback of the network namespace of `pid` (a container's own namespace
/// starts with it down).
pub fn loopback_up(pid: &str) -> bool {
    Command::new("nsenter")
        .args(["-t", pid, "-n", "ip", "link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success())
}

/// The body of a GET of `path` on port 8080 in the network namespace of `pid`; None when
/// nothing (or nothing but an empty body) answers within 5 s.
pub fn http_get(pid: &str, path: &str) -> Option<String> {
    let out = Command::new("nsenter")
        .args(["-t", pid, "-n", "curl", "-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:8080{path}"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        .filter(|s| !s.is_empty())
}
