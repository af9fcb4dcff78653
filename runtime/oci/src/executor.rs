//! How a container's process is executed: libcontainer's default executor, except that a
//! process given by path does not need `PATH`.
//!
//! libcontainer refuses any process whose environment has no `PATH`, even `/pause` or
//! `/app/server`; runc (and the kernel) only look at `PATH` for a bare name. Images whose
//! config sets no `PATH` (pause images, distroless and scratch images) then fail under trenv
//! and run under runc.

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor as LibExecutor, ExecutorError, ExecutorValidationError};

/// The executor every container and exec process of trenv runs with.
#[derive(Clone)]
pub struct Executor {
    default: DefaultExecutor,
}

impl Executor {
    pub fn new() -> Self {
        Self {
            default: DefaultExecutor {},
        }
    }
}

impl Default for Executor {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("trenv_oci::executor::Executor")
    }
}

/// The file a process given by path (one containing '/') runs, checked as exec(2) would
/// find it: it exists, is a regular file and is executable by someone.
fn check_path(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(program)
        .map_err(|e| format!("executable {program:?} cannot be run: {e}"))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "executable {program:?} is not an executable file (mode {:o})",
            meta.permissions().mode() & 0o7777
        ));
    }
    Ok(())
}

impl LibExecutor for Executor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // execvp runs a name with '/' as given, without looking at PATH.
        self.default.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let program = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first());
        match program {
            Some(p) if p.contains('/') => {
                check_path(p).map_err(ExecutorValidationError::ArgValidationError)
            }
            _ => self.default.validate(spec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcontainer::oci_spec::runtime::{ProcessBuilder, SpecBuilder};

    fn spec(args: &[&str], env: &[&str]) -> Spec {
        let process = ProcessBuilder::default()
            .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .env(env.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .expect("process");
        SpecBuilder::default()
            .process(process)
            .build()
            .expect("spec")
    }

    #[test]
    fn a_path_needs_no_path_variable() {
        let e = Executor::new();
        assert!(e.validate(&spec(&["/bin/sh", "-c", "true"], &[])).is_ok());
        let err = e
            .validate(&spec(&["/no/such/program"], &[]))
            .expect_err("missing program");
        assert!(err.to_string().contains("/no/such/program"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::write(&data, "not a program").expect("write");
        let err = e
            .validate(&spec(&[data.to_str().expect("utf-8")], &[]))
            .expect_err("not executable");
        assert!(err.to_string().contains("not an executable"), "{err}");
    }

    #[test]
    fn a_bare_name_still_needs_path() {
        let e = Executor::new();
        let err = e.validate(&spec(&["sh"], &[])).expect_err("no PATH");
        assert!(err.to_string().contains("PATH"), "{err}");
        assert!(e.validate(&spec(&["sh"], &["PATH=/usr/bin:/bin"])).is_ok());
    }
}
