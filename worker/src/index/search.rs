//! `Search.Query`: answered from the collection's active generation
//! (vector, keyword or hybrid), the query embedded by that generation's own
//! model — during a model change, the old one until the new generation is
//! complete.

use std::sync::Arc;
use std::time::Instant;

use stowage_common::db::Client;
use stowage_common::state::collections;
use stowage_common::state::index::{
    self as store, Hit, MAX_TOP_K, Mode, Query, SearchError, Tuning,
};
use stowage_proto::v1::search_server::Search;
use stowage_proto::v1::{SearchHit, SearchMode, SearchRequest, SearchResponse};
use tonic::{Request, Response, Status};

use super::sync::embedder;
use crate::Context;

pub struct SearchService {
    pub ctx: Arc<Context>,
}

/// Results when a request does not say (`top_k` 0).
const DEFAULT_TOP_K: i64 = 10;
/// Longest query text accepted.
const MAX_QUERY_CHARS: usize = 4096;
/// Times a query is asked again when the generation it was embedded for
/// was replaced before it was answered.
const GENERATION_RACES: usize = 3;

impl SearchService {
    async fn answer(
        &self,
        db: &mut Client,
        collection_id: uuid::Uuid,
        mode: Mode,
        r: &SearchRequest,
        top_k: i64,
    ) -> Result<Vec<Hit>, Status> {
        let unavailable = |e: SearchError| match e {
            SearchError::NoIndex => Status::failed_precondition(e.to_string()),
            SearchError::Dimensions { .. }
            | SearchError::NoVector(_)
            | SearchError::TopK(_)
            | SearchError::Tuning(_) => Status::invalid_argument(e.to_string()),
            SearchError::State(_) => Status::unavailable(e.to_string()),
        };
        let active = async |db: &Client| {
            store::active_generation(db, collection_id)
                .await
                .map_err(|e| unavailable(e.into()))?
                .ok_or_else(|| unavailable(SearchError::NoIndex))
        };
        let mut generation = active(db).await?;
        for _ in 0..GENERATION_RACES {
            let vector = if mode == Mode::Keyword {
                None
            } else {
                let e = embedder(&self.ctx, &r.namespace, &generation.embedding)
                    .await
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                let t0 = Instant::now();
                let v = e
                    .embed_query(&r.query)
                    .await
                    .map_err(|e| Status::unavailable(format!("embedding the query: {e}")))?;
                self.ctx
                    .metrics
                    .query_embedding_seconds
                    .observe(t0.elapsed().as_secs_f64());
                Some(v)
            };
            let q = Query {
                mode,
                vector: vector.as_deref(),
                text: &r.query,
                top_k,
                key_prefix: Some(r.key_prefix.as_str()).filter(|p| !p.is_empty()),
                content_type: Some(r.content_type.as_str()).filter(|t| !t.is_empty()),
                tuning: Tuning::default(),
            };
            let hits = store::search_generation(db, &generation, &q)
                .await
                .map_err(unavailable)?;
            let now = active(db).await?;
            if now.id == generation.id {
                return Ok(hits);
            }
            // Replaced while we asked: the answer may be of a dropped
            // generation. Ask the new one.
            generation = now;
        }
        Err(Status::unavailable(
            "the collection's index kept changing generation; try again",
        ))
    }
}

/// Most characters of a namespace or collection name (a DNS subdomain).
const MAX_NAME_CHARS: usize = 253;

/// Judges a request before it reaches the database: what PostgreSQL cannot
/// store (a NUL byte) or nobody can mean is INVALID_ARGUMENT with the field,
/// not an UNAVAILABLE "database query failed".
fn validate(r: &SearchRequest) -> Result<(Mode, i64), Status> {
    let mode = match SearchMode::try_from(r.mode) {
        Ok(SearchMode::Hybrid) => Mode::Hybrid,
        Ok(SearchMode::Vector) => Mode::Vector,
        Ok(SearchMode::Keyword) => Mode::Keyword,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown search mode {}",
                r.mode
            )));
        }
    };
    for (field, value, max) in [
        ("namespace", &r.namespace, MAX_NAME_CHARS),
        ("collection", &r.collection, MAX_NAME_CHARS),
        (
            "key_prefix",
            &r.key_prefix,
            stowage_common::spec::MAX_KEY_BYTES,
        ),
        ("content_type", &r.content_type, MAX_NAME_CHARS),
    ] {
        if value.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "{field} contains a control character"
            )));
        }
        if value.chars().count() > max {
            return Err(Status::invalid_argument(format!(
                "{field} is longer than {max} characters"
            )));
        }
    }
    if r.namespace.is_empty() || r.collection.is_empty() {
        return Err(Status::invalid_argument(
            "namespace and collection are required",
        ));
    }
    if r.query.contains('\0') {
        return Err(Status::invalid_argument("query contains a NUL character"));
    }
    if r.query.trim().is_empty() {
        return Err(Status::invalid_argument("query is empty"));
    }
    if r.query.chars().count() > MAX_QUERY_CHARS {
        return Err(Status::invalid_argument(format!(
            "query is longer than {MAX_QUERY_CHARS} characters"
        )));
    }
    let top_k = match i64::from(r.top_k) {
        0 => DEFAULT_TOP_K,
        k @ 1..=MAX_TOP_K => k,
        k => {
            return Err(Status::invalid_argument(format!(
                "top_k {k} is above the maximum, {MAX_TOP_K} (0 means {DEFAULT_TOP_K})"
            )));
        }
    };
    Ok((mode, top_k))
}

fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Vector => "vector",
        Mode::Keyword => "keyword",
        Mode::Hybrid => "hybrid",
    }
}

#[tonic::async_trait]
impl Search for SearchService {
    async fn query(
        &self,
        request: Request<SearchRequest>,
    ) -> Result<Response<SearchResponse>, Status> {
        let t0 = Instant::now();
        let (mode, top_k) = validate(request.get_ref())?;
        // Before anything is looked up: a denial says nothing of whether
        // the collection exists.
        self.ctx
            .auth
            .check(
                &request,
                &crate::auth::Access::Search {
                    namespace: request.get_ref().namespace.clone(),
                    name: request.get_ref().collection.clone(),
                },
            )
            .await?;
        let r = request.into_inner();
        let mut db = self
            .ctx
            .db
            .get()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let collection = collections::find_by_name(&db, &r.namespace, &r.collection)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no IndexCollection {}/{}",
                    r.namespace, r.collection
                ))
            })?;
        let hits = self.answer(&mut db, collection.id, mode, &r, top_k).await?;
        drop(db);
        self.ctx
            .metrics
            .search(mode_label(mode), t0.elapsed().as_secs_f64());
        let bucket = collection.spec.source.bucket.clone();
        Ok(Response::new(SearchResponse {
            hits: hits
                .into_iter()
                .map(|h| SearchHit {
                    bucket: bucket.clone(),
                    key: h.object_key,
                    text: h.content,
                    content_type: h.content_type.unwrap_or_default(),
                    byte_start: h.byte_start as u32,
                    byte_end: h.byte_end as u32,
                    char_start: h.char_start as u32,
                    char_end: h.char_end as u32,
                    heading_path: h.heading_path,
                    score: h.score,
                    vector_rank: h.vector_rank.unwrap_or_default(),
                    keyword_rank: h.keyword_rank.unwrap_or_default(),
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &str) -> SearchRequest {
        SearchRequest {
            namespace: "team-a".into(),
            collection: "kb".into(),
            query: query.into(),
            ..Default::default()
        }
    }

    #[test]
    fn hostile_requests_are_invalid_arguments_that_name_the_field() {
        let cases: Vec<(SearchRequest, &str)> = vec![
            (request("a\0b"), "query contains a NUL"),
            (
                SearchRequest {
                    collection: "k\0b".into(),
                    ..request("q")
                },
                "collection contains a control",
            ),
            (
                SearchRequest {
                    namespace: "t\0".into(),
                    ..request("q")
                },
                "namespace contains a control",
            ),
            (
                SearchRequest {
                    key_prefix: "a\0".into(),
                    ..request("q")
                },
                "key_prefix contains a control",
            ),
            (
                SearchRequest {
                    content_type: "\0".into(),
                    ..request("q")
                },
                "content_type contains a control",
            ),
            (
                SearchRequest {
                    collection: "k".repeat(254),
                    ..request("q")
                },
                "collection is longer than 253",
            ),
            (
                SearchRequest {
                    collection: String::new(),
                    ..request("q")
                },
                "namespace and collection are required",
            ),
            (request("   "), "query is empty"),
            (request(&"x".repeat(4097)), "longer than 4096"),
            (
                SearchRequest {
                    top_k: 101,
                    ..request("q")
                },
                "top_k 101 is above the maximum, 100",
            ),
            (
                SearchRequest {
                    mode: 99,
                    ..request("q")
                },
                "unknown search mode 99",
            ),
        ];
        for (r, want) in cases {
            let e = validate(&r).expect_err(want);
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{want}");
            assert!(e.message().contains(want), "{want}: {}", e.message());
        }
        assert_eq!(
            validate(&request("how do I\tresume?")).map(|(_, k)| k).ok(),
            Some(10)
        );
    }
}
