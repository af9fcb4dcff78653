//! The task state machine behind the ttrpc calls, driven through a fake backend (no
//! containers: requests are recorded and answered with made-up pids) and a fake event
//! sink. The real backend is covered by the integration tests.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::api;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::ExitSignal;

use super::Service;
use crate::backend::{Backend, Events};
use crate::config::Timeouts;
use crate::zygote::{Failure, FailureKind, Request, ZygoteError};

type Hook = Box<dyn Fn(i32) + Send + Sync>;
/// Makes the error a failing request returns, given the request's name.
type Failing = fn(&'static str) -> ZygoteError;

/// Answers requests with pids counting up from 1000 and records them as `"name id"`.
#[derive(Default)]
struct FakeBackend {
    calls: Mutex<Vec<String>>,
    next_pid: AtomicI32,
    /// Request names that fail, and how.
    fail: Mutex<HashMap<&'static str, Failing>>,
    /// Called with the pid a Start or Exec request started (or failed to), before the
    /// request returns.
    on_start: Mutex<Option<Hook>>,
    /// The pid of each created init, by task id.
    inits: Mutex<HashMap<String, i32>>,
}

impl FakeBackend {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn fail_with(&self, op: &'static str, f: Failing) {
        self.fail.lock().unwrap().insert(op, f);
    }
}

impl Backend for FakeBackend {
    fn call(
        &self,
        req: &Request,
        _fds: &[RawFd],
        _deadline: Duration,
    ) -> Result<Option<i32>, ZygoteError> {
        let (id, pid) = match req {
            Request::Create { id, .. } => {
                let pid = 1000 + self.next_pid.fetch_add(1, Ordering::SeqCst);
                self.inits.lock().unwrap().insert(id.clone(), pid);
                (id.clone(), Some(pid))
            }
            Request::Exec { id, .. } => (
                id.clone(),
                Some(1000 + self.next_pid.fetch_add(1, Ordering::SeqCst)),
            ),
            Request::Start { id, .. }
            | Request::Kill { id, .. }
            | Request::Delete { id, .. }
            | Request::Pause { id, .. }
            | Request::Resume { id, .. } => (id.clone(), None),
            _ => (String::new(), None),
        };
        self.calls
            .lock()
            .unwrap()
            .push(format!("{} {id}", req.name()));
        let started = match req {
            Request::Start { id, .. } => self.inits.lock().unwrap().get(id).copied(),
            Request::Exec { .. } => pid,
            _ => None,
        };
        if let (Some(p), Some(hook)) = (started, &*self.on_start.lock().unwrap()) {
            hook(p);
        }
        if let Some(f) = self.fail.lock().unwrap().get(req.name()) {
            return Err(f(req.name()));
        }
        Ok(pid)
    }
}

/// Records the topics of published events.
#[derive(Default)]
struct FakeEvents(Mutex<Vec<String>>);

impl FakeEvents {
    fn topics(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Events for FakeEvents {
    fn publish(&self, topic: &str, namespace: &str, _event: Box<dyn MessageDyn>) {
        assert_eq!(namespace, "ns");
        self.0.lock().unwrap().push(topic.to_string());
    }
}

struct Harness {
    service: Service<FakeBackend, FakeEvents>,
    backend: Arc<FakeBackend>,
    events: Arc<FakeEvents>,
    bundle: tempfile::TempDir,
}

fn harness() -> Harness {
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(
        bundle.path().join("config.json"),
        r#"{"ociVersion":"1.0.2","process":{"args":["/bin/true"],"cwd":"/"},"root":{"path":"rootfs"}}"#,
    )
    .unwrap();
    let backend = Arc::new(FakeBackend::default());
    let events = Arc::new(FakeEvents::default());
    let service = Service::with_parts(
        "ns",
        backend.clone(),
        events.clone(),
        Arc::new(ExitSignal::default()),
        None,
        "",
        Timeouts::default(),
    );
    Harness {
        service,
        backend,
        events,
        bundle,
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ttrpc::Error>) -> Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

impl Harness {
    fn bundle(&self) -> &Path {
        self.bundle.path()
    }

    fn create(&self, id: &str) -> Result<u32, ttrpc::Error> {
        self.service
            .create(api::CreateTaskRequest {
                id: id.into(),
                bundle: self.bundle().to_string_lossy().into_owned(),
                ..Default::default()
            })
            .map(|r| r.pid)
    }

    fn start(&self, id: &str, exec: &str) -> Result<u32, ttrpc::Error> {
        self.service
            .start(api::StartRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .map(|r| r.pid)
    }

    fn exec(&self, id: &str, exec: &str) -> Result<api::Empty, ttrpc::Error> {
        let spec = containerd_shim::protos::protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["/bin/true"],"cwd":"/"}"#.to_vec(),
            ..Default::default()
        };
        self.service.exec(api::ExecProcessRequest {
            id: id.into(),
            exec_id: exec.into(),
            spec: Some(spec).into(),
            ..Default::default()
        })
    }

    fn state(&self, id: &str, exec: &str) -> Result<api::StateResponse, ttrpc::Error> {
        self.service.state(api::StateRequest {
            id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        })
    }

    fn wait(&self, id: &str, exec: &str) -> Result<u32, ttrpc::Error> {
        self.service
            .wait(api::WaitRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .map(|r| r.exit_status)
    }

    fn kill(&self, id: &str, exec: &str) -> Result<api::Empty, ttrpc::Error> {
        self.service.kill(api::KillRequest {
            id: id.into(),
            exec_id: exec.into(),
            signal: 9,
            ..Default::default()
        })
    }

    fn delete(&self, id: &str, exec: &str) -> Result<u32, ttrpc::Error> {
        self.service
            .delete(api::DeleteRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .map(|r| r.exit_status)
    }

    fn exited(&self, pid: u32, code: u32) {
        self.service
            .exit_sink()
            .exited(i32::try_from(pid).unwrap(), code);
    }

    /// Waits on another thread, so a test can check that the wait blocks until it should not.
    fn wait_in_background(
        self: &Arc<Self>,
        id: &str,
        exec: &str,
    ) -> std::sync::mpsc::Receiver<Result<u32, ttrpc::Error>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (me, id, exec) = (self.clone(), id.to_string(), exec.to_string());
        std::thread::spawn(move || {
            let _ = tx.send(me.wait(&id, &exec));
        });
        rx
    }
}

fn status(s: &api::StateResponse) -> api::Status {
    s.status.enum_value_or_default()
}

#[test]
fn a_task_runs_through_create_start_exit_wait_delete() {
    let h = Arc::new(harness());
    let pid = h.create("t").unwrap();
    assert_ne!(pid, 0);
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::CREATED);
    assert_eq!(h.start("t", "").unwrap(), pid);
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::RUNNING);
    let waiting = h.wait_in_background("t", "");
    assert!(waiting.recv_timeout(Duration::from_millis(100)).is_err());
    h.exited(pid, 3);
    assert_eq!(
        waiting
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap(),
        3
    );
    let st = h.state("t", "").unwrap();
    assert_eq!((status(&st), st.exit_status), (api::Status::STOPPED, 3));
    assert_eq!(h.delete("t", "").unwrap(), 3);
    assert_eq!(code(h.state("t", "")), Code::NOT_FOUND);
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert_eq!(h.backend.calls(), ["create t", "start t", "delete t"]);
}

#[test]
fn an_exit_during_start_is_not_lost() {
    let h = harness();
    let sink = h.service.exit_sink();
    *h.backend.on_start.lock().unwrap() = Some(Box::new(move |pid| sink.exited(pid, 7)));
    h.create("t").unwrap();
    h.start("t", "").unwrap();
    assert_eq!(h.wait("t", "").unwrap(), 7);
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::STOPPED);
    // TaskExit follows TaskStart, as containerd expects.
    assert_eq!(
        h.events.topics(),
        ["/tasks/create", "/tasks/start", "/tasks/exit"]
    );
}

#[test]
fn an_exec_that_exits_before_its_pid_is_known_gets_its_exit_event() {
    let h = harness();
    h.create("t").unwrap();
    h.start("t", "").unwrap();
    h.exec("t", "e").unwrap();
    let sink = h.service.exit_sink();
    // The reaper sees the exec's exit before Start has returned its pid.
    *h.backend.on_start.lock().unwrap() = Some(Box::new(move |pid| sink.exited(pid, 5)));
    h.start("t", "e").unwrap();
    assert_eq!(h.wait("t", "e").unwrap(), 5);
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit"
        ]
    );
}

#[test]
fn an_exit_held_by_a_failed_start_is_still_published() {
    let h = harness();
    let pid = h.create("t").unwrap();
    let sink = h.service.exit_sink();
    h.backend.fail_with("start", |op| ZygoteError::Failed {
        op,
        source: Failure {
            kind: FailureKind::Internal,
            message: "exec fifo gone".into(),
            reason: None,
        },
    });
    *h.backend.on_start.lock().unwrap() = Some(Box::new(move |pid| sink.exited(pid, 1)));
    assert_eq!(code(h.start("t", "")), Code::UNKNOWN);
    assert_eq!(h.events.topics(), ["/tasks/create", "/tasks/exit"]);
    assert_eq!(h.wait("t", "").unwrap(), 1);
    assert_eq!(pid, h.state("t", "").unwrap().pid);
}

#[test]
fn an_exit_reported_before_create_returns_is_claimed() {
    let h = harness();
    // The reaper can see the init's exit before Create has recorded its pid.
    h.exited(1000, 1);
    assert_eq!(h.create("t").unwrap(), 1000);
    let st = h.state("t", "").unwrap();
    assert_eq!((status(&st), st.exit_status), (api::Status::STOPPED, 1));
    assert_eq!(h.wait("t", "").unwrap(), 1);
}

#[test]
fn execs_have_their_own_life() {
    let h = harness();
    let init = h.create("t").unwrap();
    h.start("t", "").unwrap();
    h.exec("t", "e").unwrap();
    assert_eq!(code(h.exec("t", "e")), Code::ALREADY_EXISTS);
    assert_eq!(code(h.exec("nope", "e")), Code::NOT_FOUND);
    assert_eq!(status(&h.state("t", "e").unwrap()), api::Status::CREATED);
    let pid = h.start("t", "e").unwrap();
    assert_ne!(pid, init);
    assert_eq!(code(h.delete("t", "e")), Code::FAILED_PRECONDITION);
    h.exited(pid, 0);
    assert_eq!(h.wait("t", "e").unwrap(), 0);
    // The init runs on.
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::RUNNING);
    h.delete("t", "e").unwrap();
    assert_eq!(code(h.state("t", "e")), Code::NOT_FOUND);
    let spec = h.bundle().join("exec-e.json");
    assert!(!spec.exists(), "{} left behind", spec.display());
}

#[test]
fn repeated_and_unknown_calls_get_their_codes() {
    let h = harness();
    assert_eq!(code(h.start("t", "")), Code::NOT_FOUND);
    assert_eq!(code(h.kill("t", "")), Code::NOT_FOUND);
    assert_eq!(code(h.delete("t", "")), Code::NOT_FOUND);
    let pid = h.create("t").unwrap();
    assert_eq!(code(h.create("t")), Code::ALREADY_EXISTS);
    h.start("t", "").unwrap();
    assert_eq!(code(h.start("t", "")), Code::FAILED_PRECONDITION);
    h.kill("t", "").unwrap();
    h.exited(pid, 137);
    // Killing a finished process is NOT_FOUND, as with runc's shim.
    assert_eq!(code(h.kill("t", "")), Code::NOT_FOUND);
    assert_eq!(
        h.backend.calls(),
        ["create t", "start t", "kill t"],
        "refused calls reached the backend"
    );
}

#[test]
fn a_failed_create_is_undone_and_leaves_no_task() {
    let h = harness();
    h.backend.fail_with("create", |op| ZygoteError::Deadline {
        op,
        after: Duration::from_secs(60),
    });
    assert_eq!(code(h.create("t")), Code::DEADLINE_EXCEEDED);
    // What a worker killed half-way may have left is deleted.
    assert_eq!(h.backend.calls(), ["create t", "delete t"]);
    assert_eq!(code(h.state("t", "")), Code::NOT_FOUND);
    assert!(h.events.topics().is_empty());
}

#[test]
fn a_create_of_an_existing_container_deletes_nothing() {
    let h = harness();
    h.backend.fail_with("create", |op| ZygoteError::Failed {
        op,
        source: Failure {
            kind: FailureKind::AlreadyExists,
            message: "container t exists".into(),
            reason: None,
        },
    });
    assert_eq!(code(h.create("t")), Code::ALREADY_EXISTS);
    // The container belongs to someone else: it must survive.
    assert_eq!(h.backend.calls(), ["create t"]);
}

#[test]
fn worker_failures_map_to_their_codes() {
    let h = harness();
    let pid = h.create("t").unwrap();
    h.start("t", "").unwrap();
    h.backend.fail_with("pause", |op| ZygoteError::WorkerDied {
        op,
        status: "killed by SIGKILL".into(),
    });
    let paused = h.service.pause(api::PauseRequest {
        id: "t".into(),
        ..Default::default()
    });
    assert_eq!(code(paused), Code::UNAVAILABLE);
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::RUNNING);
    h.backend.fail_with("kill", |op| ZygoteError::Failed {
        op,
        source: Failure {
            kind: FailureKind::NotFound,
            message: "no such process".into(),
            reason: None,
        },
    });
    assert_eq!(code(h.kill("t", "")), Code::NOT_FOUND);
    h.backend.fail_with("delete", |op| ZygoteError::Failed {
        op,
        source: Failure {
            kind: FailureKind::FailedPrecondition,
            message: "still running".into(),
            reason: None,
        },
    });
    assert_eq!(code(h.delete("t", "")), Code::FAILED_PRECONDITION);
    // A failed delete keeps the task.
    h.exited(pid, 0);
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::STOPPED);
}

#[test]
fn pause_and_resume_show_in_state_and_events() {
    let h = harness();
    h.create("t").unwrap();
    h.start("t", "").unwrap();
    h.service
        .pause(api::PauseRequest {
            id: "t".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::PAUSED);
    h.service
        .resume(api::ResumeRequest {
            id: "t".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(status(&h.state("t", "").unwrap()), api::Status::RUNNING);
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed"
        ]
    );
}

#[test]
fn waits_return_when_their_task_is_deleted_without_exiting() {
    let h = Arc::new(harness());
    h.create("t").unwrap();
    h.start("t", "").unwrap();
    h.exec("t", "e").unwrap();
    let init = h.wait_in_background("t", "");
    let exec = h.wait_in_background("t", "e");
    std::thread::sleep(Duration::from_millis(50));
    h.delete("t", "e").unwrap();
    assert_eq!(
        exec.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(),
        137
    );
    // The init's exit was never reported (its pid namespace went with it).
    h.delete("t", "").unwrap();
    assert_eq!(
        init.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(),
        137
    );
}
