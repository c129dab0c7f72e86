//! Remote embedding providers over HTTP, in their documented shapes:
//!
//! - OpenAI-compatible: `POST {endpoint}/v1/embeddings {"model", "input"}`
//!   (Bearer key) → `{"data": [{"index", "embedding"}]}`, sorted by index;
//! - Ollama: `POST {endpoint}/api/embed {"model", "input"}` → `{"embeddings"}`;
//! - Hugging Face TEI: `POST {endpoint}/embed {"inputs", "normalize",
//!   "truncate"}` → `[[…]]`.
//!
//! Batched, retried with jittered backoff on throttling, 5xx and transport
//! errors; every vector is checked against the collection's dimensions and
//! L2-normalised.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use stowage_common::errors::{Classify, ErrorClass, chain};
use stowage_common::queue::backoff_delay;
use stowage_common::redact;
use stowage_common::spec::index::{Embedding, EmbeddingProvider};

use super::{EmbedError, normalize};

/// How hard to try before giving up on a batch.
#[derive(Clone, Debug)]
pub struct Retry {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            base: Duration::from_millis(500),
            max: Duration::from_secs(20),
        }
    }
}

pub struct RemoteEmbedder {
    provider: EmbeddingProvider,
    url: String,
    model: String,
    dimensions: usize,
    api_key: Option<String>,
    batch: usize,
    retry: Retry,
    http: reqwest::Client,
}

impl RemoteEmbedder {
    /// For a collection's `embedding` spec; `api_key` from its Secret.
    pub fn new(
        spec: &Embedding,
        api_key: Option<String>,
        retry: Retry,
    ) -> Result<RemoteEmbedder, EmbedError> {
        let base = spec
            .endpoint
            .as_deref()
            .ok_or(EmbedError::NotRemote)?
            .trim_end_matches('/');
        if let Ok(parsed) = reqwest::Url::parse(base) {
            stowage_common::net::check_url(&parsed, spec.allow_private_networks)
                .map_err(|e| EmbedError::Refused(e.to_string()))?;
        }
        let url = match spec.provider {
            EmbeddingProvider::Openai => format!("{base}/v1/embeddings"),
            EmbeddingProvider::Ollama => format!("{base}/api/embed"),
            EmbeddingProvider::Tei => format!("{base}/embed"),
            EmbeddingProvider::Builtin => return Err(EmbedError::NotRemote),
        };
        Ok(RemoteEmbedder {
            provider: spec.provider,
            url,
            model: spec.model.clone(),
            dimensions: spec.dimensions as usize,
            api_key,
            batch: 64,
            retry,
            // The address policy on what the endpoint resolves to, and no
            // redirect: it would carry the API key along.
            http: crate::upload::net::embedder_client(spec.allow_private_networks)
                .map_err(|e| EmbedError::Transport(e.to_string()))?,
        })
    }

    /// Embeds `texts` in batches; one normalised vector per text, in order.
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.batch) {
            out.extend(self.embed_batch(batch).await?);
        }
        Ok(out)
    }

    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut attempt = 1;
        loop {
            match self.request(texts).await {
                Err(e) if e.class() == ErrorClass::Retryable && attempt < self.retry.attempts => {
                    tracing::warn!(attempt, error = %e, "embedding batch failed; retrying");
                    tokio::time::sleep(backoff_delay(attempt, self.retry.base, self.retry.max))
                        .await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn request(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let body = match self.provider {
            EmbeddingProvider::Tei => json!({"inputs": texts, "normalize": true, "truncate": true}),
            _ => json!({"model": self.model, "input": texts}),
        };
        let mut req = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| EmbedError::Transport(self.scrub(&chain(&e))))?;
        let status = resp.status().as_u16();
        if (300..400).contains(&status) {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(redact::url)
                .unwrap_or_default();
            return Err(EmbedError::Status {
                status,
                body: format!(
                    "a redirect (to {to:?}) is not followed with the API key attached: set the \
                     final URL as embedding.endpoint"
                ),
            });
        }
        // Bounded whatever the server sends: a vector per text, as JSON.
        let limit = MAX_ANSWER_BYTES_PER_TEXT
            .saturating_mul(texts.len().max(1))
            .saturating_mul(self.dimensions.max(1))
            .saturating_add(1 << 20);
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| EmbedError::Transport(self.scrub(&chain(&e))))?
        {
            if bytes.len().saturating_add(chunk.len()) > limit {
                return Err(EmbedError::Response(format!(
                    "the answer is larger than {limit} bytes, more than {} vectors of {} \
                     dimensions can take",
                    texts.len(),
                    self.dimensions
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !(200..300).contains(&status) {
            return Err(EmbedError::Status {
                status,
                body: self.scrub(&error_summary(&bytes)),
            });
        }
        let bad = |e: serde_json::Error| EmbedError::Response(e.to_string());
        let vectors: Vec<Vec<f32>> = match self.provider {
            EmbeddingProvider::Openai => {
                #[derive(Deserialize)]
                struct Item {
                    index: usize,
                    embedding: Vec<f32>,
                }
                #[derive(Deserialize)]
                struct Answer {
                    data: Vec<Item>,
                }
                let mut data = serde_json::from_slice::<Answer>(&bytes).map_err(bad)?.data;
                data.sort_by_key(|i| i.index);
                data.into_iter().map(|i| i.embedding).collect()
            }
            EmbeddingProvider::Ollama => {
                #[derive(Deserialize)]
                struct Answer {
                    embeddings: Vec<Vec<f32>>,
                }
                serde_json::from_slice::<Answer>(&bytes)
                    .map_err(bad)?
                    .embeddings
            }
            _ => serde_json::from_slice(&bytes).map_err(bad)?,
        };
        if vectors.len() != texts.len() {
            return Err(EmbedError::Response(format!(
                "{} embeddings for {} inputs",
                vectors.len(),
                texts.len()
            )));
        }
        vectors
            .into_iter()
            .map(|v| {
                if v.len() != self.dimensions {
                    return Err(EmbedError::Dimensions {
                        got: v.len(),
                        want: self.dimensions,
                    });
                }
                Ok(normalize(v))
            })
            .collect()
    }
}

/// Bytes of JSON an answer may spend per number of a vector (a float
/// printed in full, a separator).
const MAX_ANSWER_BYTES_PER_TEXT: usize = 32;

/// What an error answer says, briefly: its JSON `error` / `message` when it
/// has one, else its first line, at most 200 characters of it.
fn error_summary(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]);
    let said = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            let e = v.get("error").unwrap_or(&v);
            e.get("message")
                .or_else(|| v.get("message"))
                .and_then(|m| m.as_str())
                .or_else(|| e.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| text.lines().next().unwrap_or_default().to_string());
    let clean: String = said.chars().filter(|c| !c.is_control()).take(200).collect();
    if clean.is_empty() {
        "(no message)".into()
    } else {
        clean
    }
}

impl RemoteEmbedder {
    /// `text` without the API key (a server may echo it back) and without
    /// URL secrets.
    fn scrub(&self, text: &str) -> String {
        let text = redact::text(text);
        match &self.api_key {
            Some(key) if key.len() >= 4 => text.replace(key.as_str(), "REDACTED"),
            _ => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use futures::StreamExt;
    use serde_json::Value;

    use super::*;

    type Reply = (StatusCode, [(&'static str, &'static str); 1], String);

    fn reply(status: StatusCode, body: Value) -> Reply {
        (
            status,
            [("content-type", "application/json")],
            body.to_string(),
        )
    }

    fn parse(body: &Bytes) -> Value {
        serde_json::from_slice(body).expect("the client sends JSON")
    }

    /// One vector per input: [len, 1, 0, …] (so inputs are told apart).
    fn vector_for(text: &str, dims: usize) -> Vec<f32> {
        let mut v = vec![0.0; dims];
        v[0] = text.len() as f32;
        v[1] = 1.0;
        v
    }

    #[derive(Clone, Default)]
    struct Seen {
        calls: Arc<AtomicUsize>,
        fail_first: usize,
        dims: usize,
    }

    fn inputs(body: &Value, field: &str) -> Vec<String> {
        body[field]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn openai(State(s): State<Seen>, headers: HeaderMap, raw: Bytes) -> Reply {
        let body = parse(&raw);
        let n = s.calls.fetch_add(1, Ordering::SeqCst);
        if n < s.fail_first {
            return reply(StatusCode::TOO_MANY_REQUESTS, json!({"error": "slow down"}));
        }
        assert_eq!(
            headers.get("authorization").and_then(|h| h.to_str().ok()),
            Some("Bearer sk-test")
        );
        assert_eq!(body["model"], "text-embedding-3-small");
        // Answer in reverse order: the client must sort by index.
        let data: Vec<Value> = inputs(&body, "input")
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": vector_for(t, s.dims)}))
            .collect();
        reply(
            StatusCode::OK,
            json!({"object": "list", "data": data, "model": body["model"]}),
        )
    }

    async fn ollama(State(s): State<Seen>, raw: Bytes) -> Reply {
        let body = parse(&raw);
        s.calls.fetch_add(1, Ordering::SeqCst);
        if body["model"] != "nomic-embed-text" {
            return reply(StatusCode::BAD_REQUEST, json!({"error": "model not found"}));
        }
        let e: Vec<Vec<f32>> = inputs(&body, "input")
            .iter()
            .map(|t| vector_for(t, s.dims))
            .collect();
        reply(
            StatusCode::OK,
            json!({"model": body["model"], "embeddings": e}),
        )
    }

    async fn tei(State(s): State<Seen>, raw: Bytes) -> Reply {
        let body = parse(&raw);
        let n = s.calls.fetch_add(1, Ordering::SeqCst);
        if n < s.fail_first {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "warming up"}),
            );
        }
        assert_eq!(body["normalize"], true);
        let e: Vec<Vec<f32>> = inputs(&body, "inputs")
            .iter()
            .map(|t| vector_for(t, s.dims))
            .collect();
        reply(StatusCode::OK, json!(e))
    }

    async fn serve(seen: Seen) -> String {
        let app = Router::new()
            .route("/v1/embeddings", post(openai))
            .route("/api/embed", post(ollama))
            .route("/embed", post(tei))
            .with_state(seen);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/")
    }

    fn spec(provider: EmbeddingProvider, model: &str, dims: u32, endpoint: &str) -> Embedding {
        Embedding {
            provider,
            model: model.into(),
            dimensions: dims,
            endpoint: Some(endpoint.into()),
            credentials_secret_ref: None,
            // The test servers listen on loopback.
            allow_private_networks: true,
        }
    }

    fn fast() -> Retry {
        Retry {
            attempts: 3,
            base: Duration::from_millis(5),
            max: Duration::from_millis(20),
        }
    }

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| "x".repeat(i + 1)).collect()
    }

    #[tokio::test]
    async fn openai_compatible_batches_sorts_and_retries_throttling() {
        let seen = Seen {
            fail_first: 1,
            dims: 8,
            ..Default::default()
        };
        let url = serve(seen.clone()).await;
        let e = RemoteEmbedder::new(
            &spec(EmbeddingProvider::Openai, "text-embedding-3-small", 8, &url),
            Some("sk-test".into()),
            fast(),
        )
        .expect("embedder");
        let out = e.embed(&texts(70)).await.expect("embeddings");
        assert_eq!(out.len(), 70);
        // 1 throttled + 2 batches (64 + 6).
        assert_eq!(seen.calls.load(Ordering::SeqCst), 3);
        for (i, v) in out.iter().enumerate() {
            let want = normalize(vector_for(&"x".repeat(i + 1), 8));
            assert_eq!(v, &want, "vector {i} is the one for input {i}");
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
        }
    }

    #[tokio::test]
    async fn ollama_and_tei_shapes() {
        let seen = Seen {
            fail_first: 2,
            dims: 4,
            ..Default::default()
        };
        let url = serve(seen.clone()).await;
        let o = RemoteEmbedder::new(
            &spec(EmbeddingProvider::Ollama, "nomic-embed-text", 4, &url),
            None,
            fast(),
        )
        .expect("ollama");
        // Ollama's handler does not fail first; TEI's does (twice).
        assert_eq!(o.embed(&texts(3)).await.expect("ollama").len(), 3);
        let t = RemoteEmbedder::new(&spec(EmbeddingProvider::Tei, "bge", 4, &url), None, fast())
            .expect("tei");
        let out = t.embed(&texts(2)).await.expect("tei after two 503s");
        assert_eq!(out[1], normalize(vector_for("xx", 4)));
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let seen = Seen {
            dims: 4,
            ..Default::default()
        };
        let url = serve(seen.clone()).await;
        let o = RemoteEmbedder::new(
            &spec(EmbeddingProvider::Ollama, "no-such-model", 4, &url),
            None,
            fast(),
        )
        .expect("ollama");
        let e = o.embed(&texts(1)).await.expect_err("400");
        assert!(matches!(e, EmbedError::Status { status: 400, .. }), "{e}");
        assert_eq!(seen.calls.load(Ordering::SeqCst), 1, "a 400 is not retried");
        let wrong =
            RemoteEmbedder::new(&spec(EmbeddingProvider::Tei, "bge", 16, &url), None, fast())
                .expect("tei");
        let e = wrong.embed(&texts(1)).await.expect_err("dims");
        assert!(
            matches!(e, EmbedError::Dimensions { got: 4, want: 16 }),
            "{e}"
        );
        let gone = RemoteEmbedder::new(
            &spec(EmbeddingProvider::Tei, "bge", 4, "http://127.0.0.1:9"),
            None,
            fast(),
        )
        .expect("tei");
        let e = gone.embed(&texts(1)).await.expect_err("unreachable");
        assert_eq!(e.class(), ErrorClass::Retryable);
    }

    /// A hostile endpoint: redirects elsewhere, echoes the key, or answers
    /// without end. Each is refused with a message that carries no secret.
    #[tokio::test]
    async fn hostile_endpoints_get_no_key_and_no_memory() {
        use axum::routing::get;
        let redirected = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&redirected);
        let elsewhere = Router::new().route(
            "/v1/embeddings",
            post(move |headers: HeaderMap| {
                let seen = Arc::clone(&seen);
                async move {
                    if headers.contains_key("authorization") {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let other = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, elsewhere).await });
        let target = format!("http://{other}/v1/embeddings?token=t0p");
        let app = Router::new()
            .route(
                "/redirect/v1/embeddings",
                post(move || {
                    let target = target.clone();
                    async move { (StatusCode::TEMPORARY_REDIRECT, [("location", target)]) }
                }),
            )
            .route(
                "/echo/v1/embeddings",
                post(|headers: HeaderMap| async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    (
                        StatusCode::UNAUTHORIZED,
                        format!("{{\"error\": {{\"message\": \"bad key {auth}\"}}}}"),
                    )
                }),
            )
            .route(
                "/huge/v1/embeddings",
                post(|| async {
                    let chunk = Bytes::from(vec![b' '; 1 << 20]);
                    let endless = futures::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
                    axum::body::Body::from_stream(endless)
                }),
            )
            .route("/", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let embedder = |path: &str| {
            RemoteEmbedder::new(
                &spec(
                    EmbeddingProvider::Openai,
                    "m",
                    4,
                    &format!("http://{addr}/{path}"),
                ),
                Some("sk-secret-123".into()),
                fast(),
            )
            .expect("embedder")
        };
        let e = embedder("redirect")
            .embed(&texts(1))
            .await
            .expect_err("redirect");
        let m = e.to_string();
        assert!(
            m.contains("redirect") && m.contains("embedding.endpoint"),
            "{m}"
        );
        assert!(!m.contains("t0p"), "the redirect's URL is redacted: {m}");
        assert_eq!(
            redirected.load(Ordering::SeqCst),
            0,
            "the key never went elsewhere"
        );
        let e = embedder("echo").embed(&texts(1)).await.expect_err("401");
        let m = e.to_string();
        assert!(m.contains("bad key") && !m.contains("sk-secret-123"), "{m}");
        let e = embedder("huge")
            .embed(&texts(2))
            .await
            .expect_err("endless");
        assert!(e.to_string().contains("the answer is larger than"), "{e}");
    }
}
