//! Where uploads happen: planning a job ([`plan`]), sources ([`source`]),
//! the address policy for HTTP sources ([`net`]), checksums ([`checksum`]),
//! the resumable multipart transfer ([`multipart`]), server-side encryption
//! ([`encryption`]), the per-file flow around it — key lock, conflict
//! policy, dedup, object history ([`item`]) — and tasks of many small files
//! ([`batch`]).

pub mod batch;
pub mod checksum;
pub mod encryption;
pub mod item;
pub mod multipart;
pub mod net;
pub mod plan;
pub mod source;

use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::locks::LockError;
use stowage_common::spec::KeyError;
use stowage_common::state::StateError;
use stowage_common::storage::S3Error;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("source {source_ref} answered HTTP {status}")]
    SourceStatus { source_ref: String, status: u16 },
    #[error("reading source {source_ref}: {message}")]
    SourceRead { source_ref: String, message: String },
    #[error("{0}")]
    Refused(String),
    #[error("invalid destination key: {0}")]
    InvalidKey(#[from] KeyError),
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("credentials: {0}")]
    Credentials(stowage_common::secrets::CredentialsError),
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(
        "the object has {parts} parts at part size {part_size}; S3 allows 10000: raise partSizeBytes"
    )]
    TooManyParts { parts: u64, part_size: u64 },
    #[error(
        "the source changed while resuming: part {part} no longer matches its recorded checksum"
    )]
    SourceChanged { part: i32 },
    #[error("the source changed during the upload: SHA-256 {hashed} before it, {read} in it")]
    SourceChangedDuringUpload { hashed: String, read: String },
    #[error("verification failed for {key}: {message}")]
    Verification { key: String, message: String },
    /// The job's encryption cannot be applied (the store ignores it, an
    /// object is encrypted with other parameters).
    #[error("encryption: {0}")]
    Encryption(String),
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("lock: {0}")]
    Lock(#[from] LockError),
    #[error("another worker is writing {0}")]
    KeyBusy(String),
    #[error("the key lock was lost ({0}); stopped writing")]
    LockLost(String),
    #[error("stopped: the worker is shutting down")]
    Cancelled,
    #[error("queue: {0}")]
    Queue(String),
    /// The file is finished, but the event that announces its object could
    /// not be published: its task is handed back to say it again.
    #[error("the object-landed event could not be published: {0}")]
    EventOwed(String),
}

impl From<stowage_common::storage::ClientError> for UploadError {
    fn from(e: stowage_common::storage::ClientError) -> Self {
        match e {
            stowage_common::storage::ClientError::Credentials(e) => UploadError::Credentials(e),
            stowage_common::storage::ClientError::Refused(why) => UploadError::Refused(why),
        }
    }
}

impl From<stowage_common::storage::CredentialsError> for UploadError {
    fn from(e: stowage_common::storage::CredentialsError) -> Self {
        UploadError::Credentials(e)
    }
}

/// Waiting for a pooled connection is a state problem like any query.
impl From<stowage_common::db::PoolError> for UploadError {
    fn from(e: stowage_common::db::PoolError) -> Self {
        UploadError::State(e.into())
    }
}

impl Classify for UploadError {
    fn class(&self) -> ErrorClass {
        use ErrorClass::*;
        match self {
            UploadError::SourceStatus { status, .. } => match status {
                408 | 425 | 429 => Retryable,
                s if *s >= 500 => Retryable,
                _ => Permanent,
            },
            UploadError::S3(e) => e.class(),
            UploadError::Credentials(e) if e.is_transient() => Retryable,
            UploadError::Refused(_)
            | UploadError::InvalidKey(_)
            | UploadError::Invalid(_)
            | UploadError::Credentials(_)
            | UploadError::Encryption(_)
            | UploadError::TooManyParts { .. } => Permanent,
            UploadError::SourceRead { .. }
            | UploadError::SourceChanged { .. }
            | UploadError::SourceChangedDuringUpload { .. }
            | UploadError::Verification { .. }
            | UploadError::State(_)
            | UploadError::Lock(_)
            | UploadError::KeyBusy(_)
            | UploadError::LockLost(_)
            | UploadError::Queue(_)
            | UploadError::EventOwed(_)
            | UploadError::Cancelled => Retryable,
        }
    }
}

impl UploadError {
    /// True for an S3 "no such key / bucket / upload" answer.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UploadError::S3(e) if e.is_not_found())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(status: Option<u16>, code: Option<&str>) -> UploadError {
        UploadError::S3(S3Error {
            op: "PutObject",
            status,
            code: code.map(str::to_string),
            message: String::new(),
            transport: false,
        })
    }

    #[test]
    fn classes() {
        use ErrorClass::*;
        let src = |status| UploadError::SourceStatus {
            source_ref: "u".into(),
            status,
        };
        assert_eq!(src(404).class(), Permanent);
        assert_eq!(src(403).class(), Permanent);
        assert_eq!(src(503).class(), Retryable);
        assert_eq!(src(429).class(), Retryable);
        assert_eq!(s3(Some(403), Some("AccessDenied")).class(), Permanent);
        assert_eq!(s3(Some(404), Some("NoSuchBucket")).class(), Permanent);
        assert_eq!(s3(Some(400), Some("BadDigest")).class(), Retryable);
        assert_eq!(s3(Some(503), Some("SlowDown")).class(), Retryable);
        assert_eq!(s3(Some(500), None).class(), Retryable);
        assert_eq!(UploadError::Refused("x".into()).class(), Permanent);
        assert_eq!(UploadError::KeyBusy("k".into()).class(), Retryable);
    }
}
