//! The CSI drivers the controllers call, by name: Berth's own and any other driver given by
//! its endpoint. A driver is asked its name (`GetPluginInfo`), capabilities and, when it has a
//! node service, its node id and topology (`NodeGetInfo`) when it is added; the controllers
//! then look it up by the name a StorageClass's `provisioner`, a PV's `spec.csi.driver` or a
//! VolumeSnapshotClass's `driver` gives.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use berth_csi::v1::node_service_capability::rpc::Type as NodeCap;
use berth_csi::v1::{controller_service_capability::rpc::Type as ControllerCap, plugin_capability};
use berth_csi::{Capabilities, Client};

/// One connected driver.
#[derive(Debug, Clone)]
pub struct Driver {
    pub name: String,
    pub endpoint: String,
    pub client: Client,
    pub caps: Capabilities,
    /// `NodeGetInfo`, when the driver serves this node too.
    pub node: Option<NodeInfo>,
}

/// What `NodeGetInfo` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub max_volumes: i64,
    pub topology: std::collections::BTreeMap<String, String>,
}

impl Driver {
    /// Whether the controller service advertises `cap`.
    pub fn controller(&self, cap: ControllerCap) -> bool {
        self.caps.controller.contains(&cap)
    }

    /// Whether the node service advertises `cap`.
    pub fn node_cap(&self, cap: NodeCap) -> bool {
        self.caps.node.contains(&cap)
    }

    /// Whether the plugin reports topology constraints.
    pub fn has_topology(&self) -> bool {
        self.caps
            .plugin
            .contains(&plugin_capability::service::Type::VolumeAccessibilityConstraints)
    }

    /// Connects to `endpoint` and asks the driver who it is and what it can do.
    pub async fn connect(endpoint: &str) -> Result<Driver, String> {
        let mut client = Client::connect(endpoint)
            .await
            .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
        let info = client
            .identity
            .get_plugin_info(berth_csi::v1::GetPluginInfoRequest {})
            .await
            .map_err(|e| format!("GetPluginInfo on {endpoint}: {}", e.message()))?
            .into_inner();
        let caps = client
            .probe_capabilities()
            .await
            .map_err(|e| format!("capabilities of {}: {}", info.name, e.message()))?;
        let node = if caps.node.is_empty() {
            None
        } else {
            match client.node.node_get_info(berth_csi::v1::NodeGetInfoRequest {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    Some(NodeInfo {
                        node_id: r.node_id,
                        max_volumes: r.max_volumes_per_node,
                        topology: r
                            .accessible_topology
                            .map(|t| t.segments.into_iter().collect())
                            .unwrap_or_default(),
                    })
                }
                Err(_) => None,
            }
        };
        Ok(Driver {
            name: info.name,
            endpoint: endpoint.to_owned(),
            client,
            caps,
            node,
        })
    }
}

/// The registry.
#[derive(Debug)]
pub struct Drivers {
    by_name: RwLock<HashMap<String, Arc<Driver>>>,
    /// Bumped on every registration, so controllers can look again at what waited for a driver.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Drivers {
    pub fn new() -> Arc<Self> {
        Arc::new(Drivers {
            by_name: RwLock::default(),
            generation: tokio::sync::watch::channel(0).0,
        })
    }

    /// Adds (or replaces) a connected driver.
    pub fn add(&self, driver: Driver) {
        self.by_name
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(driver.name.clone(), Arc::new(driver));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes whenever a driver is registered.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The driver called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Driver>> {
        self.by_name
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every driver.
    pub fn all(&self) -> Vec<Arc<Driver>> {
        self.by_name
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}
