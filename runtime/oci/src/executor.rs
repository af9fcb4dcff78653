//! How a container's process is executed: libcontainer's default executor, corrected where
//! it differs from runc.
//!
//! - libcontainer refuses any process whose environment has no `PATH`, even `/pause` or
//!   `/app/server`; runc (and the kernel) only look at `PATH` for a bare name. Images whose
//!   config sets no `PATH` (pause images, distroless and scratch images) would fail under
//!   trenv and run under runc.
//! - libcontainer's init replaces stdio descriptors that are the host's /dev/null by the
//!   container's /dev/null opened *read-only* (runc opens it read-write), so every write to
//!   such a stdout or stderr fails with EBADF (Python exits 120 on its first `print`). Just
//!   before the exec, inside the container, such descriptors are reopened read-write. The
//!   container's own /dev/null (not a host device) also keeps the process checkpointable.

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use std::collections::HashMap;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

use libcontainer::workload::{
    Executor as LibExecutor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

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

/// Reopens read-write every stdio descriptor that is /dev/null but not open for writing.
/// Runs in the container, after its root is in place.
fn writable_dev_null() -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let null = std::fs::metadata("/dev/null")?;
    if !null.file_type().is_char_device() {
        return Ok(());
    }
    for fd in 0..3 {
        let Ok(st) = nix::sys::stat::fstat(fd) else {
            continue;
        };
        let kind =
            nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT;
        let is_null = kind == nix::sys::stat::SFlag::S_IFCHR && st.st_rdev == null.rdev();
        let writable = fcntl(fd, FcntlArg::F_GETFL)
            .map(|fl| OFlag::from_bits_truncate(fl) & OFlag::O_ACCMODE == OFlag::O_RDWR)
            .unwrap_or(true);
        if is_null && !writable {
            let rw = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            nix::unistd::dup2(rw.as_raw_fd(), fd)?;
        }
    }
    Ok(())
}

impl LibExecutor for Executor {
    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        // libcontainer calls this in the container, after its /dev/null reopening and just
        // before the exec: the last point where the stdio it left can be corrected.
        writable_dev_null().map_err(|e| {
            ExecutorSetEnvsError::Other(format!("reopening /dev/null stdio read-write: {e}"))
        })?;
        self.default.setup_envs(envs)
    }

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
        let has_args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .is_some();
        match program {
            // libcontainer's own check indexes the first argument.
            None if has_args => Err(ExecutorValidationError::ArgValidationError(
                "process.args is empty: no program to run".into(),
            )),
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
    fn empty_args_are_refused_not_a_panic() {
        let err = Executor::new()
            .validate(&spec(&[], &["PATH=/bin"]))
            .expect_err("empty args");
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn a_bare_name_still_needs_path() {
        let e = Executor::new();
        let err = e.validate(&spec(&["sh"], &[])).expect_err("no PATH");
        assert!(err.to_string().contains("PATH"), "{err}");
        assert!(e.validate(&spec(&["sh"], &["PATH=/usr/bin:/bin"])).is_ok());
    }
}
