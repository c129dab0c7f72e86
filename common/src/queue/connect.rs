//! Reaching NATS: the URL, TLS (a CA file, a client certificate) and
//! credentials (a `.creds` file or an NKey seed file).
//!
//! TLS is required as soon as any TLS setting is given or a URL says
//! `tls://`, so that a CA file never silently ends up on a plaintext
//! connection. The first connection is retried for a while (NATS may be
//! starting beside us), except when it fails in a way that waiting does not
//! mend: a certificate refused, credentials refused.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};

use super::QueueError;
use crate::tls::{self, Identity, Verify};

/// How to reach NATS, and the prefix of every subject and stream.
#[derive(Clone, Debug, Default)]
pub struct NatsSettings {
    /// One URL or several, comma-separated (`nats://` or `tls://`).
    pub url: String,
    pub prefix: String,
    /// CA certificates (PEM) the server's certificate must chain to
    /// (without one: the system's CAs).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A credentials file (user JWT + NKey seed).
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey user seed.
    pub nkey_file: Option<PathBuf>,
}

impl NatsSettings {
    /// Plain settings: a URL and a prefix, nothing else.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        NatsSettings {
            url: url.into(),
            prefix: prefix.into(),
            ..Default::default()
        }
    }

    pub fn tls_required(&self) -> bool {
        self.tls_ca_file.is_some()
            || self.tls_cert.is_some()
            || self
                .url
                .split(',')
                .any(|u| u.trim().to_ascii_lowercase().starts_with("tls://"))
    }

    /// What the server's certificate is checked against, for messages.
    fn trusted(&self) -> String {
        match &self.tls_ca_file {
            Some(ca) => format!("the CA in --nats-tls-ca-file {}", ca.display()),
            None => "the system's CAs (no --nats-tls-ca-file given)".into(),
        }
    }
}

enum Credentials {
    None,
    /// The file's text, checked to parse.
    Creds(String),
    NKeySeed(String),
}

/// How long the first connection may take.
const FIRST_CONNECTION: Duration = Duration::from_secs(10);

pub(super) async fn client(s: &NatsSettings) -> Result<async_nats::Client, QueueError> {
    let settings_error = QueueError::Settings;
    let tls = if s.tls_required() {
        let verify = match &s.tls_ca_file {
            Some(ca) => Verify::Full(
                tls::read_roots(ca)
                    .map_err(|e| settings_error(format!("--nats-tls-ca-file: {e}")))?,
            ),
            None => Verify::Full(
                tls::system_roots().map_err(|e| settings_error(format!("NATS TLS: {e}")))?,
            ),
        };
        let identity = match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => Some(
                Identity::read(cert, key)
                    .map_err(|e| settings_error(format!("--nats-tls-cert/--nats-tls-key: {e}")))?,
            ),
            (None, None) => None,
            _ => {
                return Err(settings_error(
                    "--nats-tls-cert and --nats-tls-key go together".into(),
                ));
            }
        };
        Some(
            tls::client_config(&verify, identity.as_ref())
                .map_err(|e| settings_error(format!("NATS TLS: {e}")))?,
        )
    } else {
        // Used only if a server demands TLS anyway: async-nats would
        // otherwise build its own configuration.
        let roots = tls::system_roots()
            .unwrap_or_else(|_| std::sync::Arc::new(tls::rustls::RootCertStore::empty()));
        tls::client_config(&Verify::Full(roots), None).ok()
    };
    let credentials = match (&s.creds_file, &s.nkey_file) {
        (Some(_), Some(_)) => {
            return Err(settings_error(
                "give --nats-creds-file or --nats-nkey-file, not both".into(),
            ));
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                settings_error(format!(
                    "cannot read the NATS credentials file {}: {e}",
                    path.display()
                ))
            })?;
            ConnectOptions::new().credentials(&text).map_err(|e| {
                settings_error(format!(
                    "the NATS credentials file {} is not a user JWT and NKey seed as nsc \
                     writes them: {e}",
                    path.display()
                ))
            })?;
            Credentials::Creds(text)
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                settings_error(format!(
                    "cannot read the NATS NKey file {}: {e}",
                    path.display()
                ))
            })?;
            let seed = text
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("SU"))
                .unwrap_or_default()
                .to_string();
            nkeys::KeyPair::from_seed(&seed).map_err(|e| {
                settings_error(format!(
                    "the NATS NKey file {} holds no user seed (a line starting SU…): {e}",
                    path.display()
                ))
            })?;
            Credentials::NKeySeed(seed)
        }
        (None, None) => Credentials::None,
    };

    let deadline = tokio::time::Instant::now() + FIRST_CONNECTION;
    loop {
        let mut options = ConnectOptions::new()
            .name("stowage")
            .connection_timeout(Duration::from_secs(5));
        if let Some(config) = &tls {
            options = options
                .require_tls(s.tls_required())
                .tls_client_config(config.clone());
        }
        options = match &credentials {
            Credentials::None => options,
            Credentials::Creds(text) => options
                .credentials(text)
                .map_err(|e| settings_error(format!("NATS credentials: {e}")))?,
            Credentials::NKeySeed(seed) => options.nkey(seed.clone()),
        };
        let error = match options.connect(s.url.as_str()).await {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        if let Some(message) = tls::explain(&error, "the NATS server", &s.trusted()) {
            return Err(QueueError::Tls {
                url: s.url.clone(),
                message,
            });
        }
        let permanent = matches!(
            error.kind(),
            ConnectErrorKind::Tls
                | ConnectErrorKind::Authentication
                | ConnectErrorKind::AuthorizationViolation
                | ConnectErrorKind::ServerParse
        );
        if permanent || tokio::time::Instant::now() >= deadline {
            return Err(QueueError::Connect {
                url: s.url.clone(),
                source: error,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
