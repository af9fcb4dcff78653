//! The container's tmpfs mounts, staged by trenv instead of restored by CRIU.
//!
//! CRIU restores a tmpfs by mounting it and running `tar --extract --gzip` on its archive
//! (`tmpfs-dev-N.tar.gz.img`): a fork and two execs per tmpfs, about 5 ms each here, and every
//! function container has two (/dev and /tmp), more than any other part of a template
//! restore. A template build marks such mounts as external in the mount image (an `ext_key`
//! CRIU resolves through `--ext-mount-map`); before each restore trenv mounts a fresh tmpfs
//! with the dumped options, unpacks the same archive into it in-process, and hands it to CRIU,
//! which bind-mounts it in place. Each instance gets its own tmpfs with the content the
//! checkpoint had. The staging mounts are detached once CRIU is done (the container's bind
//! keeps its tmpfs alive).
//!
//! Only a tmpfs mounted at its root whose superblock no other mount of the image shows at its
//! root is staged (binds of a file inside it, like the masked paths' /dev/null, CRIU makes
//! from the staged mount); anything else stays CRIU's.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{chown, DirBuilderExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use trenv_criu::image::{magic, Fstype, Image, MntEntry};

use crate::TemplateError;

/// The `ext_key` prefix of staged tmpfs mounts.
const KEY_PREFIX: &str = "trenv-tmpfs-";

/// One staged tmpfs, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TmpfsMount {
    /// Key of the mount in `--ext-mount-map`.
    pub key: String,
    /// Where the container sees it (for messages).
    pub mountpoint: String,
    /// Superblock options as dumped (`mode=755,size=65536k`).
    pub options: String,
    /// Mount and superblock flags (MS_*) as dumped.
    pub flags: u32,
    pub sb_flags: u32,
    /// Its content: the archive CRIU dumped, in the image directory.
    pub archive: String,
}

/// Marks the image set's stageable tmpfs mounts as external; what the restore must stage.
pub fn externalize(images: &Path) -> Result<Vec<TmpfsMount>, TemplateError> {
    let mut out = Vec::new();
    let dir = std::fs::read_dir(images).map_err(|e| TemplateError::io("listing", images, e))?;
    let mut files: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mountpoints-") && n.ends_with(".img"))
        })
        .collect();
    files.sort();
    for path in files {
        let mut img = Image::<MntEntry>::read(&path)?;
        if img.header.type_magic() != magic::MNTS {
            return Err(TemplateError::Corrupt {
                name: path.display().to_string(),
                detail: "not a mount image".into(),
            });
        }
        let mut changed = false;
        // Mounts of the same superblock at its root: a second one (a bind of the whole tmpfs)
        // would need the same staged mount; binds of a file or directory inside it (masked
        // paths are binds of /dev/null) are made from the staged mount by CRIU.
        let devs: Vec<u32> = img
            .entries
            .iter()
            .filter(|m| m.root() == "/")
            .map(|m| m.root_dev())
            .collect();
        for m in &mut img.entries {
            let archive = format!("tmpfs-dev-{}.tar.gz.img", m.root_dev());
            let shared = devs.iter().filter(|d| **d == m.root_dev()).count() > 1;
            if m.fstype() != Fstype::TMPFS as u32
                || m.root() != "/"
                || m.has_ext_key()
                || m.ext_mount()
                || shared
                || !images.join(&archive).is_file()
            {
                continue;
            }
            let key = format!("{KEY_PREFIX}{}", m.mnt_id());
            out.push(TmpfsMount {
                key: key.clone(),
                mountpoint: m.mountpoint().to_string(),
                options: m.options().to_string(),
                flags: m.flags(),
                sb_flags: m.sb_flags(),
                archive,
            });
            m.set_ext_key(key);
            changed = true;
        }
        if changed {
            img.write(&path)?;
        }
    }
    Ok(out)
}

/// Staged tmpfs mounts, detached and removed when dropped.
#[derive(Debug)]
pub struct Staged {
    mounts: Vec<(String, PathBuf)>,
}

impl Staged {
    /// `--ext-mount-map` pairs: key and the staged mount's path.
    pub fn ext_mounts(&self) -> Vec<(String, String)> {
        self.mounts
            .iter()
            .map(|(k, p)| (k.clone(), p.to_string_lossy().into_owned()))
            .collect()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (_, p) in &self.mounts {
            if let Err(e) = umount2(p, MntFlags::MNT_DETACH) {
                tracing::warn!("unmounting staged tmpfs {}: {e}", p.display());
            }
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// Unmounts and removes what a killed restore staged in `dir`: `.tmpfs-<pid>-<n>` of a pid
/// that no longer runs. What it removed.
pub fn sweep(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".tmpfs-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 0 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        let _ = umount2(&path, MntFlags::MNT_DETACH);
        if std::fs::remove_dir(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Mount flags a tmpfs takes at mount time; the rest (propagation, remount) are CRIU's.
fn mount_flags(m: &TmpfsMount) -> MsFlags {
    let keep = MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC
        | MsFlags::MS_NOATIME
        | MsFlags::MS_NODIRATIME
        | MsFlags::MS_RELATIME
        | MsFlags::MS_STRICTATIME;
    MsFlags::from_bits_truncate(u64::from(m.flags | m.sb_flags)) & keep
}

/// Mounts a tmpfs per entry under `dir` and unpacks its archive from `images` into it.
pub fn stage(images: &Path, mounts: &[TmpfsMount], dir: &Path) -> Result<Staged, TemplateError> {
    let mut staged = Staged { mounts: Vec::new() };
    for (i, m) in mounts.iter().enumerate() {
        // Unique per process: a work directory may be shared (`--work-path`).
        let target = dir.join(format!(".tmpfs-{}-{i}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&target)
            .map_err(|e| TemplateError::io("creating", &target, e))?;
        let options = (!m.options.is_empty()).then_some(m.options.as_str());
        if let Err(e) = mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            mount_flags(m),
            options,
        ) {
            let _ = std::fs::remove_dir(&target);
            return Err(TemplateError::io(
                "mounting a tmpfs for",
                Path::new(&m.mountpoint),
                e.into(),
            ));
        }
        staged.mounts.push((m.key.clone(), target.clone()));
        let archive = images.join(&m.archive);
        unpack(&archive, &target).map_err(|e| TemplateError::Corrupt {
            name: archive.display().to_string(),
            detail: format!("unpacking the tmpfs of {}: {e}", m.mountpoint),
        })?;
        if u64::from(m.flags | m.sb_flags) & libc::MS_RDONLY != 0 {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | mount_flags(m),
                options,
            )
            .map_err(|e| TemplateError::io("making read-only", &target, e.into()))?;
        }
    }
    Ok(staged)
}

/// Unpacks a gzip'ed tar (as CRIU's `tar --create --gzip` wrote it) into `dest`, keeping
/// modes and numeric owners, and creating device nodes and FIFOs, which the tar crate does not.
fn unpack(archive: &Path, dest: &Path) -> io::Result<()> {
    let gz = flate2::read::GzDecoder::new(File::open(archive)?);
    let mut tar = tar::Archive::new(gz);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_overwrite(true);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let special = if kind.is_character_special() {
            Some(SFlag::S_IFCHR)
        } else if kind.is_block_special() {
            Some(SFlag::S_IFBLK)
        } else if kind.is_fifo() {
            Some(SFlag::S_IFIFO)
        } else {
            None
        };
        let Some(sflag) = special else {
            entry.unpack_in(dest)?;
            continue;
        };
        let rel = entry.path()?.into_owned();
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("entry {} leaves the archive's root", rel.display()),
            ));
        }
        let h = entry.header();
        let mode = h.mode()? & 0o7777;
        // GNU tar leaves a FIFO's device fields blank.
        let dev = if sflag == SFlag::S_IFIFO {
            0
        } else {
            makedev(
                u64::from(h.device_major()?.unwrap_or(0)),
                u64::from(h.device_minor()?.unwrap_or(0)),
            )
        };
        let (uid, gid) = (h.uid()?, h.gid()?);
        let path = dest.join(&rel);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => std::fs::remove_file(&path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        mknod(&path, sflag, Mode::from_bits_truncate(mode), dev)?;
        let id = |v: u64| u32::try_from(v).ok();
        chown(&path, id(uid), id(gid))?;
        // mknod's mode went through the umask.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        let mtime = nix::sys::time::TimeSpec::new(i64::try_from(h.mtime()?).unwrap_or(0), 0);
        nix::sys::stat::utimensat(
            None,
            &path,
            &mtime,
            &mtime,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        // Drain the (empty) body so the archive stays in step.
        io::copy(&mut entry.by_ref().take(0), &mut io::sink())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::process::Command;

    /// `src` packed the way CRIU dumps a tmpfs.
    fn pack(src: &Path, archive: &Path) {
        let st = Command::new("tar")
            .args([
                "--create",
                "--gzip",
                "--numeric-owner",
                "--preserve-permissions",
            ])
            .arg("--file")
            .arg(archive)
            .arg("--directory")
            .arg(src)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// A tmpfs content like CRIU dumps it: tar of a tree with device nodes and a FIFO.
    #[test]
    fn unpacks_what_tar_packed_including_devices() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("pts")).unwrap();
        std::fs::write(src.join("file"), b"content").unwrap();
        std::os::unix::fs::symlink("/proc/self/fd", src.join("fd")).unwrap();
        mknod(
            &src.join("null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .unwrap();
        std::fs::set_permissions(src.join("null"), PermissionsExt::from_mode(0o666)).unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        chown(src.join("file"), Some(1234), Some(5678)).unwrap();
        let archive = t.path().join("a.tar.gz");
        pack(&src, &archive);

        let dest = t.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        unpack(&archive, &dest).unwrap();
        let null = std::fs::symlink_metadata(dest.join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);
        let orig = std::fs::symlink_metadata(src.join("null")).unwrap();
        assert_eq!(null.mtime(), orig.mtime());
        assert!(std::fs::symlink_metadata(dest.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(std::fs::read(dest.join("file")).unwrap(), b"content");
        let f = std::fs::metadata(dest.join("file")).unwrap();
        assert_eq!((f.uid(), f.gid()), (1234, 5678));
        assert_eq!(
            std::fs::read_link(dest.join("fd")).unwrap(),
            Path::new("/proc/self/fd")
        );
        assert!(dest.join("pts").is_dir());
    }

    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sweep_takes_what_dead_restores_staged_and_only_that() {
        let t = tempfile::tempdir().unwrap();
        // A pid that ran and is gone.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = t.path().join(format!(".tmpfs-{dead}-0"));
        std::fs::create_dir(&stale).unwrap();
        mount(
            Some("tmpfs"),
            &stale,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let live = t.path().join(format!(".tmpfs-{}-0", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let other = t.path().join("restore.log");
        std::fs::write(&other, b"log").unwrap();
        assert_eq!(sweep(t.path()), vec![stale.clone()]);
        assert!(!stale.exists() && live.exists() && other.exists());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(&*stale.to_string_lossy()));
    }

    #[test]
    fn staged_mounts_are_tmpfs_with_the_content_and_go_when_dropped() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello"), b"hi").unwrap();
        let images = t.path().join("images");
        std::fs::create_dir(&images).unwrap();
        pack(&src, &images.join("tmpfs-dev-7.tar.gz.img"));
        let m = TmpfsMount {
            key: "trenv-tmpfs-1".into(),
            mountpoint: "/tmp".into(),
            options: "mode=1777,size=1m".into(),
            flags: 2, // MS_NOSUID
            sb_flags: 0,
            archive: "tmpfs-dev-7.tar.gz.img".into(),
        };
        let work = t.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let staged = stage(&images, &[m], &work).unwrap();
        let (key, path) = staged.ext_mounts().remove(0);
        assert_eq!(key, "trenv-tmpfs-1");
        assert_eq!(
            std::fs::read(Path::new(&path).join("hello")).unwrap(),
            b"hi"
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(path.as_str()))
            .expect("staged tmpfs mounted");
        assert!(line.contains(" - tmpfs "), "{line}");
        assert!(line.contains("nosuid"), "{line}");
        drop(staged);
        assert!(!Path::new(&path).exists());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(&path));

        // A broken archive: an error, and nothing stays mounted.
        std::fs::write(images.join("tmpfs-dev-7.tar.gz.img"), b"not gzip").unwrap();
        let m = TmpfsMount {
            key: "k".into(),
            mountpoint: "/tmp".into(),
            options: String::new(),
            flags: 0,
            sb_flags: 0,
            archive: "tmpfs-dev-7.tar.gz.img".into(),
        };
        let err = stage(&images, &[m], &work).unwrap_err();
        assert_eq!(err.reason(), "corrupt");
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    }
}
