//! The controller's errors and their gRPC status codes.

use crate::state::RejectCode;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{message}")]
    Rejected { code: RejectCode, message: String },
    #[error("storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    /// This replica is not the leader and could not reach it.
    #[error("no leader reachable: {0}")]
    Unavailable(String),
    /// This replica is no member of a cluster: it did nothing with the call
    /// (another replica may take it, whatever it is).
    #[error("{0}")]
    NotMember(String),
    /// An agent refused or failed a call; its code is kept.
    #[error("node {node}: {message}")]
    Agent {
        node: String,
        code: tonic::Code,
        message: String,
    },
}

impl ControllerError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<ControllerError> for tonic::Status {
    fn from(e: ControllerError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            ControllerError::InvalidArgument { .. } => Status::invalid_argument(msg),
            ControllerError::Rejected { code, .. } => match code {
                RejectCode::InvalidArgument => Status::invalid_argument(msg),
                RejectCode::NotFound => Status::not_found(msg),
                RejectCode::AlreadyExists => Status::already_exists(msg),
                RejectCode::ResourceExhausted => Status::resource_exhausted(msg),
                RejectCode::FailedPrecondition => Status::failed_precondition(msg),
            },
            ControllerError::Unavailable(_) => Status::unavailable(msg),
            ControllerError::NotMember(_) => {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert(
                    ferry_proto::retry::NOT_APPLIED,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                Status::with_metadata(tonic::Code::Unavailable, msg, md)
            }
            ControllerError::Agent { code, .. } => Status::new(code, msg),
            ControllerError::Storage(_) | ControllerError::Raft(_) => Status::internal(msg),
        }
    }
}
