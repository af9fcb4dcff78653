//! What a Checkpoint call asks CRIU for: containerd's `CheckpointOptions` (from `ctr
//! checkpoint` / `ctr task checkpoint`), the task's `io.trenv.criu.*` annotations, and the
//! shim configuration's defaults, merged into one request for the zygote.

use std::path::PathBuf;

use containerd_shim::api::CheckpointTaskRequest;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::CheckpointOptions;

use crate::annotations::CriuAnnotations;
use crate::config::ShimConfig;
use crate::zygote::CheckpointRequest;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("checkpoint options: {0}")]
    Decode(String),
    #[error("checkpoint without an image path (give one, or set criu_image_path)")]
    NoImagePath,
}

/// The CRIU request for `req` on a task with configuration `config` and annotations
/// `wanted`. Annotations only add to what the call asks for; an image path comes from the
/// call, else from `criu_image_path/<id>`.
pub fn decode(
    req: &CheckpointTaskRequest,
    config: &ShimConfig,
    wanted: &CriuAnnotations,
) -> Result<CheckpointRequest, OptionsError> {
    let mut opts = CheckpointRequest {
        image_path: PathBuf::from(&req.path),
        work_path: config.criu_work_path.clone(),
        criu: config.criu_path.clone(),
        ..Default::default()
    };
    if let Some(any) = req
        .options
        .as_ref()
        .filter(|a| a.type_url.ends_with("CheckpointOptions"))
    {
        let o = CheckpointOptions::parse_from_bytes(&any.value)
            .map_err(|e| OptionsError::Decode(e.to_string()))?;
        if !o.image_path.is_empty() {
            opts.image_path = PathBuf::from(&o.image_path);
        }
        if !o.work_path.is_empty() {
            opts.work_path = Some(PathBuf::from(&o.work_path));
        }
        opts.exit = o.exit;
        opts.open_tcp = o.open_tcp;
        opts.external_unix_sockets = o.external_unix_sockets;
        opts.terminal = o.terminal;
        opts.file_locks = o.file_locks;
        opts.empty_namespaces = o.empty_namespaces.clone();
        opts.cgroups_mode = (!o.cgroups_mode.is_empty()).then(|| o.cgroups_mode.clone());
    }
    opts.open_tcp |= wanted.tcp_established;
    opts.external_unix_sockets |= wanted.ext_unix_sk;
    opts.file_locks |= wanted.file_locks;
    if opts.cgroups_mode.is_none() {
        opts.cgroups_mode = wanted.manage_cgroups_mode.clone();
    }
    if opts.image_path.as_os_str().is_empty() {
        if let Some(dir) = &config.criu_image_path {
            opts.image_path = dir.join(&req.id);
        }
    }
    if opts.image_path.as_os_str().is_empty() {
        return Err(OptionsError::NoImagePath);
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    fn request(path: &str, options: Option<CheckpointOptions>) -> CheckpointTaskRequest {
        CheckpointTaskRequest {
            id: "t".into(),
            path: path.into(),
            options: options
                .map(|o| Any {
                    type_url: "containerd.runc.v1.CheckpointOptions".into(),
                    value: o.write_to_bytes().unwrap(),
                    ..Default::default()
                })
                .into(),
            ..Default::default()
        }
    }

    #[test]
    fn call_options_win_and_annotations_add() {
        let o = CheckpointOptions {
            exit: true,
            image_path: "/img/from-options".into(),
            work_path: "/work".into(),
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let wanted = CriuAnnotations {
            tcp_established: true,
            file_locks: true,
            manage_cgroups_mode: Some("soft".into()),
            ..Default::default()
        };
        let r = decode(
            &request("/img/path", Some(o)),
            &ShimConfig::default(),
            &wanted,
        )
        .unwrap();
        assert_eq!(r.image_path, PathBuf::from("/img/from-options"));
        assert_eq!(r.work_path, Some(PathBuf::from("/work")));
        assert!(r.exit && r.open_tcp && r.file_locks && !r.external_unix_sockets);
        assert_eq!(r.empty_namespaces, ["network"]);
        assert_eq!(r.cgroups_mode.as_deref(), Some("soft"));
    }

    #[test]
    fn the_configured_image_directory_is_the_fallback() {
        let config = ShimConfig {
            criu_image_path: Some(PathBuf::from("/var/lib/ckpt")),
            ..Default::default()
        };
        let r = decode(&request("", None), &config, &CriuAnnotations::default()).unwrap();
        assert_eq!(r.image_path, PathBuf::from("/var/lib/ckpt/t"));
        let none = decode(
            &request("", None),
            &ShimConfig::default(),
            &CriuAnnotations::default(),
        );
        assert_eq!(none.unwrap_err(), OptionsError::NoImagePath);
    }

    #[test]
    fn garbage_options_are_refused() {
        let mut req = request("/img", None);
        req.options = Some(Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        })
        .into();
        let e = decode(&req, &ShimConfig::default(), &CriuAnnotations::default()).unwrap_err();
        assert!(matches!(e, OptionsError::Decode(_)), "{e}");
    }
}
