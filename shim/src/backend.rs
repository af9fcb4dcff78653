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
pub struct Publisher {
    address: String,
    current: std::sync::Mutex<Option<std::sync::Arc<RemotePublisher>>>,
}

impl Publisher {
    pub fn new(first: RemotePublisher, address: String) -> Self {
        Self {
            address,
            current: std::sync::Mutex::new(Some(std::sync::Arc::new(first))),
        }
    }

    /// The current connection, made anew when there is none. The lock is held only for
    /// this: events of different tasks are published side by side, as before.
    fn connection(&self) -> Result<std::sync::Arc<RemotePublisher>, String> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = current.as_ref() {
            return Ok(p.clone());
        }
        let p = std::sync::Arc::new(
            RemotePublisher::new(&self.address)
                .map_err(|e| format!("connecting to {}: {e}", self.address))?,
        );
        *current = Some(p.clone());
        Ok(p)
    }

    /// Drops `broken` (unless another caller replaced it already).
    fn forget(&self, broken: &std::sync::Arc<RemotePublisher>) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current
            .as_ref()
            .is_some_and(|c| std::sync::Arc::ptr_eq(c, broken))
        {
            *current = None;
        }
    }
}

impl Events for Publisher {
    fn publish(&self, topic: &str, namespace: &str, event: Box<dyn MessageDyn>) {
        let mut last = String::new();
        for attempt in 0..2 {
            let p = match self.connection() {
                Ok(p) => p,
                Err(e) => {
                    last = e;
                    break;
                }
            };
            match p.publish(Context::default(), topic, namespace, event.clone_box()) {
                Ok(()) => return,
                Err(e) => {
                    last = e.to_string();
                    // A broken connection (containerd restarted): one new one, once.
                    self.forget(&p);
                    if attempt == 0 {
                        log::info!("publishing {topic}: {e}; reconnecting");
                    }
                }
            }
        }
        log::warn!("publishing {topic}: {last}");
    }
}
