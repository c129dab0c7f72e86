//! Command-line / environment argument groups shared by the binaries; each
//! binary flattens the ones it needs.

use std::path::PathBuf;
use std::time::Duration;

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

    /// CA certificates (PEM) that the NATS server's certificate must chain
    /// to. Any --nats-tls-* flag, or a `tls://` URL, makes TLS required;
    /// without a CA file the system's CAs are used.
    #[arg(long, env = "STOWAGE_NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for a NATS server that verifies clients.
    #[arg(long, env = "STOWAGE_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,

    /// Key (PEM) of --nats-tls-cert.
    #[arg(long, env = "STOWAGE_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,

    /// NATS credentials file: user JWT and NKey seed, as `nsc` writes it.
    #[arg(
        long,
        env = "STOWAGE_NATS_CREDS_FILE",
        conflicts_with = "nats_nkey_file"
    )]
    pub nats_creds_file: Option<PathBuf>,

    /// File holding a NATS NKey user seed (`SU…`), for servers that list
    /// users by public NKey.
    #[arg(long, env = "STOWAGE_NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,
}

impl NatsArgs {
    /// What [`crate::queue::Queue::connect`] takes.
    pub fn settings(&self) -> crate::queue::NatsSettings {
        crate::queue::NatsSettings {
            url: self.nats_url.clone(),
            prefix: self.queue_prefix.clone(),
            tls_ca_file: self.nats_tls_ca_file.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            creds_file: self.nats_creds_file.clone(),
            nkey_file: self.nats_nkey_file.clone(),
        }
    }
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

/// Parses a duration such as `250ms`, `30s`, `10m`, `1h30m`, `2d`, or a plain
/// number of seconds (the format of every duration flag and of
/// `resyncInterval`). Any input is answered, never a panic: a total that does
/// not fit a [`Duration`] is an error.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    let too_long = || format!("{s:?} is too long a duration");
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = match rest[..digits].parse() {
            Ok(n) => n,
            Err(e) if digits > 0 && *e.kind() == std::num::IntErrorKind::PosOverflow => {
                return Err(too_long());
            }
            Err(_) => {
                return Err(format!(
                    "{s:?} is not a duration like 500ms, 30s, 10m, 1h30m or 2d"
                ));
            }
        };
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds_per = |per: u64| n.checked_mul(per).map(Duration::from_secs);
        let one = match &rest[..unit] {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => seconds_per(60),
            "h" => seconds_per(3600),
            "d" => seconds_per(86400),
            u => return Err(format!("{s:?}: unknown unit {u:?} (ms, s, m, h, d)")),
        };
        total = one
            .and_then(|d| total.checked_add(d))
            .ok_or_else(too_long)?;
        rest = &rest[unit..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("ten").is_err());
        assert!(
            parse_duration("10x")
                .expect_err("unit")
                .contains("unknown unit")
        );
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn overflowing_durations_are_errors_not_panics() {
        for s in [
            "18446744073709551615s1s",
            "18446744073709551615d",
            "99999999999999999999999s",
            "307445734561825861m",
            "18446744073709551615ms18446744073709551615s",
        ] {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains("too long"), "{s}: {e}");
        }
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }
}
