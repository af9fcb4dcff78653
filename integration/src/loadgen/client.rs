//! A containerd client over its gRPC API: what a FaaS controller calls to start, checkpoint
//! and remove function instances. Everything it creates belongs to one lease, so containerd's
//! garbage collector leaves the snapshots alone while they are in use.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CheckpointTaskRequest, Container, CreateContainerRequest, CreateRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteRequest, DeleteTaskRequest, GetImageRequest, GetRequest,
    KillRequest, ReadContentRequest, StartRequest, SubscribeRequest, WaitRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use containerd_client::types::{Descriptor, Mount};
use sha2::{Digest, Sha256};

pub const SNAPSHOTTER: &str = "overlayfs";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// containerd calls that take longer than this are failures (a hung shim, not a slow start).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Client {
    channel: Channel,
    namespace: String,
    lease: String,
}

/// What an image's config says about its process.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub chain_id: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
}

impl Client {
    pub async fn connect(socket: &std::path::Path, namespace: &str, lease: &str) -> Result<Self> {
        let channel =
            tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(socket))
                .await
                .map_err(|_| {
                    anyhow!(
                        "connecting to containerd at {}: timed out",
                        socket.display()
                    )
                })?
                .with_context(|| format!("connecting to containerd at {}", socket.display()))?;
        let c = Self {
            channel,
            namespace: namespace.to_string(),
            lease: lease.to_string(),
        };
        let req = c.plain(CreateRequest {
            id: lease.to_string(),
            ..Default::default()
        });
        LeasesClient::new(c.channel.clone())
            .create(req)
            .await
            .context("creating the benchmark's lease")?;
        Ok(c)
    }

    /// A request in the namespace, outside the lease.
    fn plain<T>(&self, t: T) -> Request<T> {
        let mut r = Request::new(t);
        r.set_timeout(CALL_TIMEOUT);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        r
    }

    /// A request in the namespace and the lease.
    fn req<T>(&self, t: T) -> Request<T> {
        let mut r = self.plain(t);
        if let Ok(v) = self.lease.parse() {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    /// Releases the lease (what it still holds is collected by containerd).
    pub async fn close(&self) {
        let req = self.plain(DeleteRequest {
            id: self.lease.clone(),
            sync: false,
        });
        let _ = LeasesClient::new(self.channel.clone()).delete(req).await;
    }

    async fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .with_context(|| format!("reading {digest}"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .with_context(|| format!("reading {digest}"))?
        {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    /// The image's unpacked snapshot (chain id) and process defaults.
    pub async fn image_config(&self, image: &str) -> Result<ImageConfig> {
        let img = ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest {
                name: image.to_string(),
            }))
            .await
            .map_err(|s| anyhow!("image {image}: {}", s.message()))?
            .into_inner()
            .image
            .ok_or_else(|| anyhow!("image {image}: no record"))?;
        let target = img
            .target
            .ok_or_else(|| anyhow!("image {image}: no target"))?;
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&self.read(&target.digest).await?)?;
        if let Some(first) = manifest.get("manifests").and_then(|m| m.get(0)) {
            let d = first["digest"].as_str().unwrap_or_default().to_string();
            manifest = serde_json::from_slice(&self.read(&d).await?)?;
        }
        let cfg_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("image {image}: manifest without config"))?;
        let config: serde_json::Value = serde_json::from_slice(&self.read(cfg_digest).await?)?;
        let ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let Some(mut chain) = ids.first().cloned() else {
            bail!("image {image}: no layers");
        };
        for d in &ids[1..] {
            chain = format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{chain} {d}")))
            );
        }
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let c = &config["config"];
        let mut args = strings(&c["Entrypoint"]);
        args.extend(strings(&c["Cmd"]));
        Ok(ImageConfig {
            chain_id: chain,
            args,
            env: strings(&c["Env"]),
            cwd: c["WorkingDir"].as_str().unwrap_or("/").to_string(),
        })
    }

    /// Snapshot and container record: the rootfs mounts for the task.
    pub async fn create_container(
        &self,
        id: &str,
        image: &str,
        chain_id: &str,
        runtime: &str,
        spec: &serde_json::Value,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Mount>> {
        let mounts = SnapshotsClient::new(self.channel.clone())
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.into(),
                parent: chain_id.into(),
                ..Default::default()
            }))
            .await
            .map_err(|s| anyhow!("snapshot for {id}: {}", s.message()))?
            .into_inner()
            .mounts;
        let container = Container {
            id: id.into(),
            image: image.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            runtime: Some(Runtime {
                name: runtime.into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE.into(),
                value: serde_json::to_vec(spec)?,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: id.into(),
            ..Default::default()
        };
        ContainersClient::new(self.channel.clone())
            .create(self.req(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(|s| anyhow!("container {id}: {}", s.message()))?;
        Ok(mounts)
    }

    /// Creates the task; its output goes to `log` (a file), if given.
    pub async fn create_task(
        &self,
        id: &str,
        rootfs: Vec<Mount>,
        checkpoint: Option<Descriptor>,
        log: Option<&std::path::Path>,
    ) -> Result<u32> {
        let uri = log
            .map(|p| format!("file://{}", p.display()))
            .unwrap_or_default();
        let r = TasksClient::new(self.channel.clone())
            .create(self.req(CreateTaskRequest {
                container_id: id.into(),
                rootfs,
                checkpoint,
                stdout: uri.clone(),
                stderr: uri,
                ..Default::default()
            }))
            .await
            .map_err(|s| anyhow!("create task {id}: {}", s.message()))?;
        Ok(r.into_inner().pid)
    }

    pub async fn start_task(&self, id: &str) -> Result<u32> {
        let r = TasksClient::new(self.channel.clone())
            .start(self.req(StartRequest {
                container_id: id.into(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| anyhow!("start task {id}: {}", s.message()))?;
        Ok(r.into_inner().pid)
    }

    /// The task's process has exited (or the task is gone).
    pub async fn task_exited(&self, id: &str) -> bool {
        let r = TasksClient::new(self.channel.clone())
            .get(self.req(GetRequest {
                container_id: id.into(),
                exec_id: String::new(),
            }))
            .await;
        match r {
            Ok(r) => r
                .into_inner()
                .process
                .is_none_or(|p| p.status == containerd_client::types::v1::Status::Stopped as i32),
            Err(s) => s.code() == containerd_client::tonic::Code::NotFound,
        }
    }

    /// An ordinary CRIU checkpoint of a running task (it keeps running).
    pub async fn checkpoint(&self, id: &str) -> Result<Descriptor> {
        let r = TasksClient::new(self.channel.clone())
            .checkpoint(self.req(CheckpointTaskRequest {
                container_id: id.into(),
                ..Default::default()
            }))
            .await
            .map_err(|s| anyhow!("checkpoint {id}: {}", s.message()))?
            .into_inner();
        r.descriptors
            .into_iter()
            .find(|d| d.media_type.ends_with("criu.tar"))
            .ok_or_else(|| anyhow!("checkpoint {id}: no CRIU image among the descriptors"))
    }

    /// Kills and removes an instance: task, container and snapshot. Best effort, bounded in
    /// time; returns what failed.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let tasks = TasksClient::new(self.channel.clone());
        let wait = {
            let mut t = tasks.clone();
            let req = self.req(WaitRequest {
                container_id: id.into(),
                exec_id: String::new(),
            });
            tokio::spawn(async move { t.wait(req).await })
        };
        let killed = tasks
            .clone()
            .kill(self.req(KillRequest {
                container_id: id.into(),
                exec_id: String::new(),
                signal: 9,
                all: true,
            }))
            .await;
        if killed.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        } else {
            wait.abort();
        }
        let mut problems = Vec::new();
        if let Err(s) = tasks
            .clone()
            .delete(self.req(DeleteTaskRequest {
                container_id: id.into(),
            }))
            .await
        {
            if s.code() != containerd_client::tonic::Code::NotFound {
                problems.push(format!("task: {}", s.message()));
            }
        }
        if let Err(s) = ContainersClient::new(self.channel.clone())
            .delete(self.req(DeleteContainerRequest { id: id.into() }))
            .await
        {
            if s.code() != containerd_client::tonic::Code::NotFound {
                problems.push(format!("container: {}", s.message()));
            }
        }
        if let Err(s) = SnapshotsClient::new(self.channel.clone())
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.into(),
            }))
            .await
        {
            if s.code() != containerd_client::tonic::Code::NotFound {
                problems.push(format!("snapshot: {}", s.message()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("removing {id}: {}", problems.join("; "))
        }
    }

    /// trenv's own events (`/trenv/...`) of this namespace, as (topic, fields).
    pub async fn trenv_events(
        &self,
    ) -> Result<
        tokio::sync::mpsc::UnboundedReceiver<(String, std::collections::BTreeMap<String, String>)>,
    > {
        let mut req = self.plain(SubscribeRequest {
            filters: vec![format!("namespace=={},topic~=\"^/trenv/\"", self.namespace)],
        });
        // A subscription lasts the whole run.
        req.set_timeout(Duration::from_secs(24 * 3600));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut events = EventsClient::new(self.channel.clone());
        // containerd sends the response headers of a subscription with its first event, so
        // the call is not awaited here: it runs on its own task.
        tokio::spawn(async move {
            let mut stream = match events.subscribe(req).await {
                Ok(r) => r.into_inner(),
                // containerd went away (the run's end): nothing more to tell.
                Err(_) => return,
            };
            while let Ok(Some(env)) = stream.message().await {
                let Some(any) = env.event else { continue };
                let Ok(s) = <prost_types::Struct as prost::Message>::decode(any.value.as_slice())
                else {
                    continue;
                };
                let fields = s
                    .fields
                    .into_iter()
                    .filter_map(|(k, v)| match v.kind {
                        Some(prost_types::value::Kind::StringValue(s)) => Some((k, s)),
                        Some(prost_types::value::Kind::BoolValue(b)) => Some((k, b.to_string())),
                        _ => None,
                    })
                    .collect();
                if tx.send((env.topic, fields)).is_err() {
                    return;
                }
            }
        });
        // The subscription counts from when containerd has the request.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(rx)
    }
}
