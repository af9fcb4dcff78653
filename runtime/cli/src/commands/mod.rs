//! One function per runc command, over libcontainer and the trenv library.

mod containerd_config;
mod criu;
mod info;
mod lifecycle;
mod process;
mod resources;
mod sandbox;
mod template;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use libcontainer::container::Container;

use crate::cli::{Command, Global};

/// Runs one command; the value is the process exit code.
pub fn dispatch(g: &Global, cmd: Command) -> Result<u8> {
    match cmd {
        Command::Create(a) => lifecycle::create(g, &a).map(|_| 0),
        Command::Start(a) => lifecycle::start(g, &a.id).map(|_| 0),
        Command::Run(a) => lifecycle::run(g, &a),
        Command::State(a) => lifecycle::state(g, &a.id).map(|_| 0),
        Command::Kill(a) => lifecycle::kill(g, &a).map(|_| 0),
        Command::Delete(a) => lifecycle::delete(g, &a).map(|_| 0),
        Command::List(a) => lifecycle::list(g, &a).map(|_| 0),
        Command::Ps(a) => process::ps(g, &a).map(|_| 0),
        Command::Exec(a) => process::exec(g, &a),
        Command::Pause(a) => resources::pause(g, &a.id).map(|_| 0),
        Command::Resume(a) => resources::resume(g, &a.id).map(|_| 0),
        Command::Events(a) => resources::events(g, &a).map(|_| 0),
        Command::Update(a) => resources::update(g, &a).map(|_| 0),
        Command::Features => info::features().map(|_| 0),
        Command::Spec(a) => info::spec(g, &a).map(|_| 0),
        Command::Checkpoint(a) => criu::checkpoint(g, &a).map(|_| 0),
        Command::Restore(a) => criu::restore(g, &a),
        Command::Sandbox(c) => sandbox::run(c).map(|_| 0),
        Command::Template(c) => template::run(g, c).map(|_| 0),
        Command::InstallContainerdConfig(a) => containerd_config::install(&a).map(|_| 0),
    }
}

fn container_dir(g: &Global, id: &str) -> Result<PathBuf> {
    trenv_criu::restore::validate_id(id)?;
    Ok(g.root.join(id))
}

fn exists(g: &Global, id: &str) -> Result<bool> {
    Ok(container_dir(g, id)?.join("state.json").exists())
}

/// Loads a container with its status refreshed. The "does not exist" wording is the one
/// containerd's runc shim matches on.
fn load(g: &Global, id: &str) -> Result<Container> {
    if !exists(g, id)? {
        bail!("container {id} does not exist");
    }
    let dir = container_dir(g, id)?;
    // libcontainer rewrites state.json in place, so a concurrent reader can catch it empty
    // or half written; a short retry turns that window into a brief wait.
    let mut attempt = 0;
    let mut c = loop {
        match Container::load(dir.clone()) {
            Ok(c) => break c,
            Err(e) if attempt < 20 && dir.join("state.json").exists() => {
                tracing::debug!("state of {id} not readable yet: {e}");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e).with_context(|| format!("loading state of container {id}")),
        }
    };
    trenv_oci::lifecycle::refresh_status(&mut c)
        .with_context(|| format!("refreshing status of container {id}"))?;
    Ok(c)
}

fn cgroup_manager(c: &Container) -> Result<libcgroups::common::AnyCgroupManager> {
    let spec = c.spec().context("loading container config")?;
    libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: spec.cgroup_path,
        systemd_cgroup: c.systemd(),
        container_name: c.id().to_string(),
    })
    .context("opening container cgroup")
}

fn write_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn rootfs_of(bundle: &Path) -> PathBuf {
    trenv_oci::bundle::Bundle::load(bundle)
        .map(|b| b.rootfs)
        .unwrap_or_else(|_| bundle.join("rootfs"))
}
