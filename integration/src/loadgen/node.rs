//! A private containerd for one benchmark mode, with the trenv shim configured for it, and
//! its clean shutdown (the pool drained, cgroups and mounts gone).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Node {
    pub dir: PathBuf,
    pub namespace: String,
    pub cgroup_parent: String,
    child: Option<Child>,
    trenv: PathBuf,
    /// The trenv pool is on: its shim outlives containerd until drained.
    pool: bool,
}

/// How the shim is configured for a mode.
pub struct ShimSetup {
    pub pool: bool,
    pub spares: usize,
    pub min_idle: usize,
    pub max_idle: usize,
}

impl Node {
    /// Starts containerd in `dir` (created), with the shim binaries of `bin_dir` first on
    /// its PATH.
    pub fn start(
        dir: &Path,
        namespace: &str,
        cgroup_parent: &str,
        bin_dir: &Path,
        shim: &ShimSetup,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let d = dir.display();
        // TRENV_BENCH_DEBUG=1: containerd and the shims log at debug level (shim logs go to
        // containerd's log), and the directory is kept.
        let level = if debug() { "debug" } else { "info" };
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [debug]\n  level = \"{level}\"\n"
            ),
        )?;
        let pool = if shim.pool {
            format!(
                "min_idle = {}\nmax_idle = {}\n",
                shim.min_idle, shim.max_idle
            )
        } else {
            "enabled = false\n".to_string()
        };
        std::fs::write(
            dir.join("shim.toml"),
            format!(
                "[pool]\nstate_dir = \"{d}/pool\"\ncgroup_parent = \"{cgroup_parent}\"\n{pool}\
                 [templates]\nstore = \"{d}/templates\"\npool_dir = \"{d}/mempool\"\npool_name = \"bench\"\n\
                 pool_capacity_mib = 8192\nspares = {}\n",
                shim.spares
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("TRENV_SHIM_CONFIG", dir.join("shim.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd (is it installed? `make setup`)")?;
        let node = Self {
            dir: dir.to_path_buf(),
            namespace: namespace.to_string(),
            cgroup_parent: cgroup_parent.to_string(),
            child: Some(child),
            trenv: bin_dir.join("trenv"),
            pool: shim.pool,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.socket().exists()
            || !node
                .ctr(&["version"])
                .map(|o| o.status.success())
                .unwrap_or(false)
        {
            if Instant::now() > deadline {
                bail!(
                    "containerd did not come up; its log: {}",
                    node.dir.join("containerd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(node)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn pool_dir(&self) -> PathBuf {
        self.dir.join("pool").join(&self.namespace)
    }

    pub fn mempool_dir(&self) -> PathBuf {
        self.dir.join("mempool")
    }

    fn ctr(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .output()
    }

    /// Imports an OCI archive (setup, not part of any measurement).
    pub fn import(&self, tar: &Path) -> Result<()> {
        let out = self
            .ctr(&["images", "import", &tar.to_string_lossy()])
            .context("running ctr images import")?;
        if !out.status.success() {
            bail!(
                "importing {}: {}",
                tar.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Drains the pool (its shim then exits), stops containerd, and removes what is left of
    /// the run: the parent cgroups, mounts under the directory, the directory.
    pub fn stop(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        if self.child.is_some() && self.pool {
            let out = Command::new(&self.trenv)
                .args([
                    "sandbox",
                    "drain",
                    "--namespace",
                    &self.namespace,
                    "--pool-root",
                ])
                .arg(self.dir.join("pool"))
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => problems.push(format!(
                    "drain: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("drain: {e}")),
            }
            // The pool's shim exits once drained.
            let sock = self.socket().to_string_lossy().into_owned();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !crate::leaks::processes_with(&sock).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            for pid in crate::leaks::processes_with(&sock) {
                problems.push(format!("shim {pid} still running after the drain; killed"));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(mut c) = self.child.take() {
            let pid = i32::try_from(c.id()).unwrap_or(0);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        crate::leaks::unmount_under(&self.dir.to_string_lossy());
        remove_cgroup_tree(&self.cgroup_parent);
        let left = crate::leaks::cgroup_dirs(&self.cgroup_parent);
        if !left.is_empty() {
            problems.push(format!("cgroups left: {left:?}"));
        }
        if debug() {
            eprintln!(
                "trenv-bench: TRENV_BENCH_DEBUG: kept {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "stopping the benchmark's containerd: {}",
                problems.join("; ")
            )
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Removes empty cgroup directories under `parent` in every hierarchy, deepest first.
pub fn remove_cgroup_tree(parent: &str) {
    fn walk(d: &Path) {
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(d);
    }
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    if let Ok(hs) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hs.flatten() {
            walk(&h.path().join(rel));
        }
    }
    walk(&Path::new("/sys/fs/cgroup").join(rel));
}

fn debug() -> bool {
    std::env::var_os("TRENV_BENCH_DEBUG").is_some_and(|v| v == "1")
}
