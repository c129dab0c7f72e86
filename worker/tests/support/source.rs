//! A scriptable HTTP file server on 127.0.0.1 standing in for remote sources:
//! files can fail their first N requests, always fail, or trickle slowly.
//! Like a real static file server it sends a strong `ETag` (from the bytes)
//! and `Last-Modified`, serves single byte ranges (`Range: bytes=a-b`, `a-`,
//! `-n`) and evaluates `If-Match`, `If-Unmodified-Since` and `If-Range`;
//! each behaviour can be turned off. It logs every request with the bytes
//! its body actually handed to the connection (produced lazily, so a reader
//! that stops reading stops the count too, up to socket buffers).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use sha2::{Digest, Sha256};

/// Which validators the server sends (and honours in preconditions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Validators {
    /// A strong ETag and Last-Modified, like nginx or S3.
    #[default]
    ETagAndLastModified,
    /// Last-Modified only.
    LastModified,
    /// Neither.
    None,
}

#[derive(Clone, Default)]
pub struct FileBehaviour {
    pub data: Bytes,
    /// Answer 503 to this many requests first.
    pub fail_first: usize,
    /// Answer this status to every request.
    pub always: Option<u16>,
    /// Send 1 MiB, then wait this long, and so on.
    pub trickle: Option<Duration>,
    /// Promise the full length but drop the connection after this many bytes.
    pub cut_after: Option<usize>,
    /// After this many requests, serve these bytes instead (the file was
    /// rewritten).
    pub rewritten_after: Option<(usize, Bytes)>,
    pub validators: Validators,
    /// Ignore `Range` (answer 200 with the whole body), like a server
    /// without range support.
    pub no_ranges: bool,
    /// The file's modification time, in seconds after an epoch of the test
    /// server's own (each rewrite is one second later).
    pub modified: u32,
}

/// One request as the server saw and answered it.
#[derive(Clone, Debug)]
pub struct Served {
    pub path: String,
    /// The `Range` header, if any.
    pub range_header: Option<String>,
    /// The `If-Match` and `If-Unmodified-Since` headers, if any.
    pub if_match: Option<String>,
    pub if_unmodified_since: Option<String>,
    pub status: u16,
    /// First and last byte of the body sent (206), or of the whole file (200).
    pub span: Option<(u64, u64)>,
    /// Body bytes handed to the connection so far.
    pub bytes: Arc<AtomicU64>,
}

impl Served {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Default)]
pub struct SourceServer {
    files: Arc<Mutex<HashMap<String, FileBehaviour>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    log: Arc<Mutex<Vec<Served>>>,
    pub addr: Option<SocketAddr>,
}

impl SourceServer {
    pub async fn start() -> SourceServer {
        let mut s = SourceServer::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        s.addr = Some(listener.local_addr().expect("addr"));
        let app = Router::new()
            .route("/{*path}", get(serve))
            .with_state(s.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        s
    }

    pub fn put(&self, path: &str, f: FileBehaviour) {
        self.files.lock().expect("lock").insert(path.to_string(), f);
    }

    /// Serves `data` at `path`, with no scripted misbehaviour.
    pub fn serve(&self, path: &str, data: Bytes) {
        self.put(
            path,
            FileBehaviour {
                data,
                ..Default::default()
            },
        );
    }

    /// Replaces the bytes of `path` (a new ETag, one second newer), keeping
    /// its behaviour.
    pub fn rewrite(&self, path: &str, data: Bytes) {
        let mut files = self.files.lock().expect("lock");
        let f = files.entry(path.to_string()).or_default();
        f.data = data;
        f.modified += 1;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr.expect("started"))
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Every request for `path`, in order.
    pub fn requests(&self, path: &str) -> Vec<Served> {
        self.log
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    /// Body bytes served for `path`, all requests together.
    pub fn bytes_served(&self, path: &str) -> u64 {
        self.requests(path).iter().map(Served::bytes).sum()
    }
}

/// The strong ETag of `data`.
pub fn etag_of(data: &[u8]) -> String {
    format!("\"{}\"", &hex::encode(Sha256::digest(data))[..32])
}

fn modified_at(f: &FileBehaviour) -> DateTime<Utc> {
    Utc.timestamp_opt(1_767_225_600 + i64::from(f.modified), 0)
        .single()
        .expect("valid time")
}

fn http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn parse_http_date(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` against a file of `len` bytes:
/// `Some(Ok(span))`, `Some(Err(()))` when unsatisfiable, `None` when not a
/// single byte range (ignored, as servers do).
fn parse_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let span = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().ok()?.min(len.saturating_sub(1))
        };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(span))
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn serve(
    State(s): State<SourceServer>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    let n = {
        let mut hits = s.hits.lock().expect("lock");
        let n = hits.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    let range_header = header_str(&headers, header::RANGE).map(str::to_string);
    let bytes = Arc::new(AtomicU64::new(0));
    let log = |status: u16, span: Option<(u64, u64)>| {
        s.log.lock().expect("lock").push(Served {
            path: path.clone(),
            range_header: range_header.clone(),
            if_match: header_str(&headers, header::IF_MATCH).map(str::to_string),
            if_unmodified_since: header_str(&headers, header::IF_UNMODIFIED_SINCE)
                .map(str::to_string),
            status,
            span,
            bytes: Arc::clone(&bytes),
        });
    };
    let Some(f) = s.files.lock().expect("lock").get(&path).cloned() else {
        log(404, None);
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    if let Some(code) = f.always {
        log(code, None);
        return (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "scripted failure",
        )
            .into_response();
    }
    if n <= f.fail_first {
        log(503, None);
        return (StatusCode::SERVICE_UNAVAILABLE, "scripted flake").into_response();
    }
    let mut f = f;
    if let Some((after, data)) = f.rewritten_after.clone()
        && n > after
    {
        f.data = data;
        f.modified += 1;
    }
    let len = f.data.len() as u64;
    let etag = (f.validators == Validators::ETagAndLastModified).then(|| etag_of(&f.data));
    let modified = modified_at(&f);
    let last_modified = (f.validators != Validators::None).then(|| http_date(modified));
    let mut out = HeaderMap::new();
    if let Some(e) = &etag {
        out.insert(header::ETAG, e.parse().expect("header"));
    }
    if let Some(d) = &last_modified {
        out.insert(header::LAST_MODIFIED, d.parse().expect("header"));
    }
    if !f.no_ranges {
        out.insert(header::ACCEPT_RANGES, "bytes".parse().expect("header"));
    }

    // Preconditions (RFC 9110 §13.2.2): If-Match, else If-Unmodified-Since.
    if let Some(want) = header_str(&headers, header::IF_MATCH) {
        let matches = want.split(',').map(str::trim).any(|w| {
            (w == "*")
                || etag
                    .as_deref()
                    .is_some_and(|e| !w.starts_with("W/") && w == e)
        });
        if !matches {
            log(412, None);
            return (StatusCode::PRECONDITION_FAILED, out, "precondition failed").into_response();
        }
    } else if let Some(since) =
        header_str(&headers, header::IF_UNMODIFIED_SINCE).and_then(parse_http_date)
        && last_modified.is_some()
        && modified > since
    {
        log(412, None);
        return (StatusCode::PRECONDITION_FAILED, out, "precondition failed").into_response();
    }

    // A range, unless If-Range names another version.
    let range_applies = match header_str(&headers, header::IF_RANGE) {
        None => true,
        Some(v) if v.trim().starts_with('"') => etag.as_deref() == Some(v.trim()),
        Some(v) => parse_http_date(v).is_some_and(|t| last_modified.is_some() && t == modified),
    };
    let range = match (&range_header, f.no_ranges || !range_applies) {
        (Some(r), false) => parse_range(r, len),
        _ => None,
    };
    let (status, start, end) = match range {
        Some(Err(())) => {
            out.insert(
                header::CONTENT_RANGE,
                format!("bytes */{len}").parse().expect("header"),
            );
            log(416, None);
            return (StatusCode::RANGE_NOT_SATISFIABLE, out, "").into_response();
        }
        Some(Ok((a, b))) => {
            out.insert(
                header::CONTENT_RANGE,
                format!("bytes {a}-{b}/{len}").parse().expect("header"),
            );
            (StatusCode::PARTIAL_CONTENT, a, b + 1)
        }
        None => (StatusCode::OK, 0, len),
    };
    log(status.as_u16(), (end > start).then(|| (start, end - 1)));
    let body_bytes = f.data.slice(start as usize..end as usize);
    let body_len = body_bytes.len();
    out.insert(
        header::CONTENT_LENGTH,
        body_len.to_string().parse().expect("header"),
    );
    // Chunks are produced as the connection takes them (1 MiB each, paced
    // when trickling), each counted once handed over.
    let chunk = if f.trickle.is_some() {
        1 << 20
    } else {
        64 << 10
    };
    let sendable = match f.cut_after {
        Some(cut) => cut.min(body_len),
        None => body_len,
    };
    let chunks: Vec<Bytes> = (0..sendable)
        .step_by(chunk)
        .map(|i| body_bytes.slice(i..(i + chunk).min(sendable)))
        .collect();
    let pause = f.trickle;
    let cut = f.cut_after.is_some();
    let counted = Arc::clone(&bytes);
    let stream = futures::stream::iter(chunks)
        .then(move |c| {
            let counted = Arc::clone(&counted);
            async move {
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
                counted.fetch_add(c.len() as u64, Ordering::SeqCst);
                Ok::<_, std::io::Error>(c)
            }
        })
        .chain(futures::stream::iter(cut.then(|| {
            Err(std::io::Error::other(
                "connection dropped by the test source",
            ))
        })));
    (status, out, Body::from_stream(stream)).into_response()
}

use futures::StreamExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=95-200", 100), Some(Ok((95, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("lines=1-2", 100), None);
        let t = modified_at(&FileBehaviour::default());
        assert_eq!(parse_http_date(&http_date(t)), Some(t));
    }
}
