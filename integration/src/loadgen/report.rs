//! What a run records and how it is summarised: raw samples, `summary.json` (schema in
//! `integration/bench/summary.schema.json`, documented in docs/benchmarks.md) and the tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Version of the summary.json layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// How an invocation got its instance.
pub mod path {
    /// An idle instance of the same function was reused.
    pub const WARM: &str = "warm";
    /// Restored from the function's memory template into a pooled sandbox.
    pub const TEMPLATE: &str = "template";
    /// Took over an instance restored ahead from the template (a spare).
    pub const SPARE: &str = "spare";
    /// Plain CRIU restore of the function's checkpoint.
    pub const CRIU: &str = "criu";
    /// Cold function start in a pooled sandbox that served another function before.
    pub const REPURPOSE: &str = "repurpose";
    /// Cold function start in a pooled sandbox (warm, never used or same function).
    pub const POOL: &str = "pool";
    /// Cold start with nothing pre-made (runc, or a pool miss).
    pub const COLD: &str = "cold";
    /// A template restore failed and the shim started the function cold.
    pub const FALLBACK: &str = "fallback";
    /// No instance was had (the start failed).
    pub const NONE: &str = "none";
}

/// Times of the consecutive parts of a start, in ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Phases {
    /// Network namespace and CNI, made by the controller (runc mode only).
    pub network_ms: f64,
    /// Snapshot prepare and the container record.
    pub container_ms: f64,
    /// containerd's CreateTask (shim start, runtime create or restore).
    pub task_create_ms: f64,
    /// containerd's StartTask.
    pub task_start_ms: f64,
    /// From StartTask's return until the function answers its health check.
    pub ready_ms: f64,
}

/// One invocation, as written to `invocations.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Invocation {
    pub mode: String,
    pub workload: String,
    pub function: String,
    pub seq: u64,
    /// Scheduled arrival, ms from the start of the run.
    pub arrival_ms: f64,
    /// How late the controller sent it (scheduling and admission), ms.
    pub queued_ms: f64,
    pub path: String,
    /// Time to obtain an instance (0 for a warm reuse), ms.
    pub start_ms: f64,
    /// The request itself on the instance, ms.
    pub exec_ms: f64,
    /// Arrival to answer, ms.
    pub e2e_ms: f64,
    /// The answer was received and matched the manifest.
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    pub instance: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub phases: Option<Phases>,
}

/// One per-second sample of the node, as written to `memory.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemorySample {
    pub mode: String,
    pub workload: String,
    pub t_s: f64,
    /// Instances alive (running, idle or starting), spares included.
    pub instances: u64,
    /// Σ PSS of every process under the run's cgroup parent, plus the memory pool's
    /// used bytes (template memory): the node's memory for the functions, MiB.
    pub node_mib: f64,
    /// memory usage of the run's parent cgroup (includes page cache), MiB.
    pub cgroup_mib: f64,
    /// Of `node_mib`, the template memory pool, MiB.
    pub pool_mib: f64,
}

/// Percentiles of a set of samples, ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Dist {
    pub n: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub mean: f64,
    pub max: f64,
}

impl Dist {
    /// Nearest-rank percentiles.
    pub fn of(samples: &[f64]) -> Self {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return Self::default();
        }
        s.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            // ceil(q·n) is in 1..=n for q in (0, 1]: the conversion is exact.
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let r = (q * s.len() as f64).ceil() as usize;
            s[r.clamp(1, s.len()) - 1]
        };
        #[allow(clippy::cast_precision_loss)]
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        Self {
            n: u64::try_from(s.len()).unwrap_or(u64::MAX),
            p50: round2(rank(0.50)),
            p99: round2(rank(0.99)),
            p999: round2(rank(0.999)),
            mean: round2(mean),
            max: round2(s[s.len() - 1]),
        }
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemorySummary {
    pub peak_mib: f64,
    pub mean_mib: f64,
    pub peak_cgroup_mib: f64,
    pub peak_instances: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FunctionSummary {
    pub requests: u64,
    pub errors: u64,
    pub start_ms: Dist,
    pub exec_ms: Dist,
    pub e2e_ms: Dist,
}

/// One mode × workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    pub mode: String,
    pub workload: String,
    pub workload_description: String,
    pub functions: Vec<String>,
    pub duration_s: f64,
    /// Time spent preparing the mode before the measured run (checkpoints, templates), s.
    pub setup_s: f64,
    /// How long the controller kept idle instances of this mode, s.
    pub keep_alive_s: f64,
    pub requests: u64,
    /// Invocations without a correct answer (failed start, failed request, wrong answer).
    pub errors: u64,
    pub wrong_answers: u64,
    /// Invocations per path taken (see [`path`]).
    pub paths: BTreeMap<String, u64>,
    pub start_ms: Dist,
    pub e2e_ms: Dist,
    pub exec_ms: Dist,
    /// Mean of each start phase over the starts that made an instance (not warm), ms.
    pub start_phases_ms: BTreeMap<String, f64>,
    pub memory: MemorySummary,
    pub per_function: BTreeMap<String, FunctionSummary>,
    /// What this mode could not do and fell back to (e.g. no spare, template fallback).
    pub notes: Vec<String>,
    /// The first few distinct errors, for the report.
    pub error_samples: Vec<String>,
}

/// A goal of the benchmark, checked on one workload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Goal {
    pub workload: String,
    pub what: String,
    pub target: f64,
    pub measured: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub schema: u32,
    pub generated: String,
    pub command: String,
    pub host: BTreeMap<String, String>,
    pub runs: Vec<RunSummary>,
    pub goals: Vec<Goal>,
}

impl RunSummary {
    pub fn from_samples(
        invocations: &[Invocation],
        memory: &[MemorySample],
        base: RunSummary,
    ) -> RunSummary {
        let mut s = base;
        s.requests = u64::try_from(invocations.len()).unwrap_or(u64::MAX);
        s.errors = invocations.iter().filter(|i| !i.ok).count() as u64;
        s.wrong_answers = invocations
            .iter()
            .filter(|i| {
                i.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("wrong answer"))
            })
            .count() as u64;
        for i in invocations {
            *s.paths.entry(i.path.clone()).or_default() += 1;
        }
        let ok: Vec<&Invocation> = invocations.iter().filter(|i| i.ok).collect();
        s.start_ms = Dist::of(&ok.iter().map(|i| i.start_ms).collect::<Vec<_>>());
        s.e2e_ms = Dist::of(&ok.iter().map(|i| i.e2e_ms).collect::<Vec<_>>());
        s.exec_ms = Dist::of(&ok.iter().map(|i| i.exec_ms).collect::<Vec<_>>());
        let starts: Vec<&Phases> = ok.iter().filter_map(|i| i.phases.as_ref()).collect();
        if !starts.is_empty() {
            #[allow(clippy::cast_precision_loss)]
            let n = starts.len() as f64;
            let mean = |f: fn(&Phases) -> f64| round2(starts.iter().map(|p| f(p)).sum::<f64>() / n);
            s.start_phases_ms = BTreeMap::from([
                ("network".to_string(), mean(|p| p.network_ms)),
                ("container".to_string(), mean(|p| p.container_ms)),
                ("task_create".to_string(), mean(|p| p.task_create_ms)),
                ("task_start".to_string(), mean(|p| p.task_start_ms)),
                ("ready".to_string(), mean(|p| p.ready_ms)),
            ]);
        }
        for f in &s.functions.clone() {
            let mine: Vec<&Invocation> = invocations.iter().filter(|i| &i.function == f).collect();
            let of = |field: fn(&Invocation) -> f64| {
                Dist::of(
                    &mine
                        .iter()
                        .filter(|i| i.ok)
                        .map(|i| field(i))
                        .collect::<Vec<_>>(),
                )
            };
            s.per_function.insert(
                f.clone(),
                FunctionSummary {
                    requests: mine.len() as u64,
                    errors: mine.iter().filter(|i| !i.ok).count() as u64,
                    start_ms: of(|i| i.start_ms),
                    exec_ms: of(|i| i.exec_ms),
                    e2e_ms: of(|i| i.e2e_ms),
                },
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for e in invocations.iter().filter_map(|i| i.error.as_ref()) {
            if seen.len() >= 5 {
                break;
            }
            seen.insert(e.clone());
        }
        s.error_samples = seen.into_iter().collect();
        if !memory.is_empty() {
            #[allow(clippy::cast_precision_loss)]
            let n = memory.len() as f64;
            s.memory = MemorySummary {
                peak_mib: round2(memory.iter().map(|m| m.node_mib).fold(0.0, f64::max)),
                mean_mib: round2(memory.iter().map(|m| m.node_mib).sum::<f64>() / n),
                peak_cgroup_mib: round2(memory.iter().map(|m| m.cgroup_mib).fold(0.0, f64::max)),
                peak_instances: memory.iter().map(|m| m.instances).max().unwrap_or(0),
            };
        }
        s
    }
}

/// The goals of the benchmark on each workload where trenv and a baseline both ran.
pub fn goals(runs: &[RunSummary]) -> Vec<Goal> {
    let mut out = Vec::new();
    let find = |mode: &str, w: &str| runs.iter().find(|r| r.mode == mode && r.workload == w);
    let mut workloads: Vec<&str> = runs.iter().map(|r| r.workload.as_str()).collect();
    workloads.dedup();
    for w in workloads {
        let Some(t) = find("trenv", w) else { continue };
        if t.e2e_ms.n == 0 {
            continue;
        }
        for (base, target) in [("runc", 5.0), ("criu", 3.0)] {
            if let Some(b) = find(base, w).filter(|b| b.e2e_ms.n > 0) {
                let ratio = round2(b.e2e_ms.p99 / t.e2e_ms.p99.max(0.01));
                out.push(Goal {
                    workload: w.to_string(),
                    what: format!("P99 end-to-end, {base} ÷ trenv"),
                    target,
                    measured: ratio,
                    met: ratio >= target,
                });
            }
        }
        if let Some(b) = find("runc", w).filter(|b| b.memory.peak_mib > 0.0) {
            let saved = round2(100.0 * (1.0 - t.memory.peak_mib / b.memory.peak_mib));
            out.push(Goal {
                workload: w.to_string(),
                what: "peak node memory saved vs runc keep-alive (%), at equal or better P99"
                    .to_string(),
                target: 40.0,
                measured: saved,
                met: saved >= 40.0 && t.e2e_ms.p99 <= b.e2e_ms.p99,
            });
        }
    }
    out
}

fn ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// The side-by-side table (Markdown; readable as plain text too).
pub fn table(runs: &[RunSummary]) -> String {
    let mut t = String::from(
        "| workload | mode | keep-alive s | requests | errors | start P50 / P99 ms | e2e P50 / P99 / P99.9 ms | peak / mean memory MiB | peak instances | paths |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for r in runs {
        let paths: Vec<String> = r.paths.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} / {} | {:.0} / {:.0} | {} | {} |",
            r.workload,
            r.mode,
            r.keep_alive_s,
            r.requests,
            r.errors,
            ms(r.start_ms.p50),
            ms(r.start_ms.p99),
            ms(r.e2e_ms.p50),
            ms(r.e2e_ms.p99),
            ms(r.e2e_ms.p999),
            r.memory.peak_mib,
            r.memory.mean_mib,
            r.memory.peak_instances,
            paths.join(", ")
        );
    }
    t
}

/// Per workload and function: P99 end-to-end in every mode, trenv's ratios against the
/// baselines, and the function's own run time (P50 under trenv), which bounds what a faster
/// start can win.
pub fn function_table(runs: &[RunSummary]) -> String {
    const MODES: [&str; 4] = ["runc", "criu", "trenv-pool", "trenv"];
    let mut t = String::from(
        "| workload | function | e2e P99 ms: runc / criu / trenv-pool / trenv | runc ÷ trenv | criu ÷ trenv | trenv start P99 ms | trenv run P50 ms |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut workloads: Vec<&str> = runs.iter().map(|r| r.workload.as_str()).collect();
    workloads.dedup();
    for w in workloads {
        let of = |mode: &str, f: &str| {
            runs.iter()
                .find(|r| r.mode == mode && r.workload == w)
                .and_then(|r| r.per_function.get(f))
                .filter(|s| s.e2e_ms.n > 0)
        };
        let Some(functions) = runs.iter().find(|r| r.workload == w).map(|r| &r.functions) else {
            continue;
        };
        for f in functions {
            // A workload may not reach every function (W2 with fewer cycles than functions).
            if MODES.iter().all(|m| of(m, f).is_none()) {
                continue;
            }
            let p99: Vec<String> = MODES
                .iter()
                .map(|m| of(m, f).map_or_else(|| "—".to_string(), |s| ms(s.e2e_ms.p99)))
                .collect();
            let ratio = |base: &str| match (of(base, f), of("trenv", f)) {
                (Some(b), Some(t)) => format!("{:.2}", b.e2e_ms.p99 / t.e2e_ms.p99.max(0.01)),
                _ => "—".to_string(),
            };
            let trenv = of("trenv", f);
            let _ = writeln!(
                t,
                "| {w} | {f} | {} | {} | {} | {} | {} |",
                p99.join(" / "),
                ratio("runc"),
                ratio("criu"),
                trenv.map_or_else(|| "—".to_string(), |s| ms(s.start_ms.p99)),
                trenv.map_or_else(|| "—".to_string(), |s| ms(s.exec_ms.p50)),
            );
        }
    }
    t
}

pub fn goals_table(goals: &[Goal]) -> String {
    let mut t = String::from(
        "| workload | goal | target | measured | met |\n| --- | --- | ---: | ---: | --- |\n",
    );
    for g in goals {
        let _ = writeln!(
            t,
            "| {} | {} | ≥ {} | {} | {} |",
            g.workload,
            g.what,
            g.target,
            g.measured,
            if g.met { "yes" } else { "**no**" }
        );
    }
    t
}

#[cfg(test)]
// Test arithmetic on small, known values.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<f64> = (1..=1000).map(f64::from).collect();
        let d = Dist::of(&xs);
        assert_eq!((d.p50, d.p99, d.p999, d.max), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(Dist::of(&[]), Dist::default());
        assert_eq!(Dist::of(&[3.0]).p99, 3.0);
    }

    fn run(mode: &str, p99: f64, peak: f64) -> RunSummary {
        RunSummary {
            mode: mode.into(),
            workload: "w1".into(),
            e2e_ms: Dist {
                n: 10,
                p99,
                ..Dist::default()
            },
            memory: MemorySummary {
                peak_mib: peak,
                ..MemorySummary::default()
            },
            ..RunSummary::default()
        }
    }

    #[test]
    fn goals_compare_trenv_with_each_baseline() {
        let g = goals(&[
            run("runc", 1000.0, 1000.0),
            run("criu", 200.0, 900.0),
            run("trenv", 100.0, 500.0),
        ]);
        assert_eq!(g.len(), 3);
        assert!(g[0].met && (g[0].measured - 10.0).abs() < 1e-9);
        assert!(!g[1].met && (g[1].measured - 2.0).abs() < 1e-9);
        assert!(g[2].met && (g[2].measured - 50.0).abs() < 1e-9);
    }
}
