//! The commands of stowctl. It talks to PostgreSQL and NATS directly, as the
//! operator does, so it works with or without Kubernetes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use futures::{FutureExt, StreamExt};
use stowage_common::config::NatsArgs;
use stowage_common::db::{self, Pool};
use stowage_common::jobs;
use stowage_common::locks::{LockManager, LockMetrics};
use stowage_common::queue::Queue;
use stowage_common::spec::{
    Backoff, ChecksumAlgorithm, ConflictPolicy, Destination, Endpoint, HttpSource, RetryPolicy,
    S3Source, SecretRef, UploadJobSpec, UploadSource,
};
use stowage_common::state::uploads::{self, ItemState, JobState, NewJob};
use uuid::Uuid;

use crate::ingest::{DestinationArgs, IngestOptions, WorkerConnection, split_s3_url};

/// stowctl — submit uploads to Stowage workers, follow them, replay dead letters.
#[derive(Parser)]
#[command(name = "stowctl", version)]
pub struct Cli {
    /// PostgreSQL connection string (every command but `search`).
    #[arg(long, env = "STOWAGE_DATABASE_URL", global = true)]
    database_url: Option<String>,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upload local files and folders through a worker's Ingest API (with
    /// progress; running it again resumes), or copy a bucket prefix or a
    /// list of URLs into a bucket (an upload job: --from / --url).
    Upload(Box<UploadArgs>),
    /// Mirror a local folder into a bucket prefix; --watch keeps following it.
    Sync(Box<SyncArgs>),
    /// Show a job's state, counters and failed items.
    Status {
        /// Job id printed by `stowctl upload`.
        job: Uuid,
        /// Only the job's line, not a line per file: cheap enough to poll.
        #[arg(long)]
        summary: bool,
    },
    /// List or replay dead-lettered tasks.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Search an IndexCollection through a worker's gRPC API.
    Search(Box<SearchArgs>),
}

#[derive(Args)]
struct SearchArgs {
    /// The IndexCollection's name.
    collection: String,
    /// What to look for.
    query: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, value_enum, default_value_t = SearchModeArg::Hybrid)]
    mode: SearchModeArg,
    /// Results wanted, 1–100 (the worker's maximum).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    top_k: u32,
    /// Only objects whose key starts with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Only objects of this content type.
    #[arg(long)]
    content_type: Option<String>,
    #[command(flatten)]
    conn: WorkerConnection,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SearchModeArg {
    Hybrid,
    Vector,
    Keyword,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Print every dead letter with its error.
    List,
    /// Put the dead letters' items back to pending and queue their tasks again.
    Replay {
        /// Sequence numbers from `dead-letters list`.
        #[arg(required = true)]
        seq: Vec<u64>,
    },
}

#[derive(Args)]
struct UploadArgs {
    /// Local files and folders to upload (a folder's files keep their path
    /// inside it under the --to prefix).
    #[arg(conflicts_with_all = ["from", "url"])]
    paths: Vec<PathBuf>,
    /// Job name (shows in subjects and logs).
    #[arg(long, default_value = "stowctl")]
    name: String,
    /// Source bucket and prefix: `s3://bucket/prefix`.
    #[arg(long, conflicts_with = "url", required_unless_present_any = ["url", "paths"])]
    from: Option<String>,
    /// Source endpoint (S3-compatible URL) when --from is used.
    #[arg(long)]
    from_endpoint: Option<String>,
    /// Credentials Secret name for the source.
    #[arg(long)]
    from_credentials: Option<String>,
    /// HTTP(S) URLs to copy (repeat the flag).
    #[arg(long)]
    url: Vec<String>,
    #[command(flatten)]
    dest: DestinationArgs,
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    part_size: u64,
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// skip | overwrite | version
    #[arg(long, default_value = "overwrite")]
    conflict_policy: String,
    #[arg(long)]
    dedup: bool,
    /// crc32c | sha256
    #[arg(long, default_value = "crc32c")]
    checksum: String,
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Wait until the job finishes and print its objects; exit 1 if it failed.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    #[command(flatten)]
    conn: WorkerConnection,
    #[command(flatten)]
    ingest: IngestOptions,
}

#[derive(Args)]
struct SyncArgs {
    /// The folder to mirror.
    dir: PathBuf,
    #[command(flatten)]
    dest: DestinationArgs,
    /// Delete the objects of files that are gone from the folder (never
    /// when the folder is empty or unreadable, nor under a subfolder that
    /// cannot be read).
    #[arg(long)]
    delete: bool,
    /// Keep following the folder after the first pass (Ctrl-C stops).
    #[arg(long)]
    watch: bool,
    /// With --watch: how long a file must be quiet (no event, size and time
    /// unchanged) before it is uploaded.
    #[arg(long, value_parser = stowage_common::config::parse_duration, default_value = "1s")]
    debounce: Duration,
    /// Paths to leave out, as globs on the path inside the folder (repeat
    /// the flag), besides the defaults (.git/, editor swap and backup files,
    /// *.tmp).
    #[arg(long)]
    ignore: Vec<String>,
    /// Do not leave out the default ignores.
    #[arg(long)]
    no_default_ignores: bool,
    /// Where the record of what was uploaded is kept (default: a file per
    /// folder and destination under $XDG_STATE_HOME/stowage/sync/).
    #[arg(long)]
    manifest: Option<PathBuf>,
    #[command(flatten)]
    conn: WorkerConnection,
    #[command(flatten)]
    ingest: IngestOptions,
}

impl UploadArgs {
    fn spec(&self) -> anyhow::Result<UploadJobSpec> {
        let endpoint = |url: &Option<String>, creds: &Option<String>| Endpoint {
            endpoint: url.clone(),
            region: self.dest.region.clone(),
            force_path_style: true,
            credentials_secret_ref: creds.clone().map(|name| SecretRef { name }),
            use_worker_credentials: false,
            allow_private_networks: self.dest.allow_private_networks,
        };
        let source = match &self.from {
            Some(from) => {
                let (bucket, prefix) = split_s3_url("--from", from)?;
                UploadSource {
                    ingest: None,
                    s3: Some(S3Source {
                        bucket: bucket.to_string(),
                        prefix: prefix.to_string(),
                        endpoint: endpoint(&self.from_endpoint, &self.from_credentials),
                    }),
                    http: None,
                }
            }
            None => UploadSource {
                ingest: None,
                s3: None,
                http: Some(HttpSource {
                    urls: self.url.clone(),
                    allow_private_networks: self.dest.allow_private_networks,
                }),
            },
        };
        let (bucket, key_prefix) = self.dest.bucket_and_prefix()?;
        let conflict_policy = match self.conflict_policy.as_str() {
            "skip" => ConflictPolicy::Skip,
            "overwrite" => ConflictPolicy::Overwrite,
            "version" => ConflictPolicy::Version,
            other => bail!("--conflict-policy {other:?}: use skip, overwrite or version"),
        };
        let checksum = match self.checksum.as_str() {
            "crc32c" => ChecksumAlgorithm::Crc32c,
            "sha256" => ChecksumAlgorithm::Sha256,
            other => bail!("--checksum {other:?}: use crc32c or sha256"),
        };
        let spec = UploadJobSpec {
            source,
            destination: Destination {
                bucket: bucket.to_string(),
                key_prefix: key_prefix.to_string(),
                endpoint: endpoint(&self.dest.to_endpoint, &self.dest.to_credentials),
                encryption: None,
            },
            part_size_bytes: self.part_size,
            concurrency: self.concurrency,
            conflict_policy,
            dedup: self.dedup,
            checksum,
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                backoff: Backoff::default(),
            },
        };
        spec.validate()?;
        Ok(spec)
    }
}

async fn connect(database_url: Option<&str>) -> anyhow::Result<Pool> {
    let url = database_url
        .context("this command needs the database: give --database-url or STOWAGE_DATABASE_URL")?;
    let pg = db::parse_url(url)?;
    let pool = db::pool(&pg, 4)?;
    let locks = LockManager::new(pg, LockMetrics::default(), Duration::from_secs(5));
    db::migrate(&pool, &locks).await?;
    Ok(pool)
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        // Search and direct ingest need only a worker, not the database or NATS.
        let command = match self.command {
            Command::Search(args) => return search(*args).await,
            Command::Upload(args) if !args.paths.is_empty() => return upload_local(*args).await,
            Command::Sync(args) => return sync(*args).await,
            other => other,
        };
        let pool = connect(self.database_url.as_deref()).await?;
        let queue = Queue::connect(&self.nats.settings()).await?;
        queue.ensure(&Default::default()).await?;
        match command {
            Command::Search(args) => search(*args).await,
            Command::Sync(args) => sync(*args).await,
            Command::Upload(args) => upload(&pool, &queue, *args).await,
            Command::Status { job, summary } => {
                let state = print_status(&pool, job, !summary).await?;
                if state == JobState::Failed {
                    bail!("job {job} failed");
                }
                Ok(())
            }
            Command::DeadLetters(DeadLetterCommand::List) => {
                for (seq, l) in queue.dead_letters().await? {
                    let task = l.task.map(|t| t.task_id).unwrap_or_default();
                    println!(
                        "{seq}\t{task}\t{} after {} attempt(s): {}",
                        l.error_class, l.attempts, l.error
                    );
                }
                Ok(())
            }
            Command::DeadLetters(DeadLetterCommand::Replay { seq }) => {
                for s in seq {
                    let db = pool.get().await?;
                    let task = jobs::replay_dead_letter(&db, &queue, s).await?;
                    println!("replayed {s} as {}", task.task_id);
                }
                Ok(())
            }
        }
    }
}

/// The shortest time between two looks at a job `stowctl upload --wait` follows.
const REFRESH: Duration = Duration::from_millis(500);

async fn upload(pool: &Pool, queue: &Queue, args: UploadArgs) -> anyhow::Result<()> {
    let spec = args.spec()?;
    let db = pool.get().await?;
    let id = jobs::submit_upload(
        &db,
        queue,
        &NewJob {
            namespace: args.dest.namespace.clone(),
            name: args.name.clone(),
            source_uid: format!("stowctl-{}", Uuid::new_v4()),
            generation: 1,
            spec,
            suspended: false,
        },
    )
    .await?;
    drop(db);
    println!("job {id} submitted");
    if !args.wait {
        return Ok(());
    }
    let mut events = queue.subscribe_events().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut last = String::new();
    loop {
        let checked = tokio::time::Instant::now();
        let db = pool.get().await?;
        let state = uploads::job_state(&db, id).await?;
        let c = uploads::job_counts(&db, id).await?;
        drop(db);
        let line = format!(
            "  {}: {}/{} files done ({} skipped, {} failed), {} / {} bytes",
            state,
            c.succeeded + c.skipped_duplicate + c.skipped_exists + c.failed,
            c.total,
            c.skipped_duplicate + c.skipped_exists,
            c.failed,
            c.bytes_done,
            c.bytes_total
        );
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if state.is_finished() {
            let state = print_status(pool, id, true).await?;
            if state != JobState::Succeeded {
                bail!("job {id} {state}");
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {id} did not finish within {}s", args.timeout);
        }
        // Progress events wake us, at most every REFRESH (a big job sends
        // hundreds a second, and counting its items reads them all); the 2 s
        // re-check is the safety net.
        let _ = tokio::time::timeout(Duration::from_secs(2), events.next()).await;
        tokio::time::sleep_until(checked + REFRESH).await;
        while let Some(Some(_)) = events.next().now_or_never() {}
    }
}

/// Prints the job and, with `items`, its items; returns the job's state.
async fn print_status(pool: &Pool, id: Uuid, items: bool) -> anyhow::Result<JobState> {
    let db = pool.get().await?;
    let job = uploads::get_job(&db, id).await?;
    let c = uploads::job_counts(&db, id).await?;
    println!(
        "job {id} ({}/{}): {} — {} uploaded, {} skipped (duplicate), {} skipped (exists), {} failed, {} dead-lettered",
        job.namespace,
        job.name,
        job.state,
        c.succeeded,
        c.skipped_duplicate,
        c.skipped_exists,
        c.failed,
        c.dead_lettered
    );
    if let Some(e) = &job.last_error {
        println!("  error: {e}");
    }
    if !items {
        return Ok(job.state);
    }
    println!("{:<20} {:>10}  {:<64}  key", "state", "bytes", "sha256");
    for item in uploads::list_items(&db, id).await? {
        println!(
            "{:<20} {:>10}  {:<64}  {}",
            item.state.as_str(),
            item.size_bytes.unwrap_or(0),
            item.sha256_hex.as_deref().unwrap_or("-"),
            item.dest_key
        );
        if let Some(e) = item
            .last_error
            .as_deref()
            .filter(|_| item.state == ItemState::Failed)
        {
            println!("    error: {e}");
        }
    }
    Ok(job.state)
}

async fn upload_local(a: UploadArgs) -> anyhow::Result<()> {
    let dest = a.dest.ingest(&a.conflict_policy, a.dedup)?;
    let files = crate::ingest::files_of(&a.paths, &dest)?;
    let client = crate::ingest::connect(&a.conn, dest, &a.ingest).await?;
    crate::ingest::upload(&client, files, &a.ingest).await
}

async fn sync(a: SyncArgs) -> anyhow::Result<()> {
    let dest = a.dest.ingest("overwrite", false)?;
    let client = crate::ingest::connect(&a.conn, dest, &a.ingest).await?;
    crate::ingest::sync(
        client,
        crate::ingest::SyncOptions {
            dir: a.dir,
            to: a.dest.to,
            ignore: a.ignore,
            default_ignores: !a.no_default_ignores,
            delete: a.delete,
            watch: a.watch.then_some(a.debounce),
            manifest: a.manifest,
        },
        &a.ingest,
    )
    .await
}

async fn search(a: SearchArgs) -> anyhow::Result<()> {
    use stowage_proto::v1::search_client::SearchClient;
    use stowage_proto::v1::{SearchMode, SearchRequest};
    let token = a.conn.token.resolve().await?;
    let mut client = SearchClient::new(crate::grpc::connect(&a.conn.worker, &a.conn.tls).await?);
    let mode = match a.mode {
        SearchModeArg::Hybrid => SearchMode::Hybrid,
        SearchModeArg::Vector => SearchMode::Vector,
        SearchModeArg::Keyword => SearchMode::Keyword,
    };
    let request = crate::grpc::authorized(
        SearchRequest {
            namespace: a.namespace,
            collection: a.collection,
            query: a.query,
            mode: mode as i32,
            top_k: a.top_k,
            key_prefix: a.prefix.unwrap_or_default(),
            content_type: a.content_type.unwrap_or_default(),
        },
        token.as_ref(),
    )?;
    let hits = client
        .query(request)
        .await
        .map_err(|s| match stowage_common::tls::find_rustls_error(&s) {
            Some(_) => a.conn.tls.explain(&a.conn.worker, &s),
            None => crate::grpc::refused("search", &s, token.as_ref()),
        })?
        .into_inner()
        .hits;
    if hits.is_empty() {
        println!("no matches");
    }
    for (i, h) in hits.iter().enumerate() {
        let headings = if h.heading_path.is_empty() {
            String::new()
        } else {
            format!(" [{}]", h.heading_path.join(" > "))
        };
        println!(
            "{}. {:.4}  s3://{}/{}{headings}  chars {}-{}",
            i + 1,
            h.score,
            h.bucket,
            h.key,
            h.char_start,
            h.char_end
        );
        let text: String = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
        let short: String = text.chars().take(200).collect();
        println!(
            "   {short}{}",
            if text.chars().count() > 200 {
                "…"
            } else {
                ""
            }
        );
    }
    Ok(())
}
