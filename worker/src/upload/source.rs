//! Where bytes come from: objects in any S3-compatible bucket, or HTTP(S)
//! URLs. Both are streamed; nothing holds a whole file in memory.

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use stowage_common::spec::{S3Source, UploadSource};

use stowage_common::errors::chain;
use stowage_common::redact;

use super::UploadError;
use super::net;
use stowage_common::storage::{S3Clients, s3_error};

/// An opened source: its size when the source tells it, the validator of
/// the version it sends (if any), and its bytes.
pub struct SourceBody {
    pub size: Option<u64>,
    pub validator: Option<Validator>,
    pub stream: BoxStream<'static, Result<Bytes, UploadError>>,
}

/// A strong validator of the version a source sent: an HTTP `ETag` (weak
/// ones, `W/"…"`, cannot be used as preconditions) or else `Last-Modified`;
/// an S3 object's ETag. A ranged read of a resume asks for the same version
/// with it (`If-Match` / `If-Unmodified-Since`) and checks that the answer
/// carries it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validator {
    ETag(String),
    LastModified(String),
}

impl Validator {
    /// The form kept in PostgreSQL.
    pub fn encode(&self) -> String {
        match self {
            Validator::ETag(v) => format!("etag:{v}"),
            Validator::LastModified(v) => format!("last-modified:{v}"),
        }
    }

    pub fn decode(s: &str) -> Option<Validator> {
        if let Some(v) = s.strip_prefix("etag:") {
            Some(Validator::ETag(v.to_string()))
        } else {
            s.strip_prefix("last-modified:")
                .map(|v| Validator::LastModified(v.to_string()))
        }
    }

    fn from_http(headers: &reqwest::header::HeaderMap) -> Option<Validator> {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        match get(reqwest::header::ETAG) {
            Some(etag) if !etag.starts_with("W/") => Some(Validator::ETag(etag.to_string())),
            _ => {
                get(reqwest::header::LAST_MODIFIED).map(|d| Validator::LastModified(d.to_string()))
            }
        }
    }
}

/// The answer to a ranged read.
pub enum Ranged {
    /// The bytes asked for, of the version asked for.
    Partial(SourceBody),
    /// The source holds another version now (or another size): the reason.
    Changed(String),
    /// The source sent the whole body instead: it does not serve ranges.
    Unsupported,
}

/// A job's source, ready to open items.
#[derive(Clone)]
pub struct Source {
    kind: SourceKind,
    min_rate: MinRate,
}

#[derive(Clone)]
enum SourceKind {
    S3 {
        spec: S3Source,
        client: aws_sdk_s3::Client,
    },
    Http {
        allow_private_networks: bool,
        client: reqwest::Client,
    },
}

/// The slowest a source may send: below `bytes_per_sec` over `window` of
/// waiting on it, the read fails with that reason instead of holding a
/// worker slot for minutes (a stalled body, a trickle of bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinRate {
    pub bytes_per_sec: u64,
    pub window: std::time::Duration,
}

impl MinRate {
    /// No minimum.
    pub const OFF: MinRate = MinRate {
        bytes_per_sec: 0,
        window: std::time::Duration::from_secs(30),
    };
}

impl Source {
    /// The source of a job of `namespace` (whose Secrets it may use).
    pub async fn new(
        namespace: &str,
        spec: &UploadSource,
        clients: &S3Clients,
        http_clients: &net::HttpClients,
        min_rate: MinRate,
    ) -> Result<Self, UploadError> {
        let kind = match (&spec.s3, &spec.http) {
            (Some(s3), None) => SourceKind::S3 {
                client: clients.client(namespace, &s3.endpoint).await?,
                spec: s3.clone(),
            },
            (None, Some(http)) => SourceKind::Http {
                client: http_clients.get(http.allow_private_networks)?,
                // Not the URL list: a job's spec can list thousands.
                allow_private_networks: http.allow_private_networks,
            },
            _ => {
                return Err(UploadError::Invalid(
                    "source: exactly one of s3 or http must be set".into(),
                ));
            }
        };
        Ok(Source { kind, min_rate })
    }

    /// Opens `source_ref` (an object key or a URL) for streaming, its bytes
    /// held to the minimum rate.
    pub async fn open(&self, source_ref: &str) -> Result<SourceBody, UploadError> {
        let body = self.open_raw(source_ref).await?;
        Ok(SourceBody {
            size: body.size,
            validator: body.validator,
            stream: guarded(body.stream, body.size, source_ref, self.min_rate),
        })
    }

    /// Opens bytes `start..=end` of `source_ref`, a source of `total` bytes,
    /// provided it still is the version `validator` names (without one, the
    /// size is all that is checked here; the caller checks the bytes).
    pub async fn open_range(
        &self,
        source_ref: &str,
        start: u64,
        end: u64,
        total: u64,
        validator: Option<&Validator>,
    ) -> Result<Ranged, UploadError> {
        let range = format!("bytes={start}-{end}");
        let expected_range = format!("bytes {start}-{end}/{total}");
        let (content_range, answered, stream) = match &self.kind {
            SourceKind::S3 { spec, client } => {
                let etag = match validator {
                    Some(Validator::ETag(e)) => Some(e.clone()),
                    _ => None,
                };
                let out = match client
                    .get_object()
                    .bucket(&spec.bucket)
                    .key(source_ref)
                    .range(&range)
                    .set_if_match(etag)
                    .send()
                    .await
                {
                    Ok(out) => out,
                    Err(e) => {
                        let e = s3_error("GetObject (source range)", e);
                        return match e.status {
                            Some(412) => Ok(Ranged::Changed(
                                "its ETag is not the one recorded (412 Precondition Failed)".into(),
                            )),
                            Some(416) => Ok(Ranged::Changed(format!(
                                "it no longer has {total} bytes (416 Range Not Satisfiable)"
                            ))),
                            _ => Err(e.into()),
                        };
                    }
                };
                let Some(content_range) = out.content_range().map(str::to_string) else {
                    return Ok(Ranged::Unsupported);
                };
                let answered = out.e_tag().map(|e| Validator::ETag(e.to_string()));
                (content_range, answered, s3_stream(out.body, source_ref))
            }
            SourceKind::Http {
                allow_private_networks,
                client,
            } => {
                let url = reqwest::Url::parse(source_ref).map_err(|e| {
                    UploadError::Invalid(format!("{:?}: {e}", redact::url(source_ref)))
                })?;
                net::check_literal(&url, *allow_private_networks)
                    .map_err(|e| UploadError::Refused(e.to_string()))?;
                let mut req = client.get(url).header(reqwest::header::RANGE, &range);
                req = match validator {
                    Some(Validator::ETag(e)) => req.header(reqwest::header::IF_MATCH, e),
                    Some(Validator::LastModified(d)) => {
                        req.header(reqwest::header::IF_UNMODIFIED_SINCE, d)
                    }
                    None => req,
                };
                let resp = req.send().await.map_err(|e| http_error(source_ref, e))?;
                match resp.status().as_u16() {
                    206 => {}
                    200 => return Ok(Ranged::Unsupported),
                    412 => {
                        return Ok(Ranged::Changed(
                            "it is not the version recorded (412 Precondition Failed)".into(),
                        ));
                    }
                    416 => {
                        return Ok(Ranged::Changed(format!(
                            "it no longer has {total} bytes (416 Range Not Satisfiable)"
                        )));
                    }
                    status => {
                        return Err(UploadError::SourceStatus {
                            source_ref: redact::url(source_ref),
                            status,
                        });
                    }
                }
                let content_range = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let answered = match validator {
                    // The same kind of validator as recorded, from this answer.
                    Some(Validator::LastModified(_)) => resp
                        .headers()
                        .get(reqwest::header::LAST_MODIFIED)
                        .and_then(|v| v.to_str().ok())
                        .map(|d| Validator::LastModified(d.trim().to_string())),
                    _ => Validator::from_http(resp.headers()),
                };
                (content_range, answered, http_stream(resp, source_ref))
            }
        };
        if content_range.trim() != expected_range {
            return Ok(Ranged::Changed(format!(
                "asked for {expected_range}, it sent {:?}",
                content_range.trim()
            )));
        }
        if let Some(v) = validator
            && answered.as_ref() != Some(v)
        {
            return Ok(Ranged::Changed(format!(
                "it answers with {} instead of the recorded {}",
                answered.map_or_else(|| "no validator".to_string(), |a| a.encode()),
                v.encode()
            )));
        }
        let size = end - start + 1;
        Ok(Ranged::Partial(SourceBody {
            size: Some(size),
            validator: answered,
            stream: guarded(stream, Some(size), source_ref, self.min_rate),
        }))
    }

    async fn open_raw(&self, source_ref: &str) -> Result<SourceBody, UploadError> {
        match &self.kind {
            SourceKind::S3 { spec, client } => {
                let out = client
                    .get_object()
                    .bucket(&spec.bucket)
                    .key(source_ref)
                    .send()
                    .await
                    .map_err(|e| s3_error("GetObject (source)", e))?;
                let size = out.content_length().and_then(|n| u64::try_from(n).ok());
                let validator = out.e_tag().map(|e| Validator::ETag(e.to_string()));
                Ok(SourceBody {
                    size,
                    validator,
                    stream: s3_stream(out.body, source_ref),
                })
            }
            SourceKind::Http {
                allow_private_networks,
                client,
            } => {
                let url = reqwest::Url::parse(source_ref).map_err(|e| {
                    UploadError::Invalid(format!("{:?}: {e}", redact::url(source_ref)))
                })?;
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
                        source_ref: redact::url(source_ref),
                        status: status.as_u16(),
                    });
                }
                let size = resp.content_length();
                let validator = Validator::from_http(resp.headers());
                Ok(SourceBody {
                    size,
                    validator,
                    stream: http_stream(resp, source_ref),
                })
            }
        }
    }
}

fn s3_stream(
    body: aws_sdk_s3::primitives::ByteStream,
    source_ref: &str,
) -> BoxStream<'static, Result<Bytes, UploadError>> {
    let key = source_ref.to_string();
    futures::stream::try_unfold(body, move |mut body| {
        let key = key.clone();
        async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                Err(e) => Err(UploadError::SourceRead {
                    source_ref: key,
                    message: redact::text(&chain(&e)),
                }),
            }
        }
    })
    .boxed()
}

fn http_stream(
    resp: reqwest::Response,
    source_ref: &str,
) -> BoxStream<'static, Result<Bytes, UploadError>> {
    let url = redact::url(source_ref);
    resp.bytes_stream()
        .map_err(move |e| UploadError::SourceRead {
            source_ref: url.clone(),
            message: body_error(&e),
        })
        .boxed()
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
        source_ref: redact::url(source_ref),
        message: redact::text(&chain(&e)),
    }
}

/// What went wrong while a body was being read, in words: reqwest's
/// "error decoding response body" says nothing about the cause.
fn body_error(e: &reqwest::Error) -> String {
    // The root cause is the one that says something ("end of file before
    // message length reached", "connection reset by peer").
    let mut root: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let cause = redact::text(&root.to_string());
    if e.is_timeout() {
        format!("the source stopped sending data (read timed out: {cause})")
    } else {
        format!("the connection broke while reading the body ({cause})")
    }
}

/// `stream` checked as it flows: it must send at least `min.bytes_per_sec`
/// over every `min.window` spent waiting on it (time the reader spends
/// elsewhere does not count), and exactly `size` bytes when the source
/// announced a size — a body cut short is named as such.
pub(crate) fn guarded(
    stream: BoxStream<'static, Result<Bytes, UploadError>>,
    size: Option<u64>,
    source_ref: &str,
    min: MinRate,
) -> BoxStream<'static, Result<Bytes, UploadError>> {
    struct State {
        inner: BoxStream<'static, Result<Bytes, UploadError>>,
        waited: std::time::Duration,
        window_bytes: u64,
        total: u64,
        done: bool,
    }
    let source_ref = redact::url(source_ref);
    let fail = move |message: String| UploadError::SourceRead {
        source_ref: source_ref.clone(),
        message,
    };
    let start = State {
        inner: stream,
        waited: std::time::Duration::ZERO,
        window_bytes: 0,
        total: 0,
        done: false,
    };
    futures::stream::unfold(start, move |mut st| {
        let fail = fail.clone();
        async move {
            if st.done {
                return None;
            }
            loop {
                // `None`: a whole window went by without a chunk.
                let began = tokio::time::Instant::now();
                let next = if min.bytes_per_sec == 0 {
                    Some(st.inner.next().await)
                } else {
                    let budget = min.window.saturating_sub(st.waited);
                    tokio::time::timeout(budget, st.inner.next()).await.ok()
                };
                st.waited = match next {
                    Some(_) => st.waited + began.elapsed(),
                    None => min.window,
                };
                if let Some(Some(Ok(chunk))) = &next {
                    let n = chunk.len() as u64;
                    st.window_bytes = st.window_bytes.saturating_add(n);
                    st.total = st.total.saturating_add(n);
                }
                if min.bytes_per_sec > 0 && st.waited >= min.window {
                    let needed = min
                        .bytes_per_sec
                        .saturating_mul(min.window.as_secs().max(1));
                    if st.window_bytes < needed && !matches!(next, Some(None)) {
                        st.done = true;
                        let message = format!(
                            "the source sent {} bytes in {:?} of waiting, below the minimum of {} \
                             bytes/s (--source-min-rate): it stalled or is too slow",
                            st.window_bytes, min.window, min.bytes_per_sec
                        );
                        return Some((Err(fail(message)), st));
                    }
                    st.waited = std::time::Duration::ZERO;
                    st.window_bytes = 0;
                }
                match next {
                    None => continue,
                    Some(Some(Ok(chunk))) => return Some((Ok(chunk), st)),
                    Some(Some(Err(e))) => {
                        st.done = true;
                        let e = match (e, size) {
                            (UploadError::SourceRead { message, .. }, Some(size)) => {
                                fail(format!("{message} after {} of {size} bytes", st.total))
                            }
                            (e, _) => e,
                        };
                        return Some((Err(e), st));
                    }
                    Some(None) => {
                        st.done = true;
                        return match size {
                            Some(size) if st.total != size => {
                                let message = format!(
                                    "the source closed the connection after {} of the {size} \
                                     bytes it announced",
                                    st.total
                                );
                                Some((Err(fail(message)), st))
                            }
                            _ => None,
                        };
                    }
                }
            }
        }
    })
    .boxed()
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

    fn trickle(
        chunks: usize,
        every: std::time::Duration,
    ) -> BoxStream<'static, Result<Bytes, UploadError>> {
        futures::stream::unfold(0, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from_static(b"x")), i + 1))
        })
        .boxed()
    }

    async fn drain(
        mut s: BoxStream<'static, Result<Bytes, UploadError>>,
        pause: std::time::Duration,
    ) -> Result<usize, String> {
        let mut n = 0;
        while let Some(chunk) = s.next().await {
            n += chunk.map_err(|e| e.to_string())?.len();
            tokio::time::sleep(pause).await;
        }
        Ok(n)
    }

    #[tokio::test]
    async fn a_trickling_source_fails_with_the_reason() {
        let min = MinRate {
            bytes_per_sec: 1000,
            window: std::time::Duration::from_millis(300),
        };
        let slow = guarded(
            trickle(100, std::time::Duration::from_millis(20)),
            None,
            "https://u:p@h/f?sig=S",
            min,
        );
        let e = drain(slow, std::time::Duration::ZERO)
            .await
            .expect_err("too slow");
        assert!(e.contains("below the minimum of 1000 bytes/s"), "{e}");
        assert!(!e.contains("sig=S") && !e.contains("u:p"), "redacted: {e}");
        // A silent source fails as well, within about one window.
        let silent = guarded(
            trickle(1, std::time::Duration::from_secs(30)),
            None,
            "s",
            min,
        );
        let started = std::time::Instant::now();
        assert!(drain(silent, std::time::Duration::ZERO).await.is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[tokio::test]
    async fn time_the_reader_spends_elsewhere_does_not_count() {
        let min = MinRate {
            bytes_per_sec: 1000,
            window: std::time::Duration::from_millis(200),
        };
        let fast = guarded(stream_of(vec![b"abc"; 5]), Some(15), "s", min);
        let n = drain(fast, std::time::Duration::from_millis(150)).await;
        assert_eq!(n, Ok(15));
    }

    #[tokio::test]
    async fn a_body_cut_short_is_named() {
        let cut = guarded(stream_of(vec![b"hello"]), Some(10), "s", MinRate::OFF);
        let e = drain(cut, std::time::Duration::ZERO)
            .await
            .expect_err("short");
        assert!(
            e.contains("closed the connection after 5 of the 10 bytes"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn empty_source_has_no_parts() {
        let mut r = PartReader::new(stream_of(vec![]), 4);
        assert!(r.next_part().await.expect("no error").is_none());
    }
}
