//! Mounting the rootfs containerd hands to Create.
//!
//! containerd-shim's generic mount forks a child for every mount (so that a long overlay
//! lowerdir list can be shortened by a chdir) and waits for it through the reaper. For
//! the common case, an overlay or other filesystem whose options are plain `key=value`
//! data plus `ro`/`rw`, the shim mounts directly: no fork of the shim and no round trip
//! through the reaper on the start path. Everything else goes to containerd-shim.

use std::path::Path;

use containerd_shim::protos::api::Mount;

use nix::mount::MsFlags;

/// Options longer than this go to containerd-shim, which can shorten them (one page,
/// less the margin containerd keeps).
const MAX_DATA: usize = 4096 - 512;

/// The flags and data of a mount whose options need nothing but the mount syscall.
#[derive(Debug, PartialEq, Eq)]
pub struct Direct {
    pub flags: MsFlags,
    pub data: String,
}

/// `None` when the mount needs containerd-shim's handling (bind mounts, propagation or
/// other flag options, options too long for one call).
pub fn direct(fs_type: &str, options: &[String]) -> Option<Direct> {
    if fs_type.is_empty() || fs_type == "bind" || fs_type == "none" {
        return None;
    }
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            d if d.contains('=') => data.push(d),
            _ => return None,
        }
    }
    let data = data.join(",");
    (data.len() < MAX_DATA).then_some(Direct { flags, data })
}

/// Mounts one of containerd's rootfs mounts on `target`.
pub fn mount(fs_type: &str, source: &str, options: &[String], target: &Path) -> Result<(), String> {
    match direct(fs_type, options) {
        Some(d) => {
            let data = (!d.data.is_empty()).then_some(d.data.as_str());
            nix::mount::mount(Some(source), target, Some(fs_type), d.flags, data)
                .map_err(|e| format!("mounting {fs_type} {source} on {}: {e}", target.display()))
        }
        None => containerd_shim::mount::mount_rootfs(Some(fs_type), Some(source), options, target)
            .map_err(|e| e.to_string()),
    }
}

/// Mounts containerd's rootfs mounts on `<bundle>/rootfs`, in order; false when there were
/// none (the bundle brings its own rootfs).
pub fn mount_bundle(bundle: &Path, mounts: &[Mount]) -> Result<bool, String> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target).map_err(|e| format!("creating {target:?}: {e}"))?;
    for m in mounts {
        mount(&m.type_, &m.source, &m.options, &target)
            .map_err(|e| format!("mounting rootfs: {e}"))?;
    }
    Ok(true)
}

/// Detaches the rootfs of `bundle`; failures are logged (the bundle goes away anyway).
pub fn unmount_bundle(bundle: &Path) {
    let target = bundle.join("rootfs");
    if let Err(e) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
        log::warn!("unmounting {target:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn overlay_from_a_snapshotter_is_direct() {
        let o = opts(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/a:/b"]);
        let d = direct("overlay", &o).expect("direct");
        assert_eq!(d.flags, MsFlags::empty());
        assert_eq!(d.data, "index=off,workdir=/w,upperdir=/u,lowerdir=/a:/b");
        let ro = direct("overlay", &opts(&["ro", "lowerdir=/a:/b"])).expect("direct");
        assert_eq!(ro.flags, MsFlags::MS_RDONLY);
        assert_eq!(ro.data, "lowerdir=/a:/b");
    }

    #[test]
    fn binds_flags_and_long_options_go_to_containerd_shim() {
        assert!(direct("bind", &opts(&["rbind", "ro"])).is_none());
        assert!(direct("none", &opts(&["rbind"])).is_none());
        assert!(direct("overlay", &opts(&["nosuid", "lowerdir=/a"])).is_none());
        assert!(direct("ext4", &opts(&["rshared"])).is_none());
        assert!(direct("", &opts(&[])).is_none());
        let long = format!("lowerdir={}", vec!["/l"; 2000].join(":"));
        assert!(direct("overlay", &[long]).is_none());
    }

    #[test]
    fn mounts_an_overlay_and_reports_failures() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().expect("tempdir");
        for sub in ["lower", "upper", "work", "target"] {
            std::fs::create_dir(d.path().join(sub)).expect("mkdir");
        }
        std::fs::write(d.path().join("lower/f"), "x").expect("file");
        let p = |s: &str| d.path().join(s).display().to_string();
        let o = vec![
            format!("workdir={}", p("work")),
            format!("upperdir={}", p("upper")),
            format!("lowerdir={}", p("lower")),
        ];
        let target = d.path().join("target");
        mount("overlay", "overlay", &o, &target).expect("mount");
        let seen = std::fs::read_to_string(target.join("f"));
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).expect("umount");
        assert_eq!(seen.expect("file through the overlay"), "x");
        let bad = vec![format!("lowerdir={}", p("missing"))];
        let e = mount("overlay", "overlay", &bad, &target).unwrap_err();
        assert!(e.contains("mounting overlay"), "{e}");
    }
}
