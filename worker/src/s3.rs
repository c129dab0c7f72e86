//! S3 clients per endpoint and credentials, and the mapping of SDK errors to
//! [`UploadError`]s with their retry class.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use stowage_common::spec::Endpoint;

use crate::upload::UploadError;

/// Builds and caches one client per (endpoint, region, credentials).
#[derive(Clone)]
pub struct S3Clients {
    credentials_dir: Option<PathBuf>,
    cache: Arc<Mutex<HashMap<Endpoint, aws_sdk_s3::Client>>>,
}

impl S3Clients {
    pub fn new(credentials_dir: Option<PathBuf>) -> Self {
        S3Clients {
            credentials_dir,
            cache: Arc::default(),
        }
    }

    pub fn client(&self, endpoint: &Endpoint) -> Result<aws_sdk_s3::Client, UploadError> {
        if let Some(c) = self
            .cache
            .lock()
            .ok()
            .and_then(|m| m.get(endpoint).cloned())
        {
            return Ok(c);
        }
        let credentials = self.credentials(endpoint)?;
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(Region::new(endpoint.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(endpoint.force_path_style)
            // Stowage sends its own per-part checksum; letting the SDK add a
            // second one costs CPU and some stores (Garage) reject it.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(url) = &endpoint.endpoint {
            config = config.endpoint_url(url);
        }
        let client = aws_sdk_s3::Client::from_conf(config.build());
        if let Ok(mut m) = self.cache.lock() {
            m.insert(endpoint.clone(), client.clone());
        }
        Ok(client)
    }

    fn credentials(&self, endpoint: &Endpoint) -> Result<Credentials, UploadError> {
        let (id, secret) = match &endpoint.credentials_secret_ref {
            Some(r) => {
                let dir = self.credentials_dir.as_deref().ok_or_else(|| {
                    UploadError::Credentials(format!(
                        "the job names credentials Secret {:?} but this worker has no --credentials-dir",
                        r.name
                    ))
                })?;
                read_secret(dir, &r.name)?
            }
            None => match (
                std::env::var("AWS_ACCESS_KEY_ID"),
                std::env::var("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Ok(id), Ok(secret)) => (id, secret),
                _ => {
                    return Err(UploadError::Credentials(
                        "no credentialsSecretRef in the job and no AWS_ACCESS_KEY_ID / \
                         AWS_SECRET_ACCESS_KEY in the worker's environment"
                            .into(),
                    ));
                }
            },
        };
        Ok(Credentials::new(id, secret, None, None, "stowage"))
    }
}

fn read_secret(dir: &Path, name: &str) -> Result<(String, String), UploadError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(UploadError::Credentials(format!(
            "{name:?} is not a valid Secret name"
        )));
    }
    let base = dir.join(name);
    let read = |keys: &[&str]| -> Result<String, UploadError> {
        for k in keys {
            if let Ok(v) = std::fs::read_to_string(base.join(k)) {
                return Ok(v.trim().to_string());
            }
        }
        Err(UploadError::Credentials(format!(
            "credentials Secret {name:?} has none of {keys:?} under {}",
            base.display()
        )))
    };
    Ok((
        read(&["access_key_id", "AWS_ACCESS_KEY_ID"])?,
        read(&["secret_access_key", "AWS_SECRET_ACCESS_KEY"])?,
    ))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mounted_secrets_in_both_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a")).expect("mkdir");
        std::fs::write(dir.path().join("a/access_key_id"), "AK\n").expect("write");
        std::fs::write(dir.path().join("a/secret_access_key"), "SK").expect("write");
        std::fs::create_dir_all(dir.path().join("b")).expect("mkdir");
        std::fs::write(dir.path().join("b/AWS_ACCESS_KEY_ID"), "AK2").expect("write");
        std::fs::write(dir.path().join("b/AWS_SECRET_ACCESS_KEY"), "SK2").expect("write");
        assert_eq!(
            read_secret(dir.path(), "a").expect("a"),
            ("AK".into(), "SK".into())
        );
        assert_eq!(
            read_secret(dir.path(), "b").expect("b"),
            ("AK2".into(), "SK2".into())
        );
        assert!(read_secret(dir.path(), "c").is_err());
        assert!(read_secret(dir.path(), "../etc").is_err());
    }
}
