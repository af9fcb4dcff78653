//! A CRIU plugin for processes that map `/dev/pseudo_mm` (see README.md).
//!
//! The descriptor follows `criu/include/criu-plugin.h` of CRIU 4.2 (plugin API 0.2.0, 13
//! hooks); CRIU refuses a descriptor that claims a newer version or more hooks than it knows,
//! and reads only the first `max_hooks` entries.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::path::Path;

use trenv_mempool::pseudo_mm::{parse_map_offset, DEVICE};

/// `CRIU_PLUGIN_GEN_VERSION(0, 2, 0)`.
pub const PLUGIN_VERSION: c_uint = 2 << 8;
/// `CR_PLUGIN_HOOK__MAX` of CRIU 4.2.
pub const HOOKS: usize = HOOKS_U32 as usize;
const HOOKS_U32: c_uint = 13;
/// `CR_PLUGIN_HOOK__HANDLE_DEVICE_VMA`.
pub const HOOK_HANDLE_DEVICE_VMA: usize = 7;
/// `CR_PLUGIN_HOOK__UPDATE_VMA_MAP`.
pub const HOOK_UPDATE_VMA_MAP: usize = 8;

/// Where the module publishes its device's number.
const SYSFS_DEV: &str = "/sys/class/misc/pseudo_mm/dev";

const LOG_ERROR: c_uint = 1;
const LOG_INFO: c_uint = 3;

type HandleDeviceVma = unsafe extern "C" fn(c_int, *const libc::stat) -> c_int;
type UpdateVmaMap = unsafe extern "C" fn(*const c_char, u64, u64, *mut u64, *mut c_int) -> c_int;

/// One entry of the hook table: a function pointer of the hook's type, or NULL.
#[repr(C)]
#[derive(Clone, Copy)]
pub union Hook {
    none: *const libc::c_void,
    handle_device_vma: HandleDeviceVma,
    update_vma_map: UpdateVmaMap,
}

/// `cr_plugin_desc_t`.
#[repr(C)]
pub struct PluginDesc {
    pub name: *const c_char,
    pub init: Option<extern "C" fn(c_int) -> c_int>,
    pub exit: Option<extern "C" fn(c_int, c_int)>,
    pub version: c_uint,
    pub max_hooks: c_uint,
    pub hooks: [Hook; HOOKS],
}

// SAFETY: the descriptor is immutable after load (CRIU only reads it), and every pointer in
// it is to static data or code.
unsafe impl Sync for PluginDesc {}

const fn hooks() -> [Hook; HOOKS] {
    let mut h = [Hook {
        none: std::ptr::null(),
    }; HOOKS];
    h[HOOK_HANDLE_DEVICE_VMA] = Hook { handle_device_vma };
    h[HOOK_UPDATE_VMA_MAP] = Hook { update_vma_map };
    h
}

/// What CRIU looks up with dlsym().
#[no_mangle]
pub static CR_PLUGIN_DESC: PluginDesc = PluginDesc {
    name: c"trenv-pseudo-mm".as_ptr(),
    init: Some(init),
    exit: Some(exit),
    version: PLUGIN_VERSION,
    max_hooks: HOOKS_U32,
    hooks: hooks(),
};

extern "C" fn init(_stage: c_int) -> c_int {
    0
}

extern "C" fn exit(_stage: c_int, _ret: c_int) {}

/// CRIU's `print_on_level(level, fmt, ...)`, which the criu binary exports to plugins.
type PrintOnLevel = unsafe extern "C" fn(c_uint, *const c_char, ...);

/// Logs through CRIU's logger when running inside criu (looked up at run time, so that the
/// library also loads elsewhere, e.g. in its tests), else to stderr.
fn log(level: c_uint, msg: &str) {
    // SAFETY: dlsym with RTLD_DEFAULT and a static NUL-terminated name only looks a symbol up.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"print_on_level".as_ptr()) };
    let Ok(line) = std::ffi::CString::new(format!("trenv-pseudo-mm: {msg}\n")) else {
        return;
    };
    if sym.is_null() {
        eprint!("{}", line.to_string_lossy());
        return;
    }
    // SAFETY: the symbol is criu's print_on_level, of this type (criu/include/log.h).
    let print: PrintOnLevel =
        unsafe { std::mem::transmute::<*mut libc::c_void, PrintOnLevel>(sym) };
    // SAFETY: the format is a static "%s" and its one argument a NUL-terminated string that
    // outlives the call.
    unsafe { print(level, c"%s".as_ptr(), line.as_ptr()) };
}

/// The device number of the loaded module's device, if it is loaded.
fn device_number() -> Option<libc::dev_t> {
    let text = std::fs::read_to_string(SYSFS_DEV).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// Whether `st` describes the pseudo_mm device whose number is `dev`.
pub fn is_pseudo_mm(st: &libc::stat, dev: libc::dev_t) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == dev
}

/// Whether an image's path names the device (the path recorded at dump).
pub fn names_pseudo_mm(path: &str) -> bool {
    Path::new(path) == Path::new(DEVICE)
}

/// Dump: claims mappings of the pseudo_mm device, and nothing else.
///
/// # Safety
/// `st` is NULL or points to a valid `struct stat` (CRIU passes the mapped file's).
pub unsafe extern "C" fn handle_device_vma(_fd: c_int, st: *const libc::stat) -> c_int {
    // SAFETY: per the contract above; NULL is refused.
    let Some(st) = (unsafe { st.as_ref() }) else {
        return -libc::EINVAL;
    };
    match device_number() {
        Some(dev) if is_pseudo_mm(st, dev) => 0,
        _ => -libc::ENOTSUP,
    }
}

/// Restore: checks a pseudo_mm VMA's offset, keeps it, and lets CRIU open the device by path
/// (inherited from the caller). Returns 1 when the VMA is the plugin's.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `new_pgoff` and `plugin_fd` are NULL or
/// writable (CRIU passes its own variables).
pub unsafe extern "C" fn update_vma_map(
    path: *const c_char,
    addr: u64,
    old_pgoff: u64,
    new_pgoff: *mut u64,
    plugin_fd: *mut c_int,
) -> c_int {
    if path.is_null() || new_pgoff.is_null() || plugin_fd.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let path = unsafe { CStr::from_ptr(path) }.to_string_lossy();
    if !names_pseudo_mm(&path) {
        return -libc::ENOTSUP;
    }
    let Some((template, range)) = parse_map_offset(old_pgoff) else {
        log(
            LOG_ERROR,
            &format!("VMA at {addr:#x}: offset {old_pgoff:#x} names no pseudo_mm template range"),
        );
        return -libc::EINVAL;
    };
    log(
        LOG_INFO,
        &format!("VMA at {addr:#x}: template {template} range {range}"),
    );
    // SAFETY: both non-NULL and writable per the contract.
    unsafe {
        *new_pgoff = old_pgoff;
        *plugin_fd = -1;
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(mode: libc::mode_t, rdev: libc::dev_t) -> libc::stat {
        // SAFETY: an all-zero `struct stat` is a valid value of it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = mode;
        st.st_rdev = rdev;
        st
    }

    #[test]
    fn the_descriptor_is_what_criu_4_2_reads() {
        assert_eq!(CR_PLUGIN_DESC.version, 0x200);
        assert_eq!(CR_PLUGIN_DESC.max_hooks, 13);
        // SAFETY: reading the table's pointers as raw pointers only compares addresses.
        let set: Vec<usize> = (0..HOOKS)
            .filter(|&i| !unsafe { CR_PLUGIN_DESC.hooks[i].none }.is_null())
            .collect();
        assert_eq!(set, vec![HOOK_HANDLE_DEVICE_VMA, HOOK_UPDATE_VMA_MAP]);
        // SAFETY: the name is a static C string.
        let name = unsafe { CStr::from_ptr(CR_PLUGIN_DESC.name) };
        assert_eq!(name.to_str().unwrap(), "trenv-pseudo-mm");
    }

    #[test]
    fn only_the_pseudo_mm_device_is_claimed() {
        let dev = libc::makedev(10, 120);
        assert!(is_pseudo_mm(&stat_of(libc::S_IFCHR | 0o600, dev), dev));
        assert!(!is_pseudo_mm(
            &stat_of(libc::S_IFCHR | 0o600, libc::makedev(1, 5)),
            dev
        ));
        assert!(!is_pseudo_mm(&stat_of(libc::S_IFREG | 0o600, dev), dev));
        let st = stat_of(libc::S_IFCHR, libc::makedev(1, 3));
        // SAFETY: a valid stat.
        let rc = unsafe { handle_device_vma(-1, &st) };
        assert_eq!(rc, -libc::ENOTSUP, "/dev/null-like devices are not ours");
        // SAFETY: NULL is part of the contract.
        let rc = unsafe { handle_device_vma(-1, std::ptr::null()) };
        assert_eq!(rc, -libc::EINVAL);
    }

    #[test]
    fn update_vma_map_keeps_offsets_and_leaves_other_files() {
        let mut pgoff = 0u64;
        let mut fd = 7;
        let off = ((2 << 12) | 1) << 12;
        // SAFETY: valid string and out-pointers.
        let rc =
            unsafe { update_vma_map(c"/dev/pseudo_mm".as_ptr(), 0x1000, off, &mut pgoff, &mut fd) };
        assert_eq!((rc, pgoff, fd), (1, off, -1));
        // SAFETY: as above.
        let rc =
            unsafe { update_vma_map(c"/dev/dri/card0".as_ptr(), 0x1000, off, &mut pgoff, &mut fd) };
        assert_eq!(rc, -libc::ENOTSUP);
    }
}
