//! The kinds Berth serves: group, version, kind, plural and singular names, scope, short names and
//! whether a `status` subresource exists. Discovery, routing and the store's keys all come from
//! this one table.

/// Whether objects of a kind live in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Namespaced,
    Cluster,
}

/// One served kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// API group; `""` for core.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Lower-case plural, the URL segment: `persistentvolumeclaims`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub scope: Scope,
    pub short_names: &'static [&'static str],
    /// Whether `/status` is a subresource (status is then ignored on main-resource writes).
    pub has_status: bool,
}

impl Resource {
    /// `v1` for core, `group/version` otherwise: the `apiVersion` of objects of this kind.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn namespaced(&self) -> bool {
        self.scope == Scope::Namespaced
    }
}

#[allow(clippy::too_many_arguments)] // a table row: every column is a plain field
const fn r(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    scope: Scope,
    short_names: &'static [&'static str],
    has_status: bool,
) -> Resource {
    Resource {
        group,
        version,
        kind,
        plural,
        singular,
        scope,
        short_names,
        has_status,
    }
}

use Scope::{Cluster, Namespaced};

/// Every kind Berth serves, in discovery order.
pub const RESOURCES: &[Resource] = &[
    r("", "v1", "Namespace", "namespaces", "namespace", Cluster, &["ns"], true),
    r("", "v1", "Node", "nodes", "node", Cluster, &["no"], true),
    r("", "v1", "Pod", "pods", "pod", Namespaced, &["po"], true),
    r("", "v1", "Event", "events", "event", Namespaced, &["ev"], false),
    r("", "v1", "Secret", "secrets", "secret", Namespaced, &[], false),
    r(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        Namespaced,
        &["cm"],
        false,
    ),
    r(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        "persistentvolume",
        Cluster,
        &["pv"],
        true,
    ),
    r(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        Namespaced,
        &["pvc"],
        true,
    ),
    r(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        "storageclass",
        Cluster,
        &["sc"],
        false,
    ),
    r(
        "storage.k8s.io",
        "v1",
        "VolumeAttachment",
        "volumeattachments",
        "volumeattachment",
        Cluster,
        &[],
        true,
    ),
    r(
        "storage.k8s.io",
        "v1",
        "CSIDriver",
        "csidrivers",
        "csidriver",
        Cluster,
        &[],
        false,
    ),
    r(
        "storage.k8s.io",
        "v1",
        "CSINode",
        "csinodes",
        "csinode",
        Cluster,
        &[],
        false,
    ),
    r(
        "storage.k8s.io",
        "v1",
        "CSIStorageCapacity",
        "csistoragecapacities",
        "csistoragecapacity",
        Namespaced,
        &[],
        false,
    ),
    r(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshot",
        "volumesnapshots",
        "volumesnapshot",
        Namespaced,
        &["vs"],
        true,
    ),
    r(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotContent",
        "volumesnapshotcontents",
        "volumesnapshotcontent",
        Cluster,
        &["vsc", "vscs"],
        true,
    ),
    r(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotClass",
        "volumesnapshotclasses",
        "volumesnapshotclass",
        Cluster,
        &["vsclass", "vsclasses"],
        false,
    ),
];

/// The kind served at `group`/`version` under the URL segment `plural`.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The kind named by `apiVersion` and `kind` of an object.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// The API groups other than core, each once, in discovery order.
pub fn groups() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.contains(&r.group) {
            out.push(r.group);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_are_unique_per_group() {
        for (i, a) in RESOURCES.iter().enumerate() {
            for b in &RESOURCES[i + 1..] {
                assert!(!(a.group == b.group && a.plural == b.plural), "{} twice", a.plural);
            }
        }
    }

    #[test]
    fn lookups() {
        assert_eq!(
            by_plural("", "v1", "persistentvolumes").map(|r| r.kind),
            Some("PersistentVolume")
        );
        assert_eq!(
            by_kind("storage.k8s.io/v1", "StorageClass").map(|r| r.plural),
            Some("storageclasses")
        );
        assert!(by_kind("v1", "StorageClass").is_none());
        assert_eq!(groups(), vec!["storage.k8s.io", "snapshot.storage.k8s.io"]);
    }
}
