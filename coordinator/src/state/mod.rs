//! The replicated state machine: tenants' incremental cursors, export jobs, their files,
//! file leases and workers. It changes only by [`State::apply`]ing committed [`Command`]s,
//! a pure function over ordered maps: the same log gives the same state on every node.
//! Times and ids inside commands come from the proposer, never from the applier's clock.

use std::collections::BTreeMap;

use fhirhaul_common::Category;
use fhirhaul_common::download::Checkpoint;
use fhirhaul_common::kickoff::ExportRequest;
use fhirhaul_common::manifest::{FileKind, ManifestFile};
use fhirhaul_common::output::OutputNames;
use serde::{Deserialize, Serialize};

/// A change to replicated state. Proposed by the leader, applied by every node.
// A command lives briefly (proposed, encoded into the log, applied); a submission's export
// request inline is simpler than boxing it everywhere commands are built.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A worker joined (or re-joined after a restart: its old leases go back to pending,
    /// marked as preferring it so it can resume its own partial files).
    RegisterWorker {
        worker_id: String,
        concurrency: u32,
        at_ms: u64,
    },
    /// A worker is alive, and (when `lease_ids` is given) holds exactly these leases.
    Heartbeat {
        worker_id: String,
        at_ms: u64,
        #[serde(default)]
        lease_ids: Option<Vec<u64>>,
    },
    /// A new export job; nothing has been sent to the EHR yet.
    SubmitJob {
        tenant: String,
        request: ExportRequest,
        max_file_attempts: u32,
        at_ms: u64,
        /// The caller's id for this submission: a second command with the same id (a
        /// retry whose first attempt may have committed) creates nothing and answers with
        /// the first one's job.
        #[serde(default)]
        request_id: Option<String>,
        /// The export's own id, chosen by the proposer: time-ordered with a random part,
        /// so it never repeats across restarts or clusters. Its files go under
        /// `<tenant>/<export id>/`. (Entries written before it existed use the job id.)
        #[serde(default)]
        export_id: Option<String>,
        /// When the export is DELETEd at the EHR once it ends (the tenant's setting when
        /// the job was submitted).
        #[serde(default)]
        delete_policy: DeletePolicy,
    },
    /// The leader `node_id` is about to send the job's kick-off. A later leader that finds
    /// this and no status URL asks that node what came of it before kicking off itself.
    KickoffStarting {
        job_id: String,
        node_id: u64,
    },
    /// The EHR accepted the kick-off: from now on the job is polled, never kicked off again.
    KickedOff {
        job_id: String,
        status_url: String,
    },
    /// Files from a (partial or final) manifest page. Already-known URLs are ignored.
    AddFiles {
        job_id: String,
        files: Vec<ManifestFile>,
        requires_access_token: bool,
    },
    /// The export showed progress: a new `X-Progress` (`progress`), or new partial-manifest
    /// files (`progress` none). The stall watchdog counts from the last one, whichever
    /// coordinator leads.
    JobProgress {
        job_id: String,
        progress: Option<String>,
        at_ms: u64,
    },
    /// The final manifest (every page) has been added.
    ManifestComplete {
        job_id: String,
        transaction_time: String,
        /// The manifest's `Expires` (unix ms): its file links may stop working then.
        #[serde(default)]
        links_expire_ms: Option<u64>,
    },
    /// A fresh manifest from the status URL replaced expired links: each `(file, url)`
    /// gives a file not yet done its new link.
    RenewLinks {
        job_id: String,
        links: Vec<(u32, String)>,
        links_expire_ms: Option<u64>,
    },
    /// Kick-off or polling failed for good.
    JobFailed {
        job_id: String,
        reason: String,
    },
    CancelJob {
        job_id: String,
    },
    /// Give a pending file to a worker.
    GrantLease {
        job_id: String,
        file: u32,
        worker_id: String,
        expires_at_ms: u64,
        #[serde(default)]
        granted_at_ms: u64,
    },
    /// Several grants in one entry (many workers waiting at once): each applies as its own
    /// `GrantLease` would, in order, and is answered on its own.
    GrantLeases {
        grants: Vec<LeaseRequest>,
    },
    RenewLease {
        lease_id: u64,
        generation: u64,
        progress: Checkpoint,
        expires_at_ms: u64,
    },
    CompleteLease {
        lease_id: u64,
        generation: u64,
        bytes: u64,
        resources: u64,
        sha256: String,
        location: String,
        issues: Vec<String>,
        #[serde(default)]
        ehr_errors: u64,
        /// When the coordinator took the report (unix ms).
        #[serde(default)]
        at_ms: u64,
    },
    FailLease {
        lease_id: u64,
        generation: u64,
        category: Category,
        reason: String,
        retryable: bool,
        /// Given back unfinished (worker shutting down): not counted as an attempt.
        released: bool,
        /// When the coordinator took the report (unix ms).
        #[serde(default)]
        at_ms: u64,
    },
    /// The lease ran out without renewal: the file goes back to pending.
    ExpireLease {
        lease_id: u64,
        generation: u64,
    },
    /// A grant whose answer reached nobody (the worker stopped waiting): the file goes
    /// back to pending, and the attempt is not counted.
    ReturnLease {
        lease_id: u64,
        generation: u64,
    },
    /// The EHR's status URL was DELETEd after completion.
    StatusDeleted {
        job_id: String,
    },
    /// A DELETE of the status URL failed; it is tried again later, a few times.
    StatusDeleteFailed {
        job_id: String,
        reason: String,
        at_ms: u64,
    },
    /// Files waiting for a worker not seen since this time may go to anyone.
    ForgetAbsentWorkers {
        stale_before_ms: u64,
    },
    /// A finished job leaves the hot state: its summary stays in [`State::archived`], its
    /// files go to each coordinator's archive directory (see `crate::archive`).
    ArchiveJob {
        job_id: String,
        /// When the leader decided it (unix ms).
        at_ms: u64,
    },
    /// Records where a coordinator listens, so the address book is in the log (and in
    /// snapshots) and not only in each node's configuration.
    SetCoordinatorAddress {
        node_id: u64,
        address: String,
    },
}

/// What stays of a job in replicated state once it is archived: its summary, constant in
/// size whatever the number of files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchivedJob {
    pub id: String,
    pub tenant: String,
    pub phase: JobPhase,
    pub files_total: u32,
    pub files_done: u32,
    pub files_failed: u32,
    pub bytes_done: u64,
    /// The EHR's last `X-Progress`.
    pub progress: Option<String>,
    pub error: Option<String>,
    pub transaction_time: Option<String>,
    pub output_dir: String,
    pub cleanup: Cleanup,
    pub delete_error: Option<String>,
    pub ehr_errors: u64,
    pub download_ms: u64,
    pub failures_by_category: BTreeMap<String, u32>,
    pub archived_ms: u64,
}

impl ArchivedJob {
    /// The job's totals at `at_ms` (what its summary shows, live or archived).
    pub fn of(job: &Job, at_ms: u64) -> ArchivedJob {
        ArchivedJob {
            id: job.id.clone(),
            tenant: job.tenant.clone(),
            phase: job.phase,
            files_total: job.files.len() as u32,
            files_done: job.files_done() as u32,
            files_failed: job.files_failed() as u32,
            bytes_done: job.bytes_done(),
            progress: job.progress.clone(),
            error: job.error.clone(),
            transaction_time: job.transaction_time.clone(),
            output_dir: job.output_dir(),
            cleanup: job.cleanup(),
            delete_error: job.delete_error.clone(),
            ehr_errors: job.ehr_errors(),
            download_ms: job.download_ms(at_ms),
            failures_by_category: job.failures_by_category(),
            archived_ms: at_ms,
        }
    }
}

/// When a job's export is DELETEd at the EHR. A cancelled job's export always is (that is
/// how Bulk Data cancels); a DELETE may make the EHR purge the files, so one whose files
/// did not all arrive is kept unless `after_failure` says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePolicy {
    /// DELETE once every file is downloaded.
    pub when_done: bool,
    /// Also DELETE an export that failed or ended with failed files.
    pub after_failure: bool,
}

/// DELETEs of a status URL tried before giving up (the EHR expires exports anyway).
pub const MAX_DELETE_ATTEMPTS: u32 = 3;

/// Where a job's cleanup at the EHR stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cleanup {
    /// Nothing to clean up, or not yet (no export at the EHR, or the job still runs).
    None,
    /// The export stays at the EHR (policy), until the EHR expires it.
    Kept,
    /// A DELETE is due: at this time (unix ms) or later.
    Due {
        at_ms: u64,
    },
    Deleted,
    /// Every DELETE failed; the last reason.
    Failed(String),
}

/// Pause after the `n`th failed DELETE before the next.
fn delete_retry_delay_ms(failures: u32) -> u64 {
    10_000 * u64::from(failures)
}

/// One grant of a [`Command::GrantLeases`]: give `file` of `job_id` to `worker_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub job_id: String,
    pub file: u32,
    pub worker_id: String,
    pub expires_at_ms: u64,
    pub granted_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    Submitted,
    Polling,
    Downloading,
    Completed,
    Failed,
    Cancelled,
}

impl JobPhase {
    pub fn is_final(self) -> bool {
        matches!(self, JobPhase::Completed | JobPhase::Failed | JobPhase::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilePhase {
    Pending,
    Leased {
        lease_id: u64,
        worker_id: String,
        expires_at_ms: u64,
        /// When it was granted (0 in entries written before this was recorded).
        #[serde(default)]
        granted_at_ms: u64,
    },
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub url: String,
    pub kind: FileKind,
    pub resource_type: Option<String>,
    pub count: Option<u64>,
    /// Where the file goes under the output root: `<job>/<Type>.<n>.ndjson`, `…/deleted/…`.
    pub relative_path: String,
    pub phase: FilePhase,
    /// Bumped on every grant; a lease call must carry the current one (fencing).
    pub generation: u64,
    pub attempts: u32,
    pub progress: Checkpoint,
    pub sha256: Option<String>,
    pub location: Option<String>,
    /// Why the last attempt failed: its category and the reason, in the EHR's words.
    pub failure: Option<(Category, String)>,
    pub issues: Vec<String>,
    /// For an `error` file: its OperationOutcomes reporting an error or fatal issue.
    #[serde(default)]
    pub ehr_errors: u64,
    /// The worker that last held it, while its partial download may still be on that
    /// worker's disk.
    pub preferred_worker: Option<String>,
}

impl FileRecord {
    /// A manifest's file as it enters the job: pending, never leased, going to
    /// `relative_path`.
    pub fn pending(file: &ManifestFile, relative_path: String) -> FileRecord {
        FileRecord {
            url: file.url.to_string(),
            kind: file.kind,
            resource_type: file.resource_type.clone(),
            count: file.count,
            relative_path,
            phase: FilePhase::Pending,
            generation: 0,
            attempts: 0,
            progress: Checkpoint::default(),
            sha256: None,
            location: None,
            failure: None,
            issues: Vec::new(),
            ehr_errors: 0,
            preferred_worker: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Unique to this export (see [`Command::SubmitJob`]).
    #[serde(default)]
    pub export_id: String,
    pub tenant: String,
    pub request: ExportRequest,
    pub max_file_attempts: u32,
    pub submitted_ms: u64,
    pub phase: JobPhase,
    pub status_url: Option<String>,
    /// The coordinator that last started the kick-off, while no status URL is committed.
    #[serde(default)]
    pub kickoff_by: Option<u64>,
    pub requires_access_token: bool,
    pub manifest_complete: bool,
    pub transaction_time: Option<String>,
    /// When the manifest's file links stop working (its `Expires`, unix ms), if it said.
    #[serde(default)]
    pub links_expire_ms: Option<u64>,
    pub error: Option<String>,
    pub status_deleted: bool,
    #[serde(default)]
    pub delete_policy: DeletePolicy,
    /// Failed DELETEs so far, the last one's reason and when it failed.
    #[serde(default)]
    pub delete_failures: u32,
    #[serde(default)]
    pub delete_error: Option<String>,
    #[serde(default)]
    pub delete_failed_at_ms: u64,
    /// The EHR's last `X-Progress`, and when the export last showed progress.
    #[serde(default)]
    pub progress: Option<String>,
    #[serde(default)]
    pub progress_at_ms: Option<u64>,
    /// When the first file was leased, and when a file last finished (done or failed):
    /// the download phase, for rates and estimates.
    #[serde(default)]
    pub download_started_ms: Option<u64>,
    #[serde(default)]
    pub last_file_ms: Option<u64>,
    /// Change them through `change_file`/`push_file`/`change_all_files`, which keep
    /// [`Job::index`] true.
    pub files: FileList,
    names: OutputNames,
    #[serde(skip)]
    index: index::LazyIndex,
}

impl Job {
    pub fn files_done(&self) -> usize {
        self.index().done
    }

    /// How long files have been downloading: from the first lease to the last file finished
    /// (for an ended job) or to `now_ms`.
    pub fn download_ms(&self, now_ms: u64) -> u64 {
        let Some(started) = self.download_started_ms else {
            return 0;
        };
        let until = if self.phase.is_final() {
            self.last_file_ms.unwrap_or(started)
        } else {
            now_ms
        };
        until.saturating_sub(started)
    }

    /// When the job last did anything the state records (submitted, progressed, finished a
    /// file, failed a DELETE).
    pub fn last_activity_ms(&self) -> u64 {
        [
            Some(self.submitted_ms),
            self.progress_at_ms,
            self.last_file_ms,
            Some(self.delete_failed_at_ms),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
    }

    /// Failed files by category name.
    pub fn failures_by_category(&self) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for file in self.files.iter().filter(|f| f.phase == FilePhase::Failed) {
            if let Some((category, _)) = &file.failure {
                *counts.entry(category.as_str().to_string()).or_default() += 1;
            }
        }
        counts
    }

    /// OperationOutcomes in the job's `error` files that report an error or fatal issue.
    pub fn ehr_errors(&self) -> u64 {
        self.index().ehr_errors
    }

    pub fn files_failed(&self) -> usize {
        self.index().failed
    }

    pub fn bytes_done(&self) -> u64 {
        self.index().bytes
    }

    /// Where the job's cleanup at the EHR stands (see [`DeletePolicy`]).
    pub fn cleanup(&self) -> Cleanup {
        if self.status_deleted {
            return Cleanup::Deleted;
        }
        if self.status_url.is_none() || !self.phase.is_final() {
            return Cleanup::None;
        }
        let wanted = match self.phase {
            JobPhase::Cancelled => true,
            JobPhase::Completed if self.files_failed() == 0 => self.delete_policy.when_done,
            _ => self.delete_policy.after_failure,
        };
        match (wanted, &self.delete_error) {
            (false, _) => Cleanup::Kept,
            (true, Some(reason)) if self.delete_failures >= MAX_DELETE_ATTEMPTS => Cleanup::Failed(reason.clone()),
            (true, _) => Cleanup::Due {
                at_ms: match self.delete_failures {
                    0 => 0,
                    n => self.delete_failed_at_ms + delete_retry_delay_ms(n),
                },
            },
        }
    }

    /// The export's directory under the output root: `<tenant>/<export id>`.
    pub fn output_dir(&self) -> String {
        let export = if self.export_id.is_empty() {
            &self.id
        } else {
            &self.export_id
        };
        format!("{}/{export}", self.tenant)
    }

    /// Where `file` goes under the output root: the export's directory and the one naming
    /// rule every export path shares ([`OutputNames`]).
    fn relative_path(&mut self, file: &ManifestFile) -> String {
        format!("{}/{}", self.output_dir(), self.names.next(file))
    }

    /// Completes the job if its manifest is complete and every file is done or failed;
    /// whether it completed now.
    fn settle(&mut self) -> bool {
        if self.phase.is_final() || !self.manifest_complete {
            return false;
        }
        let index = self.index();
        let settled = index.done + index.failed == self.files.len();
        if settled {
            self.phase = JobPhase::Completed;
        }
        settled
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub concurrency: u32,
    pub last_seen_ms: u64,
    /// The leases the worker last said it holds, and when (a worker that does not report
    /// them has none here).
    #[serde(default)]
    pub holding: Option<ReportedLeases>,
}

/// What a worker's heartbeat said it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedLeases {
    pub at_ms: u64,
    pub lease_ids: std::collections::BTreeSet<u64>,
}

/// A lease as handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub lease_id: u64,
    pub generation: u64,
    pub job_id: String,
    pub file: u32,
    pub expires_at_ms: u64,
}

/// What applying a command produced, for the proposer.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Done,
    JobSubmitted {
        job_id: String,
    },
    /// A submission with this request id was committed before: its job.
    AlreadySubmitted {
        job_id: String,
    },
    LeaseGranted(LeaseGrant),
    /// What each grant of a [`Command::GrantLeases`] came to, in order.
    Each(Vec<Applied>),
    /// The command was valid when proposed but not when applied (a stale lease, a job
    /// already finished); state is unchanged.
    Refused(Refusal),
}

/// Why the state machine refused a command. Each kind maps to its own gRPC code (see
/// `error.rs`), so a caller can tell a stale lease from an unknown job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown job {0}")]
    UnknownJob(String),
    #[error("unknown worker {0}: register first")]
    UnknownWorker(String),
    #[error("{job_id} is {phase:?}, not waiting for a kick-off")]
    NotAwaitingKickoff { job_id: String, phase: JobPhase },
    #[error("{0} has ended")]
    JobEnded(String),
    #[error("{job_id} has no file {file}")]
    NoSuchFile { job_id: String, file: u32 },
    #[error("file {file} of {job_id} is not pending")]
    FileNotPending { job_id: String, file: u32 },
    #[error("{0} has not finished (or its export is still to be DELETEd)")]
    NotFinished(String),
    #[error("{0} is archived and its files are not kept on this coordinator (its summary is)")]
    ArchivedElsewhere(String),
    #[error("lease {lease_id} is not live (expired, finished or unknown)")]
    LeaseNotLive { lease_id: u64 },
    #[error("lease {lease_id} generation {generation} is stale (the file is at generation {current})")]
    StaleGeneration {
        lease_id: u64,
        generation: u64,
        current: u64,
    },
}

impl Refusal {
    /// A lease call from a worker that no longer owns the lease (fencing): it must stop.
    pub fn is_fencing(&self) -> bool {
        matches!(self, Refusal::LeaseNotLive { .. } | Refusal::StaleGeneration { .. })
    }
}

/// Where a lease lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseIndex {
    pub job_id: String,
    pub file: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub jobs: BTreeMap<String, Job>,
    pub workers: BTreeMap<String, WorkerRecord>,
    pub leases: BTreeMap<u64, LeaseIndex>,
    /// Each tenant's incremental cursor: the `_since` of its next incremental export. It
    /// moves to a job's `transactionTime` only when that job completed with every file
    /// downloaded and left no gap (see `apply::cursor_may_move`).
    pub tenant_since: BTreeMap<String, String>,
    /// The job that moved each tenant's cursor last (its `transactionTime` is the cursor).
    #[serde(default)]
    pub tenant_since_job: BTreeMap<String, String>,
    /// Each coordinator's gRPC address, by raft node id (from membership changes and
    /// [`Command::SetCoordinatorAddress`]).
    #[serde(default)]
    pub coordinators: BTreeMap<u64, String>,
    /// The job each submission's request id created (see [`Command::SubmitJob`]).
    #[serde(default)]
    pub submissions: BTreeMap<String, String>,
    /// Finished jobs moved out of `jobs` (see [`Command::ArchiveJob`]).
    #[serde(default)]
    pub archived: BTreeMap<String, ArchivedJob>,
    /// Jobs archived by the last applied command, with their files, for this coordinator
    /// to write to its archive directory (never serialized: it is drained after every
    /// command).
    #[serde(skip)]
    archive_outbox: Vec<Job>,
    next_job: u64,
    next_lease: u64,
}

#[cfg(test)]
impl Command {
    /// A submission of tenant `t`'s default export, three attempts per file (tests).
    pub(crate) fn test_submission() -> Command {
        Command::SubmitJob {
            tenant: "t".into(),
            request: ExportRequest::default(),
            max_file_attempts: 3,
            at_ms: 0,
            request_id: None,
            export_id: None,
            delete_policy: DeletePolicy::default(),
        }
    }
}

impl State {
    /// Jobs archived since last asked, with their files (see [`State::archived`]).
    pub fn take_archived_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.archive_outbox)
    }
}

mod apply;
mod files;
mod index;

pub use files::FileList;
mod queries;
mod summary;
#[cfg(test)]
mod tests;
