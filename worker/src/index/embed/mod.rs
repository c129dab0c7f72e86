//! Embeddings: text → unit-length vectors (cosine distance is then the dot
//! product), from the built-in model or a remote provider.
//!
//! - [`builtin`]: all-MiniLM-L6-v2 on the CPU, no network: ONNX Runtime
//!   ([`onnx`]) or candle.
//! - [`batch`]: the built-in model batched across a worker's documents.
//! - [`remote`]: OpenAI-compatible, Ollama and Hugging Face TEI over HTTP.

pub mod batch;
pub mod builtin;
pub mod onnx;
pub mod remote;

use std::path::PathBuf;
use std::sync::Arc;

use stowage_common::errors::{Classify, ErrorClass};

pub use batch::Batcher;
pub use builtin::BuiltinModel;
pub use onnx::{OnnxOptions, Precision};
pub use remote::{RemoteEmbedder, Retry};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedding provider answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("embedding provider unreachable: {0}")]
    Transport(String),
    #[error("embedding provider sent an unexpected answer: {0}")]
    Response(String),
    #[error("embedding has {got} dimensions, the collection expects {want}")]
    Dimensions { got: usize, want: usize },
    #[error("the builtin model is not available to the remote embedder")]
    NotRemote,
    #[error("builtin embedding model at {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("builtin embedding model: {0}")]
    Inference(String),
    /// The address policy refuses the endpoint.
    #[error("embedding endpoint refused: {0}")]
    Refused(String),
}

impl Classify for EmbedError {
    fn class(&self) -> ErrorClass {
        match self {
            EmbedError::Status { status, .. } if *status == 429 || *status >= 500 => {
                ErrorClass::Retryable
            }
            EmbedError::Transport(_) => ErrorClass::Retryable,
            _ => ErrorClass::Permanent,
        }
    }
}

/// Where the built-in model comes from, and which backend runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuiltinSource {
    /// candle, from the folder with `config.json`, `tokenizer.json` and
    /// `model.safetensors`.
    Candle(PathBuf),
    /// ONNX Runtime.
    Onnx(OnnxOptions),
}

impl BuiltinSource {
    /// Loads the model (blocking: reads ~90 MB, builds the session).
    pub fn load(&self) -> Result<BuiltinModel, EmbedError> {
        match self {
            BuiltinSource::Candle(dir) => BuiltinModel::load(dir),
            BuiltinSource::Onnx(options) => BuiltinModel::load_onnx(options),
        }
    }
}

/// What a collection embeds with.
#[derive(Clone)]
pub enum Embedder {
    Builtin(Arc<Batcher>),
    Remote(Arc<RemoteEmbedder>),
}

impl Embedder {
    /// One normalised vector per text, in order (for the built-in model,
    /// batched with the texts of other documents).
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self {
            Embedder::Remote(remote) => remote.embed(texts).await,
            Embedder::Builtin(batcher) => batcher.embed(texts.to_vec()).await,
        }
    }

    /// One query's vector, without waiting behind indexing batches.
    pub async fn embed_query(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let texts = vec![text.to_string()];
        let mut vectors = match self {
            Embedder::Remote(remote) => remote.embed(&texts).await?,
            Embedder::Builtin(batcher) => {
                let model = Arc::clone(batcher.model());
                // CPU-bound: off the async threads.
                tokio::task::spawn_blocking(move || model.embed(&texts))
                    .await
                    .map_err(|e| EmbedError::Inference(e.to_string()))??
            }
        };
        vectors
            .pop()
            .ok_or_else(|| EmbedError::Response("no vector for the query".into()))
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}
