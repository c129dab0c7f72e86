//! `stowage-operator` configuration: flags and environment variables.

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

    /// Where the Secrets resources name are read (the operator needs them
    /// to abort the multipart uploads of deleted jobs).
    #[command(flatten)]
    pub credentials: stowage_common::secrets::CredentialsArgs,

    /// Where the endpoints of resources may go.
    #[command(flatten)]
    pub endpoints: stowage_common::storage::EndpointArgs,

    #[command(flatten)]
    pub autoscale: AutoscaleArgs,

    /// Identity in events and logs (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
}

/// The worker fleet's autoscaling by the leading operator: on when
/// `--autoscale-deployment` names the worker Deployment (the Helm chart's
/// `autoscaling.mode: operator`); off otherwise (`keda` or `off`).
#[derive(clap::Args, Clone, Debug)]
pub struct AutoscaleArgs {
    /// The worker Deployment whose `scale` the operator sets from the task
    /// backlog.
    #[arg(long, env = "STOWAGE_AUTOSCALE_DEPLOYMENT")]
    pub autoscale_deployment: Option<String>,

    /// Its namespace (default: the operator's own, `POD_NAMESPACE`).
    #[arg(long, env = "STOWAGE_AUTOSCALE_NAMESPACE")]
    pub autoscale_namespace: Option<String>,

    /// Fewest workers (at least one unless `--autoscale-to-zero`).
    #[arg(long, env = "STOWAGE_AUTOSCALE_MIN", default_value_t = 1)]
    pub autoscale_min: u32,

    /// Most workers.
    #[arg(long, env = "STOWAGE_AUTOSCALE_MAX", default_value_t = 10)]
    pub autoscale_max: u32,

    /// Tasks per worker the fleet is sized for (the workers' capacity).
    #[arg(long, env = "STOWAGE_AUTOSCALE_TARGET_PER_REPLICA", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub autoscale_target_per_replica: u32,

    /// The backlog must ask for fewer workers for this long before the
    /// fleet shrinks (to the most it asked for meanwhile).
    #[arg(long, env = "STOWAGE_AUTOSCALE_QUIET_PERIOD", value_parser = parse_duration, default_value = "5m")]
    pub autoscale_quiet_period: Duration,

    /// Scale to zero workers once the backlog stayed empty for the quiet
    /// period.
    #[arg(long, env = "STOWAGE_AUTOSCALE_TO_ZERO", default_value_t = false, action = clap::ArgAction::Set)]
    pub autoscale_to_zero: bool,

    /// How often the backlog is read.
    #[arg(long, env = "STOWAGE_AUTOSCALE_INTERVAL", value_parser = parse_duration, default_value = "15s")]
    pub autoscale_interval: Duration,
}

impl AutoscaleArgs {
    /// The autoscaler's settings, if it is on.
    pub fn settings(&self) -> Option<crate::autoscale::Settings> {
        let deployment = self.autoscale_deployment.clone()?;
        let namespace = self
            .autoscale_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        Some(crate::autoscale::Settings {
            deployment,
            namespace,
            min: self.autoscale_min,
            max: self.autoscale_max,
            target_per_replica: self.autoscale_target_per_replica,
            quiet: self.autoscale_quiet_period,
            to_zero: self.autoscale_to_zero,
            interval: self.autoscale_interval,
        })
    }
}
