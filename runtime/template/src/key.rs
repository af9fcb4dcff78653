//! Template keys: the identity of an initialised function instance. Two containers with the
//! same key would reach the same state after start-up, so one template serves both.

use sha2::{Digest, Sha256};

/// What goes into a key. Anything that changes the process state after start-up belongs
/// here: the image (by digest when the caller knows it), the process (args, env, cwd,
/// user), and the spec fields that shape it (rlimits, hostname, memory limit).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeySource {
    pub image: String,
    pub args: Vec<String>,
    /// Sorted, so the order of the spec's env does not matter.
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub extra: Vec<String>,
}

impl KeySource {
    /// From an OCI spec (a bundle's config.json) and the image identity.
    pub fn from_spec(spec: &serde_json::Value, image: &str) -> Self {
        let p = &spec["process"];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        // A container that joins an existing UTS namespace (a Kubernetes pod's) has the
        // pod's hostname, which CRI also puts in HOSTNAME: every replica of a function has
        // another, and none of them shapes the function's state. Left out, replicas share
        // one template (a restored process keeps the template's HOSTNAME in its
        // environment; its hostname is its pod's).
        let joins_uts = spec["linux"]["namespaces"].as_array().is_some_and(|ns| {
            ns.iter().any(|n| {
                n["type"].as_str() == Some("uts")
                    && n["path"].as_str().is_some_and(|p| !p.is_empty())
            })
        });
        let mut env = strings(&p["env"]);
        if joins_uts {
            env.retain(|e| !e.starts_with("HOSTNAME="));
        }
        env.sort();
        let mut extra = vec![
            format!("rlimits={}", p["rlimits"]),
            format!("memory={}", spec["linux"]["resources"]["memory"]["limit"]),
        ];
        if !joins_uts {
            extra.push(format!("hostname={}", spec["hostname"]));
        }
        extra.sort();
        Self {
            image: image.to_string(),
            args: strings(&p["args"]),
            env,
            cwd: p["cwd"].as_str().unwrap_or("/").to_string(),
            user: format!("{}:{}", p["user"]["uid"], p["user"]["gid"]),
            extra,
        }
    }

    /// The key: a hex SHA-256 over a versioned canonical encoding.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"trenv-template-key-v1\0");
        h.update(serde_json::to_vec(self).unwrap_or_default());
        hex::encode(h.finalize())
    }
}

/// The key of an image set itself, when nothing else is known (`--from-checkpoint` without
/// a bundle): a digest over its files' names and contents.
pub fn of_images(digests: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    h.update(b"trenv-template-images-v1\0");
    for (name, d) in digests {
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(d.as_bytes());
        h.update(b"\0");
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_replicas_share_a_key_whatever_their_hostnames() {
        let pod = |name: &str| {
            serde_json::json!({
                "hostname": name,
                "process": {"args": ["python3"], "env": ["A=1", format!("HOSTNAME={name}")]},
                "linux": {"namespaces": [{"type": "uts", "path": "/proc/7/ns/uts"}]}
            })
        };
        let key = |s: &serde_json::Value| KeySource::from_spec(s, "img").key();
        assert_eq!(key(&pod("fn-a")), key(&pod("fn-b")));
        // Containers with a UTS namespace of their own keep the hostname in the key.
        let own = |name: &str| {
            serde_json::json!({
                "hostname": name,
                "process": {"args": ["python3"], "env": [format!("HOSTNAME={name}")]},
                "linux": {"namespaces": [{"type": "uts"}]}
            })
        };
        assert_ne!(key(&own("fn-a")), key(&own("fn-b")));
    }

    #[test]
    fn env_order_does_not_matter_and_args_do() {
        let a = serde_json::json!({"process": {"args": ["python3", "app.py"], "env": ["A=1", "B=2"], "cwd": "/"}});
        let b = serde_json::json!({"process": {"args": ["python3", "app.py"], "env": ["B=2", "A=1"], "cwd": "/"}});
        let c = serde_json::json!({"process": {"args": ["python3", "other.py"], "env": ["A=1", "B=2"], "cwd": "/"}});
        let k = |s: &serde_json::Value, img: &str| KeySource::from_spec(s, img).key();
        assert_eq!(k(&a, "img@sha256:1"), k(&b, "img@sha256:1"));
        assert_ne!(k(&a, "img@sha256:1"), k(&c, "img@sha256:1"));
        assert_ne!(k(&a, "img@sha256:1"), k(&a, "img@sha256:2"));
        assert_eq!(k(&a, "x").len(), 64);
    }
}
