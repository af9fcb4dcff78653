//! Reading an OCI bundle: its spec, rootfs and the mounts CRIU must treat as external.

use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {path:?} is not accessible: {source}")]
    Missing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config.json in bundle {path:?}: {reason}")]
    Spec { path: PathBuf, reason: String },
    #[error("rootfs {path:?} of the bundle does not exist")]
    Rootfs { path: PathBuf },
    #[error("config.json has no linux section")]
    NotLinux,
}

/// A bundle with its spec loaded and paths resolved.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    pub rootfs: PathBuf,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let dir = std::fs::canonicalize(dir).map_err(|source| BundleError::Missing {
            path: dir.to_path_buf(),
            source,
        })?;
        let cfg = dir.join("config.json");
        if !cfg.is_file() {
            return Err(BundleError::Spec {
                path: dir.clone(),
                reason: "config.json not found".into(),
            });
        }
        // Parsed here rather than with Spec::load so errors carry serde's line and column.
        let text = std::fs::read(&cfg).map_err(|e| BundleError::Spec {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let spec: Spec = serde_json::from_slice(&text).map_err(|e| BundleError::Spec {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        if spec.linux().is_none() {
            return Err(BundleError::NotLinux);
        }
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = if root.is_absolute() {
            root
        } else {
            dir.join(root)
        };
        let rootfs =
            std::fs::canonicalize(&rootfs).map_err(|_| BundleError::Rootfs { path: rootfs })?;
        Ok(Self { dir, spec, rootfs })
    }

    /// The cgroup path libcontainer derives for this spec, so restore and create agree.
    pub fn cgroup_path(&self, id: &str) -> PathBuf {
        let configured = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone());
        libcontainer::utils::get_cgroup_path(&configured, id)
    }

    /// The path of a namespace the spec joins (rather than creates), if any.
    pub fn namespace_path(&self, kind: LinuxNamespaceType) -> Option<PathBuf> {
        self.spec
            .linux()
            .as_ref()?
            .namespaces()
            .as_ref()?
            .iter()
            .find(|n| n.typ() == kind)
            .and_then(|n| n.path().clone())
    }

    /// Whether the spec asks for a namespace of this kind at all (new or joined).
    pub fn has_namespace(&self, kind: LinuxNamespaceType) -> bool {
        self.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == kind))
    }

    /// Mounts whose content lives outside the container and must be declared external to CRIU,
    /// as (destination, source) pairs: bind mounts and masked files (bound from /dev/null).
    pub fn external_mounts(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for m in self.spec.mounts().as_deref().unwrap_or_default() {
            if is_bind(m) {
                let dest = m.destination().to_string_lossy().into_owned();
                let src = m
                    .source()
                    .as_ref()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push((dest, src));
            }
        }
        if let Some(masked) = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.masked_paths().clone())
        {
            for p in masked {
                // Masked files are /dev/null bind mounts; masked directories are read-only
                // tmpfs mounts that CRIU dumps by itself.
                let inside = self.rootfs.join(p.trim_start_matches('/'));
                if inside.exists() && !inside.is_dir() {
                    out.push((p, "/dev/null".to_string()));
                }
            }
        }
        out
    }

    /// Whether the spec mounts a cgroup filesystem, itself or as a pooled sandbox's
    /// prebuilt view (cgroup v1 controllers then show up as separate mounts that CRIU must
    /// take from the host).
    pub fn mounts_cgroupfs(&self) -> bool {
        self.spec
            .mounts()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|m| {
                m.typ().as_deref() == Some("cgroup")
                    || m.destination() == std::path::Path::new("/sys/fs/cgroup")
            })
    }
}

impl Bundle {
    /// Creates missing mount destinations in the rootfs, as container creation would have.
    /// A checkpoint restored onto a fresh snapshot of the image (`ctr container restore`)
    /// lacks the directories the original container's runtime created, and CRIU fails on
    /// a missing mount point. Destinations are resolved inside the rootfs (symlinks
    /// cannot lead out of it).
    pub fn create_mountpoints(&self) -> std::io::Result<()> {
        for m in self.spec.mounts().as_deref().unwrap_or_default() {
            let dest = safe_path::scoped_join(&self.rootfs, m.destination())?;
            if dest.symlink_metadata().is_ok() {
                continue;
            }
            let source_is_file = is_bind(m)
                && m.source()
                    .as_ref()
                    .and_then(|s| std::fs::metadata(s).ok())
                    .is_some_and(|md| !md.is_dir());
            if source_is_file {
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&dest)?;
            } else {
                std::fs::create_dir_all(&dest)?;
            }
        }
        Ok(())
    }
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|o| o == "bind" || o == "rbind")
}

/// Host cgroup v1 controller mount points (empty on a pure cgroup v2 host).
pub fn cgroup_v1_mounts() -> Vec<String> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mp = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" && mp.starts_with("/sys/fs/cgroup/")).then(|| mp.to_string())
        })
        .collect()
}
