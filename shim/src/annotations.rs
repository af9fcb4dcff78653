//! trenv's OCI annotations (`io.trenv.*`) on a container spec, validated at Create.
//!
//! Unknown keys under `io.trenv.` are rejected rather than ignored, so a misspelt option
//! fails loudly instead of silently doing nothing. Documented in docs/configuration.md.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "io.trenv.";
const TCP_ESTABLISHED: &str = "io.trenv.criu.tcp-established";
const EXT_UNIX_SK: &str = "io.trenv.criu.ext-unix-sk";
const FILE_LOCKS: &str = "io.trenv.criu.file-locks";
const MANAGE_CGROUPS_MODE: &str = "io.trenv.criu.manage-cgroups-mode";
const POOL: &str = "io.trenv.pool";
const FUNCTION: &str = "io.trenv.function";
const READY: &str = "io.trenv.ready";
const TEMPLATE: &str = "io.trenv.template";
const IMAGE: &str = "io.trenv.image";
/// CRI's mark of a pod's sandbox ("sandbox") and of its containers ("container").
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const KNOWN: [&str; 9] = [
    TCP_ESTABLISHED,
    EXT_UNIX_SK,
    FILE_LOCKS,
    MANAGE_CGROUPS_MODE,
    POOL,
    FUNCTION,
    READY,
    TEMPLATE,
    IMAGE,
];

#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    #[error("reading {path}: {reason}")]
    Spec { path: String, reason: String },
    #[error("unknown annotation {key:?}; trenv knows {}", KNOWN.join(", "))]
    Unknown { key: String },
    #[error("annotation {key}={value:?}: {expected}")]
    Value {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// CRIU options a container asks for; applied to its checkpoints and restores, so that a
/// container checkpointed with open TCP connections is also restored with them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CriuAnnotations {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub manage_cgroups_mode: Option<String>,
}

fn boolean(key: &str, value: &str) -> Result<bool, AnnotationError> {
    match value {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(AnnotationError::Value {
            key: key.to_string(),
            value: value.to_string(),
            expected: "expected true or false",
        }),
    }
}

/// `io.trenv.template`: whether and under which name the container starts from a memory
/// template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TemplateMode {
    /// No template (the default).
    #[default]
    Off,
    /// A template named after the container's key (`auto-<key prefix>`).
    Auto,
    /// The template of that name, shared by every container naming it.
    Named(String),
}

fn template_mode(key: &str, value: &str) -> Result<TemplateMode, AnnotationError> {
    match value {
        "off" => Ok(TemplateMode::Off),
        "auto" => Ok(TemplateMode::Auto),
        // `auto-*` names are the automatic ones'; a container choosing one would share a
        // template with an unrelated key.
        n if trenv_template::valid_name(n) && !n.starts_with("auto-") => {
            Ok(TemplateMode::Named(n.to_string()))
        }
        _ => Err(AnnotationError::Value {
            key: key.to_string(),
            value: value.to_string(),
            expected: "expected auto, off or a template name (letters, digits, '.', '_', '-'; \
                       not starting with '.' or 'auto-')",
        }),
    }
}

/// All `io.trenv.*` annotations of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotations {
    pub criu: CriuAnnotations,
    /// `io.trenv.pool`: place the container in a pooled sandbox (default on).
    pub pool: bool,
    /// `io.trenv.function`: the function the container runs, for the pool's reuse policy.
    pub function: Option<String>,
    /// `io.trenv.ready`: Start returns once the container is initialised.
    pub ready: Option<crate::readiness::Ready>,
    /// `io.trenv.template`: start from a memory template, building it at readiness.
    pub template: TemplateMode,
    /// `io.trenv.image`: the image's identity (e.g. its digest) for template keys; without
    /// it the shim uses the rootfs layers containerd mounts.
    pub image: Option<String>,
}

impl Annotations {
    pub fn parse(annotations: &HashMap<String, String>) -> Result<Self, AnnotationError> {
        let mut a = Self {
            criu: CriuAnnotations::default(),
            pool: true,
            function: None,
            ready: None,
            template: TemplateMode::Off,
            image: None,
        };
        let c = &mut a.criu;
        for (key, value) in annotations {
            if !key.starts_with(PREFIX) {
                continue;
            }
            match key.as_str() {
                TCP_ESTABLISHED => c.tcp_established = boolean(key, value)?,
                EXT_UNIX_SK => c.ext_unix_sk = boolean(key, value)?,
                FILE_LOCKS => c.file_locks = boolean(key, value)?,
                POOL => {
                    a.pool = match value.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => {
                            return Err(AnnotationError::Value {
                                key: key.clone(),
                                value: value.clone(),
                                expected: "expected on or off",
                            })
                        }
                    }
                }
                FUNCTION => {
                    if value.is_empty() || value.len() > 256 || value.chars().any(char::is_control)
                    {
                        return Err(AnnotationError::Value {
                            key: key.clone(),
                            value: value.clone(),
                            expected: "expected 1-256 printable characters",
                        });
                    }
                    a.function = Some(value.clone());
                }
                READY => {
                    a.ready = Some(value.parse().map_err(|expected| AnnotationError::Value {
                        key: key.clone(),
                        value: value.clone(),
                        expected,
                    })?);
                }
                TEMPLATE => a.template = template_mode(key, value)?,
                IMAGE => {
                    if value.is_empty() || value.len() > 512 || value.chars().any(char::is_control)
                    {
                        return Err(AnnotationError::Value {
                            key: key.clone(),
                            value: value.clone(),
                            expected: "expected 1-512 printable characters",
                        });
                    }
                    a.image = Some(value.clone());
                }
                MANAGE_CGROUPS_MODE => {
                    if !["soft", "full", "strict", "ignore"].contains(&value.as_str()) {
                        return Err(AnnotationError::Value {
                            key: key.clone(),
                            value: value.clone(),
                            expected: "expected soft, full, strict or ignore",
                        });
                    }
                    c.manage_cgroups_mode = Some(value.clone());
                }
                _ => return Err(AnnotationError::Unknown { key: key.clone() }),
            }
        }
        // CRI hands a pod's annotations to its sandbox (the pause container) as well as to
        // its containers. Templates and readiness are the function's: a pause container
        // waiting for a function's port would hold RunPodSandbox for `ready_secs`.
        if annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) == Some("sandbox") {
            a.template = TemplateMode::Off;
            a.ready = None;
        }
        Ok(a)
    }

    /// Reads and validates the annotations of the bundle's config.json.
    pub fn from_bundle(bundle: &Path) -> Result<Self, AnnotationError> {
        #[derive(Deserialize)]
        struct Annotated {
            #[serde(default)]
            annotations: Option<HashMap<String, String>>,
        }
        let path = bundle.join("config.json");
        let spec_err = |reason: String| AnnotationError::Spec {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read(&path).map_err(|e| spec_err(e.to_string()))?;
        let spec: Annotated =
            serde_json::from_slice(&text).map_err(|e| spec_err(format!("annotations: {e}")))?;
        Self::parse(&spec.annotations.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_pod_sandbox_takes_no_template_and_waits_for_nothing() {
        let pod = [
            ("io.trenv.template", "auto"),
            ("io.trenv.ready", "tcp:8080"),
        ];
        let mut sandbox = pod.to_vec();
        sandbox.push(("io.kubernetes.cri.container-type", "sandbox"));
        let a = Annotations::parse(&map(&sandbox)).unwrap();
        assert_eq!(a.template, TemplateMode::Off);
        assert!(a.ready.is_none());
        let mut container = pod.to_vec();
        container.push(("io.kubernetes.cri.container-type", "container"));
        let a = Annotations::parse(&map(&container)).unwrap();
        assert_ne!(a.template, TemplateMode::Off);
        assert!(a.ready.is_some());
        // Malformed values are refused for the sandbox too: the pod's spec is wrong.
        let mut bad = sandbox.clone();
        bad[1] = ("io.trenv.ready", "soon");
        assert!(Annotations::parse(&map(&bad)).is_err());
    }

    #[test]
    fn parses_known_and_ignores_foreign_keys() {
        let a = Annotations::parse(&map(&[
            (TCP_ESTABLISHED, "true"),
            (MANAGE_CGROUPS_MODE, "soft"),
            ("org.example.x", "whatever"),
        ]))
        .unwrap();
        assert!(a.criu.tcp_established && !a.criu.file_locks);
        assert_eq!(a.criu.manage_cgroups_mode.as_deref(), Some("soft"));
        assert!(a.pool && a.function.is_none());
        let p = Annotations::parse(&map(&[(POOL, "off"), (FUNCTION, "resize")])).unwrap();
        assert!(!p.pool);
        assert_eq!(p.function.as_deref(), Some("resize"));
    }

    #[test]
    fn rejects_bad_values_and_unknown_keys() {
        let e = Annotations::parse(&map(&[(FILE_LOCKS, "maybe")])).unwrap_err();
        assert!(e.to_string().contains("expected true or false"), "{e}");
        let e = Annotations::parse(&map(&[(MANAGE_CGROUPS_MODE, "hard")])).unwrap_err();
        assert!(e.to_string().contains("soft, full"), "{e}");
        let e = Annotations::parse(&map(&[("io.trenv.criu.tcp", "true")])).unwrap_err();
        assert!(e.to_string().contains("unknown annotation"), "{e}");
        let e = Annotations::parse(&map(&[(POOL, "true")])).unwrap_err();
        assert!(e.to_string().contains("expected on or off"), "{e}");
        let e = Annotations::parse(&map(&[(FUNCTION, "")])).unwrap_err();
        assert!(e.to_string().contains("printable"), "{e}");
        for bad in ["auto-1234", ".hidden", "a/b", ""] {
            let e = Annotations::parse(&map(&[(TEMPLATE, bad)])).unwrap_err();
            assert!(e.to_string().contains("template name"), "{bad}: {e}");
        }
    }

    #[test]
    fn template_modes() {
        let t = |v: &str| Annotations::parse(&map(&[(TEMPLATE, v)])).unwrap().template;
        assert_eq!(t("auto"), TemplateMode::Auto);
        assert_eq!(t("off"), TemplateMode::Off);
        assert_eq!(t("resize-v2"), TemplateMode::Named("resize-v2".into()));
        let a = Annotations::parse(&map(&[(IMAGE, "sha256:ab")])).unwrap();
        assert_eq!(a.template, TemplateMode::Off);
        assert_eq!(a.image.as_deref(), Some("sha256:ab"));
    }
}
