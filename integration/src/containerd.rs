//! A private containerd instance for one test, with its own socket, root and state.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{bundle::busybox_image, leaks, wait_for};

/// The busybox image reference after import.
pub const BUSYBOX: &str = "docker.io/local/busybox:latest";
/// The Debian + Python image reference after import.
pub const PYTHON: &str = "docker.io/local/python:latest";
/// Parent cgroup of the tests' sandboxes; each containerd's pool has its own below it
/// (`Containerd::pool_cgroup`), so tests running side by side can count their own.
pub const POOL_CGROUP: &str = "/trenv-it-pool";

/// containerd's name for the trenv shim; resolved through containerd's PATH.
pub const TRENV_RUNTIME: &str = "io.containerd.trenv.v2";
/// A shell loop that counts in /tmp/c every 50 ms: state that a checkpoint must carry.
pub const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.05; done";
/// containerd namespace used by tests (also the parent cgroup containerd gives containers).
pub const NAMESPACE: &str = "trenv-it";
/// The namespace containerd's CRI plugin keeps pods and their containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pod sandbox image of CRI tests (examples/pause), imported by [`Containerd::start_cri`].
pub const PAUSE: &str = "docker.io/local/pause:latest";
/// The pod network of CRI tests: a bridge that is the pods' gateway, so the host reaches pod
/// IPs (addresses inside network namespaces CRI makes for the test).
const CRI_CNI: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "trenv-it-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "trenvit0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.78.0.0/16" }]] }
    }
  ]
}
"#;

pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    /// The containerd namespace the test's containers live in ([`NAMESPACE`], or CRI's).
    namespace: &'static str,
}

impl Containerd {
    pub fn start() -> Self {
        Self::start_with_log_level("info")
    }

    /// A containerd whose shims get `-debug` when `level` is "debug".
    pub fn start_with_log_level(level: &str) -> Self {
        let dir = new_dir();
        let config = base_config(
            dir.path(),
            level,
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        );
        Self::start_in(dir, &config, NAMESPACE)
    }

    /// A containerd with its CRI plugin on, as on a Kubernetes node: the project's pause
    /// image as sandbox image, a CNI bridge network for pods, and the `trenv` runtime handler
    /// added by `trenv install-containerd-config` (the documented way). Pods live in CRI's
    /// namespace, [`CRI_NAMESPACE`].
    pub fn start_cri() -> Self {
        let dir = new_dir();
        let d = dir.path();
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).expect("cni dir");
        std::fs::write(cni.join("10-trenv-it.conflist"), CRI_CNI).expect("cni conflist");
        let config = base_config(d, "info", "")
            + &format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Root here may lack CAP_SYS_RESOURCE: no runtime could give the pause container -998.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
                cni = cni.display()
            );
        let path = d.join("config.toml");
        std::fs::write(&path, config).expect("config");
        let out = Command::new(crate::runtime::trenv_bin())
            .args(["install-containerd-config", "--config"])
            .arg(&path)
            .output()
            .expect("trenv install-containerd-config");
        assert!(
            out.status.success(),
            "install-containerd-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = std::fs::read_to_string(&path).expect("config");
        let c = Self::start_in(dir, &config, CRI_NAMESPACE);
        let pause = crate::cache_dir().join("images/pause/pause-oci.tar");
        c.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            PAUSE.trim_end_matches(":latest"),
            &pause.to_string_lossy(),
        ]);
        c
    }

    fn start_in(dir: tempfile::TempDir, config: &str, namespace: &'static str) -> Self {
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        let child = Self::spawn(dir.path());
        let c = Self {
            dir,
            child,
            namespace,
        };
        // Each containerd gets a pool of its own; a small one, so tests stay light.
        c.set_pool_config("min_idle = 1\nmax_idle = 4");
        c.wait_up();
        c
    }

    /// The containerd namespace of this containerd's containers.
    pub fn namespace(&self) -> &'static str {
        self.namespace
    }

    /// The parent cgroup of this containerd's sandboxes (the shim appends the namespace).
    pub fn pool_cgroup(&self) -> String {
        let name = self.dir.path().file_name().unwrap_or_default();
        format!("{POOL_CGROUP}/{}", name.to_string_lossy())
    }

    /// Removes this containerd's (empty) pool parent cgroups in every hierarchy.
    fn remove_pool_cgroups(&self) {
        let rel = self.pool_cgroup();
        let rel = rel.trim_start_matches('/');
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        let mut roots: Vec<PathBuf> = hierarchies.flatten().map(|e| e.path()).collect();
        roots.push(PathBuf::from("/sys/fs/cgroup"));
        for root in roots {
            let parent = root.join(rel);
            let _ = std::fs::remove_dir(parent.join(self.namespace));
            let _ = std::fs::remove_dir(parent);
        }
    }

    fn spawn(d: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .expect("log");
        // The shim under test comes first, so `--runtime io.containerd.trenv.v2` finds it.
        let shim_dir = crate::runtime::shim_bin()
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = format!(
            "{shim_dir}:/usr/local/sbin:/usr/local/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("TRENV_SHIM_CONFIG", d.join("shim.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd")
    }

    fn wait_up(&self) {
        let up = wait_for(Duration::from_secs(20), || {
            self.ctr(&["version"]).status.success().then_some(())
        });
        assert!(up.is_some(), "containerd did not come up: {}", self.log());
    }

    fn stop_daemon(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    /// Stops containerd (SIGTERM, as a service manager would); shims keep running.
    pub fn stop(&mut self) {
        self.stop_daemon();
    }

    /// Starts containerd again on the same root and state, after [`Containerd::stop`].
    pub fn resume(&mut self) {
        self.child = Self::spawn(self.dir.path());
        self.wait_up();
    }

    /// Records `ctr events` from now on.
    pub fn events(&self) -> Events {
        let path = self
            .dir
            .path()
            .join(format!("events-{}.log", crate::unique_id("ev")));
        let out = std::fs::File::create(&path).expect("events log");
        let child = self
            .ctr_cmd()
            .arg("events")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        // `ctr events` subscribes asynchronously; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        Events { child, path }
    }

    /// The shim config file containerd's shims read (TRENV_SHIM_CONFIG).
    pub fn shim_config(&self) -> PathBuf {
        self.dir.path().join("shim.toml")
    }

    /// The state directory of the trenv shim's sandbox pool for the test namespace.
    pub fn pool_dir(&self) -> PathBuf {
        self.dir.path().join("pool").join(self.namespace)
    }

    /// A sample of the pool's `metrics.prom` (0 when absent).
    pub fn pool_metric(&self, name: &str) -> f64 {
        let text =
            std::fs::read_to_string(self.pool_dir().join("metrics.prom")).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits up to 10 s for a pool metric to reach `at_least`: the pool worker rewrites
    /// `metrics.prom` after it acts, so the file trails what `trenv sandbox ls` shows.
    pub fn wait_pool_metric(&self, name: &str, at_least: f64) -> Result<(), f64> {
        match wait_for(Duration::from_secs(10), || {
            (self.pool_metric(name) >= at_least).then_some(())
        }) {
            Some(()) => Ok(()),
            None => Err(self.pool_metric(name)),
        }
    }

    /// `trenv sandbox SUBCOMMAND ... --namespace NS` on this containerd's pool.
    pub fn sandbox_cmd(&self, args: &[&str]) -> Output {
        Command::new(crate::runtime::trenv_bin())
            .arg("sandbox")
            .args(args)
            .arg("--namespace")
            .arg(self.namespace)
            .arg("--pool-root")
            .arg(self.dir.path().join("pool"))
            .stdin(Stdio::null())
            .output()
            .expect("trenv sandbox")
    }

    /// Drains the pool and waits until its shim has ended and left nothing: no process,
    /// no pool state. Returns what is left, if anything.
    pub fn drain_pool(&self) -> Result<(), String> {
        let out = self.sandbox_cmd(&["drain"]);
        if !out.status.success() {
            return Err(format!(
                "trenv sandbox drain: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let socket = self.socket().to_string_lossy().into_owned();
        // A sandbox being created or destroyed finishes first: with a CNI plugin that hangs
        // until `cni_timeout_secs`, on a loaded machine, that takes several seconds.
        let done = wait_for(Duration::from_secs(30), || {
            (leaks::processes_with(&socket).is_empty() && !self.pool_dir().exists()).then_some(())
        });
        match done {
            Some(()) => Ok(()),
            None => Err(format!(
                "after drain: shim processes {:?}, pool dir exists: {}",
                leaks::processes_with(&socket)
                    .iter()
                    .map(|p| {
                        let cmd = std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                            .unwrap_or_default()
                            .replace('\0', " ");
                        let wchan =
                            std::fs::read_to_string(format!("/proc/{p}/wchan")).unwrap_or_default();
                        format!("{p} ({cmd}; waiting in {wchan})")
                    })
                    .collect::<Vec<_>>(),
                self.pool_dir().exists()
            )),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The last `n` lines of containerd's log without its debug lines (the shim's own log
    /// lines are among them), for a failed test's report.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("level=debug"))
            .collect();
        format!(
            "--- containerd.log, last {n} lines ---\n{}",
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    pub fn ctr_cmd(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(self.namespace);
        c
    }

    /// Runs ctr to completion; a ctr that hangs is killed after two minutes (its output then
    /// says so), so a wedged daemon fails the test instead of hanging the suite.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-k", "5", "120", "ctr", "--address"])
            .arg(self.socket())
            .args(["--namespace", self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr")
    }

    /// Runs ctr, asserting success; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run -d` of busybox with the trenv shim; returns once the task runs.
    pub fn run_detached(&self, id: &str, args: &[&str]) {
        self.run_detached_with(&["--runtime", TRENV_RUNTIME], id, args);
    }

    /// `ctr run -d` of busybox with `runtime` flags (e.g. `--runc-binary PATH`); returns once
    /// the task runs.
    pub fn run_detached_with(&self, runtime: &[&str], id: &str, args: &[&str]) {
        let mut all = vec!["run", "-d"];
        all.extend_from_slice(runtime);
        all.extend_from_slice(&[BUSYBOX, id]);
        all.extend_from_slice(args);
        self.ctr_ok(&all);
        self.wait_task(id, "RUNNING");
    }

    /// Execs report their own exit code and output, and see the task's init as pid 1,
    /// whose command line starts with `init`.
    pub fn assert_exec_works(&self, id: &str, init: &str) {
        let out = self.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            id,
            "sh",
            "-c",
            "echo exec-out; exit 4",
        ]);
        assert_eq!(out.status.code(), Some(4));
        assert!(String::from_utf8_lossy(&out.stdout).contains("exec-out"));
        let out = self.exec_ok(id, "e2", &["cat", "/proc/1/cmdline"]);
        assert!(out.starts_with(init), "{out}");
    }

    /// `ctr task ps` lists the init; pause and resume change the task's status.
    pub fn assert_ps_pause_resume(&self, id: &str) {
        let ps = self.ctr_ok(&["task", "ps", id]);
        assert!(ps.lines().count() >= 2, "{ps}");
        self.ctr_ok(&["task", "pause", id]);
        assert_eq!(self.task_status(id).as_deref(), Some("PAUSED"));
        self.ctr_ok(&["task", "resume", id]);
        assert_eq!(self.task_status(id).as_deref(), Some("RUNNING"));
    }

    /// Waits up to 10 s for a [`COUNTER`] task to reach `min`; returns the value seen.
    pub fn counter_reaching(&self, id: &str, min: u64) -> Option<u64> {
        wait_for(Duration::from_secs(10), || {
            let out = self.ctr(&["task", "exec", "--exec-id", "r", id, "cat", "/tmp/c"]);
            let n = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .ok()?;
            (n >= min).then_some(n)
        })
    }

    /// `ctr task checkpoint` of a running [`COUNTER`] task stores a checkpoint image and
    /// leaves the task running and counting.
    pub fn assert_checkpoint_keeps_running(&self, id: &str) {
        self.ctr_ok(&["task", "checkpoint", id]);
        let images = self.ctr_ok(&["images", "ls", "-q"]);
        assert!(
            images
                .lines()
                .any(|l| l.starts_with(&format!("containerd.io/checkpoint/{id}:"))),
            "{images}"
        );
        assert_eq!(self.task_status(id).as_deref(), Some("RUNNING"));
        let before = self.counter(id, "r1");
        std::thread::sleep(Duration::from_millis(300));
        let after = self.counter(id, "r2");
        assert!(
            after > before,
            "not counting after checkpoint: {before} -> {after}"
        );
    }

    /// Output of `ctr task exec` of `args` in a task, asserting success.
    pub fn exec_ok(&self, id: &str, exec_id: &str, args: &[&str]) -> String {
        let mut all = vec!["task", "exec", "--exec-id", exec_id, id];
        all.extend_from_slice(args);
        self.ctr_ok(&all)
    }

    /// The value a [`COUNTER`] container has reached.
    pub fn counter(&self, id: &str, exec_id: &str) -> u64 {
        // The counter rewrites the file (truncate, then write): a read can fall in between.
        for attempt in 0..20 {
            let exec = format!("{exec_id}-{attempt}");
            if let Ok(n) = self.exec_ok(id, &exec, &["cat", "/tmp/c"]).trim().parse() {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{id}: no counter value in /tmp/c");
    }

    /// Imports the busybox example image.
    pub fn import_busybox(&self) {
        let tar = busybox_image().join("busybox-oci.tar");
        self.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            "docker.io/local/busybox",
            &tar.to_string_lossy(),
        ]);
    }

    /// Imports the Debian + Python example image as [`PYTHON`].
    pub fn import_python(&self) {
        self.import_python_image(&crate::bundle::python_image(), "docker.io/local/python");
    }

    /// Replaces the `[pool]` settings the next shim of this containerd starts with.
    pub fn set_pool_config(&self, toml_lines: &str) {
        self.set_shim_config("", toml_lines, "");
    }

    /// Replaces the shim config: top-level lines, `[pool]` lines and `[templates]` lines;
    /// the pool's state and cgroups and the template store and memory pool are this
    /// containerd's own.
    pub fn set_shim_config(&self, top: &str, pool: &str, templates: &str) {
        let capacity = if templates.contains("pool_capacity_mib") {
            ""
        } else {
            "pool_capacity_mib = 1024\n"
        };
        let text = format!(
            "{top}\n[pool]\nstate_dir = \"{}\"\ncgroup_parent = \"{}\"\n{pool}\n\
             [templates]\nstore = \"{}\"\npool_dir = \"{}\"\npool_name = \"it\"\n\
             {capacity}{templates}\n",
            self.dir.path().join("pool").display(),
            self.pool_cgroup(),
            self.template_store().display(),
            self.mempool_dir().display(),
        );
        std::fs::write(self.shim_config(), text).expect("shim config");
    }

    /// The template store of this containerd's shims.
    pub fn template_store(&self) -> PathBuf {
        self.dir.path().join("templates")
    }

    /// The memory pool (a tmpfs) of this containerd's templates.
    pub fn mempool_dir(&self) -> PathBuf {
        self.dir.path().join("mempool")
    }

    /// Imports an examples/python image tarball under `base_name`.
    pub fn import_python_image(&self, image_dir: &Path, base_name: &str) {
        let tar = image_dir.join("python-oci.tar");
        self.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            base_name,
            &tar.to_string_lossy(),
        ]);
    }

    /// The status column of `ctr task ls` for a task (RUNNING, PAUSED, STOPPED...).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(id)).then(|| cols.nth(1).unwrap_or_default().to_string())
        })
    }

    /// Waits up to 10 s for a task to reach `status`; panics with the task list if it does not.
    pub fn wait_task(&self, id: &str, status: &str) {
        let ok = wait_for(Duration::from_secs(10), || {
            (self.task_status(id).as_deref() == Some(status)).then_some(())
        });
        assert!(
            ok.is_some(),
            "task {id} never became {status}: {}",
            String::from_utf8_lossy(&self.ctr(&["task", "ls"]).stdout)
        );
    }

    /// Kills a task, waits until it is stopped, and deletes the task and its container.
    pub fn kill_and_remove(&self, id: &str) {
        self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        self.wait_task(id, "STOPPED");
        self.ctr_ok(&["task", "delete", id]);
        self.ctr_ok(&["containers", "delete", id]);
    }

    /// Asserts that nothing of a deleted container is left: shim process, cgroups, mounts,
    /// trenv state, containerd's record.
    pub fn assert_gone(&self, id: &str) {
        // The namespace's shim lives on (it owns the pool); the task must be gone from it.
        let published = self.pool_dir().join("containers").join(id);
        let gone = wait_for(Duration::from_secs(5), || {
            (!published.exists()).then_some(())
        });
        assert!(gone.is_some(), "address of {id} still published");
        let cg = leaks::cgroup_dirs(&format!("/{}/{id}", self.namespace));
        assert!(cg.is_empty(), "cgroups of {id} left: {cg:?}");
        let m = leaks::mounts_with(id);
        assert!(m.is_empty(), "mounts of {id} left: {m:?}");
        assert!(
            !Path::new(&format!("/run/containerd/trenv/{}/{id}", self.namespace)).exists(),
            "state of {id} left"
        );
        let listed = self.ctr_ok(&["containers", "list", "-q"]);
        assert!(!listed.lines().any(|l| l == id), "{id} still listed");
    }

    fn cleanup_containers(&self) {
        let out = self.ctr(&["containers", "list", "-q"]);
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            std::thread::sleep(Duration::from_millis(100));
            let _ = self.ctr(&["task", "delete", "--force", id]);
            let _ = self.ctr(&["containers", "delete", id]);
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A fresh directory for one containerd.
fn new_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("trenv-it-ctrd-")
        .tempdir()
        .expect("tempdir")
}

/// Settings every test containerd has: its own root, state, sockets and log level; `top`
/// adds top-level keys.
fn base_config(d: &Path, level: &str, top: &str) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
{top}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "{level}"
"#,
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = d.join("containerd.sock").display(),
    )
}

/// A running `ctr events`, writing to a file.
pub struct Events {
    child: Child,
    path: PathBuf,
}

impl Events {
    /// Waits up to `timeout` for an event line with `topic` that mentions `id`.
    pub fn wait(&self, topic: &str, id: &str, timeout: Duration) -> Option<String> {
        wait_for(timeout, || {
            std::fs::read_to_string(&self.path)
                .ok()?
                .lines()
                .find_map(|l| {
                    (l.contains(&format!(" {topic} ")) && l.contains(&format!("\"{id}\"")))
                        .then(|| l.to_string())
                })
        })
    }

    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory and every directory below it.
fn walk_dirs(d: &Path) -> Vec<PathBuf> {
    let mut out = vec![d.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(walk_dirs(&e.path()));
            }
        }
    }
    out
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        // A test that failed while containerd was stopped still gets its containers removed.
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            self.child = Self::spawn(self.dir.path());
            let _ = wait_for(Duration::from_secs(20), || {
                self.ctr(&["version"]).status.success().then_some(())
            });
        }
        self.cleanup_containers();
        // Draining ends the pool's shim; anything it leaves is a bug, reported once the rest
        // is cleaned up, so one failure does not leak into the next tests.
        let mut problems: Vec<String> = self.drain_pool().err().into_iter().collect();
        self.stop_daemon();
        // Shims outlive containerd by design; ours must not outlive the test.
        let shims = leaks::processes_with(&self.socket().to_string_lossy());
        for &pid in &shims {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !shims.is_empty() {
            // The killed shim's sandboxes are destroyed as an operator would, once its
            // ownership lock is gone with it.
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.sandbox_cmd(&["drain"]);
        }
        self.remove_pool_cgroups();
        // The drained pool's sandbox cgroups went with it: what is left is a leak of this test.
        let left = leaks::cgroup_dirs(&self.pool_cgroup());
        if !left.is_empty() {
            let below: Vec<String> = left
                .iter()
                .flat_map(|d| walk_dirs(d))
                .map(|d| d.display().to_string())
                .collect();
            problems.push(format!("sandbox cgroups left after drain: {below:?}"));
            for d in below.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
        leaks::unmount_under(&self.dir.path().to_string_lossy());
        if failing || !problems.is_empty() {
            eprintln!("{}", self.log_tail(120));
        }
        if !failing && !problems.is_empty() {
            panic!("{}", problems.join("\n"));
        }
    }
}
