//! Secrets sent to a driver never reach the log, even when the driver logs the whole request.
//!
//! A separate test binary because it installs a global subscriber: tracing caches per-callsite
//! interest, so a thread-local subscriber in a parallel unit test can miss events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use berth_csi::{Client, CsiError, Driver, serve_unix, v1};

const SECRET: &str = "s3cr3t-value-never-logged";

struct LoggingDriver;

impl Driver for LoggingDriver {
    async fn create_volume(&self, req: v1::CreateVolumeRequest) -> Result<v1::CreateVolumeResponse, CsiError> {
        // What a careless driver would do; the generated Debug must redact it.
        tracing::info!(?req, "driver got request");
        Ok(v1::CreateVolumeResponse {
            volume: Some(v1::Volume {
                volume_id: format!("vol-{}", req.name),
                ..Default::default()
            }),
        })
    }
}

/// Collects everything the fmt subscriber writes.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ep = endpoint.clone();
    let server = tokio::spawn(async move {
        serve_unix(&ep, Arc::new(LoggingDriver), async {
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
    let mut client = client.expect("server did not come up");

    let secrets = HashMap::from([("token".to_owned(), SECRET.to_owned())]);
    client
        .controller
        .create_volume(v1::CreateVolumeRequest {
            name: "pvc-secret".into(),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = client
        .controller
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: "vol-pvc-secret".into(),
            secrets,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("driver got request"), "{text}");
    assert!(text.contains("method=\"CreateVolume\""), "{text}");
    assert!(text.contains("name=\"pvc-secret\""), "{text}");
    assert!(text.contains("volume_id=\"vol-pvc-secret\""), "{text}");
    assert!(text.contains("<redacted: 1 entries>"), "{text}");
    assert!(!text.contains(SECRET), "secret leaked into logs:\n{text}");
}
