//! index-bench — the index path's benchmarks on the local stack. Prints
//! figures and ratios; asserts nothing. Run `bench/index.sh` (which builds
//! this in release mode and loads the stack's settings), or see `--help`.
//!
//! - `embed`: the built-in model (candle; ONNX Runtime fp32 and int8) against
//!   the Python reference (sentence-transformers, same weights) on the same
//!   texts, in one run: throughput per wall second and per CPU-second, and
//!   agreement of the vectors.
//! - `index`: one sync run over a generated corpus of documents, or over a
//!   directory of real ones (`--dir`: the labelled set's PostgreSQL manual).
//! - `extract`: extraction and chunking alone over a directory (no stack).
//! - `search`: search latency per mode over N generated chunks, against an
//!   exact (sequential-scan) vector search as the reference.

mod corpus;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use stowage_common::spec::index::{Embedding, IndexSpec};
use stowage_common::state::collections::{self, NewCollection};
use stowage_common::state::index::{self as store, Mode, Query};
use stowage_common::testing::{StackEnv, fresh_database, fresh_schema, unique};
use stowage_worker::index::embed::onnx::available_cpus;
use stowage_worker::index::embed::{BuiltinModel, OnnxOptions, Precision};

use corpus::Generator;

#[derive(Parser)]
#[command(about = "Benchmarks of Stowage's index path (prints figures, asserts nothing)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Embedding throughput: the built-in model's backends vs the Python reference.
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
    /// Indexing throughput: one sync run over generated Markdown documents,
    /// or over the files of a directory.
    Index {
        #[arg(long, default_value_t = 2000)]
        docs: usize,
        /// Index these files instead (every file under it, keys relative to
        /// it, the content type from the extension).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The collection's `source.exclude` globs (e.g. `**/bookindex.html`).
        #[arg(long)]
        exclude: Vec<String>,
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
    /// Extraction and chunking alone (default chunking) over a directory's
    /// files: documents/s, chunks/s, chunk sizes, peak RSS.
    Extract {
        dir: PathBuf,
        /// Files whose name contains this are left out (repeatable).
        #[arg(long)]
        skip: Vec<String>,
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
            dir,
            exclude,
            server,
            capacity,
        } => index(docs, dir, exclude, &server, capacity).await,
        Cmd::Search { chunks, queries } => search(chunks, queries).await,
        Cmd::Extract { dir, skip } => extract(&dir, &skip),
    }
}

fn model_dir(env: &StackEnv) -> anyhow::Result<PathBuf> {
    env.try_get("STOWAGE_EMBEDDING_MODEL_DIR")
        .map(PathBuf::from)
        .context("STOWAGE_EMBEDDING_MODEL_DIR is not set: scripts/stack install model")
}

/// CPU time this process has used (all threads, user + system), from
/// `/proc/self/stat` (clock ticks of 1/100 s, Linux's USER_HZ).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// One implementation's run over the texts.
struct Run {
    name: String,
    seconds: f64,
    cpu: f64,
    vectors: Vec<Vec<f32>>,
}

impl Run {
    fn print(&self, n: usize, reference: Option<&Run>) {
        let ratio = |ours: f64, theirs: f64| {
            if theirs > 0.0 {
                format!("{:>6.2}", ours / theirs)
            } else {
                format!("{:>6}", "-")
            }
        };
        let (per_s, per_cpu) = (n as f64 / self.seconds, n as f64 / self.cpu.max(1e-9));
        let (vs_s, vs_cpu) = match reference {
            Some(r) => (
                ratio(per_s, n as f64 / r.seconds),
                ratio(per_cpu, n as f64 / r.cpu.max(1e-9)),
            ),
            None => (format!("{:>6}", "-"), format!("{:>6}", "-")),
        };
        println!(
            "{:<40} {:>8.2} {:>8.2} {:>9.1} {:>11.1} {vs_s} {vs_cpu}",
            self.name, self.seconds, self.cpu, per_s, per_cpu
        );
    }
}

fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let c: Vec<f32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>())
        .collect();
    let min = c.iter().copied().fold(f32::INFINITY, f32::min);
    (min, c.iter().sum::<f32>() / c.len().max(1) as f32)
}

/// Mean share of each text's 10 nearest neighbours (among the other texts,
/// by cosine) that `b` finds as `a` does: what a vector search would return.
fn neighbour_overlap(a: &[Vec<f32>], b: &[Vec<f32>], k: usize) -> f64 {
    let top = |vs: &[Vec<f32>], i: usize| -> Vec<usize> {
        let mut scored: Vec<(f32, usize)> = vs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, v)| (v.iter().zip(&vs[i]).map(|(p, q)| p * q).sum::<f32>(), j))
            .collect();
        scored.sort_by(|x, y| y.0.total_cmp(&x.0));
        scored.into_iter().take(k).map(|(_, j)| j).collect()
    };
    let n = a.len().min(b.len());
    let shared: usize = (0..n)
        .map(|i| {
            let ta = top(a, i);
            top(b, i).iter().filter(|j| ta.contains(j)).count()
        })
        .sum();
    shared as f64 / (n.max(1) * k) as f64
}

/// The fastest of `batches` for one backend.
fn best_run(
    name: &str,
    mut model: BuiltinModel,
    texts: &[String],
    batches: &[usize],
) -> anyhow::Result<Run> {
    model.embed(&texts[..texts.len().min(32)])?; // warm-up
    let mut best: Option<Run> = None;
    for &batch in batches {
        model = model.with_batch(batch);
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let vectors = model.embed(texts)?;
        let run = Run {
            name: format!("{name}, batch {batch}"),
            seconds: t0.elapsed().as_secs_f64(),
            cpu: cpu_seconds() - c0,
            vectors,
        };
        run.print(texts.len(), None);
        if best.as_ref().is_none_or(|b| run.cpu < b.cpu) {
            best = Some(run);
        }
    }
    best.context("no batch size given")
}

async fn embed(n: usize, python: Option<PathBuf>, batches: &[usize]) -> anyhow::Result<()> {
    let env = StackEnv::load();
    let dir = model_dir(&env)?;
    let mut g = Generator::new(7);
    let texts: Vec<String> = (0..n).map(|_| g.chunk().1).collect();
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), serde_json::to_vec(&texts)?)?;

    println!(
        "embedding {n} chunk-sized texts, all-MiniLM-L6-v2, CPU ({} CPUs available)",
        available_cpus()
    );
    println!(
        "{:<40} {:>8} {:>8} {:>9} {:>11} {:>6} {:>6}",
        "implementation", "wall s", "CPU s", "texts/s", "texts/CPU-s", "×ref", "×refCPU"
    );
    let mut runs = vec![best_run(
        "candle",
        BuiltinModel::load(&dir)?,
        &texts,
        batches,
    )?];
    match (
        env.try_get("STOWAGE_ONNX_MODEL_DIR"),
        env.try_get("STOWAGE_ONNX_RUNTIME"),
    ) {
        (Some(onnx_dir), Some(runtime)) => {
            for precision in [Precision::Fp32, Precision::Int8] {
                let options = OnnxOptions {
                    runtime: runtime.clone().into(),
                    dir: onnx_dir.clone().into(),
                    precision,
                    threads: 0,
                };
                let name = format!("onnxruntime {}", precision.as_str());
                let model = BuiltinModel::load_onnx(&options)?;
                runs.push(best_run(&name, model, &texts, batches)?);
            }
        }
        _ => println!("(no ONNX Runtime: scripts/stack install onnx)"),
    }
    let reference =
        match python.or_else(|| env.try_get("STOWAGE_EMBEDREF_PYTHON").map(PathBuf::from)) {
            None => {
                println!("(no Python reference: scripts/stack install embedref)");
                None
            }
            Some(python) => {
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
                    serde_json::from_str(line.lines().last().unwrap_or("{}"))
                        .context("reference output")?;
                Some(Run {
                    name: "sentence-transformers (torch), batch 32".into(),
                    seconds: answer["seconds"].as_f64().context("reference seconds")?,
                    cpu: answer["cpu_seconds"].as_f64().unwrap_or(0.0),
                    vectors: serde_json::from_value(answer["vectors"].take()).unwrap_or_default(),
                })
            }
        };
    println!("\nbest batch of each (lowest CPU time), ×ref = throughput / the reference's:");
    if let Some(r) = &reference {
        r.print(n, None);
    }
    for run in &runs {
        run.print(n, reference.as_ref());
    }
    println!("\nagreement on these texts (cosine min / mean; top-10 neighbour overlap):");
    let fp32 = &runs[0];
    for run in &runs {
        if let Some(r) = reference.as_ref().filter(|r| !r.vectors.is_empty()) {
            let (min, mean) = cosines(&run.vectors, &r.vectors);
            println!(
                "{:<40} vs reference: {min:.6} / {mean:.6}; overlap {:.3}",
                run.name,
                neighbour_overlap(&r.vectors, &run.vectors, 10)
            );
        }
        if !std::ptr::eq(run, fp32) {
            let (min, mean) = cosines(&run.vectors, &fp32.vectors);
            println!(
                "{:<40} vs candle:    {min:.6} / {mean:.6}; overlap {:.3}",
                run.name,
                neighbour_overlap(&fp32.vectors, &run.vectors, 10)
            );
        }
    }
    Ok(())
}

/// The files under `dir` (recursively): key relative to it, bytes.
fn read_dir(dir: &std::path::Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let key = path.strip_prefix(dir)?.to_string_lossy().replace('\\', "/");
                out.push((key, std::fs::read(&path)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn content_type(key: &str) -> &'static str {
    match key.rsplit('.').next().unwrap_or_default() {
        "html" | "htm" => "text/html",
        "md" => "text/markdown",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "css" => "text/css",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

fn extract(dir: &std::path::Path, skip: &[String]) -> anyhow::Result<()> {
    use stowage_worker::index::{chunk, extract};
    let files: Vec<(String, Vec<u8>)> = read_dir(dir)?
        .into_iter()
        .filter(|(k, _)| !skip.iter().any(|s| k.contains(s.as_str())))
        .collect();
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    stowage_bench::reset_peak_rss();
    let cfg = stowage_common::spec::index::Chunking::default();
    let t0 = Instant::now();
    let (mut docs, mut skipped, mut text_bytes) = (0usize, 0usize, 0usize);
    let mut lens: Vec<usize> = Vec::new();
    let mut most = (0usize, String::new());
    let mut no_path = 0usize;
    for (key, body) in &files {
        let Ok(doc) = extract::extract(
            Some(content_type(key)),
            key,
            body,
            extract::DEFAULT_MAX_BYTES,
        ) else {
            skipped += 1;
            continue;
        };
        docs += 1;
        text_bytes += doc.text.len();
        let chunks = chunk::chunk_document(&doc, &cfg)?;
        if chunks.len() > most.0 {
            most = (chunks.len(), key.clone());
        }
        no_path += chunks.iter().filter(|c| c.heading_path.is_empty()).count();
        lens.extend(chunks.iter().map(|c| c.text.chars().count()));
    }
    let seconds = t0.elapsed().as_secs_f64();
    lens.sort_unstable();
    let pct = |q: f64| {
        lens.get(((lens.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "extraction + chunking (size 1000, overlap 100) of {} files, {:.1} MiB: {docs} documents, {skipped} skipped",
        files.len(),
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "{seconds:.2} s: {:.0} documents/s, {:.0} chunks/s; text {:.1} MiB ({:.0}% of the input)",
        docs as f64 / seconds,
        lens.len() as f64 / seconds,
        text_bytes as f64 / (1 << 20) as f64,
        100.0 * text_bytes as f64 / bytes.max(1) as f64
    );
    println!(
        "{} chunks ({:.1} per document; most: {} in {}); length p10 {} / median {} / p90 {} characters; {} without a heading path",
        lens.len(),
        lens.len() as f64 / docs.max(1) as f64,
        most.0,
        most.1,
        pct(0.1),
        pct(0.5),
        pct(0.9),
        no_path
    );
    if let Some(mib) = stowage_bench::peak_rss_mib() {
        println!(
            "peak RSS {mib:.0} MiB (the files themselves: {:.0} MiB)",
            bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

async fn index(
    docs: usize,
    dir: Option<PathBuf>,
    exclude: Vec<String>,
    server: &str,
    capacity: usize,
) -> anyhow::Result<()> {
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
    let corpus: Vec<(String, Vec<u8>)> = match &dir {
        Some(dir) => read_dir(dir)?
            .into_iter()
            .map(|(k, b)| (format!("kb/{k}"), b))
            .collect(),
        None => {
            let mut g = Generator::new(11);
            (0..docs)
                .map(|i| {
                    (
                        format!("kb/doc-{i:05}.md"),
                        g.document(&format!("Note {i}")).into_bytes(),
                    )
                })
                .collect()
        }
    };
    let (files, bytes) = (
        corpus.len(),
        corpus.iter().map(|(_, t)| t.len()).sum::<usize>(),
    );
    futures::stream::iter(corpus)
        .map(|(key, body)| {
            let (s3, bucket) = (s3.clone(), bucket.clone());
            async move {
                s3.put_object()
                    .bucket(bucket)
                    .content_type(content_type(&key))
                    .key(key)
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
        &env,
        &database_url,
        &prefix,
        creds.path(),
        capacity,
        &[format!(
            "--embedding-model-dir={}",
            model_dir(&env)?.display()
        )],
    )
    .await?;
    let spec: IndexSpec = serde_json::from_value(serde_json::json!({
        "source": {"bucket": bucket, "prefix": "kb/", "endpoint": target.endpoint,
                   "region": target.region, "credentialsSecretRef": {"name": "bench"},
                   "allowPrivateNetworks": true, "exclude": exclude},
    }))?;
    let (run, seconds) = stowage_bench::sync_once(&worker, "bench", "kb", spec).await?;
    let peak = stowage_bench::peak_rss_mib();
    let what = match &dir {
        Some(d) => format!("the {files} files of {}", d.display()),
        None => format!("{docs} Markdown documents"),
    };
    println!(
        "one sync run, built-in model, {server}, capacity {capacity}: {what}, {:.1} MiB",
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
    if let Some(mib) = peak {
        println!("peak RSS of the process (worker in it) during the run: {mib:.0} MiB");
    }
    {
        let db = worker.context.db.get().await?;
        let row = db
            .query_one(
                "SELECT count(*), coalesce(percentile_disc(0.5) WITHIN GROUP (ORDER BY length(content)), 0),
                        count(*) FILTER (WHERE heading_path = '{}'),
                        count(*) FILTER (WHERE content !~ '[[:alnum:]]')
                 FROM chunks",
                &[],
            )
            .await?;
        let (n, median, no_path, no_alnum): (i64, i32, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        println!(
            "{n} chunks stored: median {median} characters, {no_path} without a heading path, \
             {no_alnum} without a letter or digit"
        );
    }
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
