//! Template-backed starts: which template a container starts from, what happened to each
//! start (restored, missed, fell back) and which builds run, as counters for the pool's
//! metrics.
//!
//! A container with `io.trenv.template` is keyed by its image (`io.trenv.image`, else the
//! rootfs layers containerd mounts) and the spec fields that shape its initialised state
//! ([`trenv_template::key`]). Create looks the template up cheaply (name, manifest, CRIU and
//! kernel); the restore itself checks the rest (seal, regions) and any failure there falls
//! back to a cold start in the same Start. A cold start with `io.trenv.ready` builds the
//! template once the instance is ready, in the background, one build per key at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::protos::api::Mount;
use trenv_template::key::KeySource;
use trenv_template::Store;

use crate::annotations::{Annotations, TemplateMode};
use crate::config::TemplatesConfig;

/// Directory (under the state root) of restores' work directories.
pub const WORK_DIR: &str = ".template-work";

/// What a container with `io.trenv.template` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Template name: the annotation's, or `auto-<key prefix>`.
    pub name: String,
    pub key: String,
    /// Why the template cannot be used for this start (None: restore from it).
    pub miss: Option<String>,
    /// Build the template once this (cold) instance is ready.
    pub build: bool,
}

impl Plan {
    pub fn restore(&self) -> bool {
        self.miss.is_none()
    }
}

/// How long a key whose build failed is not built again (a full pool would otherwise cost
/// every cold start of the function a dump).
const BUILD_BACKOFF: Duration = Duration::from_secs(60);

/// Reasons after which a rebuild would give the same unusable template.
const NO_REBUILD: [&str; 4] = ["criu-missing", "terminal", "restore-failed", "no-image"];

/// The image identity for template keys: the annotation, else containerd's rootfs layers
/// (an overlay's lower directories are the image's snapshots, shared by every container of
/// that image and different for another digest). None when neither is there.
pub fn image_identity(annotation: Option<&str>, rootfs: &[Mount]) -> Option<String> {
    if let Some(a) = annotation {
        return Some(a.to_string());
    }
    let lower: Vec<&str> = rootfs
        .iter()
        .flat_map(|m| m.options.iter())
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .collect();
    (!lower.is_empty()).then(|| format!("layers:{}", lower.join(":")))
}

#[derive(Default)]
struct Counters {
    restored: u64,
    restore_seconds: f64,
    misses: BTreeMap<String, u64>,
    fallbacks: BTreeMap<String, u64>,
    builds: u64,
    build_failures: BTreeMap<String, u64>,
    build_seconds: f64,
}

#[derive(Default)]
struct State {
    counters: Counters,
    /// Keys being built right now.
    building: HashSet<String>,
    /// Keys whose template CRIU could not restore: later starts skip it for the shim's life.
    failed: HashSet<String>,
    /// Template names by container they were restored into.
    instances: BTreeMap<String, String>,
    /// When the last build of a key failed.
    build_failed: HashMap<String, Instant>,
}

/// The shim's view of templates.
pub struct Templates {
    cfg: TemplatesConfig,
    state: Mutex<State>,
}

impl Templates {
    pub fn new(cfg: TemplatesConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> &TemplatesConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters and sets only: a panicking holder leaves nothing half-written that matters.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The plan for a new container, or None when it asks for no template. `spec` is the
    /// bundle's spec before placement rewrote it.
    pub fn plan(
        &self,
        annotations: &Annotations,
        spec: &serde_json::Value,
        rootfs: &[Mount],
        criu: &Path,
        terminal: bool,
    ) -> Option<Plan> {
        let name_of = |key: &str| match &annotations.template {
            TemplateMode::Named(n) => n.clone(),
            _ => format!("auto-{}", &key[..16.min(key.len())]),
        };
        if annotations.template == TemplateMode::Off || !self.cfg.enabled {
            return None;
        }
        let Some(image) = image_identity(annotations.image.as_deref(), rootfs) else {
            return Some(Plan {
                name: name_of(""),
                key: String::new(),
                miss: Some("no-image".into()),
                build: false,
            });
        };
        let key = KeySource::from_spec(spec, &image).key();
        let name = name_of(&key);
        let miss = self.miss(&name, &key, criu, terminal);
        let backoff = self
            .lock()
            .build_failed
            .get(&key)
            .is_some_and(|t| t.elapsed() < BUILD_BACKOFF);
        let build = !backoff
            && miss
                .as_deref()
                .is_some_and(|m| !NO_REBUILD.contains(&m) && m != "building");
        Some(Plan {
            name,
            key,
            miss,
            build,
        })
    }

    /// Why template `name` cannot serve a container keyed `key` (None: it can, as far as a
    /// cheap look tells).
    fn miss(&self, name: &str, key: &str, criu: &Path, terminal: bool) -> Option<String> {
        if terminal {
            return Some("terminal".into());
        }
        if self.lock().failed.contains(key) {
            return Some("restore-failed".into());
        }
        let criu = trenv_criu::Criu::new(criu);
        if !criu.installed() {
            return Some("criu-missing".into());
        }
        let store = match Store::open(&self.cfg.store) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("template store: {e}");
                return Some("store".into());
            }
        };
        let manifest = match store.manifest(name) {
            Ok(m) => m,
            Err(e) => {
                if self.lock().building.contains(key) {
                    return Some("building".into());
                }
                return Some(e.reason().into());
            }
        };
        if manifest.key != key {
            return Some("key-changed".into());
        }
        let kernel = trenv_template::store::kernel_release();
        let criu_now = criu
            .peek_cached_version()
            .map(|(a, b, c)| format!("{a}.{b}.{c}"));
        if manifest.kernel != kernel || criu_now.is_some_and(|v| v != manifest.criu) {
            return Some("stale".into());
        }
        None
    }

    /// Counts a start that did not use a template.
    pub fn missed(&self, reason: &str) {
        *self
            .lock()
            .counters
            .misses
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// Counts a restore that failed and fell back to a cold start; a CRIU failure keeps the
    /// key from being tried again.
    pub fn fell_back(&self, key: &str, reason: &str) {
        let mut g = self.lock();
        *g.counters.fallbacks.entry(reason.to_string()).or_default() += 1;
        if reason == "criu" {
            g.failed.insert(key.to_string());
        }
    }

    pub fn restored(&self, container: &str, template: &str, seconds: f64) {
        let mut g = self.lock();
        g.counters.restored += 1;
        g.counters.restore_seconds += seconds;
        g.instances
            .insert(container.to_string(), template.to_string());
    }

    pub fn deleted(&self, container: &str) {
        self.lock().instances.remove(container);
    }

    /// Claims the build of `key`; false when one runs already.
    pub fn begin_build(&self, key: &str) -> bool {
        self.lock().building.insert(key.to_string())
    }

    /// Ends the build of `key`: Ok(seconds) or Err(reason).
    pub fn end_build(&self, key: &str, outcome: Result<f64, &str>) {
        let mut g = self.lock();
        g.building.remove(key);
        match outcome {
            Ok(secs) => {
                g.counters.builds += 1;
                g.counters.build_seconds += secs;
                g.failed.remove(key);
                g.build_failed.remove(key);
            }
            Err(reason) => {
                g.build_failed.insert(key.to_string(), Instant::now());
                *g.counters
                    .build_failures
                    .entry(reason.to_string())
                    .or_default() += 1;
            }
        }
    }

    /// Where a restore of container `id` works (CRIU's log, staged mounts).
    pub fn work_dir(state_root: &Path, id: &str) -> PathBuf {
        state_root.join(WORK_DIR).join(id)
    }

    /// Prometheus text for the pool's metrics file.
    pub fn metrics(&self, ns: &str) -> String {
        let g = self.lock();
        let c = &g.counters;
        let mut t = String::new();
        let mut counter = |name: &str, help: &str, rows: Vec<(String, f64)>| {
            t.push_str(&format!(
                "# HELP trenv_template_{name} {help}\n# TYPE trenv_template_{name} counter\n"
            ));
            for (labels, v) in rows {
                t.push_str(&format!(
                    "trenv_template_{name}{{namespace=\"{ns}\"{labels}}} {v}\n"
                ));
            }
        };
        let by_reason = |m: &BTreeMap<String, u64>| -> Vec<(String, f64)> {
            m.iter()
                .map(|(r, v)| (format!(",reason=\"{r}\""), *v as f64))
                .collect()
        };
        counter(
            "restores_total",
            "Starts restored from a template (hits).",
            vec![(String::new(), c.restored as f64)],
        );
        counter(
            "restore_seconds_total",
            "Time spent in template restores.",
            vec![(String::new(), c.restore_seconds)],
        );
        counter(
            "misses_total",
            "Starts with io.trenv.template that did not try a template, by reason.",
            by_reason(&c.misses),
        );
        counter(
            "fallbacks_total",
            "Template restores that failed and fell back to a cold start, by reason.",
            by_reason(&c.fallbacks),
        );
        counter(
            "builds_total",
            "Templates built at readiness.",
            vec![(String::new(), c.builds as f64)],
        );
        counter(
            "build_seconds_total",
            "Time spent building templates (checkpoint and conversion).",
            vec![(String::new(), c.build_seconds)],
        );
        counter(
            "build_failures_total",
            "Template builds that failed, by reason.",
            by_reason(&c.build_failures),
        );
        t.push_str(&format!(
            "# HELP trenv_template_instances Running instances restored from templates.\n# TYPE trenv_template_instances gauge\ntrenv_template_instances{{namespace=\"{ns}\"}} {}\n",
            g.instances.len()
        ));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn overlay(lower: &str) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("lowerdir={lower}"),
                "upperdir=/x/up".into(),
            ],
            ..Default::default()
        }
    }

    fn annotations(template: &str) -> Annotations {
        let mut m = HashMap::new();
        m.insert("io.trenv.template".to_string(), template.to_string());
        Annotations::parse(&m).unwrap()
    }

    #[test]
    fn image_identity_comes_from_the_annotation_or_the_layers() {
        assert_eq!(
            image_identity(Some("sha256:1"), &[overlay("/a")]).as_deref(),
            Some("sha256:1")
        );
        assert_eq!(
            image_identity(None, &[overlay("/s/2/fs:/s/1/fs")]).as_deref(),
            Some("layers:/s/2/fs:/s/1/fs")
        );
        assert_eq!(image_identity(None, &[]), None);
    }

    #[test]
    fn plans_name_key_and_misses() {
        let store = tempfile::tempdir().unwrap();
        let t = Templates::new(TemplatesConfig {
            store: store.path().to_path_buf(),
            ..Default::default()
        });
        let spec = serde_json::json!({"process": {"args": ["python3", "app.py"]}});
        let sh = Path::new("sh");
        assert_eq!(
            t.plan(&annotations("off"), &spec, &[overlay("/a")], sh, false),
            None
        );
        let p = t
            .plan(&annotations("auto"), &spec, &[overlay("/a")], sh, false)
            .unwrap();
        assert!(p.name.starts_with("auto-") && p.name.len() == 21, "{p:?}");
        assert_eq!(p.miss.as_deref(), Some("missing"));
        assert!(p.build);
        let other = t
            .plan(&annotations("auto"), &spec, &[overlay("/b")], sh, false)
            .unwrap();
        assert_ne!(p.key, other.key);
        let named = t
            .plan(&annotations("resize"), &spec, &[overlay("/a")], sh, false)
            .unwrap();
        assert_eq!((named.name.as_str(), &named.key), ("resize", &p.key));
        let tty = t
            .plan(&annotations("auto"), &spec, &[overlay("/a")], sh, true)
            .unwrap();
        assert_eq!(tty.miss.as_deref(), Some("terminal"));
        assert!(!tty.build);
        let no_criu = t
            .plan(
                &annotations("auto"),
                &spec,
                &[overlay("/a")],
                Path::new("/nonexistent/criu"),
                false,
            )
            .unwrap();
        assert_eq!(no_criu.miss.as_deref(), Some("criu-missing"));
        let no_image = t.plan(&annotations("auto"), &spec, &[], sh, false).unwrap();
        assert_eq!(no_image.miss.as_deref(), Some("no-image"));
        // A build under way: later starts wait for it instead of building again.
        assert!(t.begin_build(&p.key));
        assert!(!t.begin_build(&p.key));
        let during = t
            .plan(&annotations("auto"), &spec, &[overlay("/a")], sh, false)
            .unwrap();
        assert_eq!(during.miss.as_deref(), Some("building"));
        assert!(!during.build);
        t.end_build(&p.key, Err("criu"));
        // A failed build is not retried at once.
        let retry = t
            .plan(&annotations("auto"), &spec, &[overlay("/a")], sh, false)
            .unwrap();
        assert_eq!(retry.miss.as_deref(), Some("missing"));
        assert!(!retry.build);
        // A template CRIU failed to restore is not tried again.
        t.fell_back(&p.key, "criu");
        let after = t
            .plan(&annotations("auto"), &spec, &[overlay("/a")], sh, false)
            .unwrap();
        assert_eq!(after.miss.as_deref(), Some("restore-failed"));
    }

    #[test]
    fn metrics_count_by_reason() {
        let t = Templates::new(TemplatesConfig::default());
        t.missed("missing");
        t.missed("missing");
        t.fell_back("k", "corrupt");
        t.restored("c1", "auto-1", 0.02);
        t.end_build("k", Ok(1.5));
        let m = t.metrics("ns");
        assert!(m.contains("trenv_template_misses_total{namespace=\"ns\",reason=\"missing\"} 2"));
        assert!(m.contains("trenv_template_fallbacks_total{namespace=\"ns\",reason=\"corrupt\"} 1"));
        assert!(m.contains("trenv_template_restores_total{namespace=\"ns\"} 1"));
        assert!(m.contains("trenv_template_builds_total{namespace=\"ns\"} 1"));
        assert!(m.contains("trenv_template_instances{namespace=\"ns\"} 1"));
        t.deleted("c1");
        assert!(t
            .metrics("ns")
            .contains("trenv_template_instances{namespace=\"ns\"} 0"));
    }
}
