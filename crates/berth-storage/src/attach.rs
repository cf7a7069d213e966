//! ControllerPublish / ControllerUnpublish for a node-local driver.
//!
//! A Berth volume lives on one node, so only that node can attach it; any other node id is
//! unknown (NOT_FOUND). Attachments are journaled: they count against max_volumes_per_node
//! (RESOURCE_EXHAUSTED past it), carry PUBLISH_READONLY to NodePublish, and answer
//! LIST_VOLUMES_PUBLISHED_NODES.

use std::collections::HashMap;

use crate::engine::{Engine, EngineError, Result, invalid, lock};
use crate::id::{self, VolumeId};
use crate::journal::AttachmentRecord;
use crate::spec::{self, Capability};

/// The publish_context key telling NodeStage/NodePublish the attachment is read-only.
pub const READONLY_CONTEXT: &str = "berth.dev/readonly";

impl Engine {
    /// ControllerPublishVolume: idempotent for the same arguments.
    pub fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
        cap: Capability,
        read_only: bool,
    ) -> Result<HashMap<String, String>> {
        if node_id.is_empty() {
            return Err(invalid("node_id", "is required"));
        }
        let vol = self.volume(volume_id)?;
        if node_id != self.node_id() {
            return Err(EngineError::NotFound(format!(
                "node {node_id:?} is not known to this driver; volume {volume_id} lives on node {:?}",
                self.node_id()
            )));
        }
        spec::check_capabilities(vol.kind, std::slice::from_ref(&cap))?;
        let _busy = self.try_busy(volume_id)?;
        let key = (vol.id.clone(), node_id.to_owned());
        let (existing, on_node) = {
            let state = lock(&self.state);
            let on_node = state.records.attachments.keys().filter(|(_, n)| n == node_id).count();
            (state.records.attachments.get(&key).cloned(), on_node)
        };
        let context = HashMap::from([(READONLY_CONTEXT.to_owned(), read_only.to_string())]);
        if let Some(a) = existing {
            if a.read_only == read_only && a.capability == cap {
                return Ok(context);
            }
            return Err(EngineError::AlreadyExists(format!(
                "volume {volume_id} is already published to node {node_id} with other arguments"
            )));
        }
        let limit = self.max_volumes_per_node();
        if limit > 0 && i64::try_from(on_node).unwrap_or(i64::MAX) >= limit {
            return Err(EngineError::ResourceExhausted(format!(
                "node {node_id} already has {on_node} volumes attached, its limit (max_volumes_per_node)"
            )));
        }
        let rec = AttachmentRecord {
            volume_id: vol.id.clone(),
            node_id: node_id.to_owned(),
            read_only,
            capability: cap,
        };
        self.journal.put_attachment(&rec)?;
        lock(&self.state).records.attachments.insert(key, rec);
        Ok(context)
    }

    /// ControllerUnpublishVolume: success when not attached; an empty node means every node.
    pub fn controller_unpublish(&self, volume_id: &str, node_id: &str) -> Result<()> {
        id::check_client_id(volume_id).map_err(|e| invalid("volume_id", e.to_string()))?;
        let Some(vid) = VolumeId::parse(volume_id) else {
            return Ok(());
        };
        let _busy = self.try_busy(volume_id)?;
        let keys: Vec<(VolumeId, String)> = lock(&self.state)
            .records
            .attachments
            .keys()
            .filter(|(v, n)| *v == vid && (node_id.is_empty() || n == node_id))
            .cloned()
            .collect();
        for (v, n) in keys {
            self.journal.delete_attachment(&v, &n)?;
            lock(&self.state).records.attachments.remove(&(v, n));
        }
        Ok(())
    }

    /// Nodes a volume is attached to.
    pub fn published_nodes(&self, id: &VolumeId) -> Vec<String> {
        lock(&self.state)
            .records
            .attachments
            .keys()
            .filter(|(v, _)| v == id)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Whether this node's attachment of the volume is read-only.
    pub(crate) fn attached_read_only(&self, id: &VolumeId) -> bool {
        lock(&self.state)
            .records
            .attachments
            .get(&(id.clone(), self.node_id().to_owned()))
            .is_some_and(|a| a.read_only)
    }
}
