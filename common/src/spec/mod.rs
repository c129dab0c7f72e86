//! The specifications the operator's custom resources, stowctl and the worker
//! agree on: UploadJob here, IndexCollection in [`index`]. Stored as JSON.

use serde::{Deserialize, Serialize};

pub mod index;
pub mod select;

/// S3's limits on multipart uploads.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_KEY_BYTES: usize = 1024;

/// Bounds of every number, string and list a spec can carry. The CRD schema
/// is generated from the same constants, so the API server, the operator
/// and the worker refuse the same values.
pub const MAX_CONCURRENCY: u32 = 64;
pub const MAX_ATTEMPTS: u32 = 100;
pub const MAX_BACKOFF_MILLIS: u64 = 86_400_000;
pub const MAX_URLS: usize = 10_000;
/// Longest URL (source, endpoint), in characters.
pub const MAX_URL_CHARS: usize = 8192;
/// Longest key prefix or source prefix, in characters (an S3 key is at most
/// 1,024 bytes).
pub const MAX_PREFIX_CHARS: usize = 1024;
pub const MAX_REGION_CHARS: usize = 64;
/// A Secret's name is a DNS subdomain.
pub const MAX_SECRET_NAME_CHARS: usize = 253;
/// A KMS key id, alias or ARN (AWS allows 2,048 characters).
pub const MAX_KMS_KEY_CHARS: usize = 2048;
/// A key of a Secret's data (Kubernetes: 253 characters).
pub const MAX_SECRET_KEY_CHARS: usize = 253;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct UploadJobSpec {
    pub source: UploadSource,
    pub destination: Destination,
    /// Size of each multipart part; objects up to this size go in one PUT.
    #[serde(default = "default_part_size")]
    #[cfg_attr(feature = "schema", schemars(range(min = MIN_PART_SIZE, max = MAX_PART_SIZE)))]
    pub part_size_bytes: u64,
    /// Parts of one file uploaded in parallel.
    #[serde(default = "default_concurrency")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_CONCURRENCY)))]
    pub concurrency: u32,
    #[serde(default)]
    pub conflict_policy: ConflictPolicy,
    /// Skip content already stored in the destination bucket (same SHA-256):
    /// the object is copied server-side instead of uploaded again.
    #[serde(default)]
    pub dedup: bool,
    /// Checksum sent with every part for the server to verify.
    #[serde(default)]
    pub checksum: ChecksumAlgorithm,
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// Exactly one of the fields is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "has(self.s3) != has(self.http)",
        "message": "exactly one of source.s3 or source.http must be set"
    }]))
)]
#[serde(rename_all = "camelCase")]
pub struct UploadSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// Bytes a client streams to a worker (`Ingest.Upload`). Never part of
    /// the UploadJob resource (not in its schema: the API server drops it,
    /// and [`UploadJobSpec::validate`] refuses it); the worker registers such
    /// jobs itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub ingest: Option<IngestSource>,
}

/// One object a client streams: what its `Ingest.Upload` header said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestSource {
    pub request_id: String,
    pub size: u64,
    /// The client's SHA-256 (hex) of the whole object, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Every object under a prefix of a bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct S3Source {
    #[cfg_attr(feature = "schema", schemars(length(min = 3, max = 63)))]
    pub bucket: String,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_PREFIX_CHARS)))]
    pub prefix: String,
    #[serde(flatten)]
    pub endpoint: Endpoint,
}

/// A list of files to download over HTTP(S).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = MAX_URLS), inner(length(min = 1, max = MAX_URL_CHARS)))
    )]
    pub urls: Vec<String>,
    /// Allow loopback, private (RFC 1918/4193), link-local and other
    /// non-public addresses. Off by default: a job must not become a way to
    /// reach the cluster's internal services.
    #[serde(default)]
    pub allow_private_networks: bool,
}

/// The bucket (and key prefix) the files land in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    #[cfg_attr(feature = "schema", schemars(length(min = 3, max = 63)))]
    pub bucket: String,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_PREFIX_CHARS)))]
    pub key_prefix: String,
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// Server-side encryption of every object the job writes (uploads,
    /// dedup copies, preserved versions). Without it, the bucket's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How the store encrypts what a job writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.type == 'SSE-KMS' || !has(self.kmsKeyId)",
            "message": "kmsKeyId goes only with type SSE-KMS"
        },
        {
            "rule": "(self.type == 'SSE-C') == has(self.customerKeySecretRef)",
            "message": "type SSE-C needs customerKeySecretRef, and only SSE-C takes one"
        }
    ]))
)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    #[serde(rename = "type")]
    pub kind: EncryptionType,
    /// SSE-KMS: the KMS key (id, alias or ARN); without it the store's
    /// default KMS key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_KMS_KEY_CHARS)))]
    pub kms_key_id: Option<String>,
    /// SSE-C: the Secret, in the job's namespace, holding the 256-bit key
    /// (32 bytes, or their base64). Stowage never stores it; the same key
    /// is needed to read the objects back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_key_secret_ref: Option<SecretKeyRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum EncryptionType {
    /// Keys managed by the store (`x-amz-server-side-encryption: AES256`).
    #[serde(rename = "SSE-S3")]
    SseS3,
    /// Keys in a KMS (`aws:kms`).
    #[serde(rename = "SSE-KMS")]
    SseKms,
    /// A key the customer provides with every request.
    #[serde(rename = "SSE-C")]
    SseC,
}

impl EncryptionType {
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionType::SseS3 => "SSE-S3",
            EncryptionType::SseKms => "SSE-KMS",
            EncryptionType::SseC => "SSE-C",
        }
    }
}

/// One key of a Secret in the resource's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SecretKeyRef {
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = MAX_SECRET_NAME_CHARS), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))
    )]
    pub name: String,
    /// The key in the Secret's data.
    #[serde(default = "default_sse_c_key")]
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = MAX_SECRET_KEY_CHARS), regex(pattern = r"^[-._a-zA-Z0-9]+$"))
    )]
    pub key: String,
}

fn default_sse_c_key() -> String {
    "key".into()
}

/// Where an S3-compatible service is and which credentials to use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `https://…` of an S3-compatible service; empty means AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_URL_CHARS)))]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_REGION_CHARS)))]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most
    /// S3-compatible servers need.
    #[serde(default = "default_true")]
    pub force_path_style: bool,
    /// The Secret with the credentials (`access_key_id`,
    /// `secret_access_key`), in the resource's own namespace. Without one,
    /// requests are anonymous (public buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Use the worker's own credentials (its `AWS_*` environment) instead
    /// of a Secret: only where the installation allows it
    /// (`--allow-worker-credentials` on the operator and the workers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_worker_credentials: bool,
    /// Allow the endpoint to be a loopback, private (RFC 1918/4193),
    /// link-local or other non-public address: only where the installation
    /// permits it (`--allow-private-networks` on the operator and workers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_private_networks: bool,
}

impl Endpoint {
    /// The endpoint URL, or `aws`: names the store in lock keys, events and
    /// logs.
    pub fn label(&self) -> &str {
        self.endpoint
            .as_deref()
            .map_or("aws", |e| e.trim_end_matches('/'))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SecretRef {
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = MAX_SECRET_NAME_CHARS), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))
    )]
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum ConflictPolicy {
    /// Leave an existing object alone.
    Skip,
    /// Replace an existing object.
    #[default]
    Overwrite,
    /// Preserve the existing object under `<key>.stowage-v<N>` (server-side
    /// copy, recorded in the object history), then replace it. Works on stores
    /// without bucket versioning.
    Version,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum ChecksumAlgorithm {
    #[default]
    Crc32c,
    Sha256,
}

impl ChecksumAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32c => "crc32c",
            ChecksumAlgorithm::Sha256 => "sha256",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", default)]
pub struct RetryPolicy {
    /// Attempts per file before it is dead-lettered.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_ATTEMPTS)))]
    pub max_attempts: u32,
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::default(),
        }
    }
}

/// Exponential backoff with full jitter: attempt n waits a random time in
/// `[0, min(max, base·2ⁿ⁻¹)]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", default)]
pub struct Backoff {
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_BACKOFF_MILLIS)))]
    pub base_millis: u64,
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_BACKOFF_MILLIS)))]
    pub max_millis: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_millis: 1_000,
            max_millis: 300_000,
        }
    }
}

fn default_part_size() -> u64 {
    16 * 1024 * 1024
}
fn default_concurrency() -> u32 {
    4
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("source: exactly one of `s3` or `http` must be set, found {0}")]
    SourceKinds(usize),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl UploadJobSpec {
    /// The endpoints of this spec that ask for the worker's own credentials
    /// (`useWorkerCredentials`), by field.
    pub fn worker_credentials(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self
            .source
            .s3
            .as_ref()
            .is_some_and(|s| s.endpoint.use_worker_credentials)
        {
            out.push("source.s3.useWorkerCredentials");
        }
        if self.destination.endpoint.use_worker_credentials {
            out.push("destination.useWorkerCredentials");
        }
        out
    }

    /// The fields of this spec that ask for private networks.
    pub fn private_networks(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self
            .source
            .http
            .as_ref()
            .is_some_and(|h| h.allow_private_networks)
        {
            out.push("source.http.allowPrivateNetworks");
        }
        if self
            .source
            .s3
            .as_ref()
            .is_some_and(|s| s.endpoint.allow_private_networks)
        {
            out.push("source.s3.allowPrivateNetworks");
        }
        if self.destination.endpoint.allow_private_networks {
            out.push("destination.allowPrivateNetworks");
        }
        out
    }

    /// Everything that can be judged from the spec alone; the message names
    /// the field so it can be shown as an `InvalidSpec` condition.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.source.ingest.is_some() {
            return Err(invalid(
                "source.ingest",
                "is set only by a worker's Ingest API, never in an UploadJob",
            ));
        }
        let kinds = usize::from(self.source.s3.is_some()) + usize::from(self.source.http.is_some());
        if kinds != 1 {
            return Err(SpecError::SourceKinds(kinds));
        }
        if let Some(s3) = &self.source.s3 {
            validate_bucket("source.s3.bucket", &s3.bucket)?;
            validate_endpoint("source.s3.endpoint", &s3.endpoint)?;
        }
        if let Some(s3) = &self.source.s3 {
            validate_chars("source.s3.prefix", &s3.prefix, MAX_PREFIX_CHARS)?;
        }
        if let Some(http) = &self.source.http {
            if http.urls.is_empty() || http.urls.len() > MAX_URLS {
                return Err(invalid(
                    "source.http.urls",
                    format!("{} URLs; a job takes 1 to {MAX_URLS}", http.urls.len()),
                ));
            }
            for (i, u) in http.urls.iter().enumerate() {
                validate_url(&format!("source.http.urls[{i}]"), u)?;
            }
        }
        validate_bucket("destination.bucket", &self.destination.bucket)?;
        validate_endpoint("destination.endpoint", &self.destination.endpoint)?;
        validate_chars(
            "destination.keyPrefix",
            &self.destination.key_prefix,
            MAX_PREFIX_CHARS,
        )?;
        if !self.destination.key_prefix.is_empty() {
            validate_key(&self.destination.key_prefix)
                .map_err(|e| invalid("destination.keyPrefix", e.to_string()))?;
        }
        if let Some(e) = &self.destination.encryption {
            validate_encryption("destination.encryption", e)?;
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size_bytes) {
            return Err(invalid(
                "partSizeBytes",
                format!(
                    "{} is outside S3's part size limits [{MIN_PART_SIZE}, {MAX_PART_SIZE}]",
                    self.part_size_bytes
                ),
            ));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(invalid(
                "concurrency",
                format!("{} is not within [1, {MAX_CONCURRENCY}]", self.concurrency),
            ));
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.retry.max_attempts) {
            return Err(invalid(
                "retry.maxAttempts",
                format!(
                    "{} is not within [1, {MAX_ATTEMPTS}]",
                    self.retry.max_attempts
                ),
            ));
        }
        let b = &self.retry.backoff;
        if b.base_millis == 0 || b.base_millis > b.max_millis || b.max_millis > MAX_BACKOFF_MILLIS {
            return Err(invalid(
                "retry.backoff",
                format!(
                    "baseMillis ({}) must be > 0 and <= maxMillis ({}), which is at most \
                     {MAX_BACKOFF_MILLIS}",
                    b.base_millis, b.max_millis
                ),
            ));
        }
        Ok(())
    }
}

pub fn validate_endpoint(field: &str, e: &Endpoint) -> Result<(), SpecError> {
    if let Some(url) = &e.endpoint {
        let parsed = validate_url(field, url)?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid(
                field,
                "must not carry credentials: name a Secret in credentialsSecretRef",
            ));
        }
    }
    if e.region.is_empty() || e.region.chars().count() > MAX_REGION_CHARS {
        return Err(invalid(
            field,
            format!("region must have 1 to {MAX_REGION_CHARS} characters"),
        ));
    }
    if let Some(r) = &e.credentials_secret_ref {
        validate_secret_name(field, &r.name)?;
    }
    Ok(())
}

fn validate_encryption(field: &str, e: &Encryption) -> Result<(), SpecError> {
    if let Some(id) = &e.kms_key_id {
        if e.kind != EncryptionType::SseKms {
            return Err(invalid(field, "kmsKeyId goes only with type SSE-KMS"));
        }
        if id.is_empty()
            || id.chars().count() > MAX_KMS_KEY_CHARS
            || !id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                format!("{field}.kmsKeyId"),
                format!("must be 1 to {MAX_KMS_KEY_CHARS} printable characters without spaces"),
            ));
        }
    }
    match (&e.customer_key_secret_ref, e.kind) {
        (Some(r), EncryptionType::SseC) => {
            validate_secret_name(&format!("{field}.customerKeySecretRef"), &r.name)?;
            let key_ok = (1..=MAX_SECRET_KEY_CHARS).contains(&r.key.len())
                && r.key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !key_ok {
                return Err(invalid(
                    format!("{field}.customerKeySecretRef.key"),
                    format!("{:?} is not a Secret data key", r.key),
                ));
            }
            Ok(())
        }
        (None, EncryptionType::SseC) => {
            Err(invalid(field, "type SSE-C needs customerKeySecretRef"))
        }
        (Some(_), _) => Err(invalid(
            field,
            "customerKeySecretRef goes only with type SSE-C",
        )),
        (None, _) => Ok(()),
    }
}

/// A Secret's name: a DNS subdomain (lower-case letters, digits, `-`, `.`).
pub fn validate_secret_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok_chars = name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    let ok_ends = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if (1..=MAX_SECRET_NAME_CHARS).contains(&name.len()) && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(invalid(
            format!("{field}.credentialsSecretRef.name"),
            format!("{name:?} is not a valid Secret name (a DNS subdomain)"),
        ))
    }
}

/// An `http://` or `https://` URL with a host, without whitespace or
/// control characters: what every source URL and endpoint must be. Refused
/// here, such a URL would otherwise fail later, once per file, as a dead
/// letter.
pub fn validate_url(field: &str, s: &str) -> Result<url::Url, SpecError> {
    if s.chars().count() > MAX_URL_CHARS {
        return Err(invalid(
            field,
            format!("the URL is longer than {MAX_URL_CHARS} characters"),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            field,
            format!(
                "{:?} contains whitespace or a control character",
                s.escape_debug().to_string()
            ),
        ));
    }
    let url = url::Url::parse(s).map_err(|e| invalid(field, format!("{s:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            field,
            format!("{s:?} is not an http:// or https:// URL"),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(field, format!("{s:?} has no host")));
    }
    Ok(url)
}

/// At most `max` characters (Kubernetes' `maxLength` counts characters).
fn validate_chars(field: &str, s: &str, max: usize) -> Result<(), SpecError> {
    if s.chars().count() > max {
        return Err(invalid(field, format!("longer than {max} characters")));
    }
    Ok(())
}

/// S3 bucket naming rules (3–63 chars, lowercase letters, digits, `-`, `.`).
pub fn validate_bucket(field: &str, bucket: &str) -> Result<(), SpecError> {
    let ok_chars = bucket
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    let ok_ends = bucket
        .bytes()
        .next()
        .zip(bucket.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{bucket:?} is not a valid bucket name (3-63 of a-z 0-9 . -)"),
        ))
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum KeyError {
    #[error("object key is empty")]
    Empty,
    #[error("object key is {0} bytes, more than S3's {MAX_KEY_BYTES}")]
    TooLong(usize),
    #[error("object key {0:?} contains a control character")]
    ControlCharacter(String),
    #[error("object key {0:?} contains a `.` or `..` path segment")]
    DotSegment(String),
    #[error("object key {0:?} starts with `/`")]
    Absolute(String),
    #[error("object key {0:?} contains a backslash")]
    Backslash(String),
}

/// Refuses keys that would be dangerous or surprising for the many tools
/// that map keys to file paths (`../`, control characters, `\`).
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong(key.len()));
    }
    if key.chars().any(char::is_control) {
        return Err(KeyError::ControlCharacter(key.escape_debug().to_string()));
    }
    if key.starts_with('/') {
        return Err(KeyError::Absolute(key.into()));
    }
    if key.contains('\\') {
        return Err(KeyError::Backslash(key.into()));
    }
    if key.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(KeyError::DotSegment(key.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> UploadJobSpec {
        serde_json::from_value(serde_json::json!({
            "source": {"http": {"urls": ["https://example.com/a.txt"]}},
            "destination": {"bucket": "docs", "keyPrefix": "in/"},
        }))
        .expect("fixture parses")
    }

    #[test]
    fn defaults_are_valid() {
        let s = spec();
        assert_eq!(s.part_size_bytes, 16 * 1024 * 1024);
        assert_eq!(s.conflict_policy, ConflictPolicy::Overwrite);
        assert_eq!(s.retry.max_attempts, 5);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn rejects_two_sources_and_bad_limits() {
        let mut s = spec();
        s.source.s3 = Some(S3Source {
            bucket: "src".into(),
            prefix: String::new(),
            endpoint: Endpoint::default(),
        });
        assert_eq!(s.validate(), Err(SpecError::SourceKinds(2)));
        let mut s = spec();
        s.part_size_bytes = 1024;
        assert!(
            s.validate()
                .expect_err("invalid")
                .to_string()
                .starts_with("partSizeBytes:")
        );
        let mut s = spec();
        s.concurrency = 0;
        assert!(
            s.validate()
                .expect_err("invalid")
                .to_string()
                .starts_with("concurrency:")
        );
        let mut s = spec();
        s.destination.bucket = "Bad_Bucket".into();
        assert!(
            s.validate()
                .expect_err("invalid")
                .to_string()
                .contains("not a valid bucket name")
        );
    }

    #[test]
    fn hostile_keys_are_refused() {
        assert_eq!(validate_key("docs/a.txt"), Ok(()));
        assert_eq!(validate_key("docs/..hidden"), Ok(()));
        assert!(matches!(
            validate_key("docs/../etc/passwd"),
            Err(KeyError::DotSegment(_))
        ));
        assert!(matches!(
            validate_key("a\u{7}b"),
            Err(KeyError::ControlCharacter(_))
        ));
        assert!(matches!(
            validate_key("a\nb"),
            Err(KeyError::ControlCharacter(_))
        ));
        assert!(matches!(validate_key("/abs"), Err(KeyError::Absolute(_))));
        assert!(matches!(
            validate_key(&"k".repeat(1025)),
            Err(KeyError::TooLong(1025))
        ));
        assert_eq!(validate_key(""), Err(KeyError::Empty));
    }
}
