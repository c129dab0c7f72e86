//! HTTP clients held to the address policy of [`stowage_common::net`]:
//! checked on the resolved addresses and on every redirect.

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
pub use stowage_common::net::{AddressRefused, check, non_public_kind};

/// A resolver that drops the connection attempt when a name resolves to a
/// refused address. Checking the resolved addresses (not the name) is what
/// defeats DNS names pointing at internal addresses; the connection then goes
/// to exactly the addresses that were checked.
#[derive(Clone)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                .collect();
            for a in &addrs {
                check(&host, a.ip(), allow)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The two HTTP clients a worker needs (private networks refused or
/// allowed), built once: building one loads TLS roots, which costs more CPU
/// than fetching a small file.
pub struct HttpClients {
    /// May resources reach private networks (`--allow-private-networks`)?
    permitted: bool,
    public_only: std::sync::OnceLock<reqwest::Client>,
    any: std::sync::OnceLock<reqwest::Client>,
}

impl HttpClients {
    /// `permitted`: whether this installation lets resources that ask for
    /// it reach private networks.
    pub fn new(permitted: bool) -> Self {
        HttpClients {
            permitted,
            public_only: Default::default(),
            any: Default::default(),
        }
    }

    pub fn get(&self, allow_private: bool) -> Result<reqwest::Client, super::UploadError> {
        if allow_private && !self.permitted {
            return Err(super::UploadError::Refused(
                "the source asks for private networks (allowPrivateNetworks), which this \
                 installation does not allow (--allow-private-networks)"
                    .into(),
            ));
        }
        let cell = if allow_private {
            &self.any
        } else {
            &self.public_only
        };
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        let client = http_client(allow_private)
            .map_err(|e| super::UploadError::Invalid(format!("HTTP client: {e}")))?;
        Ok(cell.get_or_init(|| client).clone())
    }
}

/// A client for embedding servers: the address policy on every resolved
/// address, and no redirect at all (it would carry the API key along).
pub fn embedder_client(allow_private: bool) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { allow_private }))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(120))
        .build()
}

/// An HTTP client for sources: guarded resolution, and redirects
/// re-checked (an IP literal in a `Location` bypasses the resolver).
pub fn http_client(allow_private: bool) -> Result<reqwest::Client, reqwest::Error> {
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 5 {
            return attempt.error("more than 5 redirects");
        }
        let url = attempt.url().clone();
        if let Err(e) = check_literal(&url, allow_private) {
            return attempt.error(e);
        }
        attempt.follow()
    });
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { allow_private }))
        .redirect(policy)
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(60))
        .build()
}

/// Refuses URLs whose host is an IP literal outside the policy (the resolver
/// never sees those).
pub fn check_literal(url: &reqwest::Url, allow_private: bool) -> Result<(), AddressRefused> {
    stowage_common::net::check_url(url, allow_private)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_hosts_are_checked() {
        let u = reqwest::Url::parse("http://169.254.169.254/latest/meta-data").expect("url");
        let e = check_literal(&u, false).expect_err("metadata service must be refused");
        assert!(e.to_string().contains("link-local"), "{e}");
    }
}
