//! The shim's configuration: a TOML file plus the runtime options containerd sends with a task.
//!
//! Sources, later ones winning field by field:
//! 1. built-in defaults;
//! 2. the shim config file, `/etc/trenv/shim.toml` (or `$TRENV_SHIM_CONFIG`) when it exists;
//! 3. the task's runtime options: either CRI's `runtimeoptions.v1.Options` whose
//!    `ConfigPath` names a config file that replaces the one of step 2 (what CRI sends for a
//!    runtime with `options.ConfigPath`, and `ctr run --runtime-config-path`), or runc's
//!    `containerd.runc.v1.Options`, whose fields that trenv understands are applied.
//!
//! The resolved configuration is stored in the bundle (`trenv-shim.json`), so that
//! `delete` of a dead shim finds the task's state root.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::rt::WireType;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};
use serde::{Deserialize, Serialize};

/// Default location of the shim config file.
pub const DEFAULT_CONFIG: &str = "/etc/trenv/shim.toml";
/// Environment variable that overrides [`DEFAULT_CONFIG`].
pub const CONFIG_ENV: &str = "TRENV_SHIM_CONFIG";
/// Where the resolved configuration of a task is kept, relative to its bundle.
const BUNDLE_FILE: &str = "trenv-shim.json";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading shim config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid shim config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid runtime options ({type_url}): {message}")]
    Options { type_url: String, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every option of the shim. Documented in docs/configuration.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// Root of libcontainer state; a task lives in `<root>/<namespace>/<id>`.
    pub root: PathBuf,
    /// CRIU binary used for checkpoint and restore (looked up in PATH when relative).
    pub criu_path: PathBuf,
    /// Use systemd to manage container cgroups (cgroupsPath as `slice:prefix:name`).
    pub systemd_cgroup: bool,
    /// Use MS_MOVE + chroot instead of pivot_root (for rootfs on ramfs).
    pub no_pivot_root: bool,
    /// Owner of the stdio pipes given to container processes.
    pub io_uid: u32,
    pub io_gid: u32,
    /// Cgroup (path relative to each hierarchy's root) the shim moves itself into.
    pub shim_cgroup: Option<String>,
    /// Default image directory for `ctr task checkpoint` without `--image-path`.
    pub criu_image_path: Option<PathBuf>,
    /// Default CRIU work directory (logs) for checkpoint and restore.
    pub criu_work_path: Option<PathBuf>,
    /// The sandbox pool; read from the shim config file when the shim starts.
    pub pool: PoolConfig,
    /// Deadlines of operations; read from the shim config file when the shim starts.
    pub timeouts: Timeouts,
    /// Memory templates (`io.trenv.template`); read from the shim config file when the
    /// shim starts.
    pub templates: TemplatesConfig,
}

/// `[templates]`: where template-backed starts find and build templates. Documented in
/// docs/configuration.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplatesConfig {
    /// Honour `io.trenv.template`; when off, such containers start cold and build nothing.
    pub enabled: bool,
    /// Template store directory (the one `trenv template ls --store` shows).
    pub store: PathBuf,
    /// Memory pool new templates put their memory in: tmpfs, hugetlbfs or daxfs.
    pub pool_kind: String,
    pub pool_dir: PathBuf,
    pub pool_name: String,
    /// Pool capacity; a build that does not fit fails (`pool-full`) and later instances
    /// start cold.
    pub pool_capacity_mib: u64,
    /// Spare instances kept per template in use: restored ahead of demand into pooled
    /// sandboxes and frozen, so that a start only hands one over. 0 = restore at Start.
    pub spares: usize,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store: PathBuf::from("/var/lib/trenv/templates"),
            pool_kind: "tmpfs".into(),
            pool_dir: PathBuf::from("/run/trenv/mempool/default"),
            pool_name: "default".into(),
            pool_capacity_mib: 4096,
            spares: 0,
        }
    }
}

/// `[timeouts]`: how long an operation may take before its worker is killed and the
/// request fails with DEADLINE_EXCEEDED. Documented in docs/configuration.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Create, start, exec, kill, pause, resume, delete.
    pub operation_secs: u64,
    /// Checkpoint and restore (CRIU), which grow with the container's memory.
    pub criu_secs: u64,
    /// The pool's sandbox operations: create (holder, cgroup, CNI), purge, destroy.
    pub sandbox_secs: u64,
    /// How long Start waits for a container with `io.trenv.ready` to be initialised.
    pub ready_secs: u64,
    /// A template-backed start's restore; past it the start falls back to a cold one.
    pub template_restore_secs: u64,
    /// Building a template in the background (checkpoint and conversion).
    pub template_build_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            operation_secs: 60,
            criu_secs: 600,
            sandbox_secs: 120,
            ready_secs: 60,
            template_restore_secs: 30,
            template_build_secs: 600,
        }
    }
}

impl Timeouts {
    /// The deadline of one zygote request.
    pub fn for_request(&self, req: &crate::zygote::Request) -> std::time::Duration {
        let secs = match req.name() {
            "checkpoint" | "restore" => self.criu_secs,
            "template restore" => self.template_restore_secs,
            "template dump" | "build template" => self.template_build_secs,
            "create sandbox" | "purge sandbox" | "destroy sandbox" => self.sandbox_secs,
            _ => self.operation_secs,
        };
        std::time::Duration::from_secs(secs.max(1))
    }
}

/// The containerd namespace of Kubernetes' pods (containerd's CRI plugin).
pub const CRI_NAMESPACE: &str = "k8s.io";

/// `[pool]`: repurposable sandboxes. Documented in docs/configuration.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Place containers in pooled sandboxes (containers can opt out with `io.trenv.pool=off`).
    pub enabled: bool,
    /// containerd namespaces that get no pool: CRI's, by default. Kubernetes pods get their
    /// network namespace from CRI, so no pod would ever use a sandbox there; idle ones
    /// would only hold memory and addresses.
    pub skip_namespaces: Vec<String>,
    /// Idle sandboxes kept ready; refilled in the background.
    pub min_idle: usize,
    /// Idle sandboxes kept at most; a released sandbox beyond it is destroyed.
    pub max_idle: usize,
    /// Sandboxes (idle and in use) at most; beyond it containers get no sandbox.
    pub max_sandboxes: usize,
    /// Node memory bound in MiB: declared memory limits of containers in sandboxes plus
    /// `idle_cost_mib` per idle sandbox. Idle sandboxes are evicted (least recently used
    /// first) and not refilled while it is exceeded. 0 = no bound.
    pub memory_limit_mib: u64,
    pub idle_cost_mib: u64,
    /// CNI conflist for the sandboxes' eth0; without one, a bridge `trenv0` on `subnet`.
    pub cni_config: Option<PathBuf>,
    pub cni_bin_dir: PathBuf,
    pub subnet: String,
    /// Parent cgroup of sandbox cgroups; the containerd namespace and sandbox id are appended.
    pub cgroup_parent: String,
    /// Pool state: records, published addresses, metrics, control socket.
    pub state_dir: PathBuf,
    /// On cgroup v1 hosts, build each sandbox's `/sys/fs/cgroup` once and bind it into its
    /// instances (one mount per start instead of one per hierarchy).
    pub cgroup_view: bool,
    /// Host tuning, off by default: remount cgroup2 with `favordynmods` when the pool
    /// starts, so that moving a process into a cgroup does not wait for an RCU grace
    /// period. Affects every cgroup user on the host.
    pub cgroup_favor_dynmods: bool,
    /// Nice value (0-19) of the pool's background work: purging released sandboxes,
    /// refilling, destroying. Container starts keep the shim's priority. 0 = no change.
    pub background_nice: i32,
    /// How long one CNI plugin call may run before it is killed and the sandbox creation
    /// fails (undone).
    pub cni_timeout_secs: u64,
    /// A pool shim whose containerd has been unreachable this long while it had no task
    /// drains its pool and exits. 0 = never.
    pub orphan_grace_secs: u64,
}

impl PoolConfig {
    /// Whether containerd namespace `namespace` has a pool.
    pub fn serves(&self, namespace: &str) -> bool {
        self.enabled && !self.skip_namespaces.iter().any(|n| n == namespace)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            skip_namespaces: vec![CRI_NAMESPACE.to_string()],
            min_idle: 2,
            max_idle: 16,
            max_sandboxes: 256,
            memory_limit_mib: 0,
            idle_cost_mib: 1,
            cni_config: None,
            cni_bin_dir: PathBuf::from(trenv_sandbox::cni::DEFAULT_BIN_DIR),
            subnet: trenv_sandbox::cni::DEFAULT_SUBNET.to_string(),
            cgroup_parent: "/trenv".to_string(),
            state_dir: PathBuf::from(trenv_sandbox::DEFAULT_POOL_ROOT),
            cgroup_view: true,
            cgroup_favor_dynmods: false,
            background_nice: 10,
            cni_timeout_secs: 30,
            orphan_grace_secs: 300,
        }
    }
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/run/containerd/trenv"),
            criu_path: PathBuf::from("criu"),
            systemd_cgroup: false,
            no_pivot_root: false,
            io_uid: 0,
            io_gid: 0,
            shim_cgroup: None,
            criu_image_path: None,
            criu_work_path: None,
            pool: PoolConfig::default(),
            timeouts: Timeouts::default(),
            templates: TemplatesConfig::default(),
        }
    }
}

impl ShimConfig {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The defaults, overridden by the config file if there is one.
    pub fn from_default_file() -> Result<Self, ConfigError> {
        let path = std::env::var_os(CONFIG_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        match Self::from_file(&path) {
            Err(ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Self::default())
            }
            r => r,
        }
    }

    /// The configuration of one task, given the runtime options of its Create request.
    pub fn for_task(options: Option<&Any>) -> Result<Self, ConfigError> {
        let Some(any) = options.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Self::from_default_file();
        };
        let bad = |message: String| ConfigError::Options {
            type_url: any.type_url.clone(),
            message,
        };
        if any.type_url.ends_with("runtimeoptions.v1.Options") {
            let config_path = runtimeoptions_config_path(&any.value).map_err(bad)?;
            return match config_path {
                Some(p) => Self::from_file(Path::new(&p)),
                None => Self::from_default_file(),
            };
        }
        if any.type_url.ends_with("containerd.runc.v1.Options") {
            let o = containerd_shim::protos::shim::oci::Options::parse_from_bytes(&any.value)
                .map_err(|e| bad(e.to_string()))?;
            let mut c = Self::from_default_file()?;
            c.apply_runc_options(&o);
            return Ok(c);
        }
        Err(bad(
            "unsupported type; use cri.runtimeoptions.v1.Options (ConfigPath) or \
             containerd.runc.v1.Options"
                .to_string(),
        ))
    }

    fn apply_runc_options(&mut self, o: &containerd_shim::protos::shim::oci::Options) {
        if !o.root.is_empty() {
            self.root = PathBuf::from(&o.root);
        }
        self.systemd_cgroup |= o.systemd_cgroup;
        self.no_pivot_root |= o.no_pivot_root;
        if o.io_uid != 0 {
            self.io_uid = o.io_uid;
        }
        if o.io_gid != 0 {
            self.io_gid = o.io_gid;
        }
        if !o.shim_cgroup.is_empty() {
            self.shim_cgroup = Some(o.shim_cgroup.clone());
        }
        if !o.criu_image_path.is_empty() {
            self.criu_image_path = Some(PathBuf::from(&o.criu_image_path));
        }
        if !o.criu_work_path.is_empty() {
            self.criu_work_path = Some(PathBuf::from(&o.criu_work_path));
        }
    }

    /// The state root of a containerd namespace.
    pub fn state_root(&self, namespace: &str) -> PathBuf {
        self.root.join(namespace)
    }

    pub fn save(&self, bundle: &Path) -> Result<(), ConfigError> {
        let path = bundle.join(BUNDLE_FILE);
        let write = |e: std::io::Error| ConfigError::Write {
            path: path.clone(),
            source: e,
        };
        let json = serde_json::to_vec(self).map_err(|e| write(e.into()))?;
        std::fs::write(&path, json).map_err(write)
    }

    /// The configuration a task was created with, or the defaults.
    pub fn load_saved(bundle: &Path) -> Self {
        std::fs::read(bundle.join(BUNDLE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// Decodes CRI's `runtimeoptions.v1.Options { string type_url = 1; string config_path = 2; }`,
/// which no crate ships bindings for.
fn runtimeoptions_config_path(bytes: &[u8]) -> Result<Option<String>, String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut config_path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| e.to_string())? {
        match tag {
            // field 1 (type_url) or 2 (config_path), wire type 2 (length-delimited)
            10 => {
                input.read_string().map_err(|e| e.to_string())?;
            }
            18 => config_path = Some(input.read_string().map_err(|e| e.to_string())?),
            t => {
                let wire = WireType::new(t & 7)
                    .ok_or_else(|| format!("field {}: bad wire type {}", t >> 3, t & 7))?;
                input
                    .skip_field(wire)
                    .map_err(|e| format!("field {}: {e}", t >> 3))?
            }
        }
    }
    Ok(config_path.filter(|p| !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_namespace_has_no_pool_unless_configured() {
        let cfg = PoolConfig::default();
        assert!(cfg.serves("default"));
        assert!(!cfg.serves(CRI_NAMESPACE));
        let all = PoolConfig {
            skip_namespaces: Vec::new(),
            ..PoolConfig::default()
        };
        assert!(all.serves(CRI_NAMESPACE));
        let off = PoolConfig {
            enabled: false,
            ..PoolConfig::default()
        };
        assert!(!off.serves("default"));
    }

    #[test]
    fn runtimeoptions_decoding() {
        // type_url = "x", config_path = "/etc/a.toml"
        let mut bytes = vec![10, 1, b'x', 18, 11];
        bytes.extend_from_slice(b"/etc/a.toml");
        assert_eq!(
            runtimeoptions_config_path(&bytes).unwrap().as_deref(),
            Some("/etc/a.toml")
        );
        assert_eq!(runtimeoptions_config_path(&[]).unwrap(), None);
        assert!(runtimeoptions_config_path(&[18, 20, b'a']).is_err());
    }

    #[test]
    fn file_rejects_unknown_keys_and_keeps_defaults() {
        let dir = tempfile_dir();
        let path = dir.join("shim.toml");
        std::fs::write(&path, "criu_path = \"/opt/criu\"\n").unwrap();
        let c = ShimConfig::from_file(&path).unwrap();
        assert_eq!(c.criu_path, PathBuf::from("/opt/criu"));
        assert_eq!(c.root, ShimConfig::default().root);
        std::fs::write(&path, "criu_paht = \"/opt/criu\"\n").unwrap();
        let e = ShimConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("unknown field") && e.contains("criu_paht"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn runc_options_override() {
        let mut o = containerd_shim::protos::shim::oci::Options::new();
        o.root = "/run/x".into();
        o.io_uid = 1000;
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: o.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let c = ShimConfig::for_task(Some(&any)).unwrap();
        assert_eq!(c.root, PathBuf::from("/run/x"));
        assert_eq!(c.io_uid, 1000);
        let bad = Any {
            type_url: "example.com/Other".into(),
            value: vec![1],
            ..Default::default()
        };
        assert!(ShimConfig::for_task(Some(&bad))
            .unwrap_err()
            .to_string()
            .contains("unsupported type"));
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("trenv-shim-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
