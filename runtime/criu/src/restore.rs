//! `trenv restore`: re-create a container from a CRIU checkpoint with runc's semantics.
//!
//! libcontainer can dump but not restore, so this drives CRIU directly: the container's cgroup
//! is created first and the CRIU worker is moved into it (everything CRIU forks lands there),
//! the rootfs is bind-mounted to a private path that becomes CRIU's root, bind mounts and
//! joined namespaces are handed over as external resources, the restored init is made our
//! child (`rst_sibling`) and, on success, a libcontainer state is written so every other
//! command (state, kill, exec, delete, checkpoint) works on the restored container.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
};
use libcontainer::config::YoukiConfig;
use libcontainer::container::{Container, ContainerStatus, State};
use libcontainer::oci_spec::runtime::{LinuxNamespaceType, LinuxResources};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::Pid;

use crate::checkpoint::DESCRIPTORS_JSON;
use crate::driver::{self as criu, rpc, Criu, CriuError};
use trenv_oci::bundle::{cgroup_v1_mounts, Bundle, BundleError};

const RESTORE_LOG: &str = "restore.log";
const CRIU_ROOT: &str = "criu-root";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid container id {0:?}")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("checkpoint image directory {path:?} is unusable: {reason}")]
    Images { path: PathBuf, reason: String },
    #[error("invalid option: {0}")]
    Option(String),
    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting the rootfs for CRIU at {path:?}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("cgroup {path:?}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("{error}; CRIU log {log:?}{}", if detail.is_empty() { String::new() } else { format!(" says:\n{detail}") })]
    Criu {
        error: CriuError,
        log: PathBuf,
        detail: String,
    },
    #[error("saving container state: {0}")]
    State(String),
}

/// runc's `restore` flags.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub id: String,
    /// Directory holding per-container state (`--root`).
    pub state_root: PathBuf,
    pub bundle: PathBuf,
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub systemd_cgroup: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub lazy_pages: bool,
    pub manage_cgroups_mode: Option<String>,
    pub empty_ns: Vec<String>,
    pub auto_dedup: bool,
    pub lsm_profile: Option<String>,
    pub lsm_mount_context: Option<String>,
    /// Descriptors CRIU inherits under a key (`--inherit-fd`), e.g. the pool regions of a
    /// memory template, keyed by their path without the leading '/'. Open until restore
    /// returns.
    pub inherit: Vec<(String, RawFd)>,
    /// External mounts (`--ext-mount-map KEY:PATH`) on top of the bundle's, e.g. the tmpfs
    /// mounts a template restore stages itself.
    pub ext_mounts: Vec<(String, String)>,
    /// The images' tree shares the restoring CRIU's network namespace (a template's always
    /// does): CRIU runs in the bundle's namespace, in a fresh one when the bundle asks for
    /// its own, or in the caller's when it asks for none.
    pub net_from_criu: bool,
    /// Descriptors that replace the checkpointed init's stdin, stdout and stderr pipes
    /// (default: the caller's 0, 1 and 2). A shim hands the new container's pipes over
    /// this way without giving up its own stdio.
    pub stdio: Option<[RawFd; 3]>,
    /// Restore connected TCP sockets closed (`--tcp-close`) instead of failing on them.
    pub tcp_close: bool,
    /// Join the IPC and UTS namespaces the spec gives by path (CRIU's `--join-ns`) rather
    /// than re-create them from the images: a container of a Kubernetes pod shares its
    /// pod's, and has the pod's hostname, not the one of where it was dumped.
    pub join_ipc_uts: bool,
}

/// A restored container: its init pid (a child of the calling process) and its state.
pub struct Restored {
    pub pid: i32,
    pub container: Container,
}

/// Everything a failed restore must undo, undone on drop unless disarmed.
struct Undo {
    container_dir: Option<PathBuf>,
    criu_root: Option<PathBuf>,
    cgroup: Option<AnyCgroupManager>,
}

impl Undo {
    fn unmount_root(&mut self) {
        if let Some(root) = self.criu_root.take() {
            if let Err(e) = umount2(&root, MntFlags::MNT_DETACH) {
                tracing::warn!(path = ?root, "unmounting CRIU root: {e}");
            }
            let _ = std::fs::remove_dir(&root);
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.unmount_root();
        if let Some(cg) = self.cgroup.take() {
            // CRIU kills what it restored on failure, but a crashed CRIU may leave tasks.
            if let Ok(pids) = cg.get_all_pids() {
                for p in pids {
                    let _ = kill(p, Signal::SIGKILL);
                }
            }
            for _ in 0..50 {
                if cg.get_all_pids().map(|p| p.is_empty()).unwrap_or(true) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Err(e) = cg.remove() {
                tracing::warn!("removing cgroup after failed restore: {e}");
            }
        }
        if let Some(dir) = self.container_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Rejects ids that could escape the state directory, as libcontainer does for create.
pub fn validate_id(id: &str) -> Result<(), RestoreError> {
    let bad = id.is_empty()
        || id == "."
        || id == ".."
        || id.contains('/')
        || id.contains('\0')
        || id.len() > 1024;
    if bad {
        return Err(RestoreError::InvalidId(id.to_string()));
    }
    Ok(())
}

fn check_images(path: &Path) -> Result<File, RestoreError> {
    let err = |reason: String| RestoreError::Images {
        path: path.to_path_buf(),
        reason,
    };
    let dir = File::open(path).map_err(|e| err(e.to_string()))?;
    let inventory = path.join("inventory.img");
    match std::fs::metadata(&inventory) {
        Ok(m) if m.len() > 0 => Ok(dir),
        Ok(_) => Err(err("inventory.img is empty".into())),
        Err(_) => Err(err("no inventory.img: not a CRIU checkpoint".into())),
    }
}

/// Old stdio of the checkpointed init, by fd number, from `descriptors.json`.
fn read_descriptors(images: &Path) -> Vec<String> {
    std::fs::read(images.join(DESCRIPTORS_JSON))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
        .unwrap_or_default()
}

/// The cgroup of `pid` per controller, from /proc/PID/cgroup, as CRIU `cg_root` entries.
fn cgroup_roots(pid: u32) -> Vec<rpc::Cgroup_root> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            let mut root = rpc::Cgroup_root::new();
            if !ctrls.is_empty() {
                root.set_ctrl(ctrls.to_string());
            }
            root.set_path(path.to_string());
            Some(root)
        })
        .collect()
}

/// Sends the restored terminal's master to the console socket, as runc's `create` does.
fn send_console(socket: &Path, master: &OwnedFd) -> Result<(), String> {
    let stream =
        UnixStream::connect(socket).map_err(|e| format!("console socket {socket:?}: {e}"))?;
    let fds = [master.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("sending terminal to {socket:?}: {e}"))?;
    Ok(())
}

fn write_pid_file(path: &Path, pid: i32) -> Result<(), RestoreError> {
    // Written to a temporary name and renamed, so a reader never sees a partial pid.
    let tmp = path.with_extension("trenv-tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| RestoreError::Io {
            what: "writing pid file",
            path: path.to_path_buf(),
            source,
        })
}

/// A new, empty network namespace, held by the returned descriptor only: made in a thread
/// of its own, which is all `unshare(CLONE_NEWNET)` changes.
fn fresh_netns() -> Result<File, RestoreError> {
    let err = |source: std::io::Error| RestoreError::Io {
        what: "creating a network namespace at",
        path: PathBuf::from("/proc/thread-self/ns/net"),
        source,
    };
    std::thread::spawn(|| -> std::io::Result<File> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        File::open("/proc/thread-self/ns/net")
    })
    .join()
    .map_err(|_| err(std::io::Error::other("thread panicked")))?
    .map_err(err)
}

fn open_ns(path: &Path) -> Result<File, RestoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| RestoreError::Io {
            what: "opening namespace",
            path: path.to_path_buf(),
            source,
        })
}

fn run_hooks(
    hooks: Option<&Vec<libcontainer::oci_spec::runtime::Hook>>,
    state: &State,
    pid: i32,
    what: &str,
) -> Result<(), String> {
    libcontainer::hooks::run_hooks(hooks, Some(state), None, Some(Pid::from_raw(pid)), None)
        .map_err(|e| format!("{what} hook failed: {e}"))
}

/// Restores a container from `opts.image_path` into a new container `opts.id`.
pub fn restore(criu: &Criu, opts: &RestoreOptions) -> Result<Restored, RestoreError> {
    validate_id(&opts.id)?;
    let bundle = Bundle::load(&opts.bundle)?;
    bundle
        .create_mountpoints()
        .map_err(|source| RestoreError::Io {
            what: "creating mount points in",
            path: bundle.rootfs.clone(),
            source,
        })?;
    let images = check_images(&opts.image_path)?;
    let work = match &opts.work_path {
        Some(w) => {
            std::fs::create_dir_all(w).map_err(|source| RestoreError::Io {
                what: "creating work directory",
                path: w.clone(),
                source,
            })?;
            Some(File::open(w).map_err(|source| RestoreError::Io {
                what: "opening work directory",
                path: w.clone(),
                source,
            })?)
        }
        None => None,
    };
    let mode = match &opts.manage_cgroups_mode {
        Some(m) => Some(criu::cgroup_mode(m).ok_or_else(|| {
            RestoreError::Option(format!(
                "invalid --manage-cgroups-mode {m:?} (soft, full, strict or ignore)"
            ))
        })?),
        None => None,
    };
    let empty_ns = criu::empty_ns_mask(&opts.empty_ns).map_err(RestoreError::Option)?;
    // Joined namespaces are inherited by CRIU under runc's keys.
    let stdio = opts.stdio.unwrap_or([0, 1, 2]);
    let mut keep: Vec<RawFd> = stdio.to_vec();
    let mut ns_files = Vec::new();
    let mut criu_netns: Option<File> = None;
    let mut inherit = Vec::new();
    for (kind, word) in [
        (LinuxNamespaceType::Network, "net"),
        (LinuxNamespaceType::Pid, "pid"),
    ] {
        if kind == LinuxNamespaceType::Network && opts.net_from_criu {
            criu_netns = match bundle.namespace_path(kind) {
                Some(path) => Some(open_ns(&path)?),
                None if bundle.has_namespace(kind) => Some(fresh_netns()?),
                None => None,
            };
            continue;
        }
        if let Some(path) = bundle.namespace_path(kind) {
            let f = open_ns(&path)?;
            let mut i = rpc::Inherit_fd::new();
            i.set_key(criu::external_ns_key(word));
            i.set_fd(f.as_raw_fd());
            keep.push(f.as_raw_fd());
            inherit.push(i);
            ns_files.push(f);
        }
    }
    for (key, fd) in &opts.inherit {
        let mut i = rpc::Inherit_fd::new();
        i.set_key(key.clone());
        i.set_fd(*fd);
        keep.push(*fd);
        inherit.push(i);
    }
    // New pipes for the old ones: the caller's stdio replaces the checkpointed stdio.
    for (fd, old) in stdio.iter().zip(read_descriptors(&opts.image_path).iter()) {
        if old.starts_with("pipe:") || old.starts_with("socket:") {
            let mut i = rpc::Inherit_fd::new();
            i.set_key(old.clone());
            i.set_fd(*fd);
            inherit.push(i);
        }
    }

    let log = opts
        .work_path
        .as_deref()
        .unwrap_or(&opts.image_path)
        .join(RESTORE_LOG);
    let criu_err = |error: CriuError, log: &Path| RestoreError::Criu {
        detail: criu::log_errors(log, 5),
        error,
        log: log.to_path_buf(),
    };
    // CRIU starts now, as soon as the descriptors it inherits are known: its exec and
    // start-up (~8 ms) overlap the rest of the preparation (state, root mount, cgroup). It
    // waits for the request; dropped on an error path, it is killed.
    let mut session = criu
        .spawn_in(
            &keep,
            &criu_netns
                .as_ref()
                .map(|f| (f.as_raw_fd(), libc::CLONE_NEWNET))
                .into_iter()
                .collect::<Vec<_>>(),
        )
        .map_err(|e| criu_err(e, &log))?;
    drop(criu_netns);
    tracing::debug!("restore: CRIU started");

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&opts.state_root)
        .map_err(|source| RestoreError::Io {
            what: "creating state root",
            path: opts.state_root.clone(),
            source,
        })?;
    let container_dir = opts.state_root.join(&opts.id);
    match std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&container_dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(RestoreError::Exists(opts.id.clone()))
        }
        Err(source) => {
            return Err(RestoreError::Io {
                what: "creating container state",
                path: container_dir,
                source,
            })
        }
    }
    let mut undo = Undo {
        container_dir: Some(container_dir.clone()),
        criu_root: None,
        cgroup: None,
    };

    // CRIU pivots into `root`, which therefore has to be a mount point.
    let criu_root = container_dir.join(CRIU_ROOT);
    std::fs::create_dir(&criu_root).map_err(|source| RestoreError::Io {
        what: "creating CRIU root",
        path: criu_root.clone(),
        source,
    })?;
    mount(
        Some(&bundle.rootfs),
        &criu_root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| RestoreError::Mount {
        path: criu_root.clone(),
        source,
    })?;
    undo.criu_root = Some(criu_root.clone());
    mount(
        None::<&str>,
        &criu_root,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| RestoreError::Mount {
        path: criu_root.clone(),
        source,
    })?;

    let cgroup_path = bundle.cgroup_path(&opts.id);
    let cg_err = |reason: String| RestoreError::Cgroup {
        path: cgroup_path.clone(),
        reason,
    };
    tracing::debug!("restore: root mounted");
    let cgroup = create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup_path.clone(),
        systemd_cgroup: opts.systemd_cgroup,
        container_name: opts.id.clone(),
    })
    .map_err(|e| cg_err(e.to_string()))?;

    let criu_pid = session.pid();
    cgroup
        .add_task(Pid::from_raw(
            i32::try_from(criu_pid).map_err(|e| cg_err(format!("CRIU pid {criu_pid}: {e}")))?,
        ))
        .map_err(|e| cg_err(format!("placing CRIU in the container cgroup: {e}")))?;
    undo.cgroup = Some(cgroup);
    tracing::debug!("restore: cgroup created");
    let default_resources = LinuxResources::default();
    let linux = bundle.spec.linux().as_ref();
    let resources = linux
        .and_then(|l| l.resources().as_ref())
        .unwrap_or(&default_resources);
    if let Some(cg) = &undo.cgroup {
        cg.apply(&ControllerOpt {
            resources,
            disable_oom_killer: resources
                .memory()
                .as_ref()
                .and_then(|m| m.disable_oom_killer())
                .unwrap_or(false),
            oom_score_adj: bundle
                .spec
                .process()
                .as_ref()
                .and_then(|p| p.oom_score_adj()),
            freezer_state: None,
        })
        .map_err(|e| cg_err(format!("applying resources: {e}")))?;
    }

    tracing::debug!("restore: cgroup configured");
    let mut o = rpc::Criu_opts::new();
    o.set_images_dir_fd(images.as_raw_fd());
    if let Some(w) = &work {
        o.set_work_dir_fd(w.as_raw_fd());
    }
    o.set_log_file(RESTORE_LOG.to_string());
    o.set_log_level(4);
    o.set_root(criu_root.to_string_lossy().into_owned());
    o.set_manage_cgroups(true);
    if let Some(m) = mode {
        o.set_manage_cgroups_mode(m);
    }
    o.cg_root = cgroup_roots(criu_pid);
    o.set_rst_sibling(true);
    o.set_notify_scripts(true);
    o.set_orphan_pts_master(true);
    o.set_tcp_established(opts.tcp_established);
    if opts.tcp_close {
        o.set_tcp_close(true);
    }
    if !opts.tcp_established {
        // CRIU locks a restored network namespace so that connections it puts back in
        // repair mode see no traffic; without established connections there are none, and
        // the unlock alone (`iptables-restore` for IPv4 and IPv6) costs ~60 ms here.
        o.set_network_lock(rpc::Criu_network_lock_method::SKIP);
    }
    o.set_ext_unix_sk(opts.ext_unix_sk);
    o.set_shell_job(opts.shell_job);
    o.set_file_locks(opts.file_locks);
    o.set_auto_dedup(opts.auto_dedup);
    if opts.lazy_pages {
        o.set_lazy_pages(true);
    }
    if let Some(p) = &opts.lsm_profile {
        o.set_lsm_profile(p.clone());
    }
    if let Some(c) = &opts.lsm_mount_context {
        o.set_lsm_mount_context(c.clone());
    }
    o.set_empty_ns(empty_ns);
    o.set_evasive_devices(true);
    let cgroupfs = if bundle.mounts_cgroupfs() {
        cgroup_v1_mounts()
    } else {
        Vec::new()
    };
    let ext_mounts = bundle
        .external_mounts()
        .into_iter()
        .chain(opts.ext_mounts.iter().cloned())
        .chain(cgroupfs.into_iter().map(|mp| (mp.clone(), mp)));
    for (key, val) in ext_mounts {
        let mut m = rpc::Ext_mount_map::new();
        m.set_key(key);
        m.set_val(val);
        o.ext_mnt.push(m);
    }
    o.inherit_fd = inherit;
    if opts.join_ipc_uts {
        for (kind, word) in [
            (LinuxNamespaceType::Ipc, "ipc"),
            (LinuxNamespaceType::Uts, "uts"),
        ] {
            // Joining a namespace whose contents the images carry would write them into
            // it (CRIU sets a joined UTS namespace's hostname to the dumped one): only
            // namespaces the dump left out (`CheckpointOptions::in_joined_ipc_uts`) are
            // joined.
            if images_have_namespace(&opts.image_path, word) {
                continue;
            }
            if let Some(path) = bundle.namespace_path(kind) {
                let mut j = rpc::Join_namespace::new();
                j.set_ns(word.to_string());
                j.set_ns_file(path.to_string_lossy().into_owned());
                o.join_ns.push(j);
            }
        }
    }

    let hooks = bundle.spec.hooks().clone();
    let hook_state = State::new(&opts.id, ContainerStatus::Created, None, bundle.dir.clone());
    let mut restored_pid: Option<i32> = None;
    let console_socket = opts.console_socket.clone();
    let res = session.call(rpc::Criu_req_type::RESTORE, Some(o), |n| {
        match n.script {
            "setup-namespaces" => {
                if let Some(h) = &hooks {
                    let mut st = hook_state.clone();
                    st.pid = Some(n.pid);
                    run_hooks(h.prestart().as_ref(), &st, n.pid, "prestart")?;
                    run_hooks(h.create_runtime().as_ref(), &st, n.pid, "createRuntime")?;
                }
            }
            "post-restore" => restored_pid = Some(n.pid),
            "orphan-pts-master" => {
                let Some(master) = n.fd else {
                    return Err("CRIU sent no terminal with orphan-pts-master".into());
                };
                match &console_socket {
                    Some(sock) => send_console(sock, &master)?,
                    None => tracing::warn!("restored a terminal but no --console-socket was given"),
                }
            }
            _ => {}
        }
        Ok(())
    });
    let resp = match res {
        Ok(r) => r,
        Err(e) => {
            session.finish();
            return Err(criu_err(e, &log));
        }
    };
    session.finish();
    drop(ns_files);
    tracing::debug!("restore: CRIU done");
    let pid = resp
        .restore
        .as_ref()
        .map(|r| r.pid())
        .filter(|p| *p > 0)
        .or(restored_pid)
        .ok_or_else(|| {
            criu_err(
                CriuError::Failed {
                    op: "restore",
                    message: "CRIU reported success without a pid".into(),
                },
                &log,
            )
        })?;
    undo.unmount_root();

    let state_err = |e: String| RestoreError::State(e);
    let mut container = Container::new(
        &opts.id,
        ContainerStatus::Running,
        Some(pid),
        &bundle.dir,
        &container_dir,
    )
    .map_err(|e| state_err(e.to_string()))?;
    container
        .set_systemd(opts.systemd_cgroup)
        .set_creator(nix::unistd::geteuid().as_raw())
        .set_annotations(bundle.spec.annotations().clone());
    container.state.created = Some(chrono::Utc::now());
    YoukiConfig::from_spec(&bundle.spec, &opts.id)
        .and_then(|c| c.save(&container_dir))
        .map_err(|e| state_err(e.to_string()))?;
    container.save().map_err(|e| state_err(e.to_string()))?;
    if let Some(p) = &opts.pid_file {
        write_pid_file(p, pid)?;
    }
    // From here on the container exists; `delete` owns its cleanup.
    undo.container_dir = None;
    undo.cgroup = None;

    if let Some(h) = &hooks {
        let mut st = container.state.clone();
        st.pid = Some(pid);
        if let Err(e) = run_hooks(h.poststart().as_ref(), &st, pid, "poststart") {
            tracing::warn!("{e}");
        }
    }
    Ok(Restored { pid, container })
}

/// Removes what a restore that was killed half-way (its CRIU and worker gone, no state
/// written) left of container `id`: its processes and cgroup (found through `bundle`), the
/// CRIU root mount and the state directory. Whether there was anything to remove.
pub fn remove_half_restored(state_root: &Path, id: &str, bundle: Option<&Path>) -> bool {
    if validate_id(id).is_err() {
        return false;
    }
    let dir = state_root.join(id);
    if !dir.is_dir() || dir.join("state.json").exists() {
        return false;
    }
    let mut undo = Undo {
        container_dir: Some(dir.clone()),
        criu_root: dir.join(CRIU_ROOT).exists().then(|| dir.join(CRIU_ROOT)),
        cgroup: None,
    };
    if let Some(b) = bundle.and_then(|b| Bundle::load(b).ok()) {
        undo.cgroup = create_cgroup_manager(CgroupConfig {
            cgroup_path: b.cgroup_path(id),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .ok();
    }
    drop(undo);
    true
}

/// Whether a dump holds the contents of a namespace of `kind` ("uts": utsns-*.img, "ipc":
/// ipcns-*.img).
fn images_have_namespace(images: &Path, kind: &str) -> bool {
    let prefix = format!("{kind}ns-");
    std::fs::read_dir(images)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_escape_are_rejected() {
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_id("abc-1_2.3").is_ok());
    }

    #[test]
    fn missing_images_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_images(dir.path()).unwrap_err();
        assert!(e.to_string().contains("inventory.img"), "{e}");
        std::fs::write(dir.path().join("inventory.img"), b"").unwrap();
        let e = check_images(dir.path()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn half_restored_state_is_removed_and_complete_state_kept() {
        let root = tempfile::tempdir().unwrap();
        let half = root.path().join("half");
        std::fs::create_dir_all(half.join(CRIU_ROOT)).unwrap();
        assert!(remove_half_restored(root.path(), "half", None));
        assert!(!half.exists());
        let whole = root.path().join("whole");
        std::fs::create_dir_all(&whole).unwrap();
        std::fs::write(whole.join("state.json"), b"{}").unwrap();
        assert!(!remove_half_restored(root.path(), "whole", None));
        assert!(whole.exists());
        assert!(!remove_half_restored(root.path(), "../x", None));
        assert!(!remove_half_restored(root.path(), "absent", None));
    }

    #[test]
    fn cgroup_roots_of_self() {
        let roots = cgroup_roots(std::process::id());
        assert!(!roots.is_empty());
    }
}
