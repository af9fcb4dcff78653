//! Pods through containerd's CRI plugin with the `trenv` runtime handler: the calls kubelet
//! makes, in kubelet's order, from a CRI client of the project's own (no kubelet or crictl
//! is packaged here).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use trenv_integration::containerd::{Containerd, BUSYBOX, PAUSE, PYTHON};
use trenv_integration::cri::{self, v1, Cri};
use trenv_integration::{http, leaks, require_root, unique_id, wait_for};

/// The parent of the tests' pod cgroups, as kubelet's `/kubepods` would be.
const KUBEPODS: &str = "/trenv-it-kubepods";

/// A node: containerd with CRI, the project's images known to CRI, and a CRI client. Pods
/// left by a failing test are deleted when it drops.
struct Node {
    cri: Cri,
    logs: tempfile::TempDir,
    containerd: Containerd,
}

impl Node {
    fn start() -> Self {
        require_root();
        let containerd = Containerd::start_cri();
        containerd.import_busybox();
        containerd.import_python();
        let cri = Cri::connect(&containerd.socket()).expect("CRI client");
        // CRI learns of imported images from containerd's events.
        let known = wait_for(Duration::from_secs(20), || {
            let images = cri.list_images().ok()?;
            [BUSYBOX, PYTHON, PAUSE]
                .iter()
                .all(|i| images.iter().any(|k| k == i))
                .then_some(())
        });
        assert!(
            known.is_some(),
            "images unknown to CRI: {:?}",
            cri.list_images()
        );
        let logs = tempfile::Builder::new()
            .prefix("trenv-it-pods-")
            .tempdir()
            .expect("log dir");
        Self {
            cri,
            logs,
            containerd,
        }
    }

    /// A pod config with a log directory of its own.
    fn pod_config(&self, name: &str) -> v1::PodSandboxConfig {
        let dir = self.logs.path().join(unique_id(name));
        std::fs::create_dir_all(&dir).expect("pod log dir");
        cri::pod_config(name, &dir, KUBEPODS)
    }

    fn run_pod(&self, config: &v1::PodSandboxConfig) -> String {
        self.cri
            .run_pod(config, "trenv")
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.containerd.log()))
    }

    fn run(&self, pod: &str, pod_config: &v1::PodSandboxConfig, c: &v1::ContainerConfig) -> String {
        self.cri
            .run_container(pod, c, pod_config)
            .unwrap_or_else(|e| panic!("container: {e}\n{}", self.containerd.log()))
    }

    /// GET of :8080/ over the pod's loopback, from inside container `id` (busybox wget).
    fn local_get(&self, id: &str) -> Result<v1::ExecSyncResponse, tonic::Status> {
        self.cri
            .exec_sync(id, &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"], 10)
    }

    /// Deletes a pod and checks that nothing of it is left: containers, cgroups, mounts,
    /// processes, network namespace.
    fn delete_and_check(&self, pod: &str, pod_config: &v1::PodSandboxConfig) {
        let netns = self
            .cri
            .pod_status(pod)
            .ok()
            .and_then(|(_, info)| info.get("info").cloned())
            .and_then(|i| serde_json::from_str::<serde_json::Value>(&i).ok())
            .and_then(|i| {
                i["runtimeSpec"]["linux"]["namespaces"]
                    .as_array()?
                    .iter()
                    .find(|n| n["type"] == "network")?["path"]
                    .as_str()
                    .map(str::to_string)
            });
        self.cri.delete_pod(pod).expect("delete pod");
        assert!(!self
            .cri
            .list_pods()
            .expect("pods")
            .contains(&pod.to_string()));
        let listed = self.containerd.ctr_ok(&["containers", "list", "-q"]);
        assert!(!listed.contains(pod), "{listed}");
        let parent = pod_cgroup(pod_config);
        let gone = wait_for(Duration::from_secs(5), || {
            leaks::cgroup_dirs(&parent)
                .iter()
                .all(|d| {
                    std::fs::read_dir(d).map_or(true, |e| e.flatten().all(|e| !e.path().is_dir()))
                })
                .then_some(())
        });
        assert!(
            gone.is_some(),
            "container cgroups left under {parent}: {:?}",
            leaks::cgroup_dirs(&parent)
        );
        remove_cgroup(&parent);
        let m = leaks::mounts_with(pod);
        assert!(m.is_empty(), "mounts of {pod} left: {m:?}");
        if let Some(ns) = netns {
            assert!(!Path::new(&ns).exists(), "network namespace {ns} left");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let errors = self.cri.delete_all_pods();
        if !errors.is_empty() && !std::thread::panicking() {
            panic!("deleting pods: {errors:?}");
        }
        for d in leaks::cgroup_dirs(KUBEPODS) {
            for pod in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(pod.path());
            }
            // Other tests' pods may still be there: then it stays, and their drop removes it.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The working set of CRI memory stats, 0 when not reported.
fn working_set(memory: Option<v1::MemoryUsage>) -> u64 {
    memory
        .and_then(|m| m.working_set_bytes)
        .map_or(0, |v| v.value)
}

/// The pod's cgroup, which kubelet makes and removes.
fn pod_cgroup(config: &v1::PodSandboxConfig) -> String {
    config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default()
}

fn remove_cgroup(path: &str) {
    for d in leaks::cgroup_dirs(path) {
        let _ = std::fs::remove_dir(d);
    }
}

/// GET `path` from the host, retried for a while; the response.
fn http_get(ip: &str, port: u16, path: &str) -> String {
    http::get(ip, port, path, Duration::from_secs(20))
}

/// The lines of a CRI log file (`<RFC3339Nano> <stream> <P|F> <text>`) of `stream`.
fn log_lines(path: &Path, stream: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            let ts = f.next()?;
            chrono::DateTime::parse_from_rfc3339(ts).ok()?;
            (f.next()? == stream && f.next()? == "F").then(|| f.next().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn a_pod_runs_busybox_and_python_sharing_its_network() {
    let node = Node::start();
    let config = node.pod_config("web");
    let t = Instant::now();
    let pod = node.run_pod(&config);
    eprintln!("RunPodSandbox: {:?}", t.elapsed());
    let (status, info) = node.cri.pod_status(&pod).expect("pod status");
    assert_eq!(status.state, v1::PodSandboxState::SandboxReady as i32);
    assert!(info
        .get("info")
        .is_some_and(|i| i.contains("io.containerd.trenv.v2")));
    let ip = node.cri.pod_ip(&pod).expect("pod ip");
    // CRI owns pod networking: the shim keeps no sandbox pool in CRI's namespace.
    assert!(!node.containerd.pool_dir().exists(), "a pool in k8s.io");

    let sh = cri::container_config(
        "shell",
        BUSYBOX,
        &["sh", "-c", "echo to-out; echo to-err >&2; exec sleep 3600"],
    );
    let sh = node.run(&pod, &config, &sh);
    let py = cri::with_env(
        cri::container_config("web", PYTHON, &["python3", "-m", "http.server", "8080"]),
        &[("GREETING", "hi")],
    );
    let py = node.run(&pod, &config, &py);

    // The pod IP answers from the host; the busybox container reaches the Python one over
    // the pod's loopback: one network namespace.
    assert!(http_get(&ip, 8080, "/").contains("Directory listing"));
    let out = wait_for(Duration::from_secs(10), || {
        let r = node.local_get(&sh).ok()?;
        (r.exit_code == 0).then_some(r)
    })
    .expect("busybox reaches Python over the pod's loopback");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Directory listing"));
    // Same UTS namespace: the pod's hostname in both.
    for c in [&sh, &py] {
        let r = node
            .cri
            .exec_sync(c, &["cat", "/proc/sys/kernel/hostname"], 10)
            .expect("exec");
        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "web");
    }

    // ExecSync: output, stderr and exit code, and the container's environment.
    let r = node
        .cri
        .exec_sync(&sh, &["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
        .expect("exec");
    assert_eq!(r.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    let r = node
        .cri
        .exec_sync(
            &py,
            &["python3", "-c", "import os; print(os.environ['GREETING'])"],
            20,
        )
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hi\n");
    // A command that outlives its timeout is ended with an error, not waited for.
    let t = Instant::now();
    let slow = node.cri.exec_sync(&sh, &["sleep", "30"], 1);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(slow.is_err() || slow.is_ok_and(|r| r.exit_code != 0));

    // Logs in CRI's format, at the path CRI gave.
    let status = node.cri.container_status(&sh).expect("status");
    let log = Path::new(&status.log_path);
    assert!(
        log.starts_with(&config.log_directory),
        "{}",
        status.log_path
    );
    let seen = wait_for(Duration::from_secs(10), || {
        (log_lines(log, "stdout") == ["to-out"] && log_lines(log, "stderr") == ["to-err"])
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "log {}: {:?}",
        log.display(),
        std::fs::read_to_string(log)
    );

    // Stats of a container and of the pod.
    let stats = node.cri.container_stats(&py).expect("container stats");
    let mem = stats.memory.expect("memory stats");
    assert!(
        mem.working_set_bytes.map_or(0, |v| v.value) > 1 << 20,
        "{mem:?}"
    );
    let cpu = stats.cpu.expect("cpu stats");
    assert!(
        cpu.usage_core_nano_seconds.map_or(0, |v| v.value) > 0,
        "{cpu:?}"
    );
    let pod_stats = node.cri.pod_stats(&pod).expect("pod stats");
    let linux = pod_stats.linux.expect("linux pod stats");
    assert!(working_set(linux.memory) > 0);
    assert_eq!(linux.containers.len(), 2, "{:?}", linux.containers);

    // UpdateContainerResources reaches the container's cgroup.
    node.cri
        .update_resources(
            &sh,
            v1::LinuxContainerResources {
                memory_limit_in_bytes: 96 << 20,
                cpu_shares: 512,
                ..Default::default()
            },
        )
        .expect("update resources");
    let r = node
        .cri
        .exec_sync(
            &sh,
            &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"],
            10,
        )
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        (96u64 << 20).to_string()
    );

    // StopContainer ends the process (SIGTERM, then SIGKILL after the grace period).
    let t = Instant::now();
    node.cri.stop_container(&sh, 2).expect("stop");
    assert!(t.elapsed() < Duration::from_secs(10));
    let st = node.cri.container_status(&sh).expect("status");
    assert_eq!(st.state, v1::ContainerState::ContainerExited as i32);
    node.cri.remove_container(&sh).expect("remove");
    assert!(!node.cri.list_containers().expect("list").contains(&sh));

    node.delete_and_check(&pod, &config);
}

/// A template and readiness probe for a function's pod, as a Kubernetes pod spec gives them
/// (pod annotations: CRI passes them to the sandbox and to every container of the pod).
fn function_pod_annotations() -> HashMap<String, String> {
    HashMap::from([
        ("io.trenv.template".to_string(), "auto".to_string()),
        ("io.trenv.ready".to_string(), "http:8080/ready".to_string()),
    ])
}

/// A Python function container with state worth a template and a memory limit.
fn function_container(name: &str) -> v1::ContainerConfig {
    let mut c = cri::with_env(
        cri::container_config(name, PYTHON, &["python3", "-c", http::COUNTING_FUNCTION]),
        &[("FN", "f1")],
    );
    c.linux = Some(v1::LinuxContainerConfig {
        resources: Some(v1::LinuxContainerResources {
            memory_limit_in_bytes: 256 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

#[test]
fn a_pod_container_starts_from_its_template_on_its_second_run() {
    let node = Node::start();
    let events = node.containerd.events();
    let mut pods = Vec::new();
    let mut took = Vec::new();
    // Two replicas of one function: pods of other names (hostnames), one template.
    for name in ["fn-a", "fn-b"] {
        let mut config = node.pod_config(name);
        config.annotations = function_pod_annotations();
        let t = Instant::now();
        let pod = node.run_pod(&config);
        let id = node.run(&pod, &config, &function_container("fn"));
        let ip = node.cri.pod_ip(&pod).expect("pod ip");
        let answer = http::get_body(&ip, 8080, "/", Duration::from_secs(20));
        took.push(t.elapsed());
        // Its own state: the template's count (0, the probe does not count) plus this request.
        assert_eq!(answer, "fn=f1 count=1 state=16777216");
        if pods.is_empty() {
            let built = events.wait("/trenv/template/built", &id, Duration::from_secs(90));
            assert!(built.is_some(), "no template built: {}", events.text());
        } else {
            let restored = events.wait("/trenv/template/restored", &id, Duration::from_secs(10));
            assert!(
                restored.is_some(),
                "not restored: {}\n{}",
                events.text(),
                node.containerd.log()
            );
        }
        // The pod's own hostname, not the template's.
        let r = node
            .cri
            .exec_sync(&id, &["cat", "/proc/sys/kernel/hostname"], 10)
            .expect("exec");
        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), name);
        pods.push((pod, config, id, ip));
    }
    eprintln!(
        "pod start to first answer: cold {:?}, from template {:?}",
        took[0], took[1]
    );
    assert!(took[1] < took[0], "{took:?}");
    let (pod, config, id, ip) = &pods[1];
    // The restored process is in the pod: a sidecar reaches it over the pod's loopback, and
    // it shares the pod's IPC namespace. The sidecar's own annotation overrides the pod's.
    let mut side = cri::container_config("side", BUSYBOX, &["sleep", "3600"]);
    side.annotations = HashMap::from([("io.trenv.template".to_string(), "off".to_string())]);
    let side = node.run(pod, config, &side);
    let r = node.local_get(&side).expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "fn=f1 count=2 state=16777216"
    );
    let ns = |c: &str, kind: &str| {
        let r = node
            .cri
            .exec_sync(c, &["readlink", &format!("/proc/1/ns/{kind}")], 10)
            .expect("exec");
        String::from_utf8_lossy(&r.stdout).trim().to_string()
    };
    for kind in ["net", "ipc", "uts"] {
        assert_eq!(
            ns(id, kind),
            ns(&side, kind),
            "{kind} namespace not the pod's"
        );
    }
    assert_eq!(
        http::get_body(ip, 8080, "/", Duration::from_secs(5)),
        "fn=f1 count=3 state=16777216"
    );
    // Stats and logs of a restored container, as of any other.
    let stats = node.cri.container_stats(id).expect("stats");
    assert!(working_set(stats.memory) > 0);
    let log = node.cri.container_status(id).expect("status").log_path;
    let served = wait_for(Duration::from_secs(5), || {
        log_lines(Path::new(&log), "stdout")
            .contains(&"served 3".to_string())
            .then_some(())
    });
    assert!(served.is_some(), "{:?}", std::fs::read_to_string(&log));
    for (pod, config, _, _) in &pods {
        node.delete_and_check(pod, config);
    }
}

#[test]
fn bad_requests_get_clear_cri_errors_and_leave_nothing() {
    let node = Node::start();
    let config = node.pod_config("bad");
    let e = node
        .cri
        .run_pod(&config, "no-such-handler")
        .expect_err("unknown handler");
    assert!(e.message().contains("no-such-handler"), "{e:?}");
    assert!(node.cri.list_pods().expect("pods").is_empty());

    // A pod annotation trenv cannot read: RunPodSandbox fails and says which.
    let mut bad_pod = node.pod_config("bad-pod");
    bad_pod.annotations = HashMap::from([("io.trenv.pool".to_string(), "sometimes".to_string())]);
    let e = node
        .cri
        .run_pod(&bad_pod, "trenv")
        .expect_err("malformed pod annotation");
    assert!(e.message().contains("io.trenv.pool"), "{e:?}");

    // A container annotation trenv cannot read: StartContainer (where the task is made)
    // fails and says which; the pod keeps running and takes another container.
    let pod = node.run_pod(&config);
    for (key, value) in [
        ("io.trenv.ready", "when-it-feels-like-it"),
        ("io.trenv.template", "no spaces allowed"),
    ] {
        let mut c = cri::container_config("c", BUSYBOX, &["sleep", "3600"]);
        c.metadata = Some(v1::ContainerMetadata {
            name: unique_id("c"),
            attempt: 0,
        });
        c.annotations = HashMap::from([(key.to_string(), value.to_string())]);
        let e = node
            .cri
            .run_container(&pod, &c, &config)
            .expect_err("malformed annotation");
        assert!(e.message().contains(key), "{key}: {e:?}");
    }
    let ok = node.run(
        &pod,
        &config,
        &cri::container_config("ok", BUSYBOX, &["sleep", "3600"]),
    );
    let r = node.cri.exec_sync(&ok, &["true"], 10).expect("exec");
    assert_eq!(r.exit_code, 0);
    // An image CRI does not have.
    let e = node
        .cri
        .create_container(
            &pod,
            &cri::container_config("x", "docker.io/local/absent:1", &["true"]),
            &config,
        )
        .expect_err("absent image");
    assert!(e.message().contains("absent"), "{e:?}");
    node.delete_and_check(&pod, &config);
}

#[test]
fn twenty_pods_start_concurrently() {
    let node = Node::start();
    let socket = node.containerd.socket();
    let configs: Vec<_> = (0..20)
        .map(|i| node.pod_config(&format!("many-{i}")))
        .collect();
    let t = Instant::now();
    let pods: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = configs
            .iter()
            .map(|config| {
                let socket = socket.clone();
                s.spawn(move || {
                    let cri = Cri::connect(&socket).expect("client");
                    let pod = cri.run_pod(config, "trenv").expect("RunPodSandbox");
                    let c = cri::container_config("sleeper", BUSYBOX, &["sleep", "3600"]);
                    let id = cri.run_container(&pod, &c, config).expect("container");
                    (pod, id)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    eprintln!("20 pods with a container each: {:?}", t.elapsed());
    let mut ips = std::collections::HashSet::new();
    for (pod, id) in &pods {
        assert!(
            ips.insert(node.cri.pod_ip(pod).expect("ip")),
            "IP given twice"
        );
        let st = node.cri.container_status(id).expect("status");
        assert_eq!(st.state, v1::ContainerState::ContainerRunning as i32);
    }
    for ((pod, _), config) in pods.iter().zip(&configs) {
        node.delete_and_check(pod, config);
    }
}

#[test]
fn pods_keep_running_across_a_containerd_restart() {
    let mut node = Node::start();
    let config = node.pod_config("survivor");
    let pod = node.run_pod(&config);
    let web = node.run(
        &pod,
        &config,
        &cri::container_config("web", PYTHON, &["python3", "-m", "http.server", "8080"]),
    );
    let ip = node.cri.pod_ip(&pod).expect("ip");
    http_get(&ip, 8080, "/");
    node.containerd.stop();
    // The pod serves while containerd is away.
    http_get(&ip, 8080, "/");
    node.containerd.resume();
    node.cri = Cri::connect(&node.containerd.socket()).expect("client");
    let ready = wait_for(Duration::from_secs(20), || {
        let (st, _) = node.cri.pod_status(&pod).ok()?;
        (st.state == v1::PodSandboxState::SandboxReady as i32).then_some(())
    });
    assert!(
        ready.is_some(),
        "pod not ready after restart: {:?}",
        node.cri.pod_status(&pod)
    );
    assert_eq!(
        node.cri.container_status(&web).expect("status").state,
        v1::ContainerState::ContainerRunning as i32
    );
    let r = node
        .cri
        .exec_sync(&web, &["python3", "-c", "print(6*7)"], 20)
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "42\n");
    // A new container in the old pod, then the whole pod goes.
    let late = node.run(
        &pod,
        &config,
        &cri::container_config("late", BUSYBOX, &["sleep", "3600"]),
    );
    assert_eq!(
        node.cri
            .exec_sync(&late, &["true"], 10)
            .expect("exec")
            .exit_code,
        0
    );
    node.delete_and_check(&pod, &config);
}

#[test]
fn exec_and_attach_stream_through_the_cri_streaming_server() {
    let node = Node::start();
    let config = node.pod_config("stream");
    let pod = node.run_pod(&config);
    let sh = node.run(
        &pod,
        &config,
        &cri::container_config("sh", BUSYBOX, &["sleep", "3600"]),
    );
    let streamed = |url: &str, input: &[u8]| {
        cri::stream(url, input, Duration::from_secs(30), |_| false).expect("stream")
    };
    // Output, errors and the exit status, as `kubectl exec` shows them.
    let url = node
        .cri
        .exec_url(&sh, &["sh", "-c", "echo out; echo err >&2; exit 3"], false)
        .expect("Exec");
    let s = streamed(&url, b"");
    assert_eq!(s.stdout_text(), "out\n");
    assert_eq!(String::from_utf8_lossy(&s.stderr), "err\n");
    let status = s.status.expect("an exit status");
    assert!(
        status.contains("NonZeroExitCode") && status.contains("\"3\""),
        "{status}"
    );
    let url = node.cri.exec_url(&sh, &["true"], false).expect("Exec");
    let status = streamed(&url, b"").status.expect("an exit status");
    assert!(status.contains("Success"), "{status}");
    // Input reaches the process.
    let url = node
        .cri
        .exec_url(&sh, &["head", "-n", "1"], true)
        .expect("Exec");
    assert_eq!(streamed(&url, b"typed\n").stdout_text(), "typed\n");

    // Attach to a running container that reads its stdin.
    let mut reader = cri::container_config(
        "reader",
        BUSYBOX,
        &["sh", "-c", "while read l; do echo got:$l; done"],
    );
    reader.stdin = true;
    let reader = node.run(&pod, &config, &reader);
    let url = node.cri.attach_url(&reader, true).expect("Attach");
    let s = cri::stream(&url, b"hello\n", Duration::from_secs(30), |s| {
        s.stdout_text().contains("got:hello")
    })
    .expect("attach stream");
    assert!(s.stdout_text().contains("got:hello"), "{s:?}");
    node.delete_and_check(&pod, &config);
}
