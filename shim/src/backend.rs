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

impl Events for RemotePublisher {
    fn publish(&self, topic: &str, namespace: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = RemotePublisher::publish(self, Context::default(), topic, namespace, event)
        {
            log::warn!("publishing {topic}: {e}");
        }
    }
}
