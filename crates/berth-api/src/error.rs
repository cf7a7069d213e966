//! Field errors, as Kubernetes reports them in a 422 `Status` (`details.causes[]`).

use std::fmt;

/// What is wrong with a field; the names are the `reason` values of a `StatusCause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// `FieldValueRequired`: "Required value".
    Required,
    /// `FieldValueInvalid`: "Invalid value".
    Invalid,
    /// `FieldValueNotSupported`: "Unsupported value".
    NotSupported,
    /// `FieldValueForbidden`: "Forbidden".
    Forbidden,
    /// `FieldValueDuplicate`: "Duplicate value".
    Duplicate,
    /// `FieldValueTooLong`: "Too long".
    TooLong,
    /// `FieldValueTypeInvalid`: "Invalid value" (wrong JSON type).
    TypeInvalid,
}

impl FieldErrorKind {
    /// The `StatusCause.reason`.
    pub fn reason(self) -> &'static str {
        match self {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::TypeInvalid => "FieldValueTypeInvalid",
        }
    }

    fn phrase(self) -> &'static str {
        match self {
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::Invalid | FieldErrorKind::TypeInvalid => "Invalid value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::Forbidden => "Forbidden",
            FieldErrorKind::Duplicate => "Duplicate value",
            FieldErrorKind::TooLong => "Too long",
        }
    }
}

/// One invalid field: `spec.capacity[storage]: Invalid value: "-1": must be greater than zero`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub kind: FieldErrorKind,
    /// The field path as Kubernetes writes it: `spec.accessModes[0]`, `metadata.labels[app]`.
    pub field: String,
    /// The offending value, rendered as Kubernetes does (quoted string, number), if any.
    pub value: Option<String>,
    pub detail: String,
}

impl FieldError {
    pub fn new(kind: FieldErrorKind, field: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError {
            kind,
            field: field.into(),
            value: None,
            detail: detail.into(),
        }
    }

    pub fn with_value(mut self, value: impl Into<String>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// `Phrase: value: detail` without the field path: the `message` of a `StatusCause`.
    pub fn cause_message(&self) -> String {
        let mut out = self.kind.phrase().to_owned();
        if let Some(v) = &self.value {
            out.push_str(": ");
            out.push_str(v);
        }
        if !self.detail.is_empty() {
            out.push_str(": ");
            out.push_str(&self.detail);
        }
        out
    }
}

impl fmt::Display for FieldError {
    /// `field: Phrase: value: detail`, as in a Kubernetes `Status.message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.cause_message())
    }
}
