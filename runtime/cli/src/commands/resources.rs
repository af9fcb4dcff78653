//! pause, resume, events, update.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libcgroups::common::{CgroupManager, ControllerOpt};
use libcontainer::container::ContainerStatus;
use libcontainer::oci_spec::runtime::{
    LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxPids, LinuxResources,
};
use serde_json::json;

use super::{cgroup_manager, load};
use crate::cli::{Events, Global, Update};

pub fn pause(g: &Global, id: &str) -> Result<()> {
    load(g, id)?
        .pause()
        .with_context(|| format!("pausing container {id}"))
}

pub fn resume(g: &Global, id: &str) -> Result<()> {
    load(g, id)?
        .resume()
        .with_context(|| format!("resuming container {id}"))
}

fn parse_interval(s: &str) -> Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid interval {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => bail!("invalid interval {s:?} (use e.g. 500ms, 5s, 1m)"),
    })
}

pub fn events(g: &Global, a: &Events) -> Result<()> {
    let interval = parse_interval(&a.interval)?;
    loop {
        let c = load(g, &a.id)?;
        if c.status() == ContainerStatus::Stopped {
            bail!("container {} is not running", a.id);
        }
        let stats = cgroup_manager(&c)?
            .stats()
            .context("reading cgroup statistics")?;
        let ev = json!({
            "type": "stats",
            "id": a.id,
            "data": crate::stats::to_runc(&stats),
        });
        println!("{ev}");
        if a.stats {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

fn read_resources(a: &Update) -> Result<LinuxResources> {
    let Some(path) = &a.resources else {
        return Ok(LinuxResources::default());
    };
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading resources from stdin")?;
    } else {
        text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    }
    serde_json::from_str(&text).context("parsing resources JSON")
}

pub fn update(g: &Global, a: &Update) -> Result<()> {
    let c = load(g, &a.id)?;
    if c.status() == ContainerStatus::Stopped {
        bail!("container {} is not running", a.id);
    }
    let mut r = read_resources(a)?;
    let mut mem = r.memory().unwrap_or_default();
    let mut mem_set = r.memory().is_some();
    for (v, set) in [
        (
            a.memory,
            LinuxMemory::set_limit as fn(&mut LinuxMemory, Option<i64>) -> &mut LinuxMemory,
        ),
        (a.memory_reservation, LinuxMemory::set_reservation),
        (a.memory_swap, LinuxMemory::set_swap),
    ] {
        if v.is_some() {
            set(&mut mem, v);
            mem_set = true;
        }
    }
    if mem_set {
        r.set_memory(Some(mem));
    }
    let mut cpu: LinuxCpu = r.cpu().clone().unwrap_or_default();
    let mut cpu_set = r.cpu().is_some();
    if a.cpu_period.is_some() {
        cpu.set_period(a.cpu_period);
        cpu_set = true;
    }
    if a.cpu_quota.is_some() {
        cpu.set_quota(a.cpu_quota);
        cpu_set = true;
    }
    if a.cpu_share.is_some() {
        cpu.set_shares(a.cpu_share);
        cpu_set = true;
    }
    if a.cpu_rt_period.is_some() {
        cpu.set_realtime_period(a.cpu_rt_period);
        cpu_set = true;
    }
    if a.cpu_rt_runtime.is_some() {
        cpu.set_realtime_runtime(a.cpu_rt_runtime);
        cpu_set = true;
    }
    if a.cpuset_cpus.is_some() {
        cpu.set_cpus(a.cpuset_cpus.clone());
        cpu_set = true;
    }
    if a.cpuset_mems.is_some() {
        cpu.set_mems(a.cpuset_mems.clone());
        cpu_set = true;
    }
    if cpu_set {
        r.set_cpu(Some(cpu));
    }
    if let Some(limit) = a.pids_limit {
        let mut p = LinuxPids::default();
        p.set_limit(limit);
        r.set_pids(Some(p));
    }
    if let Some(w) = a.blkio_weight {
        let mut b: LinuxBlockIo = r.block_io().clone().unwrap_or_default();
        b.set_weight(Some(w));
        r.set_block_io(Some(b));
    }
    cgroup_manager(&c)?
        .apply(&ControllerOpt {
            resources: &r,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .with_context(|| format!("updating resources of container {}", a.id))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("3").unwrap(), Duration::from_secs(3));
        assert!(parse_interval("x").is_err());
    }
}
