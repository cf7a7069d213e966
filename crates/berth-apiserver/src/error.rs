//! The API server's error type, and the one place where an error becomes an HTTP answer: a
//! `meta.k8s.io/v1` `Status` with Kubernetes' reason, code and message formats, so that kubectl
//! prints exactly what it prints against Kubernetes (`persistentvolumes "x" not found`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_api::{FieldError, Resource};
use serde_json::{Value, json};

/// Who an error is about: the `details` of the Status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    /// The plural resource name (`persistentvolumes`), as Kubernetes names it in messages.
    pub plural: &'static str,
    pub group: &'static str,
    pub kind: &'static str,
    pub name: String,
}

impl Subject {
    pub fn of(res: &Resource, name: &str) -> Self {
        Subject {
            plural: res.plural,
            group: res.group,
            kind: res.kind,
            name: name.to_owned(),
        }
    }

    /// `persistentvolumes` or `storageclasses.storage.k8s.io`: the qualified resource that
    /// Kubernetes puts in NotFound/AlreadyExists/Conflict messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// Everything a request can fail with. Each variant says when it happens; [`IntoResponse`]
/// turns it into the Status Kubernetes sends in that case.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The object (or its namespace) does not exist.
    #[error("{} \"{}\" not found", .0.qualified(), .0.name)]
    NotFound(Subject),
    /// `create` of a name that is taken.
    #[error("{} \"{}\" already exists", .0.qualified(), .0.name)]
    AlreadyExists(Subject),
    /// An update carried a resourceVersion that is no longer current, or a delete
    /// precondition did not hold.
    #[error("Operation cannot be fulfilled on {} \"{}\": {detail}", subject.qualified(), subject.name)]
    Conflict { subject: Subject, detail: String },
    /// Validation (or the server's own name check) refused the object: 422.
    #[error("{} \"{}\" is invalid: {}", subject.kind, subject.name, join_causes(causes))]
    Invalid { subject: Subject, causes: Vec<FieldError> },
    /// The request is malformed: body, query, or a mismatch between body and URL.
    #[error("{0}")]
    BadRequest(String),
    /// Admission refused the request (403 or 422, with admission's own message).
    #[error("{message}")]
    Denied {
        subject: Subject,
        code: u16,
        reason: &'static str,
        message: String,
    },
    /// No token, or one that is not ours.
    #[error("Unauthorized")]
    Unauthorized,
    /// The token may not do this (the read-only token on a mutating verb).
    #[error("{0}")]
    Forbidden(String),
    /// A watch or continue token older than the store's compaction point.
    #[error("{0}")]
    Gone(String),
    /// A body over the limit.
    #[error("Request entity too large: limit is {0}")]
    TooLarge(usize),
    /// A Content-Type the verb does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A verb the path does not serve.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// No route for this path.
    #[error("the server could not find the requested resource")]
    NoRoute,
    /// The store failed; nothing was written.
    #[error("{0}")]
    Internal(String),
    /// A resourceVersion newer than the store's (clients retry).
    #[error("Too large resource version: {0}")]
    Timeout(String),
}

fn join_causes(causes: &[FieldError]) -> String {
    match causes {
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

impl ApiError {
    /// The HTTP code and the Status `reason`.
    pub fn code_reason(&self) -> (u16, &'static str) {
        match self {
            ApiError::NotFound(_) | ApiError::NoRoute => (404, "NotFound"),
            ApiError::AlreadyExists(_) => (409, "AlreadyExists"),
            ApiError::Conflict { .. } => (409, "Conflict"),
            ApiError::Invalid { .. } => (422, "Invalid"),
            ApiError::BadRequest(_) => (400, "BadRequest"),
            ApiError::Denied { code, reason, .. } => (*code, reason),
            ApiError::Unauthorized => (401, "Unauthorized"),
            ApiError::Forbidden(_) => (403, "Forbidden"),
            ApiError::Gone(_) => (410, "Expired"),
            ApiError::TooLarge(_) => (413, "RequestEntityTooLarge"),
            ApiError::UnsupportedMediaType(_) => (415, "UnsupportedMediaType"),
            ApiError::MethodNotAllowed(_) => (405, "MethodNotAllowed"),
            ApiError::Internal(_) => (500, "InternalError"),
            ApiError::Timeout(_) => (504, "Timeout"),
        }
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let (code, reason) = self.code_reason();
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": reason,
            "code": code,
        });
        let subject = match self {
            ApiError::NotFound(s) | ApiError::AlreadyExists(s) => Some(s),
            ApiError::Conflict { subject, .. }
            | ApiError::Invalid { subject, .. }
            | ApiError::Denied { subject, .. } => Some(subject),
            _ => None,
        };
        if let Some(s) = subject {
            let mut details = json!({ "name": s.name, "kind": s.plural });
            if !s.group.is_empty() {
                details["group"] = json!(s.group);
            }
            if let ApiError::Invalid { causes, .. } = self {
                details["kind"] = json!(s.kind);
                details["causes"] = causes
                    .iter()
                    .map(|c| json!({ "reason": c.kind.reason(), "message": c.cause_message(), "field": c.field }))
                    .collect();
            }
            status["details"] = details;
        }
        if let ApiError::Gone(_) = self {
            status["reason"] = json!("Expired");
        }
        status
    }
}

impl From<berth_store::StoreError> for ApiError {
    /// Store errors that reach here without a subject (lists, watches); keyed errors are
    /// translated where the subject is known ([`crate::objects`]).
    fn from(e: berth_store::StoreError) -> Self {
        use berth_store::StoreError as S;
        match e {
            S::Gone { requested, .. } => ApiError::Gone(format!("too old resource version: {requested}")),
            S::FutureRevision { requested, current } => {
                ApiError::Timeout(format!("{requested} (the store is at {current})"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, _) = self.code_reason();
        if code >= 500 {
            tracing::error!(error = %self, "request failed");
        }
        let body = serde_json::to_vec(&self.status()).unwrap_or_default();
        let mut resp = (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )
            .into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if code == 504 {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::FieldErrorKind;

    #[test]
    fn messages_are_kubernetes_messages() {
        let pv = berth_api::resources::by_plural("", "v1", "persistentvolumes").unwrap();
        let sc = berth_api::resources::by_plural("storage.k8s.io", "v1", "storageclasses").unwrap();
        assert_eq!(
            ApiError::NotFound(Subject::of(pv, "x")).to_string(),
            "persistentvolumes \"x\" not found"
        );
        assert_eq!(
            ApiError::AlreadyExists(Subject::of(sc, "fast")).to_string(),
            "storageclasses.storage.k8s.io \"fast\" already exists"
        );
        let conflict = ApiError::Conflict {
            subject: Subject::of(pv, "x"),
            detail: "the object has been modified; please apply your changes to the latest version and try again"
                .into(),
        };
        assert_eq!(
            conflict.to_string(),
            "Operation cannot be fulfilled on persistentvolumes \"x\": the object has been modified; please apply your changes to the latest version and try again"
        );
        let invalid = ApiError::Invalid {
            subject: Subject::of(pv, "x"),
            causes: vec![FieldError::new(FieldErrorKind::Required, "spec.capacity", "")],
        };
        assert_eq!(
            invalid.to_string(),
            "PersistentVolume \"x\" is invalid: spec.capacity: Required value"
        );
        let s = invalid.status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["reason"], "Invalid");
        assert_eq!(s["details"]["kind"], "PersistentVolume");
        assert_eq!(s["details"]["causes"][0]["field"], "spec.capacity");
        assert_eq!(s["details"]["causes"][0]["reason"], "FieldValueRequired");
        assert_eq!(s["details"]["causes"][0]["message"], "Required value");
    }
}
