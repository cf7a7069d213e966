//! An in-process API server for integration tests: real redb store in a temp dir, real TLS,
//! the same PKI, tokens and kubeconfig `berth server` makes, on a loopback port.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use berth_store::{RedbOptions, RedbStore};

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin_token: String,
    pub readonly_token: String,
    pub ca_pem: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start() -> anyhow::Result<TestServer> {
        let dir = tempfile::tempdir()?;
        let options = RedbOptions {
            // Every test makes its own store; a small log keeps that cheap.
            log_size: 1 << 20,
            ..RedbOptions::default()
        };
        let store = Arc::new(RedbStore::open(dir.path().join("store.redb"), options)?);
        Self::start_on(dir, store).await
    }

    /// A server over any store (`dir` holds the PKI and kubeconfigs).
    pub async fn start_on(dir: tempfile::TempDir, store: Arc<dyn berth_store::Store>) -> anyhow::Result<TestServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let url = format!("https://{addr}");
        let pki = berth_apiserver::pki::ensure(dir.path(), &url, &[])?;
        let server = berth_apiserver::ApiServer::new(store, pki.tokens.clone(), addr.to_string())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(berth_apiserver::serve(
            listener,
            pki.tls.clone(),
            server.router(),
            async move {
                let _ = rx.await;
            },
        ));
        let token = |f: &str| -> anyhow::Result<String> {
            let text = std::fs::read_to_string(dir.path().join(f))?;
            text.lines()
                .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_owned))
                .ok_or_else(|| anyhow::anyhow!("no token in {f}"))
        };
        Ok(TestServer {
            admin_token: token("admin.kubeconfig")?,
            readonly_token: token("readonly.kubeconfig")?,
            ca_pem: pki.ca_pem.clone(),
            url,
            shutdown: Some(tx),
            dir,
        })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// One raw HTTPS request (its own connection), trusting the server's CA: status, headers, body.
pub async fn raw(
    server: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, hyper::HeaderMap, bytes::Bytes)> {
    use http_body_util::BodyExt as _;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(server.ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = server.url.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(http_body_util::Full::new(bytes::Bytes::from(body)))?)
        .await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, headers, body))
}
