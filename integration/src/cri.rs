//! A client of containerd's CRI plugin: the calls kubelet makes, in kubelet's order, for the
//! Kubernetes tests and the pod-start benchmark. Blocking (a runtime of its own), every call
//! bounded in time so a wedged containerd fails the caller instead of hanging it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerMetadata, ContainerStats, ContainerStatsRequest,
    ContainerStatus, ContainerStatusRequest, CreateContainerRequest, ExecRequest, ExecSyncRequest,
    ExecSyncResponse, ImageSpec, KeyValue, LinuxContainerResources, LinuxPodSandboxConfig,
    ListContainersRequest, ListImagesRequest, ListPodSandboxRequest, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStats, PodSandboxStatsRequest, PodSandboxStatus,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    UpdateContainerResourcesRequest,
};
use tonic::transport::Channel;
use tonic::Status;

pub use k8s_cri::v1;

/// kubelet's own bound on a CRI call is 2 minutes; the same here.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A connection to one containerd's CRI service.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl Cri {
    /// Connects to containerd's socket (CRI shares containerd's gRPC server).
    pub fn connect(socket: &Path) -> Result<Self, Status> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Status::internal(format!("tokio runtime: {e}")))?;
        let channel = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(socket))
                    .await
            })
            .map_err(|_| Status::deadline_exceeded("connecting to containerd: timed out"))?
            .map_err(|e| Status::unavailable(format!("connecting to containerd: {e}")))?;
        Ok(Self { rt, channel })
    }

    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    fn call<T, F>(&self, what: &str, f: F) -> Result<T, Status>
    where
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, f).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "CRI {what}: no answer in {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }

    /// RunPodSandbox with a runtime handler (a RuntimeClass's `handler`); the pod's id.
    pub fn run_pod(&self, config: &PodSandboxConfig, handler: &str) -> Result<String, Status> {
        let mut c = self.runtime();
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        Ok(self
            .call("RunPodSandbox", c.run_pod_sandbox(req))?
            .pod_sandbox_id)
    }

    /// CreateContainer in a pod; the container's id.
    pub fn create_container(
        &self,
        pod: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String, Status> {
        let mut c = self.runtime();
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        Ok(self
            .call("CreateContainer", c.create_container(req))?
            .container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime();
        let req = StartContainerRequest {
            container_id: id.to_string(),
        };
        self.call("StartContainer", c.start_container(req))
            .map(drop)
    }

    /// CreateContainer then StartContainer, as kubelet does for each container of a pod.
    pub fn run_container(
        &self,
        pod: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String, Status> {
        let id = self.create_container(pod, config, pod_config)?;
        self.start_container(&id)?;
        Ok(id)
    }

    /// ExecSync of `cmd` with a timeout in seconds (0: none).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecSyncResponse, Status> {
        let mut c = self.runtime();
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            timeout: timeout_secs,
        };
        self.call("ExecSync", c.exec_sync(req))
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, Status> {
        let mut c = self.runtime();
        let req = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.call("ContainerStatus", c.container_status(req))?
            .status
            .ok_or_else(|| Status::internal("ContainerStatus without a status"))
    }

    /// PodSandboxStatus with its verbose info (the sandbox's runtime, pid, spec).
    pub fn pod_status(
        &self,
        id: &str,
    ) -> Result<(PodSandboxStatus, HashMap<String, String>), Status> {
        let mut c = self.runtime();
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        let r = self.call("PodSandboxStatus", c.pod_sandbox_status(req))?;
        let status = r
            .status
            .ok_or_else(|| Status::internal("PodSandboxStatus without a status"))?;
        Ok((status, r.info))
    }

    /// The pod's IP, as CRI's CNI set-up gave it.
    pub fn pod_ip(&self, id: &str) -> Result<String, Status> {
        let (status, _) = self.pod_status(id)?;
        status
            .network
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| Status::internal(format!("pod {id} has no IP")))
    }

    pub fn container_stats(&self, id: &str) -> Result<ContainerStats, Status> {
        let mut c = self.runtime();
        let req = ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.call("ContainerStats", c.container_stats(req))?
            .stats
            .ok_or_else(|| Status::internal("ContainerStats without stats"))
    }

    pub fn pod_stats(&self, id: &str) -> Result<PodSandboxStats, Status> {
        let mut c = self.runtime();
        let req = PodSandboxStatsRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call("PodSandboxStats", c.pod_sandbox_stats(req))?
            .stats
            .ok_or_else(|| Status::internal("PodSandboxStats without stats"))
    }

    pub fn update_resources(
        &self,
        id: &str,
        resources: LinuxContainerResources,
    ) -> Result<(), Status> {
        let mut c = self.runtime();
        let req = UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(resources),
            ..Default::default()
        };
        self.call(
            "UpdateContainerResources",
            c.update_container_resources(req),
        )
        .map(drop)
    }

    /// StopContainer: SIGTERM (the image's stop signal), SIGKILL after `timeout_secs`.
    pub fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<(), Status> {
        let mut c = self.runtime();
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout: timeout_secs,
        };
        self.call("StopContainer", c.stop_container(req)).map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime();
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.call("RemoveContainer", c.remove_container(req))
            .map(drop)
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime();
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call("StopPodSandbox", c.stop_pod_sandbox(req))
            .map(drop)
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime();
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call("RemovePodSandbox", c.remove_pod_sandbox(req))
            .map(drop)
    }

    /// StopPodSandbox then RemovePodSandbox (which removes the pod's containers too), as
    /// kubelet does when a pod is deleted.
    pub fn delete_pod(&self, id: &str) -> Result<(), Status> {
        self.stop_pod(id)?;
        self.remove_pod(id)
    }

    /// The ids of every pod CRI knows.
    pub fn list_pods(&self) -> Result<Vec<String>, Status> {
        let mut c = self.runtime();
        let r = self.call(
            "ListPodSandbox",
            c.list_pod_sandbox(ListPodSandboxRequest::default()),
        )?;
        Ok(r.items.into_iter().map(|p| p.id).collect())
    }

    /// The ids of every container CRI knows.
    pub fn list_containers(&self) -> Result<Vec<String>, Status> {
        let mut c = self.runtime();
        let r = self.call(
            "ListContainers",
            c.list_containers(ListContainersRequest::default()),
        )?;
        Ok(r.containers.into_iter().map(|c| c.id).collect())
    }

    /// The image references CRI knows (an image must be known to CRI to run).
    pub fn list_images(&self) -> Result<Vec<String>, Status> {
        let mut c = ImageServiceClient::new(self.channel.clone());
        let r = self.call("ListImages", c.list_images(ListImagesRequest::default()))?;
        Ok(r.images.into_iter().flat_map(|i| i.repo_tags).collect())
    }

    /// Exec through CRI's streaming server: the URL to stream the process's I/O over.
    pub fn exec_url(&self, id: &str, cmd: &[&str], stdin: bool) -> Result<String, Status> {
        let mut c = self.runtime();
        let req = ExecRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            tty: false,
            stdin,
            stdout: true,
            stderr: true,
        };
        Ok(self.call("Exec", c.exec(req))?.url)
    }

    /// Attach through CRI's streaming server: the URL to stream the container's I/O over.
    pub fn attach_url(&self, id: &str, stdin: bool) -> Result<String, Status> {
        let mut c = self.runtime();
        let req = AttachRequest {
            container_id: id.to_string(),
            stdin,
            tty: false,
            stdout: true,
            stderr: true,
        };
        Ok(self.call("Attach", c.attach(req))?.url)
    }

    /// Stops and removes every pod; the errors, if any.
    pub fn delete_all_pods(&self) -> Vec<Status> {
        let pods = match self.list_pods() {
            Ok(p) => p,
            Err(e) => return vec![e],
        };
        pods.iter()
            .filter_map(|p| self.delete_pod(p).err())
            .collect()
    }
}

/// A pod as kubelet describes one: metadata, a log directory, a cgroup parent (kubelet's
/// per-pod cgroup, under `cgroup_root`), hostname = name.
pub fn pod_config(name: &str, log_directory: &Path, cgroup_root: &str) -> PodSandboxConfig {
    let uid = crate::unique_id("uid");
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.clone(),
            namespace: "default".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("{cgroup_root}/pod{uid}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container as kubelet describes one: `args` replace the image's command, its log at
/// `<name>.log` in the pod's log directory.
pub fn container_config(name: &str, image: &str, args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: args.iter().map(|s| (*s).to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// Adds environment variables to a container's config.
pub fn with_env(mut config: ContainerConfig, env: &[(&str, &str)]) -> ContainerConfig {
    config.envs.extend(env.iter().map(|(k, v)| KeyValue {
        key: (*k).to_string(),
        value: (*v).to_string(),
    }));
    config
}

/// What a streamed exec or attach gave: output by stream, and the exit status CRI reported
/// (Kubernetes' v4 channel protocol: JSON, `"status":"Success"` or a failure with the exit
/// code among its causes).
#[derive(Debug, Default)]
pub struct Streamed {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: Option<String>,
}

impl Streamed {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Streams over a URL from [`Cri::exec_url`] or [`Cri::attach_url`] as kubectl does, over
/// WebSocket with the `v4.channel.k8s.io` protocol (one byte of channel — 0 stdin, 1 stdout,
/// 2 stderr, 3 status — then the data): sends `input` on stdin, then reads until the server
/// closes, `done` holds, or `timeout` passes (an error).
pub fn stream(
    url: &str,
    input: &[u8],
    timeout: Duration,
    done: impl Fn(&Streamed) -> bool,
) -> Result<Streamed, String> {
    use tungstenite::{client::ClientRequestBuilder, Message};
    // CRI hands out an http:// URL; the WebSocket upgrade of it is ws://.
    let ws_url = match url.strip_prefix("http://") {
        Some(rest) => format!("ws://{rest}"),
        None => url.to_string(),
    };
    let uri: tungstenite::http::Uri = ws_url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let tcp = std::net::TcpStream::connect((host, port)).map_err(|e| format!("{url}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = ClientRequestBuilder::new(uri).with_sub_protocol("v4.channel.k8s.io");
    let (mut ws, _) = tungstenite::client(req, tcp).map_err(|e| format!("{url}: {e}"))?;
    if !input.is_empty() {
        let mut frame = vec![0u8];
        frame.extend_from_slice(input);
        ws.send(Message::Binary(frame.into()))
            .map_err(|e| e.to_string())?;
    }
    let start = std::time::Instant::now();
    let mut out = Streamed::default();
    loop {
        if done(&out) {
            let _ = ws.close(None);
            return Ok(out);
        }
        if start.elapsed() > timeout {
            return Err(format!("{url}: no end of stream in {timeout:?}: {out:?}"));
        }
        match ws.read() {
            Ok(Message::Binary(data)) => match data.split_first() {
                Some((1, rest)) => out.stdout.extend_from_slice(rest),
                Some((2, rest)) => out.stderr.extend_from_slice(rest),
                Some((3, rest)) => out.status = Some(String::from_utf8_lossy(rest).into_owned()),
                _ => {}
            },
            Ok(Message::Close(_)) => return Ok(out),
            Ok(_) => {}
            Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed
                | tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ),
            ) => return Ok(out),
            Err(e) => return Err(format!("{url}: {e} ({out:?})")),
        }
    }
}
