//! What travels between the shim, the zygote and its workers.
//!
//! The shim sends one [`Request`] per message on the zygote's socket (SOCK_SEQPACKET, so
//! a message is never split or merged), with the request's *reply channel* — one end of a
//! fresh socket pair — as the first descriptor and the process's stdio after it. The reply
//! channel carries [`Reply`] messages: the worker announces itself (`Started`), then
//! answers (`Done`); the zygote adds `Exited` once it has reaped the worker. A worker that
//! dies without answering therefore still produces a reply, with its exit status.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest message on either socket.
pub const MAX_MSG: usize = 64 * 1024;

/// Which of stdin, stdout, stderr accompany a request as descriptors, in that order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The UTS namespace of a pooled sandbox, which the container joins: libcontainer sets
/// the spec's names only in a new UTS namespace, so the worker sets them first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxUts {
    pub ns: PathBuf,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
}

/// CRIU options a container asks for through its `io.trenv.criu.*` annotations.
pub use crate::annotations::CriuAnnotations;

/// One operation, performed by one worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Create {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: Stdio,
        systemd: bool,
        no_pivot: bool,
        sandbox_uts: Option<SandboxUts>,
    },
    /// Runs `request` at a lower CPU priority: the pool's background work (purges,
    /// refills) must not take CPU from container starts on small nodes.
    Background {
        nice: i32,
        request: Box<Request>,
    },
    /// Purges a released sandbox's IPC and UTS namespaces.
    PurgeSandbox {
        holder: trenv_sandbox::holder::Holder,
    },
    /// Creates a sandbox (holder, cgroup, CNI); answers with its record. CNI plugins run
    /// here rather than in the shim, whose reaper would collect them before they are waited.
    CreateSandbox {
        id: String,
        exe: PathBuf,
        cgroup_parent: String,
        network: trenv_sandbox::cni::Network,
    },
    DestroySandbox {
        sandbox: Box<trenv_sandbox::Sandbox>,
        network: trenv_sandbox::cni::Network,
    },
    /// Restores a checkpoint as the task's init; the stdio descriptors replace the
    /// checkpointed process's stdio pipes.
    Restore {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        image_path: PathBuf,
        work_path: Option<PathBuf>,
        criu: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: Stdio,
        systemd: bool,
        criu_opts: CriuAnnotations,
    },
    /// Restores the task's init from a memory template into its (placed) bundle; the stdio
    /// descriptors replace the template's pipes.
    RestoreTemplate {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        criu: PathBuf,
        store: PathBuf,
        template: String,
        /// Work directory: CRIU's log and the staged tmpfs mounts.
        work: PathBuf,
        stdio: Stdio,
        systemd: bool,
        criu_opts: CriuAnnotations,
        /// Join the spec's IPC and UTS namespaces ([`trenv_criu::restore::RestoreOptions`]).
        join_ipc_uts: bool,
    },
    /// Checkpoints the running task, left running, into `images`: the moment a template is
    /// taken.
    TemplateDump {
        root: PathBuf,
        id: String,
        criu: PathBuf,
        images: PathBuf,
        criu_opts: CriuAnnotations,
        /// Leave the spec's joined IPC and UTS namespaces (a pod's) out of the images
        /// ([`trenv_criu::checkpoint::CheckpointOptions`]).
        in_joined_ipc_uts: bool,
    },
    /// Builds template `name` under `key` from the checkpoint in `images`, with its memory
    /// in the memory pool; the images go afterwards, whatever the outcome.
    BuildTemplate {
        criu: PathBuf,
        store: PathBuf,
        name: String,
        key: String,
        images: PathBuf,
        pool: MemPool,
    },
    Start {
        root: PathBuf,
        id: String,
    },
    Exec {
        root: PathBuf,
        id: String,
        process: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: Stdio,
    },
    Kill {
        root: PathBuf,
        id: String,
        signal: u32,
        all: bool,
    },
    Pause {
        root: PathBuf,
        id: String,
    },
    Resume {
        root: PathBuf,
        id: String,
    },
    Delete {
        root: PathBuf,
        id: String,
        force: bool,
        /// The task's bundle: a restore killed half-way left a cgroup that only the bundle
        /// names.
        #[serde(default)]
        bundle: Option<PathBuf>,
    },
    Checkpoint {
        root: PathBuf,
        id: String,
        opts: CheckpointRequest,
    },
}

impl Request {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Create { .. } => "create",
            Request::Background { request, .. } => request.name(),
            Request::PurgeSandbox { .. } => "purge sandbox",
            Request::CreateSandbox { .. } => "create sandbox",
            Request::DestroySandbox { .. } => "destroy sandbox",
            Request::Restore { .. } => "restore",
            Request::RestoreTemplate { .. } => "template restore",
            Request::TemplateDump { .. } => "template dump",
            Request::BuildTemplate { .. } => "build template",
            Request::Start { .. } => "start",
            Request::Exec { .. } => "exec",
            Request::Kill { .. } => "kill",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Delete { .. } => "delete",
            Request::Checkpoint { .. } => "checkpoint",
        }
    }
}

/// The memory pool templates are built in (the shim's `[templates]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemPool {
    pub kind: String,
    pub dir: PathBuf,
    pub name: String,
    pub capacity: u64,
}

/// The checkpoint options containerd sends (runc's CheckpointOptions), in serialisable form.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CheckpointRequest {
    pub criu: PathBuf,
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: Option<String>,
}

/// What kind of failure an operation had; decides the ttrpc code containerd sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Internal,
}

/// A failed operation, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    /// Why a template operation failed, as a short code (`missing`, `corrupt`, `criu`, ...).
    #[serde(default)]
    pub reason: Option<String>,
}

/// What a successful operation produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub pid: Option<i32>,
    #[serde(default)]
    pub data: Option<serde_json::Value>,
}

/// One message on a request's reply channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// From the worker, first: its pid, which is also its process group.
    Started { pid: i32 },
    /// From the worker: the outcome.
    Done(Result<Answer, Failure>),
    /// From the zygote, once the worker is reaped; read only when no `Done` came first.
    Exited { status: String },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message of {0} bytes exceeds {MAX_MSG}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes one message, refusing what the receiver could not read whole.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let bytes = serde_json::to_vec(msg)?;
    if bytes.len() > MAX_MSG {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Started { pid: 42 },
            Reply::Done(Ok(Answer {
                pid: Some(7),
                data: Some(serde_json::json!({"a": 1})),
            })),
            Reply::Done(Err(Failure {
                kind: FailureKind::NotFound,
                message: "container x does not exist".into(),
                reason: Some("missing".into()),
            })),
            Reply::Exited {
                status: "killed by SIGKILL".into(),
            },
        ];
        for r in replies {
            let bytes = encode(&r).expect("encode");
            assert_eq!(decode::<Reply>(&bytes).expect("decode"), r);
        }
    }

    #[test]
    fn requests_keep_their_fields() {
        let req = Request::Background {
            nice: 10,
            request: Box::new(Request::Kill {
                root: "/run/x".into(),
                id: "c1".into(),
                signal: 9,
                all: true,
            }),
        };
        let back: Request = decode(&encode(&req).expect("encode")).expect("decode");
        assert_eq!(back.name(), "kill");
        match back {
            Request::Background { nice, request } => {
                assert_eq!(nice, 10);
                assert!(
                    matches!(*request, Request::Kill { signal: 9, all: true, ref id, .. } if id == "c1")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversized_and_malformed_messages_are_errors() {
        let big = Reply::Exited {
            status: "x".repeat(MAX_MSG),
        };
        assert!(matches!(encode(&big), Err(FrameError::TooLarge(_))));
        assert!(matches!(
            decode::<Reply>(b"{\"Started\":"),
            Err(FrameError::Json(_))
        ));
        assert!(decode::<Request>(b"{\"Nope\":{}}").is_err());
    }
}
