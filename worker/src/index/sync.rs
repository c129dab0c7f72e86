//! One sync run's work: list the source, plan against the generation being
//! written, index what is new or changed (fetch, extract, chunk, embed,
//! store), drop what is gone, and activate a freshly built generation once
//! every document of it is in.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use stowage_common::locks::{LockClass, LockKey, SessionLock};
use stowage_common::spec::index::{Embedding, EmbeddingProvider, IndexSpec};
use stowage_common::spec::select::Selector;
use stowage_common::state::collections::{CollectionRecord, RunCounts, RunState};
use stowage_common::state::index::{self as store, NewChunk, Source};
use stowage_common::storage::read_secret_key;
use tracing::{info, warn};

use super::chunk::chunk;
use super::embed::{BuiltinModel, Embedder, RemoteEmbedder, Retry};
use super::extract::{DEFAULT_MAX_BYTES, extract};
use super::plan::{Indexed, Listed, Plan, plan};
use crate::Context;
use crate::s3::s3_error;

/// How a run ended: its state, counts and (for failures) the reason.
pub struct Ending {
    pub state: RunState,
    pub counts: RunCounts,
    pub error: Option<String>,
}

impl Ending {
    fn failed(error: impl Into<String>) -> Ending {
        Ending {
            state: RunState::Failed,
            counts: RunCounts::default(),
            error: Some(error.into()),
        }
    }
}

pub async fn run(ctx: &Context, collection: &CollectionRecord) -> Ending {
    match index(ctx, collection).await {
        Ok(ending) => ending,
        Err(e) => Ending::failed(e),
    }
}

async fn index(ctx: &Context, collection: &CollectionRecord) -> Result<Ending, String> {
    let spec = &collection.spec;
    let embedder = embedder(ctx, &spec.embedding).await?;
    let selector = Selector::new(&spec.source).map_err(|e| e.to_string())?;
    let client = ctx
        .s3
        .client(&spec.source.endpoint)
        .map_err(|e| e.to_string())?;
    let listing = list(&client, spec).await?;
    let mut db = ctx.db.get().await.map_err(|e| e.to_string())?;
    let generation = store::generation_for(&mut db, collection.id, &spec.embedding)
        .await
        .map_err(|e| e.to_string())?;
    let indexed = store::documents(&db, generation.id)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(k, (etag, sha256_hex))| (k, Indexed { etag, sha256_hex }))
        .collect();
    let Plan {
        new,
        changed,
        deleted,
        unchanged,
        ..
    } = plan(&selector, listing, &indexed);
    let mut counts = RunCounts {
        seen: (new.len() + changed.len() + unchanged) as i64,
        ..RunCounts::default()
    };
    // A few documents at a time: fetching and remote embedding wait on the
    // network; the built-in model shares the CPU pool between them.
    let work: Vec<_> = new
        .iter()
        .map(|o| (o, true))
        .chain(changed.iter().map(|o| (o, false)))
        .map(|(object, is_new)| {
            tagged(
                document(ctx, &client, collection, &embedder, generation.id, object),
                (object, is_new),
            )
        })
        .collect();
    let mut outcomes = futures::stream::iter(work).buffer_unordered(DOCUMENTS_AT_ONCE);
    while let Some(((object, is_new), outcome)) = outcomes.next().await {
        match outcome {
            Ok(Some(chunks)) => {
                counts.chunks_written += chunks as i64;
                if is_new {
                    counts.new += 1;
                } else {
                    counts.changed += 1;
                }
            }
            Ok(None) => counts.skipped += 1,
            Err(e) => {
                warn!(key = object.key, error = %e, "document failed");
                counts.failed += 1;
            }
        }
    }
    drop(outcomes);
    for key in &deleted {
        let _lock = document_lock(ctx, collection.id, key).await?;
        store::delete_document(&mut db, generation.id, key)
            .await
            .map_err(|e| e.to_string())?;
        counts.deleted += 1;
    }
    if generation.state == "building" {
        store::activate(&mut db, generation.id)
            .await
            .map_err(|e| e.to_string())?;
        info!(collection = %collection.id, generation = generation.id, "new embedding generation active");
    }
    Ok(Ending {
        state: if counts.failed > 0 {
            RunState::CompletedWithErrors
        } else {
            RunState::Completed
        },
        counts,
        error: None,
    })
}

/// `future`'s output with `tag` beside it.
async fn tagged<T, F: Future>(future: F, tag: T) -> (T, F::Output) {
    (tag, future.await)
}

/// The embedder for `spec`: the worker's built-in model (loaded once, on
/// first use) or a remote provider with the API key from its Secret.
pub(crate) async fn embedder(ctx: &Context, spec: &Embedding) -> Result<Embedder, String> {
    if spec.provider == EmbeddingProvider::Builtin {
        let Some(dir) = ctx.embedding_model_dir.clone() else {
            return Err(
                "the collection uses the builtin embedding model, but this worker has no \
                 --embedding-model-dir (STOWAGE_EMBEDDING_MODEL_DIR; `scripts/stack install model` \
                 unpacks it)"
                    .to_string(),
            );
        };
        let model = ctx
            .builtin_model
            .get_or_try_init(|| async move {
                let loaded = tokio::task::spawn_blocking(move || BuiltinModel::load(&dir))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                info!("builtin embedding model loaded");
                Ok::<_, String>(Arc::new(loaded))
            })
            .await?;
        return Ok(Embedder::Builtin(model.clone()));
    }
    let api_key = match (&spec.credentials_secret_ref, &ctx.credentials_dir) {
        (None, _) => None,
        (Some(r), Some(dir)) => Some(
            read_secret_key(dir, &r.name, &["api_key", "API_KEY"]).map_err(|e| e.to_string())?,
        ),
        (Some(r), None) => {
            return Err(format!(
                "the collection names Secret {:?} but this worker has no --credentials-dir",
                r.name
            ));
        }
    };
    RemoteEmbedder::new(spec, api_key, Retry::default())
        .map(|r| Embedder::Remote(Arc::new(r)))
        .map_err(|e| e.to_string())
}

async fn list(client: &aws_sdk_s3::Client, spec: &IndexSpec) -> Result<Vec<Listed>, String> {
    let mut out = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(&spec.source.bucket)
        .prefix(&spec.source.prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| s3_error("ListObjectsV2", e).to_string())?;
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

/// Documents a sync run indexes concurrently.
const DOCUMENTS_AT_ONCE: usize = 4;

/// How long a document waits for another indexer of it (an event-driven
/// task, or a sync run) to finish.
const DOCUMENT_LOCK_WAIT: Duration = Duration::from_secs(60);

/// The document's lock: one indexer (or remover) of a key at a time.
pub(crate) async fn document_lock(
    ctx: &Context,
    collection_id: uuid::Uuid,
    key: &str,
) -> Result<SessionLock, String> {
    ctx.locks
        .lock_with_timeout(
            LockKey::new(LockClass::Document, format!("{collection_id}/{key}")),
            DOCUMENT_LOCK_WAIT,
        )
        .await
        .map_err(|e| format!("document lock: {e}"))
}

/// Indexes one object into one generation, under the document's lock (held
/// from the fetch to the commit, so that two indexers of a key never store
/// an older version over a newer one); `Ok(None)` when it is skipped
/// (recorded with the reason), `Err` when it failed (recorded with the
/// reason too).
pub(crate) async fn document(
    ctx: &Context,
    client: &aws_sdk_s3::Client,
    collection: &CollectionRecord,
    embedder: &Embedder,
    generation_id: i64,
    object: &Listed,
) -> Result<Option<usize>, String> {
    let spec = &collection.spec;
    let lock = document_lock(ctx, collection.id, &object.key).await?;
    let mut db = ctx.db.get().await.map_err(|e| e.to_string())?;
    let mut source = Source {
        object_key: object.key.clone(),
        etag: Some(object.etag.clone()),
        sha256_hex: None,
        content_type: None,
        size_bytes: Some(object.size),
    };
    let outcome = fetch_and_index(client, spec, embedder, object, &mut source).await;
    let recorded = match &outcome {
        Ok(Prepared::Chunks(chunks)) => {
            store::write_document(&mut db, generation_id, &source, chunks).await
        }
        Ok(Prepared::Skipped(reason)) => {
            store::record_unindexed(&mut db, generation_id, &source, "skipped", reason).await
        }
        Err(reason) => {
            store::record_unindexed(&mut db, generation_id, &source, "failed", reason).await
        }
    };
    recorded.map_err(|e| e.to_string())?;
    if let Err(e) = lock.release().await {
        warn!(error = %e, "releasing a document lock");
    }
    match outcome {
        Ok(Prepared::Chunks(chunks)) => Ok(Some(chunks.len())),
        Ok(Prepared::Skipped(_)) => Ok(None),
        Err(reason) => Err(reason),
    }
}

/// A document ready to record; an `Err` instead means it failed.
enum Prepared {
    Chunks(Vec<NewChunk>),
    /// Not indexed by design, with the reason.
    Skipped(String),
}

async fn fetch_and_index(
    client: &aws_sdk_s3::Client,
    spec: &IndexSpec,
    embedder: &Embedder,
    object: &Listed,
    source: &mut Source,
) -> Result<Prepared, String> {
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
    let bytes = got
        .body
        .collect()
        .await
        .map_err(|e| format!("reading {}: {e}", object.key))?
        .into_bytes();
    source.sha256_hex = Some(hex::encode(Sha256::digest(&bytes)));
    let extracted = match extract(
        source.content_type.as_deref(),
        &object.key,
        &bytes,
        DEFAULT_MAX_BYTES,
    ) {
        Ok(x) => x,
        Err(e) if e.is_skip() => return Ok(Prepared::Skipped(e.to_string())),
        Err(e) => return Err(e.to_string()),
    };
    let pieces =
        chunk(&extracted.text, extracted.format, &spec.chunking).map_err(|e| e.to_string())?;
    let texts: Vec<String> = pieces.iter().map(|c| c.text.clone()).collect();
    let vectors = embedder.embed(&texts).await.map_err(|e| e.to_string())?;
    Ok(Prepared::Chunks(
        pieces
            .into_iter()
            .zip(vectors)
            .map(|(c, embedding)| NewChunk {
                content: c.text,
                byte_start: c.byte_start as i32,
                byte_end: c.byte_end as i32,
                char_start: c.char_start as i32,
                char_end: c.char_end as i32,
                heading_path: c.heading_path,
                embedding,
            })
            .collect(),
    ))
}
