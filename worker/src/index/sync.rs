//! A sync run, fanned out over the fleet. The planner (the `SyncCollection`
//! task, holding the collection's sync lock) lists the source, plans it
//! against the generation being written, drops what is gone, records one
//! pending row per new or changed object and publishes an `IndexDocument`
//! task for each. Any worker indexes a document (fetch, extract, chunk,
//! embed, store) and records how it ended; the one that finishes the last
//! document — or the planner, if they all finished while it was still
//! publishing — activates a freshly built generation and closes the run.
//!
//! Identical bytes written again are not embedded again: the planner learns
//! the content hash of an object whose ETag changed (a HEAD of it: its
//! `sha256` metadata, else Stowage's record of writing it on the same store)
//! and only records the new ETag; an object whose hash nobody knows is
//! fetched and hashed, and if its bytes and type are those of the document,
//! its ETag is recorded and nothing is embedded.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use stowage_common::jobs::{DocumentOrigin, index_document_task};
use stowage_common::locks::{LockClass, LockKey, SessionLock};
use stowage_common::queue::TaskKind;
use stowage_common::spec::index::{Embedding, EmbeddingProvider, IndexSpec};
use stowage_common::spec::select::Selector;
use stowage_common::state::collections::{
    self, CollectionRecord, DocumentEnd, PlannedDocument, RunCounts, RunState,
};
use stowage_common::state::index::{self as store, DocumentState, NewChunk, Source};
use tracing::{debug, info, warn};

use super::chunk::{Chunk, chunk_document, context};
use super::embed::{Batcher, Embedder, RemoteEmbedder, Retry};
use super::extract::{DEFAULT_MAX_BYTES, extract};
use super::plan::{self, Head, Indexed, Listed, Plan, Recorded, content_hash, hash_candidates};
use crate::Context;
use crate::upload::source::MinRate;
use stowage_common::storage::s3_error;

use super::IndexError;

/// Plans run `run_id` and hands its documents to the fleet: deletions are
/// done here, every new or changed object gets a pending row and a task.
/// The caller holds the collection's sync lock.
pub async fn dispatch(
    ctx: &Context,
    collection: &CollectionRecord,
    run_id: i64,
) -> Result<(), IndexError> {
    let spec = &collection.spec;
    // A model that cannot load fails the run now, not once per document.
    embedder(ctx, &collection.namespace, &spec.embedding).await?;
    let selector = Selector::new(&spec.source).map_err(|e| IndexError::Invalid(e.to_string()))?;
    let client = ctx
        .s3
        .client(&collection.namespace, &spec.source.endpoint)
        .await?;
    let mut listing = list(&client, spec).await?;
    let mut db = ctx.db.get().await?;
    let generation = store::generation_for(&mut db, collection.id, &spec.embedding).await?;
    let indexed = store::documents(&db, generation.id)
        .await?
        .into_iter()
        .map(|(k, d)| (k, as_indexed(d)))
        .collect();
    let candidates: Vec<String> = hash_candidates(&selector, &listing, &indexed)
        .into_iter()
        .map(|o| o.key.clone())
        .collect();
    let hashes = content_hashes(ctx, &client, spec, &listing, &indexed, &candidates).await?;
    for object in &mut listing {
        if let Some(sha) = hashes.get(&object.key) {
            object.sha256_hex = Some(sha.clone());
        }
    }
    let planned = plan::plan(&selector, listing, &indexed);
    let Plan {
        new,
        changed,
        deleted,
        retagged,
        ..
    } = &planned;
    for key in deleted {
        let _lock = document_lock(ctx, collection.id, key).await?;
        store::delete_document(&mut db, generation.id, key).await?;
    }
    let retags: Vec<store::Retag> = retagged
        .iter()
        .filter_map(|o| {
            Some(store::Retag {
                object_key: o.key.clone(),
                sha256_hex: o.sha256_hex.clone()?,
                etag: o.etag.clone(),
            })
        })
        .collect();
    let retagged = store::retag_documents(&mut db, generation.id, &retags).await?;
    let documents: Vec<PlannedDocument> = new
        .iter()
        .map(|o| (o, true))
        .chain(changed.iter().map(|o| (o, false)))
        .map(|(o, new)| PlannedDocument {
            key: o.key.clone(),
            etag: o.etag.clone(),
            size: o.size,
            new,
        })
        .collect();
    let counts = RunCounts {
        seen: planned.seen() as i64,
        deleted: deleted.len() as i64,
        ..RunCounts::default()
    };
    collections::record_plan(&mut db, run_id, generation.id, &counts, &documents).await?;
    let tasks: Vec<_> = documents
        .iter()
        .map(|d| index_document_task(collection.id, &d.key, DocumentOrigin::Run { id: run_id }))
        .collect();
    let subject = ctx.queue.topology().task_subject(
        TaskKind::IndexDocument,
        &collection.namespace,
        &collection.name,
    );
    ctx.queue.publish_tasks(&subject, &tasks).await?;
    collections::mark_dispatched(&db, run_id).await?;
    info!(
        collection = %collection.id, run_id, documents = documents.len(),
        deleted = deleted.len(), unchanged = planned.unchanged,
        hash_lookups = candidates.len(), retagged, "sync run dispatched"
    );
    Ok(())
}

/// Closes run `run_id` if every document of it has finished: activates the
/// generation it built, if new, and records the run's end and counts.
/// Returns the state it ended in; `None` while documents are pending (or if
/// it already ended). The caller holds the collection's sync lock, so that
/// one closer at a time reads the documents.
pub(crate) async fn close_if_done(
    ctx: &Context,
    run_id: i64,
) -> Result<Option<RunState>, IndexError> {
    let mut db = ctx.db.get().await?;
    let progress = collections::run_progress(&db, run_id).await?;
    if !progress.complete() {
        return Ok(None);
    }
    let mut error = None;
    let generation = match progress.generation_id {
        Some(id) => store::generation(&db, id).await?,
        None => None,
    };
    let c = &progress.counts;
    let changed = c.new + c.changed + c.deleted > 0;
    if let Some(g) = generation.as_ref().filter(|g| g.state != "building")
        && changed
    {
        // Activation counts a new generation's keyword statistics; a run
        // that changed the active one recounts them here.
        if let Err(e) = store::refresh_keyword_stats(&mut db, g.id).await {
            warn!(generation = g.id, error = %e, "cannot recount the keyword statistics");
        }
    }
    if let Some(g) = generation.filter(|g| g.state == "building") {
        let id = g.id;
        match store::activate(&mut db, id).await {
            Ok(()) => {
                info!(collection = %g.collection_id, generation = id, "new embedding generation active")
            }
            // Its documents stay; the next run finds them indexed and
            // activates it.
            Err(e) => error = Some(format!("activating the new embedding generation: {e}")),
        }
    }
    let state = match (&error, progress.counts.failed) {
        (Some(_), _) => RunState::Failed,
        (None, 0) => RunState::Completed,
        (None, _) => RunState::CompletedWithErrors,
    };
    collections::finish_run(&db, run_id, state, &progress.counts, error.as_deref()).await?;
    info!(run_id, state = state.as_str(), counts = ?progress.counts, "sync run finished");
    Ok(Some(state))
}

/// The embedder for `spec`: the worker's built-in model (loaded once, on
/// first use) or a remote provider with the API key from its Secret.
pub(crate) async fn embedder(
    ctx: &Context,
    namespace: &str,
    spec: &Embedding,
) -> Result<Embedder, IndexError> {
    if spec.provider == EmbeddingProvider::Builtin {
        let Some(source) = ctx.builtin_source.clone() else {
            return Err(IndexError::Model(
                "the collection uses the builtin embedding model, but this worker has neither \
                 --embedding-onnx-dir (STOWAGE_EMBEDDING_ONNX_DIR; `scripts/stack install onnx`) \
                 nor --embedding-model-dir (STOWAGE_EMBEDDING_MODEL_DIR; `scripts/stack install \
                 model` unpacks it)"
                    .to_string(),
            ));
        };
        let model = ctx
            .builtin_model
            .get_or_try_init(|| async move {
                let loaded = tokio::task::spawn_blocking(move || source.load())
                    .await
                    .map_err(|e| IndexError::Model(format!("loading the builtin model: {e}")))?
                    .map_err(|e| IndexError::Model(e.to_string()))?;
                info!(backend = %loaded.backend(), "builtin embedding model loaded");
                Batcher::start(Arc::new(loaded), ctx.metrics.clone())
                    .map(Arc::new)
                    .map_err(|e| IndexError::Model(e.to_string()))
            })
            .await?;
        return Ok(Embedder::Builtin(model.clone()));
    }
    // The API key of the collection's own namespace, never another's.
    let api_key = match &spec.credentials_secret_ref {
        None => None,
        Some(r) => Some(
            ctx.s3
                .secrets()
                .get(namespace, &r.name)
                .await?
                .value(&["api_key", "API_KEY"])?,
        ),
    };
    if spec.allow_private_networks && !ctx.allow_private_networks {
        return Err(IndexError::Invalid(
            "embedding.allowPrivateNetworks: this installation does not let resources reach \
             private networks (--allow-private-networks)"
                .into(),
        ));
    }
    Ok(RemoteEmbedder::new(spec, api_key, Retry::default())
        .map(|r| Embedder::Remote(Arc::new(r)))?)
}

async fn list(client: &aws_sdk_s3::Client, spec: &IndexSpec) -> Result<Vec<Listed>, IndexError> {
    let mut out = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(&spec.source.bucket)
        .prefix(&spec.source.prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| s3_error("ListObjectsV2", e))?;
        for o in page.contents() {
            out.push(Listed {
                key: o.key().unwrap_or_default().to_string(),
                etag: o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
                sha256_hex: None,
                size: o.size().unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

/// The planner's view of a document.
pub(crate) fn as_indexed(d: store::IndexedDocument) -> Indexed {
    Indexed {
        etag: d.etag,
        sha256_hex: d.sha256_hex,
        content_type: d.content_type,
        failed: d.state == DocumentState::Failed,
    }
}

/// HEADs of candidates in flight at once.
const HEAD_CONCURRENCY: usize = 16;

/// The content hashes of `candidates` (keys of `listing` whose ETag changed
/// under a hashed document) that a HEAD of each, or Stowage's records of
/// the ones without `sha256` metadata, make known. An object that cannot be
/// HEADed is left to its document task, which reads it anyway.
async fn content_hashes(
    ctx: &Context,
    client: &aws_sdk_s3::Client,
    spec: &IndexSpec,
    listing: &[Listed],
    indexed: &std::collections::HashMap<String, Indexed>,
    candidates: &[String],
) -> Result<std::collections::HashMap<String, String>, IndexError> {
    let bucket = spec.source.bucket.as_str();
    let heads: Vec<Option<(String, Head)>> = futures::stream::iter(candidates.to_vec())
        .map(|key| {
            let (client, bucket) = (client.clone(), bucket.to_string());
            async move {
                match head(&client, &bucket, &key).await {
                    Ok(found) => found.map(|(_, h)| (key, h)),
                    Err(e) => {
                        debug!(key, error = %e, "no HEAD for a content-hash lookup");
                        None
                    }
                }
            }
        })
        .buffer_unordered(HEAD_CONCURRENCY)
        .collect()
        .await;
    let heads: Vec<(String, Head)> = heads.into_iter().flatten().collect();
    let unlabelled: Vec<&str> = heads
        .iter()
        .filter(|(_, h)| h.sha256_metadata.is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    let recorded = {
        let db = ctx.db.get().await?;
        store::recorded_contents(&db, spec.source.endpoint.label(), bucket, &unlabelled).await?
    };
    let etags: std::collections::HashMap<&str, &str> = listing
        .iter()
        .map(|o| (o.key.as_str(), o.etag.as_str()))
        .collect();
    Ok(heads
        .into_iter()
        .filter_map(|(key, head)| {
            let doc = indexed.get(&key)?;
            let etag = etags.get(key.as_str())?;
            let record = recorded.get(&key).map(|(etag, sha)| Recorded {
                etag: etag.clone(),
                sha256_hex: sha.clone(),
            });
            let sha = content_hash(etag, doc, &head, record.as_ref())?;
            Some((key, sha))
        })
        .collect())
}

/// The object as a listing would show it, and what its HEAD says; `None`
/// when it is gone.
pub(crate) async fn head(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<Option<(Listed, Head)>, IndexError> {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(o) => {
            let etag = o.e_tag().unwrap_or_default().trim_matches('"').to_string();
            let head = Head {
                etag: etag.clone(),
                content_type: o.content_type().map(str::to_string),
                sha256_metadata: o
                    .metadata()
                    .and_then(|m| m.get(crate::upload::multipart::SHA256_METADATA))
                    .cloned(),
            };
            let listed = Listed {
                key: key.to_string(),
                etag,
                sha256_hex: None,
                size: o.content_length().unwrap_or_default(),
            };
            Ok(Some((listed, head)))
        }
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
        Err(e) => Err(s3_error("HeadObject", e).into()),
    }
}

/// How long a document waits for another indexer of it (an event-driven
/// task, or a sync run) to finish.
pub(crate) const DOCUMENT_LOCK_WAIT: Duration = Duration::from_secs(60);

/// The document's lock: one indexer (or remover) of a key at a time.
pub(crate) async fn document_lock(
    ctx: &Context,
    collection_id: uuid::Uuid,
    key: &str,
) -> Result<SessionLock, IndexError> {
    ctx.locks
        .lock_with_timeout(
            LockKey::new(LockClass::Document, format!("{collection_id}/{key}")),
            DOCUMENT_LOCK_WAIT,
        )
        .await
        .map_err(IndexError::from)
}

/// How a document ended.
pub(crate) struct Indexing {
    pub end: DocumentEnd,
    /// Its bytes and type were those already indexed: only the new ETag
    /// was recorded, nothing embedded (`end` is indexed, 0 chunks written).
    pub unchanged: bool,
}

/// Indexes one object into one generation, under the document's lock (held
/// from the fetch to the commit, so that two indexers of a key never store
/// an older version over a newer one), and records the outcome on the
/// document: indexed, skipped or failed, with the reason — or, if the
/// object holds the bytes and type the document was indexed from, just its
/// new ETag. `Err` when the outcome could not be recorded (database, lock):
/// worth another try.
pub(crate) async fn document(
    ctx: &Context,
    client: &aws_sdk_s3::Client,
    collection: &CollectionRecord,
    embedder: &Embedder,
    generation_id: i64,
    object: &Listed,
) -> Result<Indexing, IndexError> {
    let spec = &collection.spec;
    let lock = document_lock(ctx, collection.id, &object.key).await?;
    let mut db = ctx.db.get().await?;
    let existing = store::document(&db, generation_id, &object.key).await?;
    let mut source = Source {
        object_key: object.key.clone(),
        etag: Some(object.etag.clone()),
        sha256_hex: None,
        content_type: None,
        size_bytes: Some(object.size),
    };
    let outcome = fetch_and_index(
        ctx,
        client,
        spec,
        embedder,
        object,
        existing.as_ref(),
        &mut source,
    )
    .await;
    let mut unchanged = false;
    let end = match outcome {
        Ok(Prepared::Unchanged { sha256_hex }) => {
            if let Some(etag) = source.etag.clone() {
                let retag = store::Retag {
                    object_key: object.key.clone(),
                    sha256_hex,
                    etag,
                };
                store::retag_documents(&mut db, generation_id, &[retag]).await?;
            }
            info!(
                key = object.key,
                generation = generation_id,
                "content unchanged under a new ETag: ETag recorded, nothing embedded"
            );
            unchanged = true;
            DocumentEnd::Indexed { chunks: 0 }
        }
        Ok(Prepared::Chunks { chunks, title }) => {
            store::write_titled_document(
                &mut db,
                generation_id,
                &source,
                title.as_deref(),
                &chunks,
            )
            .await?;
            DocumentEnd::Indexed {
                chunks: chunks.len() as i32,
            }
        }
        Ok(Prepared::Skipped(reason)) => {
            store::record_unindexed(
                &mut db,
                generation_id,
                &source,
                DocumentState::Skipped,
                &reason,
            )
            .await?;
            DocumentEnd::Skipped { reason }
        }
        Err(reason) => {
            warn!(key = object.key, error = %reason, "document failed");
            store::record_unindexed(
                &mut db,
                generation_id,
                &source,
                DocumentState::Failed,
                &reason,
            )
            .await?;
            DocumentEnd::Failed { reason }
        }
    };
    if let Err(e) = lock.release().await {
        warn!(error = %e, "releasing a document lock");
    }
    Ok(Indexing { end, unchanged })
}

/// A document ready to record; an `Err` instead means it failed.
enum Prepared {
    Chunks {
        chunks: Vec<NewChunk>,
        title: Option<String>,
    },
    /// The bytes (of this SHA-256) and type the document was indexed from.
    Unchanged { sha256_hex: String },
    /// Not indexed by design, with the reason.
    Skipped(String),
}

async fn fetch_and_index(
    ctx: &Context,
    client: &aws_sdk_s3::Client,
    spec: &IndexSpec,
    embedder: &Embedder,
    object: &Listed,
    existing: Option<&store::IndexedDocument>,
    source: &mut Source,
) -> Result<Prepared, String> {
    let metrics = &ctx.metrics;
    if object.size as usize > DEFAULT_MAX_BYTES {
        return Ok(Prepared::Skipped(format!(
            "not indexed: {} bytes is more than the extraction limit of {DEFAULT_MAX_BYTES}",
            object.size
        )));
    }
    let got = client
        .get_object()
        .bucket(&spec.source.bucket)
        .key(&object.key)
        .send()
        .await
        .map_err(|e| s3_error("GetObject", e).to_string())?;
    source.content_type = got.content_type().map(str::to_string);
    // The version read, which may be newer than the one planned.
    if let Some(etag) = got.e_tag() {
        source.etag = Some(etag.trim_matches('"').to_string());
    }
    let announced = got.content_length().and_then(|n| u64::try_from(n).ok());
    let Some(bytes) = read_bounded(got.body, &object.key, announced, ctx.min_rate).await? else {
        return Ok(Prepared::Skipped(format!(
            "not indexed: the object grew past the extraction limit of {DEFAULT_MAX_BYTES} \
             bytes while it was read (listed at {} bytes)",
            object.size
        )));
    };
    let sha256_hex = hex::encode(Sha256::digest(&bytes));
    source.sha256_hex = Some(sha256_hex.clone());
    // Written again as it was (a new ETag nobody could vouch for before
    // reading it): the chunks stored are those these bytes make.
    if existing.is_some_and(|d| {
        d.state == DocumentState::Indexed
            && d.sha256_hex.as_deref() == Some(sha256_hex.as_str())
            && plan::same_content_type(d.content_type.as_deref(), source.content_type.as_deref())
    }) {
        return Ok(Prepared::Unchanged { sha256_hex });
    }
    let content_type = source.content_type.clone();
    let key = object.key.clone();
    let chunking = spec.chunking.clone();
    // Parsing and splitting are CPU work that can take seconds, and a
    // parser can panic on a hostile file: off the async threads, caught.
    let pieces = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(|| {
            extract_and_chunk(content_type.as_deref(), &key, &bytes, &chunking)
        })
    })
    .await
    .map_err(|e| format!("extraction stopped: {e}"))?
    .unwrap_or_else(|panic| {
        Err(format!(
            "the extractor crashed on this document: {}",
            stowage_common::errors::panic_message(panic.as_ref())
        ))
    })?;
    let Pieces {
        chunks: pieces,
        title,
        extracted_bytes,
        input_bytes,
        truncated,
    } = match pieces {
        Ok(pieces) => pieces,
        Err(skip) => return Ok(Prepared::Skipped(skip)),
    };
    metrics.extracted_bytes.inc_by(extracted_bytes as u64);
    metrics.extraction_input_bytes.inc_by(input_bytes as u64);
    if truncated {
        metrics.extractions_truncated.inc();
        info!(
            key = object.key,
            "extraction stopped at a limit: the document is indexed in part"
        );
    }
    metrics.chunks_per_document.observe(pieces.len() as f64);
    // Embedded with its context; stored as the source said it.
    let texts: Vec<String> = pieces
        .iter()
        .map(|c| context(title.as_deref(), &c.heading_path, &c.text))
        .collect();
    let vectors = embedder.embed(&texts).await.map_err(|e| e.to_string())?;
    let offset = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    Ok(Prepared::Chunks {
        chunks: pieces
            .into_iter()
            .zip(vectors)
            .map(|(c, embedding)| NewChunk {
                byte_start: offset(c.byte_start),
                byte_end: offset(c.byte_end),
                char_start: offset(c.char_start),
                char_end: offset(c.char_end),
                content: c.text,
                heading_path: c.heading_path,
                embedding,
            })
            .collect(),
        title,
    })
}

/// A document extracted and chunked.
struct Pieces {
    chunks: Vec<Chunk>,
    title: Option<String>,
    extracted_bytes: usize,
    input_bytes: usize,
    truncated: bool,
}

/// Text, then chunks: `Ok(Err(reason))` when the document is skipped by
/// design, `Err(reason)` when it is malformed.
fn extract_and_chunk(
    content_type: Option<&str>,
    key: &str,
    bytes: &[u8],
    chunking: &stowage_common::spec::index::Chunking,
) -> Result<Result<Pieces, String>, String> {
    let extracted = match extract(content_type, key, bytes, DEFAULT_MAX_BYTES) {
        Ok(x) => x,
        Err(e) if e.is_skip() => return Ok(Err(e.to_string())),
        Err(e) => return Err(e.to_string()),
    };
    let chunks = chunk_document(&extracted, chunking).map_err(|e| e.to_string())?;
    Ok(Ok(Pieces {
        chunks,
        extracted_bytes: extracted.text.len(),
        input_bytes: bytes.len(),
        truncated: extracted.truncated,
        title: extracted.title,
    }))
}

/// The whole object, read as it streams, held to the extraction limit and
/// the minimum rate; `None` when it is larger than the limit (whatever its
/// listing said).
async fn read_bounded(
    body: aws_sdk_s3::primitives::ByteStream,
    key: &str,
    announced: Option<u64>,
    min_rate: MinRate,
) -> Result<Option<Vec<u8>>, String> {
    use futures::StreamExt;
    let owned = key.to_string();
    let stream = futures::stream::try_unfold(body, move |mut body| {
        let key = owned.clone();
        async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                Err(e) => Err(crate::upload::UploadError::SourceRead {
                    source_ref: key,
                    message: stowage_common::errors::chain(&e),
                }),
            }
        }
    })
    .boxed();
    let mut stream = crate::upload::source::guarded(stream, announced, key, min_rate);
    let capacity = announced.map_or(0, |n| n.min(DEFAULT_MAX_BYTES as u64) as usize);
    let mut bytes = Vec::with_capacity(capacity);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if bytes.len().saturating_add(chunk.len()) > DEFAULT_MAX_BYTES {
            return Ok(None);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Some(bytes))
}
