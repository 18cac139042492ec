//! fhirhaul's roles assembled in one process. [`serve_coordinator`] starts a coordinator
//! and serves its gRPC APIs on a listener (what `fhirhaul coordinator` runs);
//! [`Embedded`] is the one-process cluster `fhirhaul run` starts: a one-node coordinator on
//! a loopback port and local workers talking to it over gRPC, exactly as a multi-machine
//! cluster's would. The binary only parses arguments and prints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::clock::{Clock, Entropy};
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::download::DownloadSettings;
use fhirhaul_common::http::HttpTransport;
use fhirhaul_common::offload::Offload;
use fhirhaul_common::output::{Summary, write_summary};
use fhirhaul_common::secret::Secret;
use fhirhaul_coordinator::node::{Coordinator, CoordinatorError, CoordinatorSettings};
use fhirhaul_worker::WorkerSettings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("starting the coordinator: {0}")]
    Coordinator(#[from] CoordinatorError),
    #[error("binding a loopback port for the coordinator: {0}")]
    Bind(#[source] std::io::Error),
    #[error(transparent)]
    Client(#[from] fhirhaul_common::Error),
}

/// Starts a coordinator and serves its worker, admin and raft APIs on `listener` (mutual
/// TLS when `tls` is given) until `cancel`. The server runs under `tracker`.
#[allow(clippy::too_many_arguments)]
pub async fn serve_coordinator(
    tenants: Vec<TenantConfig>,
    settings: CoordinatorSettings,
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    transport: Arc<dyn HttpTransport>,
    clock: Arc<dyn Clock>,
    entropy: Entropy,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Coordinator, CoordinatorError> {
    let coordinator = Coordinator::start(settings, tenants, transport, clock, entropy, cancel.clone()).await?;
    let serving = coordinator.clone();
    tracker.spawn(async move {
        if let Err(error) = fhirhaul_coordinator::grpc::serve(serving, listener, tls, cancel).await {
            tracing::error!(%error, "gRPC server stopped");
        }
    });
    Ok(coordinator)
}

/// A worker's settings with fhirhaul's defaults.
pub fn worker_settings(
    coordinators: Vec<String>,
    name: String,
    concurrency: u32,
    output_dir: PathBuf,
    state_dir: PathBuf,
    cluster_token: Option<Secret>,
) -> WorkerSettings {
    WorkerSettings {
        tls: None,
        dialer: None,
        offload: Offload::Threads,
        coordinators,
        name,
        concurrency,
        output_dir,
        state_dir,
        download: DownloadSettings::default(),
        cluster_token,
        acquire_wait: Duration::from_secs(10),
    }
}

/// What the one-process cluster is made of.
#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    pub tenant: TenantConfig,
    /// The coordinator's raft log and each worker's staging and checkpoints.
    pub state_dir: PathBuf,
    /// Where workers publish verified files (`<output_dir>/<job>/…`).
    pub output_dir: PathBuf,
    pub workers: u32,
    /// Carried by every call when set (the coordinator listens on loopback only).
    pub cluster_token: Option<Secret>,
}

/// A coordinator and local workers in this process. Its state lives in
/// `EmbeddedSettings::state_dir`: started again on the same directory, the coordinator
/// carries on with an unfinished export (same status URL, no new kick-off) and the workers
/// resume their partial files.
pub struct Embedded {
    coordinator: Coordinator,
    address: String,
    tenant: String,
    /// The coordinator's server, and the workers.
    servers: TaskTracker,
    workers: TaskTracker,
    stop_workers: CancellationToken,
    stop_coordinator: CancellationToken,
}

impl Embedded {
    /// Starts the coordinator on a loopback port (plaintext: nothing leaves the machine)
    /// and the workers, each with an equal share of the tenant's download concurrency. It
    /// runs until [`Embedded::shutdown`].
    pub async fn start(
        settings: EmbeddedSettings,
        transport: Arc<dyn HttpTransport>,
        clock: Arc<dyn Clock>,
        entropy: Entropy,
    ) -> Result<Embedded, EmbeddedError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(EmbeddedError::Bind)?;
        let address = format!("http://{}", listener.local_addr().map_err(EmbeddedError::Bind)?);
        let (servers, workers) = (TaskTracker::new(), TaskTracker::new());
        let (stop_workers, stop_coordinator) = (CancellationToken::new(), CancellationToken::new());
        let coordinator_settings = CoordinatorSettings {
            data_dir: settings.state_dir.join("coordinator"),
            cluster_token: settings.cluster_token.clone(),
            ..CoordinatorSettings::default()
        };
        let coordinator = serve_coordinator(
            vec![settings.tenant.clone()],
            coordinator_settings,
            listener,
            None,
            Arc::clone(&transport),
            Arc::clone(&clock),
            entropy.clone(),
            &servers,
            stop_coordinator.clone(),
        )
        .await?;
        let worker_count = settings.workers.max(1);
        let per_worker = (settings.tenant.export.concurrency as u32)
            .div_ceil(worker_count)
            .max(1);
        for index in 1..=worker_count {
            let worker = worker_settings(
                vec![address.clone()],
                format!("local-{index}"),
                per_worker,
                settings.output_dir.clone(),
                settings.state_dir.join(format!("worker-{index}")),
                settings.cluster_token.clone(),
            );
            let (transport, clock, entropy, cancel) = (
                Arc::clone(&transport),
                Arc::clone(&clock),
                entropy.clone(),
                stop_workers.clone(),
            );
            workers.spawn(async move {
                if let Err(error) = fhirhaul_worker::run(worker, transport, clock, entropy, cancel).await {
                    tracing::error!(%error, "a local worker stopped");
                }
            });
        }
        Ok(Embedded {
            coordinator,
            address,
            tenant: settings.tenant.name.clone(),
            servers,
            workers,
            stop_workers,
            stop_coordinator,
        })
    }

    /// The tenant's oldest export that has not ended (left by an earlier run that was
    /// stopped): its job id.
    pub async fn unfinished(&self) -> Result<Option<String>, EmbeddedError> {
        let tenant = self.tenant.clone();
        Ok(self
            .coordinator
            .read_linearizable(move |state| {
                state
                    .jobs
                    .values()
                    .filter(|job| job.tenant == tenant && !job.phase.is_final())
                    .min_by_key(|job| job.submitted_ms)
                    .map(|job| job.id.clone())
            })
            .await?)
    }

    /// The tenant's incremental cursor: the `_since` its next incremental export will use.
    pub async fn cursor(&self) -> Result<Option<String>, EmbeddedError> {
        let tenant = self.tenant.clone();
        Ok(self
            .coordinator
            .read_linearizable(move |state| state.tenant_since.get(&tenant).cloned())
            .await?)
    }

    /// Cancels a job (its export is DELETEd at the EHR).
    pub async fn cancel(&self, job_id: &str) -> Result<(), EmbeddedError> {
        Ok(self.coordinator.cancel(job_id).await?)
    }

    /// The coordinator's gRPC address (`http://127.0.0.1:<port>`).
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Submits the tenant's configured export; returns its job id.
    pub async fn submit(&self) -> Result<String, EmbeddedError> {
        let job_id = self.coordinator.submit(&self.tenant, None, false, None).await?.job_id;
        Ok(job_id)
    }

    /// Writes the job's `summary.json` into its export's directory under `output_root`;
    /// returns the summary and that directory.
    pub async fn write_summary(
        &self,
        job_id: &str,
        output_root: &std::path::Path,
    ) -> Result<(Summary, PathBuf), EmbeddedError> {
        let job = self.coordinator.job(job_id).await?;
        let dir = output_root.join(job.output_dir());
        let summary = job.summary();
        write_summary(&dir, &summary, Offload::Threads).await?;
        Ok((summary, dir))
    }

    /// Stops the workers first (they give their leases back to the coordinator, which is
    /// still there to take them; checkpoints stay), then the coordinator, and waits until
    /// every task has ended.
    pub async fn shutdown(self) {
        self.stop_workers.cancel();
        self.workers.close();
        self.workers.wait().await;
        self.stop_coordinator.cancel();
        self.servers.close();
        self.servers.wait().await;
        self.coordinator.drained().await;
    }
}
