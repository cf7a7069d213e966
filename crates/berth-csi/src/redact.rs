//! Redaction of CSI secrets (fields marked `csi_secret` in the proto).
//!
//! Owns the one way a secret is ever formatted: as a count, never as keys or values. The build script
//! generates `Debug` for every secret-bearing message so that it prints its secret fields through
//! [`Redacted`]; the generated derive is switched off for those messages. Formatting a request with
//! `{:?}` is therefore safe anywhere, including logs. `mount_flags`, which the spec says may hold
//! sensitive data, is redacted the same way.

use std::collections::HashMap;
use std::fmt;

/// Formats the wrapped secret without revealing it.
#[derive(Clone, Copy)]
pub struct Redacted<'a, T: ?Sized>(pub &'a T);

impl<K, V, S> fmt::Debug for Redacted<'_, HashMap<K, V, S>> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted: {} entries>", self.0.len())
    }
}

impl fmt::Debug for Redacted<'_, Vec<String>> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted: {} entries>", self.0.len())
    }
}

/// `mount_flags` MAY carry sensitive data (the spec says so), so it is formatted as a count.
impl fmt::Debug for crate::v1::volume_capability::MountVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountVolume")
            .field("fs_type", &self.fs_type)
            .field("mount_flags", &Redacted(&self.mount_flags))
            .field("volume_mount_group", &self.volume_mount_group)
            .finish()
    }
}

impl fmt::Debug for Redacted<'_, String> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::v1;

    const SECRET: &str = "hunter2-do-not-print";

    fn secrets() -> HashMap<String, String> {
        HashMap::from([("password".to_owned(), SECRET.to_owned())])
    }

    #[test]
    fn every_secret_field_in_the_proto_is_known() {
        // 19 messages carry `secrets` in CSI 1.12; a drop means the option lookup broke.
        assert_eq!(v1::SECRET_FIELDS.len(), 19);
        assert!(v1::SECRET_FIELDS.iter().all(|(_, field)| *field == "secrets"));
    }

    #[test]
    fn debug_of_requests_hides_secret_values_but_keeps_other_fields() {
        let create = v1::CreateVolumeRequest {
            name: "pvc-1".into(),
            secrets: secrets(),
            parameters: HashMap::from([("pool".to_owned(), "fast".to_owned())]),
            ..Default::default()
        };
        let publish = v1::NodePublishVolumeRequest {
            volume_id: "vol-1".into(),
            target_path: "/mnt/t".into(),
            secrets: secrets(),
            ..Default::default()
        };
        let stage = v1::NodeStageVolumeRequest {
            volume_id: "vol-2".into(),
            secrets: secrets(),
            ..Default::default()
        };
        for text in [
            format!("{create:?}"),
            format!("{create:#?}"),
            format!("{publish:?}"),
            format!("{stage:?}"),
        ] {
            assert!(!text.contains(SECRET), "secret leaked: {text}");
            assert!(!text.contains("password"), "secret key leaked: {text}");
            assert!(text.contains("<redacted: 1 entries>"), "{text}");
        }
        assert!(format!("{create:?}").contains("pvc-1"));
        assert!(format!("{create:?}").contains("fast"));
        assert!(format!("{publish:?}").contains("/mnt/t"));
    }

    #[test]
    fn mount_flags_are_redacted() {
        let cap = v1::VolumeCapability {
            access_type: Some(v1::volume_capability::AccessType::Mount(
                v1::volume_capability::MountVolume {
                    fs_type: "ext4".into(),
                    mount_flags: vec![format!("password={SECRET}")],
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: None,
        };
        let text = format!("{cap:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("ext4"), "{text}");
    }

    #[test]
    fn redacted_string_hides_value() {
        let s = SECRET.to_owned();
        assert_eq!(format!("{:?}", Redacted(&s)), "<redacted>");
    }
}
