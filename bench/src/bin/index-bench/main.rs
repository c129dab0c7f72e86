//! index-bench — the index path's benchmarks on the local stack. Prints
//! figures and ratios; asserts nothing. Run `bench/index.sh` (which builds
//! this in release mode and loads the stack's settings), or see `--help`.
//!
//! - `embed`: the built-in model (candle) against the Python reference
//!   (sentence-transformers, same weights) on the same texts, in one run.
//! - `index`: one sync run over a generated corpus of documents.
//! - `search`: search latency per mode over N generated chunks, against an
//!   exact (sequential-scan) vector search as the reference.

mod corpus;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use prost::Message as _;
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::{Embedding, IndexSpec};
use stowage_common::state::collections::{self, NewCollection};
use stowage_common::state::index::{self as store, Mode, Query};
use stowage_common::testing::{StackEnv, fresh_database, fresh_schema, unique};
use stowage_proto::v1::{CollectionProgress, SyncCollection, Task, task};
use stowage_worker::index::embed::BuiltinModel;

use corpus::Generator;

#[derive(Parser)]
#[command(about = "Benchmarks of Stowage's index path (prints figures, asserts nothing)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Embedding throughput: the built-in model vs the Python reference.
    Embed {
        /// Chunk-sized texts to embed.
        #[arg(long, default_value_t = 512)]
        texts: usize,
        /// Python with sentence-transformers (`scripts/stack install embedref`).
        #[arg(long, env = "STOWAGE_EMBEDREF_PYTHON")]
        python: Option<PathBuf>,
        /// Batch sizes to try for the built-in model (the reference uses 32).
        #[arg(long, value_delimiter = ',', default_value = "8,16,32")]
        batches: Vec<usize>,
    },
    /// Indexing throughput: one sync run over generated Markdown documents.
    Index {
        #[arg(long, default_value_t = 2000)]
        docs: usize,
        /// S3 server of the stack: localstack or garage.
        #[arg(long, default_value = "garage")]
        server: String,
        /// Documents the worker indexes at once (their chunks share the
        /// model's batches).
        #[arg(long, default_value_t = 8)]
        capacity: usize,
    },
    /// Search latency per mode over generated chunks (384-d vectors).
    Search {
        #[arg(long, default_value_t = 100_000)]
        chunks: usize,
        #[arg(long, default_value_t = 300)]
        queries: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Embed {
            texts,
            python,
            batches,
        } => embed(texts, python, &batches).await,
        Cmd::Index {
            docs,
            server,
            capacity,
        } => index(docs, &server, capacity).await,
        Cmd::Search { chunks, queries } => search(chunks, queries).await,
    }
}

fn model_dir(env: &StackEnv) -> anyhow::Result<PathBuf> {
    env.try_get("STOWAGE_EMBEDDING_MODEL_DIR")
        .map(PathBuf::from)
        .context("STOWAGE_EMBEDDING_MODEL_DIR is not set: scripts/stack install model")
}

async fn embed(n: usize, python: Option<PathBuf>, batches: &[usize]) -> anyhow::Result<()> {
    let env = StackEnv::load();
    let dir = model_dir(&env)?;
    let mut g = Generator::new(7);
    let texts: Vec<String> = (0..n).map(|_| g.chunk().1).collect();
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), serde_json::to_vec(&texts)?)?;

    let mut model = BuiltinModel::load(&dir)?;
    model.embed(&texts[..texts.len().min(32)])?; // warm-up
    println!("embedding {n} chunk-sized texts, all-MiniLM-L6-v2, CPU");
    println!(
        "{:<34} {:>9} {:>10}",
        "implementation", "seconds", "texts/s"
    );
    let (mut ours, mut rust_s) = (Vec::new(), f64::INFINITY);
    for &batch in batches {
        model = model.with_batch(batch);
        let t0 = Instant::now();
        let vectors = model.embed(&texts)?;
        let seconds = t0.elapsed().as_secs_f64();
        println!(
            "{:<34} {:>9.2} {:>10.1}",
            format!("stowage builtin (candle), batch {batch}"),
            seconds,
            n as f64 / seconds
        );
        if seconds < rust_s {
            (ours, rust_s) = (vectors, seconds);
        }
    }
    let Some(python) = python.or_else(|| env.try_get("STOWAGE_EMBEDREF_PYTHON").map(PathBuf::from))
    else {
        println!("(no Python reference: scripts/stack install embedref)");
        return Ok(());
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/embedding/reference.py");
    let out = std::process::Command::new(&python)
        .args([script, "bench", &file.path().display().to_string()])
        .env("STOWAGE_EMBEDDING_MODEL_DIR", &dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "reference.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let mut answer: serde_json::Value =
        serde_json::from_str(line.lines().last().unwrap_or("{}")).context("reference output")?;
    let py_s = answer["seconds"].as_f64().context("reference seconds")?;
    println!(
        "{:<34} {:>9.2} {:>10.1}",
        "sentence-transformers, batch 32",
        py_s,
        n as f64 / py_s
    );
    println!(
        "stowage (best batch) / reference throughput: {:.2}",
        py_s / rust_s
    );
    // Agreement on these texts too (the test checks the fixture).
    if let Ok(reference) = serde_json::from_value::<Vec<Vec<f32>>>(answer["vectors"].take()) {
        let worst = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>())
            .fold(f32::INFINITY, f32::min);
        println!("lowest cosine between the two on these texts: {worst:.6}");
    }
    Ok(())
}

async fn index(docs: usize, server: &str, capacity: usize) -> anyhow::Result<()> {
    let env = StackEnv::load();
    let target = env
        .s3_targets()
        .into_iter()
        .find(|t| t.name == server)
        .with_context(|| format!("no S3 server {server} in the stack"))?;
    let database_url = fresh_database(&env).await;
    let prefix = unique("bench");
    let creds = tempfile::tempdir()?;
    target.write_secret(creds.path(), "bench", "bench")?;
    let s3 = target.client();
    let bucket = unique("bench-").to_lowercase().replace('_', "-");
    s3.create_bucket().bucket(&bucket).send().await?;
    let mut g = Generator::new(11);
    let corpus: Vec<(String, String)> = (0..docs)
        .map(|i| {
            (
                format!("kb/doc-{i:05}.md"),
                g.document(&format!("Note {i}")),
            )
        })
        .collect();
    let bytes: usize = corpus.iter().map(|(_, t)| t.len()).sum();
    futures::stream::iter(corpus)
        .map(|(key, text)| {
            let (s3, bucket) = (s3.clone(), bucket.clone());
            async move {
                s3.put_object()
                    .bucket(bucket)
                    .key(key)
                    .content_type("text/markdown")
                    .body(text.into_bytes().into())
                    .send()
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    let worker = stowage_worker::start(
        stowage_worker::config::WorkerArgs::parse_from([
            "stowage-worker".to_string(),
            format!("--database-url={database_url}"),
            format!("--nats-url={}", env.nats_url()),
            format!("--queue-prefix={prefix}"),
            format!("--credentials-dir={}", creds.path().display()),
            format!("--embedding-model-dir={}", model_dir(&env)?.display()),
            "--grpc-addr=127.0.0.1:0".into(),
            "--auth-mode=none".into(),
            "--allow-private-networks=true".into(),
            "--metrics-addr=127.0.0.1:0".into(),
            format!("--capacity={capacity}"),
        ]),
        None,
    )
    .await?;
    let spec: IndexSpec = serde_json::from_value(serde_json::json!({
        "source": {"bucket": bucket, "prefix": "kb/", "endpoint": target.endpoint,
                   "region": target.region, "credentialsSecretRef": {"name": "bench"},
                   "allowPrivateNetworks": true},
    }))?;
    let id = {
        let db = worker.context.db.get().await?;
        collections::register(
            &db,
            &NewCollection {
                namespace: "bench".into(),
                name: "kb".into(),
                source_uid: unique("uid"),
                generation: 1,
                spec,
            },
        )
        .await?
    };
    let queue = &worker.context.queue;
    let mut events = queue
        .client()
        .subscribe(queue.topology().progress_wildcard())
        .await?;
    let t0 = Instant::now();
    queue
        .publish_task(
            &queue
                .topology()
                .task_subject(TaskKind::IndexSync, "bench", "kb"),
            &Task {
                task_id: format!("index-sync/{id}/bench"),
                kind: Some(task::Kind::SyncCollection(SyncCollection {
                    collection_id: id.to_string(),
                    trigger: "manual".into(),
                })),
            },
        )
        .await?;
    while let Some(msg) = events.next().await {
        if let Ok(p) = CollectionProgress::decode(msg.payload.as_ref())
            && p.run_state != "in_progress"
        {
            break;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let run = {
        let db = worker.context.db.get().await?;
        collections::latest_run(&db, id).await?.context("a run")?
    };
    println!(
        "one sync run, built-in model, {server}, capacity {capacity}: {docs} Markdown documents, {:.1} MiB",
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "state {}, new {}, failed {}, chunks {}",
        run.state.as_str(),
        run.counts.new,
        run.counts.failed,
        run.counts.chunks_written
    );
    println!(
        "{seconds:.1} s: {:.1} documents/s, {:.1} chunks/s",
        run.counts.new as f64 / seconds,
        run.counts.chunks_written as f64 / seconds
    );
    worker.shutdown().await?;
    Ok(())
}

async fn search(chunks: usize, queries: usize) -> anyhow::Result<()> {
    const DIMS: usize = 384;
    let (pool, _) = fresh_schema(&StackEnv::load()).await;
    let mut client = pool.get().await?;
    let id = collections::register(
        &client,
        &NewCollection {
            namespace: "bench".into(),
            name: "kb".into(),
            source_uid: unique("uid"),
            generation: 1,
            spec: serde_json::from_value(serde_json::json!({"source": {"bucket": "bench"}}))?,
        },
    )
    .await?;
    let generation = store::generation_for(&mut client, id, &Embedding::default()).await?;
    let mut g = Generator::new(3);
    let centers: Vec<Vec<f32>> = (0..corpus::TOPICS.len() * 8)
        .map(|_| g.unit(DIMS))
        .collect();
    let t0 = Instant::now();
    for start in (0..chunks).step_by(1000) {
        let n = 1000.min(chunks - start);
        let (mut keys, mut ordinals, mut texts, mut vectors) = (vec![], vec![], vec![], vec![]);
        for i in start..start + n {
            let (topic, text) = g.chunk();
            let center = &centers[topic * 8 + i % 8];
            let v = g.near(center, 0.08);
            keys.push(format!("kb/doc-{:06}.md", i / 4));
            ordinals.push((i % 4) as i32);
            texts.push(text);
            vectors.push(format!(
                "[{}]",
                v.iter().map(f32::to_string).collect::<Vec<_>>().join(",")
            ));
        }
        client
            .execute(
                "INSERT INTO chunks (generation_id, object_key, ordinal, content, content_type,
                     byte_start, byte_end, char_start, char_end, heading_path, embedding)
                 SELECT $1, k, o, c, 'text/markdown', 0, length(c), 0, length(c), '{}', e::vector
                 FROM unnest($2::text[], $3::int[], $4::text[], $5::text[]) AS t(k, o, c, e)",
                &[&generation.id, &keys, &ordinals, &texts, &vectors],
            )
            .await?;
    }
    let loaded = t0.elapsed();
    let t0 = Instant::now();
    store::activate(&mut client, generation.id).await?;
    let indexed = t0.elapsed();
    client.batch_execute("ANALYZE chunks").await?;
    let generation = store::active_generation(&client, id)
        .await?
        .context("active generation")?;
    println!(
        "{chunks} chunks of 384 dimensions: loaded in {:.1} s, HNSW (m 16, ef_construction 64) built in {:.1} s",
        loaded.as_secs_f64(),
        indexed.as_secs_f64()
    );
    let probes: Vec<(Vec<f32>, String)> = (0..queries)
        .map(|i| {
            let topic = i % corpus::TOPICS.len();
            let v = g.near(&centers[topic * 8 + i % 8], 0.1);
            (v, g.words(topic, 2))
        })
        .collect();
    println!(
        "{:<28} {:>9} {:>9} {:>9}",
        "mode (top 10)", "p50 ms", "p99 ms", "q/s"
    );
    let mut p50_hnsw = 0.0;
    for (label, mode, exact) in [
        ("vector (HNSW)", Mode::Vector, false),
        ("keyword (BM25)", Mode::Keyword, false),
        ("hybrid (RRF)", Mode::Hybrid, false),
        ("vector, exact scan", Mode::Vector, true),
    ] {
        if exact {
            client
                .batch_execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
                .await?;
        }
        let mut times = Vec::with_capacity(probes.len());
        for (vector, words) in &probes {
            let q = Query {
                mode,
                vector: Some(vector),
                text: words,
                top_k: 10,
                key_prefix: None,
                content_type: None,
                tuning: Default::default(),
            };
            let t = Instant::now();
            let hits = store::search_generation(&mut client, &generation, &q).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            if hits.is_empty() && mode != Mode::Keyword {
                bail!("{label}: no hits");
            }
        }
        times.sort_by(f64::total_cmp);
        let p = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
        let total: f64 = times.iter().sum();
        println!(
            "{label:<28} {:>9.2} {:>9.2} {:>9.0}",
            p(0.5),
            p(0.99),
            times.len() as f64 / (total / 1000.0)
        );
        if label == "vector (HNSW)" {
            p50_hnsw = p(0.5);
        } else if exact {
            println!("exact scan p50 / HNSW p50: {:.1}", p(0.5) / p50_hnsw);
        }
    }
    Ok(())
}
