//! `trenv-microbench`: wall-clock comparison of trenv and runc on the same bundles and checkpoints.
//!
//! Three benchmarks, each with interleaved iterations (trenv, runc, trenv, runc, ...) so that
//! slow drift of the machine (page cache, CPU frequency, other load) hits both runtimes alike:
//!
//! * `run`: `run <id>` of a busybox container whose process is `true` (create, start, wait,
//!   delete), a fresh container id per iteration;
//! * `restore`: `restore --detach` of one CRIU checkpoint, which both runtimes restore; the
//!   restored container is killed and deleted (untimed) before the next iteration;
//! * `ctr-run`: `ctr run --rm` of busybox `true` through a private containerd, with the trenv
//!   shim (`io.containerd.trenv.v2`) against containerd's runc shim (`io.containerd.runc.v2`),
//!   a fresh container id per iteration.
//!
//! Results go to target/bench/micro-summary.json and docs/benchmarks-micro.md (regenerated).

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::json;
use tempfile::TempDir;
use trenv_integration::bundle::{cgroup_path, Bundle};
use trenv_integration::containerd::{Containerd, BUSYBOX, NAMESPACE};
use trenv_integration::runtime::{shim_bin, Runtime};
use trenv_integration::{leaks, unique_id, wait_for, workspace};

const USAGE: &str = "usage: trenv-microbench [--runs N] [--warmup N]

Compares trenv with runc: `run` of a busybox `true` container, `restore --detach` of one
CRIU checkpoint, and `ctr run --rm` of busybox `true` through containerd with the trenv shim
(io.containerd.trenv.v2) and the runc shim (io.containerd.runc.v2). Needs root, runc, criu,
containerd and ctr. Writes target/bench/micro-summary.json and docs/benchmarks-micro.md under the
workspace root.

  --runs N     timed iterations per runtime and benchmark (default 100, or $TRENV_BENCH_RUNS)
  --warmup N   untimed iterations per runtime before timing (default 3)
  -h, --help   this text

The trenv binary is $TRENV_BIN, else the newest of target/{release,debug}/trenv; the shim is
$TRENV_SHIM_BIN, else containerd-shim-trenv-v2 next to the trenv binary.";

const DEFAULT_RUNS: usize = 100;
const DEFAULT_WARMUP: usize = 3;
/// Parent of every cgroup the harness creates (see `bundle::cgroup_path`).
const CGROUP_PARENT: &str = "/trenv-it";
/// A process that stays alive and keeps a little state, so the checkpoint is non-trivial.
const LOOP_SCRIPT: &str = "i=0; while true; do i=$((i+1)); sleep 1; done";
/// How long the looping container runs before it is checkpointed.
const SETTLE: Duration = Duration::from_millis(300);
/// Upper bound for a killed container to be reported as stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for a shim (and the trenv shim's zygote) to exit after `ctr run --rm` returns.
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Where containerd 1.6 shims create their ttrpc sockets.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// The goal of `run` and `restore`.
const NO_SLOWER: Goal = Goal {
    description: "trenv no slower than runc at P50 and P99",
    min_runc_over_trenv_p50: 1.0,
    min_runc_over_trenv_p99: 1.0,
};
/// The goal of `ctr-run`.
const CTR_RUN_GOAL: Goal = Goal {
    description: "trenv.v2 at least 1.5x faster than runc.v2 at P50 and never slower at P99",
    min_runc_over_trenv_p50: 1.5,
    min_runc_over_trenv_p99: 1.0,
};

/// Set by SIGINT/SIGTERM so the benchmark stops between iterations and still cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Options {
    runs: usize,
    warmup: usize,
}

/// One runtime under comparison, with its private state root.
struct Side {
    name: &'static str,
    rt: Runtime,
}

/// One containerd runtime type (shim) under comparison in `ctr-run`.
struct ShimSide {
    name: &'static str,
    runtime_type: &'static str,
    /// Where the shim keeps per-namespace container state.
    state_root: &'static str,
    /// One shim serves the whole namespace (and its sandbox pool) and outlives tasks.
    shared_shim: bool,
}

const TRENV_SHIM: ShimSide = ShimSide {
    name: "trenv",
    runtime_type: "io.containerd.trenv.v2",
    state_root: "/run/containerd/trenv",
    shared_shim: true,
};
const RUNC_SHIM: ShimSide = ShimSide {
    name: "runc",
    runtime_type: "io.containerd.runc.v2",
    state_root: "/run/containerd/runc",
    shared_shim: false,
};

#[derive(Serialize)]
struct Summary {
    timestamp: String,
    command: String,
    trenv_bin: String,
    trenv_shim_bin: String,
    machine: Machine,
    benchmarks: Vec<Bench>,
    /// Leftovers (cgroups, mounts, state) noticed after a container was deleted.
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    kernel: String,
    criu: String,
    runc: String,
    trenv: String,
    containerd: String,
    /// /proc/loadavg before and after, to spot runs disturbed by other work on the machine.
    loadavg_start: String,
    loadavg_end: String,
}

#[derive(Serialize)]
struct Bench {
    name: String,
    description: String,
    runs: usize,
    warmup: usize,
    /// For `restore`: which runtime made the checkpoint both runtimes restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_by: Option<String>,
    /// For `ctr-run`: the containerd runtime types measured as "trenv" and "runc".
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime_types: Option<RuntimeTypes>,
    runtimes: Runtimes,
    /// runc/trenv; null when runc has no numbers.
    ratios: Option<Ratios>,
    goal: Goal,
    /// Both ratios at least the goal's minimums; null when runc has no numbers.
    goal_met: Option<bool>,
    notes: Vec<String>,
}

#[derive(Serialize)]
struct Runtimes {
    trenv: Outcome,
    runc: Outcome,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Outcome {
    Measured(Stats),
    Failed { error: String },
}

#[derive(Serialize, Clone)]
struct Stats {
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    /// In the order they were taken.
    samples_ms: Vec<f64>,
}

#[derive(Serialize)]
struct RuntimeTypes {
    trenv: String,
    runc: String,
}

/// What trenv has to achieve against runc: minimum runc/trenv ratios.
#[derive(Serialize, Clone, Copy)]
struct Goal {
    description: &'static str,
    min_runc_over_trenv_p50: f64,
    min_runc_over_trenv_p99: f64,
}

#[derive(Serialize, Clone, Copy)]
struct Ratios {
    runc_over_trenv_p50: f64,
    runc_over_trenv_p99: f64,
}

fn main() -> ExitCode {
    // Declared first so it is dropped last, after every runtime and bundle is gone.
    let parents = CgroupParents::snapshot();
    let result = real_main();
    drop(parents);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trenv-microbench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let Some(opts) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    ensure!(
        nix::unistd::geteuid().is_root(),
        "trenv-microbench needs root (containers, cgroups and CRIU)"
    );
    install_signal_handlers()?;
    if let Some(bin) = std::env::var_os("TRENV_BIN") {
        ensure!(
            Path::new(&bin).exists(),
            "TRENV_BIN={} does not exist",
            Path::new(&bin).display()
        );
    }

    let trenv = Side {
        name: "trenv",
        rt: Runtime::trenv(),
    };
    let runc = Side {
        name: "runc",
        rt: Runtime::runc(),
    };
    let mut machine = machine_info(&trenv, &runc)?;
    let command = command_line();
    eprintln!(
        "trenv-microbench: {} runs, {} warm-up; trenv = {} ({}), runc = {}",
        opts.runs,
        opts.warmup,
        trenv.rt.bin.display(),
        machine.trenv,
        machine.runc
    );

    let mut warnings = Vec::new();
    let run = bench_run(&opts, &trenv, &runc, &mut warnings)?;
    let restore = bench_restore(&opts, &trenv, &runc, &mut warnings)?;
    let ctr_run = bench_ctr_run(&opts, &machine.containerd, &mut warnings)?;
    machine.loadavg_end = loadavg();

    let summary = Summary {
        timestamp: utc_timestamp(SystemTime::now()),
        command,
        trenv_bin: trenv.rt.bin.display().to_string(),
        trenv_shim_bin: shim_bin().display().to_string(),
        machine,
        benchmarks: vec![run, restore, ctr_run],
        warnings,
    };
    let json_path = workspace().join("target/bench/micro-summary.json");
    write_file(&json_path, &serde_json::to_vec_pretty(&summary)?)?;
    let markdown = render_markdown(&summary);
    let md_path = workspace().join("docs/benchmarks-micro.md");
    write_file(&md_path, markdown.as_bytes())?;
    print!("{markdown}");
    eprintln!(
        "trenv-microbench: wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
    Ok(())
}

/// `None` means help was asked for.
fn parse_args() -> Result<Option<Options>> {
    let mut runs = match std::env::var("TRENV_BENCH_RUNS") {
        Ok(v) => parse_count("TRENV_BENCH_RUNS", &v)?,
        Err(_) => DEFAULT_RUNS,
    };
    let mut warmup = DEFAULT_WARMUP;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--runs" | "--warmup" => {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .with_context(|| format!("{flag} needs a value\n\n{USAGE}"))?,
                };
                let n = parse_count(&flag, &value)?;
                if flag == "--runs" {
                    runs = n;
                } else {
                    warmup = n;
                }
            }
            _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
        }
    }
    ensure!(runs >= 1, "--runs must be at least 1");
    Ok(Some(Options { runs, warmup }))
}

fn parse_count(what: &str, value: &str) -> Result<usize> {
    value
        .trim()
        .parse()
        .with_context(|| format!("{what}: {value:?} is not a non-negative integer"))
}

fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    ensure!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted; containers and bundles cleaned up, no results written"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// run

fn bench_run(
    opts: &Options,
    trenv: &Side,
    runc: &Side,
    warnings: &mut Vec<String>,
) -> Result<Bench> {
    let bundle = Bundle::new(&unique_id("trenv-it-bench-run"), &["true"]);
    let scratch = scratch_dir()?;
    let sides = [trenv, runc];
    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..opts.warmup + opts.runs {
        let timed_iter = i >= opts.warmup;
        for (n, side) in sides.iter().enumerate() {
            check_interrupted()?;
            let id = unique_id(&format!("trenv-it-bench-run-{}", side.name));
            set_cgroup(&bundle, &id);
            let args = os_args(&[&"run", &"--bundle", &bundle.path(), &id]);
            let took = timed(&side.rt, &args, scratch.path())
                .with_context(|| format!("{} run failed", side.name))?;
            check_gone(side, &id, warnings);
            if timed_iter {
                samples[n].push(took);
            }
        }
        progress("run", i, opts.warmup, opts.runs);
    }
    let [t, r] = samples;
    Ok(make_bench(
        "run",
        "`run <id>` of a busybox container whose process is `true`: create, start, wait for \
         exit, delete. A new container id per iteration, same bundle.",
        opts.runs,
        opts.warmup,
        Runtimes {
            trenv: Outcome::Measured(stats(&t)),
            runc: Outcome::Measured(stats(&r)),
        },
        NO_SLOWER,
    ))
}

// ---------------------------------------------------------------------------------------------
// restore

fn bench_restore(
    opts: &Options,
    trenv: &Side,
    runc: &Side,
    warnings: &mut Vec<String>,
) -> Result<Bench> {
    let bundle = Bundle::new(
        &unique_id("trenv-it-bench-restore"),
        &["sh", "-c", LOOP_SCRIPT],
    );
    let scratch = scratch_dir()?;
    eprintln!("restore: checkpointing a looping container with trenv");
    let trenv_images = checkpoint(trenv, &bundle, scratch.path(), warnings)?;

    // The first warm-up round doubles as the probe of which checkpoint both runtimes restore.
    restore_once(trenv, &bundle, trenv_images.path(), warnings)
        .context("trenv cannot restore its own checkpoint")?;
    let mut notes = Vec::new();
    let mut runc_error = None;
    let mut runc_images = None;
    let mut checkpoint_by = "trenv";
    if let Err(e) = restore_once(runc, &bundle, trenv_images.path(), warnings) {
        let first = format!("runc failed to restore the checkpoint made by trenv: {e:#}");
        eprintln!("restore: {first}\nrestore: trying a checkpoint made by runc for both");
        match runc_checkpoint_probe(trenv, runc, &bundle, scratch.path(), warnings) {
            Ok(images) => {
                notes.push(first);
                checkpoint_by = "runc";
                runc_images = Some(images);
            }
            Err(e) => {
                eprintln!("restore: {e:#}\nrestore: reporting trenv numbers only");
                runc_error = Some(format!("{first}\nthen: {e:#}"));
            }
        }
    }
    let images = runc_images
        .as_ref()
        .map_or(trenv_images.path(), TempDir::path);
    let sides: Vec<&Side> = if runc_error.is_some() {
        vec![trenv]
    } else {
        vec![trenv, runc]
    };
    // The probe is always one untimed round, even with --warmup 0.
    let warmup = opts.warmup.max(1);
    progress("restore", 0, warmup, opts.runs);

    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 1..warmup + opts.runs {
        let timed_iter = i >= warmup;
        for (n, side) in sides.iter().enumerate() {
            check_interrupted()?;
            let took = restore_once(side, &bundle, images, warnings)
                .with_context(|| format!("{} restore failed", side.name))?;
            if timed_iter {
                samples[n].push(took);
            }
        }
        progress("restore", i, warmup, opts.runs);
    }
    let [t, r] = samples;
    let runc_outcome = match runc_error {
        Some(error) => Outcome::Failed { error },
        None => Outcome::Measured(stats(&r)),
    };
    let mut bench = make_bench(
        "restore",
        "`restore --detach` of one CRIU checkpoint of a busybox shell loop, with a fresh \
         --work-path per iteration; the restored container is killed and deleted (untimed) \
         before the next iteration.",
        opts.runs,
        warmup,
        Runtimes {
            trenv: Outcome::Measured(stats(&t)),
            runc: runc_outcome,
        },
        NO_SLOWER,
    );
    bench.checkpoint_by = Some(checkpoint_by.to_string());
    bench.notes = notes;
    Ok(bench)
}

/// Fallback when runc cannot restore trenv's checkpoint: a checkpoint made by runc that both
/// runtimes can restore.
fn runc_checkpoint_probe(
    trenv: &Side,
    runc: &Side,
    bundle: &Bundle,
    scratch: &Path,
    warnings: &mut Vec<String>,
) -> Result<TempDir> {
    let images = checkpoint(runc, bundle, scratch, warnings).context("runc checkpoint failed")?;
    restore_once(runc, bundle, images.path(), warnings)
        .context("runc failed to restore its own checkpoint too")?;
    restore_once(trenv, bundle, images.path(), warnings)
        .context("trenv failed to restore the checkpoint made by runc")?;
    Ok(images)
}

/// Runs the looping bundle detached and checkpoints it (which stops it); returns the images.
fn checkpoint(
    side: &Side,
    bundle: &Bundle,
    scratch: &Path,
    warnings: &mut Vec<String>,
) -> Result<TempDir> {
    let id = unique_id(&format!("trenv-it-bench-ckpt-{}", side.name));
    set_cgroup(bundle, &id);
    let images = tempfile::Builder::new()
        .prefix("trenv-it-bench-images-")
        .tempdir()
        .context("creating the checkpoint image directory")?;
    // All three stdio streams go to /dev/null (not Runtime::detached, which lets stderr
    // through): CRIU cannot dump a descriptor for a file or tty outside the container's mount
    // namespace, and /dev/null is the one it handles. Errors are read from --log instead.
    let log = scratch.join(format!("{id}.log"));
    let st = side
        .rt
        .cmd()
        .arg("--log")
        .arg(&log)
        .args(os_args(&[
            &"run",
            &"--detach",
            &"--bundle",
            &bundle.path(),
            &id,
        ]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("spawning {}", side.rt.bin.display()))?;
    if !st.success() {
        bail!(
            "`{} run --detach {id}` failed ({st}): {}",
            side.name,
            read_trimmed(&log)
        );
    }
    std::thread::sleep(SETTLE);
    let out = side
        .rt
        .run(&["checkpoint", "--image-path", path_str(images.path())?, &id]);
    // Checkpoint stops the container; whatever state is left must go either way.
    let del = side.rt.run(&["delete", "--force", &id]);
    if !out.status.success() {
        bail!(
            "`{} checkpoint {id}` failed ({}): {}{}",
            side.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !del.status.success() {
        bail!(
            "`{} delete --force {id}` after checkpoint failed ({}): {}",
            side.name,
            del.status,
            String::from_utf8_lossy(&del.stderr).trim()
        );
    }
    check_gone(side, &id, warnings);
    Ok(images)
}

/// One timed `restore --detach` under a new id, then an untimed kill and delete.
fn restore_once(
    side: &Side,
    bundle: &Bundle,
    images: &Path,
    warnings: &mut Vec<String>,
) -> Result<Duration> {
    let id = unique_id(&format!("trenv-it-bench-rst-{}", side.name));
    set_cgroup(bundle, &id);
    let work = tempfile::Builder::new()
        .prefix("trenv-it-bench-work-")
        .tempdir()
        .context("creating the restore work directory")?;
    let args = os_args(&[
        &"restore",
        &"--detach",
        &"--image-path",
        &images,
        &"--work-path",
        &work.path(),
        &"--bundle",
        &bundle.path(),
        &id,
    ]);
    let took = match timed(&side.rt, &args, work.path()) {
        Ok(d) => d,
        Err(e) => {
            // A failed restore may still have left a container behind.
            let _ = side.rt.run(&["delete", "--force", &id]);
            let detail = criu_errors(&work.path().join("restore.log"));
            bail!("{e:#}{detail}");
        }
    };
    stop_and_delete(side, &id)?;
    check_gone(side, &id, warnings);
    Ok(took)
}

/// The "Error" lines of a CRIU log, because the runtimes' own messages rarely say what failed
/// and the work directory holding the log is removed right after.
fn criu_errors(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(10)..];
    format!("\nCRIU {}:\n{}", log.display(), tail.join("\n"))
}

fn stop_and_delete(side: &Side, id: &str) -> Result<()> {
    let kill = side.rt.run(&["kill", id, "KILL"]);
    let stopped = wait_for(STOP_TIMEOUT, || {
        let out = side.rt.run(&["state", id]);
        if !out.status.success() {
            // Already gone: nothing left to wait for.
            return Some(());
        }
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (state["status"] == "stopped").then_some(())
    });
    if stopped.is_none() {
        bail!(
            "{} container {id} not stopped {STOP_TIMEOUT:?} after `kill {id} KILL` ({}: {})",
            side.name,
            kill.status,
            String::from_utf8_lossy(&kill.stderr).trim()
        );
    }
    let del = side.rt.run(&["delete", "--force", id]);
    ensure!(
        del.status.success(),
        "`{} delete --force {id}` failed ({}): {}",
        side.name,
        del.status,
        String::from_utf8_lossy(&del.stderr).trim()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ctr-run

fn bench_ctr_run(
    opts: &Options,
    containerd_version: &str,
    warnings: &mut Vec<String>,
) -> Result<Bench> {
    let shim = shim_bin();
    ensure!(
        shim.exists(),
        "the trenv shim {} does not exist: build it with `cargo build --release --workspace \
         --bins` or set TRENV_SHIM_BIN",
        shim.display()
    );
    eprintln!("ctr-run: starting a private containerd and importing busybox");
    // Dropped on every way out of here: removes containers, kills stray shims, unmounts.
    let ctrd = Containerd::start();
    ctrd.import_busybox();
    let scratch = scratch_dir()?;
    let sides = [&TRENV_SHIM, &RUNC_SHIM];
    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..opts.warmup + opts.runs {
        let timed_iter = i >= opts.warmup;
        for (n, side) in sides.iter().enumerate() {
            check_interrupted()?;
            let id = unique_id(&format!("trenv-it-bench-ctr-{}", side.name));
            let mut cmd = ctrd.ctr_cmd();
            cmd.args([
                "run",
                "--rm",
                "--runtime",
                side.runtime_type,
                BUSYBOX,
                &id,
                "true",
            ]);
            let took = time_command(cmd, scratch.path())
                .with_context(|| format!("ctr run with {} failed", side.runtime_type))?;
            check_task_gone(&ctrd, side, &id, warnings);
            if timed_iter {
                samples[n].push(took);
            }
        }
        progress("ctr-run", i, opts.warmup, opts.runs);
    }
    check_containerd_clean(&ctrd, warnings);
    drop(ctrd);
    let [t, r] = samples;
    let version = containerd_version
        .split_whitespace()
        .nth(2)
        .unwrap_or(containerd_version);
    let mut bench = make_bench(
        "ctr-run",
        &format!(
            "`ctr run --rm --runtime <type> {BUSYBOX} <id> true` through a private containerd \
             {version}: create the container and its snapshot, start a shim, create and start \
             the task, wait for exit, delete task and container; wall time of the whole ctr \
             command. A new container id per iteration. The trenv shim ({}) links the runtime \
             and runs libcontainer in a pre-forked zygote; the runc shim ({}) execs runc for \
             each operation.",
            TRENV_SHIM.runtime_type, RUNC_SHIM.runtime_type
        ),
        opts.runs,
        opts.warmup,
        Runtimes {
            trenv: Outcome::Measured(stats(&t)),
            runc: Outcome::Measured(stats(&r)),
        },
        CTR_RUN_GOAL,
    );
    bench.runtime_types = Some(RuntimeTypes {
        trenv: TRENV_SHIM.runtime_type.to_string(),
        runc: RUNC_SHIM.runtime_type.to_string(),
    });
    Ok(bench)
}

/// Records anything `ctr run --rm` left behind: a shim (with the trenv shim's zygote) still
/// running after SHIM_EXIT_TIMEOUT, its socket, the task's cgroups, mounts, shim state or
/// bundle, or the container itself.
fn check_task_gone(ctrd: &Containerd, side: &ShimSide, id: &str, warnings: &mut Vec<String>) {
    let mut found = Vec::new();
    // The shim's command line has `-id <id> `; the trailing space keeps `...-1` from
    // matching `...-10`.
    let needle = format!("-id {id} ");
    let exited = side.shared_shim
        || wait_for(SHIM_EXIT_TIMEOUT, || {
            leaks::processes_with(&needle).is_empty().then_some(())
        })
        .is_some();
    if !exited {
        found.push(format!(
            "its shim, running {SHIM_EXIT_TIMEOUT:?} after ctr returned (pids {:?})",
            leaks::processes_with(&needle)
        ));
    }
    if let Some(socket) = shim_socket(ctrd, id).filter(|s| s.exists()) {
        found.push(format!("its shim socket {}", socket.display()));
    }
    let state = Path::new(side.state_root).join(NAMESPACE).join(id);
    found.extend(leftovers(&format!("/{NAMESPACE}/{id}"), id, &state));
    let bundle = ctrd
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .join(NAMESPACE)
        .join(id);
    if bundle.exists() {
        found.push(format!("its bundle {}", bundle.display()));
    }
    let listed = ctrd.ctr(&["containers", "list", "-q"]);
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l == id)
    {
        found.push("its containerd container".to_string());
    }
    report_leftovers(
        &format!(
            "{} left behind after `ctr run --rm` of {id}",
            side.runtime_type
        ),
        found,
        warnings,
    );
}

/// The socket a shim for `id` listens on: SHIM_SOCKET_DIR/<SHA-256 of "<containerd
/// address>/<namespace>/<id>">, as containerd 1.6 and both shims compute it. None if
/// `sha256sum` cannot tell.
fn shim_socket(ctrd: &Containerd, id: &str) -> Option<PathBuf> {
    use std::io::Write as _;
    let key = format!("{}/{NAMESPACE}/{id}", ctrd.socket().display());
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Dropping stdin closes it, so sha256sum sees EOF.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(key.as_bytes()));
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let hash = text.split_whitespace().next()?;
    (matches!(written, Some(Ok(()))) && out.status.success() && hash.len() == 64)
        .then(|| Path::new(SHIM_SOCKET_DIR).join(hash))
}

/// After the last iteration: no container, task, shim or mount of the private containerd may
/// remain (its Drop would clean them up silently).
fn check_containerd_clean(ctrd: &Containerd, warnings: &mut Vec<String>) {
    let mut found = Vec::new();
    for what in ["containers", "tasks"] {
        let out = ctrd.ctr(&[what, "list", "-q"]);
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            found.push(format!("{what} {ids:?}"));
        }
    }
    // The trenv shim ends once its pool is drained.
    if let Err(e) = ctrd.drain_pool() {
        found.push(e);
    }
    let socket = ctrd.socket().to_string_lossy().into_owned();
    let exited = wait_for(SHIM_EXIT_TIMEOUT, || {
        leaks::processes_with(&socket).is_empty().then_some(())
    });
    if exited.is_none() {
        found.push(format!(
            "shim processes {:?}",
            leaks::processes_with(&socket)
        ));
    }
    let mounts = leaks::mounts_with(&ctrd.dir().to_string_lossy());
    if !mounts.is_empty() {
        found.push(format!("mounts {mounts:?}"));
    }
    report_leftovers(
        "containerd had left after the last `ctr run --rm`",
        found,
        warnings,
    );
}

// ---------------------------------------------------------------------------------------------
// helpers

/// Runs one runtime command; see `time_command`.
fn timed(rt: &Runtime, args: &[OsString], scratch: &Path) -> Result<Duration> {
    let mut cmd = rt.cmd();
    cmd.args(args);
    time_command(cmd, scratch)
}

/// Runs a command with stdio away from the terminal and returns its wall time, spawn to exit;
/// fails with its stderr unless it exits 0. stderr goes to a file (not a pipe) so a restored
/// process that inherited it cannot keep us waiting for EOF.
fn time_command(mut cmd: Command, scratch: &Path) -> Result<Duration> {
    let err_path = scratch.join("stderr");
    let err_file =
        File::create(&err_path).with_context(|| format!("creating {}", err_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file);
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("spawning {}", cmd.get_program().to_string_lossy()))?;
    let took = start.elapsed();
    if !status.success() {
        let shown: Vec<_> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(OsStr::to_string_lossy)
            .collect();
        bail!(
            "`{}` exited with {status}; stderr:\n{}",
            shown.join(" "),
            read_trimmed(&err_path)
        );
    }
    Ok(took)
}

fn os_args(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

fn read_trimmed(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", p.display()))
}

fn scratch_dir() -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix("trenv-it-bench-scratch-")
        .tempdir()
        .context("creating a scratch directory")
}

/// Each container id gets its own cgroup, as containerd would give it.
fn set_cgroup(bundle: &Bundle, id: &str) {
    bundle.edit(|v| v["linux"]["cgroupsPath"] = json!(cgroup_path(id)));
}

/// Records anything a deleted container left behind.
fn check_gone(side: &Side, id: &str, warnings: &mut Vec<String>) {
    let found = leftovers(&cgroup_path(id), id, &side.rt.root().join(id));
    report_leftovers(
        &format!("{} left behind after deleting {id}", side.name),
        found,
        warnings,
    );
}

/// The cgroups, mounts and state directory a deleted container left behind. Empty leftover
/// cgroups are removed so a leak in one runtime does not pile up over hundreds of iterations;
/// mounts are left alone.
fn leftovers(cgroup: &str, id: &str, state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let cgroups = leaks::cgroup_dirs(cgroup);
    if !cgroups.is_empty() {
        found.push(format!("cgroups {cgroups:?}"));
        for dir in &cgroups {
            let _ = std::fs::remove_dir(dir);
        }
    }
    let mounts = leaks::mounts_with(id);
    if !mounts.is_empty() {
        found.push(format!("mounts {mounts:?}"));
    }
    if state_dir.exists() {
        found.push(format!("its state directory {}", state_dir.display()));
    }
    found
}

/// A warning "`what`: `found`", on stderr now and in the summary, unless nothing was found.
fn report_leftovers(what: &str, found: Vec<String>, warnings: &mut Vec<String>) {
    if !found.is_empty() {
        let w = format!("{what}: {}", found.join("; "));
        eprintln!("warning: {w}");
        warnings.push(w);
    }
}

/// Progress after iteration `i` (0-based, warm-up included).
fn progress(name: &str, i: usize, warmup: usize, runs: usize) {
    if i < warmup {
        eprintln!("{name}: warm-up {}/{warmup}", i + 1);
    } else {
        eprintln!("{name}: {}/{runs}", i + 1 - warmup);
    }
}

fn make_bench(
    name: &str,
    description: &str,
    runs: usize,
    warmup: usize,
    runtimes: Runtimes,
    goal: Goal,
) -> Bench {
    let ratios = match (&runtimes.trenv, &runtimes.runc) {
        (Outcome::Measured(t), Outcome::Measured(r)) => Some(Ratios {
            runc_over_trenv_p50: round3(r.p50_ms / t.p50_ms),
            runc_over_trenv_p99: round3(r.p99_ms / t.p99_ms),
        }),
        _ => None,
    };
    Bench {
        name: name.to_string(),
        description: description.to_string(),
        runs,
        warmup,
        checkpoint_by: None,
        runtime_types: None,
        runtimes,
        goal_met: ratios.map(|r| {
            r.runc_over_trenv_p50 >= goal.min_runc_over_trenv_p50
                && r.runc_over_trenv_p99 >= goal.min_runc_over_trenv_p99
        }),
        ratios,
        goal,
        notes: Vec::new(),
    }
}

fn stats(samples: &[Duration]) -> Stats {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    Stats {
        p50_ms: round3(nearest_rank(&sorted, 50)),
        p99_ms: round3(nearest_rank(&sorted, 99)),
        mean_ms: round3(mean),
        samples_ms: ms.into_iter().map(round3).collect(),
    }
}

/// Nearest-rank percentile: the smallest sample with at least `pct`% of samples at or below it.
fn nearest_rank(sorted: &[f64], pct: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Integer arithmetic: 0.99 * 100 in floating point must not round to rank 100.
    let rank = (pct * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The `trenv-it` parent cgroups that did not exist when we started; removed at exit if empty.
/// Parents that already existed may belong to tests running concurrently and are left alone.
struct CgroupParents {
    preexisting: Vec<PathBuf>,
}

impl CgroupParents {
    fn snapshot() -> Self {
        Self {
            preexisting: leaks::cgroup_dirs(CGROUP_PARENT),
        }
    }
}

impl Drop for CgroupParents {
    fn drop(&mut self) {
        for dir in leaks::cgroup_dirs(CGROUP_PARENT) {
            if !self.preexisting.contains(&dir) {
                // Fails (harmlessly) while child cgroups remain.
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// machine info and reporting

fn machine_info(trenv: &Side, runc: &Side) -> Result<Machine> {
    let trenv_version = first_line(&trenv.rt.bin, &["--version"])
        .with_context(|| format!("{} --version", trenv.rt.bin.display()))?;
    let runc_version = first_line(&runc.rt.bin, &["--version"]).context("runc --version")?;
    let criu = first_line(Path::new("criu"), &["--version"]).context("criu --version")?;
    let containerd =
        first_line(Path::new("containerd"), &["--version"]).context("containerd --version")?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release")?
        .trim()
        .to_string();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let nproc = std::thread::available_parallelism()
        .map(usize::from)
        .context("counting CPUs")?;
    Ok(Machine {
        nproc,
        cpu_model,
        kernel,
        criu,
        runc: runc_version,
        trenv: trenv_version,
        containerd,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    })
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

fn first_line(bin: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} exited with {}: {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// The command line as a shell would accept it back.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// RFC 3339 UTC, without a date crate.
fn utc_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Day of month 1-31 and month 1-12.
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn render_markdown(s: &Summary) -> String {
    let mut md = String::new();
    // Writing to a String cannot fail; the Results are ignored on purpose.
    let _ = writeln!(md, "# trenv micro-benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `make bench-micro` on {}; regenerated as a whole on every run, so edits here \
         are lost. Raw samples: `target/bench/micro-summary.json`.\n",
        s.timestamp.replacen('T', " ", 1).replace('Z', " UTC")
    );
    let _ = writeln!(md, "Command: `{}`\n", s.command);
    let _ = writeln!(md, "## Machine\n");
    let m = &s.machine;
    let _ = writeln!(md, "- CPUs: {} ({})", m.nproc, m.cpu_model);
    let _ = writeln!(md, "- Kernel: {}", m.kernel);
    let _ = writeln!(md, "- CRIU: {}", m.criu);
    let _ = writeln!(md, "- runc: {}", m.runc);
    let _ = writeln!(md, "- trenv: {} (`{}`)", m.trenv, s.trenv_bin);
    let _ = writeln!(md, "- trenv shim: `{}`", s.trenv_shim_bin);
    let _ = writeln!(md, "- containerd: {}", m.containerd);
    let _ = writeln!(
        md,
        "- Load average (1/5/15 min): {} before, {} after",
        m.loadavg_start, m.loadavg_end
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Wall time of the runtime command (of ctr for `ctr-run`) in milliseconds, trenv and runc \
         iterations interleaved. Percentiles are nearest-rank; with fewer than 100 runs P99 is \
         the slowest sample. A ratio runc/trenv above 1 means trenv is faster.\n"
    );
    for b in &s.benchmarks {
        let _ = writeln!(md, "## {}\n", b.name);
        let _ = writeln!(md, "{}", b.description);
        let _ = write!(
            md,
            "{} timed runs per runtime after {} untimed warm-up rounds.",
            b.runs, b.warmup
        );
        if let Some(by) = &b.checkpoint_by {
            let _ = write!(
                md,
                " Both runtimes restore the same checkpoint, made by {by}."
            );
        }
        if let Some(types) = &b.runtime_types {
            let _ = write!(
                md,
                " trenv.v2 is {}, runc.v2 is {}.",
                types.trenv, types.runc
            );
        }
        let _ = writeln!(md, "\n");
        let (trenv, runc) = labels(b);
        let _ = writeln!(md, "| runtime | P50 (ms) | P99 (ms) | mean (ms) |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        let mut errors = Vec::new();
        for (name, outcome) in [(trenv, &b.runtimes.trenv), (runc, &b.runtimes.runc)] {
            match outcome {
                Outcome::Measured(st) => {
                    let _ = writeln!(
                        md,
                        "| {name} | {:.2} | {:.2} | {:.2} |",
                        st.p50_ms, st.p99_ms, st.mean_ms
                    );
                }
                Outcome::Failed { error } => {
                    let _ = writeln!(md, "| {name} | failed | failed | failed |");
                    errors.push((name, error));
                }
            }
        }
        let _ = writeln!(md);
        match (&b.ratios, b.goal_met) {
            (Some(r), Some(met)) => {
                let _ = writeln!(md, "- {runc}/{trenv} at P50: {:.2}", r.runc_over_trenv_p50);
                let _ = writeln!(md, "- {runc}/{trenv} at P99: {:.2}", r.runc_over_trenv_p99);
                let _ = writeln!(
                    md,
                    "- goal: {}: {}",
                    b.goal.description,
                    if met { "met" } else { "not met" }
                );
            }
            _ => {
                let _ = writeln!(md, "- no ratio: {runc} has no numbers");
            }
        }
        for (name, error) in errors {
            let _ = writeln!(md, "\n{name} failed:\n\n```\n{}\n```", clip(error, 30));
        }
        for note in &b.notes {
            let _ = writeln!(md, "\nNote:\n\n```\n{}\n```", clip(note, 30));
        }
        let _ = writeln!(md);
    }
    if !s.warnings.is_empty() {
        let _ = writeln!(md, "## Warnings\n");
        for w in &s.warnings {
            let _ = writeln!(md, "- {}", w.replace('\n', " "));
        }
        let _ = writeln!(md);
    }
    md
}

/// How a benchmark's table names its two sides: "trenv" and "runc", or for `ctr-run` the
/// runtime types without their "io.containerd." prefix ("trenv.v2", "runc.v2").
fn labels(b: &Bench) -> (&str, &str) {
    match &b.runtime_types {
        Some(t) => (
            t.trenv.strip_prefix("io.containerd.").unwrap_or(&t.trenv),
            t.runc.strip_prefix("io.containerd.").unwrap_or(&t.runc),
        ),
        None => ("trenv", "runc"),
    }
}

/// At most `n` lines of `text`, so a long CRIU log cannot swamp the page.
fn clip(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= n {
        return text.trim_end().to_string();
    }
    format!(
        "{}\n... ({} more lines in target/bench/micro-summary.json)",
        lines[..n].join("\n"),
        lines.len() - n
    )
}
