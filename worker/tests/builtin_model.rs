//! The built-in model on both backends — candle and ONNX Runtime (fp32, and
//! int8) — against the reference implementation of the same model
//! (sentence-transformers, vectors committed in
//! `fixtures/minilm_reference.json`, written by `bench/embedding/reference.py
//! fixture`): fp32 cosine ≥ 0.999 on every sample — short, non-ASCII, code,
//! longer than the shipped tokenizer's 128-token cut and longer than 256
//! tokens. Loads candle's model from `STOWAGE_EMBEDDING_MODEL_DIR`
//! (`scripts/stack install model`), the ONNX graphs from
//! `STOWAGE_ONNX_MODEL_DIR` and ONNX Runtime from `STOWAGE_ONNX_RUNTIME`
//! (`scripts/stack install onnx`).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use stowage_common::testing::StackEnv;
use stowage_worker::index::embed::builtin::{BuiltinModel, DIMENSIONS};
use stowage_worker::index::embed::{
    Batcher, BuiltinSource, EmbedError, Embedder, OnnxOptions, Precision,
};
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

/// candle.
fn model() -> &'static Arc<BuiltinModel> {
    static MODEL: OnceLock<Arc<BuiltinModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = StackEnv::load().get("STOWAGE_EMBEDDING_MODEL_DIR");
        Arc::new(BuiltinModel::load(&PathBuf::from(dir)).expect("the built-in model loads"))
    })
}

fn onnx_options(precision: Precision) -> OnnxOptions {
    let env = StackEnv::load();
    OnnxOptions {
        runtime: env.get("STOWAGE_ONNX_RUNTIME").into(),
        dir: env.get("STOWAGE_ONNX_MODEL_DIR").into(),
        precision,
        threads: 0,
    }
}

/// ONNX Runtime, fp32.
fn onnx() -> &'static Arc<BuiltinModel> {
    static MODEL: OnceLock<Arc<BuiltinModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let source = BuiltinSource::Onnx(onnx_options(Precision::Fp32));
        Arc::new(source.load().expect("the ONNX graph loads"))
    })
}

/// ONNX Runtime, int8.
fn onnx_int8() -> &'static Arc<BuiltinModel> {
    static MODEL: OnceLock<Arc<BuiltinModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let source = BuiltinSource::Onnx(onnx_options(Precision::Int8));
        Arc::new(source.load().expect("the int8 ONNX graph loads"))
    })
}

/// Both fp32 backends, by name.
fn fp32_backends() -> [(&'static str, &'static Arc<BuiltinModel>); 2] {
    [("candle", model()), ("onnxruntime", onnx())]
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Cosines of `model`'s vectors with the reference, per fixture sample.
fn agreement(model: &BuiltinModel) -> Vec<(String, f32)> {
    let fixture = fixture();
    let texts: Vec<String> = fixture.samples.iter().map(|s| s.text.clone()).collect();
    let got = model.embed(&texts).expect("embeddings");
    assert_eq!(got.len(), texts.len());
    fixture
        .samples
        .iter()
        .zip(&got)
        .map(|(sample, v)| {
            assert_eq!(v.len(), DIMENSIONS);
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
            let text: String = sample.text.chars().take(60).collect();
            (text, cosine(v, &sample.vector))
        })
        .collect()
}

#[test]
fn vectors_agree_with_the_reference_implementation() {
    for (backend, model) in fp32_backends() {
        for (text, c) in agreement(model) {
            assert!(
                c >= 0.999,
                "{backend}: cosine {c} with the reference for {text:?}"
            );
        }
    }
}

#[test]
fn int8_vectors_stay_close_to_the_reference() {
    // Dynamic int8 quantisation moves vectors a little (its retrieval
    // quality is measured by the labelled evaluation, not here); this
    // catches a broken graph, which lands far away (cosine ≪ 0.9).
    let cosines = agreement(onnx_int8());
    let mean = cosines.iter().map(|(_, c)| c).sum::<f32>() / cosines.len() as f32;
    for (text, c) in &cosines {
        assert!(
            *c >= 0.95,
            "int8: cosine {c} with the reference for {text:?}"
        );
    }
    assert!(mean >= 0.98, "int8: mean cosine {mean}");
    assert!(onnx_int8().backend().starts_with("onnxruntime"));
}

#[test]
fn a_text_gets_the_same_vector_alone_or_in_any_batch() {
    let fixture = fixture();
    let texts: Vec<String> = fixture.samples.iter().map(|s| s.text.clone()).collect();
    for (backend, model) in fp32_backends() {
        let batch = model.embed(&texts).expect("batch");
        let mut reversed = texts.clone();
        reversed.reverse();
        let backwards = model.embed(&reversed).expect("reversed");
        for (i, text) in texts.iter().enumerate() {
            let alone = model.embed(std::slice::from_ref(text)).expect("alone");
            assert!(
                cosine(&alone[0], &batch[i]) > 0.9999,
                "{backend}: padding changes nothing"
            );
            assert!(cosine(&backwards[texts.len() - 1 - i], &batch[i]) > 0.9999);
        }
        assert!(model.embed(&[]).expect("nothing").is_empty());
    }
}

#[test]
fn candle_and_onnx_runtime_give_the_same_vectors() {
    let texts: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "chunk {i}: {}",
                "restoring a base backup and replaying WAL ".repeat(i % 9 + 1)
            )
        })
        .collect();
    let a = model().embed(&texts).expect("candle");
    let b = onnx().embed(&texts).expect("onnxruntime");
    for (x, y) in a.iter().zip(&b) {
        assert!(cosine(x, y) > 0.9999, "cosine {}", cosine(x, y));
    }
}

#[test]
fn a_missing_onnx_runtime_or_graph_is_a_clear_error() {
    let load = |options: OnnxOptions| {
        BuiltinSource::Onnx(options)
            .load()
            .err()
            .expect("does not load")
            .to_string()
    };
    let no_library = load(OnnxOptions {
        runtime: "/nonexistent/libonnxruntime.so.1.32.0".into(),
        ..onnx_options(Precision::Fp32)
    });
    assert!(
        no_library
            .contains("ONNX Runtime library /nonexistent/libonnxruntime.so.1.32.0 does not exist"),
        "{no_library}"
    );
    // A file that is not a shared library.
    let dir = tempfile::tempdir().expect("tempdir");
    let not_a_library = dir.path().join("libonnxruntime.so");
    std::fs::write(&not_a_library, "not ELF").expect("write");
    std::fs::copy(
        onnx_options(Precision::Fp32).dir.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .expect("copy tokenizer");
    std::fs::write(dir.path().join("model.onnx"), "not a graph").expect("write");
    let bad = load(OnnxOptions {
        runtime: not_a_library,
        dir: dir.path().to_path_buf(),
        ..onnx_options(Precision::Fp32)
    });
    assert!(
        bad.contains("ONNX Runtime") || bad.contains("session"),
        "{bad}"
    );
    // The real runtime, a broken graph, and a folder without one.
    onnx(); // the runtime is opened once per process: by the real one
    let broken = load(OnnxOptions {
        dir: dir.path().to_path_buf(),
        ..onnx_options(Precision::Fp32)
    });
    assert!(broken.contains("creating the session"), "{broken}");
    let missing = load(OnnxOptions {
        dir: dir.path().to_path_buf(),
        ..onnx_options(Precision::Int8)
    });
    assert!(missing.contains("no model_int8.onnx in"), "{missing}");
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
    batched(model()).await;
    batched(onnx()).await;
}

async fn batched(model: &Arc<BuiltinModel>) {
    let metrics = WorkerMetrics::default();
    let embedder = Embedder::Builtin(Arc::new(
        Batcher::start(model.clone(), metrics.clone()).expect("batcher"),
    ));
    let texts = |i: usize| vec![format!("document {i} about backups"), format!("note {i}")];
    let answers = futures::future::join_all((0..6).map(|i| {
        let embedder = embedder.clone();
        async move { embedder.embed(&texts(i)).await.expect("async embed") }
    }))
    .await;
    for (i, vectors) in answers.iter().enumerate() {
        let alone = model.embed(&texts(i)).expect("embed alone");
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
