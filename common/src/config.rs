//! Command-line / environment argument groups shared by the binaries; each
//! binary flattens the ones it needs.

use clap::{Args, ValueEnum};

#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string (state, locks). Must reach PostgreSQL
    /// directly or through a session-mode pooler: advisory locks need sessions.
    #[arg(long, env = "STOWAGE_DATABASE_URL")]
    pub database_url: String,

    /// Maximum pooled connections (session locks use their own connections).
    #[arg(long, env = "STOWAGE_DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: usize,
}

#[derive(Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server URL with JetStream enabled.
    #[arg(
        long,
        env = "STOWAGE_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// Prefix of every subject and stream name; lets several installations
    /// (or test runs) share one NATS account.
    #[arg(long, env = "STOWAGE_QUEUE_PREFIX", default_value = "stowage")]
    pub queue_prefix: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

#[derive(Args, Clone, Debug)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(long, env = "STOWAGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// Log filter in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,

    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "STOWAGE_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: std::net::SocketAddr,
}
