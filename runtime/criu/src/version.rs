//! CRIU's version, remembered per binary.
//!
//! Asking `criu swrk` for its version costs a CRIU start (~8 ms), and a template restore asks
//! on every call (a template made by another CRIU is refused). The answer is kept in CRIU's
//! root-only cache directory ([`crate::kdat::DIR`]), keyed by the binary's identity (device,
//! inode, size, change time), so installing another CRIU invalidates it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::driver::{Criu, CriuError};

const CACHE_FILE: &str = "version";

/// A CRIU version as (major, minor, sublevel).
pub type Version = (i32, i32, i32);

impl Criu {
    /// [`Criu::version`], answered from the cache when the binary has not changed.
    pub fn cached_version(&self) -> Result<Version, CriuError> {
        self.cached_version_in(Path::new(crate::kdat::DIR))
    }

    /// Whether the binary exists (a bare name: somewhere on `PATH`).
    pub fn installed(&self) -> bool {
        resolve(self.path()).is_some_and(|p| fs::metadata(p).is_ok_and(|m| m.is_file()))
    }

    /// The cached version, if the cache has one for this binary; never runs CRIU.
    pub fn peek_cached_version(&self) -> Option<Version> {
        let identity = resolve(self.path()).and_then(|p| identity(&p))?;
        fs::read_to_string(Path::new(crate::kdat::DIR).join(CACHE_FILE))
            .ok()
            .and_then(|text| parse(&text, &identity))
    }

    fn cached_version_in(&self, dir: &Path) -> Result<Version, CriuError> {
        let Some(identity) = resolve(self.path()).and_then(|p| identity(&p)) else {
            return self.version();
        };
        let file = dir.join(CACHE_FILE);
        if let Some(v) = fs::read_to_string(&file)
            .ok()
            .and_then(|text| parse(&text, &identity))
        {
            return Ok(v);
        }
        let v = self.version()?;
        // Written whole and renamed, so a reader never sees half of it; a failure only costs
        // the next caller another question.
        let tmp = dir.join(format!("{CACHE_FILE}.{}", std::process::id()));
        let line = format!("{identity} {}.{}.{}\n", v.0, v.1, v.2);
        if crate::kdat::prepare(dir).is_ok()
            && fs::write(&tmp, line).is_ok()
            && fs::rename(&tmp, &file).is_err()
        {
            let _ = fs::remove_file(&tmp);
        }
        Ok(v)
    }
}

/// The binary a bare name runs, as `Command` finds it on `PATH`.
fn resolve(path: &Path) -> Option<PathBuf> {
    if path.components().count() > 1 {
        return Some(path.to_path_buf());
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .map(|d| d.join(path))
        .find(|p| fs::metadata(p).map(|m| m.is_file()).unwrap_or(false))
}

fn identity(path: &Path) -> Option<String> {
    let m = fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}:{}.{}",
        path.display().to_string().replace(' ', "%20"),
        m.dev(),
        m.ino(),
        m.size(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

fn parse(text: &str, identity: &str) -> Option<Version> {
    let (id, version) = text.trim().rsplit_once(' ')?;
    if id != identity {
        return None;
    }
    let mut parts = version.split('.').map(|p| p.parse::<i32>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_version_belongs_to_one_binary() {
        assert_eq!(
            parse("/x:1:2:3:4.5 4.2.1\n", "/x:1:2:3:4.5"),
            Some((4, 2, 1))
        );
        assert_eq!(parse("/x:1:2:3:4.5 4.2.1\n", "/x:1:2:3:4.6"), None);
        assert_eq!(parse("/x:1:2:3:4.5 4.2\n", "/x:1:2:3:4.5"), None);
        assert_eq!(parse("", "/x"), None);
    }

    #[test]
    fn the_cache_answers_for_an_unchanged_binary() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        // A "criu" that cannot answer: only the cache can.
        let fake = t.path().join("criu");
        fs::write(&fake, "#!/bin/sh\nexit 1\n").unwrap();
        let criu = Criu::new(&fake);
        assert!(criu.cached_version_in(&dir).is_err());
        crate::kdat::prepare(&dir).unwrap();
        let id = identity(&fake).unwrap();
        fs::write(dir.join(CACHE_FILE), format!("{id} 9.8.7\n")).unwrap();
        assert_eq!(criu.cached_version_in(&dir).unwrap(), (9, 8, 7));
        // Replaced binary: the cache no longer applies.
        fs::remove_file(&fake).unwrap();
        fs::write(&fake, "#!/bin/sh\nexit 2\n").unwrap();
        assert!(criu.cached_version_in(&dir).is_err());
    }

    #[test]
    fn bare_names_resolve_on_path() {
        assert!(resolve(Path::new("sh")).is_some());
        assert_eq!(
            resolve(Path::new("/no/such")),
            Some(PathBuf::from("/no/such"))
        );
    }
}
