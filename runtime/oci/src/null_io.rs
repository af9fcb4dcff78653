//! Output streams that go nowhere, and stay writable inside the container.
//!
//! libcontainer's init, once in the container's mount namespace, replaces every stdio
//! descriptor that is the host's /dev/null by the container's /dev/null opened read-only
//! (runc reopens it read-write). A process whose stdout or stderr is /dev/null then gets
//! EBADF on every write: Python, for one, fails its first `print` and exits 120. A process
//! without an output stream therefore gets /dev/zero opened write-only instead: its writes
//! are discarded exactly as /dev/null's are (the kernel's /dev/zero uses /dev/null's write),
//! and it is not the device libcontainer looks for.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

/// A write-only descriptor that discards what is written to it.
pub fn discarding_output() -> std::io::Result<OwnedFd> {
    Ok(OpenOptions::new().write(true).open("/dev/zero")?.into())
}

/// Whether `fd` is the host's /dev/null.
fn is_dev_null(fd: impl AsFd) -> bool {
    let Ok(null) = std::fs::metadata("/dev/null") else {
        return false;
    };
    let Ok(dup) = fd.as_fd().try_clone_to_owned() else {
        return false;
    };
    File::from(dup)
        .metadata()
        .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == null.rdev())
}

/// Replaces this process's stdout and stderr by [`discarding_output`] where they are
/// /dev/null, so that a container created from this process inherits writable outputs.
pub fn writable_outputs() -> std::io::Result<()> {
    for fd in [std::io::stdout().as_fd(), std::io::stderr().as_fd()] {
        if is_dev_null(fd) {
            let out = discarding_output()?;
            nix::unistd::dup2(out.as_raw_fd(), fd.as_raw_fd()).map_err(std::io::Error::from)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn the_discarding_output_takes_writes_and_is_not_dev_null() {
        let fd = discarding_output().expect("open");
        assert!(!is_dev_null(&fd));
        let mut f = File::from(fd);
        f.write_all(&[1u8; 8192]).expect("write");
        let null = File::open("/dev/null").expect("open /dev/null");
        assert!(is_dev_null(&null));
    }
}
