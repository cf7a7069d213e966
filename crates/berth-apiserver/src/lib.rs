//! Berth's Kubernetes-compatible API server: the HTTP face of the object store, spoken by real
//! kubectl and by kube-rs unchanged.
//!
//! A request is authenticated (bearer token, constant-time), parsed into a [`route::Route`]
//! without side effects, then executed against the store by [`objects`] and [`watch`]; every
//! error becomes a Kubernetes `Status` in one place ([`error`]). It serves discovery, the
//! OpenAPI v2 protobuf kubectl validates with, CRUD, the status subresource, patches, watches
//! and kubectl's server-side Tables, over TLS only ([`serve`]).
//!
//! It never answers 5xx for bad input and never panics on it; writes are acknowledged only
//! after the store reports them durable.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_api::patch::PatchType;
use berth_api::selector::{FieldSelector, LabelSelector};
use berth_store::Store;
use bytes::Bytes;
use serde_json::Value;
use tokio::net::TcpListener;

pub mod auth;
pub mod decode;
pub mod discovery;
pub mod error;
pub mod objects;
pub mod openapi;
pub mod pki;
pub mod route;
pub mod table;
pub mod watch;

use auth::{Role, Tokens};
use error::ApiError;
use objects::{Answer, ListRequest, Objects};
use route::{Query, Route, Target};

/// The server's shared state.
#[derive(Debug)]
pub struct ApiServer {
    objects: Objects,
    tokens: Tokens,
    openapi: Bytes,
    address: String,
}

impl ApiServer {
    /// A server over `store`, accepting `tokens`; `address` (`host:port`) is what `/api`
    /// advertises. Creates the initial namespaces.
    pub async fn new(store: Arc<dyn Store>, tokens: Tokens, address: String) -> Result<Arc<Self>, ApiError> {
        let objects = Objects { store };
        objects.bootstrap().await?;
        Ok(Arc::new(ApiServer {
            objects,
            tokens,
            openapi: Bytes::from(openapi::document()),
            address,
        }))
    }

    /// The axum router: one handler, routing done by [`route::parse_path`].
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new().fallback(handle).with_state(self.clone())
    }
}

async fn handle(State(server): State<Arc<ApiServer>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = std::time::Instant::now();
    let resp = match server.dispatch(req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    tracing::debug!(%method, %path, code = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    resp
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), bytes).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&text) {
            h.append("warning", v);
        }
    }
    resp
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

impl ApiServer {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Role, ApiError> {
        let token = header_str(headers, header::AUTHORIZATION)
            .and_then(auth::bearer)
            .ok_or(ApiError::Unauthorized)?;
        self.tokens.role_of(token).ok_or(ApiError::Unauthorized)
    }

    async fn dispatch(&self, req: Request) -> Result<Response, ApiError> {
        let route = route::parse_path(req.uri().path());
        if let Ok(Route::Health) = route {
            return Ok((StatusCode::OK, "ok").into_response());
        }
        let role = self.authenticate(req.headers())?;
        let route = route?;
        let method = req.method().clone();
        let read_only = matches!(method, Method::GET | Method::HEAD);
        match route {
            Route::Object(t) => self.object(role, t, req).await,
            _ if !read_only => Err(ApiError::MethodNotAllowed(format!(
                "{method} is not allowed on {}",
                req.uri().path()
            ))),
            Route::Health => Ok((StatusCode::OK, "ok").into_response()),
            Route::Version => Ok(json_response(200, &discovery::version(), &[])),
            Route::Api => Ok(json_response(200, &discovery::api_versions(&self.address), &[])),
            Route::Apis => Ok(json_response(200, &discovery::api_group_list(), &[])),
            Route::ApiGroup(g) => discovery::api_group(&g)
                .map(|v| json_response(200, &v, &[]))
                .ok_or(ApiError::NoRoute),
            Route::ResourceList { group, version } => discovery::resource_list(&group, &version)
                .map(|v| json_response(200, &v, &[]))
                .ok_or(ApiError::NoRoute),
            Route::OpenApi => {
                let mut resp = (StatusCode::OK, self.openapi.clone()).into_response();
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    // What kube-apiserver sends: Go clients cannot parse the `@` of the requested type.
                    HeaderValue::from_static("application/octet-stream"),
                );
                Ok(resp)
            }
        }
    }

    async fn object(&self, role: Role, t: Target, req: Request) -> Result<Response, ApiError> {
        let (parts, body) = req.into_parts();
        let q = Query::parse(parts.uri.query())?;
        let method = parts.method;
        let verb = match (&method, t.name.is_some()) {
            (&Method::GET, _) if q.watch || t.legacy_watch => "watch",
            (&Method::GET, true) => "get",
            (&Method::GET, false) => "list",
            (&Method::POST, false) => "create",
            (&Method::PUT, true) => "update",
            (&Method::PATCH, true) => "patch",
            (&Method::DELETE, true) => "delete",
            (&Method::DELETE, false) => "deletecollection",
            _ => {
                return Err(ApiError::MethodNotAllowed(format!(
                    "the server does not allow this method on the requested resource ({method})"
                )));
            }
        };
        if role == Role::ReadOnly && !matches!(verb, "get" | "list" | "watch") {
            let scope = match &t.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".to_owned(),
            };
            let what = match &t.name {
                Some(n) => format!("{} \"{n}\" is forbidden", t.res.plural),
                None => format!("{} is forbidden", t.res.plural),
            };
            return Err(ApiError::Forbidden(format!(
                "{what}: User \"readonly\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                t.res.plural, t.res.group
            )));
        }
        let bytes = axum::body::to_bytes(body, decode::MAX_BODY)
            .await
            .map_err(|_| ApiError::TooLarge(decode::MAX_BODY))?;
        let ct = header_str(&parts.headers, header::CONTENT_TYPE);
        let as_table = table::wants_table(header_str(&parts.headers, header::ACCEPT));
        let res = t.res;
        let ns = t.namespace.as_deref();
        let name = t.name.clone().unwrap_or_default();
        let list_req = || -> Result<ListRequest, ApiError> {
            Ok(ListRequest {
                labels: LabelSelector::parse(&q.label_selector).map_err(|e| ApiError::BadRequest(e.to_string()))?,
                fields: FieldSelector::parse(res, &q.field_selector)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?,
                limit: q.limit,
                continue_token: q.continue_token.clone(),
            })
        };
        let answer: Answer = match verb {
            "watch" => {
                let rx = watch::start(
                    &self.objects,
                    watch::WatchRequest {
                        res,
                        namespace: t.namespace.clone(),
                        name: t.name.clone(),
                        list: list_req()?,
                        resource_version: q.resource_version.clone(),
                        bookmarks: q.allow_watch_bookmarks,
                        timeout: q.timeout_seconds.map(Duration::from_secs),
                        table: as_table.then_some(q.include_object),
                    },
                )?;
                let body = Body::from_stream(watch::body_chunks(rx));
                let mut resp = (StatusCode::OK, body).into_response();
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                return Ok(resp);
            }
            "get" => {
                let obj = self.objects.get(res, ns, &name).await?;
                if as_table {
                    let rv = obj["metadata"]["resourceVersion"].as_str().map(str::to_owned);
                    Answer {
                        code: 200,
                        body: table::render(res, &[obj], q.include_object, rv.as_deref(), None),
                        warnings: vec![],
                    }
                } else {
                    Answer {
                        code: 200,
                        body: obj,
                        warnings: vec![],
                    }
                }
            }
            "list" if as_table => {
                let listed = self.objects.list(res, ns, &list_req()?).await?;
                let body = table::render(
                    res,
                    &listed.items,
                    q.include_object,
                    Some(&listed.revision.to_string()),
                    listed.continue_token.as_deref(),
                );
                Answer {
                    code: 200,
                    body,
                    warnings: vec![],
                }
            }
            "list" => {
                let body = self.objects.list_json(res, ns, &list_req()?).await?;
                let mut resp = (StatusCode::OK, body).into_response();
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                return Ok(resp);
            }
            "create" => {
                let d = decode::decode_object(res, ct, &bytes, q.field_validation)?;
                self.objects.create(res, ns, d.object, d.warnings, q.dry_run).await?
            }
            "update" => {
                let d = decode::decode_object(res, ct, &bytes, q.field_validation)?;
                self.objects
                    .update(res, ns, &name, d.object, d.warnings, t.status, q.dry_run)
                    .await?
            }
            "patch" => {
                let kind = match ct.and_then(PatchType::from_content_type) {
                    Some(k) => k,
                    None => {
                        return Err(ApiError::UnsupportedMediaType(format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {:?})",
                            ct.unwrap_or("")
                        )));
                    }
                };
                self.objects
                    .patch(res, ns, &name, kind, &bytes, q.field_validation, t.status, q.dry_run)
                    .await?
            }
            "delete" => {
                let opts = decode::delete_options(ct, &bytes)?;
                self.objects.delete(res, ns, &name, &opts, q.dry_run).await?
            }
            _ => self.objects.delete_collection(res, ns, &list_req()?, q.dry_run).await?,
        };
        Ok(json_response(answer.code, &answer.body, &answer.warnings))
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes. HTTP/1.1; each
/// connection on its own task; a handshake that takes over 10 s is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}
