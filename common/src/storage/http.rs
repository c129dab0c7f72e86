//! The HTTP client under every S3 client: the address policy of
//! [`crate::net`] applied to what the endpoint's name resolves to (a DNS
//! name pointing at the cluster's network is refused, not only IP
//! literals), and TLS that trusts the system's roots plus an optional CA
//! bundle (`--s3-ca-file`) for stores with a private CA.

use std::net::IpAddr;

use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use aws_smithy_runtime_api::client::dns::{DnsFuture, ResolveDns, ResolveDnsError};
use aws_smithy_runtime_api::client::http::SharedHttpClient;

use crate::net;

/// Resolves names and refuses addresses outside the policy.
#[derive(Clone, Debug)]
struct GuardedDns {
    allow_private: bool,
}

impl ResolveDns for GuardedDns {
    fn resolve_dns<'a>(&'a self, name: &'a str) -> DnsFuture<'a> {
        let allow = self.allow_private;
        DnsFuture::new(async move {
            let addrs: Vec<IpAddr> = tokio::net::lookup_host((name, 0))
                .await
                .map_err(ResolveDnsError::new)?
                .map(|a| a.ip())
                .collect();
            for a in &addrs {
                net::check(name, *a, allow).map_err(ResolveDnsError::new)?;
            }
            Ok(addrs)
        })
    }
}

/// An HTTPS-capable client for S3 endpoints held to the policy, trusting
/// the system's roots and `ca_pem` (PEM, any number of certificates).
pub fn client(allow_private: bool, ca_pem: Option<&[u8]>) -> SharedHttpClient {
    let mut trust = TrustStore::default();
    if let Some(pem) = ca_pem {
        trust = trust.with_pem_certificate(pem.to_vec());
    }
    let context = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .unwrap_or_default();
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(context)
        .build_with_resolver(GuardedDns { allow_private })
}
