//! The mapping of S3 SDK errors to [`UploadError`]s with their retry class;
//! the clients themselves are built in `stowage_common::storage`.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
pub use stowage_common::storage::S3Clients;

use crate::upload::UploadError;

/// Turns an SDK error into an [`UploadError::S3`] carrying the HTTP status and
/// S3 error code, from which its retry class follows.
pub fn s3_error<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> UploadError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let transport = matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_)
    );
    let code = err.code().map(str::to_string);
    let message = match err.message() {
        Some(m) => m.to_string(),
        None => format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err)),
    };
    UploadError::S3 {
        op,
        status,
        code,
        message,
        transport,
    }
}
