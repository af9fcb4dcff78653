//! `trenv-bench`: replays FaaS workloads (W1, W2, an Azure-like trace, one call per function)
//! against containerd in four modes — runc, plain CRIU restore, trenv's sandbox pool, trenv
//! with memory templates — as a small FaaS controller, and reports latency and memory.
//!
//! Each mode gets a private containerd (and trenv shim configuration) of its own, so one
//! mode's warm state never helps another. Output: `<out>/invocations.jsonl`,
//! `<out>/memory.jsonl`, `<out>/summary.json`, plots in `<out>/plots/`, and with `--docs`
//! the benchmark section of docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use trenv_integration::loadgen::client::Client;
use trenv_integration::loadgen::cni::Cni;
use trenv_integration::loadgen::controller::{Controller, FunctionState, Mode, Options};
use trenv_integration::loadgen::manifest::Manifest;
use trenv_integration::loadgen::node::{Node, ShimSetup};
use trenv_integration::loadgen::plot;
use trenv_integration::loadgen::report::{self, Invocation, MemorySample, RunSummary, Summary};
use trenv_integration::loadgen::trace::{Spread, Workload};

#[derive(Parser, Debug)]
#[command(
    name = "trenv-bench",
    version,
    about = "FaaS load generator: trenv vs runc vs CRIU through containerd"
)]
struct Args {
    /// The function manifest.
    #[arg(long, default_value = "examples/functions/functions.toml")]
    manifest: PathBuf,
    /// OCI archives to import into each mode's containerd (the function images).
    #[arg(
        long = "images",
        value_delimiter = ',',
        default_value = "/var/cache/trenv/images/functions/functions-oci.tar"
    )]
    images: Vec<PathBuf>,
    /// Functions to use (default: all in the manifest).
    #[arg(long, value_delimiter = ',')]
    functions: Vec<String>,
    /// Modes: runc, criu, trenv-pool, trenv.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "runc,criu,trenv-pool,trenv"
    )]
    modes: Vec<String>,
    /// Workloads: func, w1, w2, azure.
    #[arg(long, value_delimiter = ',', default_value = "w1")]
    workloads: Vec<String>,
    /// Length of each workload (its arrivals span about this long).
    #[arg(long, default_value_t = 60.0)]
    duration_secs: f64,
    /// At most this many requests per workload (the trace is cut).
    #[arg(long, default_value_t = 2000)]
    max_requests: usize,
    /// Seed of the traces.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Burst size of W1 (mean) and W2 (exact).
    #[arg(long)]
    concurrency: Option<u32>,
    /// Cycles of W1 and W2.
    #[arg(long)]
    cycles: Option<u32>,
    /// Azure-like trace: mean invocations per trace minute.
    #[arg(long, default_value_t = 60.0)]
    azure_rate: f64,
    /// Azure-like trace: minutes (each lasts duration / minutes).
    #[arg(long, default_value_t = 10)]
    azure_minutes: u32,
    /// Azure-like trace: spread a minute's calls evenly instead of as a Poisson process.
    #[arg(long)]
    azure_even: bool,
    /// Rounds of the `func` workload.
    #[arg(long, default_value_t = 1)]
    func_rounds: u32,
    /// Idle instances are removed after this long (runc, criu and trenv-pool: modes whose
    /// starts cost a cold start or a full restore).
    #[arg(long, default_value_t = 30.0)]
    keep_alive_secs: f64,
    /// Keep-alive of the `trenv` mode, whose starts are template restores: what keep-alive
    /// buys (not paying a start) is worth less there, and idle instances are memory.
    #[arg(long, default_value_t = 5.0)]
    template_keep_alive_secs: f64,
    /// Node memory bound: Σ declared memory limits of live instances, MiB.
    #[arg(long, default_value_t = 6144)]
    node_memory_mib: u64,
    #[arg(long, default_value_t = 30.0)]
    request_timeout_secs: f64,
    #[arg(long, default_value_t = 30.0)]
    start_timeout_secs: f64,
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Instance starts under way at once, in every mode (0: no bound; default: twice the
    /// CPUs). Requests beyond it wait for a start to finish or an instance to come free.
    #[arg(long)]
    max_starts: Option<u64>,
    /// Spare instances per template (trenv mode). Off by default: restoring and prefaulting
    /// a replacement after every start takes CPU from the functions, which costs more than
    /// it saves when the node's cores are busy (docs/benchmarks.md).
    #[arg(long, default_value_t = 0)]
    spares: usize,
    /// Idle sandboxes the pool keeps (trenv modes and criu).
    #[arg(long, default_value_t = 8)]
    pool_min_idle: usize,
    #[arg(long, default_value_t = 32)]
    pool_max_idle: usize,
    /// Where results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Also regenerate the benchmark section of this Markdown file (and copy the plots next
    /// to it, under img/loadgen/).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Exit non-zero if any invocation failed.
    #[arg(long)]
    fail_on_errors: bool,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

const NAMESPACE: &str = "trenv-bench";

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trenv-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn workload(name: &str, a: &Args) -> Result<Workload> {
    let d = Duration::from_secs_f64(a.duration_secs.max(1.0));
    let mut w = Workload::named(name, d)?;
    match &mut w {
        Workload::W1 {
            period,
            cycles,
            concurrency,
        }
        | Workload::W2 {
            period,
            cycles,
            concurrency,
        } => {
            if let Some(c) = a.cycles {
                *cycles = c.max(1);
                *period = (d / *cycles).max(Duration::from_secs(1));
            }
            if let Some(c) = a.concurrency {
                *concurrency = c;
            }
        }
        Workload::Azure(spec) => {
            spec.mean_per_minute = a.azure_rate;
            spec.minutes = a.azure_minutes.max(1);
            spec.minute = (d / spec.minutes).max(Duration::from_millis(100));
            spec.day_minutes = spec.minutes * 2;
            if a.azure_even {
                spec.spread = Spread::Even;
            }
        }
        Workload::Func { repeat, .. } => *repeat = a.func_rounds.max(1),
    }
    Ok(w)
}

fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating trenv-bench")?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for b in ["trenv", "containerd-shim-trenv-v2"] {
        if !dir.join(b).exists() {
            bail!(
                "{} missing next to trenv-bench (run `make build`)",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}

fn base_spec(bin: &Path) -> Result<serde_json::Value> {
    let d = tempfile::tempdir()?;
    let out = Command::new(bin.join("trenv"))
        .args(["spec", "--bundle"])
        .arg(d.path())
        .output()?;
    if !out.status.success() {
        bail!("trenv spec: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&std::fs::read(
        d.path().join("config.json"),
    )?)?)
}

fn host() -> std::collections::BTreeMap<String, String> {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    [
        ("cpus".to_string(), cpus.to_string()),
        ("kernel".to_string(), run("uname", &["-r"])),
        ("containerd".to_string(), run("containerd", &["--version"])),
        ("criu".to_string(), run("criu", &["--version"])),
        ("runc".to_string(), run("runc", &["--version"])),
    ]
    .into_iter()
    .collect()
}

fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

struct ModeResult {
    runs: Vec<RunSummary>,
    invocations: Vec<Invocation>,
    memory: Vec<MemorySample>,
}

async fn run_mode(
    mode: Mode,
    a: &Args,
    manifest: &Manifest,
    bin: &Path,
    spec: &serde_json::Value,
) -> Result<ModeResult> {
    let selected = manifest.select(&a.functions)?;
    let tag = format!("{}-{}", std::process::id(), mode.name());
    let dir = PathBuf::from(format!("/run/trenv-bench-{tag}"));
    let cgroup_parent = format!("/trenv-bench-{tag}");
    let shim = ShimSetup {
        pool: mode != Mode::Runc,
        spares: if mode == Mode::Trenv { a.spares } else { 0 },
        min_idle: a.pool_min_idle,
        max_idle: a.pool_max_idle.max(a.pool_min_idle),
    };
    let progress = !a.quiet;
    if progress {
        eprintln!(
            "trenv-bench: {}: starting a private containerd in {}",
            mode.name(),
            dir.display()
        );
    }
    let mut node = Node::start(&dir, NAMESPACE, &cgroup_parent, bin, &shim)?;
    let result = async {
        for tar in &a.images {
            if progress {
                eprintln!("trenv-bench: {}: importing {}", mode.name(), tar.display());
            }
            if let Err(e) = node.import(tar) {
                // A missing archive leaves its images missing: their requests fail, reported.
                eprintln!("trenv-bench: {e:#}");
            }
        }
        let client =
            Client::connect(&node.socket(), NAMESPACE, &format!("trenv-bench-{tag}")).await?;
        let mut functions = Vec::new();
        for f in &selected {
            let image = client
                .image_config(&f.image)
                .await
                .map_err(|e| format!("{e:#}"));
            functions.push(FunctionState {
                spec: f.clone(),
                image,
            });
        }
        let cni = (mode == Mode::Runc).then(|| Cni {
            bridge: "trenvb0".into(),
            subnet: "10.231.0.0/16".into(),
        });
        let keep_alive = Duration::from_secs_f64(
            if mode == Mode::Trenv {
                a.template_keep_alive_secs
            } else {
                a.keep_alive_secs
            }
            .max(0.0),
        );
        let opts = Options {
            keep_alive,
            node_memory_mib: a.node_memory_mib,
            request_timeout: Duration::from_secs_f64(a.request_timeout_secs.max(1.0)),
            start_timeout: Duration::from_secs_f64(a.start_timeout_secs.max(1.0)),
            max_in_flight: a.max_in_flight,
            max_starts: a.max_starts.unwrap_or_else(|| {
                2 * std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
            }),
            progress,
            spares: shim.spares,
        };
        let ctl = Controller::new(
            mode,
            "",
            client.clone(),
            functions,
            spec.clone(),
            &cgroup_parent,
            node.pool_dir(),
            node.mempool_dir(),
            node.dir.join("logs"),
            cni,
            opts,
        );
        ctl.follow_events().await?;
        let setup_started = Instant::now();
        let notes = ctl.prepare().await;
        let setup_s = setup_started.elapsed().as_secs_f64();
        let mut out = ModeResult {
            runs: Vec::new(),
            invocations: Vec::new(),
            memory: Vec::new(),
        };
        for wname in &a.workloads {
            let w = workload(wname, a)?;
            let mut arrivals = w.arrivals(selected.len(), a.seed)?;
            arrivals.truncate(a.max_requests);
            if progress {
                eprintln!(
                    "trenv-bench: {}: {} — {} requests: {}",
                    mode.name(),
                    w.name(),
                    arrivals.len(),
                    w.describe()
                );
            }
            ctl.set_workload(w.name());
            let started = Instant::now();
            let (inv, mem) = ctl.run(arrivals).await;
            let mut base = RunSummary {
                mode: mode.name().into(),
                workload: w.name().into(),
                workload_description: w.describe(),
                functions: selected.iter().map(|f| f.name.clone()).collect(),
                duration_s: report::round2(started.elapsed().as_secs_f64()),
                setup_s: report::round2(setup_s),
                keep_alive_s: report::round2(keep_alive.as_secs_f64()),
                notes: notes.clone(),
                ..RunSummary::default()
            };
            for f in ctl.unusable() {
                base.notes.push(f);
            }
            out.runs.push(RunSummary::from_samples(&inv, &mem, base));
            out.invocations.extend(inv);
            out.memory.extend(mem);
        }
        client.close().await;
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let stopped = node.stop();
    if let Some(cni) = (mode == Mode::Runc).then(|| Cni {
        bridge: "trenvb0".into(),
        subnet: String::new(),
    }) {
        cni.cleanup();
    }
    let out = result?;
    if let Err(e) = stopped {
        eprintln!("trenv-bench: {e:#}");
    }
    Ok(out)
}

const DOCS_BEGIN: &str = "<!-- trenv-bench:begin -->";
const DOCS_END: &str = "<!-- trenv-bench:end -->";

fn docs_section(summary: &Summary, plots: &[PathBuf]) -> String {
    let mut s = String::new();
    s.push_str(DOCS_BEGIN);
    s.push_str("\n## Function suite under load (`trenv-bench`)\n\n");
    s.push_str(&format!(
        "Generated on {} by:\n\n```\n{}\n```\n\nHost: {}.\n\n",
        summary.generated,
        summary.command,
        summary
            .host
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let mut workloads: Vec<&str> = summary.runs.iter().map(|r| r.workload.as_str()).collect();
    workloads.dedup();
    for w in &workloads {
        if let Some(r) = summary.runs.iter().find(|r| r.workload == *w) {
            s.push_str(&format!("- **{w}**: {}\n", r.workload_description));
        }
    }
    s.push_str("\nStart = time to obtain an instance (0 for a warm reuse); e2e = arrival to correct answer. Memory = Σ PSS of every process of the run plus the template memory pool, each template page counted once (in the pool, whole; instances add only their copy-on-write copies).\n\n");
    s.push_str(&report::table(&summary.runs));
    if !summary.goals.is_empty() {
        s.push_str("\n### Goals\n\n");
        s.push_str(&report::goals_table(&summary.goals));
        s.push_str("\n### Per function\n\n");
        s.push_str(&report::function_table(&summary.runs));
    }
    let notes: Vec<String> = summary
        .runs
        .iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("- {} / {}: {n}", r.workload, r.mode))
        })
        .collect();
    if !notes.is_empty() {
        s.push_str("\n### Notes from the run\n\n");
        s.push_str(&notes.join("\n"));
        s.push('\n');
    }
    s.push_str("\n### Plots\n\n");
    for p in plots
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
    {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        s.push_str(&format!("![{name}](img/loadgen/{name})\n\n"));
    }
    s.push_str(DOCS_END);
    s.push('\n');
    s
}

fn update_docs(path: &Path, section: &str, plots: &[PathBuf]) -> Result<()> {
    trenv_integration::docs::replace_section(path, DOCS_BEGIN, DOCS_END, section)?;
    trenv_integration::docs::copy_plots(path, "loadgen", plots)?;
    Ok(())
}

fn real_main(a: Args) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("trenv-bench needs root (containers, cgroups, namespaces, CRIU)");
    }
    let manifest = Manifest::load(&a.manifest)?;
    manifest.select(&a.functions)?;
    let modes: Vec<Mode> = a
        .modes
        .iter()
        .map(|m| Mode::parse(m))
        .collect::<Result<_>>()?;
    for w in &a.workloads {
        workload(w, &a)?;
    }
    let bin = bin_dir()?;
    let spec = base_spec(&bin)?;
    std::fs::create_dir_all(a.out.join("plots"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    let mut invocations = Vec::new();
    let mut memory = Vec::new();
    let started = Instant::now();
    for mode in modes {
        let r = rt.block_on(run_mode(mode, &a, &manifest, &bin, &spec))?;
        runs.extend(r.runs);
        invocations.extend(r.invocations);
        memory.extend(r.memory);
    }
    // Group by workload, modes in the order run.
    let mut order: Vec<String> = Vec::new();
    for r in &runs {
        if !order.contains(&r.workload) {
            order.push(r.workload.clone());
        }
    }
    runs.sort_by_key(|r| order.iter().position(|w| *w == r.workload));
    let summary = Summary {
        schema: report::SCHEMA_VERSION,
        generated: chrono::Utc::now()
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        host: host(),
        goals: report::goals(&runs),
        runs,
    };
    write_jsonl(&a.out.join("invocations.jsonl"), &invocations)?;
    write_jsonl(&a.out.join("memory.jsonl"), &memory)?;
    std::fs::write(
        a.out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    let plots = plot::draw_all(&a.out.join("plots"), &summary.runs, &invocations, &memory)
        .map_err(|e| anyhow::anyhow!("drawing the plots: {e}"))?;
    println!("\n{}", report::table(&summary.runs));
    if !summary.goals.is_empty() {
        println!("{}", report::goals_table(&summary.goals));
        if !a.quiet {
            println!("{}", report::function_table(&summary.runs));
        }
    }
    for r in &summary.runs {
        for e in &r.error_samples {
            println!("{} / {}: error: {e}", r.workload, r.mode);
        }
    }
    println!("results: {}", a.out.join("summary.json").display());
    println!(
        "raw samples: {}, {}",
        a.out.join("invocations.jsonl").display(),
        a.out.join("memory.jsonl").display()
    );
    println!("plots:");
    for p in &plots {
        println!("  {}", p.display());
    }
    if let Some(docs) = &a.docs {
        update_docs(docs, &docs_section(&summary, &plots), &plots)?;
        println!("updated {}", docs.display());
    }
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    let errors: u64 = summary.runs.iter().map(|r| r.errors).sum();
    Ok(if a.fail_on_errors && errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
