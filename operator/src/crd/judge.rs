//! Resources as the API serves them, and the operator's verdict on each.
//!
//! The controllers watch [`Raw`] objects, whose spec and status are untyped
//! JSON: any object can be listed and watched, so one that does not fit the
//! Rust types (a string where a number belongs, an unknown enum value, no
//! spec at all) can neither fail the watch for every other resource nor be
//! silently skipped. [`judge`] then turns a raw object into the typed
//! resource — or into the reason it is refused, naming the field, which the
//! controller shows as `Ready=False, reason=InvalidSpec`.

use std::borrow::Cow;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::OnceLock;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{CustomResourceExt, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::schema;
use super::{IndexCollection, UploadJob};

/// A resource of kind `K` with its spec and status as the API served them.
#[derive(Deserialize, Serialize)]
pub struct Raw<K> {
    #[serde(
        default,
        rename = "apiVersion",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
    #[serde(skip)]
    _kind: PhantomData<fn() -> K>,
}

impl<K> Raw<K> {
    pub fn new(metadata: ObjectMeta, spec: Option<Value>, status: Option<Value>) -> Self {
        Raw {
            api_version: None,
            kind: None,
            metadata,
            spec,
            status,
            _kind: PhantomData,
        }
    }
}

impl<K> Clone for Raw<K> {
    fn clone(&self) -> Self {
        Raw {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.clone(),
            _kind: PhantomData,
        }
    }
}

impl<K> Debug for Raw<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raw")
            .field("kind", &self.kind)
            .field("name", &self.metadata.name)
            .field("namespace", &self.metadata.namespace)
            .finish_non_exhaustive()
    }
}

impl<K> Resource for Raw<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A custom resource the operator judges before acting on it.
pub trait Judged:
    Resource<DynamicType = (), Scope = NamespaceResourceScope> + CustomResourceExt + DeserializeOwned
{
    type Status: DeserializeOwned + Serialize + Default + Clone + PartialEq + Send + Sync + 'static;

    /// What the schema cannot say: the spec's own rules (the CEL rules of
    /// the CRD among them).
    fn check(&self) -> Result<(), String>;

    fn set_status(&mut self, status: Option<Self::Status>);

    /// The spec's schema, from the generated CRD (computed once).
    fn spec_schema() -> &'static Value;

    /// The fields that ask to reach private networks.
    fn private_networks(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// The fields that ask for the workers' own credentials.
    fn worker_credentials(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// What this installation lets a resource ask for (the operator's
/// `--allow-*` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    pub private_networks: bool,
    pub worker_credentials: bool,
}

/// The first step of a reconcile, pure: [`judge`], then what the
/// installation allows. `Err` is the message of the InvalidSpec condition.
pub fn validate<K: Judged>(raw: &Raw<K>, allowed: Allowed) -> Result<K, String> {
    let k = judge::<K>(raw)?;
    if let Some(field) = k.private_networks().first()
        && !allowed.private_networks
    {
        return Err(format!(
            "spec.{field}: this installation does not let resources reach private networks \
             (--allow-private-networks)"
        ));
    }
    if let Some(field) = k.worker_credentials().first()
        && !allowed.worker_credentials
    {
        return Err(format!(
            "spec.{field}: this installation does not let resources use the workers' own \
             credentials (--allow-worker-credentials): name a Secret in credentialsSecretRef"
        ));
    }
    Ok(k)
}

/// The typed resource, or why it is refused: the spec is checked against
/// the CRD's schema (types, bounds, unknown fields…), read into the Rust
/// types, then judged by its own rules. A status that no longer fits the
/// types is dropped, not fatal: the operator writes a new one.
pub fn judge<K: Judged>(raw: &Raw<K>) -> Result<K, String> {
    let spec = match &raw.spec {
        None | Some(Value::Null) => {
            return Err("spec: Required value: the resource has no spec".into());
        }
        Some(spec) => spec,
    };
    let errors = schema::check(K::spec_schema(), spec, "spec");
    if !errors.is_empty() {
        return Err(schema::describe(&errors));
    }
    let object = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": raw.metadata,
        "spec": spec,
    });
    let mut typed: K = serde_path_to_error::deserialize(object)
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    typed.set_status(
        raw.status
            .clone()
            .and_then(|s| serde_json::from_value(s).ok()),
    );
    typed.check()?;
    Ok(typed)
}

/// The previous status of a raw object, as far as it still fits the types.
pub fn previous_status<K: Judged>(raw: &Raw<K>) -> Option<K::Status> {
    raw.status
        .clone()
        .and_then(|s| serde_json::from_value(s).ok())
}

/// The `spec` property of `K`'s generated CRD schema.
fn spec_schema_of<K: CustomResourceExt>() -> Value {
    serde_json::to_value(K::crd())
        .map(|crd| {
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
        })
        .unwrap_or(Value::Null)
}

impl Judged for UploadJob {
    type Status = super::UploadJobStatus;

    fn check(&self) -> Result<(), String> {
        self.spec.upload.validate().map_err(|e| e.to_string())
    }

    fn set_status(&mut self, status: Option<Self::Status>) {
        self.status = status;
    }

    fn spec_schema() -> &'static Value {
        static SCHEMA: OnceLock<Value> = OnceLock::new();
        SCHEMA.get_or_init(spec_schema_of::<UploadJob>)
    }

    fn private_networks(&self) -> Vec<&'static str> {
        self.spec.upload.private_networks()
    }

    fn worker_credentials(&self) -> Vec<&'static str> {
        self.spec.upload.worker_credentials()
    }
}

impl Judged for IndexCollection {
    type Status = super::IndexCollectionStatus;

    fn check(&self) -> Result<(), String> {
        self.spec.index.validate().map_err(|e| e.to_string())?;
        crate::status::index_collection::parse_interval(&self.spec.resync_interval)
            .map(|_| ())
            .map_err(|e| format!("resyncInterval: {e}"))
    }

    fn set_status(&mut self, status: Option<Self::Status>) {
        self.status = status;
    }

    fn spec_schema() -> &'static Value {
        static SCHEMA: OnceLock<Value> = OnceLock::new();
        SCHEMA.get_or_init(spec_schema_of::<IndexCollection>)
    }

    fn private_networks(&self) -> Vec<&'static str> {
        self.spec.index.private_networks()
    }

    fn worker_credentials(&self) -> Vec<&'static str> {
        self.spec.index.worker_credentials()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{IndexCollection, UploadJob};
    use serde_json::json;

    fn raw<K>(kind: &str, spec: Value) -> Raw<K> {
        serde_json::from_value(json!({
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": "x", "namespace": "team-a", "uid": "u", "generation": 1},
            "spec": spec,
        }))
        .expect("a raw resource")
    }

    fn upload(source: Value) -> Raw<UploadJob> {
        raw(
            "UploadJob",
            json!({
                "source": source,
                "destination": {"bucket": "archive", "credentialsSecretRef": {"name": "w"}},
            }),
        )
    }

    const ALL: Allowed = Allowed {
        private_networks: true,
        worker_credentials: true,
    };

    #[test]
    fn what_the_installation_forbids_is_refused_with_the_field_named() {
        let private = upload(json!({"http": {"urls": ["http://10.0.0.1/a"],
                                             "allowPrivateNetworks": true}}));
        let e = validate(&private, Allowed::default()).expect_err("private networks");
        assert!(
            e.starts_with("spec.source.http.allowPrivateNetworks: ")
                && e.contains("--allow-private-networks"),
            "{e}"
        );
        assert!(validate(&private, ALL).is_ok());

        let own = upload(json!({"s3": {"bucket": "incoming", "useWorkerCredentials": true}}));
        let e = validate(&own, Allowed::default()).expect_err("worker credentials");
        assert!(
            e.starts_with("spec.source.s3.useWorkerCredentials: "),
            "{e}"
        );
        assert!(validate(&own, ALL).is_ok());

        let collection: Raw<IndexCollection> = raw(
            "IndexCollection",
            json!({
                "source": {"bucket": "docs", "useWorkerCredentials": true},
                "embedding": {"provider": "builtin"},
            }),
        );
        let e = validate(&collection, Allowed::default()).expect_err("worker credentials");
        assert!(e.starts_with("spec.source.useWorkerCredentials: "), "{e}");
        assert!(validate(&collection, ALL).is_ok());
    }

    #[test]
    fn a_spec_the_schema_refuses_is_refused_before_the_installation_is_asked() {
        let bad = upload(json!({"s3": {"bucket": "incoming"}, "http": {"urls": ["https://x/a"]}}));
        assert!(validate(&bad, ALL).is_err());
        let fine = upload(json!({"http": {"urls": ["https://example.com/a"]}}));
        assert!(validate(&fine, Allowed::default()).is_ok());
    }
}
