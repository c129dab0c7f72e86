//! The built-in model (candle) against the reference implementation of the
//! same model (sentence-transformers, vectors committed in
//! `fixtures/minilm_reference.json`, written by `bench/embedding/reference.py
//! fixture`): cosine ≥ 0.99 on every sample — short, non-ASCII, code, longer
//! than the shipped tokenizer's 128-token cut and longer than 256 tokens.
//! Loads the model from `STOWAGE_EMBEDDING_MODEL_DIR` (`scripts/stack
//! install model`).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use stowage_common::testing::StackEnv;
use stowage_worker::index::embed::builtin::{BuiltinModel, DIMENSIONS};
use stowage_worker::index::embed::{Batcher, EmbedError, Embedder};
use stowage_worker::metrics::WorkerMetrics;

#[derive(Deserialize)]
struct Sample {
    text: String,
    vector: Vec<f32>,
}

#[derive(Deserialize)]
struct Fixture {
    samples: Vec<Sample>,
}

fn fixture() -> Fixture {
    let raw = include_str!("fixtures/minilm_reference.json");
    serde_json::from_str(raw).expect("fixture is valid JSON")
}

fn model() -> &'static Arc<BuiltinModel> {
    static MODEL: OnceLock<Arc<BuiltinModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = StackEnv::load().get("STOWAGE_EMBEDDING_MODEL_DIR");
        Arc::new(BuiltinModel::load(&PathBuf::from(dir)).expect("the built-in model loads"))
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn vectors_agree_with_the_reference_implementation() {
    let fixture = fixture();
    let texts: Vec<String> = fixture.samples.iter().map(|s| s.text.clone()).collect();
    let got = model().embed(&texts).expect("embeddings");
    assert_eq!(got.len(), texts.len());
    for (sample, v) in fixture.samples.iter().zip(&got) {
        assert_eq!(v.len(), DIMENSIONS);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
        let c = cosine(v, &sample.vector);
        assert!(
            c >= 0.99,
            "cosine {c} with the reference for {:?}",
            &sample.text[..sample.text.len().min(60)]
        );
    }
}

#[test]
fn a_text_gets_the_same_vector_alone_or_in_any_batch() {
    let fixture = fixture();
    let texts: Vec<String> = fixture.samples.iter().map(|s| s.text.clone()).collect();
    let batch = model().embed(&texts).expect("batch");
    let mut reversed = texts.clone();
    reversed.reverse();
    let backwards = model().embed(&reversed).expect("reversed");
    for (i, text) in texts.iter().enumerate() {
        let alone = model().embed(std::slice::from_ref(text)).expect("alone");
        assert!(
            cosine(&alone[0], &batch[i]) > 0.9999,
            "padding changes nothing"
        );
        assert!(cosine(&backwards[texts.len() - 1 - i], &batch[i]) > 0.9999);
    }
    assert!(model().embed(&[]).expect("nothing").is_empty());
}

#[test]
fn related_texts_are_closer_than_unrelated_ones() {
    let v = model()
        .embed(&[
            "How do I resume an interrupted multipart upload?".to_string(),
            "Continuing a partially uploaded file after a crash".to_string(),
            "A recipe for sourdough bread".to_string(),
        ])
        .expect("embeddings");
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.2);
}

#[tokio::test]
async fn a_missing_or_broken_model_folder_is_a_clear_error() {
    let missing = BuiltinModel::load(std::path::Path::new("/nonexistent/minilm"))
        .err()
        .expect("no folder");
    assert!(
        matches!(&missing, EmbedError::Load { reason, .. } if reason.contains("config.json")),
        "{missing}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.json"), "{not json").expect("write");
    let broken = BuiltinModel::load(dir.path()).err().expect("broken config");
    assert!(broken.to_string().contains("config.json"), "{broken}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_documents_are_batched_and_each_gets_its_own_vectors() {
    let metrics = WorkerMetrics::default();
    let embedder = Embedder::Builtin(Arc::new(
        Batcher::start(model().clone(), metrics.clone()).expect("batcher"),
    ));
    let texts = |i: usize| vec![format!("document {i} about backups"), format!("note {i}")];
    let answers = futures::future::join_all((0..6).map(|i| {
        let embedder = embedder.clone();
        async move { embedder.embed(&texts(i)).await.expect("async embed") }
    }))
    .await;
    for (i, vectors) in answers.iter().enumerate() {
        let alone = model().embed(&texts(i)).expect("embed alone");
        assert_eq!(vectors.len(), 2);
        for (v, w) in vectors.iter().zip(&alone) {
            assert_eq!(v.len(), DIMENSIONS);
            assert!(cosine(v, w) > 0.9999, "request {i} got another's vectors");
        }
    }
    // Sent at once: the first batch may start alone, the other five queue
    // behind it and run together.
    assert_eq!(metrics.embedded_texts.get(), 12);
    assert!(
        (1..=2).contains(&metrics.embed_batches.get()),
        "{} batches for 6 concurrent requests",
        metrics.embed_batches.get()
    );
    let query = embedder.embed_query("hello").await.expect("query");
    assert_eq!(query.len(), DIMENSIONS);
}
