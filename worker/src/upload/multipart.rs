//! The transfer of one object: a single checksummed PUT when it fits in one
//! part, else a multipart upload whose parts go up in parallel (bounded
//! memory: at most `concurrency` parts exist at once), each with a checksum
//! the server verifies, each recorded in PostgreSQL before it counts. Every
//! object is then checked with a fresh HEAD (size, checksum, SHA-256
//! metadata) before it counts.
//!
//! A later attempt resumes from the recorded parts that the server still has
//! (ListParts). When the upload's hashing pass is recorded (its SHA-256, size,
//! per-part checksums and the source's validator), the resume reads only the
//! parts still to send, by ranges, and every part the object is completed
//! with must carry the checksum the hashing pass computed for it; otherwise
//! it re-reads the whole source, re-sending only what is not stored.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm as S3Checksum, ChecksumMode, CompletedMultipartUpload, CompletedPart,
    MetadataDirective, ServerSideEncryption,
};
use bytes::Bytes;
use sha2_resumable::Sha256;
use sha2_resumable::digest::Digest;
use sha2_resumable::digest::common::hazmat::{SerializableState, SerializedState};
use stowage_common::db::Pool;
use stowage_common::errors::{Classify, ErrorClass};
use stowage_common::locks::SessionLock;
use stowage_common::queue::backoff_delay;
use stowage_common::redact;
use stowage_common::spec::{ChecksumAlgorithm, MAX_PART_SIZE, MAX_PARTS};
use stowage_common::state::uploads::{self as state, MultipartRecord, PartRecord, SourceVersion};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::UploadError;
use super::checksum::{composite_checksum, part_checksum};
use super::encryption::{Sse, with_copy_source_key, with_customer_key, with_sse};
use super::source::{PartReader, Ranged, Source, SourceBody, Validator};
use crate::metrics::WorkerMetrics;
use stowage_common::storage::{S3Error, abort_upload, s3_error};

/// Object metadata key holding the whole object's SHA-256 (hex).
pub const SHA256_METADATA: &str = "sha256";

/// Called with (part number, attempt, bytes); returns the bytes to use.
/// Tests use it to corrupt bodies:
/// - attempt [`HOOK_AS_READ`] (0), once per body, with the bytes as read,
///   before the checksum sent with them is computed: a change here reaches
///   the server with a matching checksum, a fault the server cannot see —
///   only the verification afterwards can;
/// - attempts 1, 2, … just before each send, after that checksum: a change
///   here is in-flight corruption the server rejects.
///
/// A single PUT is part 1.
pub type PartHook = Arc<dyn Fn(i32, u32, Bytes) -> Bytes + Send + Sync>;

/// The `attempt` with which [`PartHook`] sees a body as it was read.
pub const HOOK_AS_READ: u32 = 0;

/// Where an object goes.
pub struct Target<'a> {
    pub client: &'a aws_sdk_s3::Client,
    /// Endpoint URL (or `aws`), recorded with the multipart upload.
    pub endpoint: &'a str,
    pub bucket: &'a str,
    pub key: &'a str,
    /// The job's server-side encryption, on every write and read.
    pub sse: Option<&'a Sse>,
    /// The object's Content-Type, when the writer knows it (ingest).
    pub content_type: Option<&'a str>,
}

pub struct Options {
    pub part_size: u64,
    pub concurrency: usize,
    pub algorithm: ChecksumAlgorithm,
    /// What a full read of the source before the upload learnt (the dedup
    /// or hashing pass, or the record of the upload being resumed): its
    /// SHA-256 goes into a multipart object's metadata at creation.
    pub known: Option<Hashed>,
    /// Write a SHA-256 learnt only at the end into the metadata (self-copy).
    pub sha256_metadata_copy: bool,
}

/// What one full read of the source learnt about the version it read.
#[derive(Clone, Debug, PartialEq)]
pub struct Hashed {
    pub sha256: String,
    pub size: u64,
    /// The checksum (the job's algorithm) of each part-sized slice, in order.
    pub part_checksums: Vec<String>,
    /// The validator the source sent with those bytes.
    pub validator: Option<Validator>,
}

/// The part size a transfer cuts sources into (the hashing pass too).
pub fn effective_part_size(part_size: u64) -> u64 {
    part_size.min(MAX_PART_SIZE)
}

/// A multipart upload an earlier attempt left, with its recorded parts that
/// the server still holds.
pub struct Resume {
    pub record: MultipartRecord,
    pub done: HashMap<i32, PartRecord>,
}

/// The whole object's SHA-256 as it was after part `after` (recorded with
/// that part), to go on hashing from there; a fresh one for part 0.
pub fn hasher_after(done: &HashMap<i32, PartRecord>, after: i32) -> Option<Sha256> {
    if after == 0 {
        return Some(Sha256::new());
    }
    let state = done.get(&after)?.sha256_state.as_deref()?;
    let state = <&SerializedState<Sha256>>::try_from(state).ok()?;
    Sha256::deserialize(state).ok()
}

impl Resume {
    /// What the upload's hashing pass read, when it was recorded (V12) and
    /// is whole: then a resume needs to read only the parts still to send.
    pub fn hashed(&self) -> Option<Hashed> {
        let v = self.record.source.as_ref()?;
        let sha256 = self.record.metadata_sha256.clone()?;
        let size = u64::try_from(v.size_bytes).ok().filter(|s| *s > 0)?;
        let part_size = u64::try_from(self.record.part_size_bytes).ok()?;
        if v.part_checksums.len() as u64 != size.div_ceil(effective_part_size(part_size).max(1)) {
            return None;
        }
        Some(Hashed {
            sha256,
            size,
            part_checksums: v.part_checksums.clone(),
            validator: v.validator.as_deref().and_then(Validator::decode),
        })
    }
}

/// What a transfer reads.
pub enum Input {
    /// The whole source from its first byte.
    Stream(SourceBody),
    /// The source from the end of an earlier attempt's part `after` on (a
    /// client stream that resumes): parts `1..=after` are taken as stored,
    /// and the whole object's SHA-256 goes on from the state recorded with
    /// part `after` (see [`hasher_after`]).
    After {
        body: SourceBody,
        after: i32,
        hasher: Box<Sha256>,
    },
    /// Only the parts a resume still has to send (see [`MissingParts`]).
    Missing(Box<MissingParts>),
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
        resume: Option<Resume>,
        input: Input,
        fence: &SessionLock,
    ) -> Result<Uploaded, UploadError> {
        match input {
            Input::Stream(body) => {
                self.run_stream(item_id, target, opts, resume, body, None, fence)
                    .await
            }
            Input::After {
                body,
                after,
                hasher,
            } => {
                let start = (after, *hasher);
                self.run_stream(item_id, target, opts, resume, body, Some(start), fence)
                    .await
            }
            Input::Missing(missing) => {
                let missing = *missing;
                let Some(resume) = resume else {
                    return Err(UploadError::Invalid(
                        "internal: a ranged resume without its multipart upload".into(),
                    ));
                };
                let result = self
                    .run_missing(item_id, target, opts, resume, missing, fence)
                    .await;
                if let Err(UploadError::SourceChanged { .. }) = &result {
                    // Its parts are of other content than its metadata's
                    // hash: the next attempt starts over.
                    self.forget(item_id, target).await?;
                }
                result
            }
        }
    }

    /// The whole source, read from its first byte: parts an earlier attempt
    /// stored are compared with what is read, not sent again; the SHA-256 of
    /// what is read must be the one the upload was created with. With
    /// `start` = (part, hasher), `body` begins after that part instead: the
    /// parts up to it are kept as recorded and hashing goes on from its state.
    #[allow(clippy::too_many_arguments)]
    async fn run_stream(
        &self,
        item_id: i64,
        target: &Target<'_>,
        opts: &Options,
        mut resume: Option<Resume>,
        body: SourceBody,
        start: Option<(i32, Sha256)>,
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
        let part_size = usize::try_from(effective_part_size(opts.part_size))
            .map_err(|_| UploadError::Invalid("part size does not fit in memory".into()))?;
        let known_sha = opts.known.as_ref().map(|k| &k.sha256);
        if let Some(r) = &resume
            && r.record.metadata_sha256.as_ref() != known_sha
        {
            // Created with another hash in its metadata (the source changed
            // since), or with none: completing it would describe the object
            // wrongly.
            info!(
                key = target.key,
                "recorded multipart upload carries another SHA-256; starting over"
            );
            self.forget(item_id, target).await?;
            resume = None;
            if start.is_some() {
                return Err(UploadError::Invalid(
                    "the upload to resume is gone: send the object from its first byte".into(),
                ));
            }
        }
        // The source's validator is recorded only when the upload reads the
        // version the hashing pass read (as far as validators tell).
        let validator = match (&opts.known, &body.validator) {
            (Some(k), Some(v)) if k.validator.as_ref() == Some(v) => Some(v.clone()),
            _ => None,
        };
        // A source that says it is larger than a part is multipart from the
        // start: a failure reading its second part finds the first one
        // stored, and a resume goes on from it.
        let multipart = resume.is_some() || body.size.is_some_and(|s| s > part_size as u64);
        let mut reader = PartReader::new(body.stream, part_size);
        if start.is_some() && resume.is_none() {
            return Err(UploadError::Invalid(
                "internal: a stream resumed without its multipart upload".into(),
            ));
        }
        let (skipped, mut whole) = start.unwrap_or_default();
        let first = reader.next_part().await?.unwrap_or_default();
        whole.update(&first);
        // Else a source that ends within the first part goes up in one PUT.
        let second = if first.len() == part_size && !multipart {
            reader.next_part().await?
        } else {
            None
        };
        if second.is_none() && !multipart {
            let sha = hex::encode(whole.finalize());
            if let Some(hashed) = known_sha.filter(|h| **h != sha) {
                // Not the bytes announced (or hashed before): never stored.
                return Err(UploadError::SourceChangedDuringUpload {
                    hashed: hashed.clone(),
                    read: sha,
                });
            }
            return self.put_single(target, opts, first, sha, fence).await;
        }

        let (upload_id, done) = match resume.take() {
            Some(r) => (r.record.upload_id, r.done),
            None => (
                self.create(item_id, target, opts, validator.as_ref())
                    .await?,
                HashMap::new(),
            ),
        };
        let mut parts = Parts::new(opts.concurrency);
        let mut total = 0u64;
        let mut number = 0i32;
        while number < skipped {
            number += 1;
            let prev = done.get(&number).ok_or_else(|| {
                UploadError::Invalid(format!("part {number} to resume after is not stored"))
            })?;
            total += u64::try_from(prev.size_bytes).unwrap_or_default();
            self.keep(&mut parts, prev);
        }
        let mut pending = Some(first);
        let mut next = second;
        loop {
            let Some(data) = pending.take() else { break };
            number += 1;
            total += data.len() as u64;
            // Surface a failed part early instead of reading the whole source.
            parts.reap()?;
            if let Some(prev) = done.get(&number) {
                let checksum = part_checksum(opts.algorithm, &data);
                if prev.checksum != checksum || prev.size_bytes != data.len() as i64 {
                    // Its recorded parts are of other content: the next
                    // attempt starts over instead of resuming them again.
                    self.forget(item_id, target).await?;
                    return Err(UploadError::SourceChanged { part: number });
                }
                self.keep(&mut parts, prev);
            } else {
                fence.ensure_held()?;
                let permit = parts.slot().await?;
                // Each part must be the slice the hashing pass read.
                let check = opts
                    .known
                    .as_ref()
                    .and_then(|k| k.part_checksums.get(number as usize - 1).cloned())
                    .map_or(Check::None, Check::Hashed);
                let mut part = self.part_upload(target, &upload_id, item_id, number, opts, check);
                // `whole` has read exactly this part's end (the next part is
                // hashed only once it becomes pending).
                part.sha256_state = Some(whole.serialize().to_vec());
                parts.spawn(part, data, permit);
            }
            // Read ahead only once a slot is free, so memory stays bounded.
            drop(parts.slot().await?);
            pending = match next.take() {
                Some(n) => Some(n),
                None => match reader.next_part().await {
                    Ok(p) => p,
                    Err(e) => {
                        // Let the parts already on their way land and be
                        // recorded: the next attempt resumes from them.
                        parts.settle().await;
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
        let kept = parts.finish().await?;
        fence.ensure_held()?;
        let sha = hex::encode(whole.finalize());
        if let Some(hashed) = known_sha.filter(|h| **h != sha) {
            // The upload carries the earlier hash in its metadata: never
            // complete it; the next attempt starts over.
            self.forget(item_id, target).await?;
            return Err(UploadError::SourceChangedDuringUpload {
                hashed: hashed.clone(),
                read: sha,
            });
        }
        self.completed(target, opts, &upload_id, kept, total, sha, done.len())
            .await
    }

    /// A resume that reads only the parts not stored yet. Every part the
    /// object is completed with — stored before or sent now — must carry
    /// the checksum the hashing pass computed for its slice of the source,
    /// so the object is the bytes whose SHA-256 its metadata holds.
    async fn run_missing(
        &self,
        item_id: i64,
        target: &Target<'_>,
        opts: &Options,
        resume: Resume,
        mut missing: MissingParts,
        fence: &SessionLock,
    ) -> Result<Uploaded, UploadError> {
        let hashed = missing.hashed.clone();
        let part_size = effective_part_size(opts.part_size);
        let upload_id = resume.record.upload_id.clone();
        let mut parts = Parts::new(opts.concurrency);
        let mut total = 0u64;
        for (i, expected) in hashed.part_checksums.iter().enumerate() {
            let number = i as i32 + 1;
            let size = part_size.min(hashed.size - i as u64 * part_size);
            total += size;
            parts.reap()?;
            if let Some(prev) = resume.done.get(&number) {
                if prev.checksum != *expected || prev.size_bytes != size as i64 {
                    // Stored from another version than the one hashed (the
                    // source changed between the hashing pass and the
                    // upload, before the kill).
                    return Err(UploadError::SourceChanged { part: number });
                }
                self.keep(&mut parts, prev);
                continue;
            }
            fence.ensure_held()?;
            // Read only once a slot is free, so memory stays bounded.
            let permit = parts.slot().await?;
            let data = match missing.part(number).await {
                Ok(data) => data,
                Err(Missing::Changed(reason)) => {
                    parts.settle().await;
                    self.forget(item_id, target).await?;
                    return Err(UploadError::SourceRead {
                        source_ref: redact::url(&missing.source_ref),
                        message: format!(
                            "the source changed since the upload began ({reason}); the next \
                             attempt starts over"
                        ),
                    });
                }
                Err(Missing::Failed(e)) => {
                    // The parts on their way land and are recorded.
                    parts.settle().await;
                    return Err(e);
                }
            };
            if data.len() as u64 != size {
                parts.settle().await;
                return Err(UploadError::SourceRead {
                    source_ref: redact::url(&missing.source_ref),
                    message: format!(
                        "part {number}: read {} bytes of a range of {size}",
                        data.len()
                    ),
                });
            }
            let part = self.part_upload(
                target,
                &upload_id,
                item_id,
                number,
                opts,
                Check::Resumed(expected.clone()),
            );
            parts.spawn(part, data, permit);
        }
        let kept = parts.finish().await?;
        fence.ensure_held()?;
        if total != hashed.size || kept.len() != hashed.part_checksums.len() {
            return Err(UploadError::Verification {
                key: target.key.to_string(),
                message: format!(
                    "resumed upload has {} parts of {total} bytes; the source had {} of {}",
                    kept.len(),
                    hashed.part_checksums.len(),
                    hashed.size
                ),
            });
        }
        info!(
            key = target.key,
            read = missing.bytes_read,
            of = hashed.size,
            "resumed without re-reading the stored parts"
        );
        self.completed(
            target,
            opts,
            &upload_id,
            kept,
            total,
            hashed.sha256,
            resume.done.len(),
        )
        .await
    }

    /// A part an earlier attempt stored, taken over.
    fn keep(&self, parts: &mut Parts, prev: &PartRecord) {
        self.metrics.parts_resumed.inc();
        self.progress.fetch_add(
            u64::try_from(prev.size_bytes).unwrap_or(0),
            Ordering::Relaxed,
        );
        parts.kept.push(prev.clone());
    }

    fn part_upload(
        &self,
        target: &Target<'_>,
        upload_id: &str,
        item_id: i64,
        number: i32,
        opts: &Options,
        check: Check,
    ) -> PartUpload {
        PartUpload {
            transfer: self.clone(),
            client: target.client.clone(),
            bucket: target.bucket.to_string(),
            key: target.key.to_string(),
            upload_id: upload_id.to_string(),
            item_id,
            number,
            algorithm: opts.algorithm,
            check,
            sse: target.sse.cloned(),
            sha256_state: None,
        }
    }

    /// Completes and verifies a multipart upload whose parts are all stored.
    #[allow(clippy::too_many_arguments)]
    async fn completed(
        &self,
        target: &Target<'_>,
        opts: &Options,
        upload_id: &str,
        kept: Vec<PartRecord>,
        total: u64,
        sha: String,
        resumed: usize,
    ) -> Result<Uploaded, UploadError> {
        let parts_done = std::time::Instant::now();
        let etag = self
            .complete(target, opts, upload_id, &kept, total, &sha)
            .await?;
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
            parts_resumed: resumed as u32,
        })
    }

    /// Aborts the item's multipart upload and forgets it: the next attempt
    /// starts a new one.
    pub async fn forget(&self, item_id: i64, target: &Target<'_>) -> Result<(), UploadError> {
        let db = self.db.get().await?;
        forget_upload(&db, target.client, item_id).await
    }

    /// The multipart upload to continue and its parts that are both recorded
    /// and still on the server; anything else is forgotten (and aborted).
    /// (Whether its metadata's hash is still right is for the caller: see
    /// [`Resume::hashed`] and [`Transfer::run`].)
    pub async fn resume_point(
        &self,
        item_id: i64,
        target: &Target<'_>,
        part_size: u64,
        algorithm: ChecksumAlgorithm,
    ) -> Result<Option<Resume>, UploadError> {
        let db = self.db.get().await?;
        let Some((rec, parts)) = state::get_multipart(&db, item_id).await? else {
            return Ok(None);
        };
        let same = rec.bucket == target.bucket
            && rec.object_key == target.key
            && rec.endpoint == target.endpoint
            && rec.part_size_bytes == part_size as i64
            && rec.checksum_algorithm == algorithm.as_str();
        if !same {
            abort(target.client, &rec).await;
            state::delete_multipart(&db, item_id).await?;
            return Ok(None);
        }
        let server = match list_parts(target.client, &rec, target.sse).await {
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
        Ok(Some(Resume { record: rec, done }))
    }

    /// Creates the multipart upload and records it, with what the hashing
    /// pass read (and `validator`, the source's, when the upload reads the
    /// version the hashing pass read) so that a resume can read less.
    async fn create(
        &self,
        item_id: i64,
        target: &Target<'_>,
        opts: &Options,
        validator: Option<&Validator>,
    ) -> Result<String, UploadError> {
        let mut req = with_sse!(
            target
                .client
                .create_multipart_upload()
                .bucket(target.bucket)
                .key(target.key)
                .checksum_algorithm(s3_algorithm(opts.algorithm)),
            target.sse
        );
        if let Some(known) = &opts.known {
            req = req.metadata(SHA256_METADATA, &known.sha256);
        }
        if let Some(content_type) = target.content_type {
            req = req.content_type(content_type);
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
            metadata_sha256: opts.known.as_ref().map(|k| k.sha256.clone()),
            source: opts.known.as_ref().map(|k| SourceVersion {
                size_bytes: k.size as i64,
                part_checksums: k.part_checksums.clone(),
                validator: validator.map(Validator::encode),
            }),
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

    /// One PUT with the whole object's checksum, then the verifying HEAD:
    /// the stored object must have the size and checksum of the bytes read
    /// and their SHA-256 in its metadata.
    async fn put_single(
        &self,
        target: &Target<'_>,
        opts: &Options,
        data: Bytes,
        sha: String,
        fence: &SessionLock,
    ) -> Result<Uploaded, UploadError> {
        fence.ensure_held()?;
        let size = data.len() as u64;
        // What the stored object must match: the bytes as read.
        let expected = part_checksum(opts.algorithm, &data);
        let (body, checksum) = match &self.hook {
            Some(h) => {
                let body = h(1, HOOK_AS_READ, data);
                let checksum = part_checksum(opts.algorithm, &body);
                (body, checksum)
            }
            None => (data, expected.clone()),
        };
        self.send_retrying(target.key, 1, &body, |body| async {
            let req = with_sse!(
                target
                    .client
                    .put_object()
                    .bucket(target.bucket)
                    .key(target.key)
                    .content_length(body.len() as i64)
                    .metadata(SHA256_METADATA, &sha)
                    .set_content_type(target.content_type.map(str::to_string))
                    .body(ByteStream::from(body)),
                target.sse
            );
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
            Ok(())
        })
        .await?;
        let etag = verify_head(
            target,
            size,
            Some((opts.algorithm, Stored::Whole(&expected))),
            Some(&sha),
        )
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
        with_customer_key!(
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
                ),
            target.sse
        )
        .send()
        .await
        .map_err(|e| s3_error("CompleteMultipartUpload", e))?;
        let completed_at = std::time::Instant::now();
        let checksums: Vec<String> = parts.iter().map(|p| p.checksum.clone()).collect();
        let composite = composite_checksum(opts.algorithm, &checksums);
        let mut etag = verify_head(
            target,
            total,
            composite
                .as_deref()
                .map(|c| (opts.algorithm, Stored::Composite(c))),
            opts.known.as_ref().map(|_| sha),
        )
        .await?;
        debug!(key = target.key, verify = ?completed_at.elapsed(), "completed and verified");
        if opts.known.is_none() && opts.sha256_metadata_copy {
            // The whole-object hash is known only now: store it in the
            // object's metadata with a server-side self-copy.
            if total <= MAX_PART_SIZE {
                let copy = with_sse!(
                    target
                        .client
                        .copy_object()
                        .bucket(target.bucket)
                        .key(target.key)
                        .copy_source(copy_source(target.bucket, target.key))
                        .metadata_directive(MetadataDirective::Replace)
                        .metadata(SHA256_METADATA, sha)
                        .set_content_type(target.content_type.map(str::to_string)),
                    target.sse
                );
                with_copy_source_key!(copy, target.sse)
                    .send()
                    .await
                    .map_err(|e| s3_error("CopyObject (metadata)", e))?;
                etag = verify_head(target, total, None, Some(sha)).await?;
            } else {
                warn!(
                    key = target.key,
                    "object over 5 GiB: SHA-256 kept in PostgreSQL only (CopyObject limit)"
                );
            }
        }
        Ok(etag)
    }
}

/// The parts of one upload on their way: at most `concurrency` exist at
/// once (read or being sent), each holding a slot.
struct Parts {
    slots: Arc<Semaphore>,
    tasks: JoinSet<Result<PartRecord, UploadError>>,
    kept: Vec<PartRecord>,
}

impl Parts {
    fn new(concurrency: usize) -> Parts {
        Parts {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            tasks: JoinSet::new(),
            kept: Vec::new(),
        }
    }

    /// Waits for a free slot.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, UploadError> {
        Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| UploadError::Cancelled)
    }

    fn spawn(&mut self, part: PartUpload, data: Bytes, permit: OwnedSemaphorePermit) {
        self.tasks.spawn(async move {
            let r = part.send(data).await;
            drop(permit);
            r
        });
    }

    /// Collects the parts that are done; the first failure is returned.
    fn reap(&mut self) -> Result<(), UploadError> {
        while let Some(joined) = self.tasks.try_join_next() {
            self.kept.push(joined.map_err(join_error)??);
        }
        Ok(())
    }

    /// Lets the parts on their way land (and be recorded), whatever the
    /// outcome: the next attempt resumes from them.
    async fn settle(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Every part, in order, once all are stored.
    async fn finish(mut self) -> Result<Vec<PartRecord>, UploadError> {
        while let Some(joined) = self.tasks.join_next().await {
            self.kept.push(joined.map_err(join_error)??);
        }
        self.kept.sort_by_key(|p| p.part_number);
        Ok(self.kept)
    }
}

/// Why [`MissingParts::part`] has no bytes.
pub enum Missing {
    /// The source is not the version hashed any more (the reason).
    Changed(String),
    Failed(UploadError),
}

/// The runs `(first, last)` of consecutive parts among `1..=parts` that are
/// not `stored`, in order: one ranged read each.
fn missing_runs(parts: i32, stored: impl Fn(i32) -> bool) -> VecDeque<(i32, i32)> {
    let mut runs: VecDeque<(i32, i32)> = VecDeque::new();
    for number in (1..=parts).filter(|n| !stored(*n)) {
        match runs.back_mut() {
            Some((_, last)) if *last == number - 1 => *last = number,
            _ => runs.push_back((number, number)),
        }
    }
    runs
}

/// Whether a resume can read only what it still has to send.
pub enum Opened {
    Ready(Box<MissingParts>),
    /// The source changed since the upload began: start over.
    Changed(String),
    /// The source does not serve ranges: read it whole.
    Unsupported,
}

/// The parts of a resumed upload that are not stored yet, read from the
/// source by ranges — one request per run of consecutive missing parts,
/// each asking for the version the hashing pass read (its validator as a
/// precondition, its size in the answer's Content-Range).
pub struct MissingParts {
    source: Source,
    source_ref: String,
    hashed: Hashed,
    part_size: u64,
    /// Runs of consecutive missing parts not opened yet: (first, last).
    runs: VecDeque<(i32, i32)>,
    /// The run being read: its next part, its last part, its bytes.
    current: Option<(i32, i32, PartReader)>,
    /// Source bytes read so far.
    pub bytes_read: u64,
}

impl MissingParts {
    /// Opens the first run of the parts `resume` lacks (no request at all
    /// when it lacks none).
    pub async fn open(
        source: &Source,
        source_ref: &str,
        resume: &Resume,
        hashed: Hashed,
        part_size: u64,
    ) -> Result<Opened, UploadError> {
        let part_size = effective_part_size(part_size);
        let runs = missing_runs(hashed.part_checksums.len() as i32, |n| {
            resume.done.contains_key(&n)
        });
        let mut m = MissingParts {
            source: source.clone(),
            source_ref: source_ref.to_string(),
            hashed,
            part_size,
            runs,
            current: None,
            bytes_read: 0,
        };
        if let Some(&(first, last)) = m.runs.front() {
            let opened = Self::open_run(
                &m.source,
                &m.source_ref,
                &m.hashed,
                part_size,
                (first, last),
            )
            .await?;
            match opened {
                Ranged::Partial(body) => {
                    m.runs.pop_front();
                    let size = usize::try_from(part_size).map_err(|_| {
                        UploadError::Invalid("part size does not fit in memory".into())
                    })?;
                    m.current = Some((first, last, PartReader::new(body.stream, size)));
                }
                Ranged::Changed(reason) => return Ok(Opened::Changed(reason)),
                Ranged::Unsupported => return Ok(Opened::Unsupported),
            }
        }
        Ok(Opened::Ready(Box::new(m)))
    }

    /// Opens parts `first..=last` (borrowing only what it needs: the part
    /// being read is not `Sync`).
    async fn open_run(
        source: &Source,
        source_ref: &str,
        hashed: &Hashed,
        part_size: u64,
        (first, last): (i32, i32),
    ) -> Result<Ranged, UploadError> {
        let start = (first as u64 - 1) * part_size;
        let end = (last as u64 * part_size).min(hashed.size) - 1;
        debug!(first, last, start, end, "reading the missing parts");
        source
            .open_range(
                source_ref,
                start,
                end,
                hashed.size,
                hashed.validator.as_ref(),
            )
            .await
    }

    /// The bytes of part `number`, one of the missing parts, asked for in
    /// increasing order.
    async fn part(&mut self, number: i32) -> Result<Bytes, Missing> {
        if self
            .current
            .as_ref()
            .is_none_or(|(next, _, _)| *next != number)
        {
            let internal = || {
                Missing::Failed(UploadError::Invalid(format!(
                    "internal: part {number} is not the next missing part"
                )))
            };
            let (first, last) = self.runs.pop_front().ok_or_else(internal)?;
            if first != number {
                return Err(internal());
            }
            let size = usize::try_from(self.part_size).map_err(|_| {
                Missing::Failed(UploadError::Invalid(
                    "part size does not fit in memory".into(),
                ))
            })?;
            let opened = Self::open_run(
                &self.source,
                &self.source_ref,
                &self.hashed,
                self.part_size,
                (first, last),
            )
            .await
            .map_err(Missing::Failed)?;
            match opened {
                Ranged::Partial(body) => {
                    self.current = Some((first, last, PartReader::new(body.stream, size)));
                }
                Ranged::Changed(reason) => return Err(Missing::Changed(reason)),
                Ranged::Unsupported => {
                    return Err(Missing::Failed(UploadError::SourceRead {
                        source_ref: redact::url(&self.source_ref),
                        message: "the source stopped serving byte ranges".into(),
                    }));
                }
            }
        }
        let Some((next, last, reader)) = self.current.as_mut() else {
            return Err(Missing::Failed(UploadError::Invalid(
                "internal: no open range".into(),
            )));
        };
        let data = reader
            .next_part()
            .await
            .map_err(Missing::Failed)?
            .ok_or_else(|| {
                Missing::Failed(UploadError::SourceRead {
                    source_ref: redact::url(&self.source_ref),
                    message: format!("the range ended before part {number}"),
                })
            })?;
        self.bytes_read += data.len() as u64;
        *next += 1;
        if *next > *last {
            self.current = None;
        }
        Ok(data)
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
    check: Check,
    sse: Option<Sse>,
    /// The whole object's running SHA-256 after this part, to record.
    sha256_state: Option<Vec<u8>>,
}

/// What a part must match before it is sent: the checksum the hashing pass
/// computed for its slice of the source. A part that does not match gets
/// its upload (whose metadata holds that pass's hash) aborted and forgotten.
enum Check {
    /// No hashing pass: nothing to match.
    None,
    /// A fresh upload, or a resume that reads the whole source again.
    Hashed(String),
    /// A resume that reads only the missing parts.
    Resumed(String),
}

impl PartUpload {
    /// Sends one part, retrying it in place on retryable errors (a part the
    /// server rejects for a bad checksum is sent again from memory), and
    /// records it once the server has it.
    async fn send(self, data: Bytes) -> Result<PartRecord, UploadError> {
        let data = match &self.transfer.hook {
            Some(h) => h(self.number, HOOK_AS_READ, data),
            None => data,
        };
        let checksum = part_checksum(self.algorithm, &data);
        let (expected, resuming) = match &self.check {
            Check::None => (None, false),
            Check::Hashed(e) => (Some(e), false),
            Check::Resumed(e) => (Some(e), true),
        };
        if let Some(expected) = expected.filter(|e| **e != checksum) {
            // Never complete an upload whose metadata describes other bytes:
            // the next attempt starts over.
            let db = self.transfer.db.get().await?;
            forget_upload(&db, &self.client, self.item_id).await?;
            return Err(if resuming {
                UploadError::SourceChanged { part: self.number }
            } else {
                UploadError::Verification {
                    key: self.key.clone(),
                    message: format!(
                        "part {} is not what the hashing pass read (checksum {checksum}, \
                         hashed {expected}): the source changed since; starting over",
                        self.number
                    ),
                }
            });
        }
        let size = data.len();
        let etag = self
            .transfer
            .send_retrying(&self.key, self.number, &data, |body| async {
                let req = with_customer_key!(
                    self.client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(&self.key)
                        .upload_id(&self.upload_id)
                        .part_number(self.number)
                        .content_length(size as i64)
                        .body(ByteStream::from(body)),
                    self.sse.as_ref()
                );
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
            sha256_state: self.sha256_state,
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

/// The checksum a verified object must report.
#[derive(Clone, Copy, Debug)]
enum Stored<'a> {
    /// A multipart object's composite `…-N` (servers report it or nothing).
    Composite(&'a str),
    /// A single PUT's checksum of the whole object.
    Whole(&'a str),
}

/// Checks, with a fresh HEAD, that the stored object has the size that was
/// read, the checksum of the bytes sent (when the server reports one) and,
/// when it was set, the SHA-256 metadata. Returns the object's ETag.
async fn verify_head(
    target: &Target<'_>,
    size: u64,
    checksum: Option<(ChecksumAlgorithm, Stored<'_>)>,
    sha: Option<&str>,
) -> Result<Option<String>, UploadError> {
    let head = with_customer_key!(
        target
            .client
            .head_object()
            .bucket(target.bucket)
            .key(target.key)
            .checksum_mode(ChecksumMode::Enabled),
        target.sse
    )
    .send()
    .await
    .map_err(|e| s3_error("HeadObject (verify)", e))?;
    let fail = |message: String| UploadError::Verification {
        key: target.key.to_string(),
        message,
    };
    require_encryption(
        target,
        target.key,
        (
            head.server_side_encryption(),
            head.ssekms_key_id(),
            head.sse_customer_key_md5(),
        ),
    )
    .await?;
    let stored = head.content_length().unwrap_or(-1);
    if stored != size as i64 {
        return Err(fail(format!("stored size {stored} != {size} bytes read")));
    }
    if let Some((algorithm, expected)) = checksum {
        let reported = match algorithm {
            ChecksumAlgorithm::Crc32c => head.checksum_crc32_c(),
            ChecksumAlgorithm::Sha256 => head.checksum_sha256(),
        };
        match (expected, reported) {
            (Stored::Composite(e), Some(r)) if r.contains('-') && r != e => {
                return Err(fail(format!(
                    "server checksum {r} != {e} of the parts sent"
                )));
            }
            (Stored::Whole(e), Some(r)) if !r.contains('-') && r != e => {
                return Err(fail(format!(
                    "server checksum {r} != {e} of the bytes read"
                )));
            }
            (_, None) => debug!(key = target.key, "the server reports no checksum"),
            _ => {}
        }
    }
    if let Some(sha) = sha {
        match head.metadata().and_then(|m| m.get(SHA256_METADATA)) {
            Some(meta) if meta == sha => {}
            Some(meta) => {
                return Err(fail(format!(
                    "sha256 metadata {meta} != {sha} of the bytes read"
                )));
            }
            None => return Err(fail(format!("no sha256 metadata (expected {sha})"))),
        }
    }
    Ok(head.e_tag().map(str::to_string))
}

/// What a HEAD tells of a stored object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredObject {
    pub size: i64,
    pub sha256: Option<String>,
    /// The checksums the server reports (asked with ChecksumMode::Enabled):
    /// (algorithm, value).
    pub checksums: Vec<(&'static str, String)>,
    /// What the HEAD said of its encryption: algorithm, KMS key, SSE-C key
    /// MD5.
    pub encryption: Option<EncryptionSeen>,
    /// The object exists but cannot be read with the job's encryption
    /// parameters (encrypted with another SSE-C key, or not with SSE-C).
    pub opaque: bool,
}

/// A HEAD's encryption fields.
pub type EncryptionSeen = (Option<ServerSideEncryption>, Option<String>, Option<String>);

/// Checks what a HEAD of `key` said of its encryption (algorithm, KMS key,
/// SSE-C key MD5) against the job's; an object stored without it is
/// deleted, so that bytes the job meant to be encrypted are not left in
/// clear.
async fn require_encryption(
    target: &Target<'_>,
    key: &str,
    (algorithm, kms, md5): (Option<&ServerSideEncryption>, Option<&str>, Option<&str>),
) -> Result<(), UploadError> {
    let Some(sse) = target.sse else {
        return Ok(());
    };
    if let Err(why) = sse.check("HeadObject", algorithm, kms, md5) {
        remove_unencrypted(target, key).await;
        return Err(UploadError::Encryption(why));
    }
    Ok(())
}

async fn remove_unencrypted(target: &Target<'_>, key: &str) {
    match target
        .client
        .delete_object()
        .bucket(target.bucket)
        .key(key)
        .send()
        .await
    {
        Ok(_) => warn!(
            key,
            "deleted: stored without the encryption the job asks for"
        ),
        Err(e) => warn!(
            key,
            error = %s3_error("DeleteObject", e),
            "stored without the encryption the job asks for, and could not be deleted"
        ),
    }
}

/// HEADs `key` in the target's bucket: `None` when there is no such object.
pub async fn head_stored(
    target: &Target<'_>,
    key: &str,
) -> Result<Option<StoredObject>, UploadError> {
    let head = with_customer_key!(
        target
            .client
            .head_object()
            .bucket(target.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled),
        target.sse
    );
    match head.send().await {
        Ok(h) => {
            let checksums = [
                ("CRC32C", h.checksum_crc32_c()),
                ("SHA256", h.checksum_sha256()),
                ("CRC32", h.checksum_crc32()),
                ("CRC64NVME", h.checksum_crc64_nvme()),
                ("SHA1", h.checksum_sha1()),
            ]
            .into_iter()
            .filter_map(|(a, v)| v.map(|v| (a, v.to_string())))
            .collect();
            Ok(Some(StoredObject {
                size: h.content_length().unwrap_or(0),
                sha256: h.metadata().and_then(|m| m.get(SHA256_METADATA)).cloned(),
                checksums,
                encryption: Some((
                    h.server_side_encryption().cloned(),
                    h.ssekms_key_id().map(str::to_string),
                    h.sse_customer_key_md5().map(str::to_string),
                )),
                opaque: false,
            }))
        }
        Err(e) => {
            let e = s3_error("HeadObject", e);
            if e.is_not_found() {
                Ok(None)
            } else if e.status == Some(400) {
                // A HEAD has no error body: a 400 is the store saying the
                // object's encryption and the request's do not go together
                // (an SSE-C object without its key, a clear one with one).
                Ok(Some(StoredObject {
                    opaque: true,
                    ..StoredObject::default()
                }))
            } else {
                Err(e.into())
            }
        }
    }
}

/// Checks, with a fresh HEAD, that a server-side copy at `key` is what it
/// copied: the size, the SHA-256 metadata (`sha`, when one is expected) and
/// every checksum both objects report in the same form (a full-object value
/// or a composite `…-N`).
pub async fn verify_copy(
    target: &Target<'_>,
    key: &str,
    from: &StoredObject,
    sha: Option<&str>,
) -> Result<(), UploadError> {
    let fail = |message: String| UploadError::Verification {
        key: key.to_string(),
        message,
    };
    let Some(copy) = head_stored(target, key).await? else {
        return Err(fail("the copy is not there".into()));
    };
    let (algorithm, kms, md5) = copy.encryption.clone().unwrap_or_default();
    require_encryption(
        target,
        key,
        (algorithm.as_ref(), kms.as_deref(), md5.as_deref()),
    )
    .await?;
    if copy.size != from.size {
        return Err(fail(format!(
            "copy has {} bytes, its source {}",
            copy.size, from.size
        )));
    }
    if let Some(sha) = sha
        && copy.sha256.as_deref() != Some(sha)
    {
        return Err(fail(format!(
            "copy's sha256 metadata {:?} != {sha}",
            copy.sha256
        )));
    }
    for (algorithm, value) in &copy.checksums {
        if let Some((_, original)) = from.checksums.iter().find(|(a, _)| a == algorithm)
            && original.contains('-') == value.contains('-')
            && original != value
        {
            return Err(fail(format!(
                "copy's {algorithm} checksum {value} != {original} of its source"
            )));
        }
    }
    Ok(())
}

/// Every part the server holds for the upload: number → (ETag, size).
pub async fn list_parts(
    client: &aws_sdk_s3::Client,
    rec: &MultipartRecord,
    sse: Option<&Sse>,
) -> Result<HashMap<i32, (String, i64)>, UploadError> {
    let mut out = HashMap::new();
    let mut marker: Option<String> = None;
    loop {
        let page = with_customer_key!(
            client
                .list_parts()
                .bucket(&rec.bucket)
                .key(&rec.object_key)
                .upload_id(&rec.upload_id)
                .set_part_number_marker(marker.clone()),
            sse
        )
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

/// Aborts the item's multipart upload, if it has one, and forgets it.
async fn forget_upload(
    db: &stowage_common::db::Client,
    client: &aws_sdk_s3::Client,
    item_id: i64,
) -> Result<(), UploadError> {
    if let Some((rec, _)) = state::get_multipart(db, item_id).await? {
        abort(client, &rec).await;
        state::delete_multipart(db, item_id).await?;
    }
    Ok(())
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

    #[test]
    fn missing_parts_are_read_in_runs() {
        let runs = |stored: &[i32]| Vec::from(missing_runs(8, |n| stored.contains(&n)));
        assert_eq!(runs(&[]), [(1, 8)]);
        assert_eq!(runs(&[1, 2, 3]), [(4, 8)]);
        // Parts stored out of order (concurrency): the holes are read, the
        // stored parts between them are not.
        assert_eq!(runs(&[1, 2, 4, 7]), [(3, 3), (5, 6), (8, 8)]);
        assert_eq!(runs(&[1, 2, 3, 4, 5, 6, 7, 8]), []);
    }
}
