//! Secrets a resource names, read in the resource's own namespace and
//! nowhere else: a `credentialsSecretRef` of a resource in namespace A
//! means `A/<name>`, whatever the name says.
//!
//! Two sources:
//! - the Kubernetes API ([`SecretSource::Kubernetes`], feature
//!   `kubernetes`): read with the component's own ServiceAccount, which a
//!   tenant namespace grants `get` on its Secrets to (the Helm chart's
//!   `tenantNamespaces`: a RoleBinding per namespace, no cluster-wide
//!   access), cached for a short time;
//! - a directory laid out by namespace ([`SecretSource::Directory`]):
//!   `<dir>/<namespace>/<name>/<key>`, the way Secrets mounted as volumes
//!   can be arranged for a single-tenant install (and the tests).
//!
//! Secret values never leave the process: not in PostgreSQL, NATS, status,
//! events, logs or dead letters. [`SecretData`]'s `Debug` shows keys only.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a Secret a resource names cannot be used. Every variant names the
/// namespace and the Secret; none says anything of another namespace.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "Secret {namespace}/{name} was not found: create it in namespace {namespace} (a resource \
         can only use Secrets of its own namespace)"
    )]
    NotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has none of the keys {keys}")]
    MissingKey {
        namespace: String,
        name: String,
        keys: String,
    },
    #[error(
        "Secret {namespace}/{name} cannot be read by Stowage: {reason} (list the namespace in \
         the chart's tenantNamespaces to let Stowage read its Secrets)"
    )]
    Forbidden {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("Secret {namespace}/{name} could not be read: {reason}")]
    Unavailable {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("Secret {namespace}/{name} cannot be used: {reason}")]
    Invalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("{0:?} is not a valid Secret name")]
    InvalidName(String),
    #[error(
        "the resource asks for the worker's own credentials (useWorkerCredentials), which this \
         installation does not allow (--allow-worker-credentials)"
    )]
    WorkerCredentialsRefused,
    #[error("{0}")]
    Other(String),
}

impl CredentialsError {
    /// Worth trying again: the API server or the disk failed, not the spec.
    pub fn is_transient(&self) -> bool {
        matches!(self, CredentialsError::Unavailable { .. })
    }
}

/// A Secret's data. Its `Debug` shows the keys, never the values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    namespace: String,
    name: String,
    values: BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretData")
            .field("secret", &format!("{}/{}", self.namespace, self.name))
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretData {
    pub fn new(namespace: &str, name: &str, values: BTreeMap<String, Vec<u8>>) -> Self {
        SecretData {
            namespace: namespace.into(),
            name: name.into(),
            values,
        }
    }

    /// The first of `keys` present, as trimmed UTF-8.
    pub fn value(&self, keys: &[&str]) -> Result<String, CredentialsError> {
        self.bytes(keys)
            .map(|v| String::from_utf8_lossy(v).trim().to_string())
    }

    /// The first of `keys` present, as stored (binary key material).
    pub fn bytes(&self, keys: &[&str]) -> Result<&[u8], CredentialsError> {
        keys.iter()
            .find_map(|k| self.values.get(*k))
            .map(Vec::as_slice)
            .ok_or_else(|| CredentialsError::MissingKey {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                keys: keys.join(" / "),
            })
    }

    /// A refusal of this Secret's content, naming it (never the value).
    pub fn invalid(&self, reason: impl Into<String>) -> CredentialsError {
        CredentialsError::Invalid {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// Where Secrets come from.
#[derive(Clone)]
pub enum SecretSource {
    /// `<dir>/<namespace>/<name>/<key>`.
    Directory(PathBuf),
    /// The Kubernetes API, with the component's own identity.
    #[cfg(feature = "kubernetes")]
    Kubernetes(kube::Client),
    /// No way to read Secrets here, and why (no `--credentials-dir` and no
    /// Kubernetes API): every Secret is refused with that reason.
    Unconfigured(String),
    /// Each source in turn: a Secret one does not have is looked up in the
    /// next (mounted Secrets of the release namespace first, then the API
    /// for tenant namespaces). Any other refusal is final.
    Layered(Vec<SecretSource>),
}

/// Where the binaries read the Secrets resources name (flags shared by the
/// operator and the worker).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct CredentialsArgs {
    /// Read Secrets from this directory first, laid out by namespace:
    /// `<dir>/<namespace>/<secret>/<key>` (Secrets mounted as volumes,
    /// local runs). A Secret it does not hold is read from the Kubernetes
    /// API, in the resource's own namespace, with this process's
    /// ServiceAccount.
    #[arg(long, env = "STOWAGE_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,

    /// Let resources use this process's own `AWS_*` credentials
    /// (`useWorkerCredentials` on an endpoint). Off by default: in a shared
    /// installation they would open every tenant's way to them.
    #[arg(
        long,
        env = "STOWAGE_ALLOW_WORKER_CREDENTIALS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub allow_worker_credentials: bool,
}

/// Reads Secrets by `(namespace, name)`, caching each for a short time (a
/// rotated Secret is seen within that time).
#[derive(Clone)]
pub struct Secrets {
    source: SecretSource,
    ttl: Duration,
    cache: Arc<Mutex<HashMap<(String, String), Cached>>>,
}

/// A Secret read at some instant.
type Cached = (Instant, Arc<SecretData>);

/// How long a Secret read is reused.
pub const SECRET_TTL: Duration = Duration::from_secs(30);

impl Secrets {
    pub fn new(source: SecretSource, ttl: Duration) -> Self {
        Secrets {
            source,
            ttl,
            cache: Arc::default(),
        }
    }

    /// The Secret `namespace/name`.
    pub async fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<SecretData>, CredentialsError> {
        if !valid_name(name) || !valid_name(namespace) {
            return Err(CredentialsError::InvalidName(if valid_name(name) {
                namespace.to_string()
            } else {
                name.to_string()
            }));
        }
        let key = (namespace.to_string(), name.to_string());
        if let Some((at, data)) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned())
            && at.elapsed() < self.ttl
        {
            return Ok(data);
        }
        let data = Arc::new(self.read(namespace, name).await?);
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|_, (at, _)| at.elapsed() < self.ttl);
            c.insert(key, (Instant::now(), Arc::clone(&data)));
        }
        Ok(data)
    }

    async fn read(&self, namespace: &str, name: &str) -> Result<SecretData, CredentialsError> {
        self.source.read(namespace, name).await
    }
}

impl SecretSource {
    async fn read(&self, namespace: &str, name: &str) -> Result<SecretData, CredentialsError> {
        let not_found = || CredentialsError::NotFound {
            namespace: namespace.into(),
            name: name.into(),
        };
        match self {
            SecretSource::Layered(sources) => {
                for source in sources {
                    match Box::pin(source.read(namespace, name)).await {
                        Err(CredentialsError::NotFound { .. }) => continue,
                        found => return found,
                    }
                }
                Err(not_found())
            }
            SecretSource::Unconfigured(why) => Err(CredentialsError::Unavailable {
                namespace: namespace.into(),
                name: name.into(),
                reason: why.clone(),
            }),
            SecretSource::Directory(dir) => {
                let base = dir.join(namespace).join(name);
                let entries = match std::fs::read_dir(&base) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
                    Err(e) => {
                        return Err(CredentialsError::Unavailable {
                            namespace: namespace.into(),
                            name: name.into(),
                            reason: e.kind().to_string(),
                        });
                    }
                };
                let mut values = BTreeMap::new();
                for entry in entries.flatten() {
                    let key = entry.file_name().to_string_lossy().into_owned();
                    // Mounted Secrets carry `..data` links and dot-files.
                    if key.starts_with('.') {
                        continue;
                    }
                    if let Ok(v) = std::fs::read(entry.path()) {
                        values.insert(key, v);
                    }
                }
                Ok(SecretData::new(namespace, name, values))
            }
            #[cfg(feature = "kubernetes")]
            SecretSource::Kubernetes(client) => {
                use k8s_openapi::api::core::v1::Secret;
                let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
                match api.get_opt(name).await {
                    Ok(Some(secret)) => {
                        let mut values: BTreeMap<String, Vec<u8>> = secret
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0))
                            .collect();
                        // Only an API server that skips defaulting (an
                        // emulator) leaves stringData in place.
                        for (k, v) in secret.string_data.unwrap_or_default() {
                            values.entry(k).or_insert_with(|| v.into_bytes());
                        }
                        Ok(SecretData::new(namespace, name, values))
                    }
                    Ok(None) => Err(not_found()),
                    Err(kube::Error::Api(s)) if s.code == 403 => Err(CredentialsError::Forbidden {
                        namespace: namespace.into(),
                        name: name.into(),
                        reason: s.message,
                    }),
                    Err(e) => Err(CredentialsError::Unavailable {
                        namespace: namespace.into(),
                        name: name.into(),
                        reason: crate::errors::chain(&e),
                    }),
                }
            }
        }
    }
}

/// A DNS subdomain (Secret and namespace names): no path tricks possible.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && name
            .bytes()
            .next()
            .zip(name.bytes().last())
            .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_is_laid_out_by_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (ns, key, value) in [
            ("team-a", "api_key", "key-a"),
            ("team-b", "api_key", "key-b"),
        ] {
            let d = dir.path().join(ns).join("creds");
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join(key), format!("{value}\n")).expect("write");
        }
        let secrets = Secrets::new(SecretSource::Directory(dir.path().into()), SECRET_TTL);
        let a = secrets.get("team-a", "creds").await.expect("team-a/creds");
        assert_eq!(a.value(&["api_key"]), Ok("key-a".to_string()));
        assert!(
            !format!("{a:?}").contains("key-a"),
            "Debug shows no value: {a:?}"
        );
        let e = secrets.get("team-c", "creds").await.expect_err("not there");
        assert_eq!(
            e.to_string(),
            "Secret team-c/creds was not found: create it in namespace team-c (a resource can \
             only use Secrets of its own namespace)"
        );
        for name in ["../team-b/creds", "team-b/creds", "..", ""] {
            assert!(
                matches!(
                    secrets.get("team-a", name).await,
                    Err(CredentialsError::InvalidName(_))
                ),
                "{name:?}"
            );
        }
        assert!(matches!(
            a.value(&["access_key_id"]),
            Err(CredentialsError::MissingKey { .. })
        ));
    }

    #[tokio::test]
    async fn layered_sources_fall_through_only_on_not_found() {
        let mounted = tempfile::tempdir().expect("tempdir");
        let api = tempfile::tempdir().expect("tempdir");
        for (dir, ns, value) in [
            (&mounted, "stowage", "mounted"),
            (&api, "stowage", "shadowed"),
            (&api, "team-a", "from-api"),
        ] {
            let d = dir.path().join(ns).join("creds");
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("api_key"), value).expect("write");
        }
        let layered = |last: SecretSource| {
            Secrets::new(
                SecretSource::Layered(vec![SecretSource::Directory(mounted.path().into()), last]),
                SECRET_TTL,
            )
        };
        let secrets = layered(SecretSource::Directory(api.path().into()));
        let key = |d: Arc<SecretData>| d.value(&["api_key"]);
        assert_eq!(
            key(secrets.get("stowage", "creds").await.expect("mounted")),
            Ok("mounted".into())
        );
        assert_eq!(
            key(secrets.get("team-a", "creds").await.expect("next source")),
            Ok("from-api".into())
        );
        assert!(matches!(
            secrets.get("team-b", "creds").await,
            Err(CredentialsError::NotFound { .. })
        ));
        // A refusal other than "not here" is the answer.
        let secrets = layered(SecretSource::Unconfigured("no API".into()));
        assert!(matches!(
            secrets.get("team-a", "creds").await,
            Err(CredentialsError::Unavailable { .. })
        ));
    }
}
