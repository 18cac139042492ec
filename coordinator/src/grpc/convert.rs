//! Conversions between the coordinator's replicated state and its protobuf form. The
//! client core's types (categories, file kinds, checkpoints, errors) convert in
//! `fhirhaul_proto::convert`; this module covers only what the coordinator owns.

use std::time::Duration;

use fhirhaul_common::url_util::SafeUrl;
use fhirhaul_proto::convert::category_to_wire;
use fhirhaul_proto::v1 as pb;
use tonic::Status;

use crate::leader::leases::LeasedFile;
use crate::state::{ArchivedJob, Cleanup, FilePhase, FileRecord, Job, JobPhase};

impl From<JobPhase> for pb::JobPhase {
    fn from(phase: JobPhase) -> Self {
        match phase {
            JobPhase::Submitted => pb::JobPhase::Submitted,
            JobPhase::Polling => pb::JobPhase::Polling,
            JobPhase::Downloading => pb::JobPhase::Downloading,
            JobPhase::Completed => pb::JobPhase::Completed,
            JobPhase::Failed => pb::JobPhase::Failed,
            JobPhase::Cancelled => pb::JobPhase::Cancelled,
        }
    }
}

impl From<&FilePhase> for pb::FilePhase {
    fn from(phase: &FilePhase) -> Self {
        match phase {
            FilePhase::Pending => pb::FilePhase::Pending,
            FilePhase::Leased { .. } => pb::FilePhase::Leased,
            FilePhase::Done => pb::FilePhase::Done,
            FilePhase::Failed => pb::FilePhase::Failed,
        }
    }
}

impl From<&Cleanup> for pb::Cleanup {
    fn from(cleanup: &Cleanup) -> Self {
        match cleanup {
            Cleanup::None => pb::Cleanup::None,
            Cleanup::Kept => pb::Cleanup::Kept,
            Cleanup::Due { .. } => pb::Cleanup::Pending,
            Cleanup::Deleted => pb::Cleanup::Deleted,
            Cleanup::Failed(_) => pb::Cleanup::Failed,
        }
    }
}

/// The lease as a worker receives it.
pub fn lease_to_pb(leased: LeasedFile, renew_every: Duration) -> pb::Lease {
    pb::Lease {
        lease_id: leased.grant.lease_id.to_string(),
        generation: leased.grant.generation,
        job_id: leased.grant.job_id,
        tenant: leased.tenant,
        file_url: leased.file.url,
        kind: pb::FileKind::from(leased.file.kind) as i32,
        resource_type: leased.file.resource_type,
        expected_count: leased.file.count,
        requires_access_token: leased.requires_access_token,
        relative_path: leased.file.relative_path,
        expires_at_unix_ms: leased.grant.expires_at_ms,
        fhir_base_url: leased.fhir_base_url,
        token_allow_list: leased.token_allow_list,
        renew_every_ms: renew_every.as_millis() as u64,
        export_id: leased.export_id,
        links_expire_at_unix_ms: leased.links_expire_ms,
    }
}

pub fn summary_to_pb(job: &Job, now_ms: u64) -> pb::JobSummary {
    // The same figures an archived job keeps, computed now.
    archived_summary_to_pb(&ArchivedJob::of(job, now_ms))
}

/// A job's summary from its totals (what an archived job keeps).
pub fn archived_summary_to_pb(job: &ArchivedJob) -> pb::JobSummary {
    pb::JobSummary {
        job_id: job.id.clone(),
        tenant: job.tenant.clone(),
        phase: pb::JobPhase::from(job.phase) as i32,
        files_total: job.files_total,
        files_done: job.files_done,
        files_failed: job.files_failed,
        bytes_done: job.bytes_done,
        progress: job.progress.clone(),
        error: job.error.clone(),
        transaction_time: job.transaction_time.clone(),
        output_dir: job.output_dir.clone(),
        cleanup: pb::Cleanup::from(&job.cleanup) as i32,
        delete_error: job.delete_error.clone(),
        ehr_errors: job.ehr_errors,
        download_ms: job.download_ms,
        failures_by_category: job.failures_by_category.clone().into_iter().collect(),
    }
}

/// An archived job whose files this coordinator does not have: the summary alone.
pub fn archived_job_to_pb(job: &ArchivedJob) -> pb::GetJobResponse {
    pb::GetJobResponse {
        summary: Some(archived_summary_to_pb(job)),
        files: Vec::new(),
        file_offset: 0,
        next_file_offset: None,
    }
}

fn file_to_pb(file: &FileRecord) -> pb::FileState {
    pb::FileState {
        // A signed storage URL keeps its credentials in the query.
        url: SafeUrl::from(file.url.as_str()).to_string(),
        kind: pb::FileKind::from(file.kind) as i32,
        resource_type: file.resource_type.clone(),
        phase: pb::FilePhase::from(&file.phase) as i32,
        bytes: file.progress.offset,
        resources: file.progress.resources,
        sha256: file.sha256.clone(),
        location: file.location.clone(),
        worker_id: match &file.phase {
            FilePhase::Leased { worker_id, .. } => Some(worker_id.clone()),
            _ => None,
        },
        attempts: file.attempts,
        failure_category: file.failure.as_ref().map(|(category, _)| category_to_wire(*category)),
        failure: file.failure.as_ref().map(|(_, reason)| reason.clone()),
        expected_count: file.count,
        ehr_errors: file.ehr_errors,
    }
}

/// Files in one `GetJob` answer when the caller gives no limit (about 3 MB, under gRPC's
/// default 4 MB message limit).
pub const DEFAULT_FILE_PAGE: u32 = 10_000;

/// The job with files `offset ..` (at most `limit`; 0: [`DEFAULT_FILE_PAGE`]).
pub fn job_to_pb(job: &Job, now_ms: u64, offset: u32, limit: u32) -> pb::GetJobResponse {
    let limit = if limit == 0 {
        DEFAULT_FILE_PAGE
    } else {
        limit.min(DEFAULT_FILE_PAGE)
    };
    let start = (offset as usize).min(job.files.len());
    let end = (start + limit as usize).min(job.files.len());
    pb::GetJobResponse {
        summary: Some(summary_to_pb(job, now_ms)),
        files: job.files.range(start, end).map(file_to_pb).collect(),
        file_offset: start as u32,
        next_file_offset: (end < job.files.len()).then_some(end as u32),
    }
}

/// The job's summary alone (what `WatchJob` streams).
pub fn job_summary_to_pb(job: &Job, now_ms: u64) -> pb::GetJobResponse {
    pb::GetJobResponse {
        summary: Some(summary_to_pb(job, now_ms)),
        ..Default::default()
    }
}

pub fn parse_lease_id(text: &str) -> Result<u64, Status> {
    text.parse()
        .map_err(|_| Status::invalid_argument(format!("lease_id `{text}` is not a lease id")))
}

#[cfg(test)]
mod tests {
    use fhirhaul_common::Category;
    use fhirhaul_common::download::Checkpoint;
    use fhirhaul_common::manifest::FileKind;
    use fhirhaul_proto::convert::category_from_wire;

    use super::*;

    #[test]
    fn a_job_answers_a_page_of_files_and_where_the_next_one_begins() {
        use crate::state::{Applied, Command, State};
        let mut state = State::default();
        let Applied::JobSubmitted { job_id } = state.apply(Command::test_submission()) else {
            panic!("submitted")
        };
        state.apply(Command::KickedOff {
            job_id: job_id.clone(),
            status_url: "https://ehr.example/status/1".into(),
        });
        state.apply(Command::AddFiles {
            job_id: job_id.clone(),
            files: (0..25)
                .map(|n| fhirhaul_common::manifest::ManifestFile {
                    kind: FileKind::Output,
                    resource_type: Some("Patient".into()),
                    url: format!("https://ehr.example/f/{n}").parse().unwrap(),
                    count: None,
                })
                .collect(),
            requires_access_token: true,
        });
        let job = &state.jobs[&job_id];
        let page = |offset, limit| job_to_pb(job, 0, offset, limit);
        let first = page(0, 10);
        assert_eq!(
            (first.files.len(), first.file_offset, first.next_file_offset),
            (10, 0, Some(10))
        );
        assert!(first.files[0].url.ends_with("/f/0"));
        let last = page(20, 10);
        assert_eq!(
            (last.files.len(), last.file_offset, last.next_file_offset),
            (5, 20, None)
        );
        assert!(last.files[4].url.ends_with("/f/24"));
        assert_eq!(page(0, 0).files.len(), 25, "no limit: the default page");
        let beyond = page(99, 10);
        assert!(beyond.files.is_empty() && beyond.next_file_offset.is_none());
        assert_eq!(
            beyond.summary.unwrap().files_total,
            25,
            "every page carries the whole summary"
        );
        assert!(
            job_summary_to_pb(job, 0).files.is_empty(),
            "a watch update carries no files"
        );
    }

    #[test]
    fn a_file_shows_its_failure_and_never_its_signed_query() {
        let file = FileRecord {
            url: "https://storage.example/f/1?sig=SECRET".into(),
            kind: FileKind::Error,
            resource_type: Some("OperationOutcome".into()),
            count: Some(2),
            relative_path: "job-1/error/OperationOutcome.1.ndjson".into(),
            phase: FilePhase::Failed,
            generation: 2,
            attempts: 2,
            progress: Checkpoint::default(),
            sha256: None,
            location: None,
            failure: Some((Category::Content, "line 3 is not JSON".into())),
            issues: Vec::new(),
            ehr_errors: 0,
            preferred_worker: None,
        };
        let shown = file_to_pb(&file);
        assert!(!shown.url.contains("SECRET"), "{}", shown.url);
        assert_eq!(shown.kind, pb::FileKind::Error as i32);
        assert_eq!(shown.phase, pb::FilePhase::Failed as i32);
        assert_eq!(
            category_from_wire(shown.failure_category.unwrap()),
            Ok(Category::Content)
        );
        assert_eq!(shown.failure.as_deref(), Some("line 3 is not JSON"));
    }
}
