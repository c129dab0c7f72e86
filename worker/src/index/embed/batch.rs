//! Batching across documents for the built-in model. A worker indexes
//! several documents at once, each of a few chunks; run one by one, each
//! would make its own small forward pass. Instead their texts queue for one
//! thread that takes whatever has queued (up to [`GATHER_TEXTS`] texts) and
//! embeds it in one call: while it computes, the next batch gathers, so
//! batching adds no waiting of its own.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{BuiltinModel, EmbedError};
use crate::metrics::WorkerMetrics;

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>;

struct Request {
    texts: Vec<String>,
    reply: Reply,
}

/// The built-in model behind its batching thread.
pub struct Batcher {
    model: Arc<BuiltinModel>,
    queue: mpsc::UnboundedSender<Request>,
}

impl Batcher {
    /// Starts the batching thread; it ends when the batcher is dropped.
    pub fn start(model: Arc<BuiltinModel>, metrics: WorkerMetrics) -> Result<Batcher, EmbedError> {
        let (queue, requests) = mpsc::unbounded_channel();
        let worker = Arc::clone(&model);
        std::thread::Builder::new()
            .name("embed-batcher".into())
            .spawn(move || serve(&worker, requests, &metrics))
            .map_err(|e| EmbedError::Inference(format!("starting the batching thread: {e}")))?;
        Ok(Batcher { model, queue })
    }

    /// The model itself, for callers that must not wait behind a queue of
    /// batches (a search query; not counted in the batch metrics). On ONNX
    /// Runtime it still waits for the forward pass in progress, if any: the
    /// one session already uses every CPU, so a second one would only take
    /// turns with it.
    pub fn model(&self) -> &Arc<BuiltinModel> {
        &self.model
    }

    /// One normalised vector per text, in order, computed together with
    /// whatever other texts are queued.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Request { texts, reply })
            .map_err(|_| EmbedError::Inference("the batching thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| EmbedError::Inference("the batching thread dropped a request".into()))?
    }
}

/// Texts gathered from concurrent requests for one run of the model, which
/// sorts them by length and runs them in forward passes of its batch size
/// (more texts to sort: less padding).
const GATHER_TEXTS: usize = 32;

fn serve(
    model: &BuiltinModel,
    mut requests: mpsc::UnboundedReceiver<Request>,
    metrics: &WorkerMetrics,
) {
    while let Some(first) = requests.blocking_recv() {
        let mut queued = first.texts.len();
        let mut batch = vec![first];
        while queued < GATHER_TEXTS.max(model.batch_size()) {
            match requests.try_recv() {
                Ok(r) => {
                    queued += r.texts.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        metrics.embed_batches.inc();
        metrics.embedded_texts.inc_by(queued as u64);
        answer(model, batch);
    }
}

fn answer(model: &BuiltinModel, mut batch: Vec<Request>) {
    if batch.len() == 1
        && let Some(Request { texts, reply }) = batch.pop()
    {
        let _ = reply.send(embed(model, &texts));
        return;
    }
    let texts: Vec<String> = batch.iter().flat_map(|r| r.texts.clone()).collect();
    match embed(model, &texts) {
        Ok(vectors) => {
            let mut vectors = vectors.into_iter();
            for r in batch {
                let mine = vectors.by_ref().take(r.texts.len()).collect();
                let _ = r.reply.send(Ok(mine));
            }
        }
        Err(e) => {
            // One request's texts spoiled the batch: each on its own, so
            // only that one fails.
            warn!(error = %e, requests = batch.len(), "batched embedding failed; embedding each request alone");
            for r in batch {
                let _ = r.reply.send(embed(model, &r.texts));
            }
        }
    }
}

/// `model.embed`, with a panic in the tokenizer or the model turned into an
/// error for its callers rather than the end of the batching thread.
fn embed(model: &BuiltinModel, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.embed(texts))).unwrap_or_else(
        |panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(EmbedError::Inference(format!("the model panicked: {what}")))
        },
    )
}
