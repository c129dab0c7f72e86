//! Search quality on the built-in model, on the real stack: a small labelled
//! corpus (`fixtures/relevance.json`: 20 documents on operations, cooking,
//! gardening, finance, HR and travel; 16 queries phrased without the
//! documents' words where possible, each with the document it is about) is
//! synced by a worker and queried over gRPC in each mode.

mod support;

use std::collections::BTreeMap;

use serde::Deserialize;
use stowage_common::state::collections::RunState;
use stowage_proto::v1::search_client::SearchClient;
use stowage_proto::v1::{SearchMode, SearchRequest};
use support::Harness;
use support::index::{put, register, source, sync};

#[derive(Deserialize)]
struct Labelled {
    query: String,
    expected: String,
}

#[derive(Deserialize)]
struct Corpus {
    documents: BTreeMap<String, String>,
    queries: Vec<Labelled>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_labelled_corpus_finds_the_expected_documents() {
    let corpus: Corpus =
        serde_json::from_str(include_str!("fixtures/relevance.json")).expect("fixture");
    let h = Harness::new("localstack").await;
    let model_dir = h.env.get("STOWAGE_EMBEDDING_MODEL_DIR");
    let worker = h
        .worker_with(&[&format!("--embedding-model-dir={model_dir}")], None)
        .await;
    for (key, text) in &corpus.documents {
        put(&h, &format!("kb/{key}"), "text/markdown", text.as_bytes()).await;
    }
    let source = source(&h, "kb/");
    let id = register(&h, serde_json::json!({"source": source})).await;
    let run = sync(&h, id, "one").await;
    assert_eq!(run.state, RunState::Completed, "{run:?}");
    assert_eq!(run.counts.new, corpus.documents.len() as i64);

    let mut client = SearchClient::connect(format!("http://{}", worker.grpc_addr))
        .await
        .expect("gRPC");
    // Per mode: queries whose document is first, and in the top 3.
    let mut scores = BTreeMap::new();
    for mode in [SearchMode::Vector, SearchMode::Hybrid, SearchMode::Keyword] {
        let (mut first, mut top3) = (0, 0);
        for q in &corpus.queries {
            let hits = client
                .query(SearchRequest {
                    namespace: "team-a".into(),
                    collection: "kb".into(),
                    query: q.query.clone(),
                    mode: mode as i32,
                    top_k: 3,
                    ..Default::default()
                })
                .await
                .expect("query")
                .into_inner()
                .hits;
            let want = format!("kb/{}", q.expected);
            let rank = hits.iter().position(|h| h.key == want);
            first += usize::from(rank == Some(0));
            top3 += usize::from(rank.is_some());
            if mode != SearchMode::Keyword {
                assert!(
                    rank.is_some(),
                    "{mode:?} {:?}: {want} not in the top 3: {:?}",
                    q.query,
                    hits.iter().map(|h| &h.key).collect::<Vec<_>>()
                );
            }
        }
        scores.insert(format!("{mode:?}"), (first, top3));
    }
    let n = corpus.queries.len();
    let (vector_first, _) = scores["Vector"];
    let (hybrid_first, _) = scores["Hybrid"];
    let (_, keyword_top3) = scores["Keyword"];
    assert!(
        vector_first * 10 >= n * 8 && hybrid_first * 10 >= n * 8,
        "the expected document ranks first for ≥ 80% of queries: {scores:?} of {n}"
    );
    assert!(
        keyword_top3 < n,
        "the queries avoid the documents' words, so keywords alone miss some: {scores:?}"
    );
}
