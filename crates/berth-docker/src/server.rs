//! HTTP/1.1 over a unix socket: reads a request, parses it into an action, runs the action on
//! a blocking thread, writes the answer.
//!
//! [`bind`] makes the socket with mode 0600 from the start (bound under a temporary name,
//! then renamed), so no other user can ever connect. [`serve`] takes its listener and its
//! shutdown signal as arguments; on shutdown it stops accepting, lets requests in flight
//! finish (up to [`DRAIN`]) and returns. Mounts are left alone: containers may be running.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::plugin::Plugin;
use crate::request::{self, MAX_BODY, RequestError};
use crate::response;

/// How long requests in flight may take to finish after a shutdown signal.
pub const DRAIN: Duration = Duration::from_secs(30);

const CONTENT_TYPE_PLUGIN: &str = "application/vnd.docker.plugins.v1.2+json";

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{op} {path}: {source}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn socket_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Socket {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Binds `path` with mode 0600, creating its parent directory. A stale socket left by an
/// earlier run is replaced; anything else at `path` is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(socket_err("creating socket directory", parent))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(socket_err("removing stale socket", path))?;
        }
        Ok(_) => {
            return Err(ServeError::Socket {
                op: "binding",
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "something that is not a socket is in the way",
                ),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err("inspecting", path)(e)),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(socket_err("binding", &tmp))?;
    let made = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(socket_err("setting mode 0600 on", &tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(socket_err("renaming socket to", path)));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener
        .set_nonblocking(true)
        .map_err(socket_err("setting non-blocking", path))?;
    UnixListener::from_std(listener).map_err(socket_err("registering", path))
}

/// Serves the plugin protocol on `listener` until `shutdown` resolves.
pub async fn serve(listener: UnixListener, plugin: Arc<Plugin>, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let plugin = plugin.clone();
                    let mut stop = stop_rx.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req| handle(plugin.clone(), req));
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::pin!(conn);
                        tokio::select! {
                            r = conn.as_mut() => r,
                            _ = stop.changed() => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Ok(Err(e)) = done {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
        }
    }
    tracing::info!("stopped accepting Docker requests; letting requests in flight finish");
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + DRAIN;
    while !connections.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, connections.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    connections = connections.len(),
                    "requests still running at the drain deadline"
                );
                break;
            }
        }
    }
}

async fn handle(plugin: Arc<Plugin>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let err = if e.is::<http_body_util::LengthLimitError>() {
                RequestError::TooLarge(MAX_BODY + 1)
            } else {
                RequestError::Malformed(format!("cannot read the request body: {e}"))
            };
            let (status, body) = response::request_error(&err);
            return Ok(answer(status, body));
        }
    };
    let action = match request::parse(&method, &path, &body) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%path, error = %e, "refused request");
            let (status, body) = response::request_error(&e);
            return Ok(answer(status, body));
        }
    };
    let name = action.method();
    let started = Instant::now();
    tracing::debug!(method = name, ?action, "request");
    let outcome = tokio::task::spawn_blocking(move || plugin.execute(action)).await;
    let body = match outcome {
        Ok(Ok(reply)) => {
            tracing::debug!(method = name, elapsed_ms = started.elapsed().as_millis(), "done");
            response::reply_body(&reply)
        }
        Ok(Err(e)) => {
            tracing::warn!(method = name, error = %e, "failed");
            response::error_body(&e.to_string())
        }
        Err(e) => {
            tracing::error!(method = name, error = %e, "request handler panicked");
            response::error_body("internal error in the berth plugin; see its log")
        }
    };
    Ok(answer(200, body))
}

fn answer(status: u16, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_PLUGIN));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Debug)]
    struct NoEngine;

    impl crate::backend::Backend for NoEngine {
        fn create(
            &self,
            _: &str,
            _: std::collections::BTreeMap<String, String>,
            _: Option<u64>,
            _: Option<crate::backend::Origin>,
        ) -> Result<crate::backend::BackendVolume, berth_storage::EngineError> {
            Err(berth_storage::EngineError::ResourceExhausted(
                "no engine in this test".into(),
            ))
        }
        fn snapshot(&self, _: &str) -> Result<Option<crate::backend::BackendSnapshot>, berth_storage::EngineError> {
            Ok(None)
        }
        fn create_snapshot(
            &self,
            _: &str,
            _: &str,
        ) -> Result<crate::backend::BackendSnapshot, berth_storage::EngineError> {
            Err(berth_storage::EngineError::NotFound("no engine in this test".into()))
        }
        fn snapshots_of(&self, _: &str) -> Result<Vec<crate::backend::BackendSnapshot>, berth_storage::EngineError> {
            Ok(Vec::new())
        }
        fn delete_snapshot(&self, _: &str) -> Result<(), berth_storage::EngineError> {
            Ok(())
        }
        fn volume(&self, _: &str) -> Result<Option<crate::backend::BackendVolume>, berth_storage::EngineError> {
            Ok(None)
        }
        fn volume_by_name(&self, _: &str) -> Option<crate::backend::BackendVolume> {
            None
        }
        fn delete(&self, _: &str) -> Result<(), berth_storage::EngineError> {
            Ok(())
        }
        fn stage(&self, _: &str, _: &Path) -> Result<(), berth_storage::EngineError> {
            Ok(())
        }
        fn unstage(&self, _: &str, _: &Path) -> Result<(), berth_storage::EngineError> {
            Ok(())
        }
        fn staged_at(&self, _: &str) -> Option<PathBuf> {
            None
        }
        fn used_bytes(&self, _: &str) -> Option<u64> {
            None
        }
    }

    /// Sends one raw HTTP/1.1 request the way Docker does (no Content-Type) and returns the
    /// status code and body.
    async fn call(sock: &Path, path: &str, body: &str) -> (u16, String) {
        let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn serves_docker_requests_on_a_private_socket_and_stops_on_signal() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("plugins/berth.sock");
        let listener = bind(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let plugin = Arc::new(
            Plugin::open(
                Arc::new(NoEngine),
                &dir.path().join("docker.redb"),
                dir.path().join("mounts"),
            )
            .unwrap(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, plugin, async {
            let _ = rx.await;
        }));

        assert_eq!(
            call(&sock, "/Plugin.Activate", "").await,
            (200, r#"{"Implements":["VolumeDriver"]}"#.to_owned())
        );
        assert_eq!(
            call(&sock, "/VolumeDriver.Capabilities", "{}").await,
            (200, r#"{"Capabilities":{"Scope":"local"}}"#.to_owned())
        );
        assert_eq!(
            call(&sock, "/VolumeDriver.List", "{}").await,
            (200, r#"{"Volumes":[],"Err":""}"#.to_owned())
        );
        assert_eq!(
            call(&sock, "/VolumeDriver.Get", r#"{"Name":"anon0123"}"#).await,
            (200, r#"{"Err":"no such volume: anon0123"}"#.to_owned())
        );
        let (status, body) = call(
            &sock,
            "/VolumeDriver.Create",
            r#"{"Name":"v1","Opts":{"colour":"red"}}"#,
        )
        .await;
        assert_eq!(status, 200);
        assert!(body.contains("valid options are size, kind"), "{body}");
        assert_eq!(call(&sock, "/VolumeDriver.Frobnicate", "{}").await.0, 404);
        assert_eq!(call(&sock, "/VolumeDriver.Get", "{").await.0, 400);

        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_but_a_file_is_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("berth.sock");
            drop(bind(&sock).unwrap());
            assert!(bind(&sock).is_ok());
            let file = dir.path().join("file.sock");
            std::fs::write(&file, "x").unwrap();
            assert!(bind(&file).is_err());
        });
    }
}
