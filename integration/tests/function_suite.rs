//! The function suite through `trenv-bench`, the load generator: every function of
//! examples/functions answers correctly under every mode (runc, plain CRIU, trenv's pool,
//! trenv with templates), the report is complete and valid, and a missing image or a
//! function that crashes costs its own requests only, never the run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use trenv_integration::leaks::{mounts_with, processes_with};
use trenv_integration::loadgen::manifest::Manifest;
use trenv_integration::{cache_dir, require_root, workspace};

/// One run at a time: each test checks that its run left nothing, which another run in
/// progress would look like.
static ONE_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_run() -> std::sync::MutexGuard<'static, ()> {
    ONE_RUN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trenv-bench"))
        .current_dir(workspace())
        .args(args)
        .arg("--quiet")
        .output()
        .expect("trenv-bench")
}

fn images() -> String {
    cache_dir()
        .join("images/functions/functions-oci.tar")
        .display()
        .to_string()
}

fn summary(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json"))
        .expect("summary.json is JSON")
}

fn run_of<'a>(s: &'a Value, mode: &str) -> &'a Value {
    s["runs"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["mode"] == mode))
        .unwrap_or_else(|| panic!("no {mode} run in {s}"))
}

fn paths(run: &Value) -> Vec<String> {
    run["paths"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Nothing of a run is left: its containerd directories, cgroups, mounts, network
/// namespaces and processes.
fn assert_nothing_left(pid: u32) {
    let tag = format!("trenv-bench-{pid}-");
    let dirs: Vec<PathBuf> = std::fs::read_dir("/run")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(&tag))
                .collect()
        })
        .unwrap_or_default();
    assert!(dirs.is_empty(), "left: {dirs:?}");
    let cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains(&tag))
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    assert!(mounts_with(&tag).is_empty(), "{:?}", mounts_with(&tag));
    assert!(
        processes_with(&tag).is_empty(),
        "{:?}",
        processes_with(&tag)
    );
    let netns = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("trenv-bench-runc-")
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(netns, 0, "network namespaces of runc instances left");
}

fn is_png(p: &Path) -> bool {
    let b = std::fs::read(p).unwrap_or_default();
    // Signature, then IHDR with a non-zero width and height.
    b.len() > 1000
        && b.starts_with(b"\x89PNG\r\n\x1a\n")
        && &b[12..16] == b"IHDR"
        && u32::from_be_bytes([b[16], b[17], b[18], b[19]]) > 0
        && u32::from_be_bytes([b[20], b[21], b[22], b[23]]) > 0
}

fn is_svg(p: &Path) -> bool {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    t.contains("<svg")
        && t.trim_end().ends_with("</svg>")
        && (t.contains("<polyline") || t.contains("<rect"))
}

fn validate_schema(summary: &Path) {
    let script = "import json,sys,jsonschema\n\
                  s=json.load(open(sys.argv[1])); d=json.load(open(sys.argv[2]))\n\
                  jsonschema.validate(d, s, cls=jsonschema.Draft202012Validator)\n";
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(workspace().join("integration/bench/summary.schema.json"))
        .arg(summary)
        .output()
        .expect("python3 (jsonschema)");
    assert!(
        out.status.success(),
        "summary.json does not match its schema: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_function_answers_under_every_mode() {
    require_root();
    let _one = one_run();
    let manifest = Manifest::load(&workspace().join("examples/functions/functions.toml")).unwrap();
    let n = manifest.functions.len();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().display().to_string();
    // Two rounds, no keep-alive: every call makes an instance; under trenv the second round
    // comes from the templates prepared before the run.
    let started = Instant::now();
    let r = bench(&[
        "--images",
        &images(),
        "--modes",
        "runc,criu,trenv-pool,trenv",
        "--workloads",
        "func",
        "--func-rounds",
        "2",
        "--keep-alive-secs",
        "0",
        "--template-keep-alive-secs",
        "0",
        "--out",
        &o,
        "--fail-on-errors",
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "trenv-bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    eprintln!("{stdout}\n(took {:?})", started.elapsed());
    let s = summary(out.path());
    validate_schema(&out.path().join("summary.json"));
    for mode in ["runc", "criu", "trenv-pool", "trenv"] {
        let run = run_of(&s, mode);
        assert_eq!(run["requests"], 2 * n as u64, "{mode}");
        assert_eq!(run["errors"], 0, "{mode}: {}", run["error_samples"]);
        for f in &manifest.functions {
            assert_eq!(
                run["per_function"][&f.name]["requests"], 2,
                "{mode}/{}",
                f.name
            );
            assert_eq!(
                run["per_function"][&f.name]["errors"], 0,
                "{mode}/{}",
                f.name
            );
        }
        let p = paths(run);
        let allowed: &[&str] = match mode {
            "runc" => &["cold"],
            "criu" => &["criu"],
            "trenv-pool" => &["cold", "pool", "repurpose"],
            _ => &["template", "spare"],
        };
        assert!(
            p.iter().all(|x| allowed.contains(&x.as_str())),
            "{mode}: paths {p:?}"
        );
        assert!(run["e2e_ms"]["p50"].as_f64().unwrap() > 0.0);
        assert!(
            run["memory"]["peak_mib"].as_f64().unwrap() > 0.0,
            "{mode}: no memory sampled"
        );
    }
    // Every invocation is in the raw samples, with its answer checked.
    let lines = std::fs::read_to_string(out.path().join("invocations.jsonl")).unwrap();
    let rows: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 8 * n);
    assert!(rows.iter().all(|r| r["ok"] == true));
    // Plots: a latency CDF, memory over time and the start breakdown, each as PNG and SVG.
    for name in ["func-e2e-cdf", "func-memory", "func-start-breakdown"] {
        let base = out.path().join("plots").join(name);
        assert!(is_png(&base.with_extension("png")), "{name}.png");
        assert!(is_svg(&base.with_extension("svg")), "{name}.svg");
    }
    assert_nothing_left_of_any_run();
}

/// No run of trenv-bench is left behind (tests run one trenv-bench at a time).
fn assert_nothing_left_of_any_run() {
    let left: Vec<String> = std::fs::read_dir("/run")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("trenv-bench-"))
                .collect()
        })
        .unwrap_or_default();
    for l in &left {
        if let Some(pid) = l.split('-').nth(2).and_then(|p| p.parse().ok()) {
            assert_nothing_left(pid);
        }
    }
    assert!(left.is_empty(), "left: {left:?}");
}

#[test]
fn a_missing_image_or_a_crashing_function_fails_its_requests_not_the_run() {
    require_root();
    let _one = one_run();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("functions.toml");
    std::fs::write(
        &manifest,
        r#"
[[function]]
name = "hello"
image = "docker.io/trenv/fn-hello:latest"
memory_mib = 64
request = "/run"
answer = "hello, world"

[[function]]
name = "ghost"
image = "docker.io/trenv/fn-ghost:latest"
memory_mib = 64
request = "/run"
answer = "boo"

[[function]]
name = "crash"
image = "docker.io/trenv/fn-hello:latest"
memory_mib = 64
request = "/run"
answer = "never"
args = ["python3", "-c", "import sys; print('crashing on purpose', flush=True); sys.exit(3)"]
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let started = Instant::now();
    let r = bench(&[
        "--manifest",
        &manifest.display().to_string(),
        "--images",
        &images(),
        "--modes",
        "runc,trenv",
        "--workloads",
        "func",
        "--func-rounds",
        "2",
        "--out",
        &out.display().to_string(),
        "--fail-on-errors",
    ]);
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&r.stdout);
    // The run completes and reports; --fail-on-errors turns the failed requests into exit 1.
    assert_eq!(
        r.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(took < Duration::from_secs(240), "took {took:?}");
    let s = summary(&out);
    validate_schema(&out.join("summary.json"));
    for mode in ["runc", "trenv"] {
        let run = run_of(&s, mode);
        assert_eq!(run["requests"], 6);
        assert_eq!(run["errors"], 4, "{mode}: {run}");
        assert_eq!(run["per_function"]["hello"]["errors"], 0, "{mode}");
        assert_eq!(run["per_function"]["ghost"]["errors"], 2, "{mode}");
        assert_eq!(run["per_function"]["crash"]["errors"], 2, "{mode}");
        let errors = run["error_samples"].to_string();
        assert!(errors.contains("fn-ghost"), "{mode}: {errors}");
        assert!(
            errors.contains("exited before it was ready"),
            "{mode}: {errors}"
        );
        assert!(
            errors.contains("crashing on purpose"),
            "{mode}: the function's output: {errors}"
        );
        assert!(
            run["notes"].to_string().contains("ghost"),
            "{mode}: {}",
            run["notes"]
        );
    }
    // The crash could not become a template: trenv says so and the hello template serves.
    let trenv = run_of(&s, "trenv");
    assert!(
        trenv["notes"].to_string().contains("crash: not prepared"),
        "{}",
        trenv["notes"]
    );
    let rows: Vec<Value> = std::fs::read_to_string(out.join("invocations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let hello: Vec<&str> = rows
        .iter()
        .filter(|r| r["mode"] == "trenv" && r["function"] == "hello")
        .filter_map(|r| r["path"].as_str())
        .collect();
    // The first call restores from the template; the second may reuse that instance.
    assert!(
        matches!(hello.first(), Some(&"spare" | &"template"))
            && hello
                .iter()
                .all(|p| ["spare", "template", "warm"].contains(p)),
        "{hello:?}"
    );
    assert_nothing_left_of_any_run();
}
