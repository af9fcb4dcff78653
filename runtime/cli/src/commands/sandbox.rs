//! `trenv sandbox ls|inspect|drain`: the operator's view of a shim's sandbox pool.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use trenv_sandbox::{cni::Network, unix_now, Sandbox, Store};

use crate::cli::{PoolArgs, SandboxCommand};

pub fn run(cmd: SandboxCommand) -> Result<()> {
    match cmd {
        SandboxCommand::Ls { pool, format } => ls(&pool, &format),
        SandboxCommand::Inspect { pool, id } => inspect(&pool, &id),
        SandboxCommand::Drain { pool } => drain(&pool),
    }
}

fn store(p: &PoolArgs) -> Store {
    Store::new(&p.pool_root, &p.namespace)
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn ls(p: &PoolArgs, format: &str) -> Result<()> {
    let (sandboxes, bad) = store(p).list();
    for e in &bad {
        eprintln!("trenv: {e}");
    }
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(&sandboxes)?),
        "table" => {
            let now = unix_now();
            println!(
                "{:<16} {:<8} {:<15} {:>6} {:>6} {:>7} {:<24} FUNCTION",
                "ID", "STATE", "IP", "AGE", "IDLE", "SERVED", "CONTAINER"
            );
            for s in &sandboxes {
                let alive = if s.holder.alive() {
                    ""
                } else {
                    " (holder gone)"
                };
                println!(
                    "{:<16} {:<8} {:<15} {:>6} {:>6} {:>7} {:<24} {}{alive}",
                    s.id,
                    s.state.to_string(),
                    s.attachment.ip,
                    age(now.saturating_sub(s.created)),
                    age(now.saturating_sub(s.last_used)),
                    s.served,
                    s.container.as_deref().unwrap_or("-"),
                    s.function.as_deref().unwrap_or("-"),
                );
            }
        }
        other => bail!("unknown format {other:?}: use table or json"),
    }
    Ok(())
}

fn inspect(p: &PoolArgs, id: &str) -> Result<()> {
    if id.contains('/') || id.starts_with('.') {
        bail!("invalid sandbox id {id:?}");
    }
    let sb = store(p)
        .load(id)
        .with_context(|| format!("no sandbox {id} in namespace {}", p.namespace))?;
    let mut v = serde_json::to_value(&sb)?;
    v["holder_alive"] = serde_json::Value::Bool(sb.holder.alive());
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Asks the running shim to drain its pool; with no shim running, destroys what its
/// records list directly (what a crashed shim left).
fn drain(p: &PoolArgs) -> Result<()> {
    let st = store(p);
    let sock = st.dir.join("control.sock");
    match UnixStream::connect(&sock) {
        Ok(mut conn) => {
            conn.set_read_timeout(Some(Duration::from_secs(120)))?;
            conn.write_all(b"drain\n")?;
            let mut line = String::new();
            BufReader::new(&conn)
                .read_line(&mut line)
                .context("reading the shim's answer")?;
            let v: serde_json::Value =
                serde_json::from_str(line.trim()).context("the shim's answer")?;
            if let Some(e) = v["error"].as_str() {
                bail!("shim: {e}");
            }
            println!(
                "drained {} idle sandboxes; sandboxes in use go when their containers end",
                v["destroyed"]
            );
            Ok(())
        }
        Err(_) => drain_offline(&st),
    }
}

fn drain_offline(st: &Store) -> Result<()> {
    if !st.dir.exists() {
        println!("no shim running and no sandboxes recorded");
        return Ok(());
    }
    // A shim that owns the pool but does not answer on its control socket (starting up,
    // or wedged) must not have its sandboxes destroyed under it.
    let _owner = st
        .lock_owner(Duration::from_secs(2))
        .context("no shim answers on the pool's control socket, but one owns the pool")?;
    let (sandboxes, bad) = st.list();
    for e in &bad {
        eprintln!("trenv: {e}");
    }
    if sandboxes.is_empty() {
        println!("no shim running and no sandboxes recorded");
        return Ok(());
    }
    let path = st.dir.join("network.json");
    let network: Network = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let mut failed = 0;
    for sb in &sandboxes {
        if let Err(e) = destroy(sb, &network) {
            eprintln!("trenv: sandbox {}: {e:#}", sb.id);
            failed += 1;
        }
        st.remove(&sb.id);
        // The pool's parent cgroups (`<parent>/<namespace>`), once empty.
        if let Some((parent, _)) = sb.cgroup.rsplit_once('/') {
            trenv_sandbox::cgroup::remove_parents(parent, 2);
        }
    }
    trenv_sandbox::cgroup_view::remove_all(&st.views());
    println!(
        "no shim running; destroyed {} sandboxes",
        sandboxes.len() - failed
    );
    if failed > 0 {
        bail!("{failed} sandboxes were not torn down cleanly");
    }
    Ok(())
}

fn destroy(sb: &Sandbox, network: &Network) -> Result<()> {
    sb.destroy(network)?;
    Ok(())
}
