//! One download slot of a worker: long-poll for a lease, download the file with the
//! client core into staging (checkpointing as it goes and renewing the lease with
//! progress), confirm the lease is still ours, publish through the [`Sink`], and report
//! the outcome with its category and retryability.

use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::Category;
use fhirhaul_common::client::FhirClient;
use fhirhaul_common::clock::{Clock, Entropy};
use fhirhaul_common::download::{Checkpoint, DownloadOptions, download_file};
use fhirhaul_common::http::HttpTransport;
use fhirhaul_common::manifest::ManifestFile;
use fhirhaul_proto::convert::{category_to_wire, file_kind_from_wire};
use fhirhaul_proto::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::checkpoints::CheckpointStore;
use crate::sink::{ExportDir, Sink, SinkError};
use crate::tokens::{CoordinatorTokens, TokenCache};
use crate::{Coordinator, HeldLeases, WorkerSettings, register};

/// The export's directory a file lies in: `<tenant>/<export id>` of
/// `<tenant>/<export id>/[deleted/|error/]<Type>.<n>.ndjson` (the parent, for a shorter
/// path written before export ids existed).
pub(crate) fn export_dir(relative: &Path) -> PathBuf {
    if relative.components().count() >= 3 {
        relative.components().take(2).collect()
    } else {
        relative.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// A path inside the output tree, refusing anything that could leave it.
pub(crate) fn safe_relative(path: &str) -> Option<PathBuf> {
    let candidate = Path::new(path);
    let fine = !path.is_empty() && candidate.components().all(|c| matches!(c, Component::Normal(_)));
    fine.then(|| candidate.to_path_buf())
}

pub(crate) struct SlotContext {
    pub coordinator: Coordinator,
    pub settings: WorkerSettings,
    pub transport: Arc<dyn HttpTransport>,
    pub clock: Arc<dyn Clock>,
    pub entropy: Entropy,
    pub store: Arc<dyn CheckpointStore>,
    pub sink: Arc<dyn Sink>,
    pub held: HeldLeases,
    /// Each tenant's token, shared by the worker's slots.
    pub tokens: Arc<TokenCache>,
    /// The EHR's 429/503 answers to this slot's downloads, reported (and reset) with each
    /// lease call so the coordinator can pace the tenant.
    pub throttled: Arc<std::sync::atomic::AtomicU64>,
}

/// Throttled answers counted since the last report, and the count reset.
fn take_throttled(counter: &std::sync::atomic::AtomicU64) -> u32 {
    counter
        .swap(0, std::sync::atomic::Ordering::Relaxed)
        .min(u64::from(u32::MAX)) as u32
}

impl SlotContext {
    pub async fn run(self, cancel: CancellationToken) {
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
                        let lease_id = lease.lease_id.clone();
                        self.held.hold(&lease_id);
                        self.handle(lease, &cancel).instrument(span).await;
                        self.held.let_go(&lease_id);
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

    async fn fail(&self, lease: &pb::Lease, failure: Failure) {
        let request = pb::FailLeaseRequest {
            worker_id: self.coordinator.worker_id.clone(),
            lease_id: lease.lease_id.clone(),
            generation: lease.generation,
            category: category_to_wire(failure.category),
            reason: failure.reason,
            released: failure.released,
            retryable: Some(failure.retryable),
            throttled: take_throttled(&self.throttled),
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

    /// Asks the coordinator for a fresh link to the leased file, and moves the file's
    /// checkpoint to it, so the download resumes where it was.
    async fn renew_link(
        &self,
        lease: &pb::Lease,
        key: &str,
    ) -> Result<(pb::RenewLinkResponse, url::Url), fhirhaul_common::Error> {
        let request = pb::RenewLinkRequest {
            worker_id: self.coordinator.worker_id.clone(),
            lease_id: lease.lease_id.clone(),
            generation: lease.generation,
            failed_url: lease.file_url.clone(),
        };
        let renewed = self
            .coordinator
            .call(request, |mut client, request| async move {
                client.renew_link(request).await
            })
            .await
            .map_err(|status| fhirhaul_proto::convert::error_from_status(&status, "the coordinator"))?;
        let url = renewed.file_url.parse().map_err(|e| fhirhaul_common::Error::Protocol {
            url: fhirhaul_common::url_util::SafeUrl::from(renewed.file_url.as_str()),
            reason: format!("the renewed file link is not a URL: {e}"),
        })?;
        if let Some(checkpoint) = self.store.get(key, &lease.file_url).await {
            self.store.put(key, &renewed.file_url, &checkpoint).await;
        }
        Ok((renewed, url))
    }

    async fn handle(&self, mut lease: pb::Lease, shutdown: &CancellationToken) {
        let bad_lease = |reason: String| Failure::new(Category::Protocol, false, reason);
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
            let kind = file_kind_from_wire(lease.kind).map_err(|e| bad_lease(e.to_string()))?;
            Ok::<_, Failure>((relative, url, base, allow, kind))
        })();
        let (relative, url, base, allow, kind) = match prepared {
            Ok(prepared) => prepared,
            Err(failure) => return self.fail(&lease, failure).await,
        };
        let mut file = ManifestFile {
            kind,
            resource_type: lease.resource_type.clone(),
            url,
            count: lease.expected_count,
        };
        let tokens = CoordinatorTokens::new(
            self.coordinator.clone(),
            lease.tenant.clone(),
            Arc::clone(&self.clock),
            Arc::clone(&self.tokens),
        );
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
        // A file whose resource count differs from the manifest's is downloaded once more
        // from zero; a second mismatch fails it (category incomplete) unless configured to
        // accept it.
        let mut passes = 0;
        let mut renewals = 0;
        let result = loop {
            passes += 1;
            let recorded = self.store.get(&key, &lease.file_url).await;
            let part_length = {
                let part = part.clone();
                self.settings
                    .offload
                    .run(
                        #[allow(clippy::disallowed_methods)] // Inside the offload seam.
                        move || std::fs::metadata(part).map(|m| m.len()).ok(),
                    )
                    .await
            };
            let resume = recorded.filter(|c| c.offset > 0 && part_length.is_some_and(|length| length >= c.offset));
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
                        &*self.store,
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
            // The keeper outlives a cancelled download until the download has returned, so it
            // stores the checkpoint a stopped download publishes last.
            let download_ended = CancellationToken::new();
            let keeper = tokio::spawn(keep_lease(
                self.coordinator.clone(),
                lease.clone(),
                Arc::clone(&self.store),
                key.clone(),
                checkpoint_rx,
                Keeping {
                    download: download_cancel.clone(),
                    ended: download_ended.clone(),
                    fenced: fenced.clone(),
                    throttled: Arc::clone(&self.throttled),
                },
            ));
            let options = DownloadOptions {
                resume,
                checkpoints: Some(checkpoint_tx),
                throttled: Some(Arc::clone(&self.throttled)),
                cancel: download_cancel.clone(),
                offload: self.settings.offload,
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
            download_ended.cancel();
            let _ = keeper.await;
            if fenced.is_cancelled() {
                tracing::warn!("lease was taken over by another worker; dropping this attempt");
                return;
            }
            match result {
                Ok(mut outcome) if let Some(expected) = outcome.count_mismatch => {
                    let actual = outcome.resources;
                    if self.settings.download.accept_count_mismatch {
                        outcome.issues.push(format!(
                            "the manifest's count is {expected}, the file has {actual} resources (accepted as configured)"
                        ));
                        break Ok(outcome);
                    }
                    if passes == 2 {
                        break Err(fhirhaul_common::Error::CountMismatch {
                            url: fhirhaul_common::url_util::SafeUrl::from(&file.url),
                            expected,
                            actual,
                        });
                    }
                    // Framing said complete but the count disagrees: once more from zero
                    // before believing either.
                    tracing::warn!(
                        expected,
                        actual,
                        "resource count differs from the manifest's; downloading the file once more"
                    );
                    let finished = staging.clone();
                    #[allow(clippy::disallowed_methods)] // Inside the offload seam.
                    let _ = self.settings.offload.run(move || std::fs::remove_file(finished)).await;
                }
                Err(error) if link_expired(&error, lease.links_expire_at_unix_ms, self.clock.now_unix_ms()) => {
                    if renewals == MAX_LINK_RENEWALS {
                        break Err(fhirhaul_common::Error::LinkExpired {
                            url: fhirhaul_common::url_util::SafeUrl::from(&file.url),
                            expired_at_ms: lease.links_expire_at_unix_ms,
                            reason: format!("still refused after {renewals} fresh links: {error}"),
                        });
                    }
                    renewals += 1;
                    tracing::info!(%error, "the file's link has expired; asking for a fresh one");
                    match self.renew_link(&lease, &key).await {
                        Ok((renewed, url)) => {
                            lease.file_url = renewed.file_url;
                            lease.links_expire_at_unix_ms = renewed.links_expire_at_unix_ms;
                            file.url = url;
                        }
                        Err(error) => break Err(error),
                    }
                }
                other => break other,
            }
        };
        match result {
            Ok(outcome) => {
                // Confirm the lease is still ours right before publishing, so a worker that
                // was presumed dead does not overwrite the newer owner's file.
                let still_ours = pb::RenewLeaseRequest {
                    worker_id: self.coordinator.worker_id.clone(),
                    lease_id: lease.lease_id.clone(),
                    generation: lease.generation,
                    throttled: take_throttled(&self.throttled),
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
                            Failure::new(
                                Category::Network,
                                true,
                                format!("could not confirm the lease: {}", status.message()),
                            ),
                        )
                        .await;
                    }
                    return;
                }
                let export = ExportDir {
                    relative: export_dir(&relative),
                    id: lease.export_id.clone(),
                };
                let location = match self.sink.publish(&staging, &relative, &export).await {
                    Ok(location) => location,
                    Err(error) => {
                        // A directory of another export is not a passing disk problem.
                        let retryable = !matches!(error, SinkError::AnotherExport { .. });
                        return self
                            .fail(&lease, Failure::new(Category::Storage, retryable, error.to_string()))
                            .await;
                    }
                };
                let request = pb::CompleteLeaseRequest {
                    worker_id: self.coordinator.worker_id.clone(),
                    lease_id: lease.lease_id.clone(),
                    generation: lease.generation,
                    bytes: outcome.bytes,
                    resources: outcome.resources,
                    sha256: outcome.sha256.clone(),
                    location,
                    issues: outcome.issues.clone(),
                    ehr_errors: outcome.ehr_errors,
                    throttled: take_throttled(&self.throttled),
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
                self.store.remove(&key).await;
            }
            Err(fhirhaul_common::Error::Cancelled) if shutdown.is_cancelled() => {
                // Shutting down: give the lease back; the checkpoint stays for a resume.
                let released = Failure {
                    released: true,
                    ..Failure::new(Category::Cancelled, true, "worker shutting down".into())
                };
                self.fail(&lease, released).await;
            }
            Err(error) => {
                if !error.is_retryable() {
                    self.store.remove(&key).await;
                }
                tracing::warn!(%error, "download failed");
                let failure = Failure::new(error.category(), error.is_retryable(), error.to_string());
                self.fail(&lease, failure).await;
            }
        }
    }
}

/// Records a download's checkpoint durably, with an event (so a simulation can check that
/// checkpoints never move backwards).
async fn store_checkpoint(
    store: &dyn CheckpointStore,
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

/// While a download runs: record each checkpoint, renew the lease with progress, and stop
/// the download if the coordinator says the lease is no longer ours.
async fn keep_lease(
    coordinator: Coordinator,
    lease: pb::Lease,
    store: Arc<dyn CheckpointStore>,
    key: String,
    mut checkpoints: watch::Receiver<Checkpoint>,
    keeping: Keeping,
) {
    let Keeping {
        download,
        ended,
        fenced,
        throttled,
    } = keeping;
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
            _ = ended.cancelled() => {
                // The download's last checkpoint (a stopped download publishes one) is
                // stored before letting go, so a resume starts from it.
                if checkpoints.has_changed().unwrap_or(false) {
                    let checkpoint = checkpoints.borrow_and_update().clone();
                    store_checkpoint(&*store, &coordinator.worker_id, &lease, &key, &checkpoint).await;
                }
                return;
            }
            changed = checkpoints.changed() => {
                if changed.is_err() { return }
                let checkpoint = checkpoints.borrow_and_update().clone();
                store_checkpoint(&*store, &coordinator.worker_id, &lease, &key, &checkpoint).await;
            }
            _ = renew.tick(), if renewal.is_none() => {
                let checkpoint = checkpoints.borrow().clone();
                let request = pb::RenewLeaseRequest {
                    worker_id: coordinator.worker_id.clone(),
                    lease_id: lease.lease_id.clone(),
                    generation: lease.generation,
                    progress: Some(pb::Checkpoint::from(&checkpoint)),
                    throttled: take_throttled(&throttled),
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

/// What the lease keeper is told and tells: `download` stops the download (the keeper
/// cancels it when the lease is fenced), `ended` says the download has returned, and
/// `fenced` that another worker owns the lease now.
struct Keeping {
    download: CancellationToken,
    ended: CancellationToken,
    fenced: CancellationToken,
    throttled: Arc<std::sync::atomic::AtomicU64>,
}

/// How a lease ended without a file, as the coordinator is told.
/// Fresh links asked for in one lease before the file fails as expired.
const MAX_LINK_RENEWALS: u32 = 3;

/// How close to the manifest's `Expires` a refusal counts as expiry (clocks differ).
const EXPIRY_MARGIN_MS: u64 = 5 * 60 * 1000;

/// Whether a download failure is an expired link: the file answered 403, 404 or 410 at,
/// after, or shortly before the manifest's `Expires`. Without an `Expires` nothing says
/// links expire, and such an answer is the file's real fate.
fn link_expired(error: &fhirhaul_common::Error, links_expire_ms: Option<u64>, now_ms: u64) -> bool {
    let refused = matches!(
        error,
        fhirhaul_common::Error::Http {
            status: 403 | 404 | 410,
            ..
        }
    );
    refused && links_expire_ms.is_some_and(|expires| now_ms + EXPIRY_MARGIN_MS >= expires)
}

struct Failure {
    category: Category,
    retryable: bool,
    reason: String,
    /// Given back unfinished (shutting down), not failed.
    released: bool,
}

impl Failure {
    fn new(category: Category, retryable: bool, reason: String) -> Self {
        Failure {
            category,
            retryable,
            reason,
            released: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_error(status: u16) -> fhirhaul_common::Error {
        fhirhaul_common::Error::Http {
            url: fhirhaul_common::url_util::SafeUrl::from("https://storage.example/f?sig=x"),
            status,
            message: fhirhaul_common::fhir::EhrMessage {
                text: "gone".into(),
                transient: false,
            },
        }
    }

    #[test]
    fn a_refused_link_counts_as_expired_only_near_or_after_the_manifests_expires() {
        let expires = 10_000_000;
        for status in [403, 404, 410] {
            assert!(
                link_expired(&http_error(status), Some(expires), expires + 1),
                "{status} after"
            );
            assert!(
                link_expired(&http_error(status), Some(expires), expires - 60_000),
                "{status} shortly before"
            );
            assert!(
                !link_expired(&http_error(status), Some(expires), expires - 3_600_000),
                "{status} long before"
            );
            assert!(
                !link_expired(&http_error(status), None, expires),
                "{status} without Expires"
            );
        }
        assert!(
            !link_expired(&http_error(500), Some(expires), expires + 1),
            "a server error is no expiry"
        );
        assert!(
            !link_expired(&http_error(401), Some(expires), expires + 1),
            "401 is the token's business"
        );
    }

    #[test]
    fn a_files_export_directory_is_its_tenant_and_export_id() {
        assert_eq!(
            export_dir(Path::new("sim/20261202T094700Z-3fa9c01b/Patient.1.ndjson")),
            Path::new("sim/20261202T094700Z-3fa9c01b")
        );
        assert_eq!(
            export_dir(Path::new("sim/20261202T094700Z-3fa9c01b/deleted/Patient.1.ndjson")),
            Path::new("sim/20261202T094700Z-3fa9c01b")
        );
        assert_eq!(export_dir(Path::new("job-1/Patient.1.ndjson")), Path::new("job-1"));
    }

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
