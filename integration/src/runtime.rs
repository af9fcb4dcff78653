//! Driving the `trenv` binary (and runc, for comparisons) with a private state root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::workspace;

/// The trenv binary under test: $TRENV_BIN, else the newest build in target/.
pub fn trenv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TRENV_BIN") {
        // Tests run in the crate directory; relative paths are meant from the workspace.
        return workspace().join(p);
    }
    let candidates = ["target/release/trenv", "target/debug/trenv"].map(|p| workspace().join(p));
    candidates
        .iter()
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .expect("no trenv binary: run `cargo build --release` or set TRENV_BIN")
}

/// The containerd shim under test: $TRENV_SHIM_BIN, else next to the trenv binary.
pub fn shim_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TRENV_SHIM_BIN") {
        return workspace().join(p);
    }
    trenv_bin().with_file_name("containerd-shim-trenv-v2")
}

/// A runc-compatible runtime binary with its own `--root`. Containers left behind by a failed
/// test are force-deleted on drop.
pub struct Runtime {
    pub bin: PathBuf,
    root: tempfile::TempDir,
}

impl Runtime {
    pub fn trenv() -> Self {
        Self::with_bin(trenv_bin())
    }

    pub fn runc() -> Self {
        Self::with_bin(PathBuf::from("runc"))
    }

    pub fn with_bin(bin: PathBuf) -> Self {
        let root = tempfile::Builder::new()
            .prefix("trenv-it-root-")
            .tempdir_in("/run")
            .expect("state root");
        Self { bin, root }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(self.root.path());
        c
    }

    /// Runs a command to completion with stdin closed and output captured.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {:?} {args:?}: {e}", self.bin))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must fail; returns stdout and stderr together.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "{args:?} unexpectedly succeeded: {text}"
        );
        text
    }

    /// Runs a command whose container outlives it. The container inherits the command's
    /// stdio, so it gets /dev/null: pipes we waited on would block until the container exits,
    /// and a host file (like a CI log) could not be checkpointed. trenv's own errors go to a
    /// log file that is shown on failure.
    pub fn detached(&self, args: &[&str]) {
        let log = tempfile::Builder::new()
            .prefix("trenv-it-log-")
            .tempfile()
            .expect("log file");
        let st = self
            .cmd()
            .arg("--log")
            .arg(log.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn");
        assert!(
            st.success(),
            "{args:?} failed: {st}: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
    }

    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state JSON")
    }

    pub fn status(&self, id: &str) -> String {
        self.state(id)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Ids of containers present in the state root.
    pub fn ids(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for id in self.ids() {
            let _ = self
                .cmd()
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
