//! Whether a container goes into a pooled sandbox, and the spec changes that put it there.
//!
//! A container is placed in a sandbox when its spec asks for new network, IPC, UTS and PID
//! namespaces (what `ctr run`, nerdctl and CRI without host namespaces produce). The spec
//! is rewritten to join the sandbox's network, IPC and UTS namespaces and to use its
//! cgroup; the mount and PID namespaces stay new, so every instance gets a fresh rootfs
//! mount tree and is PID 1 of its own PID namespace. Anything else — explicit namespace
//! paths, host namespaces, a user namespace, systemd cgroups, restores — bypasses the pool.

use serde_json::Value;

use trenv_sandbox::cgroup_view;
use trenv_sandbox::holder::SANDBOX_NAMESPACES;
use trenv_sandbox::Sandbox;

/// Capabilities that let a container change network-namespace state the purge does not
/// reset (addresses, routes, firewall rules); such a sandbox is destroyed after use.
const TAINTING_CAPS: [&str; 1] = ["CAP_NET_ADMIN"];

#[derive(Debug, PartialEq)]
pub enum Plan {
    Pool {
        /// Declared memory limit in bytes (0 = none).
        memory: u64,
        tainted: bool,
    },
    Bypass(String),
}

fn oci_type(kind: &str) -> &str {
    match kind {
        "net" => "network",
        other => other,
    }
}

pub fn plan(spec: &Value) -> Plan {
    let namespaces = spec["linux"]["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let find = |t: &str| namespaces.iter().find(|n| n["type"].as_str() == Some(t));
    for n in &namespaces {
        if n["path"].as_str().is_some_and(|p| !p.is_empty()) {
            return Plan::Bypass(format!(
                "the spec joins an existing {} namespace",
                n["type"].as_str().unwrap_or("?")
            ));
        }
    }
    if find("user").is_some() {
        return Plan::Bypass("the spec has a user namespace".into());
    }
    for kind in SANDBOX_NAMESPACES
        .iter()
        .map(|k| oci_type(k))
        .chain(["pid"])
    {
        if find(kind).is_none() {
            return Plan::Bypass(format!("the spec shares the host's {kind} namespace"));
        }
    }
    let memory = spec["linux"]["resources"]["memory"]["limit"]
        .as_i64()
        .and_then(|l| u64::try_from(l).ok())
        .unwrap_or(0);
    let caps = &spec["process"]["capabilities"];
    let privileged = ["bounding", "effective", "permitted", "ambient"]
        .iter()
        .filter_map(|set| caps[*set].as_array())
        .flatten()
        .any(|c| c.as_str().is_some_and(|c| TAINTING_CAPS.contains(&c)));
    let net_sysctls = spec["linux"]["sysctl"]
        .as_object()
        .is_some_and(|s| s.keys().any(|k| k.starts_with("net.")));
    Plan::Pool {
        memory,
        tainted: privileged || net_sysctls,
    }
}

/// The function a container runs, for the pool's reuse policy: `io.trenv.function`, else
/// the image CRI names, else the command line.
pub fn function_key(spec: &Value, annotated: Option<&str>) -> String {
    if let Some(f) = annotated {
        return f.to_string();
    }
    if let Some(image) = spec["annotations"]["io.kubernetes.cri.image-name"].as_str() {
        return image.to_string();
    }
    spec["process"]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Points the spec at the sandbox's namespaces and cgroup.
pub fn apply(spec: &mut Value, sb: &Sandbox) {
    if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
        for n in list.iter_mut() {
            let t = n["type"].as_str().unwrap_or_default().to_string();
            if let Some(kind) = SANDBOX_NAMESPACES.iter().find(|k| oci_type(k) == t) {
                n["path"] = Value::String(sb.holder.ns_path(kind));
            }
        }
    }
    spec["linux"]["cgroupsPath"] = Value::String(sb.cgroup.clone());
    if let Some(view) = sb
        .cgroup_view
        .as_deref()
        .filter(|v| cgroup_view::is_built(v))
    {
        use_cgroup_view(spec, &view.to_string_lossy());
    }
}

/// Replaces a read-only cgroup mount at `/sys/fs/cgroup` by a recursive bind of the
/// sandbox's prebuilt view (one mount instead of one per hierarchy). A writable cgroup
/// mount stays as it is: the view is read-only.
fn use_cgroup_view(spec: &mut Value, view: &str) {
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return;
    };
    for m in mounts.iter_mut() {
        let opts: Vec<&str> = m["options"]
            .as_array()
            .map(|o| o.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if m["type"].as_str() != Some("cgroup")
            || m["destination"].as_str() != Some(cgroup_view::CGROUP_ROOT)
            || !opts.contains(&"ro")
        {
            continue;
        }
        *m = serde_json::json!({
            "destination": cgroup_view::CGROUP_ROOT,
            "type": "bind",
            "source": view,
            "options": ["rbind", "ro", "nosuid", "noexec", "nodev"],
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(namespaces: Value) -> Value {
        json!({
            "process": {"args": ["python3", "app.py"], "capabilities": {"bounding": ["CAP_KILL"]}},
            "linux": {"namespaces": namespaces, "resources": {"memory": {"limit": 1048576}}}
        })
    }

    fn all() -> Value {
        json!([{"type":"pid"},{"type":"network"},{"type":"ipc"},{"type":"uts"},{"type":"mount"}])
    }

    #[test]
    fn plans() {
        assert_eq!(
            plan(&spec(all())),
            Plan::Pool {
                memory: 1 << 20,
                tainted: false
            }
        );
        let host_net = json!([{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"}]);
        assert!(matches!(plan(&spec(host_net)), Plan::Bypass(r) if r.contains("network")));
        let joined = json!([{"type":"pid"},{"type":"network","path":"/proc/1/ns/net"},{"type":"ipc"},{"type":"uts"}]);
        assert!(matches!(plan(&spec(joined)), Plan::Bypass(r) if r.contains("existing network")));
        let user = json!([{"type":"pid"},{"type":"network"},{"type":"ipc"},{"type":"uts"},{"type":"user"}]);
        assert!(matches!(plan(&spec(user)), Plan::Bypass(_)));
        let mut admin = spec(all());
        admin["process"]["capabilities"]["effective"] = json!(["CAP_NET_ADMIN"]);
        assert!(matches!(plan(&admin), Plan::Pool { tainted: true, .. }));
        let mut sysctl = spec(all());
        sysctl["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
        assert!(matches!(plan(&sysctl), Plan::Pool { tainted: true, .. }));
    }

    #[test]
    fn cgroup_mount_becomes_a_view_bind() {
        let cg = |opts: Value| {
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup",
                                      "source": "cgroup", "options": opts})
        };
        let mut s = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            cg(json!(["nosuid", "noexec", "nodev", "relatime", "ro"])),
        ]});
        use_cgroup_view(&mut s, "/run/trenv/pool/k8s/cgroup-views/sb-1");
        assert_eq!(s["mounts"][0]["type"], "proc");
        assert_eq!(s["mounts"][1]["type"], "bind");
        assert_eq!(
            s["mounts"][1]["source"],
            "/run/trenv/pool/k8s/cgroup-views/sb-1"
        );
        assert!(s["mounts"][1]["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro")));
        // a writable cgroup mount is left to the runtime
        let mut rw = json!({"mounts": [cg(json!(["nosuid", "rw"]))]});
        use_cgroup_view(&mut rw, "/v");
        assert_eq!(rw["mounts"][0]["type"], "cgroup");
    }

    #[test]
    fn function_keys() {
        let mut s = spec(all());
        assert_eq!(function_key(&s, Some("f")), "f");
        assert_eq!(function_key(&s, None), "python3 app.py");
        s["annotations"] = json!({"io.kubernetes.cri.image-name": "img:1"});
        assert_eq!(function_key(&s, None), "img:1");
    }
}
