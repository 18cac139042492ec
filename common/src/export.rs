//! One whole export in one process, without a cluster: kick off, poll, download every file
//! (starting on partial-manifest files while polling continues), write a summary. For
//! embedding the client core and for its own tests; the coordinator's job driver uses the
//! same pieces step by step, with each step committed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use url::Url;

use crate::client::FhirClient;
use crate::download::{DownloadOptions, DownloadSettings, FileOutcome, download_file};
use crate::error::{Category, Error, Result};
use crate::kickoff::{ExportRequest, KickoffRetries, ServerProfile, kick_off};
use crate::manifest::{FileKind, ManifestFile};
use crate::offload::Offload;
use crate::output::{OutputNames, Summary, SummaryFailure, SummaryFile, write_summary};
use crate::retry::Backoff;
use crate::status::{PollEvent, PollSettings, Poller, delete_export};
use crate::url_util::SafeUrl;

/// How one export runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSettings {
    pub poll: PollSettings,
    pub download: DownloadSettings,
    /// Files downloaded at once (a limit per EHR, so it is not hammered). In a cluster this
    /// is where the tenant's adaptive limit starts.
    pub concurrency: usize,
    /// In a cluster: the most files of this tenant downloaded at once. The coordinator
    /// grows the limit from `concurrency` toward this while throughput rises and the EHR
    /// does not throttle, and halves it when the EHR answers 429/503. Unset: no growth
    /// above `concurrency` (throttling still lowers it).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// DELETE the status URL once every file is saved, so the EHR can purge them.
    pub delete_when_done: bool,
    /// Also DELETE an export that failed or ended with failed files (the EHR may then
    /// purge files that were never fetched). A cancelled export is always DELETEd: that is
    /// how Bulk Data cancels.
    pub delete_after_failure: bool,
    /// Kick-off attempts while the EHR answers 429/503 (waits as polling does) or cannot
    /// be reached at all.
    pub kickoff_attempts: u32,
    /// Send a kick-off again when its connection broke after it was sent. The EHR may
    /// then hold two exports (one never polled nor deleted); off by default.
    pub kickoff_retry_ambiguous: bool,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            poll: PollSettings::default(),
            download: DownloadSettings::default(),
            concurrency: 4,
            max_concurrency: None,
            delete_when_done: false,
            delete_after_failure: false,
            kickoff_attempts: 5,
            kickoff_retry_ambiguous: false,
        }
    }
}

/// What an export tells its caller as it goes.
#[derive(Debug)]
pub enum ExportEvent {
    Accepted { status_url: Url },
    Poll(PollEvent),
    ManifestReady { files: usize, transaction_time: String },
    FileDone { file: ManifestFile, outcome: FileOutcome },
    FileFailed { file: ManifestFile, error: Error },
}

/// A saved file in the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedFile {
    pub kind: FileKind,
    pub resource_type: Option<String>,
    pub url: String,
    /// The manifest's `count`, when it gave one.
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(flatten)]
    pub outcome: FileOutcome,
}

/// A file that could not be saved, with the reason.
pub type FailedFile = SummaryFailure;

/// The result of an export; its [`ExportReport::summary`] is written as `summary.json` in
/// the output directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportReport {
    pub status_url: String,
    /// The manifest's `transactionTime`: the `_since` of the next incremental export.
    pub transaction_time: String,
    pub output_dir: PathBuf,
    pub files: Vec<SavedFile>,
    pub failed: Vec<FailedFile>,
    /// Failures by category.
    pub failures_by_category: BTreeMap<Category, usize>,
}

impl ExportReport {
    pub fn resources(&self) -> u64 {
        self.files.iter().map(|f| f.outcome.resources).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.outcome.bytes).sum()
    }

    /// The report as `summary.json` says it, in the same shape as a cluster's.
    pub fn summary(&self) -> Summary {
        Summary {
            job_id: None,
            phase: "Completed".into(),
            status_url: Some(self.status_url.clone()),
            transaction_time: Some(self.transaction_time.clone()),
            error: None,
            files: self
                .files
                .iter()
                .map(|f| SummaryFile {
                    path: f.outcome.path.display().to_string(),
                    kind: f.kind,
                    resource_type: f.resource_type.clone(),
                    url: f.url.clone(),
                    sha256: f.outcome.sha256.clone(),
                    bytes: f.outcome.bytes,
                    resources: f.outcome.resources,
                    expected_count: f.count,
                    issues: f.outcome.issues.clone(),
                    ehr_errors: f.outcome.ehr_errors,
                })
                .collect(),
            failed: self.failed.clone(),
            failures_by_category: BTreeMap::new(),
        }
        .count_failures()
    }
}

struct Downloads<'a> {
    client: &'a FhirClient,
    settings: &'a ExportSettings,
    dir: &'a Path,
    names: OutputNames,
    started: HashSet<Url>,
    tasks: JoinSet<(ManifestFile, Result<FileOutcome>)>,
    limit: Arc<Semaphore>,
    cancel: CancellationToken,
}

impl Downloads<'_> {
    fn start(&mut self, file: ManifestFile, requires_token: bool) {
        if !self.started.insert(file.url.clone()) {
            return;
        }
        let dest = self.dir.join(self.names.next(&file));
        let client = self.client.clone();
        let settings = self.settings.download.clone();
        let limit = Arc::clone(&self.limit);
        let cancel = self.cancel.clone();
        let span = tracing::info_span!("file", file = %SafeUrl::from(&file.url), dest = %dest.display());
        self.tasks.spawn(
            async move {
                let _permit = limit.acquire_owned().await;
                let options = DownloadOptions {
                    cancel,
                    ..Default::default()
                };
                let result = download_file(&client, &file, requires_token, &dest, &settings, options).await;
                (file, result)
            }
            .instrument(span),
        );
    }
}

/// Runs one export to completion. Files that fail are reported, not fatal: the others are
/// still saved. Errors before the manifest (kick-off, polling) are returned.
pub async fn run_export(
    client: &FhirClient,
    request: &ExportRequest,
    profile: &ServerProfile,
    settings: &ExportSettings,
    out_dir: &Path,
    cancel: CancellationToken,
    mut on_event: impl FnMut(ExportEvent),
) -> Result<ExportReport> {
    request.validate(profile)?;
    tokio::fs::create_dir_all(out_dir)
        .await
        .map_err(|e| Error::io("creating output directory", out_dir, e))?;
    let mut kickoff_backoff = Backoff::new(
        settings.poll.min_interval,
        settings.poll.max_interval,
        client.entropy().clone(),
    )
    .with_hint_bounds(settings.poll.min_retry_after, settings.poll.max_retry_after);
    let accepted = kick_off(
        client,
        request,
        profile,
        KickoffRetries {
            max_attempts: settings.kickoff_attempts.max(1),
            retry_ambiguous: settings.kickoff_retry_ambiguous,
            throttled_at_most: settings.poll.deadline,
        },
        &mut kickoff_backoff,
    )
    .await?;
    on_event(ExportEvent::Accepted {
        status_url: accepted.status_url.clone(),
    });
    let mut downloads = Downloads {
        client,
        settings,
        dir: out_dir,
        names: OutputNames::default(),
        started: HashSet::new(),
        tasks: JoinSet::new(),
        limit: Arc::new(Semaphore::new(settings.concurrency.max(1))),
        cancel: cancel.clone(),
    };
    let mut poller = Poller::new(settings.poll.clone(), client);
    let completed = poller
        .run(client, &accepted.status_url, &cancel, |event| {
            // Partial-manifest files start downloading while polling goes on.
            if let PollEvent::PartialFiles {
                files,
                requires_access_token,
            } = &event
            {
                for file in files {
                    downloads.start(file.clone(), *requires_access_token);
                }
            }
            on_event(ExportEvent::Poll(event));
        })
        .await?;
    on_event(ExportEvent::ManifestReady {
        files: completed.files.len(),
        transaction_time: completed.transaction_time.clone(),
    });
    for file in completed.files.iter().cloned() {
        downloads.start(file, completed.requires_access_token);
    }
    let mut saved = Vec::new();
    let mut failed = Vec::new();
    while let Some(joined) = downloads.tasks.join_next().await {
        let (file, result) = match joined {
            Ok(done) => done,
            Err(join_error) => {
                tracing::error!(%join_error, "download task ended abnormally");
                continue;
            }
        };
        match result {
            Ok(outcome) => {
                saved.push(SavedFile {
                    kind: file.kind,
                    resource_type: file.resource_type.clone(),
                    url: SafeUrl::from(&file.url).to_string(),
                    count: file.count,
                    outcome: outcome.clone(),
                });
                on_event(ExportEvent::FileDone { file, outcome });
            }
            Err(error) => {
                failed.push(FailedFile {
                    kind: file.kind,
                    resource_type: file.resource_type.clone(),
                    url: SafeUrl::from(&file.url).to_string(),
                    category: error.category(),
                    error: error.to_string(),
                });
                on_event(ExportEvent::FileFailed { file, error });
            }
        }
    }
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    saved.sort_by(|a, b| a.outcome.path.cmp(&b.outcome.path));
    let mut report = ExportReport {
        status_url: SafeUrl::from(&accepted.status_url).to_string(),
        transaction_time: completed.transaction_time.clone(),
        output_dir: out_dir.to_path_buf(),
        files: saved,
        failed,
        failures_by_category: BTreeMap::new(),
    };
    let summary = report.summary();
    report.failures_by_category = summary.failures_by_category.clone();
    write_summary(out_dir, &summary, Offload::Threads).await?;
    let manifest_path = out_dir.join("manifest.json");
    let pages = serde_json::to_vec_pretty(&completed.pages).unwrap_or_default();
    tokio::fs::write(&manifest_path, pages)
        .await
        .map_err(|e| Error::io("writing", &manifest_path, e))?;
    if settings.delete_when_done
        && (report.failed.is_empty() || settings.delete_after_failure)
        && let Err(error) = delete_export(client, &accepted.status_url).await
    {
        tracing::warn!(%error, "could not DELETE the finished export; the EHR will expire it");
    }
    Ok(report)
}
