//! Request parsing without side effects: a path becomes a [`Route`], a query string a
//! [`Query`]. Kubernetes' URL grammar: `/api/v1[/watch][/namespaces/{ns}]/{plural}[/{name}[/status]]`
//! and the same under `/apis/{group}/{version}`. Path segments are never decoded, so a name
//! taken from a URL can never contain `/`.

use berth_api::Resource;
use berth_api::printing::IncludeObject;

use crate::decode::FieldValidation;
use crate::error::ApiError;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Version,
    OpenApi,
    Api,
    Apis,
    ApiGroup(String),
    ResourceList { group: String, version: String },
    Object(Target),
}

/// A request on a kind: a collection (no name) or one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub res: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// `/status`.
    pub status: bool,
    /// The legacy `/watch/` path prefix.
    pub legacy_watch: bool,
}

pub fn parse_path(path: &str) -> Result<Route, ApiError> {
    let trimmed = path.trim_matches('/');
    let segs: Vec<&str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    };
    if segs.iter().any(|s| s.is_empty()) {
        return Err(ApiError::NoRoute);
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["healthz" | "readyz" | "livez", ..] => return Ok(Route::Health),
        ["version"] => return Ok(Route::Version),
        ["openapi", "v2"] => return Ok(Route::OpenApi),
        ["api"] => return Ok(Route::Api),
        ["apis"] => return Ok(Route::Apis),
        ["apis", g] => return Ok(Route::ApiGroup((*g).to_owned())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::NoRoute),
    };
    if rest.is_empty() {
        return Ok(Route::ResourceList {
            group: group.to_owned(),
            version: version.to_owned(),
        });
    }
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let (namespace, plural, name, sub) = match rest {
        // `/namespaces/{name}/status` is the Namespace kind's own status subresource.
        ["namespaces", name, "status" | "finalize"] => (None, "namespaces", Some(*name), Some("status")),
        ["namespaces", ns, plural, tail @ ..] => match tail {
            [] => (Some(*ns), *plural, None, None),
            [name] => (Some(*ns), *plural, Some(*name), None),
            [name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
            _ => return Err(ApiError::NoRoute),
        },
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::NoRoute),
    };
    let res = berth_api::resources::by_plural(group, version, plural).ok_or(ApiError::NoRoute)?;
    if namespace.is_some() && !res.namespaced() {
        return Err(ApiError::NoRoute);
    }
    let status = match sub {
        None => false,
        Some("status") if res.has_status => true,
        Some(_) => return Err(ApiError::NoRoute),
    };
    Ok(Route::Object(Target {
        res,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        status,
        legacy_watch,
    }))
}

/// The query parameters the server reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub label_selector: String,
    pub field_selector: String,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub watch: bool,
    pub allow_watch_bookmarks: bool,
    pub timeout_seconds: Option<u64>,
    pub field_validation: FieldValidation,
    pub include_object: IncludeObject,
    pub dry_run: bool,
}

fn bool_param(v: &str) -> bool {
    matches!(v, "true" | "1" | "True" | "TRUE")
}

impl Query {
    pub fn parse(q: Option<&str>) -> Result<Query, ApiError> {
        let mut out = Query::default();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "labelSelector" => out.label_selector = v,
                "fieldSelector" => out.field_selector = v,
                "limit" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| ApiError::BadRequest(format!("limit must be an integer, not {v:?}")))?;
                    out.limit = (n > 0).then_some(usize::try_from(n).unwrap_or(usize::MAX));
                }
                "continue" => out.continue_token = (!v.is_empty()).then_some(v),
                "resourceVersion" => out.resource_version = Some(v),
                "resourceVersionMatch" => out.resource_version_match = (!v.is_empty()).then_some(v),
                "watch" => out.watch = bool_param(&v),
                "allowWatchBookmarks" => out.allow_watch_bookmarks = bool_param(&v),
                "timeoutSeconds" => {
                    out.timeout_seconds = Some(v.parse().map_err(|_| {
                        ApiError::BadRequest(format!("timeoutSeconds must be a non-negative integer, not {v:?}"))
                    })?)
                }
                "fieldValidation" => out.field_validation = FieldValidation::parse(&v)?,
                "includeObject" => {
                    out.include_object = match v.as_str() {
                        "None" => IncludeObject::None,
                        "Metadata" | "" => IncludeObject::Metadata,
                        "Object" => IncludeObject::Object,
                        other => {
                            return Err(ApiError::BadRequest(format!(
                                "includeObject must be None, Metadata or Object, not {other:?}"
                            )));
                        }
                    }
                }
                "dryRun" => out.dry_run = v == "All",
                _ => {}
            }
        }
        Ok(out)
    }
}

/// `%XX` and `+` decoding of one query value.
fn percent_decode(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ApiError::BadRequest(format!("malformed percent-encoding in query: {s:?}")))?;
                out.push(byte);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::BadRequest("query is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(p: &str) -> Target {
        match parse_path(p).unwrap() {
            Route::Object(t) => t,
            other => panic!("{p}: {other:?}"),
        }
    }

    #[test]
    fn paths() {
        let t = target("/api/v1/namespaces/default/persistentvolumeclaims/data");
        assert_eq!(
            (t.res.kind, t.namespace.as_deref(), t.name.as_deref()),
            ("PersistentVolumeClaim", Some("default"), Some("data"))
        );
        let t = target("/api/v1/persistentvolumes/pv1/status");
        assert!(t.status);
        let t = target("/api/v1/namespaces/kube-system");
        assert_eq!((t.res.kind, t.name.as_deref()), ("Namespace", Some("kube-system")));
        let t = target("/api/v1/namespaces/ns1/status");
        assert!(t.status && t.res.kind == "Namespace");
        let t = target("/api/v1/watch/namespaces/a/pods");
        assert!(t.legacy_watch && t.name.is_none());
        let t = target("/apis/storage.k8s.io/v1/storageclasses");
        assert_eq!(t.res.kind, "StorageClass");
        let t = target("/api/v1/persistentvolumeclaims");
        assert!(t.namespace.is_none());
        for bad in [
            "/api/v1/namespaces/a/persistentvolumes",
            "/api/v1/secrets/a/status",
            "/api/v1/nope",
            "/apis/storage.k8s.io/v1/namespaces/a/b/c/d/e",
            "/api//v1",
            "/x",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_path("/api/v1").unwrap(),
            Route::ResourceList {
                group: "".into(),
                version: "v1".into()
            }
        );
    }

    #[test]
    fn queries() {
        let q = Query::parse(Some(
            "labelSelector=app%3Dweb%2Ctier+in+(a)&limit=500&watch=1&includeObject=Object",
        ))
        .unwrap();
        assert_eq!(q.label_selector, "app=web,tier in (a)");
        assert_eq!(q.limit, Some(500));
        assert!(q.watch);
        assert_eq!(q.include_object, IncludeObject::Object);
        assert!(Query::parse(Some("limit=x")).is_err());
        assert!(Query::parse(Some("labelSelector=%zz")).is_err());
        assert!(Query::parse(Some("fieldValidation=Loud")).is_err());
    }
}
