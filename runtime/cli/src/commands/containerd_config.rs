//! `trenv install-containerd-config`: trenv as a runtime handler of containerd's CRI plugin.
//!
//! The config is edited, not regenerated: comments, order and every other setting stay as
//! they are, and a runtime of the same name that is not trenv is reported, not replaced.

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use toml_edit::{value, Array, DocumentMut, Item, Table};

use crate::cli::InstallContainerdConfig;

/// The shim containerd starts for the handler.
pub const RUNTIME_TYPE: &str = "io.containerd.trenv.v2";
/// containerd's default runtime for CRI, and its shim.
const DEFAULT_RUNTIME: &str = "runc";
const RUNC_TYPE: &str = "io.containerd.runc.v2";
/// Annotations CRI passes from pods and containers to the shim (templates, readiness).
const ANNOTATIONS: &str = "io.trenv.*";

/// What adding the handler did.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The new config text, and the tables it added or completed.
    Added(String, Vec<String>),
    /// The handler is there already with trenv's runtime type.
    Present(String),
}

/// The CRI plugin's name in a config of `version` (containerd 1.x: 1 and 2; 2.x: 3).
fn cri_plugin(version: i64) -> Result<&'static str> {
    Ok(match version {
        1 => "cri",
        2 => "io.containerd.grpc.v1.cri",
        3 => "io.containerd.cri.v1.runtime",
        v => bail!("containerd config version {v} is not one trenv knows (1, 2 or 3)"),
    })
}

/// The sub-table `key` of `t`, made (implicit, so no empty header is written) if missing.
fn subtable<'a>(t: &'a mut Table, key: &str, path: &str) -> Result<&'a mut Table> {
    let item = t.entry(key).or_insert_with(|| {
        let mut new = Table::new();
        new.set_implicit(true);
        Item::Table(new)
    });
    item.as_table_mut().with_context(|| {
        format!(
            "{path}.{key} is not a [table] (an inline table or a value); add the runtime by hand"
        )
    })
}

fn add_handler(text: &str, name: &str) -> Result<Outcome> {
    // A RuntimeClass's handler must be a DNS label.
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label {
        bail!(
            "runtime handler name {name:?}: a RuntimeClass handler is a DNS label \
             (lowercase letters, digits and '-', at most 63)"
        );
    }
    let fresh = text.trim().is_empty();
    let mut doc: DocumentMut = if fresh {
        let mut d = DocumentMut::new();
        d["version"] = value(2);
        d
    } else {
        text.parse()
            .context("containerd's config is not valid TOML")?
    };
    // containerd reads a config without `version` as version 1.
    let version = match doc.get("version") {
        None => 1,
        Some(v) => v
            .as_integer()
            .context("containerd config: `version` is not an integer")?,
    };
    let plugin = cri_plugin(version)?;
    let header = format!("plugins.\"{plugin}\".containerd.runtimes.{name}");
    let plugins = subtable(doc.as_table_mut(), "plugins", "")?;
    let cri = subtable(plugins, plugin, "plugins")?;
    let containerd = subtable(cri, "containerd", plugin)?;
    let runtimes = subtable(containerd, "runtimes", "containerd")?;
    let added = match runtimes.get_mut(name) {
        Some(existing) => {
            let kind = existing
                .get("runtime_type")
                .and_then(Item::as_str)
                .map(str::to_string);
            match (kind.as_deref(), existing.as_table_mut()) {
                // Only sub-tables such as `.options` were written: complete the runtime.
                (None, Some(t)) => {
                    t.set_implicit(false);
                    add_entry(t);
                    true
                }
                (Some(RUNTIME_TYPE), _) => false,
                (other, _) => bail!(
                    "[{header}] exists with runtime_type {}, not {RUNTIME_TYPE:?}: \
                     not replacing it; pick another --name or edit it by hand",
                    other.map_or_else(|| "unset".to_string(), |k| format!("{k:?}"))
                ),
            }
        }
        None => {
            let mut entry = Table::new();
            add_entry(&mut entry);
            runtimes.insert(name, Item::Table(entry));
            true
        }
    };
    let kept = keep_default_runtime(containerd);
    let mut tables = Vec::new();
    if added {
        tables.push(header.clone());
    }
    if kept {
        tables.push(format!(
            "plugins.\"{plugin}\".containerd.runtimes.{DEFAULT_RUNTIME}"
        ));
    }
    Ok(if !tables.is_empty() {
        Outcome::Added(doc.to_string(), tables)
    } else {
        Outcome::Present(header)
    })
}

/// containerd's built-in `runc` runtime exists only while the config has no `runtimes`
/// table: with one, CRI refuses to start unless the default runtime is in it ("no
/// corresponding runtime configured ... default_runtime_name"). So when the default is
/// `runc` and the table lacks it, it is added as containerd would have it. Whether it was.
fn keep_default_runtime(containerd: &mut Table) -> bool {
    let default = containerd
        .get("default_runtime_name")
        .and_then(Item::as_str)
        .unwrap_or(DEFAULT_RUNTIME)
        .to_string();
    let Some(runtimes) = containerd.get_mut("runtimes").and_then(Item::as_table_mut) else {
        return false;
    };
    if default != DEFAULT_RUNTIME || runtimes.contains_key(DEFAULT_RUNTIME) {
        return false;
    }
    let mut runc = Table::new();
    runc["runtime_type"] = value(RUNC_TYPE);
    runtimes.insert(DEFAULT_RUNTIME, Item::Table(runc));
    true
}

/// The runtime's keys: the shim, and the annotations CRI is to pass on to it.
fn add_entry(t: &mut Table) {
    t["runtime_type"] = value(RUNTIME_TYPE);
    let annotations: Array = [ANNOTATIONS].into_iter().collect();
    t["pod_annotations"] = value(annotations.clone());
    t["container_annotations"] = value(annotations);
}

/// Whether the config turns the CRI plugin off (then the handler has nothing to serve).
fn cri_disabled(text: &str) -> bool {
    let Ok(doc) = text.parse::<DocumentMut>() else {
        return false;
    };
    doc.get("disabled_plugins")
        .and_then(Item::as_array)
        .is_some_and(|a| {
            a.iter().filter_map(|v| v.as_str()).any(|p| {
                matches!(
                    p,
                    "cri" | "io.containerd.grpc.v1.cri" | "io.containerd.cri.v1.runtime"
                )
            })
        })
}

/// Replaces `path` by `text` in one step: a reader sees the old file or the new one. A
/// symbolic link is followed, so the file it names is replaced, not the link.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = resolved.as_path();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.trenv-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("config"),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself lasts only once the directory is on disk.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

pub fn install(a: &InstallContainerdConfig) -> Result<()> {
    let text = match std::fs::read_to_string(&a.config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", a.config.display())),
    };
    let outcome =
        add_handler(&text, &a.name).with_context(|| format!("in {}", a.config.display()))?;
    if cri_disabled(&text) {
        eprintln!(
            "note: {} disables the CRI plugin (disabled_plugins); the handler is unused until it is enabled",
            a.config.display()
        );
    }
    if !trenv_oci::lifecycle::can_lower_oom_score_adj() && !text.contains("restrict_oom_score_adj")
    {
        eprintln!(
            "note: root has no CAP_SYS_RESOURCE here, so no runtime (runc or trenv) can give a pod \
             sandbox CRI's oom_score_adj of -998; set restrict_oom_score_adj = true in the CRI \
             plugin's table"
        );
    }
    match outcome {
        Outcome::Present(header) => {
            println!(
                "[{header}] is already in {}; nothing changed",
                a.config.display()
            );
        }
        Outcome::Added(new, tables) if a.dry_run => {
            eprintln!(
                "would add [{}] to {}:",
                tables.join("], ["),
                a.config.display()
            );
            print!("{new}");
        }
        Outcome::Added(new, tables) => {
            write_atomically(&a.config, &new)?;
            println!(
                "added [{}] to {}; restart containerd to use it (RuntimeClass handler {:?})",
                tables.join("], ["),
                a.config.display(),
                a.name
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn added(text: &str) -> String {
        match add_handler(text, "trenv").expect("add") {
            Outcome::Added(t, _) => t,
            Outcome::Present(h) => panic!("already present: {h}"),
        }
    }

    #[test]
    fn an_empty_config_becomes_version_2_with_the_handler() {
        let t = added("");
        let doc: DocumentMut = t.parse().expect("valid");
        assert_eq!(doc["version"].as_integer(), Some(2));
        let rt = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["trenv"];
        assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert!(
            t.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.trenv]"),
            "{t}"
        );
        assert!(t.contains("pod_annotations = [\"io.trenv.*\"]"), "{t}");
    }

    #[test]
    fn everything_else_is_kept_and_a_second_run_changes_nothing() {
        let before = "# my containerd\nversion = 2\nroot = \"/var/lib/containerd\"\n\n\
            [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\" # pinned\n\n\
            [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n";
        let after = added(before);
        assert!(after.starts_with(before), "existing text changed:\n{after}");
        assert!(matches!(
            add_handler(&after, "trenv").expect("again"),
            Outcome::Present(_)
        ));
    }

    #[test]
    fn the_default_runc_runtime_is_kept_when_the_table_is_new() {
        let t = added("version = 2\n");
        let doc: DocumentMut = t.parse().expect("valid");
        let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(runtimes["runc"]["runtime_type"].as_str(), Some(RUNC_TYPE));
        // Another default, or a runc the config has, is left alone.
        let other = added(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             default_runtime_name = \"crun\"\n",
        );
        assert!(!other.contains("runtimes.runc"), "{other}");
        // A config that has the handler but lost runc gets runc back.
        let broken =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.trenv]\n\
                      runtime_type = \"io.containerd.trenv.v2\"\n";
        match add_handler(broken, "trenv").expect("add") {
            Outcome::Added(t, tables) => {
                assert!(t.contains("runtimes.runc]"), "{t}");
                assert_eq!(tables.len(), 1, "{tables:?}");
            }
            Outcome::Present(_) => panic!("runc not added"),
        }
    }

    #[test]
    fn the_plugin_name_follows_the_config_version() {
        let v1 = added("root = \"/x\"\n");
        assert!(
            v1.contains("[plugins.cri.containerd.runtimes.trenv]"),
            "{v1}"
        );
        let v3 = added("version = 3\n");
        assert!(
            v3.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.trenv]"),
            "{v3}"
        );
        let err = add_handler("version = 9\n", "trenv").expect_err("v9");
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    #[test]
    fn a_different_runtime_of_that_name_and_bad_input_are_refused() {
        let other =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.trenv]\n\
                     runtime_type = \"io.containerd.runc.v2\"\n";
        let err = add_handler(other, "trenv").expect_err("clobber");
        assert!(err.to_string().contains("not replacing"), "{err}");
        assert!(add_handler("version = [", "trenv").is_err());
        assert!(add_handler("version = 2\nplugins = 3\n", "trenv").is_err());
        assert!(add_handler("", "bad name").is_err());
        assert!(add_handler("", "Trenv").is_err());
    }

    #[test]
    fn a_runtime_with_only_options_is_completed() {
        let t = added(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.trenv.options]\n\
             ConfigPath = \"/etc/trenv/shim.toml\"\n",
        );
        let doc: DocumentMut = t.parse().expect("valid");
        let rt = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["trenv"];
        assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME_TYPE), "{t}");
        assert_eq!(
            rt["options"]["ConfigPath"].as_str(),
            Some("/etc/trenv/shim.toml")
        );
    }

    #[test]
    fn a_symlinked_config_stays_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "version = 2\n").expect("write");
        let link = dir.path().join("config.toml");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        install(&InstallContainerdConfig {
            config: link.clone(),
            name: "trenv".into(),
            dry_run: false,
        })
        .expect("install");
        assert!(std::fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink());
        assert!(std::fs::read_to_string(&real)
            .expect("read")
            .contains("runtimes.trenv]"));
    }

    #[test]
    fn a_disabled_cri_plugin_is_noticed() {
        assert!(cri_disabled(
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        ));
        assert!(!cri_disabled("disabled_plugins = []\n"));
    }

    #[test]
    fn the_file_is_written_whole_and_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "version = 2\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let a = InstallContainerdConfig {
            config: path.clone(),
            name: "trenv".into(),
            dry_run: false,
        };
        install(&a).expect("install");
        install(&a).expect("idempotent");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.matches("runtimes.trenv]").count(), 1, "{text}");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "temporary file left behind");
    }
}
