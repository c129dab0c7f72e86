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
use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::queue::backoff_delay;
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
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
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
        let resp = req
            .send()
            .await
            .map_err(|e| EmbedError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| EmbedError::Transport(e.to_string()))?;
        if !(200..300).contains(&status) {
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            return Err(EmbedError::Status { status, body });
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
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
}
