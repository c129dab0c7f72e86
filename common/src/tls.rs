//! TLS shared by every connection Stowage makes or serves: PostgreSQL (the
//! pool and the lock sessions), NATS, and the worker's gRPC API.
//!
//! - One crypto provider, aws-lc-rs (the one kube and the AWS SDK already
//!   use), always passed explicitly: ring is in the tree too (async-nats),
//!   so rustls cannot pick a process default by itself.
//! - PEM files are read here, with errors that name the file.
//! - A server is verified at one of three strengths ([`Verify`]), the ones
//!   libpq's `sslmode` names: not at all (still encrypted), the chain to a
//!   CA only, or the chain and the name the server was reached by.
//! - [`explain`] turns a failed handshake, found anywhere in an error's
//!   chain, into a sentence that says which server, which CA and what to do.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

pub use rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} holds no PEM {expected}", path.display())]
    NoPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the {what} {} is not valid PEM: {message}", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("the CA file {}: {message}", path.display())]
    BadCa { path: PathBuf, message: String },
    #[error("the key {} does not go with the certificate {}: {message}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

/// The crypto provider of every TLS configuration Stowage builds. Also
/// made the process default (when none is yet), so that a library that
/// builds its own configuration does not panic for want of one.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let _ = provider.clone().install_default();
        Arc::new(provider)
    }))
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of a PEM file; `what` names the file in errors
/// ("CA file", "certificate file").
pub fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            what,
            path: path.to_path_buf(),
            expected: "certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "key file";
    let pem = read(path, what)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPem {
            what,
            path: path.to_path_buf(),
            expected: "private key (PKCS#8, PKCS#1 or SEC1)",
        },
        e => TlsError::BadPem {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    })
}

/// The trust anchors of a CA bundle.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in read_certs(path, "CA file")?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            message: format!("certificate {} is not a usable CA certificate: {e}", i + 1),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The operating system's CA certificates (for servers with public
/// certificates, when no CA file is given).
pub fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(TlsError::Config(format!(
            "no system CA certificates found{}; give a CA file",
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            }
        )));
    }
    Ok(Arc::new(roots))
}

/// A certificate chain and its key, as a client or server presents them.
#[derive(Clone, Debug)]
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl Identity {
    /// Reads both files and checks that the key belongs to the certificate.
    pub fn read(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let certs = read_certs(cert, "certificate file")?;
        let private = read_key(key)?;
        let identity = Identity {
            certs,
            key: Arc::new(private),
        };
        identity.certified().map_err(|e| TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(identity)
    }

    /// The signing form rustls serves or presents.
    pub fn certified(&self) -> Result<Arc<CertifiedKey>, rustls::Error> {
        CertifiedKey::from_der(self.certs.clone(), self.key.clone_key(), &provider()).map(Arc::new)
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// How a client checks the server's certificate.
#[derive(Clone, Debug)]
pub enum Verify {
    /// Encrypt, but accept any certificate (libpq's `sslmode=require`
    /// without a root certificate): protects against listening, not against
    /// someone in the middle.
    Nothing,
    /// The chain must lead to one of these CAs; the name is not checked
    /// (`sslmode=verify-ca`).
    Chain(Arc<RootCertStore>),
    /// The chain, and the certificate must name the host that was dialled
    /// (`sslmode=verify-full`, and what NATS and gRPC clients do).
    Full(Arc<RootCertStore>),
}

/// A client configuration: this verification, and a client certificate
/// when the server asks for one.
pub fn client_config(
    verify: &Verify,
    identity: Option<&Identity>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(format!("TLS protocol versions: {e}")))?;
    let builder = match verify {
        Verify::Full(roots) => {
            let verifier = WebPkiServerVerifier::builder_with_provider(
                Arc::clone(roots),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| TlsError::Config(format!("certificate verifier: {e}")))?;
            builder.with_webpki_verifier(verifier)
        }
        Verify::Chain(roots) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: Arc::clone(roots),
                provider,
            })),
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider })),
    };
    match identity {
        Some(id) => builder
            .with_client_auth_cert(id.certs.clone(), id.key())
            .map_err(|e| TlsError::Config(format!("client certificate: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Accepts any certificate; still checks that the server holds its key.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks the chain to the CAs and the validity dates, not the name.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls error somewhere in `err`'s chain (also inside an
/// `io::Error`, whose `source()` skips what it wraps).
pub fn find_rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            let inner: &(dyn StdError + 'static) = inner;
            if let Some(found) = find_rustls_error(inner) {
                return Some(found);
            }
        }
        next = e.source();
    }
    None
}

/// A failed handshake in `err`'s chain, said plainly: `peer` names the
/// server ("the PostgreSQL server"), `trusted` what its certificate was
/// checked against ("the CA in sslrootcert=/etc/ca.pem"). `None` when the
/// error is not a TLS one.
pub fn explain(err: &(dyn StdError + 'static), peer: &str, trusted: &str) -> Option<String> {
    let e = find_rustls_error(err)?;
    Some(match e {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!("{peer}'s certificate is not signed by {trusted} ({e})"),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "{peer}'s certificate does not name the host it was reached by ({e}); \
             connect by a name the certificate lists"
        ),
        rustls::Error::InvalidCertificate(_) => {
            format!("{peer}'s certificate was refused ({e})")
        }
        rustls::Error::AlertReceived(alert) => format!(
            "{peer} ended the TLS handshake ({alert:?}): it may want a client certificate, \
             or not trust the one given"
        ),
        rustls::Error::NoCertificatesPresented => {
            format!("{peer} presented no certificate")
        }
        other => format!("TLS with {peer} failed: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn files_are_named_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pem");
        let e = read_roots(&missing).expect_err("missing file").to_string();
        assert!(e.starts_with("cannot read the CA file "), "{e}");
        assert!(e.contains("nope.pem"), "{e}");

        let empty = write(dir.path(), "empty.pem", "not a pem file\n");
        let e = read_roots(&empty).expect_err("no certificate").to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = read_key(&empty).expect_err("no key").to_string();
        assert!(e.contains("holds no PEM private key"), "{e}");
    }

    #[test]
    fn a_key_that_does_not_fit_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = rcgen::generate_simple_self_signed(vec!["one".into()]).expect("cert");
        let two = rcgen::generate_simple_self_signed(vec!["two".into()]).expect("cert");
        let cert = write(dir.path(), "one.crt", &one.cert.pem());
        let key = write(dir.path(), "two.key", &two.signing_key.serialize_pem());
        let e = Identity::read(&cert, &key)
            .expect_err("mismatch")
            .to_string();
        assert!(e.contains("does not go with the certificate"), "{e}");
        let key = write(dir.path(), "one.key", &one.signing_key.serialize_pem());
        Identity::read(&cert, &key).expect("matching pair");
    }

    #[test]
    fn handshake_errors_in_io_errors_are_explained() {
        let inner = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let text = explain(&io, "the NATS server", "the CA in /ca.pem").expect("tls error");
        assert_eq!(
            text,
            "the NATS server's certificate is not signed by the CA in /ca.pem \
             (invalid peer certificate: UnknownIssuer)"
        );
        let plain = std::io::Error::other("connection refused");
        assert!(explain(&plain, "x", "y").is_none());
    }
}
