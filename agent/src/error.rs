//! The agent's error type and its mapping onto gRPC status codes.

use std::path::PathBuf;

/// Everything an agent operation can fail with. Messages name the field or the
/// object at fault so an operator can act on them.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("archive rejected: {0}")]
    BadArchive(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context} ({path}): {source}")]
    PathIo {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> Self {
        Self::NotFound {
            kind,
            name: name.into(),
        }
    }
    pub fn exists(kind: &'static str, name: impl Into<String>) -> Self {
        Self::AlreadyExists {
            kind,
            name: name.into(),
        }
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attaches a path and an action to an `io::Error`.
pub trait IoContext<T> {
    fn at(self, context: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, context: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| AgentError::PathIo {
            context,
            path: path.into(),
            source,
        })
    }
}

impl From<nix::Error> for AgentError {
    fn from(e: nix::Error) -> Self {
        AgentError::io("system call", std::io::Error::from(e))
    }
}

/// Whether a stream's error is a message that did not decode (tonic reports
/// it as `Internal`; it is the caller's bad input).
pub fn is_decode_failure(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Internal && s.message().contains("decode")
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            AgentError::InvalidArgument { .. } | AgentError::BadArchive(_) => {
                Status::invalid_argument(msg)
            }
            AgentError::NotFound { .. } => Status::not_found(msg),
            AgentError::AlreadyExists { .. } => Status::already_exists(msg),
            AgentError::FailedPrecondition(_) => Status::failed_precondition(msg),
            AgentError::ResourceExhausted(_) => Status::resource_exhausted(msg),
            AgentError::PermissionDenied(_) => Status::permission_denied(msg),
            _ => Status::internal(msg),
        }
    }
}
