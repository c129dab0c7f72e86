//! PostgreSQL over TLS, for the pool and the lock sessions alike, with
//! libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in the URL or
//! key=value string. tokio-postgres knows `sslmode=disable|prefer|require`
//! and no files, so these four are taken out of the string here; the rest
//! goes to tokio-postgres unchanged.
//!
//! | `sslmode`     | encrypted            | server certificate checked                  |
//! |---------------|----------------------|---------------------------------------------|
//! | (none)        | no                   | —                                           |
//! | `disable`     | no                   | —                                           |
//! | `allow`, `prefer` | if the server offers TLS | only against `sslrootcert`, when given |
//! | `require`     | yes                  | only against `sslrootcert`, when given      |
//! | `verify-ca`   | yes                  | chain to `sslrootcert`                      |
//! | `verify-full` | yes                  | chain to `sslrootcert` and the host name    |
//!
//! As in libpq, a given `sslrootcert` is checked in every mode that
//! encrypts (`require` without it encrypts without any check), and
//! `sslrootcert=system` (the operating system's CAs) needs `verify-full`.
//! Unlike libpq, nothing is read from `~/.postgresql/`, and a string without
//! `sslmode` does not try TLS: Stowage encrypts when the URL says so.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use tokio_postgres::Socket;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::{self, Identity, Verify};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// The TLS options of a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslOptions {
    pub mode: Option<SslMode>,
    pub root_cert: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl SslOptions {
    fn set(&mut self, key: &str, value: String) -> Result<bool, String> {
        match key {
            "sslmode" => self.mode = Some(value.parse()?),
            "sslrootcert" => self.root_cert = Some(value),
            "sslcert" => self.cert = Some(value.into()),
            "sslkey" => self.key = Some(value.into()),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Takes the TLS options out of a `postgres://` URL or a key=value string:
/// returns the string without them (for tokio-postgres) and the options.
pub fn split_ssl_options(conn: &str) -> Result<(String, SslOptions), String> {
    let mut options = SslOptions::default();
    let trimmed = conn.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = conn.split_once('?') else {
            return Ok((conn.to_string(), options));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !options.set(&percent_decode(k), percent_decode(v))? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, options));
    }
    // key=value: values may be 'quoted' with \' and \\ escapes.
    let Some(pairs) = conninfo_pairs(conn) else {
        // Malformed: tokio-postgres says what is wrong with it.
        return Ok((conn.to_string(), options));
    };
    let mut kept = Vec::new();
    for (key, value, span) in pairs {
        if !options.set(&key, value)? {
            kept.push(&conn[span]);
        }
    }
    Ok((kept.join(" "), options))
}

/// `(key, unescaped value, span of the whole pair)` of a key=value string.
fn conninfo_pairs(s: &str) -> Option<Vec<(String, String, std::ops::Range<usize>)>> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            return Some(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s.get(start..i)?.to_string();
        skip_ws(&mut i);
        if b.get(i) != Some(&b'=') || key.is_empty() {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i)? {
                    b'\\' => {
                        value.push(*b.get(i + 1)?);
                        i += 2;
                    }
                    b'\'' => {
                        i += 1;
                        break;
                    }
                    c => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' {
                    i += 1;
                }
                value.push(*b.get(i)?);
                i += 1;
            }
        }
        out.push((key, String::from_utf8(value).ok()?, start..i));
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied(), b.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connector every PostgreSQL connection of Stowage goes through:
/// rustls (tokio-postgres-rustls, which also gives SCRAM channel binding),
/// with handshake failures said in terms of the connection string.
#[derive(Clone)]
pub struct PgTls {
    inner: MakeRustlsConnect,
    trusted: Arc<str>,
}

/// The stream of a connection made through [`PgTls`].
pub type PgTlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
type InnerConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;

impl PgTls {
    /// The connector for these options, and the mode tokio-postgres runs in.
    /// Reads the files now, so that a wrong path fails at start-up.
    pub fn new(options: &SslOptions) -> Result<(PgTls, tokio_postgres::config::SslMode), String> {
        use tokio_postgres::config::SslMode as Tp;
        let mode = options.mode.unwrap_or(SslMode::Disable);
        let root = options.root_cert.as_deref();
        let roots = match root {
            None => None,
            Some("system") => {
                if mode != SslMode::VerifyFull && mode != SslMode::Disable {
                    return Err(format!(
                        "sslrootcert=system needs sslmode=verify-full (a public CA signs \
                         certificates for anyone: only the host name tells them apart), \
                         not sslmode={}",
                        mode_name(mode)
                    ));
                }
                Some(tls::system_roots().map_err(|e| format!("sslrootcert=system: {e}"))?)
            }
            Some(path) => {
                Some(tls::read_roots(path.as_ref()).map_err(|e| format!("sslrootcert: {e}"))?)
            }
        };
        let verify = match (mode, roots) {
            (SslMode::Disable, _) => Verify::Nothing,
            (SslMode::VerifyFull, Some(roots)) => Verify::Full(roots),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                    "sslmode={} needs sslrootcert=<file of the CA that signed the server's \
                     certificate> (or sslrootcert=system with verify-full); Stowage does not \
                     look in ~/.postgresql/",
                    mode_name(mode)
                ));
            }
            (_, Some(roots)) => Verify::Chain(roots),
            (_, None) => Verify::Nothing,
        };
        let identity = match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => {
                Some(Identity::read(cert, key).map_err(|e| format!("sslcert/sslkey: {e}"))?)
            }
            (None, None) => None,
            _ => return Err("sslcert and sslkey go together: give both or neither".into()),
        };
        let config = tls::client_config(&verify, identity.as_ref()).map_err(|e| e.to_string())?;
        let trusted: Arc<str> = match root {
            Some("system") => "the system's CAs (sslrootcert=system)".into(),
            Some(path) => format!("the CA in sslrootcert={path}").into(),
            None => "any CA".into(),
        };
        let tp = match mode {
            SslMode::Disable => Tp::Disable,
            SslMode::Allow | SslMode::Prefer => Tp::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tp::Require,
        };
        Ok((
            PgTls {
                inner: MakeRustlsConnect::new(config),
                trusted,
            },
            tp,
        ))
    }
}

fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

impl MakeTlsConnect<Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = PgTlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, Self::Error> {
        Ok(PgTlsConnect {
            inner: MakeTlsConnect::<Socket>::make_tls_connect(&mut self.inner, domain)?,
            trusted: Arc::clone(&self.trusted),
        })
    }
}

pub struct PgTlsConnect {
    inner: InnerConnect,
    trusted: Arc<str>,
}

impl TlsConnect<Socket> for PgTlsConnect {
    type Stream = PgTlsStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream, std::io::Error>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let trusted = self.trusted;
        let handshake = self.inner.connect(stream);
        Box::pin(async move {
            handshake.await.map_err(
                |e| match tls::explain(&e, "the PostgreSQL server", &trusted) {
                    Some(message) => std::io::Error::new(e.kind(), message),
                    None => e,
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_taken_out() {
        let (rest, o) = split_ssl_options(
            "postgres://u:p@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
        )
        .expect("parse");
        assert_eq!(
            rest,
            "postgres://u:p@h:5432/db?application_name=x&connect_timeout=5"
        );
        assert_eq!(o.mode, Some(SslMode::VerifyFull));
        assert_eq!(o.root_cert.as_deref(), Some("/etc/ca.pem"));

        let (rest, o) = split_ssl_options("postgresql://h/db?sslmode=require").expect("parse");
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(o.mode, Some(SslMode::Require));

        let (rest, o) = split_ssl_options("postgres://h/db").expect("parse");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(o, SslOptions::default());
    }

    #[test]
    fn conninfo_options_are_taken_out() {
        let (rest, o) = split_ssl_options(
            "host=h  sslmode = verify-ca sslrootcert='/my certs/ca.pem' user=u sslcert=/c.pem sslkey=/k\\ 1.pem password='it\\'s'",
        )
        .expect("parse");
        assert_eq!(o.mode, Some(SslMode::VerifyCa));
        assert_eq!(o.root_cert.as_deref(), Some("/my certs/ca.pem"));
        assert_eq!(o.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(o.key, Some(PathBuf::from("/k 1.pem")));
        assert!(rest.starts_with("host=h user=u password="), "{rest}");
    }

    #[test]
    fn bad_modes_and_missing_files_are_named() {
        let e = split_ssl_options("postgres://h/db?sslmode=verify").expect_err("bad mode");
        assert!(e.contains("sslmode=verify is not one of"), "{e}");

        let (_, o) = split_ssl_options("postgres://h/db?sslmode=verify-full").expect("parse");
        let e = PgTls::new(&o).err().expect("no root cert");
        assert!(e.contains("sslmode=verify-full needs sslrootcert="), "{e}");

        let (_, o) =
            split_ssl_options("postgres://h/db?sslmode=verify-ca&sslrootcert=/nope/ca.pem")
                .expect("parse");
        let e = PgTls::new(&o).err().expect("missing CA file");
        assert!(
            e.starts_with("sslrootcert: cannot read the CA file /nope/ca.pem:"),
            "{e}"
        );

        let (_, o) =
            split_ssl_options("postgres://h/db?sslmode=require&sslrootcert=system").expect("parse");
        let e = PgTls::new(&o).err().expect("system needs verify-full");
        assert!(e.contains("needs sslmode=verify-full"), "{e}");

        let (_, o) =
            split_ssl_options("postgres://h/db?sslmode=require&sslcert=/c.pem").expect("parse");
        let e = PgTls::new(&o).err().expect("cert without key");
        assert!(e.contains("sslcert and sslkey go together"), "{e}");
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_knows() {
        use tokio_postgres::config::SslMode as Tp;
        for (mode, want) in [
            ("", Tp::Disable),
            ("?sslmode=disable", Tp::Disable),
            ("?sslmode=prefer", Tp::Prefer),
            ("?sslmode=require", Tp::Require),
        ] {
            let (_, o) = split_ssl_options(&format!("postgres://h/db{mode}")).expect("parse");
            let (_, tp) = PgTls::new(&o).map_err(|e| e.to_string()).expect("tls");
            assert_eq!(tp, want, "{mode}");
        }
    }
}
