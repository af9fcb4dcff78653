//! The directory where CRIU caches what it detects about the kernel.
//!
//! Every CRIU call starts by probing the kernel's features (pagemap, uffd, netfilter modules
//! through `iptables -L`, vDSO layout, ...): about 40 ms here, more than the rest of a template
//! restore. CRIU skips the probing when it finds `criu.kdat` in its compiled-in RUNDIR, and
//! writes that file only on tmpfs, so that a reboot (a new kernel) invalidates it. `/run` is
//! not tmpfs on every host, so `make setup` builds CRIU with RUNDIR = [`DIR`], on `/dev/shm`,
//! and this module keeps that directory usable: present, root's alone (CRIU would trust a
//! cache planted by anyone who could write it), and free of the temporary file a CRIU killed
//! while saving the cache leaves behind (CRIU creates it with `O_EXCL` and would never save
//! the cache again).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// CRIU's RUNDIR as `make setup` builds it (scripts/setup.sh, `CRIU_RUNDIR`).
pub const DIR: &str = "/dev/shm/trenv-criu";

/// A `criu.kdat.tmp` older than this belongs to a CRIU that died while writing it.
const STALE_TMP: Duration = Duration::from_secs(30);

/// Makes [`DIR`] (or `dir`) a directory owned by root, mode 0700, without a stale
/// temporary file. A path that is anything else is moved out of the way first. Failures
/// only cost the cache, so callers may ignore them.
pub fn prepare(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == 0 && m.mode() & 0o7777 == 0o700 => {}
        Ok(m) => {
            tracing::warn!(
                "{} is not a root-only directory (mode {:o}, uid {}); replacing it",
                dir.display(),
                m.mode(),
                m.uid()
            );
            if m.is_dir() {
                fs::remove_dir_all(dir)?;
            } else {
                fs::remove_file(dir)?;
            }
            create(dir)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(dir)?,
        Err(e) => return Err(e),
    }
    let tmp = dir.join("criu.kdat.tmp");
    if let Ok(m) = fs::symlink_metadata(&tmp) {
        let age = m
            .modified()
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        if age > STALE_TMP {
            fs::remove_file(&tmp)?;
        }
    }
    Ok(())
}

fn create(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        // Another trenv created it meanwhile; it checks the same way.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_and_repairs_the_directory() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("kdat");
        prepare(&dir).unwrap();
        let m = fs::metadata(&dir).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o700);

        // Too open: replaced, with whatever was planted in it.
        fs::write(dir.join("criu.kdat"), b"forged").unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        assert!(!dir.join("criu.kdat").exists());

        // A file in its place.
        fs::remove_dir(&dir).unwrap();
        fs::write(&dir, b"x").unwrap();
        prepare(&dir).unwrap();
        assert!(fs::metadata(&dir).unwrap().is_dir());
    }

    #[test]
    fn a_fresh_temporary_file_stays_a_stale_one_goes() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("kdat");
        prepare(&dir).unwrap();
        let tmp = dir.join("criu.kdat.tmp");
        fs::write(&tmp, b"half").unwrap();
        prepare(&dir).unwrap();
        assert!(tmp.exists(), "a CRIU may be writing it right now");
        let old = SystemTime::now() - Duration::from_secs(120);
        fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(old)
            .unwrap();
        prepare(&dir).unwrap();
        assert!(!tmp.exists());
    }
}
