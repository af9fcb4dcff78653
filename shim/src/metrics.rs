//! cgroup statistics in the protobuf shapes `ctr task metrics` decodes
//! (`io.containerd.cgroups.v1.Metrics` on v1/hybrid hosts, `...v2.Metrics` on unified ones).

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::MessageDyn;
use libcgroups::stats::{MemoryData, Stats};

fn v1_entry(d: &MemoryData) -> v1::MemoryEntry {
    v1::MemoryEntry {
        limit: d.limit,
        usage: d.usage,
        max: d.max_usage,
        failcnt: d.fail_count,
        ..Default::default()
    }
}

fn v1_metrics(s: &Stats) -> v1::Metrics {
    let raw = |k: &str| s.memory.stats.get(k).copied().unwrap_or(0);
    let memory = v1::MemoryStat {
        cache: raw("cache"),
        rss: raw("rss"),
        rss_huge: raw("rss_huge"),
        mapped_file: raw("mapped_file"),
        dirty: raw("dirty"),
        writeback: raw("writeback"),
        pg_pg_in: raw("pgpgin"),
        pg_pg_out: raw("pgpgout"),
        pg_fault: raw("pgfault"),
        pg_maj_fault: raw("pgmajfault"),
        inactive_anon: raw("inactive_anon"),
        active_anon: raw("active_anon"),
        inactive_file: raw("inactive_file"),
        active_file: raw("active_file"),
        unevictable: raw("unevictable"),
        hierarchical_memory_limit: raw("hierarchical_memory_limit"),
        hierarchical_swap_limit: raw("hierarchical_memsw_limit"),
        total_cache: raw("total_cache"),
        total_rss: raw("total_rss"),
        total_mapped_file: raw("total_mapped_file"),
        total_pg_fault: raw("total_pgfault"),
        total_pg_maj_fault: raw("total_pgmajfault"),
        usage: Some(v1_entry(&s.memory.memory)).into(),
        swap: Some(v1_entry(&s.memory.memswap)).into(),
        kernel: Some(v1_entry(&s.memory.kernel)).into(),
        kernel_tcp: Some(v1_entry(&s.memory.kernel_tcp)).into(),
        ..Default::default()
    };
    v1::Metrics {
        pids: Some(v1::PidsStat {
            current: s.pids.current,
            limit: s.pids.limit,
            ..Default::default()
        })
        .into(),
        cpu: Some(v1::CPUStat {
            usage: Some(v1::CPUUsage {
                total: s.cpu.usage.usage_total,
                kernel: s.cpu.usage.usage_kernel,
                user: s.cpu.usage.usage_user,
                per_cpu: s.cpu.usage.per_core_usage_total.clone(),
                ..Default::default()
            })
            .into(),
            throttling: Some(v1::Throttle {
                periods: s.cpu.throttling.periods,
                throttled_periods: s.cpu.throttling.throttled_periods,
                throttled_time: s.cpu.throttling.throttled_time,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        memory: Some(memory).into(),
        ..Default::default()
    }
}

fn v2_metrics(s: &Stats) -> v2::Metrics {
    let raw = |k: &str| s.memory.stats.get(k).copied().unwrap_or(0);
    v2::Metrics {
        pids: Some(v2::PidsStat {
            current: s.pids.current,
            limit: s.pids.limit,
            ..Default::default()
        })
        .into(),
        cpu: Some(v2::CPUStat {
            // libcgroups reports nanoseconds; the v2 message counts microseconds.
            usage_usec: s.cpu.usage.usage_total / 1000,
            user_usec: s.cpu.usage.usage_user / 1000,
            system_usec: s.cpu.usage.usage_kernel / 1000,
            nr_periods: s.cpu.throttling.periods,
            nr_throttled: s.cpu.throttling.throttled_periods,
            throttled_usec: s.cpu.throttling.throttled_time / 1000,
            ..Default::default()
        })
        .into(),
        memory: Some(v2::MemoryStat {
            anon: raw("anon"),
            file: raw("file"),
            shmem: raw("shmem"),
            pgfault: raw("pgfault"),
            pgmajfault: raw("pgmajfault"),
            usage: s.memory.memory.usage,
            usage_limit: s.memory.memory.limit,
            max_usage: s.memory.memory.max_usage,
            swap_usage: s.memory.memswap.usage,
            swap_limit: s.memory.memswap.limit,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// The metrics message for this host's cgroup layout.
pub fn for_host(s: &Stats) -> Box<dyn MessageDyn> {
    match libcgroups::common::get_cgroup_setup() {
        Ok(libcgroups::common::CgroupSetup::Unified) => Box::new(v2_metrics(s)),
        _ => Box::new(v1_metrics(s)),
    }
}
