//! One local file streamed to a worker's `Ingest.Upload`: hashed first (the
//! worker completes the object only if the bytes it received hash to the
//! same), named by a request id derived from the file and its destination,
//! so that running the same command again finds what an interrupted run
//! stored (`Ingest.Status`) and sends only the rest.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use stowage_proto::v1::ingest_client::IngestClient;
use stowage_proto::v1::upload_request::Message;
use stowage_proto::v1::{
    IngestConflictPolicy, IngestDeleteRequest, IngestDestination, IngestState, IngestStatusRequest,
    UploadHeader, UploadRequest, UploadResponse,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::progress::FileBar;
use crate::grpc::authorized;
use crate::token::Token;

/// Bytes per data message (the worker takes up to 4 MiB by default).
const CHUNK: usize = 1 << 20;

/// Where files go: a bucket and key prefix, and the store's settings as an
/// UploadJob's destination takes them.
#[derive(Clone, Debug)]
pub struct Destination {
    pub namespace: String,
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub credentials: Option<String>,
    pub region: String,
    pub allow_private_networks: bool,
    pub conflict: IngestConflictPolicy,
    pub dedup: bool,
}

impl Destination {
    fn of(&self, key: &str) -> IngestDestination {
        IngestDestination {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            endpoint: self.endpoint.clone().unwrap_or_default(),
            region: self.region.clone(),
            virtual_hosted_style: false,
            credentials_secret: self.credentials.clone().unwrap_or_default(),
            use_worker_credentials: false,
            allow_private_networks: self.allow_private_networks,
        }
    }

    /// The key of `relative` (a path inside the uploaded folder, `/`-separated).
    pub fn key(&self, relative: &str) -> String {
        match self.prefix.as_str() {
            "" => relative.to_string(),
            p if p.ends_with('/') => format!("{p}{relative}"),
            p => format!("{p}/{relative}"),
        }
    }
}

/// A local file and the key it goes to.
#[derive(Clone, Debug)]
pub struct LocalFile {
    pub path: PathBuf,
    pub key: String,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl LocalFile {
    pub fn stat(path: &Path, key: String) -> anyhow::Result<LocalFile> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
        Ok(LocalFile {
            path: path.to_path_buf(),
            key,
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
        })
    }
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

/// What became of one file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Uploaded {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub version: u32,
    pub deduplicated: bool,
    pub skipped: bool,
    /// Finished by an earlier run: answered again, nothing sent.
    pub replayed: bool,
    pub bytes_sent: u64,
    /// Bytes an earlier, interrupted run stored and this one did not send.
    pub bytes_resumed: u64,
}

#[derive(Clone)]
pub struct Client {
    grpc: IngestClient<Channel>,
    token: Option<Token>,
    pub dest: Destination,
    /// Calls per file before it counts as failed (a dropped connection, a
    /// busy key, a worker restart).
    pub attempts: u32,
}

/// A worker answer after which the same request can go on.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
    )
}

impl Client {
    pub fn new(
        channel: Channel,
        token: Option<Token>,
        dest: Destination,
        max_message: usize,
    ) -> Self {
        Client {
            grpc: IngestClient::new(channel).max_encoding_message_size(max_message),
            token,
            dest,
            attempts: 5,
        }
    }

    fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        authorized(message, self.token.as_ref())
    }

    /// Uploads `file`, resuming what an earlier run of the same file stored.
    pub async fn upload(&self, file: &LocalFile, bar: &FileBar) -> anyhow::Result<Uploaded> {
        bar.message("hashing");
        let sha256 = hash_file(&file.path).await?;
        let request_id = self.request_id(file, &sha256);
        let mut last = None;
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                let delay = Duration::from_millis(250 << (attempt - 2).min(5));
                tokio::time::sleep(delay).await;
            }
            let offset = match self.resume_point(&request_id).await {
                Ok(Resume::Done(r)) => {
                    bar.set_position(file.size);
                    return Ok(uploaded(r, true));
                }
                Ok(Resume::At(offset)) => offset,
                Err(status) if retryable(status.code()) => {
                    last = Some(status);
                    continue;
                }
                Err(status) => return Err(self.refused("Ingest.Status", &status)),
            };
            bar.set_position(offset);
            bar.message(if offset > 0 { "resuming" } else { "" });
            match self.send(file, &request_id, &sha256, offset, bar).await {
                Ok(r) => return Ok(uploaded(r, false)),
                Err(status) if retryable(status.code()) => {
                    bar.message("retrying");
                    last = Some(status);
                }
                Err(status) => return Err(self.refused("Ingest.Upload", &status)),
            }
        }
        let status = last.unwrap_or_else(|| Status::unknown("no attempt made"));
        Err(self.refused(
            &format!("Ingest.Upload ({} attempts)", self.attempts),
            &status,
        ))
    }

    fn refused(&self, what: &str, status: &Status) -> anyhow::Error {
        crate::grpc::refused(what, status, self.token.as_ref())
    }

    /// Same file content, size, time and destination: the same request.
    fn request_id(&self, file: &LocalFile, sha256: &str) -> String {
        let d = &self.dest;
        let mut h = Sha256::new();
        for part in [
            d.namespace.as_str(),
            d.endpoint.as_deref().unwrap_or(""),
            &d.bucket,
            &file.key,
            sha256,
            &file.size.to_string(),
            &file.mtime_ns.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        format!("stowctl-{}", &hex(&h.finalize())[..40])
    }

    async fn resume_point(&self, request_id: &str) -> Result<Resume, Status> {
        let request = self
            .request(IngestStatusRequest {
                namespace: self.dest.namespace.clone(),
                request_id: request_id.to_string(),
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.grpc.clone().status(request).await {
            Ok(s) => {
                let s = s.into_inner();
                match IngestState::try_from(s.state) {
                    Ok(IngestState::Succeeded | IngestState::Skipped) => {
                        Ok(Resume::Done(s.result.unwrap_or_default()))
                    }
                    Ok(IngestState::Failed) => Ok(Resume::At(0)),
                    _ => Ok(Resume::At(s.resume_offset)),
                }
            }
            Err(s) if s.code() == Code::NotFound => Ok(Resume::At(0)),
            Err(s) => Err(s),
        }
    }

    async fn send(
        &self,
        file: &LocalFile,
        request_id: &str,
        sha256: &str,
        offset: u64,
        bar: &FileBar,
    ) -> Result<UploadResponse, Status> {
        let header = UploadHeader {
            request_id: request_id.to_string(),
            namespace: self.dest.namespace.clone(),
            destination: Some(self.dest.of(&file.key)),
            size: file.size,
            content_type: content_type(&file.key).into(),
            sha256: sha256.to_string(),
            conflict_policy: self.dest.conflict as i32,
            dedup: self.dest.dedup,
            offset,
        };
        let mut f = tokio::fs::File::open(&file.path).await.map_err(|e| {
            Status::failed_precondition(format!("cannot open {}: {e}", file.path.display()))
        })?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| {
                Status::failed_precondition(format!("cannot seek in {}: {e}", file.path.display()))
            })?;
        let remaining = file.size - offset;
        let bar = bar.clone();
        let data = futures::stream::unfold((f, remaining), move |(mut f, left)| {
            let bar = bar.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let mut buf = vec![0u8; CHUNK.min(left as usize)];
                // A short read (the file shrank) ends the stream: the worker
                // answers that it got fewer bytes than announced.
                let n = f.read_exact(&mut buf).await.ok()?;
                bar.inc(n as u64);
                let message = UploadRequest {
                    message: Some(Message::Data(buf)),
                };
                Some((message, (f, left - n as u64)))
            }
        });
        let first = futures::stream::once(async move {
            UploadRequest {
                message: Some(Message::Header(header)),
            }
        });
        use futures::StreamExt;
        let request = self
            .request(first.chain(data))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.grpc
            .clone()
            .upload(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Deletes the object at `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> anyhow::Result<bool> {
        let request = self.request(IngestDeleteRequest {
            namespace: self.dest.namespace.clone(),
            destination: Some(self.dest.of(key)),
        })?;
        match self.grpc.clone().delete(request).await {
            Ok(r) => Ok(r.into_inner().existed),
            Err(s) => Err(self.refused("Ingest.Delete", &s)),
        }
    }
}

enum Resume {
    Done(UploadResponse),
    At(u64),
}

fn uploaded(r: UploadResponse, replayed: bool) -> Uploaded {
    Uploaded {
        key: r.key,
        size: r.size,
        sha256: r.sha256,
        version: r.version,
        deduplicated: r.deduplicated,
        skipped: r.skipped,
        replayed,
        bytes_sent: r.bytes_received,
        bytes_resumed: r.bytes_resumed,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of a file, read on a blocking thread.
pub async fn hash_file(path: &Path) -> anyhow::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex(&h.finalize()))
    })
    .await
    .context("hashing thread")?
}

/// A Content-Type from the key's extension (the common document types).
pub fn content_type(key: &str) -> &'static str {
    let ext = key.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("txt" | "text" | "log") => "text/plain",
        Some("md" | "markdown") => "text/markdown",
        Some("html" | "htm") => "text/html",
        Some("pdf") => "application/pdf",
        Some("json") => "application/json",
        Some("csv") => "text/csv",
        Some("xml") => "application/xml",
        Some("yaml" | "yml") => "application/yaml",
        Some("rst") => "text/x-rst",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_join_the_prefix_once() {
        let mut d = Destination {
            namespace: "default".into(),
            bucket: "b".into(),
            prefix: String::new(),
            endpoint: None,
            credentials: None,
            region: "us-east-1".into(),
            allow_private_networks: false,
            conflict: IngestConflictPolicy::Overwrite,
            dedup: false,
        };
        assert_eq!(d.key("a/b.md"), "a/b.md");
        d.prefix = "docs".into();
        assert_eq!(d.key("a/b.md"), "docs/a/b.md");
        d.prefix = "docs/".into();
        assert_eq!(d.key("a/b.md"), "docs/a/b.md");
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("a/B.MD"), "text/markdown");
        assert_eq!(content_type("x.pdf"), "application/pdf");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
