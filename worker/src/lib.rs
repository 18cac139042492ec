//! The fhirhaul worker: registers with the coordinators' leader, leases manifest files, downloads each
//! with the client core into local staging, keeping a checkpoint per file in sled so a
//! restarted worker resumes its own partial files with Range requests, then publishes the
//! verified file under the output directory and reports where it is.
//!
//! - [`WorkerSettings`] and [`run`]: the worker's life.
//! - `tokens`: the client core's `TokenProvider`, answered by the coordinator (a worker
//!   never sees a private key).
//! - `checkpoints`: the sled store of partial downloads.

mod checkpoints;
mod tokens;

use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::Category;
use fhirhaul_common::client::FhirClient;
use fhirhaul_common::clock::{Clock, Entropy};
use fhirhaul_common::download::{Checkpoint, DownloadOptions, DownloadSettings, download_file};
use fhirhaul_common::http::{Dialer, HttpTransport};
use fhirhaul_common::manifest::{FileKind, ManifestFile};
use fhirhaul_common::secret::Secret;
use fhirhaul_proto::connect::{Connector, Coordinators};
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::worker_service_client::WorkerServiceClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::checkpoints::CheckpointStore;
use crate::tokens::CoordinatorTokens;

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
    /// Where verified files are published (`<output_dir>/<job>/<Type>.<n>.ndjson`).
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
    /// Do file and checkpoint I/O on the worker's own tasks instead of other threads. Only
    /// for a deterministic simulation (see `DownloadOptions::inline_io`).
    pub inline_io: bool,
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

fn category_to_pb(category: Category) -> i32 {
    (match category {
        Category::Network => pb::FailureCategory::Network,
        Category::Throttled => pb::FailureCategory::Throttled,
        Category::Server => pb::FailureCategory::Server,
        Category::Rejected => pb::FailureCategory::Rejected,
        Category::Auth => pb::FailureCategory::Auth,
        Category::Protocol => pb::FailureCategory::Protocol,
        Category::Content => pb::FailureCategory::Content,
        Category::Timeout => pb::FailureCategory::Timeout,
        Category::Storage => pb::FailureCategory::Storage,
        Category::Config => pb::FailureCategory::Config,
        Category::Cancelled => pb::FailureCategory::Cancelled,
    }) as i32
}

/// A path inside the output tree, refusing anything that could leave it.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let candidate = Path::new(path);
    let fine = !path.is_empty() && candidate.components().all(|c| matches!(c, Component::Normal(_)));
    fine.then(|| candidate.to_path_buf())
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
    let store = CheckpointStore::open(&settings.state_dir.join("checkpoints"), settings.inline_io)?;
    let heartbeat_every = register(&coordinator, &settings, &cancel).await;
    let Some(heartbeat_every) = heartbeat_every else {
        return Ok(());
    };
    let tracker = TaskTracker::new();
    tracker.spawn(heartbeats(
        coordinator.clone(),
        settings.clone(),
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
            store: store.clone(),
        };
        let span = tracing::info_span!("slot", worker = %settings.name, slot);
        tracker.spawn(context.run(cancel.clone()).instrument(span));
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Registers, retrying until the coordinator answers. Returns the heartbeat interval.
async fn register(
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

async fn heartbeats(coordinator: Coordinator, settings: WorkerSettings, every: Duration, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let request = pb::HeartbeatRequest {
            worker_id: coordinator.worker_id.clone(),
            lease_ids: vec![],
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

struct SlotContext {
    coordinator: Coordinator,
    settings: WorkerSettings,
    transport: Arc<dyn HttpTransport>,
    clock: Arc<dyn Clock>,
    entropy: Entropy,
    store: CheckpointStore,
}

impl SlotContext {
    async fn run(self, cancel: CancellationToken) {
        loop {
            let request = pb::AcquireLeaseRequest {
                worker_id: self.coordinator.worker_id.clone(),
                wait_ms: self.settings.acquire_wait.as_millis() as u64,
            };
            let acquire = self.coordinator.call(request, |mut client, request| async move {
                client.acquire_lease(request).await
            });
            let acquired = tokio::select! {
                _ = cancel.cancelled() => return,
                acquired = acquire => acquired,
            };
            match acquired {
                Ok(response) => {
                    if let Some(lease) = response.lease {
                        let span = tracing::info_span!("lease", lease = %lease.lease_id, job = %lease.job_id, file = %lease.relative_path, generation = lease.generation);
                        let (job, file, generation) =
                            (lease.job_id.clone(), lease.relative_path.clone(), lease.generation);
                        let worker = self.coordinator.worker_id.clone();
                        // Holding starts and ends are events (not only a span) so a simulation
                        // can check that no two live workers hold one file in one generation.
                        tracing::debug!(%worker, %job, %file, generation, "lease held");
                        self.handle(lease, &cancel).instrument(span).await;
                        tracing::debug!(%worker, %job, %file, generation, "lease let go");
                    }
                }
                Err(status) => {
                    tracing::warn!(%status, "acquiring a lease failed");
                    if status.code() == tonic::Code::FailedPrecondition {
                        let _ = register(&self.coordinator, &self.settings, &cancel).await;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    async fn fail(&self, lease: &pb::Lease, category: i32, reason: String, released: bool) {
        let request = pb::FailLeaseRequest {
            worker_id: self.coordinator.worker_id.clone(),
            lease_id: lease.lease_id.clone(),
            generation: lease.generation,
            category,
            reason,
            released,
        };
        if let Err(status) = self
            .coordinator
            .call(request, |mut client, request| async move {
                client.fail_lease(request).await
            })
            .await
        {
            tracing::warn!(%status, "reporting the failure was refused");
        }
    }

    async fn handle(&self, lease: pb::Lease, shutdown: &CancellationToken) {
        let bad_lease = |reason: String| (category_to_pb(Category::Protocol), reason);
        let prepared = (|| {
            let relative = safe_relative(&lease.relative_path).ok_or_else(|| {
                bad_lease(format!(
                    "relative path `{}` leaves the output directory",
                    lease.relative_path
                ))
            })?;
            let url = lease
                .file_url
                .parse()
                .map_err(|e| bad_lease(format!("file URL is not a URL: {e}")))?;
            let base = lease
                .fhir_base_url
                .parse()
                .map_err(|e| bad_lease(format!("FHIR base is not a URL: {e}")))?;
            let allow: Vec<url::Url> = lease.token_allow_list.iter().filter_map(|u| u.parse().ok()).collect();
            Ok::<_, (i32, String)>((relative, url, base, allow))
        })();
        let (relative, url, base, allow) = match prepared {
            Ok(prepared) => prepared,
            Err((category, reason)) => return self.fail(&lease, category, reason, false).await,
        };
        let kind = match pb::FileKind::try_from(lease.kind).unwrap_or(pb::FileKind::Unspecified) {
            pb::FileKind::Deleted => FileKind::Deleted,
            pb::FileKind::Error => FileKind::Error,
            _ => FileKind::Output,
        };
        let file = ManifestFile {
            kind,
            resource_type: lease.resource_type.clone(),
            url,
            count: lease.expected_count,
        };
        let tokens = CoordinatorTokens::new(self.coordinator.clone(), lease.tenant.clone());
        let client = FhirClient::new(
            Arc::clone(&self.transport),
            base,
            Arc::new(tokens),
            &allow,
            Arc::clone(&self.clock),
            self.entropy.clone(),
        );
        let staging = self.settings.state_dir.join("staging").join(&relative);
        let key = lease.relative_path.clone();
        // Our own partial file from before a restart, if it is for this URL and still holds
        // every byte its checkpoint counts.
        let part = fhirhaul_common::download::part_path(&staging);
        let resume = self
            .store
            .get(&key, &lease.file_url)
            .filter(|c| c.offset > 0 && std::fs::metadata(&part).is_ok_and(|m| m.len() >= c.offset));
        match &resume {
            Some(checkpoint) => tracing::info!(
                offset = checkpoint.offset,
                "resuming a partial download from its checkpoint"
            ),
            // Starting from zero: forget any older checkpoint first (its partial file is
            // gone, or was finished but not published), so a crash before the first new
            // checkpoint cannot resume the new partial file at the old offset.
            None => {
                store_checkpoint(
                    &self.store,
                    &self.coordinator.worker_id,
                    &lease,
                    &key,
                    &Checkpoint::default(),
                )
                .await
            }
        }
        let (checkpoint_tx, checkpoint_rx) = watch::channel(resume.clone().unwrap_or_default());
        let download_cancel = shutdown.child_token();
        let fenced = CancellationToken::new();
        let keeper = tokio::spawn(keep_lease(
            self.coordinator.clone(),
            lease.clone(),
            self.store.clone(),
            key.clone(),
            checkpoint_rx,
            download_cancel.clone(),
            fenced.clone(),
        ));
        let options = DownloadOptions {
            resume,
            checkpoints: Some(checkpoint_tx),
            cancel: download_cancel.clone(),
            inline_io: self.settings.inline_io,
        };
        let result = download_file(
            &client,
            &file,
            lease.requires_access_token,
            &staging,
            &self.settings.download,
            options,
        )
        .await;
        download_cancel.cancel();
        let _ = keeper.await;
        if fenced.is_cancelled() {
            tracing::warn!("lease was taken over by another worker; dropping this attempt");
            return;
        }
        match result {
            Ok(outcome) => {
                // Confirm the lease is still ours right before publishing, so a worker that
                // was presumed dead does not overwrite the newer owner's file.
                let still_ours = pb::RenewLeaseRequest {
                    worker_id: self.coordinator.worker_id.clone(),
                    lease_id: lease.lease_id.clone(),
                    generation: lease.generation,
                    progress: Some(pb::Checkpoint {
                        offset: outcome.bytes,
                        lines: 0,
                        resources: outcome.resources,
                        etag: None,
                        last_modified: None,
                    }),
                };
                if let Err(status) = self
                    .coordinator
                    .call(still_ours, |mut client, request| async move {
                        client.renew_lease(request).await
                    })
                    .await
                {
                    tracing::warn!(%status, "lease no longer ours (or unreachable) at publish time; not publishing");
                    if status.code() != tonic::Code::Aborted {
                        self.fail(
                            &lease,
                            category_to_pb(Category::Network),
                            format!("could not confirm the lease: {}", status.message()),
                            false,
                        )
                        .await;
                    }
                    return;
                }
                let published = self.settings.output_dir.join(&relative);
                if let Err(error) = publish(&staging, &published, self.settings.inline_io).await {
                    return self
                        .fail(
                            &lease,
                            category_to_pb(Category::Storage),
                            format!("publishing {}: {error}", published.display()),
                            false,
                        )
                        .await;
                }
                let request = pb::CompleteLeaseRequest {
                    worker_id: self.coordinator.worker_id.clone(),
                    lease_id: lease.lease_id.clone(),
                    generation: lease.generation,
                    bytes: outcome.bytes,
                    resources: outcome.resources,
                    sha256: outcome.sha256.clone(),
                    location: published.display().to_string(),
                    issues: outcome.issues.clone(),
                };
                match self
                    .coordinator
                    .call(request, |mut client, request| async move {
                        client.complete_lease(request).await
                    })
                    .await
                {
                    Ok(_) => tracing::info!(
                        bytes = outcome.bytes,
                        resources = outcome.resources,
                        resumes = outcome.resumes,
                        "file done"
                    ),
                    Err(status) => tracing::warn!(%status, "completion refused"),
                }
                self.store.remove(&key);
            }
            Err(fhirhaul_common::Error::Cancelled) if shutdown.is_cancelled() => {
                // Shutting down: give the lease back; the checkpoint stays for a resume.
                self.fail(
                    &lease,
                    category_to_pb(Category::Cancelled),
                    "worker shutting down".into(),
                    true,
                )
                .await;
            }
            Err(error) => {
                if !error.is_retryable() {
                    self.store.remove(&key);
                }
                tracing::warn!(%error, "download failed");
                self.fail(&lease, category_to_pb(error.category()), error.to_string(), false)
                    .await;
            }
        }
    }
}

/// While a download runs: record each checkpoint, renew the lease with progress, and stop
/// the download if the coordinator says the lease is no longer ours.
/// Records a download's checkpoint durably, with an event (so a simulation can check that
/// checkpoints never move backwards).
async fn store_checkpoint(
    store: &CheckpointStore,
    worker: &str,
    lease: &pb::Lease,
    key: &str,
    checkpoint: &Checkpoint,
) {
    store.put(key, &lease.file_url, checkpoint).await;
    tracing::debug!(
        worker,
        job = %lease.job_id,
        file = %lease.relative_path,
        offset = checkpoint.offset,
        validator = ?checkpoint.validator,
        "checkpoint stored"
    );
}

async fn keep_lease(
    coordinator: Coordinator,
    lease: pb::Lease,
    store: CheckpointStore,
    key: String,
    mut checkpoints: watch::Receiver<Checkpoint>,
    download: CancellationToken,
    fenced: CancellationToken,
) {
    let renew_every = Duration::from_millis(lease.renew_every_ms.max(100));
    let mut renew = tokio::time::interval(renew_every);
    renew.tick().await;
    // A renewal may spend a while finding a new leader; checkpoints keep being recorded
    // meanwhile, and the next renewal starts only after this one ended.
    type Renewal<'a> =
        std::pin::Pin<Box<dyn Future<Output = Result<pb::RenewLeaseResponse, tonic::Status>> + Send + 'a>>;
    let mut renewal: Option<Renewal<'_>> = None;
    loop {
        tokio::select! {
            _ = download.cancelled() => return,
            changed = checkpoints.changed() => {
                if changed.is_err() { return }
                let checkpoint = checkpoints.borrow_and_update().clone();
                store_checkpoint(&store, &coordinator.worker_id, &lease, &key, &checkpoint).await;
            }
            _ = renew.tick(), if renewal.is_none() => {
                let checkpoint = checkpoints.borrow().clone();
                let request = pb::RenewLeaseRequest {
                    worker_id: coordinator.worker_id.clone(),
                    lease_id: lease.lease_id.clone(),
                    generation: lease.generation,
                    progress: Some(pb::Checkpoint {
                        offset: checkpoint.offset,
                        lines: checkpoint.lines,
                        resources: checkpoint.resources,
                        etag: None,
                        last_modified: None,
                    }),
                };
                renewal = Some(Box::pin(
                    coordinator.call(request, |mut client, request| async move { client.renew_lease(request).await }),
                ));
            }
            outcome = async { renewal.as_mut().expect("guarded").await }, if renewal.is_some() => {
                renewal = None;
                match outcome {
                    Ok(_) => {}
                    Err(status) if status.code() == tonic::Code::Aborted => {
                        tracing::warn!(%status, "lease renewal refused; stopping");
                        fenced.cancel();
                        download.cancel();
                        return;
                    }
                    Err(status) => tracing::warn!(%status, "lease renewal failed; will retry"),
                }
            }
        }
    }
}

/// Moves a verified file from staging to its published place (atomically when they share
/// a filesystem).
async fn publish(staging: &Path, published: &Path, inline_io: bool) -> std::io::Result<()> {
    if inline_io {
        if let Some(parent) = published.parent() {
            std::fs::create_dir_all(parent)?;
        }
        return std::fs::rename(staging, published);
    }
    if let Some(parent) = published.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    match tokio::fs::rename(staging, published).await {
        Ok(()) => Ok(()),
        Err(_) => {
            // Another filesystem: copy beside the target, then rename into place.
            let temporary = published.with_extension("publishing");
            tokio::fs::copy(staging, &temporary).await?;
            tokio::fs::rename(&temporary, published).await?;
            tokio::fs::remove_file(staging).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_cannot_leave_the_output_directory() {
        assert!(safe_relative("job-1/Patient.1.ndjson").is_some());
        assert!(safe_relative("job-1/deleted/Bundle.1.ndjson").is_some());
        assert!(safe_relative("../etc/passwd").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative("job-1/../../x").is_none());
        assert!(safe_relative("").is_none());
    }
}
