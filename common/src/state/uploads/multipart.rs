//! Multipart progress: the upload id, the source version it started from,
//! and every part recorded (ETag, checksum, hashing state) — the resume
//! point after a crash.

use deadpool_postgres::ClientWrapper as Client;

use crate::state::StateError;

/// A multipart upload in progress for an item: the resume point.
#[derive(Clone, Debug, PartialEq)]
pub struct MultipartRecord {
    pub endpoint: String,
    pub bucket: String,
    pub object_key: String,
    pub upload_id: String,
    pub part_size_bytes: i64,
    pub checksum_algorithm: String,
    /// The SHA-256 set in the object's metadata at creation, if any.
    pub metadata_sha256: Option<String>,
    /// What the hashing pass behind `metadata_sha256` read (migration V12),
    /// when there was one: a resume reads only the parts still to send.
    pub source: Option<SourceVersion>,
}

/// The source bytes a multipart upload's hashing pass read.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceVersion {
    pub size_bytes: i64,
    /// Checksum (the upload's algorithm, base64) of each part-sized slice.
    pub part_checksums: Vec<String>,
    /// `etag:<value>` or `last-modified:<value>`, if the source sent one.
    pub validator: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PartRecord {
    pub part_number: i32,
    pub etag: String,
    pub checksum: String,
    pub size_bytes: i64,
    /// The whole object's running SHA-256 after this part (the serialized
    /// hasher, migration V15), where the transfer keeps it: a stream can
    /// resume after this part without the bytes before it.
    pub sha256_state: Option<Vec<u8>>,
}

pub async fn get_multipart(
    client: &Client,
    item_id: i64,
) -> Result<Option<(MultipartRecord, Vec<PartRecord>)>, StateError> {
    let Some(r) = client
        .query_opt(
            &client.prepare_cached("SELECT endpoint, bucket, object_key, upload_id, part_size_bytes, checksum_algorithm,
                    metadata_sha256, source_size, source_part_checksums, source_validator
             FROM multipart_uploads WHERE item_id = $1").await?,
            &[&item_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let upload = MultipartRecord {
        endpoint: r.get(0),
        bucket: r.get(1),
        object_key: r.get(2),
        upload_id: r.get(3),
        part_size_bytes: r.get(4),
        checksum_algorithm: r.get(5),
        metadata_sha256: r.get(6),
        source: match (
            r.get::<_, Option<i64>>(7),
            r.get::<_, Option<Vec<String>>>(8),
        ) {
            (Some(size_bytes), Some(part_checksums)) => Some(SourceVersion {
                size_bytes,
                part_checksums,
                validator: r.get(9),
            }),
            _ => None,
        },
    };
    let parts = client
        .query(
            &client
                .prepare_cached(
                    "SELECT part_number, etag, checksum, size_bytes, sha256_state FROM upload_parts
             WHERE item_id = $1 ORDER BY part_number",
                )
                .await?,
            &[&item_id],
        )
        .await?
        .iter()
        .map(|r| PartRecord {
            part_number: r.get(0),
            etag: r.get(1),
            checksum: r.get(2),
            size_bytes: r.get(3),
            sha256_state: r.get(4),
        })
        .collect();
    Ok(Some((upload, parts)))
}

pub async fn save_multipart(
    client: &Client,
    item_id: i64,
    upload: &MultipartRecord,
) -> Result<(), StateError> {
    client
        .execute(
            &client.prepare_cached("INSERT INTO multipart_uploads (item_id, endpoint, bucket, object_key, upload_id,
                                            part_size_bytes, checksum_algorithm, metadata_sha256,
                                            source_size, source_part_checksums, source_validator)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)").await?,
            &[
                &item_id,
                &upload.endpoint,
                &upload.bucket,
                &upload.object_key,
                &upload.upload_id,
                &upload.part_size_bytes,
                &upload.checksum_algorithm,
                &upload.metadata_sha256,
                &upload.source.as_ref().map(|v| v.size_bytes),
                &upload.source.as_ref().map(|v| &v.part_checksums),
                &upload.source.as_ref().and_then(|v| v.validator.as_ref()),
            ],
        )
        .await?;
    Ok(())
}

pub async fn save_part(client: &Client, item_id: i64, part: &PartRecord) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached(
                    "INSERT INTO upload_parts (item_id, part_number, etag, checksum, size_bytes,
                                       sha256_state)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (item_id, part_number) DO UPDATE
               SET etag = excluded.etag, checksum = excluded.checksum,
                   size_bytes = excluded.size_bytes, sha256_state = excluded.sha256_state,
                   uploaded_at = now()",
                )
                .await?,
            &[
                &item_id,
                &part.part_number,
                &part.etag,
                &part.checksum,
                &part.size_bytes,
                &part.sha256_state,
            ],
        )
        .await?;
    Ok(())
}

pub async fn delete_part(
    client: &Client,
    item_id: i64,
    part_number: i32,
) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached("DELETE FROM upload_parts WHERE item_id = $1 AND part_number = $2")
                .await?,
            &[&item_id, &part_number],
        )
        .await?;
    Ok(())
}

/// Forgets an item's multipart upload (and its parts).
pub async fn delete_multipart(client: &Client, item_id: i64) -> Result<(), StateError> {
    client
        .execute(
            &client
                .prepare_cached("DELETE FROM multipart_uploads WHERE item_id = $1")
                .await?,
            &[&item_id],
        )
        .await?;
    Ok(())
}

/// Upload ids the database still considers live for `bucket`: the sweeper
/// leaves those alone.
pub async fn live_upload_ids(
    client: &Client,
    bucket: &str,
) -> Result<std::collections::HashSet<String>, StateError> {
    let rows = client
        .query(
            &client.prepare_cached("SELECT m.upload_id FROM multipart_uploads m JOIN upload_items i ON i.id = m.item_id
             WHERE m.bucket = $1 AND i.state IN ('pending', 'running')").await?,
            &[&bucket],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
