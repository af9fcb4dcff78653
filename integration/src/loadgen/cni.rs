//! Networking for the runc baseline: a named network namespace per instance with `lo` and an
//! `eth0` on a bridge, attached by the standard CNI plugins, as a platform's CNI integration
//! does for runc. (trenv instances get theirs from the sandbox pool instead.)

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

pub const BIN_DIR: &str = "/usr/lib/cni";

pub struct Cni {
    pub bridge: String,
    pub subnet: String,
}

impl Cni {
    fn plugin(
        &self,
        command: &str,
        plugin: &str,
        conf: serde_json::Value,
        id: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<serde_json::Value> {
        let mut conf = conf;
        conf["name"] = "trenv-bench".into();
        conf["cniVersion"] = "1.0.0".into();
        let mut child = Command::new(format!("{BIN_DIR}/{plugin}"))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", BIN_DIR)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running CNI plugin {plugin}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "CNI {plugin} {command}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if out.stdout.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn bridge_conf(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "bridge", "bridge": self.bridge, "isGateway": true, "ipMasq": false,
            "hairpinMode": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}
        })
    }

    /// A new network namespace `name` with lo and eth0; returns (its path, eth0's address).
    pub fn attach(&self, name: &str, id: &str) -> Result<(String, String)> {
        let st = Command::new("ip").args(["netns", "add", name]).status()?;
        if !st.success() {
            bail!("ip netns add {name} failed");
        }
        let path = format!("/var/run/netns/{name}");
        let r = (|| {
            self.plugin(
                "ADD",
                "loopback",
                serde_json::json!({"type": "loopback"}),
                id,
                &path,
                "lo",
            )?;
            let res = self.plugin("ADD", "bridge", self.bridge_conf(), id, &path, "eth0")?;
            res["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .map(str::to_string)
                .ok_or_else(|| anyhow!("CNI bridge gave no address: {res}"))
        })();
        match r {
            Ok(ip) => Ok((path, ip)),
            Err(e) => {
                self.detach(name, id);
                Err(e)
            }
        }
    }

    pub fn detach(&self, name: &str, id: &str) {
        let path = format!("/var/run/netns/{name}");
        let _ = self.plugin("DEL", "bridge", self.bridge_conf(), id, &path, "eth0");
        let _ = self.plugin(
            "DEL",
            "loopback",
            serde_json::json!({"type": "loopback"}),
            id,
            &path,
            "lo",
        );
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }

    /// Removes the bridge (and host-local's leases) once no namespace uses it: another run
    /// on the host may still have instances on it.
    pub fn cleanup(&self) {
        let in_use = std::fs::read_dir("/var/run/netns")
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("trenv-bench-"))
            })
            .unwrap_or(false);
        if in_use {
            return;
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all("/var/lib/cni/networks/trenv-bench");
    }
}
