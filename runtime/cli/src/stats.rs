//! Container statistics in runc's `events` JSON shape (`types.Stats`), which tools that parse
//! `runc events --stats` expect.

use libcgroups::stats::{BlkioDeviceStat, Stats};
use serde_json::{json, Value};

fn memory_entry(d: &libcgroups::stats::MemoryData) -> Value {
    json!({ "usage": d.usage, "max": d.max_usage, "failcnt": d.fail_count, "limit": d.limit })
}

fn blkio_entries(list: &[BlkioDeviceStat]) -> Value {
    Value::Array(
        list.iter()
            .map(|e| {
                json!({
                    "major": e.major,
                    "minor": e.minor,
                    "op": e.op_type.clone().unwrap_or_default(),
                    "value": e.value,
                })
            })
            .collect(),
    )
}

/// Converts cgroup statistics into runc's `data` object of a `stats` event.
pub fn to_runc(stats: &Stats) -> Value {
    let hugetlb: serde_json::Map<String, Value> = stats
        .hugetlb
        .iter()
        .map(|(size, h)| {
            (
                size.clone(),
                json!({ "usage": h.usage, "max": h.max_usage, "failcnt": h.fail_count }),
            )
        })
        .collect();
    json!({
        "cpu": {
            "usage": {
                "total": stats.cpu.usage.usage_total,
                "percpu": stats.cpu.usage.per_core_usage_total,
                "percpu_kernel": stats.cpu.usage.per_core_usage_kernel,
                "percpu_user": stats.cpu.usage.per_core_usage_user,
                "kernel": stats.cpu.usage.usage_kernel,
                "user": stats.cpu.usage.usage_user,
            },
            "throttling": {
                "periods": stats.cpu.throttling.periods,
                "throttledPeriods": stats.cpu.throttling.throttled_periods,
                "throttledTime": stats.cpu.throttling.throttled_time,
            },
        },
        "memory": {
            "cache": stats.memory.cache,
            "usage": memory_entry(&stats.memory.memory),
            "swap": memory_entry(&stats.memory.memswap),
            "kernel": memory_entry(&stats.memory.kernel),
            "kernelTCP": memory_entry(&stats.memory.kernel_tcp),
            "raw": stats.memory.stats,
        },
        "pids": { "current": stats.pids.current, "limit": stats.pids.limit },
        "blkio": {
            "ioServiceBytesRecursive": blkio_entries(&stats.blkio.service_bytes),
            "ioServicedRecursive": blkio_entries(&stats.blkio.serviced),
            "ioQueueRecursive": blkio_entries(&stats.blkio.queued),
            "ioServiceTimeRecursive": blkio_entries(&stats.blkio.service_time),
            "ioWaitTimeRecursive": blkio_entries(&stats.blkio.wait_time),
            "ioMergedRecursive": blkio_entries(&stats.blkio.merged),
            "ioTimeRecursive": blkio_entries(&stats.blkio.time),
            "sectorsRecursive": blkio_entries(&stats.blkio.sectors),
        },
        "hugetlb": hugetlb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_field_names() {
        let mut s = Stats::default();
        s.memory.memory.usage = 42;
        s.pids.current = 3;
        let v = to_runc(&s);
        assert_eq!(v["memory"]["usage"]["usage"], 42);
        assert_eq!(v["pids"]["current"], 3);
        assert!(v["cpu"]["usage"]["percpu"].is_array());
    }
}
