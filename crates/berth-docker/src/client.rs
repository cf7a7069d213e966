//! A small blocking client for Berth's own endpoints on the plugin socket (snapshots of Docker
//! volumes), used by `berth volume snapshot|snapshots|rm-snapshot`.
//!
//! The engine's data dir has one owner, the running plugin, so the CLI asks it over its socket
//! instead of opening the engine itself. One request per connection (`Connection: close`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::response::SnapshotInfo;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the berth Docker plugin at {path}: {source} (is `berth docker-plugin` running? give --socket)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the berth Docker plugin: {0}")]
    Protocol(String),
    /// The plugin answered with an error.
    #[error("{0}")]
    Plugin(String),
}

/// Posts `body` to `/<endpoint>` and returns the decoded answer, or the plugin's `Err`.
pub fn call(socket: &Path, endpoint: &str, body: &serde_json::Value) -> Result<serde_json::Value, ClientError> {
    let connect = |source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(connect)?;
    // Snapshots of large fs volumes copy data: allow the plugin its time.
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(connect)?;
    let body = body.to_string();
    let request = format!(
        "POST /{endpoint} HTTP/1.1\r\nHost: berth\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(connect)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("the answer has no body".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(payload)
        .map_err(|e| ClientError::Protocol(format!("HTTP {status}: not JSON ({e}): {payload:.200}")))?;
    match value.get("Err").and_then(|e| e.as_str()) {
        Some(err) if !err.is_empty() => Err(ClientError::Plugin(err.to_owned())),
        _ if status != "200" => Err(ClientError::Protocol(format!("HTTP {status}"))),
        _ => Ok(value),
    }
}

fn field<T: serde::de::DeserializeOwned>(value: serde_json::Value, key: &str) -> Result<T, ClientError> {
    let v = value
        .get(key)
        .cloned()
        .ok_or_else(|| ClientError::Protocol(format!("the answer has no {key}")))?;
    serde_json::from_value(v).map_err(|e| ClientError::Protocol(format!("{key}: {e}")))
}

/// Snapshots a Docker volume.
pub fn create_snapshot(socket: &Path, volume: &str, name: &str) -> Result<SnapshotInfo, ClientError> {
    let v = call(
        socket,
        "Berth.SnapshotCreate",
        &serde_json::json!({"Volume": volume, "Name": name}),
    )?;
    field(v, "Snapshot")
}

/// The snapshots of a Docker volume.
pub fn list_snapshots(socket: &Path, volume: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
    let v = call(socket, "Berth.SnapshotList", &serde_json::json!({"Volume": volume}))?;
    field(v, "Snapshots")
}

/// Deletes a snapshot by id or name.
pub fn remove_snapshot(socket: &Path, name: &str) -> Result<(), ClientError> {
    call(socket, "Berth.SnapshotRemove", &serde_json::json!({"Name": name}))?;
    Ok(())
}
