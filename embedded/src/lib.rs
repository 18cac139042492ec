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

/// A coordinator and local workers in this process.
pub struct Embedded {
    coordinator: Coordinator,
    address: String,
    tenant: String,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Embedded {
    /// Starts the coordinator on a loopback port (plaintext: nothing leaves the machine)
    /// and the workers, each with an equal share of the tenant's download concurrency.
    pub async fn start(
        settings: EmbeddedSettings,
        transport: Arc<dyn HttpTransport>,
        clock: Arc<dyn Clock>,
        entropy: Entropy,
        cancel: CancellationToken,
    ) -> Result<Embedded, EmbeddedError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(EmbeddedError::Bind)?;
        let address = format!("http://{}", listener.local_addr().map_err(EmbeddedError::Bind)?);
        let tracker = TaskTracker::new();
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
            &tracker,
            cancel.clone(),
        )
        .await?;
        let workers = settings.workers.max(1);
        let per_worker = (settings.tenant.export.concurrency as u32).div_ceil(workers).max(1);
        for index in 1..=workers {
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
                cancel.clone(),
            );
            tracker.spawn(async move {
                if let Err(error) = fhirhaul_worker::run(worker, transport, clock, entropy, cancel).await {
                    tracing::error!(%error, "a local worker stopped");
                }
            });
        }
        Ok(Embedded {
            coordinator,
            address,
            tenant: settings.tenant.name.clone(),
            tracker,
            cancel,
        })
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
        let (job_id, _) = self.coordinator.submit(&self.tenant, None, false, None).await?;
        Ok(job_id)
    }

    /// Writes the job's `summary.json` into `dir` and returns it.
    pub async fn write_summary(&self, job_id: &str, dir: &std::path::Path) -> Result<Summary, EmbeddedError> {
        let summary = self.coordinator.job(job_id).await?.summary();
        write_summary(dir, &summary, Offload::Threads).await?;
        Ok(summary)
    }

    /// Stops the workers (they give their leases back; checkpoints stay) and the
    /// coordinator, and waits until every task has ended.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.coordinator.drained().await;
    }
}
