//! How an export's output is laid out and described, for every way of running one (the
//! single-process [`crate::export::run_export`] and the cluster): one file-naming rule
//! ([`OutputNames`]) and one `summary.json` ([`Summary`], written by [`write_summary`]).
//!
//! Names come from validated type names and counters, never from URLs, so a hostile
//! manifest cannot write outside the export's directory: `<Type>.<n>.ndjson`,
//! `deleted/<Type>.<n>.ndjson`, `error/<Type>.<n>.ndjson` (`Organized` for files of an
//! `organizeOutputBy` export, which carry no type).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Category, Error, Result};
use crate::manifest::{FileKind, ManifestFile};
use crate::offload::Offload;

/// Hands out each file's path under its export directory. Serializable, so a replicated
/// job keeps naming where it left off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OutputNames {
    /// Files named so far, by folder and type (`"Patient"`, `"deleted/Bundle"`).
    counters: BTreeMap<String, u32>,
}

impl OutputNames {
    /// The next path for `file`, relative to the export directory.
    pub fn next(&mut self, file: &ManifestFile) -> String {
        let kind = file.resource_type.as_deref().unwrap_or("Organized");
        let folder = match file.kind {
            FileKind::Output => "",
            FileKind::Deleted => "deleted/",
            FileKind::Error => "error/",
        };
        let counter = self.counters.entry(format!("{folder}{kind}")).or_default();
        *counter += 1;
        format!("{folder}{kind}.{counter}.ndjson")
    }
}

/// `summary.json`: what a user checks after an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The cluster's job id (none for a single-process export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `Completed`, `Failed` or `Cancelled`.
    pub phase: String,
    /// The EHR's status URL, without its query.
    pub status_url: Option<String>,
    /// The manifest's `transactionTime`: the `_since` of the next incremental export.
    pub transaction_time: Option<String>,
    /// Why the export itself failed, in the EHR's words.
    pub error: Option<String>,
    pub files: Vec<SummaryFile>,
    pub failed: Vec<SummaryFailure>,
    pub failures_by_category: BTreeMap<Category, usize>,
}

/// A file saved and verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryFile {
    /// Where it is (a path, or a sink's location).
    pub path: String,
    pub kind: FileKind,
    pub resource_type: Option<String>,
    /// The manifest URL it came from, without its query.
    pub url: String,
    pub sha256: String,
    pub bytes: u64,
    pub resources: u64,
    /// The manifest's `count`, when it gave one.
    #[serde(default)]
    pub expected_count: Option<u64>,
    pub issues: Vec<String>,
    /// For an `error` file: its OperationOutcomes reporting an error or fatal issue.
    #[serde(default)]
    pub ehr_errors: u64,
}

/// A file that could not be saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryFailure {
    pub kind: FileKind,
    pub resource_type: Option<String>,
    /// The manifest URL, without its query.
    pub url: String,
    pub category: Category,
    pub error: String,
}

impl Summary {
    /// Counts `failed` by category into `failures_by_category`.
    pub fn count_failures(mut self) -> Self {
        self.failures_by_category.clear();
        for failure in &self.failed {
            *self.failures_by_category.entry(failure.category).or_default() += 1;
        }
        self
    }

    /// Resources exported: the lines of `output` files (not error records or deletions).
    pub fn resources(&self) -> u64 {
        self.lines_of(FileKind::Output)
    }

    /// OperationOutcome records in the EHR's `error` files.
    pub fn error_records(&self) -> u64 {
        self.lines_of(FileKind::Error)
    }

    /// Those error records that report an error or fatal issue: data the EHR says it could
    /// not export.
    pub fn ehr_errors(&self) -> u64 {
        self.files.iter().map(|f| f.ehr_errors).sum()
    }

    /// Transaction Bundles of DELETE entries in `deleted` files.
    pub fn deletion_bundles(&self) -> u64 {
        self.lines_of(FileKind::Deleted)
    }

    fn lines_of(&self, kind: FileKind) -> u64 {
        self.files.iter().filter(|f| f.kind == kind).map(|f| f.resources).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Writes `summary` as `<dir>/summary.json` (creating `dir`) and returns its path.
pub async fn write_summary(dir: &Path, summary: &Summary, offload: Offload) -> Result<PathBuf> {
    let json = serde_json::to_vec_pretty(summary).map_err(|e| Error::io("encoding", dir, std::io::Error::other(e)))?;
    let (dir, path) = (dir.to_path_buf(), dir.join("summary.json"));
    let written = path.clone();
    #[allow(clippy::disallowed_methods)] // Inside the offload seam.
    let outcome = offload
        .run(move || {
            crate::private_fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
            crate::private_fs::write(&written, &json).map_err(|e| Error::io("writing", &written, e))
        })
        .await;
    outcome.map(|()| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(kind: FileKind, resource_type: Option<&str>, n: u32) -> ManifestFile {
        ManifestFile {
            kind,
            resource_type: resource_type.map(String::from),
            url: format!("https://ehr.example/f/{n}").parse().unwrap(),
            count: None,
        }
    }

    #[test]
    fn names_count_per_folder_and_type_and_never_come_from_the_url() {
        let mut names = OutputNames::default();
        assert_eq!(
            names.next(&file(FileKind::Output, Some("Patient"), 1)),
            "Patient.1.ndjson"
        );
        assert_eq!(
            names.next(&file(FileKind::Output, Some("Patient"), 2)),
            "Patient.2.ndjson"
        );
        assert_eq!(
            names.next(&file(FileKind::Deleted, Some("Patient"), 3)),
            "deleted/Patient.1.ndjson"
        );
        assert_eq!(
            names.next(&file(FileKind::Error, Some("OperationOutcome"), 4)),
            "error/OperationOutcome.1.ndjson"
        );
        assert_eq!(names.next(&file(FileKind::Output, None, 5)), "Organized.1.ndjson");
        // A replicated job's counters survive a snapshot unchanged.
        let json = serde_json::to_string(&names).unwrap();
        assert_eq!(
            json,
            r#"{"Organized":1,"Patient":2,"deleted/Patient":1,"error/OperationOutcome":1}"#
        );
        let mut restored: OutputNames = serde_json::from_str(&json).unwrap();
        assert_eq!(
            restored.next(&file(FileKind::Output, Some("Patient"), 6)),
            "Patient.3.ndjson"
        );
    }

    #[tokio::test]
    async fn a_summary_is_written_with_failures_counted_by_category() {
        let dir = tempfile::tempdir().unwrap();
        let failure = |category| SummaryFailure {
            kind: FileKind::Output,
            resource_type: Some("Patient".into()),
            url: "https://ehr.example/f/1".into(),
            category,
            error: "cut".into(),
        };
        let summary = Summary {
            job_id: Some("job-1".into()),
            phase: "Completed".into(),
            status_url: None,
            transaction_time: Some("2024-01-01T00:00:00Z".into()),
            error: None,
            files: Vec::new(),
            failed: vec![
                failure(Category::Network),
                failure(Category::Network),
                failure(Category::Content),
            ],
            failures_by_category: BTreeMap::new(),
        }
        .count_failures();
        let path = write_summary(&dir.path().join("job-1"), &summary, Offload::Threads)
            .await
            .unwrap();
        #[allow(clippy::disallowed_methods)]
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(json["failures_by_category"]["network"], 2);
        assert_eq!(json["failures_by_category"]["content"], 1);
        assert_eq!(json["failed"][0]["category"], "network");
        assert_eq!(json["job_id"], "job-1");
    }
}
