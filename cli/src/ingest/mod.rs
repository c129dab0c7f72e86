//! stowctl's side of direct ingest: local files and folders streamed to a
//! worker's `Ingest` API.
//!
//! - [`client`]: one file (hash, where to resume, the stream, retries).
//! - [`progress`]: bars on a terminal, plain lines, or JSON.
//! - [`sync`]: a folder mirrored, then followed (`--watch`).

pub mod client;
pub mod progress;
pub mod sync;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use stowage_proto::v1::IngestConflictPolicy;

use client::{Client, Destination, LocalFile};
use progress::{Mode, Reporter};

/// A worker's gRPC API and how to reach it.
#[derive(Args, Clone, Debug)]
pub struct WorkerConnection {
    /// A worker's gRPC address (`https://` for a worker serving TLS).
    #[arg(
        long,
        env = "STOWAGE_WORKER_GRPC",
        default_value = "http://127.0.0.1:50051"
    )]
    pub worker: String,
    #[command(flatten)]
    pub tls: crate::grpc::WorkerTls,
    #[command(flatten)]
    pub token: crate::token::TokenArgs,
}

/// Where local files go and how they are sent.
#[derive(Args, Clone, Debug)]
pub struct IngestOptions {
    /// Files uploaded at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: u16,
    /// One JSON object per file and a summary on stdout, no bars.
    #[arg(long)]
    pub json: bool,
    /// Calls per file before it counts as failed (each resumes from what
    /// the earlier ones stored).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: u32,
}

/// An `s3://bucket/prefix` flag as bucket and prefix.
pub fn split_s3_url<'a>(flag: &str, url: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{flag} {url:?} is not an s3://bucket/prefix URL"))?;
    Ok(rest.split_once('/').unwrap_or((rest, "")))
}

/// The destination flags of `upload` and `sync`.
#[derive(Args, Clone, Debug)]
pub struct DestinationArgs {
    /// Destination: `s3://bucket/key-prefix`.
    #[arg(long)]
    pub to: String,
    /// The namespace whose destinations and Secrets are used.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Destination endpoint (S3-compatible URL); empty means AWS.
    #[arg(long)]
    pub to_endpoint: Option<String>,
    /// Credentials Secret name (in --namespace) for the destination.
    #[arg(long)]
    pub to_credentials: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// Let the transfer reach loopback and private addresses (the workers
    /// must be started with --allow-private-networks too).
    #[arg(long)]
    pub allow_private_networks: bool,
}

impl DestinationArgs {
    /// `--to` as bucket and key prefix.
    pub fn bucket_and_prefix(&self) -> anyhow::Result<(&str, &str)> {
        split_s3_url("--to", &self.to)
    }

    /// The flags as a direct-ingest destination.
    pub fn ingest(&self, conflict_policy: &str, dedup: bool) -> anyhow::Result<Destination> {
        let (bucket, prefix) = self.bucket_and_prefix()?;
        let conflict = match conflict_policy {
            "skip" => IngestConflictPolicy::Skip,
            "overwrite" => IngestConflictPolicy::Overwrite,
            "version" => IngestConflictPolicy::Version,
            other => bail!("--conflict-policy {other:?}: use skip, overwrite or version"),
        };
        Ok(Destination {
            namespace: self.namespace.clone(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: self.to_endpoint.clone(),
            credentials: self.to_credentials.clone(),
            region: self.region.clone(),
            allow_private_networks: self.allow_private_networks,
            conflict,
            dedup,
        })
    }
}

pub async fn connect(
    conn: &WorkerConnection,
    dest: Destination,
    opts: &IngestOptions,
) -> anyhow::Result<Client> {
    let token = conn.token.resolve().await?;
    let channel = crate::grpc::connect(&conn.worker, &conn.tls).await?;
    let mut client = Client::new(channel, token, dest, 4 << 20);
    client.attempts = opts.attempts;
    Ok(client)
}

/// Every file of `paths` (folders walked, their ignore rules applied) with
/// its key: a file's key is its name, a folder's files keep their path
/// inside it.
pub fn files_of(paths: &[PathBuf], dest: &Destination) -> anyhow::Result<Vec<LocalFile>> {
    let ignore = sync::ignores(&[], true)?;
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        if meta.is_dir() {
            let scan = sync::scan(p, &ignore)?;
            if let Some(d) = scan.unreadable.first() {
                bail!("cannot read {}/{d}", p.display());
            }
            for (rel, path) in scan.files {
                out.push(LocalFile::stat(&path, dest.key(&rel))?);
            }
        } else {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{} has no UTF-8 file name", p.display()))?;
            out.push(LocalFile::stat(p, dest.key(name))?);
        }
    }
    Ok(out)
}

/// `stowctl upload PATH...`: exit status non-zero when a file failed.
pub async fn upload(
    client: &Client,
    files: Vec<LocalFile>,
    opts: &IngestOptions,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let reporter = Reporter::new(Mode::pick(opts.json));
    reporter.add_work(files.len(), files.iter().map(|f| f.size).sum());
    let reporter = &reporter;
    futures::stream::iter(files.iter().map(|f| async move {
        let bar = reporter.file(&f.key, f.size);
        let r = client.upload(f, &bar).await;
        reporter.finished(&f.path.display().to_string(), &bar, &r);
    }))
    .buffer_unordered(usize::from(opts.parallel))
    .collect::<Vec<()>>()
    .await;
    let failed = reporter.summary();
    if failed > 0 {
        bail!("{failed} of {} file(s) failed", files.len());
    }
    Ok(())
}

/// What `stowctl sync` was asked.
pub struct SyncOptions {
    pub dir: PathBuf,
    /// The destination as given (`s3://bucket/prefix`): names the manifest.
    pub to: String,
    pub ignore: Vec<String>,
    pub default_ignores: bool,
    pub delete: bool,
    /// `--watch`, with its debounce.
    pub watch: Option<Duration>,
    /// `--manifest`, else the default place.
    pub manifest: Option<PathBuf>,
}

/// `stowctl sync DIR`: one pass, then (with `--watch`) follow the folder.
pub async fn sync(client: Client, o: SyncOptions, opts: &IngestOptions) -> anyhow::Result<()> {
    let store = client.dest.endpoint.as_deref().unwrap_or("aws");
    let manifest_path = match o.manifest {
        Some(p) => p,
        None => sync::manifest_path(
            &o.dir,
            &format!("{}|{store}|{}", client.dest.namespace, o.to),
        )?,
    };
    let root = o
        .dir
        .canonicalize()
        .with_context(|| format!("cannot read the folder {}", o.dir.display()))?;
    let mut syncer = sync::Syncer {
        root,
        manifest: sync::Manifest::load(&manifest_path)?,
        manifest_path,
        client,
        ignore: sync::ignores(&o.ignore, o.default_ignores)?,
        delete: o.delete,
        parallel: usize::from(opts.parallel),
    };
    let reporter = Reporter::new(Mode::pick(opts.json));
    let failed = syncer.pass(&reporter).await?;
    if let Some(debounce) = o.watch {
        return syncer.watch(&reporter, debounce).await;
    }
    reporter.summary();
    if failed > 0 {
        bail!("{failed} file(s) failed");
    }
    Ok(())
}
