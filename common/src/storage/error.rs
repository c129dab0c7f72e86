//! What an S3 call's failure means: the one mapping from the SDK's errors
//! to a message a person can act on and a retry class, shared by uploads,
//! indexing, the sweeper and the operator's cleanup.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::errors::{Classify, ErrorClass, chain};

/// A failed S3 operation: the HTTP status and S3 error code when the server
/// answered, whether it never did (`transport`), and a readable message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "S3 {op} failed{}{}: {message}",
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default(),
    code.as_ref().map(|c| format!(" [{c}]")).unwrap_or_default()
)]
pub struct S3Error {
    pub op: &'static str,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub message: String,
    /// The request never got an HTTP answer (connect, timeout, reset).
    pub transport: bool,
}

/// Maps an SDK error of operation `op` to an [`S3Error`].
pub fn s3_error<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let transport = matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_)
    );
    let code = err.code().map(str::to_string);
    let message = match (err.message(), &err) {
        (Some(m), _) => m.to_string(),
        (None, SdkError::DispatchFailure(_)) => format!(
            "cannot reach the S3 endpoint ({}); check the endpoint URL and that the service is up",
            detail(&err)
        ),
        (None, SdkError::TimeoutError(_)) => {
            "the S3 endpoint did not answer in time; it may be overloaded or unreachable".into()
        }
        (None, SdkError::ResponseError(_)) => format!(
            "the S3 endpoint's answer could not be read ({})",
            detail(&err)
        ),
        (None, _) => match (status, &code) {
            (Some(404), _) => "not found".into(),
            (Some(403), _) => {
                "access denied: check the credentials Secret and the bucket policy".into()
            }
            (Some(s), None) => format!("the server answered HTTP {s} without an error code"),
            _ => detail(&err),
        },
    };
    S3Error {
        op,
        status,
        code,
        message: crate::redact::text(&message),
        transport,
    }
}

/// The cause chain below the SDK's own one-word summary.
fn detail<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + 'static,
{
    let full = chain(err);
    // "dispatch failure: io error: …" → "io error: …"
    full.split_once(": ")
        .map_or(full.clone(), |(_, rest)| rest.to_string())
}

impl S3Error {
    /// True for an S3 "no such key / bucket / upload" answer.
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404)
            || matches!(
                self.code.as_deref(),
                Some("NoSuchKey" | "NoSuchUpload" | "NotFound")
            )
    }
}

impl Classify for S3Error {
    fn class(&self) -> ErrorClass {
        use ErrorClass::*;
        if self.transport {
            return Retryable;
        }
        match (self.status, self.code.as_deref()) {
            (_, Some("SlowDown" | "Throttling" | "RequestTimeout" | "InternalError"))
            | (_, Some("BadDigest" | "InvalidDigest" | "XAmzContentSHA256Mismatch")) => Retryable,
            (Some(s), _) if s >= 500 || s == 429 || s == 408 => Retryable,
            (Some(_), _) => Permanent,
            (None, _) => Retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(status: Option<u16>, code: Option<&str>) -> S3Error {
        S3Error {
            op: "PutObject",
            status,
            code: code.map(str::to_string),
            message: String::new(),
            transport: false,
        }
    }

    #[test]
    fn classes() {
        use ErrorClass::*;
        assert_eq!(s3(Some(403), Some("AccessDenied")).class(), Permanent);
        assert_eq!(s3(Some(404), Some("NoSuchBucket")).class(), Permanent);
        assert_eq!(s3(Some(400), Some("BadDigest")).class(), Retryable);
        assert_eq!(s3(Some(503), Some("SlowDown")).class(), Retryable);
        assert_eq!(s3(Some(500), None).class(), Retryable);
        assert!(s3(Some(404), None).is_not_found());
        assert!(s3(Some(400), Some("NoSuchUpload")).is_not_found());
        assert_eq!(
            s3(Some(403), Some("AccessDenied")).to_string(),
            "S3 PutObject failed (HTTP 403) [AccessDenied]: "
        );
    }
}
