//! The worker's gRPC server: WorkerStatus, Search, Ingest, standard health and
//! (only without authentication) reflection. Every call but health is
//! checked by [`crate::auth`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use stowage_proto::v1::worker_status_server::{WorkerStatus, WorkerStatusServer};
use stowage_proto::v1::{GetStatusRequest, GetStatusResponse, InFlightTask};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::Context;

struct StatusService {
    ctx: Arc<Context>,
}

#[tonic::async_trait]
impl WorkerStatus for StatusService {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let ctx = &self.ctx;
        ctx.auth
            .check(&request, &crate::auth::Access::WorkerStatus)
            .await?;
        Ok(Response::new(GetStatusResponse {
            worker_id: ctx.worker_id.clone(),
            capacity: ctx.capacity as u32,
            draining: ctx.draining.load(Ordering::Relaxed),
            in_flight: ctx
                .in_flight
                .snapshot()
                .into_iter()
                .map(|t| InFlightTask {
                    task_id: t.task_id,
                    kind: t.kind.into(),
                    bytes_done: t.bytes_done.load(Ordering::Relaxed),
                    running_seconds: t.started.elapsed().as_secs(),
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }
}

/// Serves gRPC on `addr` until `shutdown` turns true, over TLS when `tls`
/// is given; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    tls: Option<crate::tls::ServerTls>,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkerStatusServer<StatusService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(stowage_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Reflection tells anyone the API's shape: only where anyone may call
    // it anyway.
    let reflection = (ctx.auth.mode() == crate::auth::AuthMode::None).then_some(reflection);
    let router = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            undecodable_is_invalid_argument,
        ))
        .add_service(health)
        .add_optional_service(reflection)
        .add_service(WorkerStatusServer::new(StatusService {
            ctx: Arc::clone(&ctx),
        }))
        .add_service(stowage_proto::v1::search_server::SearchServer::new(
            crate::index::search::SearchService {
                ctx: Arc::clone(&ctx),
            },
        ))
        .add_service(
            stowage_proto::v1::ingest_server::IngestServer::new(crate::ingest::IngestService::new(
                Arc::clone(&ctx),
            ))
            // A data message of the limit, plus its framing; a header is
            // far smaller.
            .max_decoding_message_size(ctx.ingest.max_message_bytes as usize + 1024),
        );
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
        health_reporter
            .set_not_serving::<WorkerStatusServer<StatusService>>()
            .await;
    };
    let server: futures::future::BoxFuture<'static, Result<(), tonic::transport::Error>> = match tls
    {
        None => {
            Box::pin(router.serve_with_incoming_shutdown(tokio_stream_listener(listener), stop))
        }
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener), stop)),
    };
    let handle = tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    Ok((bound, handle))
}

/// A request that does not decode (a string field that is not UTF-8, say)
/// is the caller's mistake: INVALID_ARGUMENT, not the INTERNAL that tonic
/// answers for every decode error.
fn undecodable_is_invalid_argument(
    mut response: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let internal = headers.get("grpc-status").is_some_and(|s| s == "13");
    let undecodable = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| {
            m.starts_with("failed%20to%20decode") || m.starts_with("failed to decode")
        });
    if internal && undecodable {
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("3"),
        );
    }
    response
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
