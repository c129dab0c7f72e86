//! stowctl's connection to a worker's gRPC API: plaintext for `http://`,
//! TLS for `https://` — the worker's certificate checked against a CA file
//! or the system's CAs, and a client certificate for a worker that asks for
//! one (`--grpc-tls-client-ca`).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use stowage_common::tls;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct WorkerTls {
    /// CA (PEM) that an `https://` worker's certificate must chain to;
    /// without it, the system's CAs.
    #[arg(long, env = "STOWAGE_WORKER_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM), for a worker that verifies its clients.
    #[arg(long, env = "STOWAGE_WORKER_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// Key (PEM) of --cert-file.
    #[arg(long, env = "STOWAGE_WORKER_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl WorkerTls {
    fn trusted(&self) -> String {
        match &self.ca_file {
            Some(ca) => format!("the CA in --ca-file {}", ca.display()),
            None => "the system's CAs (no --ca-file given)".into(),
        }
    }

    /// A failed call or connection, said plainly when TLS is why.
    pub fn explain(&self, url: &str, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
        if let Some(message) = tls::explain(e, "the worker", &self.trusted()) {
            return anyhow::anyhow!("cannot talk to the worker at {url}: {message}");
        }
        // A failed call: what went wrong beneath the status, if anything.
        let chain = match e.downcast_ref::<tonic::Status>() {
            Some(status) => match std::error::Error::source(status) {
                Some(source) => stowage_common::errors::chain(source),
                None => status.message().to_string(),
            },
            None => stowage_common::errors::chain(e),
        };
        // With TLS 1.3 a server judges the client's certificate after the
        // client's side of the handshake is done: a refusal shows up at the
        // first call, as an alert or only as a connection closed. A plaintext
        // client on a TLS port sees the same kind of abrupt end.
        let lower = chain.to_lowercase();
        let cut_off = [
            "connection closed",
            "broken pipe",
            "fatal alert",
            "frame with invalid size",
            "connection reset",
        ]
        .iter()
        .any(|t| lower.contains(t));
        let hint = if !cut_off {
            ""
        } else if url.starts_with("https://") {
            " — the worker ended the connection after the TLS handshake, as a worker started \
             with --grpc-tls-client-ca does to a client without a certificate its CA signed: \
             give --cert-file and --key-file"
        } else {
            " — is the worker serving TLS? then use an https:// URL"
        };
        anyhow::anyhow!("cannot talk to the worker at {url}: {chain}{hint}")
    }
}

/// A channel to the worker at `url`, connected (a refused certificate is
/// told here, not at the first call, where TLS allows).
pub async fn connect(url: &str, tls_args: &WorkerTls) -> anyhow::Result<Channel> {
    let https = url.starts_with("https://");
    if !https && (tls_args.ca_file.is_some() || tls_args.cert_file.is_some()) {
        bail!("--ca-file and --cert-file need an https:// worker URL, not {url}");
    }
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("{url} is not a worker URL (http://host:port or https://…)"))?;
    if https {
        // Every file is read and checked here first, for errors that name it.
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut config = ClientTlsConfig::new();
        config = match &tls_args.ca_file {
            Some(ca) => {
                tls::read_roots(ca).context("--ca-file")?;
                config.ca_certificate(Certificate::from_pem(read(ca)?))
            }
            None => config.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&tls_args.cert_file, &tls_args.key_file) {
            tls::Identity::read(cert, key).context("--cert-file/--key-file")?;
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(config)
            .context("the worker's TLS settings")?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| tls_args.explain(url, &e))
}

/// `message` with the caller's bearer token, if there is one.
pub fn authorized<T>(
    message: T,
    token: Option<&crate::token::Token>,
) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {}", token.value)
            .parse()
            .with_context(|| format!("the token from {} cannot be sent", token.source))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// A call the worker refused, with what to do about a missing or refused
/// token.
pub fn refused(
    what: &str,
    status: &tonic::Status,
    token: Option<&crate::token::Token>,
) -> anyhow::Error {
    let hint = match (status.code(), token) {
        (tonic::Code::Unauthenticated, None) => format!(
            " — no token was sent: give --token-file (a token for the audience \"stowage\", e.g. \
             `kubectl create token NAME --audience stowage`), mount one at {}, or use a \
             kubeconfig whose current user has a token",
            crate::token::PROJECTED_TOKEN
        ),
        (tonic::Code::Unauthenticated, Some(t)) => format!(" (the token from {})", t.source),
        (tonic::Code::PermissionDenied, Some(t)) => format!(
            " (the identity of the token from {} needs a Role granting {} in that namespace)",
            t.source,
            if what.starts_with("Ingest") {
                "`create` on uploadjobs.stowage.dev"
            } else {
                "`get` on indexcollections/search"
            }
        ),
        _ => String::new(),
    };
    anyhow::anyhow!("{what} failed: {}{hint}", status.message())
}
