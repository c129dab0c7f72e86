//! S3 clients per (namespace, endpoint), and what their failures mean
//! ([`error`]). Credentials come from the Secret the endpoint names, read
//! in the resource's own namespace ([`crate::secrets`]); an endpoint that
//! names none is accessed anonymously (public buckets), and the worker's
//! own credentials are used only when the resource asks for them
//! (`useWorkerCredentials`) and the installation allows it.

pub mod error;
pub mod ops;

pub use error::{S3Error, s3_error};
pub use ops::abort_upload;

pub use crate::secrets::CredentialsError;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};

use crate::secrets::{SECRET_TTL, Secrets};
use crate::spec::Endpoint;

/// The keys of an S3 credentials Secret (the first present wins).
const ACCESS_KEY_ID: &[&str] = &["access_key_id", "AWS_ACCESS_KEY_ID"];
const SECRET_ACCESS_KEY: &[&str] = &["secret_access_key", "AWS_SECRET_ACCESS_KEY"];

/// Builds and caches one client per (namespace, endpoint); a client is
/// rebuilt when its Secret may have changed (after [`SECRET_TTL`]).
#[derive(Clone)]
pub struct S3Clients {
    secrets: Secrets,
    allow_worker_credentials: bool,
    cache: Arc<Mutex<HashMap<(String, Endpoint), Built>>>,
}

/// A client built at some instant (its Secret as read then).
type Built = (Instant, aws_sdk_s3::Client);

impl S3Clients {
    /// `allow_worker_credentials`: may a resource use this process's own
    /// `AWS_*` credentials (`useWorkerCredentials`)? Off by default.
    pub fn new(secrets: Secrets, allow_worker_credentials: bool) -> Self {
        S3Clients {
            secrets,
            allow_worker_credentials,
            cache: Arc::default(),
        }
    }

    /// The Secrets this reads credentials from.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// A client for `endpoint` as a resource of `namespace` may use it.
    pub async fn client(
        &self,
        namespace: &str,
        endpoint: &Endpoint,
    ) -> Result<aws_sdk_s3::Client, CredentialsError> {
        let key = (namespace.to_string(), endpoint.clone());
        if let Some((at, c)) = self.cache.lock().ok().and_then(|m| m.get(&key).cloned())
            && at.elapsed() < SECRET_TTL
        {
            return Ok(c);
        }
        let credentials = self.credentials(namespace, endpoint).await?;
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(Region::new(endpoint.region.clone()))
            .force_path_style(endpoint.force_path_style)
            // Stowage sends its own per-part checksum; letting the SDK add a
            // second one costs CPU and some stores (Garage) reject it.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        config = match credentials {
            Some(c) => config.credentials_provider(c),
            None => config.allow_no_auth(),
        };
        if let Some(url) = &endpoint.endpoint {
            config = config.endpoint_url(url);
        }
        let client = aws_sdk_s3::Client::from_conf(config.build());
        if let Ok(mut m) = self.cache.lock() {
            m.retain(|_, (at, _)| at.elapsed() < SECRET_TTL);
            m.insert(key, (Instant::now(), client.clone()));
        }
        Ok(client)
    }

    async fn credentials(
        &self,
        namespace: &str,
        endpoint: &Endpoint,
    ) -> Result<Option<Credentials>, CredentialsError> {
        if let Some(r) = &endpoint.credentials_secret_ref {
            let secret = self.secrets.get(namespace, &r.name).await?;
            return Ok(Some(Credentials::new(
                secret.value(ACCESS_KEY_ID)?,
                secret.value(SECRET_ACCESS_KEY)?,
                None,
                None,
                "stowage",
            )));
        }
        if !endpoint.use_worker_credentials {
            return Ok(None); // anonymous: public buckets
        }
        if !self.allow_worker_credentials {
            return Err(CredentialsError::WorkerCredentialsRefused);
        }
        match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(id), Ok(secret)) => Ok(Some(Credentials::new(
                id,
                secret,
                std::env::var("AWS_SESSION_TOKEN").ok(),
                None,
                "stowage-worker",
            ))),
            _ => Err(CredentialsError::Other(
                "the resource asks for the worker's own credentials, but the worker has no \
                 AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                    .into(),
            )),
        }
    }
}
