//! The history of objects Stowage wrote: one row per version, the current
//! one per key, looked up by key or by content (dedup).

use deadpool_postgres::ClientWrapper as Client;
use tokio_postgres::Row;

use crate::state::StateError;

#[derive(Clone, Debug, PartialEq)]
pub struct ObjectRecord {
    pub bucket: String,
    pub object_key: String,
    pub version: i32,
    pub sha256_hex: String,
    pub size_bytes: i64,
}

/// A query of `objects` whose rows [`object_from_row`] reads; the rest of
/// the statement (WHERE, ORDER BY) given.
macro_rules! select_objects {
    ($rest:literal) => {
        concat!(
            "SELECT bucket, object_key, version, sha256_hex, size_bytes FROM objects ",
            $rest
        )
    };
}
pub(crate) use select_objects;

pub(crate) fn object_from_row(r: &Row) -> ObjectRecord {
    ObjectRecord {
        bucket: r.get(0),
        object_key: r.get(1),
        version: r.get(2),
        sha256_hex: r.get(3),
        size_bytes: r.get(4),
    }
}

pub async fn current_object(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Option<ObjectRecord>, StateError> {
    Ok(client
        .query_opt(
            &client
                .prepare_cached(select_objects!(
                    "WHERE bucket = $1 AND object_key = $2 AND current"
                ))
                .await?,
            &[&bucket, &key],
        )
        .await?
        .map(|r| object_from_row(&r)))
}

/// A current object in `bucket` with this content, to copy instead of upload.
pub async fn object_with_content(
    client: &Client,
    bucket: &str,
    sha256_hex: &str,
) -> Result<Option<ObjectRecord>, StateError> {
    Ok(client
        .query_opt(
            &client
                .prepare_cached(select_objects!(
                    "WHERE bucket = $1 AND sha256_hex = $2 AND current
             ORDER BY written_at LIMIT 1"
                ))
                .await?,
            &[&bucket, &sha256_hex],
        )
        .await?
        .map(|r| object_from_row(&r)))
}

pub async fn all_versions(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Vec<(ObjectRecord, Option<String>)>, StateError> {
    let rows = client
        .query(
            &client.prepare_cached("SELECT bucket, object_key, version, sha256_hex, size_bytes, archived_key FROM objects
             WHERE bucket = $1 AND object_key = $2 ORDER BY version").await?,
            &[&bucket, &key],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (object_from_row(r), r.get(5)))
        .collect())
}

pub struct ObjectWrite<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    pub etag: Option<&'a str>,
    /// Where the previous current version was preserved, if it was.
    pub archived_previous_to: Option<&'a str>,
}

/// The current object at `bucket`/`key` was deleted: its history keeps
/// every version, none current. Returns whether one was current.
pub async fn object_deleted(client: &Client, bucket: &str, key: &str) -> Result<bool, StateError> {
    let n = client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE objects SET current = false
                     WHERE bucket = $1 AND object_key = $2 AND current",
                )
                .await?,
            &[&bucket, &key],
        )
        .await?;
    Ok(n > 0)
}
