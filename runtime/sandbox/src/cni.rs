//! Sandbox networking through real CNI plugins (bridge, host-local, loopback, ...).
//!
//! A network is a CNI conflist (`plugins` run in order on ADD, in reverse on DEL, each
//! given the previous result) for the sandbox's `eth0`, plus the `loopback` plugin for `lo`.
//! Without a config file trenv uses a bridge `trenv0` with host-local IPAM on a configurable
//! subnet; the bridge is the gateway, so sandbox addresses are reachable from the host.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const DEFAULT_BIN_DIR: &str = "/usr/lib/cni";
pub const DEFAULT_SUBNET: &str = "10.77.0.0/16";
pub const DEFAULT_BRIDGE: &str = "trenv0";
const IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("reading CNI config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("running CNI plugin {plugin}: {source}")]
    Exec {
        plugin: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} {command} failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI result of {plugin} has no IP address")]
    NoAddress { plugin: String },
    #[error("CNI plugin {plugin} {command} did not finish within {}s and was killed", .after.as_secs())]
    Timeout {
        plugin: String,
        command: &'static str,
        after: Duration,
    },
}

/// How long one plugin call may take unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

/// A CNI network: the conflist for eth0 and where the plugin binaries are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Network {
    pub name: String,
    version: String,
    plugins: Vec<Value>,
    bin_dir: PathBuf,
    source: PathBuf,
    /// Deadline of one plugin call; a plugin still running then is killed.
    #[serde(default = "default_timeout")]
    timeout: Duration,
}

/// What ADD produced: the address (CIDR form and bare IP) and the raw result, which DEL
/// is given back as `prevResult`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub ip: String,
    pub cidr: String,
    pub result: Value,
}

impl Network {
    /// The built-in network: bridge `trenv0` as gateway, host-local IPAM on `subnet`.
    pub fn builtin(subnet: &str, bin_dir: &Path) -> Self {
        Self {
            name: "trenv".to_string(),
            version: "1.0.0".to_string(),
            plugins: vec![json!({
                "type": "bridge",
                "bridge": DEFAULT_BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            })],
            bin_dir: bin_dir.to_path_buf(),
            source: PathBuf::from("<built-in>"),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Loads a `.conflist` (or a single-plugin `.conf`) file.
    pub fn load(path: &Path, bin_dir: &Path) -> Result<Self, CniError> {
        let text = std::fs::read_to_string(path).map_err(|source| CniError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| CniError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let name = v["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("missing \"name\"".into()))?
            .to_string();
        let version = v["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        let plugins = match v.get("plugins") {
            Some(Value::Array(p)) if !p.is_empty() => p.clone(),
            Some(_) => return Err(bad("\"plugins\" must be a non-empty list".into())),
            None => vec![v.clone()],
        };
        for p in &plugins {
            let t = p["type"]
                .as_str()
                .ok_or_else(|| bad("a plugin has no \"type\"".into()))?;
            if t.contains('/') || !bin_dir.join(t).is_file() {
                return Err(bad(format!(
                    "plugin {t:?} not found in {}",
                    bin_dir.display()
                )));
            }
        }
        Ok(Self {
            name,
            version,
            plugins,
            bin_dir: bin_dir.to_path_buf(),
            source: path.to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets the deadline of each plugin call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Attaches the network namespace at `netns`: eth0 through the conflist, lo up.
    /// On failure whatever was set up is torn down again: DEL for every plugin that ran,
    /// the one that failed included (it may have allocated before failing, as the CNI
    /// specification expects runtimes to assume).
    pub fn add(&self, id: &str, netns: &Path) -> Result<Attachment, CniError> {
        self.loopback("ADD", id, netns)?;
        let mut prev: Option<Value> = None;
        for (i, p) in self.plugins.iter().enumerate() {
            match self.exec(p, "ADD", id, netns, IFNAME, prev.as_ref()) {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    for q in self.plugins[..=i].iter().rev() {
                        if let Err(d) = self.exec(q, "DEL", id, netns, IFNAME, prev.as_ref()) {
                            tracing::warn!("undoing a failed CNI ADD: {d}");
                        }
                    }
                    let _ = self.loopback("DEL", id, netns);
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        let cidr = result["ips"]
            .as_array()
            .and_then(|ips| ips.iter().find_map(|ip| ip["address"].as_str()))
            .ok_or_else(|| CniError::NoAddress {
                plugin: self.name.clone(),
            })?
            .to_string();
        let ip = cidr.split('/').next().unwrap_or(&cidr).to_string();
        flush_neighbour(&ip);
        Ok(Attachment { ip, cidr, result })
    }

    /// Detaches: every plugin's DEL in reverse order (all are tried; the first error is
    /// returned). Works when the namespace is already gone, so addresses are released.
    pub fn del(&self, id: &str, netns: &Path, prev: Option<&Attachment>) -> Result<(), CniError> {
        let prev = prev.map(|a| &a.result);
        let mut first = None;
        for p in self.plugins.iter().rev() {
            if let Err(e) = self.exec(p, "DEL", id, netns, IFNAME, prev) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn loopback(&self, command: &'static str, id: &str, netns: &Path) -> Result<(), CniError> {
        let conf = json!({ "type": "loopback" });
        self.exec(&conf, command, id, netns, "lo", None).map(|_| ())
    }

    fn exec(
        &self,
        plugin: &Value,
        command: &'static str,
        id: &str,
        netns: &Path,
        ifname: &str,
        prev: Option<&Value>,
    ) -> Result<Value, CniError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let mut conf = plugin.clone();
        conf["name"] = json!(self.name);
        conf["cniVersion"] = json!(self.version);
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let bin = self.bin_dir.join(&kind);
        let exec_err = |source| CniError::Exec {
            plugin: bin.clone(),
            source,
        };
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.bin_dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(exec_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(conf.to_string().as_bytes())
                .map_err(exec_err)?;
        }
        let out = wait_output(child, self.timeout).map_err(|e| match e {
            Waited::Io(source) => exec_err(source),
            Waited::TimedOut => CniError::Timeout {
                plugin: kind.clone(),
                command,
                after: self.timeout,
            },
        })?;
        let parsed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            let message = parsed["msg"]
                .as_str()
                .map(|m| match parsed["details"].as_str() {
                    Some(d) if !d.is_empty() => format!("{m}: {d}"),
                    _ => m.to_string(),
                })
                .unwrap_or_else(|| {
                    format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                });
            return Err(CniError::Plugin {
                plugin: kind,
                command,
                message,
            });
        }
        Ok(parsed)
    }
}

enum Waited {
    Io(std::io::Error),
    TimedOut,
}

/// Like `Child::wait_with_output`, but kills the child (and reaps it) once `timeout` has
/// passed. Output is read on its own threads so a chatty plugin cannot block on a full pipe.
fn wait_output(mut child: Child, timeout: Duration) -> Result<Output, Waited> {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(Waited::Io)? {
            Some(s) => break s,
            None if Instant::now() >= end => {
                // The plugin leads its own process group: whatever it started goes too.
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(-pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(Waited::TimedOut);
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Forgets the host's neighbour entry for `ip`: an address handed out again belongs to a new
/// interface, and a stale entry (the old MAC) would swallow the first packets to it until the
/// kernel re-probed (seconds). Best effort.
fn flush_neighbour(ip: &str) {
    let out = std::process::Command::new("ip")
        .args(["-4", "neigh", "flush", "to", ip])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if let Err(e) = out {
        tracing::debug!("flushing the neighbour entry of {ip}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_rejects_bad_configs() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("bridge"), "").unwrap();
        let write = |text: &str| {
            let p = dir.path().join("net.conflist");
            std::fs::write(&p, text).unwrap();
            p
        };
        let err = |text: &str| Network::load(&write(text), &bin).unwrap_err().to_string();
        assert!(err("{").contains("net.conflist"));
        assert!(err(r#"{"plugins":[{"type":"bridge"}]}"#).contains("missing \"name\""));
        assert!(err(r#"{"name":"n","plugins":[]}"#).contains("non-empty"));
        assert!(err(r#"{"name":"n","plugins":[{"type":"nope"}]}"#).contains("\"nope\" not found"));
        assert!(err(r#"{"name":"n","plugins":[{"type":"../x"}]}"#).contains("not found"));
        let ok = Network::load(
            &write(r#"{"name":"n","plugins":[{"type":"bridge"}]}"#),
            &bin,
        );
        assert_eq!(ok.unwrap().name, "n");
        let single = Network::load(&write(r#"{"name":"s","type":"bridge"}"#), &bin).unwrap();
        assert_eq!(single.plugins.len(), 1);
    }
}
