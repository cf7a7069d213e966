//! Parses one volume-plugin HTTP request into an [`Action`], without touching the machine.
//!
//! Docker posts JSON with no Content-Type, so the raw body is decoded here. Activate's body is
//! empty, List and Capabilities send `{}`, and `Opts` may be null. Unknown fields are ignored
//! (newer daemons may add some); unknown endpoints are [`RequestError::NotImplemented`], which
//! the server answers with 404 as the protocol asks. Every parser is total: any bytes give an
//! action or an error, never a panic.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::options::{OptionError, VolumeName, VolumeOptions};

/// Largest request body accepted; real ones are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// A Docker mount ID: 64 hex digits today; anything printable up to 256 bytes is accepted,
/// since it is only a key in Berth's refcount table, never a path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MountId(String);

impl MountId {
    pub fn parse(s: &str) -> Result<MountId, RequestError> {
        if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
            return Err(RequestError::Invalid(format!(
                "mount ID {:?} is not 1 to 256 printable characters",
                s.chars().take(64).collect::<String>()
            )));
        }
        Ok(MountId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What Docker asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Activate,
    Capabilities,
    Create {
        name: VolumeName,
        options: VolumeOptions,
    },
    Remove {
        name: VolumeName,
    },
    Mount {
        name: VolumeName,
        id: MountId,
    },
    Unmount {
        name: VolumeName,
        id: MountId,
    },
    Path {
        name: VolumeName,
    },
    Get {
        name: VolumeName,
    },
    List,
    /// Berth's own (not Docker's): snapshot a Docker volume.
    SnapshotCreate {
        volume: VolumeName,
        name: String,
    },
    /// Berth's own: the snapshots of a Docker volume.
    SnapshotList {
        volume: VolumeName,
    },
    /// Berth's own: delete a snapshot (id or name).
    SnapshotRemove {
        name: String,
    },
}

impl Action {
    /// The endpoint, for logs.
    pub fn method(&self) -> &'static str {
        match self {
            Action::Activate => "Plugin.Activate",
            Action::Capabilities => "VolumeDriver.Capabilities",
            Action::Create { .. } => "VolumeDriver.Create",
            Action::Remove { .. } => "VolumeDriver.Remove",
            Action::Mount { .. } => "VolumeDriver.Mount",
            Action::Unmount { .. } => "VolumeDriver.Unmount",
            Action::Path { .. } => "VolumeDriver.Path",
            Action::Get { .. } => "VolumeDriver.Get",
            Action::List => "VolumeDriver.List",
            Action::SnapshotCreate { .. } => "Berth.SnapshotCreate",
            Action::SnapshotList { .. } => "Berth.SnapshotList",
            Action::SnapshotRemove { .. } => "Berth.SnapshotRemove",
        }
    }
}

/// Why a request could not be turned into an action.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not an endpoint of this plugin (HTTP 404: "not implemented" to Docker).
    #[error("{0} is not implemented by the berth volume plugin")]
    NotImplemented(String),
    /// Only POST is served.
    #[error("{0} is not allowed; the plugin protocol uses POST")]
    Method(String),
    /// The body is not the JSON this endpoint takes.
    #[error("{0}")]
    Malformed(String),
    #[error("request body is {0} bytes; at most 65536 are accepted")]
    TooLarge(usize),
    /// Well-formed, but a field or option is refused.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Option(#[from] OptionError),
}

#[derive(Deserialize)]
struct NameBody {
    #[serde(rename = "Name")]
    name: String,
}

#[derive(Deserialize)]
struct MountBody {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "ID")]
    id: String,
}

#[derive(Deserialize)]
struct SnapshotBody {
    #[serde(rename = "Volume", default)]
    volume: Option<String>,
    #[serde(rename = "Name", default)]
    name: Option<String>,
}

/// Snapshot names are engine names: `[A-Za-z0-9._-]`, 1 to 128 bytes, no `..`.
fn snapshot_name(s: Option<String>) -> Result<String, RequestError> {
    let s = s.ok_or_else(|| RequestError::Malformed("Name is required".into()))?;
    berth_storage::id::check_client_id(&s).map_err(|e| {
        RequestError::Invalid(format!(
            "snapshot name {:?} {e}",
            s.chars().take(64).collect::<String>()
        ))
    })?;
    Ok(s)
}

fn volume_field(s: Option<String>) -> Result<VolumeName, RequestError> {
    let s = s.ok_or_else(|| RequestError::Malformed("Volume is required".into()))?;
    Ok(VolumeName::parse(&s)?)
}

#[derive(Deserialize)]
struct CreateBody {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Opts", default)]
    opts: Option<BTreeMap<String, String>>,
}

fn decode<'a, T: Deserialize<'a>>(method: &str, body: &'a [u8]) -> Result<T, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::Malformed(format!("{method}: the request body is empty")));
    }
    serde_json::from_slice(body).map_err(|e| RequestError::Malformed(format!("{method}: bad request body: {e}")))
}

/// Parses `POST <path>` with `body` into an action.
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Action, RequestError> {
    if body.len() > MAX_BODY {
        return Err(RequestError::TooLarge(body.len()));
    }
    let endpoint = path.strip_prefix('/').unwrap_or(path);
    let known = matches!(
        endpoint,
        "Plugin.Activate"
            | "VolumeDriver.Capabilities"
            | "VolumeDriver.Create"
            | "VolumeDriver.Remove"
            | "VolumeDriver.Mount"
            | "VolumeDriver.Unmount"
            | "VolumeDriver.Path"
            | "VolumeDriver.Get"
            | "VolumeDriver.List"
            | "Berth.SnapshotCreate"
            | "Berth.SnapshotList"
            | "Berth.SnapshotRemove"
    );
    if !known {
        return Err(RequestError::NotImplemented(path.chars().take(128).collect()));
    }
    if method != "POST" {
        return Err(RequestError::Method(method.chars().take(16).collect()));
    }
    let name = |b: NameBody| VolumeName::parse(&b.name).map_err(RequestError::from);
    Ok(match endpoint {
        // Bodies of these are empty or `{}`; neither carries anything.
        "Plugin.Activate" => Action::Activate,
        "VolumeDriver.Capabilities" => Action::Capabilities,
        "VolumeDriver.List" => Action::List,
        "VolumeDriver.Create" => {
            let b: CreateBody = decode(endpoint, body)?;
            let name = VolumeName::parse(&b.name)?;
            let options = VolumeOptions::parse(&b.opts.unwrap_or_default())?;
            Action::Create { name, options }
        }
        "VolumeDriver.Remove" => Action::Remove {
            name: name(decode(endpoint, body)?)?,
        },
        "VolumeDriver.Path" => Action::Path {
            name: name(decode(endpoint, body)?)?,
        },
        "VolumeDriver.Get" => Action::Get {
            name: name(decode(endpoint, body)?)?,
        },
        "VolumeDriver.Mount" | "VolumeDriver.Unmount" => {
            let b: MountBody = decode(endpoint, body)?;
            let name = VolumeName::parse(&b.name)?;
            let id = MountId::parse(&b.id)?;
            if endpoint == "VolumeDriver.Mount" {
                Action::Mount { name, id }
            } else {
                Action::Unmount { name, id }
            }
        }
        "Berth.SnapshotCreate" => {
            let b: SnapshotBody = decode(endpoint, body)?;
            Action::SnapshotCreate {
                volume: volume_field(b.volume)?,
                name: snapshot_name(b.name)?,
            }
        }
        "Berth.SnapshotList" => {
            let b: SnapshotBody = decode(endpoint, body)?;
            Action::SnapshotList {
                volume: volume_field(b.volume)?,
            }
        }
        "Berth.SnapshotRemove" => {
            let b: SnapshotBody = decode(endpoint, body)?;
            Action::SnapshotRemove {
                name: snapshot_name(b.name)?,
            }
        }
        other => return Err(RequestError::NotImplemented(other.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{DockerKind, Source};
    use proptest::prelude::*;
    use rstest::rstest;

    fn n(s: &str) -> VolumeName {
        VolumeName::parse(s).unwrap()
    }

    const ID: &str = "6b1c9d0a6f2e4a8b9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b";

    #[test]
    fn activate_list_and_capabilities_ignore_their_bodies() {
        assert_eq!(parse("POST", "/Plugin.Activate", b""), Ok(Action::Activate));
        assert_eq!(parse("POST", "/VolumeDriver.List", b"{}"), Ok(Action::List));
        assert_eq!(
            parse("POST", "/VolumeDriver.Capabilities", b"{}"),
            Ok(Action::Capabilities)
        );
    }

    #[test]
    fn create_with_null_opts_is_a_default_volume() {
        let a = parse("POST", "/VolumeDriver.Create", br#"{"Name":"v1","Opts":null}"#).unwrap();
        let Action::Create { name, options } = a else {
            panic!("{a:?}")
        };
        assert_eq!(name, n("v1"));
        assert_eq!(
            (options.kind, options.size, options.source),
            (DockerKind::Fs, None, Source::Empty)
        );
        // Opts missing entirely is the same.
        assert!(parse("POST", "/VolumeDriver.Create", br#"{"Name":"v1"}"#).is_ok());
    }

    #[test]
    fn create_carries_its_options() {
        let body = br#"{"Name":"v1","Opts":{"size":"64M","kind":"fs"}}"#;
        let Ok(Action::Create { options, .. }) = parse("POST", "/VolumeDriver.Create", body) else {
            panic!()
        };
        assert_eq!((options.kind, options.size), (DockerKind::Fs, Some(64 << 20)));
    }

    #[rstest]
    #[case("/VolumeDriver.Mount", Action::Mount { name: n("v1"), id: MountId(ID.into()) })]
    #[case("/VolumeDriver.Unmount", Action::Unmount { name: n("v1"), id: MountId(ID.into()) })]
    fn mount_and_unmount(#[case] path: &str, #[case] want: Action) {
        let body = format!(r#"{{"Name":"v1","ID":"{ID}"}}"#);
        assert_eq!(parse("POST", path, body.as_bytes()), Ok(want));
    }

    #[rstest]
    #[case("/VolumeDriver.Remove", Action::Remove { name: n("v1") })]
    #[case("/VolumeDriver.Path", Action::Path { name: n("v1") })]
    #[case("/VolumeDriver.Get", Action::Get { name: n("v1") })]
    fn name_only_requests(#[case] path: &str, #[case] want: Action) {
        // Unknown fields are tolerated.
        assert_eq!(parse("POST", path, br#"{"Name":"v1","Extra":1}"#), Ok(want));
    }

    #[rstest]
    #[case("POST", "/VolumeDriver.Snapshot", b"{}" as &[u8], "NotImplemented")]
    #[case("POST", "/", b"", "NotImplemented")]
    #[case("GET", "/VolumeDriver.List", b"", "Method")]
    #[case("POST", "/VolumeDriver.Get", b"", "Malformed")]
    #[case("POST", "/VolumeDriver.Get", b"{\"Name\":5}", "Malformed")]
    #[case("POST", "/VolumeDriver.Get", b"not json", "Malformed")]
    #[case("POST", "/VolumeDriver.Mount", b"{\"Name\":\"v1\"}", "Malformed")]
    #[case("POST", "/VolumeDriver.Mount", b"{\"Name\":\"v1\",\"ID\":\"\"}", "Invalid")]
    #[case("POST", "/VolumeDriver.Get", b"{\"Name\":\"../../etc\"}", "Option")]
    #[case(
        "POST",
        "/VolumeDriver.Create",
        b"{\"Name\":\"v1\",\"Opts\":{\"size\":1}}",
        "Malformed"
    )]
    #[case(
        "POST",
        "/VolumeDriver.Create",
        b"{\"Name\":\"v1\",\"Opts\":{\"colour\":\"red\"}}",
        "Option"
    )]
    fn bad_requests(#[case] method: &str, #[case] path: &str, #[case] body: &[u8], #[case] kind: &str) {
        let err = parse(method, path, body).unwrap_err();
        assert!(format!("{err:?}").starts_with(kind), "{err:?}");
    }

    #[test]
    fn berth_snapshot_requests() {
        assert_eq!(
            parse("POST", "/Berth.SnapshotCreate", br#"{"Volume":"v1","Name":"s1"}"#),
            Ok(Action::SnapshotCreate {
                volume: n("v1"),
                name: "s1".into()
            })
        );
        assert_eq!(
            parse("POST", "/Berth.SnapshotList", br#"{"Volume":"v1"}"#),
            Ok(Action::SnapshotList { volume: n("v1") })
        );
        assert_eq!(
            parse("POST", "/Berth.SnapshotRemove", br#"{"Name":"s1"}"#),
            Ok(Action::SnapshotRemove { name: "s1".into() })
        );
        assert!(matches!(
            parse("POST", "/Berth.SnapshotCreate", br#"{"Volume":"v1","Name":"../x"}"#),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            parse("POST", "/Berth.SnapshotCreate", br#"{"Name":"s1"}"#),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn huge_bodies_are_refused() {
        let body = vec![b' '; MAX_BODY + 1];
        assert_eq!(
            parse("POST", "/VolumeDriver.Get", &body),
            Err(RequestError::TooLarge(MAX_BODY + 1))
        );
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_answer(path in "/[A-Za-z.]{0,30}", body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse("POST", &path, &body);
        }

        #[test]
        fn any_json_strings_give_an_answer(name in "\\PC{0,40}", id in "\\PC{0,40}") {
            let body = serde_json::json!({"Name": name, "ID": id}).to_string();
            let _ = parse("POST", "/VolumeDriver.Mount", body.as_bytes());
        }
    }
}
