//! trenv-podbench: pod starts through containerd's CRI plugin, as kubelet makes them —
//! RunPodSandbox, CreateContainer, StartContainer — until the pod's function answers from the
//! pod IP, initialised. Runtime handler `runc` against `trenv` without
//! templates and `trenv` with a template (container annotations), in one run, each on a
//! containerd of its own. Pods start one after another; each is deleted before the next.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use trenv_integration::containerd::Containerd;
use trenv_integration::cri::{self, v1, Cri};
use trenv_integration::docs;
use trenv_integration::loadgen::manifest::{Function, Manifest};
use trenv_integration::loadgen::plot;
use trenv_integration::loadgen::report::Dist;
use trenv_integration::{cache_dir, http, leaks, unique_id, wait_for, workspace};

const DOCS_BEGIN: &str = "<!-- trenv-podbench:begin -->";
const DOCS_END: &str = "<!-- trenv-podbench:end -->";
/// The parent of the benchmark's pod cgroups (kubelet's /kubepods).
const KUBEPODS: &str = "/trenv-podbench";

#[derive(Parser, Debug)]
#[command(
    name = "trenv-podbench",
    about = "Pod starts through containerd's CRI: runc vs trenv vs trenv with templates"
)]
struct Args {
    /// Pods started per mode (after one warm-up pod, which also builds the template).
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// The function the pods run (examples/functions/functions.toml); numpy's import makes
    /// `matrix` a typical data function's start-up.
    #[arg(long, default_value = "matrix")]
    function: String,
    /// Modes, in order: runc, trenv-cold, trenv-template.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "runc,trenv-cold,trenv-template"
    )]
    modes: Vec<String>,
    #[arg(long, default_value = "examples/functions/functions.toml")]
    manifest: PathBuf,
    /// Where results.json and the plots go.
    #[arg(long, default_value = "target/podbench")]
    out: PathBuf,
    /// Markdown file whose podbench section is replaced with this run's results.
    #[arg(long)]
    docs: Option<PathBuf>,
    /// How long one pod may take to answer.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

/// One pod start, ms.
#[derive(Debug, Clone, Serialize)]
struct Start {
    run_pod: f64,
    container: f64,
    first_answer: f64,
    total: f64,
}

#[derive(Debug, Serialize)]
struct ModeResult {
    mode: String,
    handler: String,
    pods: usize,
    warmup_ms: f64,
    total: Dist,
    run_pod: Dist,
    container: Dist,
    first_answer: Dist,
    #[serde(skip)]
    starts: Vec<Start>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The handler and container annotations of a mode.
fn mode_setup(mode: &str) -> Result<(&'static str, bool)> {
    Ok(match mode {
        "runc" => ("runc", false),
        "trenv-cold" => ("trenv", false),
        "trenv-template" => ("trenv", true),
        other => bail!("unknown mode {other:?} (runc, trenv-cold, trenv-template)"),
    })
}

fn container(f: &Function, template: bool) -> v1::ContainerConfig {
    let mut c = cri::with_env(
        cri::container_config(&f.name, &f.image, &[]),
        &[("PORT", &f.port.to_string())],
    );
    if template {
        c.annotations
            .insert("io.trenv.template".into(), "auto".into());
        c.annotations.insert(
            "io.trenv.ready".into(),
            format!("http:{}{}", f.port, f.health),
        );
    }
    c.linux = Some(v1::LinuxContainerConfig {
        resources: Some(v1::LinuxContainerResources {
            memory_limit_in_bytes: i64::try_from(f.memory_mib << 20).unwrap_or(i64::MAX),
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// One pod: started, timed until the function answers its health path (initialised),
/// checked for a correct answer, deleted.
fn one_pod(
    cri: &Cri,
    logs: &Path,
    f: &Function,
    handler: &str,
    template: bool,
    timeout: Duration,
) -> Result<(Start, String)> {
    let dir = logs.join(unique_id("pod"));
    std::fs::create_dir_all(&dir)?;
    let config = cri::pod_config(&format!("fn-{}", f.name), &dir, KUBEPODS);
    let t0 = Instant::now();
    let pod = cri.run_pod(&config, handler).context("RunPodSandbox")?;
    let t1 = Instant::now();
    let started = cri
        .run_container(&pod, &container(f, template), &config)
        .context("CreateContainer + StartContainer");
    let t2 = Instant::now();
    let answered = started.and_then(|id| {
        let ip = cri.pod_ip(&pod).context("pod IP")?;
        // Polled every 2 ms, as a platform's router retries a new instance: the tests'
        // 20 ms polling would add up to 20 ms to every start.
        let deadline = Instant::now() + timeout;
        loop {
            if http::get_once(&ip, f.port, &f.health).is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("no answer from {ip}:{}{}", f.port, f.health);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((id, ip))
    });
    let t3 = Instant::now();
    // Untimed: the instance computes correctly (a template must not change answers).
    let answered = answered.and_then(|(id, ip)| {
        let r = http::get_once(&ip, f.port, &f.request).unwrap_or_default();
        if !r.ends_with(&f.answer) {
            bail!(
                "{ip}:{}{}: wrong answer {:?}",
                f.port,
                f.request,
                r.lines().last()
            );
        }
        Ok(id)
    });
    let deleted = cri.delete_pod(&pod).context("deleting the pod");
    for d in leaks::cgroup_dirs(&config.linux.map(|l| l.cgroup_parent).unwrap_or_default()) {
        let _ = std::fs::remove_dir(d);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let id = answered?;
    deleted?;
    Ok((
        Start {
            run_pod: ms(t1 - t0),
            container: ms(t2 - t1),
            first_answer: ms(t3 - t2),
            total: ms(t3 - t0),
        },
        id,
    ))
}

fn run_mode(mode: &str, a: &Args, f: &Function) -> Result<ModeResult> {
    let (handler, template) = mode_setup(mode)?;
    eprintln!("trenv-podbench: {mode}: starting containerd with CRI");
    let ctrd = Containerd::start_cri();
    let tar = cache_dir().join("images/functions/functions-oci.tar");
    ctrd.ctr_ok(&["images", "import", &tar.to_string_lossy()]);
    let cri = Cri::connect(&ctrd.socket()).context("CRI client")?;
    let known = wait_for(Duration::from_secs(30), || {
        cri.list_images().ok()?.contains(&f.image).then_some(())
    });
    if known.is_none() {
        bail!("{}: image unknown to CRI after import", f.image);
    }
    let logs = tempfile::Builder::new()
        .prefix("trenv-podbench-")
        .tempdir()?;
    let timeout = Duration::from_secs(a.timeout_secs);
    let events = ctrd.events();
    let (warm, warm_id) = one_pod(&cri, logs.path(), f, handler, template, timeout)
        .with_context(|| format!("{mode}: warm-up pod"))?;
    if template {
        events
            .wait("/trenv/template/built", &warm_id, Duration::from_secs(120))
            .with_context(|| format!("{mode}: the warm-up pod built no template"))?;
    }
    let mut starts = Vec::with_capacity(a.pods);
    let t = Instant::now();
    for i in 0..a.pods {
        let (s, _) = one_pod(&cri, logs.path(), f, handler, template, timeout)
            .with_context(|| format!("{mode}: pod {i}"))?;
        starts.push(s);
        if (i + 1) % 10 == 0 || i + 1 == a.pods {
            let d = Dist::of(&starts.iter().map(|s| s.total).collect::<Vec<_>>());
            eprintln!(
                "trenv-podbench: {mode}: {}/{} pods, P50 {:.1} ms, P99 {:.1} ms ({:.0} s)",
                i + 1,
                a.pods,
                d.p50,
                d.p99,
                t.elapsed().as_secs_f64()
            );
        }
    }
    if template {
        let restored = events.text().matches("/trenv/template/restored").count();
        if restored < a.pods {
            bail!(
                "{mode}: only {restored} of {} pods started from the template",
                a.pods
            );
        }
    }
    let errors = cri.delete_all_pods();
    if !errors.is_empty() {
        bail!("{mode}: deleting pods: {errors:?}");
    }
    drop(events);
    drop(cri);
    // Dropping drains the pool and stops containerd; a leak there panics with its cause.
    drop(ctrd);
    let dist = |f: fn(&Start) -> f64| Dist::of(&starts.iter().map(f).collect::<Vec<_>>());
    Ok(ModeResult {
        mode: mode.to_string(),
        handler: handler.to_string(),
        pods: a.pods,
        warmup_ms: warm.total,
        total: dist(|s| s.total),
        run_pod: dist(|s| s.run_pod),
        container: dist(|s| s.container),
        first_answer: dist(|s| s.first_answer),
        starts,
    })
}

fn section(a: &Args, f: &Function, results: &[ModeResult], plots: &[PathBuf]) -> String {
    let mut s = format!(
        "{DOCS_BEGIN}\n## Pod starts through CRI (`trenv-podbench`)\n\n\
         Generated by `target/release/trenv-podbench --pods {} --function {} --docs docs/benchmarks.md` \
         (part of `make bench`) on {}. A pod start is RunPodSandbox + CreateContainer + \
         StartContainer of the `{}` function ({}) until it answers GET {} (initialised) from \
         the pod IP (each instance's GET {} is then checked for the right answer, untimed), through containerd's CRI plugin with the pod network from CRI's CNI config; \
         pods start one after another, each deleted before the next, after one warm-up pod per \
         mode (in `trenv-template` it builds the template). Times in ms.\n\n\
         | mode | handler | pods | P50 | P99 | mean | RunPodSandbox P50 | Create+Start P50 | to first answer P50 | P50 vs runc | P99 vs runc |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        a.pods,
        f.name,
        chrono::Utc::now().format("%Y-%m-%d"),
        f.name,
        f.description,
        f.health,
        f.request,
    );
    let runc = results.iter().find(|r| r.mode == "runc");
    for r in results {
        let ratio = |base: Option<f64>, v: f64| {
            base.filter(|b| *b > 0.0 && v > 0.0)
                .map_or("—".to_string(), |b| format!("{:.2}×", b / v))
        };
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
            r.mode,
            r.handler,
            r.pods,
            r.total.p50,
            r.total.p99,
            r.total.mean,
            r.run_pod.p50,
            r.container.p50,
            r.first_answer.p50,
            ratio(runc.map(|b| b.total.p50), r.total.p50),
            ratio(runc.map(|b| b.total.p99), r.total.p99),
        ));
    }
    s.push('\n');
    for p in plots
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        if let Some(name) = p.file_name() {
            s.push_str(&format!(
                "![pod start CDF](img/podbench/{})\n\n",
                name.to_string_lossy()
            ));
        }
    }
    s.push_str(DOCS_END);
    s.push('\n');
    s
}

fn real_main(a: Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("trenv-podbench needs root (containerd, namespaces, cgroups, CRIU)");
    }
    let manifest_path = if a.manifest.is_absolute() {
        a.manifest.clone()
    } else {
        workspace().join(&a.manifest)
    };
    let manifest = Manifest::load(&manifest_path)?;
    let f = manifest
        .select(std::slice::from_ref(&a.function))?
        .into_iter()
        .next()
        .context("no function selected")?;
    for m in &a.modes {
        mode_setup(m)?;
    }
    std::fs::create_dir_all(&a.out)?;
    let mut results = Vec::new();
    for m in &a.modes {
        results.push(run_mode(m, &a, &f)?);
    }
    for d in leaks::cgroup_dirs(KUBEPODS) {
        let _ = std::fs::remove_dir(d);
    }
    println!("mode            P50 ms    P99 ms   mean ms");
    for r in &results {
        println!(
            "{:<14} {:>8.1} {:>9.1} {:>9.1}",
            r.mode, r.total.p50, r.total.p99, r.total.mean
        );
    }
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    let series: Vec<(String, Vec<f64>)> = results
        .iter()
        .map(|r| (r.mode.clone(), r.starts.iter().map(|s| s.total).collect()))
        .collect();
    let plots = plot::draw_cdf(
        &a.out.join("pod-start-cdf"),
        &format!("pod start to first answer ({}), through CRI", f.name),
        "pod start, ms (log scale)",
        &series,
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(path) = &a.docs {
        let text = section(&a, &f, &results, &plots);
        docs::replace_section(path, DOCS_BEGIN, DOCS_END, &text)?;
        docs::copy_plots(path, "podbench", &plots)?;
        eprintln!("trenv-podbench: updated {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trenv-podbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
