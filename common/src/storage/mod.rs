//! S3 clients per (namespace, endpoint), and what their failures mean
//! ([`error`]). Credentials come from the Secret the endpoint names, read
//! in the resource's own namespace ([`crate::secrets`]); an endpoint that
//! names none is accessed anonymously (public buckets), and the worker's
//! own credentials are used only when the resource asks for them
//! (`useWorkerCredentials`) and the installation allows it.

pub mod error;
pub mod http;
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

/// Why no client could be made for an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The address policy refuses the endpoint.
    #[error("{0}")]
    Refused(String),
}

/// What an installation allows endpoints to do.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// May a resource use this process's own `AWS_*` credentials
    /// (`useWorkerCredentials`)?
    pub allow_worker_credentials: bool,
    /// May a resource reach private networks (`allowPrivateNetworks`)?
    pub allow_private_networks: bool,
    /// A CA bundle (PEM) trusted for S3 endpoints besides the system's.
    pub ca_bundle: Option<Vec<u8>>,
}

/// Where the endpoints of resources may go (flags of the operator and the
/// workers).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EndpointArgs {
    /// Let resources reach loopback, private (RFC 1918/4193), link-local and
    /// other non-public addresses where they ask for it
    /// (`allowPrivateNetworks` on an HTTP source, an S3 endpoint or an
    /// embedding endpoint). Off by default: in a cluster those are its own
    /// services.
    #[arg(
        long,
        env = "STOWAGE_ALLOW_PRIVATE_NETWORKS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub allow_private_networks: bool,

    /// A CA bundle (PEM) to trust for S3 endpoints, besides the system's
    /// roots (a store with a private CA).
    #[arg(long, env = "STOWAGE_S3_CA_FILE")]
    pub s3_ca_file: Option<std::path::PathBuf>,
}

impl EndpointArgs {
    /// The installation's policy, with `allow_worker_credentials`.
    pub fn policy(&self, allow_worker_credentials: bool) -> Result<Policy, String> {
        let ca_bundle = match &self.s3_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| format!("cannot read the S3 CA file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        Ok(Policy {
            allow_worker_credentials,
            allow_private_networks: self.allow_private_networks,
            ca_bundle,
        })
    }
}

/// Builds and caches one client per (namespace, endpoint); a client is
/// rebuilt when its Secret may have changed (after [`SECRET_TTL`]).
#[derive(Clone)]
pub struct S3Clients {
    secrets: Secrets,
    policy: Arc<Policy>,
    /// The HTTP clients (public addresses only; any), built once.
    http: [aws_smithy_runtime_api::client::http::SharedHttpClient; 2],
    cache: Arc<Mutex<HashMap<(String, Endpoint), Built>>>,
}

/// A client built at some instant (its Secret as read then).
type Built = (Instant, aws_sdk_s3::Client);

impl S3Clients {
    pub fn new(secrets: Secrets, policy: Policy) -> Self {
        let ca = policy.ca_bundle.as_deref();
        S3Clients {
            secrets,
            http: [http::client(false, ca), http::client(true, ca)],
            policy: Arc::new(policy),
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
    ) -> Result<aws_sdk_s3::Client, ClientError> {
        let key = (namespace.to_string(), endpoint.clone());
        if let Some((at, c)) = self.cache.lock().ok().and_then(|m| m.get(&key).cloned())
            && at.elapsed() < SECRET_TTL
        {
            return Ok(c);
        }
        if endpoint.allow_private_networks && !self.policy.allow_private_networks {
            return Err(ClientError::Refused(
                "the endpoint asks for private networks (allowPrivateNetworks), which this \
                 installation does not allow (--allow-private-networks)"
                    .into(),
            ));
        }
        let allow_private = endpoint.allow_private_networks;
        if let Some(url) = &endpoint.endpoint
            && let Ok(parsed) = url::Url::parse(url)
        {
            crate::net::check_url(&parsed, allow_private)
                .map_err(|e| ClientError::Refused(e.to_string()))?;
        }
        let credentials = self.credentials(namespace, endpoint).await?;
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(Region::new(endpoint.region.clone()))
            .http_client(self.http[usize::from(allow_private)].clone())
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
        if !self.policy.allow_worker_credentials {
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
