//! The server side: tonic service adapters around a [`Driver`], and [`serve_unix`].
//!
//! Owns the request path `gRPC -> limits check -> driver -> Status`. Every RPC runs in one `csi` span
//! that carries the method and, when the request has them, `volume_id`, `name` and `snapshot_id`;
//! requests themselves are never logged, and secrets never reach a log because their `Debug` is
//! redacted. Errors map to `tonic::Status` only through `From<CsiError>`.
//!
//! The socket is created with mode 0600. A stale socket at the endpoint is replaced, but a file of any
//! other kind is never removed. On shutdown the socket is removed if it is still the one we bound.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, field};

use crate::v1::{controller_server, group_controller_server, identity_server, node_server};
use crate::validate::SpecLimits;
use crate::{CsiError, Driver, v1};

/// Longest socket path `bind(2)` accepts: `sun_path` is 108 bytes including the NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Serving or connecting to a CSI endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not `unix:///absolute/path` or an absolute path.
    #[error("endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// Something other than a socket sits at the socket path; it is left alone.
    #[error("{}: exists and is not a socket; remove it or choose another endpoint", path.display())]
    NotASocket { path: PathBuf },
    /// A filesystem step on the socket path failed.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// The gRPC server failed while serving.
    #[error("serving CSI: {0}")]
    Transport(#[source] tonic::transport::Error),
    /// The client could not reach the driver's socket.
    #[error("connecting to CSI endpoint {endpoint:?}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
}

/// Parses a CSI endpoint: `unix:///abs/path`, `unix:/abs/path` or a bare `/abs/path`.
pub fn parse_endpoint(endpoint: &str) -> Result<PathBuf, ServeError> {
    let invalid = |reason: &str| ServeError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(invalid("write unix:///absolute/path (three slashes)"));
        }
        rest
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if endpoint.contains("://") {
        return Err(invalid("only unix sockets are supported"));
    } else {
        endpoint
    };
    if !path.starts_with('/') {
        return Err(invalid("the socket path must be absolute"));
    }
    if path.ends_with('/') {
        return Err(invalid("the socket path names a directory"));
    }
    if path.contains('\0') {
        return Err(invalid("the socket path contains a NUL byte"));
    }
    if path.len() > MAX_SOCKET_PATH_BYTES {
        return Err(invalid(&format!(
            "the socket path is {} bytes; unix sockets allow at most {MAX_SOCKET_PATH_BYTES}",
            path.len()
        )));
    }
    Ok(PathBuf::from(path))
}

/// Serves Identity, Controller, GroupController and Node for `driver` on a unix socket until
/// `shutdown` resolves, then removes the socket.
pub async fn serve_unix<D: Driver>(
    endpoint: &str,
    driver: Arc<D>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let path = parse_endpoint(endpoint)?;
    remove_stale_socket(&path)?;
    let io_err = |action: &'static str| {
        let path = path.clone();
        move |source| ServeError::Io { path, action, source }
    };
    let listener = UnixListener::bind(&path).map_err(io_err("bind"))?;
    // Between bind and chmod the socket has umask permissions; changing the process-wide umask
    // instead would race with other threads creating files.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err("chmod 0600"))?;
    let bound = std::fs::symlink_metadata(&path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(io_err("stat"))?;
    tracing::info!(path = %path.display(), "serving CSI");

    let service = CsiService::new(driver);
    let result = tonic::transport::Server::builder()
        .add_service(identity_server::IdentityServer::new(service.clone()))
        .add_service(controller_server::ControllerServer::new(service.clone()))
        .add_service(group_controller_server::GroupControllerServer::new(service.clone()))
        .add_service(node_server::NodeServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;

    // Remove only our own socket: a newer process may already have replaced it.
    match std::fs::symlink_metadata(&path) {
        Ok(m) if (m.dev(), m.ino()) == bound => {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %err, "could not remove CSI socket");
            }
        }
        _ => {}
    }
    result.map_err(ServeError::Transport)
}

fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(|source| ServeError::Io {
            path: path.to_owned(),
            action: "remove stale socket",
            source,
        }),
        Ok(_) => Err(ServeError::NotASocket { path: path.to_owned() }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServeError::Io {
            path: path.to_owned(),
            action: "stat",
            source,
        }),
    }
}

/// The tonic services of all four CSI servers, backed by one driver.
#[derive(Debug)]
pub struct CsiService<D> {
    driver: Arc<D>,
}

impl<D> Clone for CsiService<D> {
    fn clone(&self) -> Self {
        Self {
            driver: Arc::clone(&self.driver),
        }
    }
}

impl<D: Driver> CsiService<D> {
    /// Wraps a driver; add it to a tonic server with e.g. `identity_server::IdentityServer::new`.
    pub fn new(driver: Arc<D>) -> Self {
        Self { driver }
    }

    /// Runs one RPC: span, spec limits, driver, error mapping.
    async fn call<'a, Req, Resp, Fut>(
        &'a self,
        method: &'static str,
        request: Request<Req>,
        rpc: impl FnOnce(&'a D, Req) -> Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Req: SpecLimits + SpanFields,
        Fut: Future<Output = Result<Resp, CsiError>> + Send + 'a,
    {
        let req = request.into_inner();
        let span = tracing::info_span!(
            "csi",
            method,
            volume_id = field::Empty,
            name = field::Empty,
            snapshot_id = field::Empty
        );
        for (key, value) in [
            ("volume_id", req.volume_id()),
            ("name", req.name()),
            ("snapshot_id", req.snapshot_id()),
        ] {
            // Oversized ids are refused below; keep them out of the log too.
            if !value.is_empty() && value.len() <= crate::validate::MAX_STRING_BYTES {
                span.record(key, value);
            }
        }
        async move {
            let started = Instant::now();
            let result = match req.check_limits() {
                Ok(()) => rpc(&self.driver, req).await,
                Err(err) => Err(err),
            };
            let elapsed_ms = started.elapsed().as_millis();
            match result {
                Ok(resp) => {
                    tracing::debug!(elapsed_ms, "ok");
                    Ok(Response::new(resp))
                }
                Err(err) => {
                    let code = err.code();
                    match err {
                        CsiError::Internal(_) | CsiError::Unavailable(_) => {
                            tracing::warn!(elapsed_ms, ?code, %err, "failed")
                        }
                        CsiError::Unimplemented(_) => tracing::debug!(?code, "unimplemented"),
                        _ => tracing::info!(elapsed_ms, ?code, %err, "refused"),
                    }
                    Err(err.into())
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// The identifiers a request contributes to its span; empty when the request has none.
pub(crate) trait SpanFields {
    fn volume_id(&self) -> &str {
        ""
    }
    fn name(&self) -> &str {
        ""
    }
    fn snapshot_id(&self) -> &str {
        ""
    }
}

macro_rules! span_fields {
    ($($ty:ident { $($key:ident : $field:ident),* })*) => {
        $(impl SpanFields for v1::$ty {
            $(fn $key(&self) -> &str {
                &self.$field
            })*
        })*
    };
}

span_fields! {
    GetPluginInfoRequest {}
    GetPluginCapabilitiesRequest {}
    ProbeRequest {}
    CreateVolumeRequest { name: name }
    DeleteVolumeRequest { volume_id: volume_id }
    ControllerPublishVolumeRequest { volume_id: volume_id }
    ControllerUnpublishVolumeRequest { volume_id: volume_id }
    ValidateVolumeCapabilitiesRequest { volume_id: volume_id }
    ListVolumesRequest {}
    GetCapacityRequest {}
    ControllerGetCapabilitiesRequest {}
    CreateSnapshotRequest { volume_id: source_volume_id, name: name }
    DeleteSnapshotRequest { snapshot_id: snapshot_id }
    ListSnapshotsRequest { volume_id: source_volume_id, snapshot_id: snapshot_id }
    GetSnapshotRequest { snapshot_id: snapshot_id }
    ControllerExpandVolumeRequest { volume_id: volume_id }
    ControllerGetVolumeRequest { volume_id: volume_id }
    ControllerModifyVolumeRequest { volume_id: volume_id }
    GroupControllerGetCapabilitiesRequest {}
    CreateVolumeGroupSnapshotRequest { name: name }
    DeleteVolumeGroupSnapshotRequest { snapshot_id: group_snapshot_id }
    GetVolumeGroupSnapshotRequest { snapshot_id: group_snapshot_id }
    NodeStageVolumeRequest { volume_id: volume_id }
    NodeUnstageVolumeRequest { volume_id: volume_id }
    NodePublishVolumeRequest { volume_id: volume_id }
    NodeUnpublishVolumeRequest { volume_id: volume_id }
    NodeGetVolumeStatsRequest { volume_id: volume_id }
    NodeExpandVolumeRequest { volume_id: volume_id }
    NodeGetCapabilitiesRequest {}
    NodeGetInfoRequest {}
}

/// Implements a generated service trait by forwarding each RPC through [`CsiService::call`].
/// The `#[tonic::async_trait]` attribute must see the methods, so the whole impl is generated.
macro_rules! adapter {
    ($service:ident :: $trait_:ident { $($method:ident => $rpc:literal ($req:ident) -> $resp:ident;)* }) => {
        #[tonic::async_trait]
        impl<D: Driver> $service::$trait_ for CsiService<D> {
            $(async fn $method(
                &self,
                request: Request<v1::$req>,
            ) -> Result<Response<v1::$resp>, Status> {
                self.call($rpc, request, |driver, req| driver.$method(req)).await
            })*
        }
    };
}

adapter!(identity_server::Identity {
    get_plugin_info => "GetPluginInfo"(GetPluginInfoRequest) -> GetPluginInfoResponse;
    get_plugin_capabilities => "GetPluginCapabilities"(GetPluginCapabilitiesRequest) -> GetPluginCapabilitiesResponse;
    probe => "Probe"(ProbeRequest) -> ProbeResponse;
});

adapter!(controller_server::Controller {
    create_volume => "CreateVolume"(CreateVolumeRequest) -> CreateVolumeResponse;
    delete_volume => "DeleteVolume"(DeleteVolumeRequest) -> DeleteVolumeResponse;
    controller_publish_volume => "ControllerPublishVolume"(ControllerPublishVolumeRequest) -> ControllerPublishVolumeResponse;
    controller_unpublish_volume => "ControllerUnpublishVolume"(ControllerUnpublishVolumeRequest) -> ControllerUnpublishVolumeResponse;
    validate_volume_capabilities => "ValidateVolumeCapabilities"(ValidateVolumeCapabilitiesRequest) -> ValidateVolumeCapabilitiesResponse;
    list_volumes => "ListVolumes"(ListVolumesRequest) -> ListVolumesResponse;
    get_capacity => "GetCapacity"(GetCapacityRequest) -> GetCapacityResponse;
    controller_get_capabilities => "ControllerGetCapabilities"(ControllerGetCapabilitiesRequest) -> ControllerGetCapabilitiesResponse;
    create_snapshot => "CreateSnapshot"(CreateSnapshotRequest) -> CreateSnapshotResponse;
    delete_snapshot => "DeleteSnapshot"(DeleteSnapshotRequest) -> DeleteSnapshotResponse;
    list_snapshots => "ListSnapshots"(ListSnapshotsRequest) -> ListSnapshotsResponse;
    get_snapshot => "GetSnapshot"(GetSnapshotRequest) -> GetSnapshotResponse;
    controller_expand_volume => "ControllerExpandVolume"(ControllerExpandVolumeRequest) -> ControllerExpandVolumeResponse;
    controller_get_volume => "ControllerGetVolume"(ControllerGetVolumeRequest) -> ControllerGetVolumeResponse;
    controller_modify_volume => "ControllerModifyVolume"(ControllerModifyVolumeRequest) -> ControllerModifyVolumeResponse;
});

adapter!(group_controller_server::GroupController {
    group_controller_get_capabilities => "GroupControllerGetCapabilities"(GroupControllerGetCapabilitiesRequest) -> GroupControllerGetCapabilitiesResponse;
    create_volume_group_snapshot => "CreateVolumeGroupSnapshot"(CreateVolumeGroupSnapshotRequest) -> CreateVolumeGroupSnapshotResponse;
    delete_volume_group_snapshot => "DeleteVolumeGroupSnapshot"(DeleteVolumeGroupSnapshotRequest) -> DeleteVolumeGroupSnapshotResponse;
    get_volume_group_snapshot => "GetVolumeGroupSnapshot"(GetVolumeGroupSnapshotRequest) -> GetVolumeGroupSnapshotResponse;
});

adapter!(node_server::Node {
    node_stage_volume => "NodeStageVolume"(NodeStageVolumeRequest) -> NodeStageVolumeResponse;
    node_unstage_volume => "NodeUnstageVolume"(NodeUnstageVolumeRequest) -> NodeUnstageVolumeResponse;
    node_publish_volume => "NodePublishVolume"(NodePublishVolumeRequest) -> NodePublishVolumeResponse;
    node_unpublish_volume => "NodeUnpublishVolume"(NodeUnpublishVolumeRequest) -> NodeUnpublishVolumeResponse;
    node_get_volume_stats => "NodeGetVolumeStats"(NodeGetVolumeStatsRequest) -> NodeGetVolumeStatsResponse;
    node_expand_volume => "NodeExpandVolume"(NodeExpandVolumeRequest) -> NodeExpandVolumeResponse;
    node_get_capabilities => "NodeGetCapabilities"(NodeGetCapabilitiesRequest) -> NodeGetCapabilitiesResponse;
    node_get_info => "NodeGetInfo"(NodeGetInfoRequest) -> NodeGetInfoResponse;
});

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::validate::require_nonempty;
    use rstest::rstest;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    #[rstest]
    #[case("unix:///run/berth/csi.sock", "/run/berth/csi.sock")]
    #[case("unix:/run/berth/csi.sock", "/run/berth/csi.sock")]
    #[case("/run/berth/csi.sock", "/run/berth/csi.sock")]
    #[case("unix:///csi.sock", "/csi.sock")]
    fn parse_endpoint_accepts(#[case] endpoint: &str, #[case] path: &str) {
        assert_eq!(parse_endpoint(endpoint).unwrap(), PathBuf::from(path));
    }

    #[rstest]
    #[case::empty("")]
    #[case::relative("csi.sock")]
    #[case::relative_unix("unix:csi.sock")]
    #[case::host_form("unix://run/csi.sock")]
    #[case::tcp("tcp://127.0.0.1:10000")]
    #[case::dns("dns:///csi.example")]
    #[case::directory("unix:///run/berth/")]
    #[case::nul("/run/cs\0i.sock")]
    #[case::too_long(&format!("unix:///{}", "a".repeat(107)))]
    fn parse_endpoint_rejects(#[case] endpoint: &str) {
        assert!(
            matches!(parse_endpoint(endpoint), Err(ServeError::InvalidEndpoint { .. })),
            "{endpoint:?} was accepted"
        );
    }

    /// Implements just enough to exercise the adapter.
    struct TestDriver;

    impl Driver for TestDriver {
        async fn get_plugin_info(&self, _req: v1::GetPluginInfoRequest) -> Result<v1::GetPluginInfoResponse, CsiError> {
            Ok(v1::GetPluginInfoResponse {
                name: "test.berth.io".into(),
                vendor_version: "0.0.1".into(),
                manifest: Default::default(),
            })
        }

        async fn probe(&self, _req: v1::ProbeRequest) -> Result<v1::ProbeResponse, CsiError> {
            Ok(v1::ProbeResponse { ready: Some(true) })
        }

        async fn create_volume(&self, req: v1::CreateVolumeRequest) -> Result<v1::CreateVolumeResponse, CsiError> {
            require_nonempty("name", &req.name)?;
            Ok(v1::CreateVolumeResponse {
                volume: Some(v1::Volume {
                    volume_id: format!("vol-{}", req.name),
                    ..Default::default()
                }),
            })
        }
    }

    struct Running {
        endpoint: String,
        path: PathBuf,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), ServeError>>,
        _dir: tempfile::TempDir,
    }

    fn socket_in(dir: &tempfile::TempDir) -> (PathBuf, String) {
        let path = dir.path().join("csi.sock");
        let endpoint = format!("unix://{}", path.display());
        (path, endpoint)
    }

    async fn start(dir: tempfile::TempDir) -> Running {
        let (path, endpoint) = socket_in(&dir);
        let (stop, stopped) = oneshot::channel::<()>();
        let ep = endpoint.clone();
        let task = tokio::spawn(async move {
            serve_unix(&ep, Arc::new(TestDriver), async {
                let _ = stopped.await;
            })
            .await
        });
        for _ in 0..500 {
            // Poll by connecting: a stale socket file exists before the server binds.
            if crate::connect(&endpoint).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Running {
            endpoint,
            path,
            stop,
            task,
            _dir: dir,
        }
    }

    #[tokio::test]
    async fn serves_over_unix_socket_and_maps_errors() {
        let running = start(tempfile::tempdir().unwrap()).await;
        let mode = std::fs::metadata(&running.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode is {mode:o}");

        let mut client = crate::Client::connect(&running.endpoint).await.unwrap();
        let info = client
            .identity
            .get_plugin_info(v1::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "test.berth.io");
        assert_eq!(info.vendor_version, "0.0.1");

        let probe = client.identity.probe(v1::ProbeRequest {}).await.unwrap();
        assert_eq!(probe.into_inner().ready, Some(true));

        let status = client.node.node_get_info(v1::NodeGetInfoRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().contains("NodeGetInfo"), "{}", status.message());

        // Driver-side InvalidArgument.
        let status = client
            .controller
            .create_volume(v1::CreateVolumeRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "name: must not be empty");
        assert!(status.details().is_empty());

        // Adapter-side size limit, checked before the (unimplemented) driver method.
        let status = client
            .controller
            .delete_volume(v1::DeleteVolumeRequest {
                volume_id: "v".repeat(129),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("volume_id: "), "{}", status.message());
        assert!(status.details().is_empty());

        let created = client
            .controller
            .create_volume(v1::CreateVolumeRequest {
                name: "pvc-1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(created.volume.unwrap().volume_id, "vol-pvc-1");

        running.stop.send(()).unwrap();
        running.task.await.unwrap().unwrap();
        assert!(!running.path.exists(), "socket left behind after shutdown");
    }

    #[tokio::test]
    async fn replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = socket_in(&dir);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let running = start(dir).await;
        crate::connect(&running.endpoint).await.unwrap();
        running.stop.send(()).unwrap();
        running.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn refuses_to_remove_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (path, endpoint) = socket_in(&dir);
        std::fs::write(&path, b"keep me").unwrap();
        let err = serve_unix(&endpoint, Arc::new(TestDriver), async {}).await.unwrap_err();
        assert!(matches!(err, ServeError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn connect_fails_when_nothing_listens() {
        let dir = tempfile::tempdir().unwrap();
        let (_, endpoint) = socket_in(&dir);
        let err = crate::connect(&endpoint).await.unwrap_err();
        assert!(matches!(err, ServeError::Connect { .. }), "{err}");
    }
}
