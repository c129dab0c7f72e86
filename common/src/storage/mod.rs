//! S3 clients per endpoint and credentials, and what their failures mean
//! ([`error`]). Credentials come from a Secret mounted under a directory
//! (one sub-directory per Secret name) or, when the spec names none, from
//! the process environment.

pub mod error;
pub mod ops;

pub use error::{S3Error, s3_error};
pub use ops::abort_upload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};

use crate::spec::Endpoint;

/// Credentials the spec asks for are not where they should be.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CredentialsError(pub String);

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

    pub fn client(&self, endpoint: &Endpoint) -> Result<aws_sdk_s3::Client, CredentialsError> {
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

    fn credentials(&self, endpoint: &Endpoint) -> Result<Credentials, CredentialsError> {
        let (id, secret) = match &endpoint.credentials_secret_ref {
            Some(r) => {
                let dir = self.credentials_dir.as_deref().ok_or_else(|| {
                    CredentialsError(format!(
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
                    return Err(CredentialsError(
                        "no credentialsSecretRef in the job and no AWS_ACCESS_KEY_ID / \
                         AWS_SECRET_ACCESS_KEY in the environment"
                            .into(),
                    ));
                }
            },
        };
        Ok(Credentials::new(id, secret, None, None, "stowage"))
    }
}

fn read_secret(dir: &Path, name: &str) -> Result<(String, String), CredentialsError> {
    Ok((
        read_secret_key(dir, name, &["access_key_id", "AWS_ACCESS_KEY_ID"])?,
        read_secret_key(dir, name, &["secret_access_key", "AWS_SECRET_ACCESS_KEY"])?,
    ))
}

/// The first of `keys` present in Secret `name` mounted under `dir`
/// (`<dir>/<name>/<key>`), trimmed.
pub fn read_secret_key(dir: &Path, name: &str, keys: &[&str]) -> Result<String, CredentialsError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(CredentialsError(format!(
            "{name:?} is not a valid Secret name"
        )));
    }
    let base = dir.join(name);
    for k in keys {
        if let Ok(v) = std::fs::read_to_string(base.join(k)) {
            return Ok(v.trim().to_string());
        }
    }
    // The worker's own paths stay out of the message: it reaches the
    // resource's status.
    tracing::debug!(secret = name, dir = %base.display(), "credentials Secret not found");
    Err(CredentialsError(format!(
        "credentials Secret {name:?} is not available to the worker, or has none of the keys \
         {}: create it, or check its keys",
        keys.join(" / ")
    )))
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
