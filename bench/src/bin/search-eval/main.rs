//! search-eval — retrieval quality on the labelled set in
//! `bench/eval/postgresql-15` (Debian's PostgreSQL 15 HTML manual), and
//! search latency at scale. Prints figures; asserts nothing. Run
//! `bench/eval.sh` (fetches the manual, loads the stack's settings, builds
//! this in release mode), or see `--help`.
//!
//! 1. Index: the manual's pages go into a bucket of the local stack and one
//!    sync run of an in-process worker indexes them — the real path: S3
//!    listing, extraction, chunking, the built-in model, PostgreSQL.
//! 2. Quality: every question is asked in keyword, vector and hybrid mode
//!    (the worker's default tuning); document-level recall@5 and MRR@10 are
//!    printed beside a plain BM25 over whole pages computed in this run.
//!    `--sweep` grid-searches the fusion settings on the set.
//! 3. Latency (`--latency-chunks N`): the indexed chunks are replicated
//!    (other keys, vectors jittered) into a collection of N chunks, and each
//!    mode's p50/p99 is measured over the questions, with the query's
//!    embedding time reported apart.

mod bm25;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt;
use stowage_common::spec::index::{Embedding, IndexSpec};
use stowage_common::state::collections::{self, NewCollection};
use stowage_common::state::index::{self as store, Generation, Mode, Query, Tuning};
use stowage_common::testing::{StackEnv, fresh_database, unique};
use stowage_worker::index::embed::{BuiltinModel, BuiltinSource, OnnxOptions, Precision};

#[derive(Parser)]
#[command(about = "Search quality on the labelled PostgreSQL 15 set, and latency at scale")]
struct Cli {
    /// The html/ directory of Debian's postgresql-doc-15 package.
    #[arg(long, env = "STOWAGE_EVAL_HTML")]
    html: PathBuf,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/eval/postgresql-15/questions.jsonl"))]
    questions: PathBuf,
    /// S3 server of the stack: localstack or garage.
    #[arg(long, default_value = "localstack")]
    server: String,
    /// Documents the worker indexes at once.
    #[arg(long, default_value_t = 8)]
    capacity: usize,
    /// Evaluate a database an earlier run indexed (its URL is printed)
    /// instead of indexing again.
    #[arg(long)]
    database_url: Option<String>,
    /// Grid-search RRF k, candidate depth, the keyword side's weight and the
    /// per-document cap on the set; print the best settings.
    #[arg(long)]
    sweep: bool,
    /// Replicate the indexed chunks to this many and measure latency per
    /// mode (0: skip).
    #[arg(long, default_value_t = 0)]
    latency_chunks: i64,
    /// Times every question is asked per mode in the latency run.
    #[arg(long, default_value_t = 3)]
    latency_rounds: usize,
    /// Index only the pages some question marks relevant plus every n-th
    /// other page (0: the whole manual). A quicker, easier set: its figures
    /// are not comparable with a whole-manual run's (the baseline in the
    /// same run sees the same pages).
    #[arg(long, default_value_t = 0)]
    sample_every: usize,
    /// The built-in model's backend: onnx (the worker's default when the
    /// stack has ONNX Runtime) or candle.
    #[arg(long, value_enum, default_value_t = Backend::Onnx)]
    backend: Backend,
    /// The ONNX graph's precision (int8: quantised weights).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Onnx,
    Candle,
}

/// The built-in model as `--backend` and `--precision` choose it, and the
/// worker flags that select the same.
fn builtin_model(env: &StackEnv, cli: &Cli) -> anyhow::Result<(BuiltinSource, Vec<String>)> {
    let model_dir = env
        .try_get("STOWAGE_EMBEDDING_MODEL_DIR")
        .context("STOWAGE_EMBEDDING_MODEL_DIR is not set: scripts/stack install model")?;
    let mut flags = vec![format!("--embedding-model-dir={model_dir}")];
    if cli.backend == Backend::Candle {
        return Ok((BuiltinSource::Candle(model_dir.into()), flags));
    }
    let (Some(dir), Some(runtime)) = (
        env.try_get("STOWAGE_ONNX_MODEL_DIR"),
        env.try_get("STOWAGE_ONNX_RUNTIME"),
    ) else {
        bail!("no ONNX Runtime in the stack: scripts/stack install onnx, or --backend candle");
    };
    flags.extend([
        format!("--embedding-onnx-dir={dir}"),
        format!("--onnx-runtime-path={runtime}"),
        format!("--embedding-precision={}", cli.precision.as_str()),
    ]);
    let options = OnnxOptions {
        runtime: runtime.into(),
        dir: dir.into(),
        precision: cli.precision,
        threads: 0,
    };
    Ok((BuiltinSource::Onnx(options), flags))
}

#[derive(serde::Deserialize)]
struct Question {
    style: String,
    question: String,
    relevant: HashMap<String, u8>,
}

/// Generated index pages: excluded from the collection (never relevant).
const EXCLUDE: &[&str] = &["bookindex.html", "index.html"];
const NAMESPACE: &str = "eval";
const COLLECTION: &str = "pg15";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env = StackEnv::load();
    let (model_source, model_flags) = builtin_model(&env, &cli)?;
    println!(
        "built-in model on {}",
        match &model_source {
            BuiltinSource::Candle(_) => "candle".to_string(),
            BuiltinSource::Onnx(o) => format!("ONNX Runtime, {}", o.precision.as_str()),
        }
    );
    let questions: Vec<Question> = std::fs::read_to_string(&cli.questions)
        .with_context(|| format!("reading {}", cli.questions.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("questions.jsonl")?;
    let mut pages = read_pages(&cli.html)?;
    if cli.sample_every > 0 {
        let relevant: std::collections::HashSet<&str> = questions
            .iter()
            .flat_map(|q| q.relevant.keys().map(String::as_str))
            .collect();
        let mut other = 0usize;
        pages.retain(|(name, _)| {
            relevant.contains(name.as_str()) || {
                other += 1;
                other.is_multiple_of(cli.sample_every)
            }
        });
        println!(
            "SAMPLE: the relevant pages and every {}th other page only",
            cli.sample_every
        );
    }
    println!(
        "{} questions; {} pages from {} ({} excluded: {})",
        questions.len(),
        pages.len(),
        cli.html.display(),
        EXCLUDE.len(),
        EXCLUDE.join(", ")
    );

    let database_url = match &cli.database_url {
        Some(url) => url.clone(),
        None => index(&env, &cli, &pages, &model_flags).await?,
    };
    let pg = stowage_common::db::parse_url(&database_url)?;
    let pool = stowage_common::db::pool(&pg, 4)?;
    let mut db = pool.get().await?;
    let collection = collections::find_by_name(&db, NAMESPACE, COLLECTION)
        .await?
        .context("no indexed collection in that database")?;
    let g = store::active_generation(&db, collection.id)
        .await?
        .context("the collection has no active generation")?;

    let model = tokio::task::spawn_blocking(move || model_source.load()).await??;
    let texts: Vec<String> = questions.iter().map(|q| q.question.clone()).collect();
    let vectors = model.embed(&texts)?;

    // The baseline, in this run.
    let t0 = Instant::now();
    let baseline = bm25::Index::new(
        &pages
            .iter()
            .map(|(name, html)| (name.clone(), bm25::html_text(html)))
            .collect::<Vec<_>>(),
    );
    let bm25_ranked: Vec<Vec<String>> = questions
        .iter()
        .map(|q| {
            baseline
                .search(&q.question, 10)
                .into_iter()
                .map(String::from)
                .collect()
        })
        .collect();
    let bm25_s = t0.elapsed().as_secs_f64();

    let tuning = Tuning::default();
    println!(
        "\ndocument-level (the first 10 distinct documents of {CHUNKS_ASKED} chunks); worker defaults {tuning:?}"
    );
    println!(
        "{:<22} {:>9} {:>8} {:>11} {:>11} {:>11} {:>11}",
        "mode", "recall@5", "MRR@10", "kw rec@5", "kw MRR", "para rec@5", "para MRR"
    );
    print_row("BM25 pages (baseline)", &score(&questions, &bm25_ranked));
    for (label, mode) in [
        ("keyword", Mode::Keyword),
        ("vector", Mode::Vector),
        ("hybrid", Mode::Hybrid),
    ] {
        let ranked = ask(&mut db, &g, &questions, &vectors, mode, &tuning).await?;
        print_row(label, &score(&questions, &ranked));
    }
    println!("(baseline indexed and asked in {bm25_s:.1} s)");

    if cli.sweep {
        sweep(&mut db, &g, &questions, &vectors).await?;
    }
    if cli.latency_chunks > 0 {
        drop(db);
        latency(
            &pool,
            &g,
            &questions,
            &model,
            cli.latency_chunks,
            cli.latency_rounds,
        )
        .await?;
    }
    Ok(())
}

/// Every `.html` page of the manual: (file name, text).
fn read_pages(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(String::from) else {
            continue;
        };
        if !name.ends_with(".html") || EXCLUDE.contains(&name.as_str()) {
            continue;
        }
        pages.push((name, std::fs::read_to_string(&path)?));
    }
    pages.sort();
    if pages.is_empty() {
        bail!("no .html pages in {}", dir.display());
    }
    Ok(pages)
}

/// Puts the pages in a bucket and indexes them with one sync run of an
/// in-process worker; returns the database's URL.
async fn index(
    env: &StackEnv,
    cli: &Cli,
    pages: &[(String, String)],
    model_flags: &[String],
) -> anyhow::Result<String> {
    let target = env
        .s3_targets()
        .into_iter()
        .find(|t| t.name == cli.server)
        .with_context(|| format!("no S3 server {} in the stack", cli.server))?;
    let database_url = fresh_database(env).await;
    let prefix = unique("eval");
    let creds = tempfile::tempdir()?;
    target.write_secret(creds.path(), NAMESPACE, "eval")?;
    let s3 = target.client();
    let bucket = unique("eval-").to_lowercase().replace('_', "-");
    s3.create_bucket().bucket(&bucket).send().await?;
    // The generated index pages go in too: the collection excludes them.
    let mut uploads: Vec<(String, Vec<u8>)> = pages
        .iter()
        .map(|(n, t)| (format!("pg15/html/{n}"), t.clone().into_bytes()))
        .collect();
    if cli.sample_every == 0 {
        for name in EXCLUDE {
            if let Ok(b) = std::fs::read(cli.html.join(name)) {
                uploads.push((format!("pg15/html/{name}"), b));
            }
        }
    }
    let bytes: usize = uploads.iter().map(|(_, b)| b.len()).sum();
    futures::stream::iter(uploads)
        .map(|(key, body)| {
            let (s3, bucket) = (s3.clone(), bucket.clone());
            async move {
                s3.put_object()
                    .bucket(bucket)
                    .key(key)
                    .content_type("text/html")
                    .body(body.into())
                    .send()
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    let worker = stowage_bench::start_worker(
        env,
        &database_url,
        &prefix,
        creds.path(),
        cli.capacity,
        model_flags,
    )
    .await?;
    let spec: IndexSpec = serde_json::from_value(serde_json::json!({
        "source": {"bucket": bucket, "prefix": "pg15/html/", "endpoint": target.endpoint,
                   "region": target.region, "credentialsSecretRef": {"name": "eval"},
                   "allowPrivateNetworks": true, "exclude": EXCLUDE},
    }))?;
    let (run, seconds) = stowage_bench::sync_once(&worker, NAMESPACE, COLLECTION, spec).await?;
    println!(
        "indexed from {} ({:.1} MiB) by one sync run, built-in model, capacity {}: state {}, \
         documents {} (failed {}, skipped {}), chunks {}",
        cli.server,
        bytes as f64 / f64::from(1 << 20),
        cli.capacity,
        run.state.as_str(),
        run.counts.new,
        run.counts.failed,
        run.counts.skipped,
        run.counts.chunks_written
    );
    println!(
        "{seconds:.1} s: {:.2} documents/s, {:.1} chunks/s; peak RSS of this process (worker \
         in-process) {:.0} MiB",
        run.counts.new as f64 / seconds,
        run.counts.chunks_written as f64 / seconds,
        stowage_bench::peak_rss_mib().unwrap_or(f64::NAN)
    );
    println!("database (reuse with --database-url): {database_url}");
    worker.shutdown().await?;
    Ok(database_url)
}

/// The page names of the hits, per question, best first.
async fn ask(
    db: &mut stowage_common::db::Client,
    g: &Generation,
    questions: &[Question],
    vectors: &[Vec<f32>],
    mode: Mode,
    tuning: &Tuning,
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut out = Vec::with_capacity(questions.len());
    for (q, v) in questions.iter().zip(vectors) {
        let hits = store::search_generation(
            db,
            g,
            &Query {
                mode,
                vector: Some(v),
                text: &q.question,
                top_k: CHUNKS_ASKED,
                key_prefix: None,
                content_type: None,
                tuning: *tuning,
            },
        )
        .await?;
        out.push(documents(hits.iter().map(|h| h.object_key.as_str())));
    }
    Ok(out)
}

/// Chunks asked per question: enough for 10 distinct documents in nearly
/// every answer (the soft cap puts at most `per_document` of one document
/// before the others).
const CHUNKS_ASKED: i64 = 40;

/// A ranked list of chunks as the ranked list of their documents (page
/// names), each at the rank of its best chunk: document-level evaluation,
/// as the page baseline ranks pages.
fn documents<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    keys.map(|k| k.rsplit('/').next().unwrap_or_default())
        .filter(|page| seen.insert(*page))
        .map(str::to_string)
        .collect()
}

/// recall@5 and MRR@10: all, keyword-style, paraphrase-style.
#[derive(Clone, Copy, Debug, Default)]
struct Scores {
    all: (f64, f64),
    keyword: (f64, f64),
    paraphrase: (f64, f64),
}

fn score(questions: &[Question], ranked: &[Vec<String>]) -> Scores {
    let mut sums: HashMap<&str, (f64, f64, usize)> = HashMap::new();
    for (q, pages) in questions.iter().zip(ranked) {
        let first = pages
            .iter()
            .take(10)
            .position(|p| q.relevant.contains_key(p));
        let recall = f64::from(u8::from(first.is_some_and(|r| r < 5)));
        let rr = first.map_or(0.0, |r| 1.0 / (r + 1) as f64);
        for key in ["all", q.style.as_str()] {
            let e = sums.entry(key).or_default();
            e.0 += recall;
            e.1 += rr;
            e.2 += 1;
        }
    }
    let mean = |k: &str| {
        sums.get(k).map_or((f64::NAN, f64::NAN), |&(r, m, n)| {
            (r / n as f64, m / n as f64)
        })
    };
    Scores {
        all: mean("all"),
        keyword: mean("keyword"),
        paraphrase: mean("paraphrase"),
    }
}

fn print_row(label: &str, s: &Scores) {
    println!(
        "{label:<22} {:>9.3} {:>8.3} {:>11.3} {:>11.3} {:>11.3} {:>11.3}",
        s.all.0, s.all.1, s.keyword.0, s.keyword.1, s.paraphrase.0, s.paraphrase.1
    );
}

async fn sweep(
    db: &mut stowage_common::db::Client,
    g: &Generation,
    questions: &[Question],
    vectors: &[Vec<f32>],
) -> anyhow::Result<()> {
    // The keyword side alone first (its own settings), then fusion on top.
    let mut keyword = Vec::new();
    for title_weight in [0.0, 0.5, 1.0, 2.0, 3.0] {
        for heading_weight in [0.5, 1.0, 2.0] {
            for b in [0.0, 0.25, 0.5, 0.75] {
                let t = Tuning {
                    title_weight,
                    heading_weight,
                    b,
                    ..Tuning::default()
                };
                let s = score(
                    questions,
                    &ask(db, g, questions, vectors, Mode::Keyword, &t).await?,
                );
                keyword.push((s.all.0 + s.all.1, t, s));
            }
        }
    }
    keyword.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("\nsweep, keyword side (title weight, heading weight, b): best 5");
    for (_, t, s) in keyword.iter().take(5) {
        print_row(
            &format!("t{} h{} b{}", t.title_weight, t.heading_weight, t.b),
            s,
        );
    }
    let base = keyword.first().map(|k| k.1).unwrap_or_default();
    let mut fused = Vec::new();
    for rrf_k in [10.0, 20.0, 40.0, 60.0, 100.0] {
        for depth in [CHUNKS_ASKED, 2 * CHUNKS_ASKED, 4 * CHUNKS_ASKED] {
            for keyword_weight in [0.5, 0.75, 1.0, 1.5, 2.0] {
                for per_document in [1, 2] {
                    let t = Tuning {
                        rrf_k,
                        depth,
                        keyword_weight,
                        per_document,
                        ..base
                    };
                    let s = score(
                        questions,
                        &ask(db, g, questions, vectors, Mode::Hybrid, &t).await?,
                    );
                    fused.push((s.all.0 + s.all.1, t, s));
                }
            }
        }
    }
    fused.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("\nsweep, hybrid (RRF k, depth, keyword weight, per-document cap): best 10");
    for (_, t, s) in fused.iter().take(10) {
        print_row(
            &format!(
                "k{} d{} w{} cap{}",
                t.rrf_k, t.depth, t.keyword_weight, t.per_document
            ),
            s,
        );
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(
    pool: &stowage_common::db::Pool,
    source: &Generation,
    questions: &[Question],
    model: &BuiltinModel,
    chunks: i64,
    rounds: usize,
) -> anyhow::Result<()> {
    let mut db = pool.get().await?;
    let id = collections::register(
        &db,
        &NewCollection {
            namespace: NAMESPACE.into(),
            name: unique("latency").to_lowercase().replace('_', "-"),
            source_uid: unique("uid"),
            generation: 1,
            spec: serde_json::from_value(serde_json::json!({"source": {"bucket": "latency"}}))?,
        },
    )
    .await?;
    let g = store::generation_for(&mut db, id, &Embedding::default()).await?;
    let have: i64 = db
        .query_one(
            "SELECT count(*) FROM chunks WHERE generation_id = $1",
            &[&source.id],
        )
        .await?
        .get(0);
    if have == 0 {
        bail!("the indexed collection has no chunks");
    }
    let copies = (chunks + have - 1) / have;
    let t0 = Instant::now();
    // Copy r of every chunk under another key, its vector jittered (an HNSW
    // graph of exact duplicates is not what a real collection builds).
    for r in 0..copies {
        db.execute(
            "INSERT INTO chunks (generation_id, object_key, ordinal, content, content_type,
                 byte_start, byte_end, char_start, char_end, heading_path, title, embedding)
             SELECT $1, 'copy-' || $3::int8 || '/' || object_key, ordinal, content, content_type,
                    byte_start, byte_end, char_start, char_end, heading_path, title,
                    (SELECT array_agg(x + (random()::real - 0.5::real) * 0.02::real)
                     FROM unnest(embedding::real[]) x)::vector
             FROM chunks WHERE generation_id = $2
             ORDER BY id LIMIT $4",
            &[&g.id, &source.id, &r, &(chunks - r * have).min(have)],
        )
        .await?;
    }
    let loaded = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    db.batch_execute("SET maintenance_work_mem = '512MB'")
        .await?;
    store::activate(&mut db, g.id).await?;
    db.batch_execute("RESET maintenance_work_mem; ANALYZE chunks")
        .await?;
    let built = t0.elapsed().as_secs_f64();
    let g = store::active_generation(&db, id)
        .await?
        .context("the latency collection's generation")?;
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM chunks WHERE generation_id = $1",
            &[&g.id],
        )
        .await?
        .get(0);
    println!(
        "\nlatency: {n} chunks (the indexed {have} copied {copies}×, vectors jittered): loaded in \
         {loaded:.1} s; HNSW + keyword statistics in {built:.1} s"
    );
    // The query's embedding, one at a time, as a search does it.
    let mut embed_ms = Vec::new();
    let mut vectors = Vec::new();
    for q in questions {
        let t = Instant::now();
        let v = model.embed(std::slice::from_ref(&q.question))?;
        embed_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        vectors.extend(v);
    }
    embed_ms.sort_by(f64::total_cmp);
    println!(
        "{:<30} {:>9} {:>9} {:>9}",
        "top 10, worker defaults", "p50 ms", "p99 ms", "queries"
    );
    println!(
        "{:<30} {:>9.2} {:>9.2} {:>9}",
        "query embedding (built-in)",
        percentile(&embed_ms, 0.5),
        percentile(&embed_ms, 0.99),
        embed_ms.len()
    );
    for (label, mode, prefix) in [
        ("keyword (BM25)", Mode::Keyword, None),
        ("vector (HNSW)", Mode::Vector, None),
        ("hybrid", Mode::Hybrid, None),
        (
            "hybrid, 1/{copies} by key prefix",
            Mode::Hybrid,
            Some("copy-0/"),
        ),
    ] {
        let mut times = Vec::new();
        let mut short = 0;
        for _ in 0..rounds {
            for (q, v) in questions.iter().zip(&vectors) {
                let t = Instant::now();
                let hits = store::search_generation(
                    &mut db,
                    &g,
                    &Query {
                        mode,
                        vector: Some(v),
                        text: &q.question,
                        top_k: 10,
                        key_prefix: prefix,
                        content_type: None,
                        tuning: Tuning::default(),
                    },
                )
                .await?;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                if hits.len() < 10 && mode != Mode::Keyword {
                    short += 1;
                }
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{:<30} {:>9.2} {:>9.2} {:>9}{}",
            label.replace("{copies}", &copies.to_string()),
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.len(),
            if short > 0 {
                format!("  ({short} answers with fewer than 10 hits)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
