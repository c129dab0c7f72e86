//! The transfer of one object: a single checksummed PUT when it fits in one
//! part, else a multipart upload whose parts go up in parallel (bounded
//! memory: at most `concurrency` parts exist at once), each with a checksum
//! the server verifies, each recorded in PostgreSQL before it counts. A later
//! attempt resumes from the recorded parts that the server still has
//! (ListParts), re-reading but not re-sending them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm as S3Checksum, ChecksumMode, CompletedMultipartUpload, CompletedPart,
    MetadataDirective,
};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use stowage_common::db::Pool;
use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::locks::SessionLock;
use stowage_common::queue::backoff_delay;
use stowage_common::spec::{ChecksumAlgorithm, MAX_PART_SIZE, MAX_PARTS};
use stowage_common::state::uploads::{self as state, MultipartRecord, PartRecord};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::UploadError;
use super::checksum::{composite_checksum, part_checksum};
use super::source::{PartReader, SourceBody};
use crate::metrics::WorkerMetrics;
use stowage_common::storage::{S3Error, abort_upload, s3_error};

/// Object metadata key holding the whole object's SHA-256 (hex).
pub const SHA256_METADATA: &str = "sha256";

/// Called with (part number, attempt, bytes) just before a part is sent and
/// returns the bytes to send. Tests use it to corrupt a part in flight.
pub type PartHook = Arc<dyn Fn(i32, u32, Bytes) -> Bytes + Send + Sync>;

/// Where an object goes.
pub struct Target<'a> {
    pub client: &'a aws_sdk_s3::Client,
    /// Endpoint URL (or `aws`), recorded with the multipart upload.
    pub endpoint: &'a str,
    pub bucket: &'a str,
    pub key: &'a str,
}

pub struct Options {
    pub part_size: u64,
    pub concurrency: usize,
    pub algorithm: ChecksumAlgorithm,
    /// The SHA-256 when it is known before the upload (dedup pass).
    pub known_sha256: Option<String>,
    /// Write a SHA-256 learnt only at the end into the metadata (self-copy).
    pub sha256_metadata_copy: bool,
    /// An earlier attempt recorded a multipart upload: look for its parts.
    pub resumable: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Uploaded {
    pub sha256_hex: String,
    pub size: u64,
    pub etag: Option<String>,
    pub parts: u32,
    /// Parts taken over from an earlier attempt instead of being sent again.
    pub parts_resumed: u32,
}

/// Uploads objects for one item; shared state for its part tasks.
#[derive(Clone)]
pub struct Transfer {
    pub db: Pool,
    pub metrics: WorkerMetrics,
    pub hook: Option<PartHook>,
    /// Bytes of the current object that are safely stored (read by Status).
    pub progress: Arc<AtomicU64>,
}

impl Transfer {
    pub async fn run(
        &self,
        item_id: i64,
        target: &Target<'_>,
        opts: &Options,
        body: SourceBody,
        fence: &SessionLock,
    ) -> Result<Uploaded, UploadError> {
        if let Some(size) = body.size {
            let parts = size.div_ceil(opts.part_size);
            if parts > MAX_PARTS {
                return Err(UploadError::TooManyParts {
                    parts,
                    part_size: opts.part_size,
                });
            }
        }
        let part_size = usize::try_from(opts.part_size.min(MAX_PART_SIZE))
            .map_err(|_| UploadError::Invalid("part size does not fit in memory".into()))?;
        let mut resume = if opts.resumable {
            self.resume_point(item_id, target, opts).await?
        } else {
            None
        };
        let mut reader = PartReader::new(body.stream, part_size);
        let mut whole = Sha256::new();
        let first = reader.next_part().await?.unwrap_or_default();
        whole.update(&first);
        // A source that ends within the first part goes up in one PUT.
        let second = if first.len() == part_size {
            reader.next_part().await?
        } else {
            None
        };
        if second.is_none() && resume.is_none() {
            let sha = hex::encode(whole.finalize());
            return self.put_single(target, opts, first, sha, fence).await;
        }

        let (upload_id, done) = match resume.take() {
            Some(r) => r,
            None => (self.create(item_id, target, opts).await?, HashMap::new()),
        };
        let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
        let mut tasks: JoinSet<Result<PartRecord, UploadError>> = JoinSet::new();
        let mut kept: Vec<PartRecord> = Vec::new();
        let mut total = 0u64;
        let mut number = 0i32;
        let mut pending = Some(first);
        let mut next = second;
        loop {
            let Some(data) = pending.take() else { break };
            number += 1;
            total += data.len() as u64;
            // Surface a failed part early instead of reading the whole source.
            while let Some(joined) = tasks.try_join_next() {
                kept.push(joined.map_err(join_error)??);
            }
            if let Some(prev) = done.get(&number) {
                let checksum = part_checksum(opts.algorithm, &data);
                if prev.checksum != checksum || prev.size_bytes != data.len() as i64 {
                    // Its recorded parts are of other content: the next
                    // attempt starts over instead of resuming them again.
                    self.forget(item_id, target).await?;
                    return Err(UploadError::SourceChanged { part: number });
                }
                self.metrics.parts_resumed.inc();
                self.progress
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                kept.push(prev.clone());
            } else {
                fence.ensure_held()?;
                let permit = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .map_err(|_| UploadError::Cancelled)?;
                let part = PartUpload {
                    transfer: self.clone(),
                    client: target.client.clone(),
                    bucket: target.bucket.to_string(),
                    key: target.key.to_string(),
                    upload_id: upload_id.clone(),
                    item_id,
                    number,
                    algorithm: opts.algorithm,
                };
                tasks.spawn(async move {
                    let r = part.send(data).await;
                    drop(permit);
                    r
                });
            }
            // Read ahead only once a slot is free, so memory stays bounded.
            let permit = slots.acquire().await.map_err(|_| UploadError::Cancelled)?;
            drop(permit);
            pending = match next.take() {
                Some(n) => Some(n),
                None => match reader.next_part().await {
                    Ok(p) => p,
                    Err(e) => {
                        // Let the parts already on their way land and be
                        // recorded: the next attempt resumes from them.
                        while tasks.join_next().await.is_some() {}
                        return Err(e);
                    }
                },
            };
            if let Some(p) = &pending {
                whole.update(p);
            }
            if number as u64 >= MAX_PARTS && pending.is_some() {
                return Err(UploadError::TooManyParts {
                    parts: number as u64 + 1,
                    part_size: opts.part_size,
                });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            kept.push(joined.map_err(join_error)??);
        }
        kept.sort_by_key(|p| p.part_number);
        fence.ensure_held()?;
        let sha = hex::encode(whole.finalize());
        if let Some(hashed) = opts.known_sha256.as_ref().filter(|h| **h != sha) {
            // The upload carries the earlier hash in its metadata: never
            // complete it; the next attempt starts over.
            self.forget(item_id, target).await?;
            return Err(UploadError::SourceChangedDuringUpload {
                hashed: hashed.clone(),
                read: sha,
            });
        }
        let parts_done = std::time::Instant::now();
        let etag = self
            .complete(target, opts, &upload_id, &kept, total, &sha)
            .await?;
        let resumed = done.len() as u32;
        info!(
            key = target.key,
            parts = kept.len(),
            resumed,
            bytes = total,
            finalize = ?parts_done.elapsed(),
            "multipart upload complete"
        );
        Ok(Uploaded {
            sha256_hex: sha,
            size: total,
            etag,
            parts: kept.len() as u32,
            parts_resumed: resumed,
        })
    }

    /// Aborts the item's multipart upload and forgets it: the next attempt
    /// starts a new one.
    async fn forget(&self, item_id: i64, target: &Target<'_>) -> Result<(), UploadError> {
        let db = self.db.get().await?;
        if let Some((rec, _)) = state::get_multipart(&db, item_id).await? {
            abort(target.client, &rec).await;
            state::delete_multipart(&db, item_id).await?;
        }
        Ok(())
    }

    /// The multipart upload to continue and its parts that are both recorded
    /// and still on the server; anything else is forgotten (and aborted).
    async fn resume_point(
        &self,
        item_id: i64,
        target: &Target<'_>,
        opts: &Options,
    ) -> Result<Option<(String, HashMap<i32, PartRecord>)>, UploadError> {
        let db = self.db.get().await?;
        let Some((rec, parts)) = state::get_multipart(&db, item_id).await? else {
            return Ok(None);
        };
        let same = rec.bucket == target.bucket
            && rec.object_key == target.key
            && rec.endpoint == target.endpoint
            && rec.part_size_bytes == opts.part_size as i64
            && rec.checksum_algorithm == opts.algorithm.as_str()
            // Created with another hash in its metadata (the source changed
            // since), or with none: completing it would describe the object
            // wrongly.
            && rec.metadata_sha256 == opts.known_sha256;
        if !same {
            abort(target.client, &rec).await;
            state::delete_multipart(&db, item_id).await?;
            return Ok(None);
        }
        let server = match list_parts(target.client, &rec).await {
            Ok(s) => s,
            Err(e) if e.is_not_found() => {
                info!(
                    key = target.key,
                    upload_id = rec.upload_id,
                    "recorded multipart upload is gone from the server; starting over"
                );
                state::delete_multipart(&db, item_id).await?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut done = HashMap::new();
        for p in parts {
            let on_server = server.get(&p.part_number);
            if on_server
                .is_some_and(|(etag, size)| same_etag(etag, &p.etag) && *size == p.size_bytes)
            {
                done.insert(p.part_number, p);
            } else {
                state::delete_part(&db, item_id, p.part_number).await?;
            }
        }
        info!(
            key = target.key,
            upload_id = rec.upload_id,
            parts = done.len(),
            "resuming multipart upload"
        );
        Ok(Some((rec.upload_id, done)))
    }

    async fn create(
        &self,
        item_id: i64,
        target: &Target<'_>,
        opts: &Options,
    ) -> Result<String, UploadError> {
        let mut req = target
            .client
            .create_multipart_upload()
            .bucket(target.bucket)
            .key(target.key)
            .checksum_algorithm(s3_algorithm(opts.algorithm));
        if let Some(sha) = &opts.known_sha256 {
            req = req.metadata(SHA256_METADATA, sha);
        }
        let out = req
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", e))?;
        let upload_id = out.upload_id().unwrap_or_default().to_string();
        if upload_id.is_empty() {
            return Err(UploadError::S3(S3Error {
                op: "CreateMultipartUpload",
                status: None,
                code: None,
                message: "the server returned no upload id".into(),
                transport: false,
            }));
        }
        let rec = MultipartRecord {
            endpoint: target.endpoint.to_string(),
            bucket: target.bucket.to_string(),
            object_key: target.key.to_string(),
            upload_id: upload_id.clone(),
            part_size_bytes: opts.part_size as i64,
            checksum_algorithm: opts.algorithm.as_str().to_string(),
            metadata_sha256: opts.known_sha256.clone(),
        };
        let saved = match self.db.get().await {
            Ok(db) => state::save_multipart(&db, item_id, &rec).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = saved {
            // Unrecorded, nobody would resume or abort it (the item may be
            // gone with its deleted job): abort it now.
            abort(target.client, &rec).await;
            return Err(e.into());
        }
        Ok(upload_id)
    }

    async fn put_single(
        &self,
        target: &Target<'_>,
        opts: &Options,
        data: Bytes,
        sha: String,
        fence: &SessionLock,
    ) -> Result<Uploaded, UploadError> {
        fence.ensure_held()?;
        let checksum = part_checksum(opts.algorithm, &data);
        let size = data.len() as u64;
        let etag = self
            .send_retrying(target.key, 1, &data, |body| async {
                let req = target
                    .client
                    .put_object()
                    .bucket(target.bucket)
                    .key(target.key)
                    .content_length(size as i64)
                    .metadata(SHA256_METADATA, &sha)
                    .body(ByteStream::from(body));
                let req = match opts.algorithm {
                    ChecksumAlgorithm::Crc32c => req.checksum_crc32_c(&checksum),
                    ChecksumAlgorithm::Sha256 => req.checksum_sha256(&checksum),
                };
                // The signed checksum header already protects the bytes; a
                // SHA-256 of the payload for the signature would only cost
                // CPU on both ends.
                let out = req
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|e| s3_error("PutObject", e))?;
                // The server checked the body against the checksum header
                // before accepting it; it echoes the value it stored.
                let echoed = match opts.algorithm {
                    ChecksumAlgorithm::Crc32c => out.checksum_crc32_c(),
                    ChecksumAlgorithm::Sha256 => out.checksum_sha256(),
                };
                if let Some(echoed) = echoed
                    && echoed != checksum
                {
                    return Err(UploadError::Verification {
                        key: target.key.to_string(),
                        message: format!("server stored checksum {echoed}, sent {checksum}"),
                    });
                }
                Ok(out.e_tag().map(str::to_string))
            })
            .await?;
        self.metrics.bytes_uploaded.inc_by(size);
        self.metrics.parts_uploaded.inc();
        self.progress.fetch_add(size, Ordering::Relaxed);
        Ok(Uploaded {
            sha256_hex: sha,
            size,
            etag,
            parts: 1,
            parts_resumed: 0,
        })
    }

    /// Sends one body (a part, or a whole small object), retrying it in
    /// place on retryable errors: a body the server rejected for a bad
    /// checksum is sent again from memory. `hook` sees every attempt.
    async fn send_retrying<T, F, Fut>(
        &self,
        key: &str,
        part: i32,
        data: &Bytes,
        mut send: F,
    ) -> Result<T, UploadError>
    where
        F: FnMut(Bytes) -> Fut,
        Fut: Future<Output = Result<T, UploadError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let body = match &self.hook {
                Some(h) => h(part, attempt, data.clone()),
                None => data.clone(),
            };
            match send(body).await {
                Err(err) if err.class() == ErrorClass::Retryable && attempt < PART_ATTEMPTS => {
                    self.metrics.part_retries.inc();
                    warn!(key, part, attempt, error = %err, "upload rejected; sending it again");
                    tokio::time::sleep(backoff_delay(attempt, PART_BACKOFF, PART_BACKOFF_MAX))
                        .await;
                }
                result => return result,
            }
        }
    }

    async fn complete(
        &self,
        target: &Target<'_>,
        opts: &Options,
        upload_id: &str,
        parts: &[PartRecord],
        total: u64,
        sha: &str,
    ) -> Result<Option<String>, UploadError> {
        let completed: Vec<CompletedPart> = parts
            .iter()
            .map(|p| {
                let b = CompletedPart::builder()
                    .part_number(p.part_number)
                    .e_tag(&p.etag);
                match opts.algorithm {
                    ChecksumAlgorithm::Crc32c => b.checksum_crc32_c(&p.checksum),
                    ChecksumAlgorithm::Sha256 => b.checksum_sha256(&p.checksum),
                }
                .build()
            })
            .collect();
        target
            .client
            .complete_multipart_upload()
            .bucket(target.bucket)
            .key(target.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error("CompleteMultipartUpload", e))?;
        let completed_at = std::time::Instant::now();
        let checksums: Vec<String> = parts.iter().map(|p| p.checksum.clone()).collect();
        let composite = composite_checksum(opts.algorithm, &checksums);
        verify_head(
            target,
            total,
            composite.as_deref().map(|c| (opts.algorithm, c)),
            sha,
        )
        .await?;
        debug!(key = target.key, verify = ?completed_at.elapsed(), "completed and verified");
        if opts.known_sha256.is_none() && opts.sha256_metadata_copy {
            // The whole-object hash is known only now: store it in the
            // object's metadata with a server-side self-copy.
            if total <= MAX_PART_SIZE {
                target
                    .client
                    .copy_object()
                    .bucket(target.bucket)
                    .key(target.key)
                    .copy_source(copy_source(target.bucket, target.key))
                    .metadata_directive(MetadataDirective::Replace)
                    .metadata(SHA256_METADATA, sha)
                    .send()
                    .await
                    .map_err(|e| s3_error("CopyObject (metadata)", e))?;
                verify_head(target, total, None, sha).await?;
            } else {
                warn!(
                    key = target.key,
                    "object over 5 GiB: SHA-256 kept in PostgreSQL only (CopyObject limit)"
                );
            }
        }
        let head = target
            .client
            .head_object()
            .bucket(target.bucket)
            .key(target.key)
            .send()
            .await
            .map_err(|e| s3_error("HeadObject", e))?;
        Ok(head.e_tag().map(str::to_string))
    }
}

const PART_ATTEMPTS: u32 = 4;
const PART_BACKOFF: Duration = Duration::from_millis(200);
const PART_BACKOFF_MAX: Duration = Duration::from_secs(5);

struct PartUpload {
    transfer: Transfer,
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: String,
    item_id: i64,
    number: i32,
    algorithm: ChecksumAlgorithm,
}

impl PartUpload {
    /// Sends one part, retrying it in place on retryable errors (a part the
    /// server rejects for a bad checksum is sent again from memory), and
    /// records it once the server has it.
    async fn send(self, data: Bytes) -> Result<PartRecord, UploadError> {
        let checksum = part_checksum(self.algorithm, &data);
        let size = data.len();
        let etag = self
            .transfer
            .send_retrying(&self.key, self.number, &data, |body| async {
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(&self.upload_id)
                    .part_number(self.number)
                    .content_length(size as i64)
                    .body(ByteStream::from(body));
                let req = match self.algorithm {
                    ChecksumAlgorithm::Crc32c => req.checksum_crc32_c(&checksum),
                    ChecksumAlgorithm::Sha256 => req.checksum_sha256(&checksum),
                };
                let out = req
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|e| s3_error("UploadPart", e))?;
                Ok(out.e_tag().unwrap_or_default().to_string())
            })
            .await?;
        let record = PartRecord {
            part_number: self.number,
            etag,
            checksum,
            size_bytes: size as i64,
        };
        let db = self.transfer.db.get().await?;
        state::save_part(&db, self.item_id, &record).await?;
        let m = &self.transfer.metrics;
        m.parts_uploaded.inc();
        m.bytes_uploaded.inc_by(size as u64);
        let done = self
            .transfer
            .progress
            .fetch_add(size as u64, Ordering::Relaxed)
            + size as u64;
        state::set_progress(&db, self.item_id, done as i64, None).await?;
        debug!(key = self.key, part = self.number, "part stored");
        Ok(record)
    }
}

fn join_error(e: tokio::task::JoinError) -> UploadError {
    if e.is_cancelled() {
        UploadError::Cancelled
    } else {
        UploadError::Invalid(format!("part task panicked: {e}"))
    }
}

fn s3_algorithm(a: ChecksumAlgorithm) -> S3Checksum {
    match a {
        ChecksumAlgorithm::Crc32c => S3Checksum::Crc32C,
        ChecksumAlgorithm::Sha256 => S3Checksum::Sha256,
    }
}

/// `bucket/key` with the key URL-encoded, as `x-amz-copy-source` wants it.
pub fn copy_source(bucket: &str, key: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    format!(
        "{bucket}/{}",
        percent_encoding::utf8_percent_encode(key, KEEP)
    )
}

fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// Checks, with a fresh HEAD, that the stored object has the size that was
/// read, the composite checksum of the parts sent (when the server reports
/// one) and, if present, the SHA-256 metadata.
async fn verify_head(
    target: &Target<'_>,
    size: u64,
    composite: Option<(ChecksumAlgorithm, &str)>,
    sha: &str,
) -> Result<(), UploadError> {
    let head = target
        .client
        .head_object()
        .bucket(target.bucket)
        .key(target.key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .map_err(|e| s3_error("HeadObject (verify)", e))?;
    let fail = |message: String| UploadError::Verification {
        key: target.key.to_string(),
        message,
    };
    let stored = head.content_length().unwrap_or(-1);
    if stored != size as i64 {
        return Err(fail(format!("stored size {stored} != {size} bytes read")));
    }
    if let Some((algorithm, expected)) = composite {
        let reported = match algorithm {
            ChecksumAlgorithm::Crc32c => head.checksum_crc32_c(),
            ChecksumAlgorithm::Sha256 => head.checksum_sha256(),
        };
        // Servers report either the composite `…-N` or nothing at all.
        if let Some(r) = reported.filter(|r| r.contains('-'))
            && r != expected
        {
            return Err(fail(format!(
                "server checksum {r} != {expected} of the parts sent"
            )));
        }
    }
    if let Some(meta) = head.metadata().and_then(|m| m.get(SHA256_METADATA))
        && meta != sha
    {
        return Err(fail(format!(
            "sha256 metadata {meta} != {sha} of the bytes read"
        )));
    }
    Ok(())
}

/// Every part the server holds for the upload: number → (ETag, size).
pub async fn list_parts(
    client: &aws_sdk_s3::Client,
    rec: &MultipartRecord,
) -> Result<HashMap<i32, (String, i64)>, UploadError> {
    let mut out = HashMap::new();
    let mut marker: Option<String> = None;
    loop {
        let page = client
            .list_parts()
            .bucket(&rec.bucket)
            .key(&rec.object_key)
            .upload_id(&rec.upload_id)
            .set_part_number_marker(marker.clone())
            .send()
            .await
            .map_err(|e| s3_error("ListParts", e))?;
        for p in page.parts() {
            if let Some(n) = p.part_number() {
                out.insert(
                    n,
                    (
                        p.e_tag().unwrap_or_default().to_string(),
                        p.size().unwrap_or(-1),
                    ),
                );
            }
        }
        match (page.is_truncated(), page.next_part_number_marker()) {
            (Some(true), Some(m)) if marker.as_deref() != Some(m) => marker = Some(m.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// Aborts a multipart upload; failures are logged, the sweeper catches leftovers.
pub async fn abort(client: &aws_sdk_s3::Client, rec: &MultipartRecord) {
    if let Err(e) = abort_upload(client, &rec.bucket, &rec.object_key, &rec.upload_id).await {
        warn!(key = rec.object_key, upload_id = rec.upload_id, error = %e, "abort failed; the sweeper will retry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_encodes_keys() {
        assert_eq!(copy_source("b", "dir/a b+c.txt"), "b/dir/a%20b%2Bc.txt");
        assert!(same_etag("\"abc\"", "abc"));
    }
}
