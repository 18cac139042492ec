//! The gRPC services: thin adapters that convert, call the [`Coordinator`], and convert
//! back. Every fhirhaul service sits behind one cluster-token interceptor
//! ([`ClusterAuth`]); errors become `tonic::Status` in one place
//! (`From<CoordinatorError> for Status`, in `error.rs`), carrying their category and
//! retryability.
//!
//! - [`worker`] serves `WorkerService`.
//! - [`admin`] serves `AdminService`.
//! - [`raft`] serves `RaftService`.
//! - [`convert`] puts the coordinator's state in protobuf form.

pub mod admin;
pub mod convert;
pub mod raft;
pub mod worker;

use fhirhaul_proto::auth::ClusterAuth;
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_server::AdminServiceServer;
use fhirhaul_proto::v1::raft_service_server::RaftServiceServer;
use fhirhaul_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use self::admin::AdminApi;
use self::raft::RaftApi;
use self::worker::WorkerApi;
use crate::node::Coordinator;
use crate::peers::MAX_RAFT_MESSAGE_BYTES;

/// A coordinator about to listen where anything on the network could call it, with
/// nothing to tell a worker from an intruder: anyone could `Register` and take a tenant's
/// EHR token with `GetToken`, or send raft messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to serve on {address} without authentication: set [cluster.tls] for mutual TLS, or a cluster token \
     in FHIRHAUL_CLUSTER_TOKEN (or both), or listen on a loopback address; \
     --insecure-no-auth-on-network overrides this, for a network you trust entirely"
)]
pub struct OpenToTheNetwork {
    pub address: std::net::SocketAddr,
}

/// Whether a coordinator may serve on `address`: on loopback always; anywhere else only
/// with mutual TLS or a cluster token, unless the operator said otherwise explicitly.
pub fn check_exposure(
    address: std::net::SocketAddr,
    mutual_tls: bool,
    cluster_token: bool,
    insecure_allowed: bool,
) -> Result<(), OpenToTheNetwork> {
    if address.ip().is_loopback() || mutual_tls || cluster_token || insecure_allowed {
        Ok(())
    } else {
        Err(OpenToTheNetwork { address })
    }
}

/// Serves the worker, admin and raft APIs, gRPC health and reflection on `listener` until
/// `cancel`, with mutual TLS when `tls` is given. Every call must carry the coordinator's
/// cluster token when it has one (the same one it sends to its peers). Plaintext is meant
/// for loopback only (a warning is logged otherwise).
pub async fn serve(
    coordinator: Coordinator,
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let address = listener.local_addr().ok();
    // Reflection lists every API without authentication: loopback only, unless asked.
    let reflection =
        coordinator.settings().reflection_beyond_loopback || address.is_some_and(|address| address.ip().is_loopback());
    if let Some(address) = address {
        match (&tls, address.ip().is_loopback()) {
            (Some(_), _) => tracing::info!(%address, "serving gRPC with mutual TLS"),
            (None, true) => tracing::info!(%address, "serving plaintext gRPC on loopback"),
            (None, false) => {
                tracing::warn!(%address, "serving gRPC WITHOUT TLS on a non-loopback address; configure [cluster.tls]")
            }
        }
    }
    // Small answers must not wait for Nagle's algorithm (~40 ms each): tonic sets
    // TCP_NODELAY only on sockets it accepts itself, not on an incoming stream.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
            }
        })
    });
    serve_incoming(coordinator, incoming, tls, reflection, cancel).await
}

/// [`serve`] over any stream of accepted connections (a simulated network's, say);
/// `reflection`: serve gRPC reflection too.
pub async fn serve_incoming<I, IO, IE>(
    coordinator: Coordinator,
    incoming: I,
    tls: Option<tonic::transport::ServerTlsConfig>,
    reflection: bool,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let auth = ClusterAuth::new(coordinator.settings().cluster_token.clone());
    if !auth.is_required() {
        tracing::info!("no cluster token configured: calls are not authenticated");
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    health_reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
    health_reporter.set_serving::<RaftServiceServer<RaftApi>>().await;
    let reflection = reflection.then(|| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| tracing::error!(%e, "reflection service unavailable"))
            .ok()
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let mut router = builder
        .add_service(health)
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(WorkerApi {
                coordinator: coordinator.clone(),
            }),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            RaftServiceServer::new(RaftApi {
                coordinator: coordinator.clone(),
            })
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            AdminServiceServer::new(AdminApi { coordinator }),
            auth,
        ));
    if let Some(reflection) = reflection.flatten() {
        router = router.add_service(reflection);
    }
    router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_is_closed_to_the_network_by_default() {
        let anywhere: std::net::SocketAddr = "0.0.0.0:7400".parse().unwrap();
        let host: std::net::SocketAddr = "10.0.0.5:7400".parse().unwrap();
        let loopback: std::net::SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let loopback6: std::net::SocketAddr = "[::1]:7400".parse().unwrap();
        for address in [anywhere, host] {
            let refused = check_exposure(address, false, false, false).unwrap_err();
            let message = refused.to_string();
            assert!(
                message.contains("[cluster.tls]") && message.contains("FHIRHAUL_CLUSTER_TOKEN"),
                "{message}"
            );
            assert!(check_exposure(address, true, false, false).is_ok(), "mutual TLS");
            assert!(check_exposure(address, false, true, false).is_ok(), "a cluster token");
            assert!(
                check_exposure(address, false, false, true).is_ok(),
                "the explicit override"
            );
        }
        assert!(check_exposure(loopback, false, false, false).is_ok());
        assert!(check_exposure(loopback6, false, false, false).is_ok());
    }
}
