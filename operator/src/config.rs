//! `stowage-operator` configuration: flags and environment variables.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use stowage_common::config::{DatabaseArgs, NatsArgs, TelemetryArgs, parse_duration};

/// The Stowage operator: reconciles UploadJob and IndexCollection resources
/// into jobs, collections and tasks for the worker fleet, and rolls their
/// progress up into `.status`. Several replicas may run; one leads (a
/// PostgreSQL advisory lock), the others wait to take over.
#[derive(Parser, Clone, Debug)]
#[command(name = "stowage-operator", version)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// Watch only these namespaces, comma-separated (default: all
    /// namespaces). With a list, the operator needs rights in those
    /// namespaces only (the Helm chart's `watchNamespaces`).
    #[arg(
        long = "watch-namespaces",
        visible_alias = "namespace",
        env = "STOWAGE_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,

    /// Name of the leader lock: replicas with the same name elect one leader.
    #[arg(long, env = "STOWAGE_LEADER_LOCK", default_value = "stowage-operator")]
    pub leader_lock: String,

    /// How often a held lock's session is checked; a lost session is noticed
    /// within about this long and the replica stops reconciling.
    #[arg(long, env = "STOWAGE_LOCK_HEARTBEAT", value_parser = parse_duration, default_value = "2s")]
    pub lock_heartbeat: Duration,

    /// Safety-net resync of unfinished resources; progress events
    /// from the workers trigger reconciles sooner.
    #[arg(long, env = "STOWAGE_RESYNC", value_parser = parse_duration, default_value = "60s")]
    pub resync: Duration,

    /// IndexCollections with `watchUploads`: a landed object is indexed once
    /// its key has had no new write for this long…
    #[arg(long, env = "STOWAGE_INDEX_DEBOUNCE", value_parser = parse_duration, default_value = "2s")]
    pub index_debounce: Duration,

    /// …and at most this long after its first write.
    #[arg(long, env = "STOWAGE_INDEX_MAX_DELAY", value_parser = parse_duration, default_value = "30s")]
    pub index_max_delay: Duration,

    /// Directory of mounted credentials Secrets (`<dir>/<secret>/access_key_id`,
    /// `secret_access_key`), used to abort the multipart uploads of deleted jobs.
    #[arg(long, env = "STOWAGE_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,

    /// Identity in events and logs (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
}
