//! Why indexing work failed, and whether another try can help: the same
//! retryable / permanent classification uploads have, so that an index dead
//! letter says which it was.

use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::locks::LockError;
use stowage_common::queue::QueueError;
use stowage_common::state::StateError;
use stowage_common::storage::{CredentialsError, S3Error};

use super::embed::EmbedError;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Lock(#[from] LockError),
    #[error("{0}")]
    S3(#[from] S3Error),
    #[error("{0}")]
    Embed(#[from] EmbedError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("credentials: {0}")]
    Credentials(CredentialsError),
    /// The built-in model cannot be used on this worker (not configured,
    /// unreadable files): another worker may have it.
    #[error("{0}")]
    Model(String),
    /// The collection's stored spec cannot be acted on.
    #[error("invalid collection: {0}")]
    Invalid(String),
    #[error("the collection sync lock was lost ({0}); stopped planning")]
    LockLost(String),
}

impl From<stowage_common::storage::ClientError> for IndexError {
    fn from(e: stowage_common::storage::ClientError) -> Self {
        match e {
            stowage_common::storage::ClientError::Credentials(e) => IndexError::Credentials(e),
            stowage_common::storage::ClientError::Refused(why) => IndexError::Invalid(why),
        }
    }
}

impl From<CredentialsError> for IndexError {
    fn from(e: CredentialsError) -> Self {
        IndexError::Credentials(e)
    }
}

impl From<stowage_common::db::PoolError> for IndexError {
    fn from(e: stowage_common::db::PoolError) -> Self {
        IndexError::State(e.into())
    }
}

impl Classify for IndexError {
    fn class(&self) -> ErrorClass {
        match self {
            IndexError::State(_)
            | IndexError::Lock(_)
            | IndexError::Queue(_)
            | IndexError::Model(_)
            | IndexError::LockLost(_) => ErrorClass::Retryable,
            IndexError::S3(e) => e.class(),
            IndexError::Embed(e) => e.class(),
            IndexError::Credentials(e) if e.is_transient() => ErrorClass::Retryable,
            IndexError::Credentials(_) | IndexError::Invalid(_) => ErrorClass::Permanent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_errors_are_classified_like_upload_errors() {
        let denied = IndexError::S3(S3Error {
            op: "GetObject",
            status: Some(403),
            code: Some("AccessDenied".into()),
            message: "access denied".into(),
            transport: false,
        });
        assert_eq!(denied.class(), ErrorClass::Permanent);
        let slow = IndexError::S3(S3Error {
            op: "ListObjectsV2",
            status: Some(503),
            code: Some("SlowDown".into()),
            message: String::new(),
            transport: false,
        });
        assert_eq!(slow.class(), ErrorClass::Retryable);
        assert_eq!(
            IndexError::Embed(EmbedError::Status {
                status: 401,
                body: String::new()
            })
            .class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            IndexError::Embed(EmbedError::Transport("reset".into())).class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            IndexError::Credentials(CredentialsError::NotFound {
                namespace: "a".into(),
                name: "k".into()
            })
            .class(),
            ErrorClass::Permanent
        );
        assert_eq!(IndexError::Model("x".into()).class(), ErrorClass::Retryable);
    }
}
