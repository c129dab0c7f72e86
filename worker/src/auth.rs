//! Who may call the worker's gRPC API: every call but health carries a
//! bearer token; the worker authenticates it with a TokenReview (audience
//! `stowage`) and authorizes the call with a SubjectAccessReview, so teams
//! grant access with ordinary Kubernetes Roles:
//!
//! - `Search.Query` on collection `ns/name`: verb `get` on the subresource
//!   `search` of `indexcollections.stowage.dev` `name` in namespace `ns`;
//! - `Ingest.Upload` and `Ingest.Status` in namespace `ns`: verb `create` on
//!   `uploadjobs.stowage.dev` in `ns` — streaming an object is what an
//!   UploadJob does, so whoever may create UploadJobs there may upload;
//! - `WorkerStatus.GetStatus`: verb `get` on the non-resource URL
//!   `/stowage.v1.WorkerStatus/GetStatus`.
//!
//! A denial never says whether the collection exists. Decisions are cached
//! for a few seconds, keyed by a hash of the token (the token itself is
//! never stored, logged or echoed). `--auth-mode none` turns all of this
//! off, loudly: for demos and single-user machines only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use tracing::{debug, warn};

/// The audience a token must be issued for.
pub const AUDIENCE: &str = "stowage";

/// How the worker checks callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// TokenReview + SubjectAccessReview against the Kubernetes API.
    Kubernetes,
    /// No checks at all: anyone who reaches the port may call anything.
    None,
}

/// What a call touches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Searching collection `name` of `namespace`.
    Search { namespace: String, name: String },
    /// Streaming objects into (or asking about uploads of) `namespace`.
    Ingest { namespace: String },
    /// Reading the worker's status.
    WorkerStatus,
}

impl Access {
    fn describe(&self) -> String {
        match self {
            Access::Search { namespace, name } => {
                format!("search indexcollection {namespace}/{name}")
            }
            Access::Ingest { namespace } => format!("upload into namespace {namespace}"),
            Access::WorkerStatus => "read the worker's status".into(),
        }
    }
}

/// A caller the API server vouched for.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

type TokenHash = [u8; 32];

pub struct Auth {
    mode: AuthMode,
    client: Option<kube::Client>,
    ttl: Duration,
    callers: Mutex<HashMap<TokenHash, (Instant, Option<Caller>)>>,
    decisions: Mutex<HashMap<(TokenHash, Access), (Instant, bool)>>,
}

impl Auth {
    /// `client` is required in [`AuthMode::Kubernetes`].
    pub fn new(mode: AuthMode, client: Option<kube::Client>, ttl: Duration) -> Self {
        if mode == AuthMode::None {
            warn!(
                "gRPC authentication is OFF (--auth-mode none): anyone who reaches the worker's \
                 port can search every collection and upload anywhere; use it for demos only"
            );
        }
        Auth {
            mode,
            client,
            ttl,
            callers: Mutex::default(),
            decisions: Mutex::default(),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Lets the call through if its bearer token's owner may do `access`:
    /// UNAUTHENTICATED without a valid token, PERMISSION_DENIED otherwise,
    /// never saying whether what it names exists.
    pub async fn check<T>(&self, request: &Request<T>, access: &Access) -> Result<(), Status> {
        if self.mode == AuthMode::None {
            return Ok(());
        }
        let token = bearer(request)?;
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        let caller = self.caller(&hash, token).await?;
        let key = (hash, access.clone());
        let cached = self
            .decisions
            .lock()
            .ok()
            .and_then(|d| d.get(&key).copied())
            .filter(|(at, _)| at.elapsed() < self.ttl);
        let allowed = match cached {
            Some((_, allowed)) => allowed,
            None => {
                let allowed = self.review_access(&caller, access).await?;
                if let Ok(mut d) = self.decisions.lock() {
                    d.retain(|_, (at, _)| at.elapsed() < self.ttl);
                    d.insert(key, (Instant::now(), allowed));
                }
                allowed
            }
        };
        if allowed {
            Ok(())
        } else {
            debug!(user = caller.username, access = ?access, "denied");
            Err(Status::permission_denied(format!(
                "{} may not {}",
                caller.username,
                access.describe()
            )))
        }
    }

    /// The caller behind `token`, from the cache or a TokenReview.
    async fn caller(&self, hash: &TokenHash, token: &str) -> Result<Caller, Status> {
        let cached = self
            .callers
            .lock()
            .ok()
            .and_then(|c| c.get(hash).cloned())
            .filter(|(at, _)| at.elapsed() < self.ttl);
        let caller = match cached {
            Some((_, caller)) => caller,
            None => {
                let caller = self.review_token(token).await?;
                if let Ok(mut c) = self.callers.lock() {
                    c.retain(|_, (at, _)| at.elapsed() < self.ttl);
                    c.insert(*hash, (Instant::now(), caller.clone()));
                }
                caller
            }
        };
        caller.ok_or_else(|| {
            Status::unauthenticated(format!(
                "the bearer token is not valid for audience {AUDIENCE:?} (expired, revoked, or \
                 issued for another audience)"
            ))
        })
    }

    fn client(&self) -> Result<&kube::Client, Status> {
        self.client.as_ref().ok_or_else(|| {
            Status::unavailable(
                "authentication needs the Kubernetes API, which this worker has not",
            )
        })
    }

    async fn review_token(&self, token: &str) -> Result<Option<Caller>, Status> {
        let api: kube::Api<TokenReview> = kube::Api::all(self.client()?.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.into()]),
            },
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("TokenReview", &e))?;
        let Some(status) = answer.status else {
            return Ok(None);
        };
        let audience_ok = status
            .audiences
            .as_ref()
            .is_none_or(|a| a.iter().any(|x| x == AUDIENCE));
        if status.authenticated != Some(true) || !audience_ok {
            return Ok(None);
        }
        let UserInfo {
            username,
            uid,
            groups,
            extra,
        } = status.user.unwrap_or_default();
        Ok(username.map(|username| Caller {
            username,
            uid,
            groups: groups.unwrap_or_default(),
            extra,
        }))
    }

    async fn review_access(&self, caller: &Caller, access: &Access) -> Result<bool, Status> {
        let api: kube::Api<SubjectAccessReview> = kube::Api::all(self.client()?.clone());
        let mut spec = SubjectAccessReviewSpec {
            user: Some(caller.username.clone()),
            uid: caller.uid.clone(),
            groups: Some(caller.groups.clone()),
            extra: caller.extra.clone(),
            ..Default::default()
        };
        match access {
            Access::Search { namespace, name } => {
                spec.resource_attributes = Some(ResourceAttributes {
                    namespace: Some(namespace.clone()),
                    verb: Some("get".into()),
                    group: Some("stowage.dev".into()),
                    resource: Some("indexcollections".into()),
                    subresource: Some("search".into()),
                    name: Some(name.clone()),
                    ..Default::default()
                });
            }
            Access::Ingest { namespace } => {
                spec.resource_attributes = Some(ResourceAttributes {
                    namespace: Some(namespace.clone()),
                    verb: Some("create".into()),
                    group: Some("stowage.dev".into()),
                    resource: Some("uploadjobs".into()),
                    ..Default::default()
                });
            }
            Access::WorkerStatus => {
                spec.non_resource_attributes = Some(NonResourceAttributes {
                    path: Some("/stowage.v1.WorkerStatus/GetStatus".into()),
                    verb: Some("get".into()),
                });
            }
        }
        let review = SubjectAccessReview {
            spec,
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("SubjectAccessReview", &e))?;
        Ok(answer
            .status
            .is_some_and(|s| s.allowed && s.denied != Some(true)))
    }
}

fn unavailable(what: &str, e: &kube::Error) -> Status {
    warn!(error = %e, "{what} failed");
    Status::unavailable(format!(
        "cannot check the caller's access right now ({what} failed); try again"
    ))
}

/// The bearer token of the call.
fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    let missing = || {
        Status::unauthenticated(
            "a bearer token is required (`authorization: Bearer <token>`, audience \"stowage\")",
        )
    };
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(missing)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_without_a_token_is_unauthenticated_and_none_lets_all_through() {
        let auth = Auth::new(AuthMode::Kubernetes, None, Duration::from_secs(1));
        let access = Access::WorkerStatus;
        let e = auth
            .check(&Request::new(()), &access)
            .await
            .expect_err("no token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", "Basic abc".parse().expect("header"));
        let e = auth.check(&r, &access).await.expect_err("not bearer");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let open = Auth::new(AuthMode::None, None, Duration::from_secs(1));
        assert!(open.check(&Request::new(()), &access).await.is_ok());
    }
}
