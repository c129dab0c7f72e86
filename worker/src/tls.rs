//! TLS of the gRPC server, terminated here (in front of tonic) so that the
//! certificate can change under a running worker: the certificate and key
//! files are looked at on every handshake and read again when either
//! changed (a renewed Secret, cert-manager), so new connections get the new
//! certificate without a restart; connections already open keep theirs. A
//! pair that does not load (half written, a key that does not fit) leaves
//! the previous one in use and is tried again when the files change again.
//!
//! With a client CA, every client must present a certificate it signed
//! (health included: the whole port is TLS). The client CA is read at
//! start-up only.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::Stream;
use stowage_common::tls::rustls::ServerConfig;
use stowage_common::tls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use stowage_common::tls::rustls::sign::CertifiedKey;
use stowage_common::tls::{self, Identity, TlsError};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::config::WorkerArgs;

/// How long a client may take to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The gRPC server's TLS settings, loaded.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
}

impl ServerTls {
    /// From `--grpc-tls-cert`, `--grpc-tls-key` and `--grpc-tls-client-ca`;
    /// `None` (plaintext) without a certificate.
    pub fn from_args(args: &WorkerArgs) -> Result<Option<ServerTls>, TlsError> {
        match (&args.grpc_tls_cert, &args.grpc_tls_key) {
            (Some(cert), Some(key)) => {
                ServerTls::new(cert, key, args.grpc_tls_client_ca.as_deref()).map(Some)
            }
            (None, None) if args.grpc_tls_client_ca.is_none() => Ok(None),
            _ => Err(TlsError::Config(
                "--grpc-tls-cert and --grpc-tls-key go together (and --grpc-tls-client-ca \
                 needs them)"
                    .into(),
            )),
        }
    }

    /// Reads the files now, so that a wrong path or a key that does not fit
    /// stops the worker at start-up.
    pub fn new(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, TlsError> {
        let provider = tls::provider();
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(format!("TLS protocol versions: {e}")))?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    tls::read_roots(ca)
                        .map_err(|e| TlsError::Config(format!("--grpc-tls-client-ca: {e}")))?,
                    provider,
                )
                .build()
                .map_err(|e| TlsError::Config(format!("--grpc-tls-client-ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let resolver = ReloadingCert::new(cert, key)?;
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The listener's connections after their handshakes, for tonic's
    /// `serve_with_incoming`. Handshakes run concurrently, each bounded by
    /// [`HANDSHAKE`]; one that fails is logged and dropped. Accepting stops
    /// when the server drops the stream.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> + use<> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, say: let it pass.
                        warn!(error = %e, "gRPC server cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "gRPC TLS handshake failed"),
                        Err(_) => debug!(%peer, "gRPC TLS handshake timed out"),
                    }
                });
            }
        });
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
    }
}

/// What tells that a file changed: modification time, size and inode (a
/// Secret volume swaps a symlink; an editor renames over the file).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0;
    Some((meta.modified().ok()?, meta.len(), ino))
}

/// Serves the certificate of two files, read again when they change.
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Stamp, Stamp, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    fn new(cert: &Path, key: &Path) -> Result<ReloadingCert, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let loaded = load(cert, key)?;
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: Mutex::new((stamps.0, stamps.1, loaded)),
        })
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        let mut current = self.current.lock().ok()?;
        if (current.0, current.1) != stamps {
            // Remembered even if loading fails: tried again on the next change.
            (current.0, current.1) = stamps;
            match load(&self.cert, &self.key) {
                Ok(loaded) => {
                    info!(cert = %self.cert.display(), "gRPC TLS certificate reloaded");
                    current.2 = loaded;
                }
                Err(e) => warn!(error = %e, "keeping the previous gRPC TLS certificate"),
            }
        }
        Some(Arc::clone(&current.2))
    }
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    Identity::read(cert, key)?
        .certified()
        .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
