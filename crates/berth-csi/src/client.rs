//! A client for any CSI driver on a unix socket: [`connect`], and [`Client`] with
//! [`Client::probe_capabilities`].
//!
//! Used by tests and by the control plane, which drives any CSI driver, not only Berth's. It never
//! retries on its own: callers own retry and backoff. Capability values this build does not know
//! (a newer driver) are ignored rather than treated as errors.

use std::collections::BTreeSet;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::server::{ServeError, parse_endpoint};
use crate::v1::{
    self, controller_client::ControllerClient, controller_service_capability,
    group_controller_client::GroupControllerClient, group_controller_service_capability,
    identity_client::IdentityClient, node_client::NodeClient, node_service_capability, plugin_capability,
};

/// Connects to a CSI endpoint (`unix:///abs/path` or `/abs/path`) and returns a gRPC channel.
///
/// Fails if nothing is listening; the channel reconnects by itself afterwards.
pub async fn connect(endpoint: &str) -> Result<Channel, ServeError> {
    let path = parse_endpoint(endpoint)?;
    // The URI only fills the HTTP/2 :authority; the connector below ignores it and dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ServeError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })
}

/// What a driver advertises through its capability RPCs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Services and constraints from `GetPluginCapabilities`.
    pub plugin: BTreeSet<plugin_capability::service::Type>,
    /// Volume expansion mode from `GetPluginCapabilities`, if any.
    pub volume_expansion: Option<plugin_capability::volume_expansion::Type>,
    /// From `ControllerGetCapabilities`; empty without `CONTROLLER_SERVICE`.
    pub controller: BTreeSet<controller_service_capability::rpc::Type>,
    /// From `GroupControllerGetCapabilities`; empty without `GROUP_CONTROLLER_SERVICE`.
    pub group_controller: BTreeSet<group_controller_service_capability::rpc::Type>,
    /// From `NodeGetCapabilities`; empty when the driver has no node service.
    pub node: BTreeSet<node_service_capability::rpc::Type>,
}

/// Clients for every CSI service, sharing one channel.
#[derive(Debug, Clone)]
pub struct Client {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub group_controller: GroupControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Client {
    /// Wraps an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            group_controller: GroupControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    /// [`connect`]s to `endpoint` and wraps the channel.
    pub async fn connect(endpoint: &str) -> Result<Self, ServeError> {
        connect(endpoint).await.map(Self::new)
    }

    /// Asks the driver what it supports. Controller and group-controller capabilities are asked
    /// only when the plugin advertises those services; a node service answering `UNIMPLEMENTED`
    /// counts as having none.
    pub async fn probe_capabilities(&mut self) -> Result<Capabilities, tonic::Status> {
        use plugin_capability::Type as Plugin;
        use plugin_capability::service::Type as Service;

        let mut caps = Capabilities::default();
        let plugin = self
            .identity
            .get_plugin_capabilities(v1::GetPluginCapabilitiesRequest {})
            .await?
            .into_inner();
        for cap in plugin.capabilities {
            match cap.r#type {
                Some(Plugin::Service(s)) => caps.plugin.extend(Service::try_from(s.r#type).ok()),
                Some(Plugin::VolumeExpansion(e)) => {
                    use plugin_capability::volume_expansion::Type as Expansion;
                    caps.volume_expansion = Expansion::try_from(e.r#type).ok().filter(|t| *t != Expansion::Unknown);
                }
                None => {}
            }
        }
        caps.plugin.remove(&Service::Unknown);

        if caps.plugin.contains(&Service::ControllerService) {
            use controller_service_capability::{Type, rpc};
            let resp = self
                .controller
                .controller_get_capabilities(v1::ControllerGetCapabilitiesRequest {})
                .await?
                .into_inner();
            caps.controller = resp
                .capabilities
                .into_iter()
                .filter_map(|c| match c.r#type {
                    Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type).ok(),
                    None => None,
                })
                .filter(|t| *t != rpc::Type::Unknown)
                .collect();
        }

        if caps.plugin.contains(&Service::GroupControllerService) {
            use group_controller_service_capability::{Type, rpc};
            let resp = self
                .group_controller
                .group_controller_get_capabilities(v1::GroupControllerGetCapabilitiesRequest {})
                .await?
                .into_inner();
            caps.group_controller = resp
                .capabilities
                .into_iter()
                .filter_map(|c| match c.r#type {
                    Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type).ok(),
                    None => None,
                })
                .filter(|t| *t != rpc::Type::Unknown)
                .collect();
        }

        match self.node.node_get_capabilities(v1::NodeGetCapabilitiesRequest {}).await {
            Ok(resp) => {
                use node_service_capability::{Type, rpc};
                caps.node = resp
                    .into_inner()
                    .capabilities
                    .into_iter()
                    .filter_map(|c| match c.r#type {
                        Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type).ok(),
                        None => None,
                    })
                    .filter(|t| *t != rpc::Type::Unknown)
                    .collect();
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {}
            Err(status) => return Err(status),
        }
        Ok(caps)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{CsiError, Driver, serve_unix};
    use std::sync::Arc;

    /// A controller-only driver with a few capabilities, one of them unknown to this build.
    struct ControllerOnly;

    impl Driver for ControllerOnly {
        async fn get_plugin_capabilities(
            &self,
            _req: v1::GetPluginCapabilitiesRequest,
        ) -> Result<v1::GetPluginCapabilitiesResponse, CsiError> {
            use plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
            let service = |t: service::Type| v1::PluginCapability {
                r#type: Some(Type::Service(Service { r#type: t as i32 })),
            };
            Ok(v1::GetPluginCapabilitiesResponse {
                capabilities: vec![
                    service(service::Type::ControllerService),
                    service(service::Type::VolumeAccessibilityConstraints),
                    v1::PluginCapability {
                        r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                            r#type: volume_expansion::Type::Online as i32,
                        })),
                    },
                ],
            })
        }

        async fn controller_get_capabilities(
            &self,
            _req: v1::ControllerGetCapabilitiesRequest,
        ) -> Result<v1::ControllerGetCapabilitiesResponse, CsiError> {
            use controller_service_capability::{Rpc, Type, rpc};
            let cap = |t: i32| v1::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t })),
            };
            Ok(v1::ControllerGetCapabilitiesResponse {
                capabilities: vec![
                    cap(rpc::Type::CreateDeleteVolume as i32),
                    cap(rpc::Type::GetCapacity as i32),
                    cap(999),
                ],
            })
        }
    }

    #[tokio::test]
    async fn probe_capabilities_reports_what_the_driver_advertises() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ep = endpoint.clone();
        let server = tokio::spawn(async move {
            serve_unix(&ep, Arc::new(ControllerOnly), async {
                let _ = stopped.await;
            })
            .await
        });
        let mut client = None;
        for _ in 0..500 {
            if let Ok(c) = Client::connect(&endpoint).await {
                client = Some(c);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let caps = client.unwrap().probe_capabilities().await.unwrap();

        use plugin_capability::service::Type as Service;
        assert_eq!(
            caps.plugin,
            BTreeSet::from([Service::ControllerService, Service::VolumeAccessibilityConstraints])
        );
        assert_eq!(
            caps.volume_expansion,
            Some(plugin_capability::volume_expansion::Type::Online)
        );
        use controller_service_capability::rpc::Type as Ctrl;
        assert_eq!(
            caps.controller,
            BTreeSet::from([Ctrl::CreateDeleteVolume, Ctrl::GetCapacity])
        );
        assert!(caps.group_controller.is_empty());
        assert!(caps.node.is_empty(), "node service is unimplemented");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
