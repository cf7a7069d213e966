//! CRUD on stored objects: create, get, list, update (main resource and `status`), patch and
//! delete, with Kubernetes' semantics for system metadata (uid, creationTimestamp,
//! generation, resourceVersion), optimistic concurrency, finalizers and `deletionTimestamp`.
//!
//! Every write goes decode → default → validate → admit → store, calling the pure functions of
//! `berth_api` at those points, and is answered only after the store says it is durable.
//! Objects are stored without `metadata.resourceVersion`; it is stamped from the store's
//! revision on the way out, so it can never disagree with the store.

use std::sync::Arc;

use berth_api::admission::{self, Lookup, Operation};
use berth_api::patch::PatchType;
use berth_api::selector::{FieldSelector, LabelSelector};
use berth_api::validation::Decodes;
use berth_api::{Resource, defaults, validation};
use berth_store::{ListOptions, Store, StoreError};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::decode::{self, DeleteOptions, FieldValidation};
use crate::error::{ApiError, Subject};

/// The Conflict detail Kubernetes sends for a stale resourceVersion.
pub const MODIFIED: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// Objects read from the store per page when listing.
const STORE_PAGE: usize = 1000;

/// Namespaces that exist from the first start.
pub const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// An object and the headers to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub code: u16,
    pub body: Value,
    pub warnings: Vec<String>,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Answer {
            code: 200,
            body,
            warnings: Vec::new(),
        }
    }
}

/// The store key of an object: `/{group}/{plural}/{namespace}/{name}` (`core` for the core
/// group; no namespace segment for cluster-scoped kinds).
pub fn key(res: &Resource, namespace: Option<&str>, name: &str) -> String {
    let g = if res.group.is_empty() { "core" } else { res.group };
    match namespace {
        Some(ns) if res.namespaced() => format!("/{g}/{}/{ns}/{name}", res.plural),
        _ => format!("/{g}/{}/{name}", res.plural),
    }
}

/// The prefix that lists a collection: one namespace, or every namespace.
pub fn prefix(res: &Resource, namespace: Option<&str>) -> String {
    let g = if res.group.is_empty() { "core" } else { res.group };
    match namespace {
        Some(ns) if res.namespaced() => format!("/{g}/{}/{ns}/", res.plural),
        _ => format!("/{g}/{}/", res.plural),
    }
}

/// A stored value with its revision stamped in as `metadata.resourceVersion`.
pub fn stamped(value: &[u8], revision: u64) -> Result<Value, ApiError> {
    let mut v: Value =
        serde_json::from_slice(value).map_err(|e| ApiError::Internal(format!("stored object is not JSON: {e}")))?;
    set_meta(&mut v, "resourceVersion", json!(revision.to_string()));
    Ok(v)
}

/// [`stamped`] as JSON text, made without building the object: `"resourceVersion"` is written
/// as the first key of `metadata`. The object is the same; only its key order differs (JSON
/// objects have none). Watches and informers read most objects once, so this spares them a
/// parse into a `Value` and a serialization or a second decode.
pub fn stamped_json(value: &[u8], revision: u64) -> Result<Vec<u8>, ApiError> {
    /// The top level, with every member but `metadata` skipped unparsed.
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(borrow)]
        metadata: Option<&'a serde_json::value::RawValue>,
    }
    /// Whether `metadata` already has a resourceVersion (objects are stored without one).
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "resourceVersion")]
        resource_version: Option<serde::de::IgnoredAny>,
    }
    let slow = || serde_json::to_vec(&stamped(value, revision)?).map_err(|e| ApiError::Internal(e.to_string()));
    let Ok(top) = serde_json::from_slice::<Top<'_>>(value) else {
        return slow();
    };
    let Some(meta) = top.metadata.map(|m| m.get()) else {
        return slow();
    };
    if !meta.starts_with('{') || serde_json::from_str::<Meta>(meta).map_or(true, |m| m.resource_version.is_some()) {
        return slow();
    }
    // The raw metadata borrows from `value`: its offset there is where the object opens.
    let Some(at) = (meta.as_ptr() as usize).checked_sub(value.as_ptr() as usize) else {
        return slow();
    };
    if value.get(at) != Some(&b'{') {
        return slow();
    }
    let open = at + 1;
    let empty = meta[1..].trim_start().starts_with('}');
    let mut out = Vec::with_capacity(value.len() + 40);
    out.extend_from_slice(&value[..open]);
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(revision.to_string().as_bytes());
    out.push(b'"');
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&value[open..]);
    Ok(out)
}

fn meta(v: &Value) -> &Value {
    &v["metadata"]
}

fn meta_mut(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        // Callers pass objects (the decoder refuses anything else); never taken.
        *v = Value::Object(Map::new());
    }
    let Value::Object(o) = v else {
        unreachable!("made an object above")
    };
    let m = o.entry("metadata").or_insert_with(|| json!({}));
    if !m.is_object() {
        *m = json!({});
    }
    let Value::Object(m) = m else {
        unreachable!("made an object above")
    };
    m
}

fn set_meta(v: &mut Value, k: &str, val: Value) {
    meta_mut(v).insert(k.to_owned(), val);
}

fn meta_str<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    meta(v)[k].as_str().filter(|s| !s.is_empty())
}

fn finalizers_empty(v: &Value) -> bool {
    meta(v)["finalizers"].as_array().is_none_or(Vec::is_empty)
}

/// `2026-01-31T12:00:00Z`, as Kubernetes writes times (seconds).
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    Ok(b)
}

/// A random (v4) UUID.
pub fn new_uid() -> Result<String, ApiError> {
    let mut b: [u8; 16] = random_bytes()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// The 5 characters `generateName` appends (Kubernetes' alphabet: no vowels, no look-alikes).
fn name_suffix() -> Result<String, ApiError> {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let b: [u8; 5] = random_bytes()?;
    Ok(b.iter()
        .map(|x| ALPHABET[usize::from(*x) % ALPHABET.len()] as char)
        .collect())
}

/// The server's own name check, before any key is built from a name: an RFC 1123 subdomain
/// (a label for namespaces), as Kubernetes requires of every kind Berth serves.
pub fn check_name(res: &Resource, name: &str) -> Result<(), ApiError> {
    let label = res.kind == "Namespace";
    let max = if label { 63 } else { 253 };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    let ok = name.len() <= max
        && if label {
            part_ok(name)
        } else {
            name.split('.').all(part_ok)
        };
    if ok {
        return Ok(());
    }
    let detail = if name.len() > max {
        format!("must be no more than {max} characters")
    } else if label {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".to_owned()
    } else {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_owned()
    };
    Err(ApiError::Invalid {
        subject: Subject::of(res, name),
        causes: vec![
            berth_api::FieldError::new(berth_api::FieldErrorKind::Invalid, "metadata.name", detail)
                .with_value(format!("{name:?}")),
        ],
    })
}

/// What admission may read: a snapshot taken before the call (admission is synchronous).
struct Snapshot {
    storage_classes: Vec<Value>,
}

impl Lookup for Snapshot {
    fn storage_classes(&self) -> Vec<Value> {
        self.storage_classes.clone()
    }
}

fn invalid(res: &Resource, name: &str, causes: Vec<berth_api::FieldError>) -> Result<(), ApiError> {
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            subject: Subject::of(res, name),
            causes,
        })
    }
}

fn denied(res: &Resource, name: &str, d: admission::Denied) -> ApiError {
    ApiError::Denied {
        subject: Subject::of(res, name),
        code: d.code,
        reason: d.reason,
        message: d.message,
    }
}

/// A list request, parsed.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

/// A list's items, the revision it was read at and the token for the next page.
#[derive(Debug, Clone)]
pub struct Listed {
    pub items: Vec<Value>,
    pub revision: u64,
    pub continue_token: Option<String>,
}

/// The continue token: the revision and last key, hex-encoded so it is opaque.
fn encode_continue(revision: u64, key: &str) -> String {
    hex::encode(format!("{revision}/{key}"))
}

fn decode_continue(token: &str, prefix: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::BadRequest("continue key is not valid: list again without it".into());
    let raw = hex::decode(token).map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let (rev, key) = s.split_once('/').ok_or_else(bad)?;
    let rev: u64 = rev.parse().map_err(|_| bad())?;
    let key = format!("/{key}");
    if !key.starts_with(prefix) {
        return Err(bad());
    }
    Ok((rev, key))
}

/// Whether an object passes a list's selectors.
pub fn selected(obj: &Value, labels: &LabelSelector, fields: &FieldSelector) -> bool {
    let map: std::collections::BTreeMap<String, String> = meta(obj)["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    labels.matches(&map) && fields.matches(obj)
}

/// Which parts of an object an update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Metadata and spec, as a PUT.
    Main,
    /// Status, as a PUT of `/status`.
    Status,
    /// Both, validated as both (an in-process controller's write).
    Both,
}

/// The objects of one kind, over the store.
#[derive(Debug, Clone)]
pub struct Objects {
    pub store: Arc<dyn Store>,
}

impl Objects {
    fn store_err(&self, res: &Resource, name: &str, e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound { .. } => ApiError::NotFound(Subject::of(res, name)),
            StoreError::AlreadyExists { .. } => ApiError::AlreadyExists(Subject::of(res, name)),
            StoreError::Conflict { .. } => ApiError::Conflict {
                subject: Subject::of(res, name),
                detail: MODIFIED.into(),
            },
            other => other.into(),
        }
    }

    /// The stored object (stamped) and its revision.
    async fn read(&self, res: &Resource, ns: Option<&str>, name: &str) -> Result<(Value, u64), ApiError> {
        match self.store.get(&key(res, ns, name)).await? {
            Some((v, rev)) => Ok((stamped(&v, rev)?, rev)),
            None => Err(ApiError::NotFound(Subject::of(res, name))),
        }
    }

    /// Creates the namespaces every cluster has, if missing.
    pub async fn bootstrap(&self) -> Result<(), ApiError> {
        let ns = berth_api::resources::by_plural("", "v1", "namespaces").ok_or(ApiError::NoRoute)?;
        for name in INITIAL_NAMESPACES {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            match self.create(ns, None, body, Vec::new(), false).await {
                Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub async fn get(&self, res: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        Ok(self.read(res, ns, name).await?.0)
    }

    /// One page of a list, filtered by the selectors; `limit` counts matching items.
    pub async fn list(&self, res: &Resource, ns: Option<&str>, req: &ListRequest) -> Result<Listed, ApiError> {
        let mut items = Vec::new();
        let (revision, continue_token) = self
            .each(res, ns, req, |v| {
                items.push(v);
                Ok(())
            })
            .await?;
        Ok(Listed {
            items,
            revision,
            continue_token,
        })
    }

    /// Every stored object of a collection (all namespaces) as the store holds it, read a page
    /// at a time at one revision, and that revision: for an in-process informer, which stamps
    /// and decodes each one itself (see [`stamped_json`]).
    pub async fn list_stored(&self, res: &Resource) -> Result<(Vec<berth_store::Object>, u64), ApiError> {
        let prefix = prefix(res, None);
        let mut objects = Vec::new();
        let (mut at, mut after) = (None, None);
        loop {
            let opts = ListOptions {
                limit: Some(STORE_PAGE),
                continue_after: after.take(),
                at_revision: at,
            };
            let page = self.store.list(&prefix, opts).await?;
            at = Some(page.revision);
            objects.extend(page.items);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok((objects, page.revision)),
            }
        }
    }

    /// The `{Kind}List` JSON of a list, written item by item: only the answer's bytes and one
    /// object at a time are in memory, not every object as a `Value` (a full list of 50,000 PVs
    /// is 20 MiB of JSON but ten times that as `Value`s).
    pub async fn list_json(&self, res: &Resource, ns: Option<&str>, req: &ListRequest) -> Result<Vec<u8>, ApiError> {
        let mut out = format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"items\":[",
            res.kind,
            res.api_version()
        )
        .into_bytes();
        let mut first = true;
        let (revision, continue_token) = self
            .each(res, ns, req, |v| {
                if !first {
                    out.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut out, &v).map_err(|e| ApiError::Internal(e.to_string()))
            })
            .await?;
        let mut meta = json!({ "resourceVersion": revision.to_string() });
        if let Some(c) = continue_token {
            meta["continue"] = json!(c);
        }
        out.extend_from_slice(b"],\"metadata\":");
        serde_json::to_writer(&mut out, &meta).map_err(|e| ApiError::Internal(e.to_string()))?;
        out.push(b'}');
        Ok(out)
    }

    /// Calls `f` with each selected object of a list, reading the store a page at a time (all
    /// pages at the first page's revision); returns the revision and the continue token.
    async fn each(
        &self,
        res: &Resource,
        ns: Option<&str>,
        req: &ListRequest,
        mut f: impl FnMut(Value) -> Result<(), ApiError>,
    ) -> Result<(u64, Option<String>), ApiError> {
        let prefix = prefix(res, ns);
        let (mut at, mut after) = match &req.continue_token {
            Some(t) => {
                let (rev, key) = decode_continue(t, &prefix)?;
                (Some(rev), Some(key))
            }
            None => (None, None),
        };
        let mut count = 0usize;
        let page_size = req.limit.map_or(STORE_PAGE, |l| l.clamp(1, STORE_PAGE));
        loop {
            let opts = ListOptions {
                limit: Some(page_size),
                continue_after: after.clone(),
                at_revision: at,
            };
            let page = self.store.list(&prefix, opts).await?;
            at = Some(page.revision);
            for (i, o) in page.items.iter().enumerate() {
                let v = stamped(&o.value, o.mod_revision)?;
                if selected(&v, &req.labels, &req.fields) {
                    f(v)?;
                    count += 1;
                }
                if let Some(limit) = req.limit
                    && count >= limit
                {
                    let more = i + 1 < page.items.len() || page.next.is_some();
                    let token = more.then(|| encode_continue(page.revision, o.key.trim_start_matches('/')));
                    return Ok((page.revision, token));
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok((page.revision, None)),
            }
        }
    }

    /// What admission may look up; `needed` is false when the write cannot use it (only a
    /// claim's create, and an update that changes its storage request, read the classes).
    async fn snapshot(&self, res: &Resource, needed: bool) -> Result<Snapshot, ApiError> {
        let storage_classes = if needed && res.kind == "PersistentVolumeClaim" {
            let sc =
                berth_api::resources::by_plural("storage.k8s.io", "v1", "storageclasses").ok_or(ApiError::NoRoute)?;
            self.list(sc, None, &ListRequest::default()).await?.items
        } else {
            Vec::new()
        };
        Ok(Snapshot { storage_classes })
    }

    /// POST: `obj` is the decoded body.
    pub async fn create(
        &self,
        res: &Resource,
        ns: Option<&str>,
        mut obj: Value,
        warnings: Vec<String>,
        dry_run: bool,
    ) -> Result<Answer, ApiError> {
        // Namespace: the URL's; a different one in the body is an error.
        if res.namespaced() {
            let url_ns = ns.ok_or_else(|| {
                ApiError::MethodNotAllowed(format!(
                    "{} are created in a namespace: POST to /namespaces/{{ns}}/{}",
                    res.plural, res.plural
                ))
            })?;
            if let Some(body_ns) = meta_str(&obj, "namespace")
                && body_ns != url_ns
            {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            set_meta(&mut obj, "namespace", json!(url_ns));
        } else {
            meta_mut(&mut obj).remove("namespace");
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) => n.to_owned(),
            (None, Some(g)) => format!("{g}{}", name_suffix()?),
            (None, None) => {
                return invalid(
                    res,
                    "",
                    vec![berth_api::FieldError::new(
                        berth_api::FieldErrorKind::Required,
                        "metadata.name",
                        "name or generateName is required",
                    )],
                )
                .map(|()| Answer::ok(Value::Null));
            }
        };
        check_name(res, &name)?;
        {
            let m = meta_mut(&mut obj);
            m.insert("name".into(), json!(name));
            m.insert("uid".into(), json!(new_uid()?));
            m.insert("creationTimestamp".into(), json!(now_rfc3339()));
            m.insert("generation".into(), json!(1));
            for k in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
                "managedFields",
            ] {
                m.remove(k);
            }
        }
        if res.has_status
            && let Some(o) = obj.as_object_mut()
        {
            // Status is written through the status subresource only.
            o.remove("status");
        }
        defaults::apply(res, &mut obj);
        invalid(res, &name, validation::validate_create(res, &obj))?;
        let lookup = self.snapshot(res, true).await?;
        admission::admit(res, Operation::Create, &mut obj, None, &lookup).map_err(|d| denied(res, &name, d))?;
        if let Some(ns) = ns.filter(|_| res.namespaced()) {
            let nsr = berth_api::resources::by_plural("", "v1", "namespaces").ok_or(ApiError::NoRoute)?;
            if self.store.get(&key(nsr, None, ns)).await?.is_none() {
                return Err(ApiError::NotFound(Subject::of(nsr, ns)));
            }
        }
        let bytes = Bytes::from(serde_json::to_vec(&obj).map_err(|e| ApiError::Internal(e.to_string()))?);
        let rev = if dry_run {
            0
        } else {
            self.store
                .create(&key(res, ns, &name), bytes)
                .await
                .map_err(|e| self.store_err(res, &name, e))?
        };
        set_meta(&mut obj, "resourceVersion", json!(rev.to_string()));
        Ok(Answer {
            code: 201,
            body: obj,
            warnings,
        })
    }

    /// PUT of the main resource (`status == false`) or of `/status`.
    #[allow(clippy::too_many_arguments)] // a request's parts
    pub async fn update(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        new: Value,
        warnings: Vec<String>,
        status: bool,
        dry_run: bool,
    ) -> Result<Answer, ApiError> {
        let part = if status { Write::Status } else { Write::Main };
        self.read_and_update(res, ns, name, new, warnings, part, dry_run).await
    }

    /// Reads the stored object and writes `new` (a body, checked in full) over it.
    #[allow(clippy::too_many_arguments)] // one write: where, what, how
    async fn read_and_update(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        new: Value,
        warnings: Vec<String>,
        part: Write,
        dry_run: bool,
    ) -> Result<Answer, ApiError> {
        check_body_identity(res, ns, name, &new)?;
        let (old, old_rev) = self.read(res, ns, name).await?;
        self.write_update(
            res,
            ns,
            name,
            old,
            old_rev,
            new,
            warnings,
            part,
            dry_run,
            Decodes::Unknown,
        )
        .await
    }

    /// An in-process controller's update of spec and status in one write (validated as both
    /// a PUT and a PUT of `/status`); compare-and-swap on the body's resourceVersion.
    pub async fn update_all(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        new: Value,
    ) -> Result<Answer, ApiError> {
        self.read_and_update(res, ns, name, new, Vec::new(), Write::Both, false)
            .await
    }

    /// An in-process controller's write of `new` over `old`, the copy it holds from its cache
    /// (with that copy's `resourceVersion`). The object is not read again: what the API stores
    /// is the typed round trip of a body, so a cached typed copy at a revision is that
    /// revision's object, and the store's compare-and-swap on the revision refuses a stale
    /// copy with a Conflict, as a fresh read would. Without a revision in `old` it reads.
    /// `new` is a typed object's encoding, so it is not read through its type again
    /// ([`Decodes::Known`]); every validation rule still runs.
    pub async fn update_over(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        old: Value,
        new: Value,
        part: Write,
    ) -> Result<Answer, ApiError> {
        check_body_identity(res, ns, name, &new)?;
        let (old, old_rev) = match meta_str(&old, "resourceVersion").and_then(|rv| rv.parse::<u64>().ok()) {
            Some(rev) if meta_str(&old, "name") == Some(name) && meta_str(&old, "namespace") == ns => (old, rev),
            _ => self.read(res, ns, name).await?,
        };
        self.write_update(
            res,
            ns,
            name,
            old,
            old_rev,
            new,
            Vec::new(),
            part,
            false,
            Decodes::Known,
        )
        .await
    }

    /// The shared tail of PUT and PATCH.
    #[allow(clippy::too_many_arguments)] // one write: who, what before, what after, how
    async fn write_update(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        old: Value,
        old_rev: u64,
        mut new: Value,
        warnings: Vec<String>,
        part: Write,
        dry_run: bool,
        decodes: validation::Decodes,
    ) -> Result<Answer, ApiError> {
        let status = part == Write::Status;
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && rv != old_rev.to_string()
        {
            return Err(ApiError::Conflict {
                subject: Subject::of(res, name),
                detail: MODIFIED.into(),
            });
        }
        if status {
            // A status write changes status only.
            let mut merged = old.clone();
            merged["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            if merged["status"].is_null()
                && let Some(o) = merged.as_object_mut()
            {
                o.remove("status");
            }
            new = merged;
        } else {
            // System fields are the server's.
            let old_meta = meta(&old).clone();
            let m = meta_mut(&mut new);
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
            ] {
                match old_meta.get(k) {
                    Some(v) => m.insert(k.to_owned(), v.clone()),
                    None => m.remove(k),
                };
            }
            m.remove("managedFields");
            m.remove("selfLink");
            if res.has_status
                && part == Write::Main
                && let Some(o) = new.as_object_mut()
            {
                match old.get("status") {
                    Some(s) => o.insert("status".into(), s.clone()),
                    None => o.remove("status"),
                };
            }
        }
        defaults::apply(res, &mut new);
        if !status && new.get("spec") != old.get("spec") {
            let g = meta(&old)["generation"].as_i64().unwrap_or(0);
            set_meta(&mut new, "generation", json!(g + 1));
        }
        let written = match part {
            Write::Status => validation::UpdatePart::Status,
            Write::Main => validation::UpdatePart::Main,
            Write::Both => validation::UpdatePart::Both,
        };
        let errors = validation::validate_update_of(res, written, &new, &old, decodes);
        invalid(res, name, errors)?;
        let op = if status {
            Operation::UpdateStatus
        } else {
            Operation::Update
        };
        let request = |v: &Value| v.pointer("/spec/resources/requests/storage").cloned();
        let lookup = self.snapshot(res, request(&new) != request(&old)).await?;
        admission::admit(res, op, &mut new, Some(&old), &lookup).map_err(|d| denied(res, name, d))?;
        set_meta(&mut new, "resourceVersion", json!(old_rev.to_string()));
        if new == old {
            return Ok(Answer {
                code: 200,
                body: new,
                warnings,
            });
        }
        meta_mut(&mut new).remove("resourceVersion");
        let key = key(res, ns, name);
        let terminating = meta(&old).get("deletionTimestamp").is_some_and(|t| !t.is_null());
        if terminating && finalizers_empty(&new) {
            // The last finalizer is gone: the deletion completes now.
            if !dry_run {
                self.store
                    .delete(&key, Some(old_rev))
                    .await
                    .map_err(|e| self.store_err(res, name, e))?;
            }
            set_meta(&mut new, "resourceVersion", json!(old_rev.to_string()));
            return Ok(Answer {
                code: 200,
                body: new,
                warnings,
            });
        }
        let bytes = Bytes::from(serde_json::to_vec(&new).map_err(|e| ApiError::Internal(e.to_string()))?);
        let rev = if dry_run {
            old_rev
        } else {
            self.store
                .update(&key, bytes, Some(old_rev))
                .await
                .map_err(|e| self.store_err(res, name, e))?
        };
        set_meta(&mut new, "resourceVersion", json!(rev.to_string()));
        Ok(Answer {
            code: 200,
            body: new,
            warnings,
        })
    }

    /// PATCH; retried on a concurrent write unless the patch itself pins a resourceVersion.
    #[allow(clippy::too_many_arguments)] // a request's parts
    pub async fn patch(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: &[u8],
        validation: FieldValidation,
        status: bool,
        dry_run: bool,
    ) -> Result<Answer, ApiError> {
        if body.len() > decode::MAX_BODY {
            return Err(ApiError::TooLarge(decode::MAX_BODY));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (old, old_rev) = self.read(res, ns, name).await?;
            let patched = berth_api::patch::apply(res, kind, &old, body).map_err(|e| match e {
                berth_api::patch::PatchError::Malformed(_) => ApiError::BadRequest(e.to_string()),
                berth_api::patch::PatchError::Invalid(_) => ApiError::Denied {
                    subject: Subject::of(res, name),
                    code: 422,
                    reason: "Invalid",
                    message: e.to_string(),
                },
            })?;
            let pinned = meta_str(&patched, "resourceVersion") != Some(old_rev.to_string().as_str());
            let decoded = decode::check_object(res, patched, validation)?;
            check_body_identity(res, ns, name, &decoded.object)?;
            match self
                .write_update(
                    res,
                    ns,
                    name,
                    old,
                    old_rev,
                    decoded.object,
                    decoded.warnings,
                    if status { Write::Status } else { Write::Main },
                    dry_run,
                    Decodes::Unknown,
                )
                .await
            {
                Err(ApiError::Conflict { .. }) if !pinned && attempt < 5 => continue,
                other => return other,
            }
        }
    }

    /// DELETE: immediate without finalizers; otherwise marks the object Terminating.
    pub async fn delete(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
        dry_run: bool,
    ) -> Result<Answer, ApiError> {
        let (mut obj, rev) = self.read(res, ns, name).await?;
        let uid = meta_str(&obj, "uid").unwrap_or("").to_owned();
        if let Some(want) = &opts.uid
            && *want != uid
        {
            return Err(ApiError::Conflict {
                subject: Subject::of(res, name),
                detail: format!("Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"),
            });
        }
        if let Some(want) = &opts.resource_version
            && *want != rev.to_string()
        {
            return Err(ApiError::Conflict {
                subject: Subject::of(res, name),
                detail: format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rev}"
                ),
            });
        }
        let dry_run = dry_run || opts.dry_run;
        let key = key(res, ns, name);
        if !finalizers_empty(&obj) {
            if meta(&obj).get("deletionTimestamp").is_some_and(|t| !t.is_null()) {
                return Ok(Answer::ok(obj));
            }
            {
                let m = meta_mut(&mut obj);
                m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
                m.remove("resourceVersion");
            }
            let bytes = Bytes::from(serde_json::to_vec(&obj).map_err(|e| ApiError::Internal(e.to_string()))?);
            let new_rev = if dry_run {
                rev
            } else {
                self.store
                    .update(&key, bytes, Some(rev))
                    .await
                    .map_err(|e| self.store_err(res, name, e))?
            };
            set_meta(&mut obj, "resourceVersion", json!(new_rev.to_string()));
            return Ok(Answer::ok(obj));
        }
        if !dry_run {
            self.store
                .delete(&key, Some(rev))
                .await
                .map_err(|e| self.store_err(res, name, e))?;
        }
        let mut details = json!({ "name": name, "kind": res.plural, "uid": uid });
        if !res.group.is_empty() {
            details["group"] = json!(res.group);
        }
        Ok(Answer::ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        })))
    }

    /// DELETE on a collection: each selected object as a single DELETE; answers the list of
    /// what remains Terminating plus what was deleted.
    pub async fn delete_collection(
        &self,
        res: &Resource,
        ns: Option<&str>,
        req: &ListRequest,
        dry_run: bool,
    ) -> Result<Answer, ApiError> {
        let listed = self
            .list(
                res,
                ns,
                &ListRequest {
                    limit: None,
                    continue_token: None,
                    ..req.clone()
                },
            )
            .await?;
        let mut items = Vec::new();
        for obj in listed.items {
            let name = meta_str(&obj, "name").unwrap_or("").to_owned();
            let ns = meta_str(&obj, "namespace").map(str::to_owned);
            match self
                .delete(res, ns.as_deref(), &name, &DeleteOptions::default(), dry_run)
                .await
            {
                Ok(_) | Err(ApiError::NotFound(_)) => items.push(obj),
                Err(e) => return Err(e),
            }
        }
        Ok(Answer::ok(list_body(res, items, listed.revision, None)))
    }
}

/// The `{Kind}List` body.
pub fn list_body(res: &Resource, items: Vec<Value>, revision: u64, continue_token: Option<String>) -> Value {
    let mut meta = json!({ "resourceVersion": revision.to_string() });
    if let Some(c) = continue_token {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": format!("{}List", res.kind),
        "apiVersion": res.api_version(),
        "metadata": meta,
        "items": items,
    })
}

/// The body of a PUT must name the object of the URL.
fn check_body_identity(res: &Resource, ns: Option<&str>, name: &str, body: &Value) -> Result<(), ApiError> {
    match meta_str(body, "name") {
        Some(n) if n == name => {}
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        None => {}
    }
    if res.namespaced()
        && let (Some(b), Some(u)) = (meta_str(body, "namespace"), ns)
        && b != u
    {
        return Err(ApiError::BadRequest(
            "the namespace of the provided object does not match the namespace sent on the request".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The spliced text is the object [`super::stamped`] builds, whatever the metadata holds.
    #[test]
    fn stamped_json_is_the_stamped_object() {
        for stored in [
            r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"a","uid":"u"},"spec":{}}"#,
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{},"spec":{"x":"\"metadata\":{"}}"#,
            r#"{"kind":"X","metadata" : { } }"#,
            r#"{"apiVersion":"\"metadata\":{","metadata":{"name":"a"}}"#,
            r#"{"spec":{"metadata":{"name":"inner"}},"metadata":{"labels":{"resourceVersion":"no"}}}"#,
            // Not the stored form; stamped anyway, by the slow path.
            r#"{"metadata":{"name":"a","resourceVersion":"3"}}"#,
            r#"{"kind":"NoMeta"}"#,
            r#"{"metadata":null}"#,
        ] {
            let fast = super::stamped_json(stored.as_bytes(), 42).unwrap();
            let parsed: serde_json::Value = serde_json::from_slice(&fast).unwrap();
            assert_eq!(parsed, super::stamped(stored.as_bytes(), 42).unwrap(), "{stored}");
        }
        assert!(super::stamped_json(b"not json", 1).is_err());
    }

    use super::*;

    /// A write over a cached copy: taken without a read when the copy is current, refused with
    /// a Conflict when the object moved on, and read afresh when the copy names another object.
    #[tokio::test]
    async fn update_over_a_cached_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = berth_store::RedbStore::open(dir.path().join("store.redb"), Default::default()).unwrap();
        let objects = Objects { store: Arc::new(store) };
        let pv = berth_api::resources::by_plural("", "v1", "persistentvolumes").unwrap();
        let body = json!({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "v"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                     "hostPath": {"path": "/srv/v"}},
        });
        let created = objects.create(pv, None, body, Vec::new(), false).await.unwrap().body;
        let with_phase = |base: &Value, phase: &str| {
            let mut v = base.clone();
            v["status"] = json!({"phase": phase});
            v
        };

        let first = objects
            .update_over(
                pv,
                None,
                "v",
                created.clone(),
                with_phase(&created, "Available"),
                Write::Status,
            )
            .await
            .unwrap()
            .body;
        assert_eq!(first["status"]["phase"], "Available");
        assert_ne!(
            first["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        let stored = objects.get(pv, None, "v").await.unwrap();
        assert_eq!(stored["status"]["phase"], "Available");
        assert_eq!(stored["metadata"]["uid"], created["metadata"]["uid"]);

        // The copy the first write replaced is stale now.
        let stale = objects
            .update_over(
                pv,
                None,
                "v",
                created.clone(),
                with_phase(&created, "Released"),
                Write::Status,
            )
            .await;
        assert!(matches!(stale, Err(ApiError::Conflict { .. })), "{stale:?}");
        assert_eq!(
            objects.get(pv, None, "v").await.unwrap()["status"]["phase"],
            "Available"
        );

        // A copy of another object is not taken for this one: the object is read.
        let mut other = first.clone();
        other["metadata"]["name"] = json!("w");
        let answer = objects
            .update_over(pv, None, "v", other, with_phase(&first, "Released"), Write::Status)
            .await
            .unwrap()
            .body;
        assert_eq!(answer["status"]["phase"], "Released");
    }

    #[test]
    fn keys_and_prefixes() {
        let pv = berth_api::resources::by_plural("", "v1", "persistentvolumes").unwrap();
        let pvc = berth_api::resources::by_plural("", "v1", "persistentvolumeclaims").unwrap();
        assert_eq!(key(pv, None, "a"), "/core/persistentvolumes/a");
        assert_eq!(key(pvc, Some("ns"), "a"), "/core/persistentvolumeclaims/ns/a");
        assert_eq!(prefix(pvc, None), "/core/persistentvolumeclaims/");
        assert_eq!(prefix(pvc, Some("ns")), "/core/persistentvolumeclaims/ns/");
    }

    #[test]
    fn names() {
        let pv = berth_api::resources::by_plural("", "v1", "persistentvolumes").unwrap();
        let ns = berth_api::resources::by_plural("", "v1", "namespaces").unwrap();
        for ok in ["a", "pv-1", "a.b.c", "0"] {
            assert!(check_name(pv, ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "a/b", "..", "-a", "a-", "a..b", "a_b", &"x".repeat(254)] {
            let e = check_name(pv, bad).unwrap_err();
            assert_eq!(e.code_reason().0, 422, "{bad}");
        }
        assert!(check_name(ns, "a.b").is_err());
        let e = check_name(pv, "Bad").unwrap_err();
        assert!(e.to_string().starts_with("PersistentVolume \"Bad\" is invalid: metadata.name: Invalid value: \"Bad\": a lowercase RFC 1123 subdomain"), "{e}");
    }

    #[test]
    fn uid_is_v4_and_continue_round_trips() {
        let u = new_uid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let t = encode_continue(42, "core/persistentvolumes/a");
        assert_eq!(
            decode_continue(&t, "/core/persistentvolumes/").unwrap(),
            (42, "/core/persistentvolumes/a".into())
        );
        assert!(decode_continue(&t, "/core/secrets/").is_err());
        assert!(decode_continue("zz", "/").is_err());
        assert_eq!(name_suffix().unwrap().len(), 5);
    }
}
