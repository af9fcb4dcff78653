//! Command line, flag for flag compatible with runc so that containerd's runc shim (and people
//! used to runc) can drive trenv.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "trenv",
    version,
    about = "OCI runtime with fast restore for serverless functions"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Directory for container state (tmpfs recommended)
    #[arg(long, global = true, default_value = "/run/trenv")]
    pub root: PathBuf,
    /// Log file (default: stderr)
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format: text or json
    #[arg(long, global = true, default_value = "text")]
    pub log_format: String,
    /// Manage cgroups through systemd (cgroupsPath is then "slice:prefix:name")
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Verbose logging
    #[arg(long, global = true)]
    pub debug: bool,
    /// Path to the criu binary
    #[arg(long, global = true, default_value = "criu")]
    pub criu: PathBuf,
    /// Accepted for runc compatibility; trenv always runs as root
    #[arg(long, global = true)]
    pub rootless: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a container (its init waits for `start`)
    Create(Create),
    /// Start a created container
    Start(IdArg),
    /// Create and start a container, waiting for it unless --detach
    Run(Run),
    /// Print the state of a container as JSON
    State(IdArg),
    /// Send a signal to the container's init (or all its processes)
    Kill(Kill),
    /// Delete a container and its resources
    Delete(Delete),
    /// List processes of a container
    Ps(Ps),
    /// Run a process inside a running container
    Exec(Exec),
    /// Freeze all processes of a container
    Pause(IdArg),
    /// Thaw a paused container
    Resume(IdArg),
    /// Print container statistics (runc's events format)
    Events(Events),
    /// Change the resource limits of a container
    Update(Update),
    /// Print the runtime's features as JSON
    Features,
    /// Write a default config.json
    Spec(Spec),
    /// List containers
    #[command(alias = "ls")]
    List(List),
    /// Checkpoint a running container with CRIU
    Checkpoint(Checkpoint),
    /// Restore a container from a CRIU checkpoint
    Restore(Restore),
    /// Inspect and drain the sandbox pools of containerd-shim-trenv-v2
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Build, list and remove memory templates
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Add trenv as a runtime handler of containerd's CRI plugin (Kubernetes RuntimeClass)
    InstallContainerdConfig(InstallContainerdConfig),
}

/// Adds `[plugins.<cri>.containerd.runtimes.<name>]` to a containerd config, leaving
/// everything else as it is; idempotent, and never replaces a different runtime of that name.
#[derive(Args, Debug, Clone)]
pub struct InstallContainerdConfig {
    /// containerd's config file (created, as version 2, if it does not exist)
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub config: PathBuf,
    /// Runtime handler name (a RuntimeClass's `handler`)
    #[arg(long, default_value = "trenv")]
    pub name: String,
    /// Print the resulting config instead of writing it
    #[arg(long)]
    pub dry_run: bool,
}

/// Where templates are kept.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Template store directory
    #[arg(
        long,
        env = "TRENV_TEMPLATE_STORE",
        default_value = "/var/lib/trenv/templates"
    )]
    pub store: PathBuf,
}

/// The memory pool new templates put their memory in.
#[derive(Args, Debug, Clone)]
pub struct MemPoolArgs {
    /// Pool kind: tmpfs (local DRAM), hugetlbfs (a hugetlbfs mount) or daxfs (a directory on
    /// a DAX filesystem)
    #[arg(long, env = "TRENV_MEMPOOL_KIND", default_value = "tmpfs")]
    pub pool_kind: String,
    /// Pool directory (a tmpfs pool mounts its own tmpfs there)
    #[arg(
        long,
        env = "TRENV_MEMPOOL_DIR",
        default_value = "/run/trenv/mempool/default"
    )]
    pub pool_dir: PathBuf,
    /// Pool capacity in bytes (suffixes K, M, G)
    #[arg(long, env = "TRENV_MEMPOOL_CAPACITY", default_value = "4G")]
    pub pool_capacity: String,
    /// Pool name (recorded in templates)
    #[arg(long, default_value = "default")]
    pub pool_name: String,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Make a template from a checkpoint directory or a running container
    Build(TemplateBuild),
    /// List templates
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        store: StoreArgs,
        /// table or json
        #[arg(short, long, default_value = "table")]
        format: String,
    },
    /// Print a template's manifest as JSON
    Inspect {
        #[command(flatten)]
        store: StoreArgs,
        name: String,
    },
    /// Check every digest of a template (and seal it again)
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        name: String,
    },
    /// Remove a template name (the template goes with its last name; refused while in use)
    Rm {
        #[command(flatten)]
        store: StoreArgs,
        name: String,
    },
    /// Remove leftovers: unnamed templates, dead builds, orphan pool regions
    Gc {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        pool: MemPoolArgs,
    },
}

#[derive(Args, Debug)]
pub struct TemplateBuild {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub pool: MemPoolArgs,
    /// A CRIU image directory (as written by `trenv checkpoint`)
    #[arg(
        long,
        conflicts_with = "from_container",
        required_unless_present = "from_container"
    )]
    pub from_checkpoint: Option<PathBuf>,
    /// A running container, checkpointed (left running) for the template
    #[arg(long)]
    pub from_container: Option<String>,
    /// Name of the template
    #[arg(long)]
    pub name: String,
    /// Bundle whose spec keys the template (default for --from-container: its own bundle;
    /// without one, the key is the image set's digest)
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Image identity that goes into the key (e.g. an image digest)
    #[arg(long, default_value = "")]
    pub image: String,
    /// Allow open TCP connections (--from-container)
    #[arg(long)]
    pub tcp_established: bool,
    /// Map the template's memory through the pseudo_mm kernel module (/dev/pseudo_mm)
    /// instead of as pool files: on a DAX pool, instances then map device pages as they are.
    /// Restores need CRIU to load the trenv plugin (libtrenv_criu_plugin.so in CRIU's
    /// plugin directory, or CRIU_LIBS_DIR).
    #[arg(long)]
    pub kmod: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PoolArgs {
    /// containerd namespace whose pool to use
    #[arg(short, long, default_value = "default", env = "CONTAINERD_NAMESPACE")]
    pub namespace: String,
    /// Root of the pools' state (the shim's pool.state_dir)
    #[arg(long, default_value = trenv_sandbox::DEFAULT_POOL_ROOT)]
    pub pool_root: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// List the sandboxes of a pool
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        pool: PoolArgs,
        /// table or json
        #[arg(short, long, default_value = "table")]
        format: String,
    },
    /// Show one sandbox as JSON
    Inspect {
        #[command(flatten)]
        pool: PoolArgs,
        id: String,
    },
    /// Destroy every idle sandbox and stop refilling; in-use sandboxes are destroyed when
    /// their containers end
    Drain {
        #[command(flatten)]
        pool: PoolArgs,
    },
}

#[derive(Args, Debug)]
pub struct IdArg {
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct Create {
    /// Bundle directory
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Unix socket that receives the pty master of a terminal container
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// File to write the init's pid to
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Do not use pivot_root (for ramfs roots)
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (the session keyring is always created)
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Number of extra file descriptors (from fd 3) to pass to the container
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    pub id: String,
}

#[derive(Args, Debug)]
pub struct Run {
    #[command(flatten)]
    pub create: Create,
    /// Do not wait for the container
    #[arg(short, long)]
    pub detach: bool,
    /// Keep the container after it exits (do not delete it)
    #[arg(long)]
    pub keep: bool,
    /// Do not become a child subreaper
    #[arg(long)]
    pub no_subreaper: bool,
}

#[derive(Args, Debug)]
pub struct Kill {
    /// Signal all processes of the container
    #[arg(short, long)]
    pub all: bool,
    pub id: String,
    /// Signal name or number
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Args, Debug)]
pub struct Delete {
    /// Kill a running container before deleting it; succeed if it does not exist
    #[arg(short, long)]
    pub force: bool,
    pub id: String,
}

#[derive(Args, Debug)]
pub struct Ps {
    /// table or json
    #[arg(short, long, default_value = "table")]
    pub format: String,
    pub id: String,
    /// Options passed to ps(1) (default -ef)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct Exec {
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Environment variable KEY=VALUE (repeatable)
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Allocate a terminal
    #[arg(short, long)]
    pub tty: bool,
    /// UID[:GID]
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional group id (repeatable)
    #[arg(short = 'g', long)]
    pub additional_gids: Vec<u32>,
    /// process.json describing the process (replaces the command line)
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Do not wait for the process
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub process_label: Option<String>,
    #[arg(long)]
    pub apparmor: Option<String>,
    #[arg(long)]
    pub no_new_privs: bool,
    /// Additional capability (repeatable)
    #[arg(short, long)]
    pub cap: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    #[arg(long)]
    pub ignore_paused: bool,
    /// Sub-cgroup to run the process in
    #[arg(long)]
    pub cgroup: Option<String>,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct Events {
    /// Print statistics once and exit
    #[arg(long)]
    pub stats: bool,
    /// Interval between statistics events (e.g. 5s, 500ms)
    #[arg(long, default_value = "5s")]
    pub interval: String,
    pub id: String,
}

#[derive(Args, Debug)]
pub struct Update {
    /// JSON file with LinuxResources ("-" for stdin)
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    #[arg(long)]
    pub cpu_period: Option<u64>,
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    #[arg(long)]
    pub cpu_share: Option<u64>,
    #[arg(long)]
    pub cpu_rt_period: Option<u64>,
    #[arg(long)]
    pub cpu_rt_runtime: Option<i64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Memory limit in bytes
    #[arg(long)]
    pub memory: Option<i64>,
    #[arg(long)]
    pub memory_reservation: Option<i64>,
    #[arg(long)]
    pub memory_swap: Option<i64>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    pub id: String,
}

#[derive(Args, Debug)]
pub struct Spec {
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
}

#[derive(Args, Debug)]
pub struct List {
    /// table or json
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Only print ids
    #[arg(short, long)]
    pub quiet: bool,
}

/// CRIU options shared by checkpoint and restore.
#[derive(Args, Debug, Clone)]
pub struct CriuFlags {
    /// Directory of the CRIU image files
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// Directory for CRIU logs and work files (default: the image path)
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Allow open TCP connections
    #[arg(long)]
    pub tcp_established: bool,
    /// Allow external unix sockets
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Allow shell jobs
    #[arg(long)]
    pub shell_job: bool,
    /// Handle file locks
    #[arg(long)]
    pub file_locks: bool,
    /// Use userfaultfd to lazily restore memory pages
    #[arg(long)]
    pub lazy_pages: bool,
    /// cgroups mode: soft, full, strict or ignore
    #[arg(long)]
    pub manage_cgroups_mode: Option<String>,
    /// Namespace to leave empty (only "network")
    #[arg(long)]
    pub empty_ns: Vec<String>,
    /// Deduplicate memory pages against the parent image
    #[arg(long)]
    pub auto_dedup: bool,
}

#[derive(Args, Debug)]
pub struct Checkpoint {
    #[command(flatten)]
    pub criu: CriuFlags,
    /// Parent checkpoint for incremental dumps (relative to the image path)
    #[arg(long)]
    pub parent_path: Option<PathBuf>,
    /// Keep the container running after the checkpoint
    #[arg(long)]
    pub leave_running: bool,
    /// Allow link-remap of unlinked open files
    #[arg(long)]
    pub link_remap: bool,
    /// ADDRESS:PORT of a CRIU page server
    #[arg(long)]
    pub page_server: Option<String>,
    /// Descriptor CRIU writes a byte to when the lazy-pages server is ready
    #[arg(long)]
    pub status_fd: Option<i32>,
    /// Pre-dump only (needs memory tracking, i.e. soft-dirty bits, in the kernel)
    #[arg(long)]
    pub pre_dump: bool,
    pub id: String,
}

#[derive(Args, Debug)]
pub struct Restore {
    #[command(flatten)]
    pub criu: CriuFlags,
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Do not wait for the restored container
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub no_subreaper: bool,
    /// Accepted for runc compatibility (CRIU always pivots into the rootfs)
    #[arg(long)]
    pub no_pivot: bool,
    #[arg(long)]
    pub lsm_profile: Option<String>,
    #[arg(long)]
    pub lsm_mount_context: Option<String>,
    /// Restore from this memory template instead of --image-path
    #[arg(long)]
    pub template: Option<String>,
    /// Template store directory (with --template)
    #[arg(
        long,
        env = "TRENV_TEMPLATE_STORE",
        default_value = "/var/lib/trenv/templates"
    )]
    pub template_store: PathBuf,
    pub id: String,
}
