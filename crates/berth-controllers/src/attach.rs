//! Naming for attach/detach: the VolumeAttachment name Kubernetes' attach/detach controller gives
//! a CSI volume on a node (`pkg/volume/csi/csi_attacher.go`, `getAttachmentName`). Pure.
//!
//! The name is a function of the volume handle, the driver and the node only, so the attacher
//! and the detacher find the same object without storing anything, and repeating an attach after
//! a crash names the same object again (idempotent).

use sha2::{Digest, Sha256};

/// The VolumeAttachment name for `volume_handle` of `driver` on `node`: `csi-` followed by the
/// lowercase hex SHA-256 of the three strings concatenated with no separator, as Kubernetes does
/// (so the name is always 68 characters and a valid object name, whatever the handle holds).
pub fn attachment_name(volume_handle: &str, driver: &str, node: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(volume_handle.as_bytes());
    hasher.update(driver.as_bytes());
    hasher.update(node.as_bytes());
    format!("csi-{:x}", hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    // Expected values computed independently with `printf %s "<handle><driver><node>" | sha256sum`.
    #[rstest]
    #[case::provisioned_volume(
        "pvc-0a1b2c3d-1111-2222-3333-444455556666",
        "berth.csi.io",
        "node-1",
        "csi-34fb0064ae218bfcf523939e30a7b98d46b8549164605dd8e3439782faa66752"
    )]
    #[case::hostpath_driver(
        "vol-1",
        "hostpath.csi.k8s.io",
        "node-a",
        "csi-5a70c5de395ccad5e79daeb27c7c4f2634b675e6e1bb2a397999a016143bc9fb"
    )]
    #[case::empty_strings_hash_the_empty_input(
        "",
        "",
        "",
        "csi-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )]
    fn names_match_kubernetes(#[case] handle: &str, #[case] driver: &str, #[case] node: &str, #[case] want: &str) {
        assert_eq!(attachment_name(handle, driver, node), want);
    }

    #[test]
    fn only_the_concatenation_counts() {
        // No separator is hashed: moving a character across the boundary gives the same name,
        // exactly as in Kubernetes.
        assert_eq!(
            attachment_name("vol-1h", "ostpath.csi.k8s.io", "node-a"),
            attachment_name("vol-1", "hostpath.csi.k8s.io", "node-a")
        );
        assert_ne!(
            attachment_name("vol-1", "hostpath.csi.k8s.io", "node-a"),
            attachment_name("vol-1", "hostpath.csi.k8s.io", "node-b")
        );
        assert_eq!(attachment_name("a", "b", "c").len(), 68);
    }
}
