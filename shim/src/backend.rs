//! What the task service drives: a backend that runs container operations and a sink for
//! containerd events. The shim uses its zygote and containerd's publisher; the service's
//! unit tests use fakes, so the task state machine is tested without containers.

use std::os::fd::RawFd;
use std::time::Duration;

use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;

use crate::zygote::{Request, Zygote, ZygoteError};

/// Runs one container operation (create, start, exec, kill, delete, checkpoint, ...).
pub trait Backend: Send + Sync + 'static {
    /// Runs `req` with the descriptors `fds`, for at most `deadline`; the pid of the process
    /// it started, if any.
    fn call(
        &self,
        req: &Request,
        fds: &[RawFd],
        deadline: Duration,
    ) -> Result<Option<i32>, ZygoteError>;
}

impl Backend for Zygote {
    fn call(
        &self,
        req: &Request,
        fds: &[RawFd],
        deadline: Duration,
    ) -> Result<Option<i32>, ZygoteError> {
        Zygote::call(self, req, fds, deadline).map(|a| a.pid)
    }
}

/// Where task events (TaskCreate, TaskExit, ...) go.
pub trait Events: Send + Sync + 'static {
    /// Publishes `event` under `topic` in the containerd namespace `namespace`; failures
    /// are logged, never returned: an event lost must not fail the operation.
    fn publish(&self, topic: &str, namespace: &str, event: Box<dyn MessageDyn>);
}

/// containerd's event endpoint, reconnected after containerd restarts: containerd-shim's
/// synchronous publisher keeps its first connection forever, so every event after a
/// restart of containerd (a long-lived pool shim sees many) would be lost.
///
/// Events go out from one thread, in the order they were published: a publish is a round
/// trip to containerd (~0.3 ms), which Create and Start need not wait for. Go shims queue
/// their events the same way. [`flush_events`] waits for the queue before the shim exits.
pub struct Publisher {
    queue: std::sync::Mutex<std::sync::mpsc::Sender<Queued>>,
}

struct Queued {
    topic: String,
    namespace: String,
    event: Box<dyn MessageDyn>,
}

/// Events queued and not yet sent, for [`flush_events`].
fn pending() -> &'static (std::sync::Mutex<usize>, std::sync::Condvar) {
    static PENDING: std::sync::OnceLock<(std::sync::Mutex<usize>, std::sync::Condvar)> =
        std::sync::OnceLock::new();
    PENDING.get_or_init(Default::default)
}

fn count_pending(delta: isize) {
    let (m, cv) = pending();
    let mut n = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    *n = n.saturating_add_signed(delta);
    cv.notify_all();
}

/// Waits up to `timeout` until every published event was sent (or given up on); whether
/// none is left.
pub fn flush_events(timeout: Duration) -> bool {
    let (m, cv) = pending();
    let n = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (n, _) = cv
        .wait_timeout_while(n, timeout, |n| *n > 0)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *n == 0
}

impl Publisher {
    pub fn new(first: RemotePublisher, address: String) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Queued>();
        let sender = Sender {
            address,
            current: Some(first),
        };
        let spawned = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut sender = sender;
                for q in rx {
                    sender.send(&q.topic, &q.namespace, q.event);
                    count_pending(-1);
                }
            });
        if let Err(e) = spawned {
            log::error!("event thread: {e}; events are lost");
        }
        Self {
            queue: std::sync::Mutex::new(tx),
        }
    }
}

/// The event thread's connection to containerd.
struct Sender {
    address: String,
    current: Option<RemotePublisher>,
}

impl Sender {
    fn send(&mut self, topic: &str, namespace: &str, event: Box<dyn MessageDyn>) {
        let mut last = String::new();
        for attempt in 0..2 {
            if self.current.is_none() {
                match RemotePublisher::new(&self.address) {
                    Ok(p) => self.current = Some(p),
                    Err(e) => {
                        last = format!("connecting to {}: {e}", self.address);
                        break;
                    }
                }
            }
            let Some(p) = &self.current else { break };
            match p.publish(Context::default(), topic, namespace, event.clone_box()) {
                Ok(()) => return,
                Err(e) => {
                    last = e.to_string();
                    // A broken connection (containerd restarted): one new one, once.
                    self.current = None;
                    if attempt == 0 {
                        log::info!("publishing {topic}: {e}; reconnecting");
                    }
                }
            }
        }
        log::warn!("publishing {topic}: {last}");
    }
}

impl Events for Publisher {
    fn publish(&self, topic: &str, namespace: &str, event: Box<dyn MessageDyn>) {
        count_pending(1);
        let queued = Queued {
            topic: topic.to_string(),
            namespace: namespace.to_string(),
            event,
        };
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(queued);
        if sent.is_err() {
            count_pending(-1);
            log::warn!("publishing {topic}: the event thread is gone");
        }
    }
}
