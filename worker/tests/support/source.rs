//! A scriptable HTTP file server on 127.0.0.1 standing in for remote sources:
//! files can fail their first N requests, always fail, or trickle slowly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

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
}

#[derive(Clone, Default)]
pub struct SourceServer {
    files: Arc<Mutex<HashMap<String, FileBehaviour>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
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
}

async fn serve(State(s): State<SourceServer>, Path(path): Path<String>) -> Response {
    let n = {
        let mut hits = s.hits.lock().expect("lock");
        let n = hits.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    let Some(f) = s.files.lock().expect("lock").get(&path).cloned() else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    if let Some(code) = f.always {
        return (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "scripted failure",
        )
            .into_response();
    }
    if n <= f.fail_first {
        return (StatusCode::SERVICE_UNAVAILABLE, "scripted flake").into_response();
    }
    let mut f = f;
    if let Some((after, data)) = f.rewritten_after.clone()
        && n > after
    {
        f.data = data;
    }
    let len = f.data.len();
    if let Some(cut) = f.cut_after {
        let head = f.data.slice(..cut.min(len));
        let stream = futures::stream::iter([
            Ok::<_, std::io::Error>(head),
            Err(std::io::Error::other(
                "connection dropped by the test source",
            )),
        ]);
        return (
            [(header::CONTENT_LENGTH, len.to_string())],
            Body::from_stream(stream),
        )
            .into_response();
    }
    let body = match f.trickle {
        None => Body::from(f.data),
        Some(pause) => {
            let chunks: Vec<Bytes> = (0..len)
                .step_by(1 << 20)
                .map(|i| f.data.slice(i..(i + (1 << 20)).min(len)))
                .collect();
            let stream = futures::stream::iter(chunks).then(move |c| async move {
                tokio::time::sleep(pause).await;
                Ok::<_, std::io::Error>(c)
            });
            Body::from_stream(stream)
        }
    };
    ([(header::CONTENT_LENGTH, len.to_string())], body).into_response()
}

use futures::StreamExt as _;
