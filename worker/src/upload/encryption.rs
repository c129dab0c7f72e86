//! Server-side encryption of what an UploadJob writes
//! (`destination.encryption`): SSE-S3, SSE-KMS or SSE-C, applied to single
//! PUTs, multipart uploads (create, every part and the completion for
//! SSE-C) and server-side copies (dedup, preserved versions, the metadata
//! self-copy), and checked on every verifying HEAD.
//!
//! A store that does not support a kind may accept the request and ignore
//! the header (Garage stores SSE-S3 and SSE-KMS uploads in clear): planning
//! first creates and aborts a multipart upload with the job's encryption and
//! refuses the job, before anything is written, when the answer does not
//! say the store applied it. An object whose verifying HEAD does not show
//! the encryption asked for is deleted, not left in clear.
//!
//! The SSE-C key is read from a Secret of the job's namespace when a task
//! needs it and lives only in memory: not in PostgreSQL, NATS, status,
//! events or logs (its `Debug` shows the key's MD5 only).

use std::fmt;

use aws_sdk_s3::types::ServerSideEncryption;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use md5::{Digest as _, Md5};
use stowage_common::secrets::Secrets;
use stowage_common::spec::{Encryption, EncryptionType};
use stowage_common::storage::{abort_upload, s3_error};
use tracing::warn;

use super::UploadError;

/// The only SSE-C algorithm S3 defines.
const SSE_C_ALGORITHM: &str = "AES256";

/// The encryption a job's writes carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sse {
    S3,
    Kms { key_id: Option<String> },
    Customer(CustomerKey),
}

/// A 256-bit SSE-C key, as the headers carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct CustomerKey {
    key_b64: String,
    md5_b64: String,
}

impl fmt::Debug for CustomerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CustomerKey(md5 {})", self.md5_b64)
    }
}

impl CustomerKey {
    /// A key from a Secret's bytes: 32 raw bytes, or their base64 (with or
    /// without a trailing newline).
    fn parse(bytes: &[u8]) -> Result<CustomerKey, String> {
        let key: Vec<u8> = if bytes.len() == 32 {
            bytes.to_vec()
        } else {
            let text = std::str::from_utf8(bytes)
                .map(str::trim)
                .map_err(|_| format!("{} bytes, neither 32 bytes nor base64", bytes.len()))?;
            BASE64.decode(text).map_err(|_| {
                format!(
                    "{} bytes, neither 32 bytes nor the base64 of 32 bytes",
                    bytes.len()
                )
            })?
        };
        if key.len() != 32 {
            return Err(format!(
                "the key is {} bytes; SSE-C takes a 256-bit key (32 bytes)",
                key.len()
            ));
        }
        Ok(CustomerKey {
            key_b64: BASE64.encode(&key),
            md5_b64: BASE64.encode(Md5::digest(&key)),
        })
    }

    pub fn algorithm(&self) -> &'static str {
        SSE_C_ALGORITHM
    }

    pub fn key_b64(&self) -> &str {
        &self.key_b64
    }

    pub fn md5_b64(&self) -> &str {
        &self.md5_b64
    }
}

impl Sse {
    /// The encryption `spec` asks for, with the SSE-C key read from the
    /// job's namespace.
    pub async fn resolve(
        spec: Option<&Encryption>,
        namespace: &str,
        secrets: &Secrets,
    ) -> Result<Option<Sse>, UploadError> {
        let Some(spec) = spec else { return Ok(None) };
        Ok(Some(match spec.kind {
            EncryptionType::SseS3 => Sse::S3,
            EncryptionType::SseKms => Sse::Kms {
                key_id: spec.kms_key_id.clone(),
            },
            EncryptionType::SseC => {
                let r = spec.customer_key_secret_ref.as_ref().ok_or_else(|| {
                    UploadError::Invalid(
                        "destination.encryption: type SSE-C needs customerKeySecretRef".into(),
                    )
                })?;
                let secret = secrets.get(namespace, &r.name).await?;
                let bytes = secret.bytes(&[r.key.as_str()])?;
                let key = CustomerKey::parse(bytes).map_err(|why| {
                    secret.invalid(format!("key {:?} is not an SSE-C key: {why}", r.key))
                })?;
                Sse::Customer(key)
            }
        }))
    }

    pub fn customer(&self) -> Option<&CustomerKey> {
        match self {
            Sse::Customer(k) => Some(k),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Sse::S3 => "SSE-S3".into(),
            Sse::Kms { key_id: None } => "SSE-KMS".into(),
            Sse::Kms { key_id: Some(k) } => format!("SSE-KMS with key {k}"),
            Sse::Customer(k) => format!("SSE-C with the key of MD5 {}", k.md5_b64),
        }
    }

    /// Whether an answer (`what`: the operation) shows this encryption
    /// applied: the algorithm, the KMS key when one was named, the SSE-C
    /// key's MD5.
    pub fn check(
        &self,
        what: &str,
        algorithm: Option<&ServerSideEncryption>,
        kms_key_id: Option<&str>,
        customer_md5: Option<&str>,
    ) -> Result<(), String> {
        let said = match (algorithm, customer_md5) {
            (Some(a), _) => format!("x-amz-server-side-encryption: {}", a.as_str()),
            (None, Some(m)) => format!("an SSE-C key MD5 {m}"),
            (None, None) => "no server-side encryption".into(),
        };
        let applied = match self {
            Sse::S3 => algorithm == Some(&ServerSideEncryption::Aes256),
            Sse::Kms { key_id } => {
                algorithm == Some(&ServerSideEncryption::AwsKms)
                    && match (key_id, kms_key_id) {
                        (Some(asked), Some(used)) => same_kms_key(asked, used),
                        _ => true,
                    }
            }
            Sse::Customer(k) => customer_md5 == Some(k.md5_b64.as_str()),
        };
        if applied {
            return Ok(());
        }
        let used = kms_key_id.map_or(String::new(), |k| format!(" (KMS key {k})"));
        Err(format!(
            "the store did not apply {}: its answer to {what} says {said}{used}; this S3 \
             server does not support it (Garage supports SSE-C only): remove \
             destination.encryption or choose a kind the store supports",
            self.describe()
        ))
    }
}

/// Whether the key a store used is the one named: the same id or ARN, or
/// the ARN of the named id. An alias cannot be compared to the key id a
/// store answers with, and is taken as matching.
fn same_kms_key(asked: &str, used: &str) -> bool {
    asked == used
        || asked.starts_with("alias/")
        || asked.contains(":alias/")
        || used.ends_with(&format!(":key/{asked}"))
}

/// Sets a write's (PutObject, CreateMultipartUpload, CopyObject's
/// destination) encryption headers. `$sse`: `Option<&Sse>`.
macro_rules! with_sse {
    ($req:expr, $sse:expr) => {{
        use aws_sdk_s3::types::ServerSideEncryption;
        use $crate::upload::encryption::Sse;
        let req = $req;
        match $sse {
            None => req,
            Some(Sse::S3) => req.server_side_encryption(ServerSideEncryption::Aes256),
            Some(Sse::Kms { key_id }) => req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
            Some(Sse::Customer(k)) => req
                .sse_customer_algorithm(k.algorithm())
                .sse_customer_key(k.key_b64())
                .sse_customer_key_md5(k.md5_b64()),
        }
    }};
}

/// Sets the SSE-C key on a request that reads or continues an encrypted
/// object (HeadObject, UploadPart, CompleteMultipartUpload, ListParts).
macro_rules! with_customer_key {
    ($req:expr, $sse:expr) => {{
        let req = $req;
        match $sse.and_then($crate::upload::encryption::Sse::customer) {
            Some(k) => req
                .sse_customer_algorithm(k.algorithm())
                .sse_customer_key(k.key_b64())
                .sse_customer_key_md5(k.md5_b64()),
            None => req,
        }
    }};
}

/// Sets the SSE-C key of a copy's source (the job's own key: a copy reads
/// an object the job's encryption wrote).
macro_rules! with_copy_source_key {
    ($req:expr, $sse:expr) => {{
        let req = $req;
        match $sse.and_then($crate::upload::encryption::Sse::customer) {
            Some(k) => req
                .copy_source_sse_customer_algorithm(k.algorithm())
                .copy_source_sse_customer_key(k.key_b64())
                .copy_source_sse_customer_key_md5(k.md5_b64()),
            None => req,
        }
    }};
}

pub(crate) use {with_copy_source_key, with_customer_key, with_sse};

/// Whether the store applies `sse`, asked before a job writes anything: a
/// multipart upload created with it (and aborted at once) must say so.
pub async fn preflight(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    sse: &Sse,
) -> Result<(), UploadError> {
    let out = with_sse!(
        client.create_multipart_upload().bucket(bucket).key(key),
        Some(sse)
    )
    .send()
    .await
    .map_err(|e| s3_error("CreateMultipartUpload (encryption check)", e))?;
    let checked = sse.check(
        "CreateMultipartUpload",
        out.server_side_encryption(),
        out.ssekms_key_id(),
        out.sse_customer_key_md5(),
    );
    if let Some(id) = out.upload_id()
        && let Err(e) = abort_upload(client, bucket, key, id).await
    {
        warn!(key, error = %e, "aborting the encryption check's upload failed; the sweeper will");
    }
    checked.map_err(UploadError::Encryption)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_keys_raw_or_base64_and_nothing_else() {
        let raw = [7u8; 32];
        let k = CustomerKey::parse(&raw).expect("raw");
        assert_eq!(k.key_b64, BASE64.encode(raw));
        assert_eq!(k.md5_b64, BASE64.encode(Md5::digest(raw)));
        let b64 = format!("{}\n", BASE64.encode(raw));
        assert_eq!(CustomerKey::parse(b64.as_bytes()).expect("base64"), k);
        assert!(!format!("{k:?}").contains(&k.key_b64), "{k:?}");
        for bad in [
            &b""[..],
            &[1u8; 31][..],
            &[1u8; 33][..],
            BASE64.encode([1u8; 16]).as_bytes(),
            b"not base64 at all!!",
        ] {
            let e = CustomerKey::parse(bad).expect_err("refused");
            assert!(e.contains("32 bytes"), "{e}");
        }
    }

    #[test]
    fn answers_are_checked_against_what_was_asked() {
        let aes = ServerSideEncryption::Aes256;
        let kms = ServerSideEncryption::AwsKms;
        assert!(Sse::S3.check("PutObject", Some(&aes), None, None).is_ok());
        let e = Sse::S3
            .check("PutObject", None, None, None)
            .expect_err("ignored");
        assert!(e.contains("did not apply SSE-S3") && e.contains("no server-side encryption"));
        let named = Sse::Kms {
            key_id: Some("1234abcd".into()),
        };
        let arn = "arn:aws:kms:us-east-1:000000000000:key/1234abcd";
        assert!(
            named
                .check("HeadObject", Some(&kms), Some(arn), None)
                .is_ok()
        );
        assert!(
            named
                .check(
                    "HeadObject",
                    Some(&kms),
                    Some("arn:aws:kms:x:1:key/other"),
                    None
                )
                .is_err()
        );
        assert!(named.check("HeadObject", Some(&aes), None, None).is_err());
        let alias = Sse::Kms {
            key_id: Some("alias/archive".into()),
        };
        assert!(
            alias
                .check("HeadObject", Some(&kms), Some(arn), None)
                .is_ok()
        );
        let c = Sse::Customer(CustomerKey::parse(&[9u8; 32]).expect("key"));
        let md5 = c.customer().expect("customer").md5_b64.clone();
        assert!(c.check("HeadObject", None, None, Some(&md5)).is_ok());
        let e = c
            .check("HeadObject", None, None, Some("AAAA"))
            .expect_err("another key");
        assert!(e.contains("SSE-C") && !e.contains(&c.customer().expect("k").key_b64));
    }
}
