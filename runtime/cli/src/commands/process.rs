//! exec, ps, and waiting for a foreground process.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use libcgroups::common::CgroupManager;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use super::{cgroup_manager, container_dir, load, write_json};
use crate::cli::{Exec, Global, Ps};

pub fn become_subreaper() -> Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("becoming child subreaper");
    }
    Ok(())
}

/// Waits for `pid`, forwarding the signals a terminal or supervisor would send us, and
/// returns its exit code the way a shell reports it (128+N when killed by signal N).
pub fn wait_foreground(pid: Pid) -> Result<u8> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;
    std::thread::spawn(move || loop {
        if let Ok(sig) = set.wait() {
            let _ = kill(pid, sig);
        }
    });
    loop {
        match waitpid(pid, None) {
            // An exit status is the low 8 bits of what the process passed to exit.
            Ok(WaitStatus::Exited(_, code)) => return Ok(code.to_le_bytes()[0]),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Ok(128u8.wrapping_add((sig as i32).to_le_bytes()[0]))
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).with_context(|| format!("waiting for pid {pid}")),
        }
    }
}

pub fn ps(g: &Global, a: &Ps) -> Result<()> {
    let c = load(g, &a.id)?;
    let pids: Vec<i32> = cgroup_manager(&c)?
        .get_all_pids()
        .context("listing container processes")?
        .into_iter()
        .map(|p| p.as_raw())
        .collect();
    match a.format.as_str() {
        "json" => write_json(&pids),
        "table" => {
            let args = if a.ps_args.is_empty() {
                vec!["-ef".to_string()]
            } else {
                a.ps_args.clone()
            };
            let out = std::process::Command::new("ps")
                .args(&args)
                .output()
                .context("running ps")?;
            if !out.status.success() {
                bail!(
                    "ps {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            let col = header
                .split_whitespace()
                .position(|h| h == "PID")
                .context("ps output has no PID column")?;
            println!("{header}");
            for l in lines {
                let pid = l.split_whitespace().nth(col).and_then(|p| p.parse().ok());
                if pid.is_some_and(|p: i32| pids.contains(&p)) {
                    println!("{l}");
                }
            }
            Ok(())
        }
        other => bail!("invalid format {other:?} (table or json)"),
    }
}

fn parse_user(s: &str) -> Result<(u32, Option<u32>)> {
    let (u, gid) = match s.split_once(':') {
        Some((u, gid)) => (
            u,
            Some(
                gid.parse()
                    .with_context(|| format!("invalid gid in {s:?}"))?,
            ),
        ),
        None => (s, None),
    };
    Ok((
        u.parse().with_context(|| format!("invalid uid in {s:?}"))?,
        gid,
    ))
}

/// `exec -t` without `--process`: libcontainer takes the terminal flag only from a process
/// file, so write one derived from the container's own process.
fn tty_process_file(g: &Global, a: &Exec, env: &HashMap<String, String>) -> Result<PathBuf> {
    let c = load(g, &a.id)?;
    let b = trenv_oci::bundle::Bundle::load(c.bundle())?;
    let mut p = b.spec.process().clone().unwrap_or_default();
    p.set_args(Some(a.command.clone()));
    p.set_terminal(Some(true));
    let mut vars = p.env().clone().unwrap_or_default();
    vars.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    p.set_env(Some(vars));
    if let Some(cwd) = &a.cwd {
        p.set_cwd(cwd.clone());
    }
    let path = container_dir(g, &a.id)?.join(format!("exec-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec(&p)?).with_context(|| format!("writing {path:?}"))?;
    Ok(path)
}

pub fn exec(g: &Global, a: &Exec) -> Result<u8> {
    if a.process.is_none() && a.command.is_empty() {
        bail!("exec needs a command or --process");
    }
    let mut env = HashMap::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("invalid --env {kv:?}: expected KEY=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    let (uid, gid) = match &a.user {
        Some(u) => {
            let (uid, gid) = parse_user(u)?;
            (Some(uid), gid)
        }
        None => (None, None),
    };
    let generated = if a.tty && a.process.is_none() {
        Some(tty_process_file(g, a, &env)?)
    } else {
        None
    };
    let process = a.process.clone().or_else(|| generated.clone());
    let res = ContainerBuilder::new(a.id.clone(), SyscallType::default())
        .with_executor(trenv_oci::executor::Executor::new())
        .with_root_path(&g.root)?
        .with_console_socket(a.console_socket.as_ref())
        .with_pid_file(a.pid_file.as_ref())?
        .with_preserved_fds(a.preserve_fds)
        .validate_id()?
        .as_tenant()
        .with_detach(a.detach)
        .with_cwd(a.cwd.as_ref())
        .with_env(env)
        .with_process(process.as_ref())
        .with_no_new_privs(a.no_new_privs)
        .with_container_args(a.command.clone())
        .with_capabilities(a.cap.clone())
        .with_additional_gids(a.additional_gids.clone())
        .with_user(uid)
        .with_group(gid)
        .with_ignore_paused(a.ignore_paused)
        .with_sub_cgroup(a.cgroup.clone())
        .with_process_label(a.process_label.clone())
        .with_apparmor(a.apparmor.clone())
        .build();
    if let Some(p) = generated {
        let _ = std::fs::remove_file(p);
    }
    let pid = res.with_context(|| format!("exec in container {}", a.id))?;
    if a.detach {
        return Ok(0);
    }
    wait_foreground(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert_eq!(parse_user("0").unwrap(), (0, None));
        assert_eq!(parse_user("1000:100").unwrap(), (1000, Some(100)));
        assert!(parse_user("root").is_err());
    }
}
