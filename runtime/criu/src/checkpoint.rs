//! `trenv checkpoint`: dump a running container with CRIU, with runc's semantics and image
//! layout (so a checkpoint made by either runtime restores with the other).

use std::fs::{DirBuilder, File};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use libcgroups::common::CgroupSetup;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::oci_spec::runtime::LinuxNamespaceType;
use protobuf::MessageField;

use crate::driver::{self as criu, rpc, Criu, CriuError};
use trenv_oci::bundle::{cgroup_v1_mounts, Bundle, BundleError};

/// Name of the file, inside the image directory, recording where the container's stdio pointed.
pub const DESCRIPTORS_JSON: &str = "descriptors.json";
const DUMP_LOG: &str = "dump.log";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "container {id} is {status:?}; only a running or paused container can be checkpointed"
    )]
    NotRunning { id: String, status: ContainerStatus },
    #[error("container {0} has no init process recorded")]
    NoPid(String),
    #[error("cannot prepare {path:?}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("invalid option: {0}")]
    Option(String),
    #[error("{error}; CRIU log {log:?}{}", if detail.is_empty() { String::new() } else { format!(" says:\n{detail}") })]
    Criu {
        error: CriuError,
        log: PathBuf,
        detail: String,
    },
    #[error(transparent)]
    Container(#[from] libcontainer::error::LibcontainerError),
    #[error(transparent)]
    Delete(#[from] trenv_oci::lifecycle::LifecycleError),
}

/// runc's `checkpoint` flags.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub parent_path: Option<PathBuf>,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub link_remap: bool,
    pub lazy_pages: bool,
    pub status_fd: Option<i32>,
    /// `ADDRESS:PORT` of a CRIU page server to send pages to.
    pub page_server: Option<String>,
    pub manage_cgroups_mode: Option<String>,
    pub empty_ns: Vec<String>,
    pub auto_dedup: bool,
    /// Only pre-dump memory (needs soft-dirty tracking in the kernel); never stops the container.
    pub pre_dump: bool,
    /// Leave out connections still in a listening socket's accept queue (`--skip-in-flight`)
    /// instead of failing: with `leave_running` they stay with the running process.
    pub skip_in_flight: bool,
    /// When the spec joins existing IPC and UTS namespaces (a Kubernetes pod's), CRIU runs
    /// in them, so the images leave them out: a restore can then join another pod's
    /// without writing this one's hostname or IPC objects into it (templates).
    pub in_joined_ipc_uts: bool,
}

/// The container's IPC and UTS namespaces, opened, for those its spec joins by path.
fn joined_ipc_uts(bundle: &Bundle, pid: i32) -> Result<Vec<(File, libc::c_int)>, CheckpointError> {
    let mut out = Vec::new();
    for (kind, word, flag) in [
        (LinuxNamespaceType::Ipc, "ipc", libc::CLONE_NEWIPC),
        (LinuxNamespaceType::Uts, "uts", libc::CLONE_NEWUTS),
    ] {
        if bundle.namespace_path(kind).is_none() {
            continue;
        }
        let path = PathBuf::from(format!("/proc/{pid}/ns/{word}"));
        let f = File::open(&path).map_err(|source| CheckpointError::Dir { path, source })?;
        out.push((f, flag));
    }
    Ok(out)
}

fn make_dir(path: &Path) -> Result<File, CheckpointError> {
    if let Err(source) = DirBuilder::new().mode(0o700).recursive(true).create(path) {
        if source.kind() != ErrorKind::AlreadyExists {
            return Err(CheckpointError::Dir {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    File::open(path).map_err(|source| CheckpointError::Dir {
        path: path.to_path_buf(),
        source,
    })
}

/// Records where the init process's stdio points, so restore can hand over new pipes in place
/// of the old ones (`inherit_fd`).
fn save_descriptors(pid: i32, image_dir: &Path) -> Result<(), CheckpointError> {
    let fds: Vec<String> = (0..3)
        .map(|n| {
            std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/dev/null".to_string())
        })
        .collect();
    let path = image_dir.join(DESCRIPTORS_JSON);
    let json = serde_json::to_vec(&fds).map_err(|e| CheckpointError::Dir {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, json).map_err(|source| CheckpointError::Dir { path, source })
}

/// The freezer cgroup CRIU should use to stop the whole tree at once.
fn freezer_path(cgroup: &Path) -> Option<String> {
    let rel = cgroup.strip_prefix("/").ok()?;
    match libcgroups::common::get_cgroup_setup().ok()? {
        CgroupSetup::Unified => Some(format!("/sys/fs/cgroup/{}", rel.display())),
        _ => Some(format!("/sys/fs/cgroup/freezer/{}", rel.display())),
    }
}

fn parse_page_server(s: &str) -> Result<rpc::Criu_page_server_info, CheckpointError> {
    let (addr, port) = s
        .rsplit_once(':')
        .ok_or_else(|| CheckpointError::Option(format!("page server {s:?} is not ADDRESS:PORT")))?;
    let port: i32 = port.parse().map_err(|_| {
        CheckpointError::Option(format!("page server port {port:?} is not a number"))
    })?;
    let mut ps = rpc::Criu_page_server_info::new();
    ps.set_address(addr.to_string());
    ps.set_port(port);
    Ok(ps)
}

/// Builds the CRIU options shared by dump-like requests.
fn dump_options(
    container: &Container,
    bundle: &Bundle,
    opts: &CheckpointOptions,
    pid: i32,
    images: &File,
    work: Option<&File>,
) -> Result<rpc::Criu_opts, CheckpointError> {
    let mut o = rpc::Criu_opts::new();
    o.set_pid(pid);
    o.set_images_dir_fd(images.as_raw_fd());
    if let Some(w) = work {
        o.set_work_dir_fd(w.as_raw_fd());
    }
    o.set_log_file(DUMP_LOG.to_string());
    o.set_log_level(4);
    o.set_root(bundle.rootfs.to_string_lossy().into_owned());
    o.set_leave_running(opts.leave_running);
    o.set_tcp_established(opts.tcp_established);
    if opts.skip_in_flight {
        o.set_tcp_skip_in_flight(true);
    }
    o.set_ext_unix_sk(opts.ext_unix_sk);
    o.set_shell_job(opts.shell_job);
    o.set_file_locks(opts.file_locks);
    o.set_link_remap(opts.link_remap);
    o.set_auto_dedup(opts.auto_dedup);
    o.set_orphan_pts_master(true);
    o.set_manage_cgroups(true);
    if let Some(mode) = &opts.manage_cgroups_mode {
        let m = criu::cgroup_mode(mode).ok_or_else(|| {
            CheckpointError::Option(format!(
                "invalid --manage-cgroups-mode {mode:?} (soft, full, strict or ignore)"
            ))
        })?;
        o.set_manage_cgroups_mode(m);
    }
    if let Some(parent) = &opts.parent_path {
        o.set_parent_img(parent.to_string_lossy().into_owned());
    }
    if let Some(ps) = &opts.page_server {
        o.ps = MessageField::some(parse_page_server(ps)?);
    }
    if opts.lazy_pages {
        o.set_lazy_pages(true);
    }
    if let Some(fd) = opts.status_fd {
        o.set_status_fd(fd);
    }
    o.set_empty_ns(criu::empty_ns_mask(&opts.empty_ns).map_err(CheckpointError::Option)?);
    o.set_evasive_devices(true);
    for (dest, _) in bundle.external_mounts() {
        let mut m = rpc::Ext_mount_map::new();
        m.set_key(dest.clone());
        m.set_val(dest);
        o.ext_mnt.push(m);
    }
    if bundle.mounts_cgroupfs() {
        for mp in cgroup_v1_mounts() {
            let mut m = rpc::Ext_mount_map::new();
            m.set_key(mp.clone());
            m.set_val(mp);
            o.ext_mnt.push(m);
        }
    }
    for (kind, word) in [
        (LinuxNamespaceType::Network, "net"),
        (LinuxNamespaceType::Pid, "pid"),
    ] {
        if let Some(path) = bundle.namespace_path(kind) {
            let meta = std::fs::metadata(&path).map_err(|source| CheckpointError::Dir {
                path: path.clone(),
                source,
            })?;
            use std::os::unix::fs::MetadataExt;
            o.external.push(format!(
                "{word}[{}]:{}",
                meta.ino(),
                criu::external_ns_key(word)
            ));
        }
    }
    if let Ok(spec) = container.spec() {
        if let Some(f) = freezer_path(&spec.cgroup_path) {
            if Path::new(&f).exists() {
                o.set_freeze_cgroup(f);
            }
        }
        if let Some(pid) = container.pid() {
            o.cgroup_dump_controller = own_controllers(pid.as_raw(), &spec.cgroup_path);
        }
    }
    Ok(o)
}

/// The cgroup controllers in which the process `pid` is in the container's own cgroup
/// `cgroup`. CRIU dumps, for each hierarchy, the whole tree below the task's cgroup and
/// re-creates every missing directory of it at restore: in a hierarchy where the container
/// has no cgroup of its own (on a v1 host, `name=systemd` and the unified hierarchy, where
/// it stays in its parent's cgroup, often the root) that would be the host's whole tree —
/// a restore would bring back cgroups deleted since the dump, anywhere on the host. Only
/// these controllers are dumped; empty when the container's cgroups cannot be read (CRIU's
/// default then applies).
fn own_controllers(pid: i32, cgroup: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    controllers_at(&text, cgroup)
}

fn controllers_at(proc_cgroup: &str, cgroup: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if Path::new(path) != cgroup {
            continue;
        }
        if ctrls.is_empty() {
            // The cgroup2 hierarchy, by CRIU's name for it.
            out.push("unified".to_string());
        } else {
            out.extend(ctrls.split(',').map(str::to_string));
        }
    }
    out
}

/// Checkpoints `container` into `opts.image_path`. Without `leave_running` the container is
/// stopped and deleted afterwards, as runc does.
pub fn checkpoint(
    container: &mut Container,
    criu: &Criu,
    opts: &CheckpointOptions,
) -> Result<(), CheckpointError> {
    container.refresh_status()?;
    let status = container.status();
    // containerd pauses a task before checkpointing it; CRIU then finds the tree already
    // frozen in the freezer cgroup.
    if !matches!(status, ContainerStatus::Running | ContainerStatus::Paused) {
        return Err(CheckpointError::NotRunning {
            id: container.id().to_string(),
            status,
        });
    }
    let pid: i32 = container
        .pid()
        .ok_or_else(|| CheckpointError::NoPid(container.id().to_string()))?
        .as_raw();
    let bundle = Bundle::load(container.bundle())?;
    let images = make_dir(&opts.image_path)?;
    let work = opts.work_path.as_deref().map(make_dir).transpose()?;
    save_descriptors(pid, &opts.image_path)?;
    let o = dump_options(container, &bundle, opts, pid, &images, work.as_ref())?;

    let log = opts
        .work_path
        .as_deref()
        .unwrap_or(&opts.image_path)
        .join(DUMP_LOG);
    let joined = if opts.in_joined_ipc_uts {
        joined_ipc_uts(&bundle, pid)?
    } else {
        Vec::new()
    };
    let namespaces: Vec<_> = joined.iter().map(|(f, k)| (f.as_raw_fd(), *k)).collect();
    let mut session = criu
        .spawn_in(&[], &namespaces)
        .map_err(|source| CheckpointError::Criu {
            error: source,
            log: log.clone(),
            detail: String::new(),
        })?;
    let req = if opts.pre_dump {
        rpc::Criu_req_type::PRE_DUMP
    } else {
        rpc::Criu_req_type::DUMP
    };
    let res = session.call(req, Some(o), |_| Ok(()));
    session.finish();
    if let Err(source) = res {
        let detail = criu::log_errors(&log, 5);
        return Err(CheckpointError::Criu {
            error: source,
            log,
            detail,
        });
    }
    tracing::debug!(id = container.id(), "checkpointed");
    if !opts.leave_running && !opts.pre_dump {
        container.set_status(ContainerStatus::Stopped).save()?;
        trenv_oci::lifecycle::delete(container, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn only_the_containers_own_cgroups_are_dumped() {
        let text = "12:pids:/c1\n9:name=systemd:/\n4:cpu,cpuacct:/c1\n0::/\n";
        assert_eq!(
            super::controllers_at(text, Path::new("/c1")),
            ["pids", "cpu", "cpuacct"]
        );
        assert_eq!(
            super::controllers_at("0::/c1\n", Path::new("/c1")),
            ["unified"]
        );
    }
}
