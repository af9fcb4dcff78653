//! The function manifest (`examples/functions/functions.toml`): what each function is, its
//! image, its memory limit and the request whose answer is known.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Function {
    pub name: String,
    pub image: String,
    #[serde(default = "python")]
    pub runtime: String,
    pub memory_mib: u64,
    #[serde(default = "port")]
    pub port: u16,
    #[serde(default = "health")]
    pub health: String,
    pub request: String,
    /// The exact body of a correct answer to `request`.
    pub answer: String,
    #[serde(default)]
    pub description: String,
    /// The process to run instead of the image's command (e.g. a function that crashes,
    /// for fault tests).
    #[serde(default)]
    pub args: Option<Vec<String>>,
}

fn python() -> String {
    "python".into()
}
fn port() -> u16 {
    8080
}
fn health() -> String {
    "/health".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "function")]
    pub functions: Vec<Function>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading the function manifest {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("function manifest {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("function manifest {path}: {what}")]
    Invalid { path: String, what: String },
    #[error("unknown function {0:?} (not in the manifest)")]
    Unknown(String),
}

/// Memory limits a function may declare, in MiB.
const MEMORY_RANGE: std::ops::RangeInclusive<u64> = 16..=65536;

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: origin.to_string(),
            source: Box::new(e),
        })?;
        let invalid = |what: String| ManifestError::Invalid {
            path: origin.to_string(),
            what,
        };
        if m.functions.is_empty() {
            return Err(invalid("no [[function]] entries".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &m.functions {
            if f.name.is_empty()
                || !f
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(invalid(format!(
                    "function name {:?}: use letters, digits and '-'",
                    f.name
                )));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(invalid(format!("function {:?} appears twice", f.name)));
            }
            if !MEMORY_RANGE.contains(&f.memory_mib) {
                return Err(invalid(format!(
                    "function {:?}: memory_mib {} is outside {MEMORY_RANGE:?}",
                    f.name, f.memory_mib
                )));
            }
            for (what, p) in [("health", &f.health), ("request", &f.request)] {
                if !p.starts_with('/') || p.contains(char::is_whitespace) {
                    return Err(invalid(format!(
                        "function {:?}: {what} {p:?} is not a path",
                        f.name
                    )));
                }
            }
            if f.image.is_empty() || f.port == 0 {
                return Err(invalid(format!(
                    "function {:?}: image and port are required",
                    f.name
                )));
            }
        }
        Ok(m)
    }

    /// The functions named (all when `names` is empty), in the order given.
    pub fn select(&self, names: &[String]) -> Result<Vec<Function>, ManifestError> {
        if names.is_empty() {
            return Ok(self.functions.clone());
        }
        names
            .iter()
            .map(|n| {
                self.functions
                    .iter()
                    .find(|f| &f.name == n)
                    .cloned()
                    .ok_or_else(|| ManifestError::Unknown(n.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"
[[function]]
name = "hello"
image = "docker.io/trenv/fn-hello:latest"
memory_mib = 64
request = "/run"
answer = "hello, world"
"#;

    #[test]
    fn parses_with_defaults() {
        let m = Manifest::parse(ONE, "t").unwrap();
        assert_eq!(m.functions[0].port, 8080);
        assert_eq!(m.functions[0].health, "/health");
        assert_eq!(m.select(&["hello".into()]).unwrap().len(), 1);
        assert!(matches!(
            m.select(&["nope".into()]),
            Err(ManifestError::Unknown(_))
        ));
    }

    #[test]
    fn rejects_bad_entries_with_the_reason() {
        for (bad, why) in [
            (ONE.replace("64", "4"), "memory_mib"),
            (ONE.replace("\"/run\"", "\"run\""), "not a path"),
            (format!("{ONE}{ONE}"), "twice"),
            (
                ONE.replace("name = \"hello\"", "name = \"a b\""),
                "function name",
            ),
            (ONE.replace("answer", "anwser"), "unknown field"),
            (String::new(), "function"),
        ] {
            let e = Manifest::parse(&bad, "t").unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn the_shipped_manifest_is_valid() {
        let path = crate::workspace().join("examples/functions/functions.toml");
        let m = Manifest::load(&path).unwrap();
        assert!(m.functions.len() >= 8);
        let (lo, hi) = m.functions.iter().fold((u64::MAX, 0), |(lo, hi), f| {
            (lo.min(f.memory_mib), hi.max(f.memory_mib))
        });
        assert_eq!((lo, hi), (64, 1024));
    }
}
