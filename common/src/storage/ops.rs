//! S3 operations that several parts of Stowage perform the same way.

use super::error::{S3Error, s3_error};

/// Aborts a multipart upload. One that is already gone (completed,
/// aborted, or swept) is not an error: what the caller wants is true.
pub async fn abort_upload(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> Result<(), S3Error> {
    match client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = s3_error("AbortMultipartUpload", e);
            if e.is_not_found() { Ok(()) } else { Err(e) }
        }
    }
}
