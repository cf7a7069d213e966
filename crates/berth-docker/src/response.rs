//! The JSON answers of the volume-plugin protocol, and the one place errors become HTTP.
//!
//! Docker reads `Err` from every answer: an empty string is success. Errors of a well-formed
//! request are answered with HTTP 200 and `Err` (Docker shows the message as is), malformed
//! requests with 400, unknown endpoints with 404 ("not implemented" to Docker).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::request::RequestError;

/// A successful answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Activate,
    Capabilities,
    /// `{"Err":""}`: Create, Remove, Unmount.
    Done,
    /// Mount and Path.
    Mountpoint(String),
    Volume(VolumeInfo),
    List(Vec<ListItem>),
    Snapshot(SnapshotInfo),
    Snapshots(Vec<SnapshotInfo>),
}

/// A snapshot as Berth's own endpoints report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Id")]
    pub id: String,
    /// The Docker volume it was taken of (empty if that volume is gone).
    #[serde(rename = "Volume")]
    pub volume: String,
    #[serde(rename = "SizeBytes")]
    pub size_bytes: u64,
    #[serde(rename = "CreatedAt", default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// One volume as Get reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VolumeInfo {
    #[serde(rename = "Name")]
    pub name: String,
    /// Where the volume is mounted; empty when no container uses it.
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
    /// RFC 3339; left out when unknown, since a bad value breaks `docker volume inspect`.
    #[serde(rename = "CreatedAt", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(rename = "Status")]
    pub status: BTreeMap<String, serde_json::Value>,
}

/// One volume as List reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListItem {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
}

#[derive(Serialize)]
struct Implements {
    #[serde(rename = "Implements")]
    implements: [&'static str; 1],
}

#[derive(Serialize)]
struct Scope {
    #[serde(rename = "Scope")]
    scope: &'static str,
}

#[derive(Serialize)]
struct CapabilitiesBody {
    #[serde(rename = "Capabilities")]
    capabilities: Scope,
}

#[derive(Serialize)]
struct ErrBody<'a> {
    #[serde(rename = "Err")]
    err: &'a str,
}

#[derive(Serialize)]
struct MountpointBody<'a> {
    #[serde(rename = "Mountpoint")]
    mountpoint: &'a str,
    #[serde(rename = "Err")]
    err: &'a str,
}

#[derive(Serialize)]
struct GetBody<'a> {
    #[serde(rename = "Volume")]
    volume: &'a VolumeInfo,
    #[serde(rename = "Err")]
    err: &'a str,
}

#[derive(Serialize)]
struct ListBody<'a> {
    #[serde(rename = "Volumes")]
    volumes: &'a [ListItem],
    #[serde(rename = "Err")]
    err: &'a str,
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // These bodies hold strings, numbers and string-keyed maps only: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_else(|_| br#"{"Err":"internal error: cannot encode the answer"}"#.to_vec())
}

/// The body of a successful answer.
pub fn reply_body(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Activate => to_json(&Implements {
            implements: ["VolumeDriver"],
        }),
        Reply::Capabilities => to_json(&CapabilitiesBody {
            capabilities: Scope { scope: "local" },
        }),
        Reply::Done => to_json(&ErrBody { err: "" }),
        Reply::Mountpoint(m) => to_json(&MountpointBody { mountpoint: m, err: "" }),
        Reply::Volume(v) => to_json(&GetBody { volume: v, err: "" }),
        Reply::List(items) => to_json(&ListBody {
            volumes: items,
            err: "",
        }),
        Reply::Snapshot(s) => to_json(&serde_json::json!({"Snapshot": s, "Err": ""})),
        Reply::Snapshots(s) => to_json(&serde_json::json!({"Snapshots": s, "Err": ""})),
    }
}

/// The body of a failed answer. Never empty, since an empty `Err` means success.
pub fn error_body(message: &str) -> Vec<u8> {
    let message = if message.is_empty() { "unknown error" } else { message };
    to_json(&ErrBody { err: message })
}

/// HTTP status and body for a request that could not be parsed.
pub fn request_error(e: &RequestError) -> (u16, Vec<u8>) {
    let status = match e {
        RequestError::NotImplemented(_) => 404,
        RequestError::Method(_) => 405,
        RequestError::Malformed(_) => 400,
        RequestError::TooLarge(_) => 413,
        // Docker shows the message of a 200 answer as is: the user sees what to fix.
        RequestError::Invalid(_) | RequestError::Option(_) => 200,
    };
    (status, error_body(&e.to_string()))
}

/// RFC 3339 (UTC, seconds) for a Unix time; `None` for 0, which means "not recorded".
pub fn rfc3339(unix: u64) -> Option<String> {
    if unix == 0 {
        return None;
    }
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    ))
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn json(b: Vec<u8>) -> serde_json::Value {
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn bodies_match_the_protocol() {
        assert_eq!(
            json(reply_body(&Reply::Activate)),
            serde_json::json!({"Implements": ["VolumeDriver"]})
        );
        assert_eq!(
            json(reply_body(&Reply::Capabilities)),
            serde_json::json!({"Capabilities": {"Scope": "local"}})
        );
        assert_eq!(json(reply_body(&Reply::Done)), serde_json::json!({"Err": ""}));
        assert_eq!(
            json(reply_body(&Reply::Mountpoint("/m".into()))),
            serde_json::json!({"Mountpoint": "/m", "Err": ""})
        );
        assert_eq!(
            json(reply_body(&Reply::List(vec![ListItem {
                name: "v1".into(),
                mountpoint: String::new()
            }]))),
            serde_json::json!({"Volumes": [{"Name": "v1", "Mountpoint": ""}], "Err": ""})
        );
        let v = VolumeInfo {
            name: "v1".into(),
            mountpoint: String::new(),
            created_at: None,
            status: BTreeMap::from([("kind".to_owned(), serde_json::json!("dir"))]),
        };
        assert_eq!(
            json(reply_body(&Reply::Volume(v))),
            serde_json::json!({"Volume": {"Name": "v1", "Mountpoint": "", "Status": {"kind": "dir"}}, "Err": ""})
        );
        assert_eq!(json(error_body("")), serde_json::json!({"Err": "unknown error"}));
    }

    #[test]
    fn unknown_endpoints_are_404() {
        let (status, body) = request_error(&RequestError::NotImplemented("/X".into()));
        assert_eq!(status, 404);
        assert!(json(body)["Err"].as_str().unwrap().contains("/X"));
    }

    #[rstest]
    #[case(0, None)]
    #[case(1, Some("1970-01-01T00:00:01Z"))]
    #[case(951_782_400, Some("2000-02-29T00:00:00Z"))]
    #[case(1_700_000_000, Some("2023-11-14T22:13:20Z"))]
    #[case(4_102_444_799, Some("2099-12-31T23:59:59Z"))]
    fn timestamps(#[case] unix: u64, #[case] want: Option<&str>) {
        assert_eq!(rfc3339(unix).as_deref(), want);
    }
}
