//! `CsiError`, the one error type a [`crate::Driver`] returns, and its single mapping to
//! `tonic::Status`.
//!
//! Each variant is a CSI error code with the meaning the spec gives it. The mapping keeps
//! `status.details` empty (the spec requires it) and puts the message, which must tell the caller
//! what to fix, in `status.message`.

/// A CSI call failed; the variant chooses the gRPC code the caller sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    /// A field is missing or malformed; `field` names it, e.g. `volume_id`.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The volume, snapshot, node or path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by an object with incompatible arguments.
    #[error("{0}")]
    AlreadyExists(String),
    /// The requested capacity range cannot be satisfied.
    #[error("{0}")]
    OutOfRange(String),
    /// No space, no free attach slot, or a topology that cannot be met.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The object is not in a state that allows the call, e.g. published elsewhere.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same object is in flight, or a paging token is stale.
    #[error("{0}")]
    Aborted(String),
    /// The backend cannot serve right now; the caller should retry.
    #[error("{0}")]
    Unavailable(String),
    /// The driver does not implement this RPC.
    #[error("{0}")]
    Unimplemented(String),
    /// A bug or an unexpected backend failure.
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// Shorthand for [`CsiError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<CsiError> for tonic::Status {
    fn from(err: CsiError) -> Self {
        // Status::new leaves details empty, as the spec requires.
        tonic::Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rstest::rstest;
    use tonic::Code;

    #[rstest]
    #[case(
        CsiError::invalid("volume_id", "must not be empty"),
        Code::InvalidArgument,
        "volume_id: must not be empty"
    )]
    #[case(CsiError::NotFound("volume \"v\" not found".into()), Code::NotFound, "volume \"v\" not found")]
    #[case(CsiError::AlreadyExists("a".into()), Code::AlreadyExists, "a")]
    #[case(CsiError::OutOfRange("b".into()), Code::OutOfRange, "b")]
    #[case(CsiError::ResourceExhausted("c".into()), Code::ResourceExhausted, "c")]
    #[case(CsiError::FailedPrecondition("d".into()), Code::FailedPrecondition, "d")]
    #[case(CsiError::Aborted("e".into()), Code::Aborted, "e")]
    #[case(CsiError::Unavailable("f".into()), Code::Unavailable, "f")]
    #[case(CsiError::Unimplemented("g".into()), Code::Unimplemented, "g")]
    #[case(CsiError::Internal("h".into()), Code::Internal, "h")]
    fn maps_to_matching_status(#[case] err: CsiError, #[case] code: Code, #[case] message: &str) {
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), code);
        assert_eq!(status.message(), message);
        assert!(status.details().is_empty());
    }
}
