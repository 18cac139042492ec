//! The fhirhaul worker: registers with the coordinators' leader, leases manifest files, downloads each
//! with the client core into local staging, keeping a checkpoint per file in sled so a
//! restarted worker resumes its own partial files with Range requests, then publishes the
//! verified file under the output directory and reports where it is.
//!
//! - [`WorkerSettings`] and [`run`]: the worker's life (register, heartbeat, slots).
//! - `slot`: one download slot: lease a file, download, verify, publish, report.
//! - `tokens`: the client core's `TokenProvider`, answered by the coordinator (a worker
//!   never sees a private key).
//! - [`checkpoints`]: the store of partial downloads (sled on disk, or in memory).
//! - [`sink`]: where verified files are published (a local directory first).

pub mod checkpoints;
pub mod sink;
mod slot;
mod tokens;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::clock::{Clock, Entropy};
use fhirhaul_common::download::DownloadSettings;
use fhirhaul_common::http::{Dialer, HttpTransport};
use fhirhaul_common::offload::Offload;
use fhirhaul_common::secret::Secret;
use fhirhaul_proto::connect::{Connector, Coordinators};
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::checkpoints::SledCheckpoints;
use crate::sink::LocalDirectory;
use crate::slot::SlotContext;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Address(#[from] fhirhaul_proto::connect::ConnectError),
    #[error("checkpoint store at {path}: {reason}")]
    Checkpoints { path: PathBuf, reason: String },
}

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerSettings {
    /// `http://host:port` of every coordinator (calls go to the raft leader).
    pub coordinators: Vec<String>,
    /// Stable name: a restarted worker with the same name gets its partial files back.
    pub name: String,
    pub concurrency: u32,
    /// Where verified files are published (`<output_dir>/<tenant>/<export id>/<Type>.<n>.ndjson`).
    pub output_dir: PathBuf,
    /// Local staging and the checkpoint store.
    pub state_dir: PathBuf,
    pub download: DownloadSettings,
    pub cluster_token: Option<Secret>,
    /// How long one AcquireLease call waits for work.
    pub acquire_wait: Duration,
    /// Mutual TLS to the coordinator (the address must then be `https://`).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// How to reach the coordinator; the OS network when `None` (a simulation passes its own).
    pub dialer: Option<Arc<dyn Dialer>>,
    /// Where file and checkpoint I/O runs: other threads, or (only for a deterministic
    /// simulation) the worker's own tasks.
    pub offload: Offload,
}

impl std::fmt::Debug for WorkerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSettings")
            .field("coordinators", &self.coordinators)
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("output_dir", &self.output_dir)
            .field("state_dir", &self.state_dir)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The coordinators, with calls routed to the leader and the cluster token on each.
#[derive(Clone)]
pub(crate) struct Coordinator {
    coordinators: Coordinators,
    pub(crate) worker_id: String,
}

impl Coordinator {
    /// One call to the leader (following redirects and failovers, see
    /// [`Coordinators::call`]); `message` is sent again on each attempt.
    pub(crate) async fn call<T, R, F, Fut>(&self, message: T, call: F) -> Result<R, tonic::Status>
    where
        T: Clone,
        F: Fn(WorkerServiceClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.coordinators
            .call(|channel| {
                call(
                    WorkerServiceClient::new(channel),
                    self.coordinators.request(message.clone()),
                )
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Runs the worker until `cancel`: then it stops taking leases, gives back the ones it
/// holds (their checkpoints stay for a resume) and returns.
pub async fn run(
    settings: WorkerSettings,
    transport: Arc<dyn HttpTransport>,
    clock: Arc<dyn Clock>,
    entropy: Entropy,
    cancel: CancellationToken,
) -> Result<(), WorkerError> {
    let connector = Connector {
        tls: settings.tls.clone(),
        dialer: settings.dialer.clone(),
        // Every call has a deadline (the long-poll's wait plus slack).
        timeout: settings.acquire_wait + Duration::from_secs(15),
        ..Connector::default()
    };
    let coordinator = Coordinator {
        coordinators: Coordinators::new(&settings.coordinators, connector, settings.cluster_token.clone())?,
        worker_id: settings.name.clone(),
    };
    let store = Arc::new(SledCheckpoints::open(
        &settings.state_dir.join("checkpoints"),
        settings.offload,
    )?);
    let sink = Arc::new(LocalDirectory::new(settings.output_dir.clone(), settings.offload));
    let heartbeat_every = register(&coordinator, &settings, &cancel).await;
    let Some(heartbeat_every) = heartbeat_every else {
        return Ok(());
    };
    let tracker = TaskTracker::new();
    let held = HeldLeases::default();
    let tokens = Arc::new(tokens::TokenCache::default());
    tracker.spawn(heartbeats(
        coordinator.clone(),
        settings.clone(),
        held.clone(),
        heartbeat_every,
        cancel.clone(),
    ));
    for slot in 0..settings.concurrency.max(1) {
        let context = SlotContext {
            coordinator: coordinator.clone(),
            settings: settings.clone(),
            transport: Arc::clone(&transport),
            clock: Arc::clone(&clock),
            entropy: entropy.clone(),
            store: Arc::clone(&store) as _,
            sink: Arc::clone(&sink) as _,
            held: held.clone(),
            tokens: Arc::clone(&tokens),
            throttled: Arc::default(),
        };
        let span = tracing::info_span!("slot", worker = %settings.name, slot);
        tracker.spawn(context.run(cancel.clone()).instrument(span));
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Registers, retrying until the coordinator answers. Returns the heartbeat interval.
pub(crate) async fn register(
    coordinator: &Coordinator,
    settings: &WorkerSettings,
    cancel: &CancellationToken,
) -> Option<Duration> {
    let mut delay = Duration::from_millis(100);
    loop {
        let request = pb::RegisterRequest {
            name: settings.name.clone(),
            concurrency: settings.concurrency,
        };
        match coordinator
            .call(
                request,
                |mut client, request| async move { client.register(request).await },
            )
            .await
        {
            Ok(response) => {
                let interval = Duration::from_millis(response.heartbeat_interval_ms.max(100));
                tracing::info!(worker = %settings.name, "registered with the coordinator");
                return Some(interval);
            }
            Err(status) => tracing::warn!(worker = %settings.name, %status, "cannot register yet; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The leases this worker's slots hold right now, reported with every heartbeat so the
/// coordinator can reclaim a grant whose answer never arrived.
#[derive(Clone, Default)]
pub(crate) struct HeldLeases(Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>);

impl HeldLeases {
    pub(crate) fn hold(&self, lease_id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(lease_id.to_string());
    }

    pub(crate) fn let_go(&self, lease_id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(lease_id);
    }

    fn now(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

async fn heartbeats(
    coordinator: Coordinator,
    settings: WorkerSettings,
    held: HeldLeases,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let request = pb::HeartbeatRequest {
            worker_id: coordinator.worker_id.clone(),
            lease_ids: held.now(),
            reports_leases: true,
        };
        if let Err(status) = coordinator
            .call(
                request,
                |mut client, request| async move { client.heartbeat(request).await },
            )
            .await
        {
            tracing::warn!(%status, "heartbeat failed");
            if status.code() == tonic::Code::FailedPrecondition {
                // The coordinator does not know us (its state was reset): join again.
                let _ = register(&coordinator, &settings, &cancel).await;
            }
        }
    }
}
