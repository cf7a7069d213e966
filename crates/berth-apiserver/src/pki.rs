//! The server's TLS identity and its clients' credentials, made on first start under
//! `DATA/pki`: a CA, a server certificate signed by it (SANs: localhost, 127.0.0.1, ::1, the
//! host name and any extra names), the admin and read-only tokens, and the kubeconfigs that
//! carry them. Keys, tokens and kubeconfigs are written 0600, each through a temporary file and
//! a rename, so a crash never leaves half a key. Later starts reuse what exists.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::auth::{Role, Tokens, new_token};

/// Why the PKI could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("generating certificates: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path}: not a PEM certificate or key: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no randomness for a token: {0}")]
    Random(getrandom::Error),
    #[error("{path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: crate::auth::TokenFileError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `berth server` serves with.
#[derive(Debug)]
pub struct Pki {
    pub ca_pem: String,
    pub tls: Arc<rustls::ServerConfig>,
    pub tokens: Tokens,
}

/// Writes `data` to `path` with `mode`, atomically.
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Makes (first start) or loads the CA, server certificate and tokens under `data_dir/pki`, and
/// (re)writes `admin.kubeconfig` and `readonly.kubeconfig` in `data_dir` for `server_url`.
pub fn ensure(data_dir: &Path, server_url: &str, extra_sans: &[String]) -> Result<Pki, PkiError> {
    let dir = data_dir.join("pki");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let ca_crt = dir.join("ca.crt");
    let srv_crt = dir.join("server.crt");
    let srv_key = dir.join("server.key");
    if !ca_crt.exists() || !srv_crt.exists() || !srv_key.exists() {
        generate(&dir, extra_sans)?;
    }
    let ca_pem = std::fs::read_to_string(&ca_crt).map_err(io(&ca_crt))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&srv_crt)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PkiError::Pem {
            path: srv_crt.clone(),
            detail: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_file(&srv_key).map_err(|e| PkiError::Pem {
        path: srv_key.clone(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];

    let tokens = ensure_tokens(data_dir, &dir, server_url, &ca_pem)?;
    Ok(Pki {
        ca_pem,
        tls: Arc::new(tls),
        tokens,
    })
}

fn generate(dir: &Path, extra_sans: &[String]) -> Result<(), PkiError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "berth-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let host = rustix_hostname();
    if !host.is_empty() {
        sans.push(host);
    }
    sans.extend(extra_sans.iter().cloned());
    sans.dedup();
    let srv_key = KeyPair::generate()?;
    let mut srv_params = CertificateParams::new(sans)?;
    srv_params
        .distinguished_name
        .push(DnType::CommonName, "berth-apiserver");
    srv_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    srv_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let issuer = Issuer::new(ca_params, &ca_key);
    let srv_cert = srv_params.signed_by(&srv_key, &issuer)?;

    // Keys first: a certificate without its key on disk would be reused and fail to load.
    write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&dir.join("server.key"), srv_key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&dir.join("server.crt"), srv_cert.pem().as_bytes(), 0o644)?;
    write_private(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn rustix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Tokens live only in the kubeconfigs (0600); `pki/tokens` holds their digests. A missing
/// kubeconfig means a new token for that role.
fn ensure_tokens(data_dir: &Path, pki: &Path, server_url: &str, ca_pem: &str) -> Result<Tokens, PkiError> {
    let mut tokens = Tokens::default();
    for role in [Role::Admin, Role::ReadOnly] {
        let path = data_dir.join(format!("{}.kubeconfig", role.name()));
        let token = match std::fs::read_to_string(&path) {
            Ok(text) => token_of_kubeconfig(&text),
            Err(_) => None,
        };
        let token = match token {
            Some(t) => t,
            None => new_token().map_err(PkiError::Random)?,
        };
        // Rewritten on every start: the server URL may have changed (--listen).
        write_private(
            &path,
            kubeconfig(server_url, ca_pem, role.name(), &token).as_bytes(),
            0o600,
        )?;
        tokens.add(role, &token);
    }
    write_private(&pki.join("tokens"), tokens.to_file().as_bytes(), 0o600)?;
    Ok(tokens)
}

fn token_of_kubeconfig(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .map(|t| t.trim().to_owned())
        .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A kubeconfig with the CA embedded and a bearer token.
pub fn kubeconfig(server_url: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: berth\n  cluster:\n    server: {server_url}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: berth-{user}\n  context:\n    cluster: berth\n    user: {user}\n    namespace: default\ncurrent-context: berth-{user}\npreferences: {{}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn first_start_makes_keys_0600_and_second_start_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = ensure(dir.path(), "https://127.0.0.1:6443", &[]).unwrap();
        for f in [
            "pki/ca.key",
            "pki/server.key",
            "pki/tokens",
            "admin.kubeconfig",
            "readonly.kubeconfig",
        ] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let kc = std::fs::read_to_string(dir.path().join("admin.kubeconfig")).unwrap();
        let token = token_of_kubeconfig(&kc).unwrap();
        assert_eq!(a.tokens.role_of(&token), Some(Role::Admin));
        let tokens_file = std::fs::read_to_string(dir.path().join("pki/tokens")).unwrap();
        assert!(!tokens_file.contains(&token), "the token file keeps digests only");
        let b = ensure(dir.path(), "https://127.0.0.1:7443", &[]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(b.tokens.role_of(&token), Some(Role::Admin));
        let kc = std::fs::read_to_string(dir.path().join("admin.kubeconfig")).unwrap();
        assert!(kc.contains("server: https://127.0.0.1:7443"));
    }
}
