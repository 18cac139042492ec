//! A job as `summary.json` describes it, in the shape every export path shares
//! ([`fhirhaul_common::output::Summary`]).

use fhirhaul_common::Category;
use fhirhaul_common::output::{Summary, SummaryFailure, SummaryFile};
use fhirhaul_common::url_util::SafeUrl;

use super::{FilePhase, Job};

impl Job {
    pub fn summary(&self) -> Summary {
        let files = self
            .files
            .iter()
            .filter(|f| f.phase == FilePhase::Done)
            .map(|f| SummaryFile {
                path: f.location.clone().unwrap_or_default(),
                kind: f.kind,
                resource_type: f.resource_type.clone(),
                url: SafeUrl::from(f.url.as_str()).to_string(),
                sha256: f.sha256.clone().unwrap_or_default(),
                bytes: f.progress.offset,
                resources: f.progress.resources,
                expected_count: f.count,
                issues: f.issues.clone(),
                ehr_errors: f.ehr_errors,
            })
            .collect();
        let failed = self
            .files
            .iter()
            .filter(|f| f.phase == FilePhase::Failed)
            .map(|f| {
                let (category, error) = f
                    .failure
                    .clone()
                    .unwrap_or((Category::Cancelled, "no reason recorded".into()));
                SummaryFailure {
                    kind: f.kind,
                    resource_type: f.resource_type.clone(),
                    url: SafeUrl::from(f.url.as_str()).to_string(),
                    category,
                    error,
                }
            })
            .collect();
        Summary {
            job_id: Some(self.id.clone()),
            phase: format!("{:?}", self.phase),
            status_url: self.status_url.as_deref().map(|u| SafeUrl::from(u).to_string()),
            transaction_time: self.transaction_time.clone(),
            error: self.error.clone(),
            files,
            failed,
            failures_by_category: Default::default(),
        }
        .count_failures()
    }
}

#[cfg(test)]
mod tests {
    use fhirhaul_common::kickoff::ExportRequest;
    use fhirhaul_common::manifest::{FileKind, ManifestFile};

    use crate::state::{Applied, Command, State};

    use super::*;

    #[test]
    fn a_job_summary_lists_done_and_failed_files_without_signed_queries() {
        let mut state = State::default();
        state.apply(Command::SubmitJob {
            tenant: "t".into(),
            request: ExportRequest::default(),
            max_file_attempts: 1,
            at_ms: 0,
            request_id: None,
            export_id: None,
            delete_policy: Default::default(),
        });
        state.apply(Command::KickedOff {
            job_id: "job-1".into(),
            status_url: "https://ehr.example/status/1?token=SECRET".into(),
        });
        state.apply(Command::AddFiles {
            job_id: "job-1".into(),
            files: (0..2)
                .map(|n| ManifestFile {
                    kind: FileKind::Output,
                    resource_type: Some("Patient".into()),
                    url: format!("https://storage.example/f/{n}?sig=SECRET").parse().unwrap(),
                    count: None,
                })
                .collect(),
            requires_access_token: false,
        });
        state.apply(Command::RegisterWorker {
            worker_id: "w".into(),
            concurrency: 2,
            at_ms: 0,
        });
        let mut grants = Vec::new();
        for file in 0..2 {
            let Applied::LeaseGranted(grant) = state.apply(Command::GrantLease {
                job_id: "job-1".into(),
                file,
                worker_id: "w".into(),
                expires_at_ms: 10,
                granted_at_ms: 0,
            }) else {
                panic!("granted")
            };
            grants.push(grant);
        }
        state.apply(Command::CompleteLease {
            lease_id: grants[0].lease_id,
            generation: grants[0].generation,
            bytes: 10,
            resources: 1,
            sha256: "ab".repeat(32),
            location: "/out/job-1/Patient.1.ndjson".into(),
            issues: Vec::new(),
            ehr_errors: 0,
            at_ms: 0,
        });
        state.apply(Command::FailLease {
            lease_id: grants[1].lease_id,
            generation: grants[1].generation,
            category: Category::Content,
            reason: "line 2 is not JSON".into(),
            retryable: false,
            released: false,
            at_ms: 0,
        });
        state.apply(Command::ManifestComplete {
            job_id: "job-1".into(),
            transaction_time: "2024-01-01T00:00:00Z".into(),
            links_expire_ms: None,
        });
        let summary = state.jobs["job-1"].summary();
        assert_eq!(summary.phase, "Completed");
        assert_eq!(summary.files.len(), 1);
        assert_eq!(summary.files[0].path, "/out/job-1/Patient.1.ndjson");
        assert_eq!(summary.failed.len(), 1);
        assert_eq!(summary.failed[0].category, Category::Content);
        assert_eq!(summary.failures_by_category[&Category::Content], 1);
        let json = serde_json::to_string(&summary).unwrap();
        assert!(!json.contains("SECRET"), "{json}");
    }
}
