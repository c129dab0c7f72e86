//! Where bytes come from: objects in any S3-compatible bucket, or HTTP(S)
//! URLs. Both are streamed; nothing holds a whole file in memory.

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use stowage_common::spec::{S3Source, UploadSource};

use super::UploadError;
use super::net;
use crate::s3::{S3Clients, s3_error};

/// An opened source: its size when the source tells it, and its bytes.
pub struct SourceBody {
    pub size: Option<u64>,
    pub stream: BoxStream<'static, Result<Bytes, UploadError>>,
}

/// A job's source, ready to open items.
#[derive(Clone)]
pub enum Source {
    S3 {
        spec: S3Source,
        client: aws_sdk_s3::Client,
    },
    Http {
        allow_private_networks: bool,
        client: reqwest::Client,
    },
}

impl Source {
    pub fn new(
        spec: &UploadSource,
        clients: &S3Clients,
        http_clients: &net::HttpClients,
    ) -> Result<Self, UploadError> {
        match (&spec.s3, &spec.http) {
            (Some(s3), None) => Ok(Source::S3 {
                client: clients.client(&s3.endpoint)?,
                spec: s3.clone(),
            }),
            (None, Some(http)) => Ok(Source::Http {
                client: http_clients
                    .get(http.allow_private_networks)
                    .map_err(|e| UploadError::Invalid(format!("HTTP client: {e}")))?,
                // Not the URL list: a job's spec can list thousands.
                allow_private_networks: http.allow_private_networks,
            }),
            _ => Err(UploadError::Invalid(
                "source: exactly one of s3 or http must be set".into(),
            )),
        }
    }

    /// Opens `source_ref` (an object key or a URL) for streaming.
    pub async fn open(&self, source_ref: &str) -> Result<SourceBody, UploadError> {
        match self {
            Source::S3 { spec, client } => {
                let out = client
                    .get_object()
                    .bucket(&spec.bucket)
                    .key(source_ref)
                    .send()
                    .await
                    .map_err(|e| s3_error("GetObject (source)", e))?;
                let size = out.content_length().and_then(|n| u64::try_from(n).ok());
                let key = source_ref.to_string();
                let stream = futures::stream::try_unfold(out.body, move |mut body| {
                    let key = key.clone();
                    async move {
                        match body.try_next().await {
                            Ok(Some(chunk)) => Ok(Some((chunk, body))),
                            Ok(None) => Ok(None),
                            Err(e) => Err(UploadError::SourceRead {
                                source_ref: key,
                                message: e.to_string(),
                            }),
                        }
                    }
                });
                Ok(SourceBody {
                    size,
                    stream: stream.boxed(),
                })
            }
            Source::Http {
                allow_private_networks,
                client,
            } => {
                let url = reqwest::Url::parse(source_ref)
                    .map_err(|e| UploadError::Invalid(format!("{source_ref:?}: {e}")))?;
                net::check_literal(&url, *allow_private_networks)
                    .map_err(|e| UploadError::Refused(e.to_string()))?;
                let resp = client
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| http_error(source_ref, e))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(UploadError::SourceStatus {
                        source_ref: source_ref.to_string(),
                        status: status.as_u16(),
                    });
                }
                let size = resp.content_length();
                let url = source_ref.to_string();
                let stream = resp
                    .bytes_stream()
                    .map_err(move |e| UploadError::SourceRead {
                        source_ref: url.clone(),
                        message: e.to_string(),
                    });
                Ok(SourceBody {
                    size,
                    stream: stream.boxed(),
                })
            }
        }
    }
}

fn http_error(source_ref: &str, e: reqwest::Error) -> UploadError {
    // A refused address surfaces as the resolver's error somewhere in the chain.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(refused) = c.downcast_ref::<net::AddressRefused>() {
            return UploadError::Refused(refused.to_string());
        }
        cause = c.source();
    }
    UploadError::SourceRead {
        source_ref: source_ref.to_string(),
        message: format!("{}", ErrorChain(&e)),
    }
}

struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Cuts a byte stream into parts of exactly `part_size` bytes (the last one
/// shorter), holding at most one part in memory.
pub struct PartReader {
    stream: BoxStream<'static, Result<Bytes, UploadError>>,
    part_size: usize,
    carry: Bytes,
    done: bool,
}

impl PartReader {
    pub fn new(stream: BoxStream<'static, Result<Bytes, UploadError>>, part_size: usize) -> Self {
        PartReader {
            stream,
            part_size,
            carry: Bytes::new(),
            done: false,
        }
    }

    /// The next part, or `None` at the end of the source.
    pub async fn next_part(&mut self) -> Result<Option<Bytes>, UploadError> {
        // A chunk that alone fills a part is passed on without copying.
        if self.carry.len() >= self.part_size {
            return Ok(Some(self.carry.split_to(self.part_size)));
        }
        let mut buf = BytesMut::with_capacity(self.part_size);
        buf.extend_from_slice(&std::mem::take(&mut self.carry));
        while buf.len() < self.part_size && !self.done {
            match self.stream.next().await {
                Some(chunk) => {
                    let mut chunk = chunk?;
                    let room = self.part_size - buf.len();
                    if chunk.len() > room {
                        self.carry = chunk.split_off(room);
                    }
                    buf.extend_from_slice(&chunk);
                }
                None => self.done = true,
            }
        }
        if buf.is_empty() {
            Ok(None)
        } else {
            Ok(Some(buf.freeze()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(chunks: Vec<&'static [u8]>) -> BoxStream<'static, Result<Bytes, UploadError>> {
        futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from_static(c)))).boxed()
    }

    #[tokio::test]
    async fn parts_have_exact_sizes_whatever_the_chunking() {
        let mut r = PartReader::new(
            stream_of(vec![b"abc", b"defgh", b"", b"ijklmnopq", b"r"]),
            4,
        );
        let mut parts = Vec::new();
        while let Some(p) = r.next_part().await.expect("no error") {
            parts.push(String::from_utf8(p.to_vec()).expect("utf8"));
        }
        assert_eq!(parts, ["abcd", "efgh", "ijkl", "mnop", "qr"]);
    }

    #[tokio::test]
    async fn empty_source_has_no_parts() {
        let mut r = PartReader::new(stream_of(vec![]), 4);
        assert!(r.next_part().await.expect("no error").is_none());
    }
}
