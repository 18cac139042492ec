//! What came of each kick-off this node sent, kept past its terms of leadership so a later
//! leader can ask (`RaftService.KickoffOutcome`) before kicking off again. An accepted
//! export's status URL is also written to `<data_dir>/kickoffs/<job id, hex>` (synced)
//! until the URL is committed, so a restart does not lose it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fhirhaul_common::offload::Offload;

/// What came of a kick-off this node sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KickoffOutcome {
    /// Never sent from here (or sent before this process started and not accepted).
    Unknown,
    InProgress,
    Accepted {
        status_url: String,
    },
    NotAccepted,
    /// Sent, and the connection broke before the answer: the EHR may hold an export whose
    /// status URL nobody knows. The job fails; no leader sends it again.
    Ambiguous {
        reason: String,
    },
}

/// How an ambiguous outcome starts on disk (an accepted one is its status URL, which
/// starts with a URL scheme).
const AMBIGUOUS_PREFIX: &str = "ambiguous:";

/// The node's record of its kick-offs. Cheap to clone.
#[derive(Clone)]
pub struct KickoffLedger {
    directory: PathBuf,
    offload: Offload,
    /// Outcomes seen by this process; the disk holds accepted and ambiguous ones.
    recent: Arc<Mutex<BTreeMap<String, KickoffOutcome>>>,
}

impl KickoffLedger {
    pub fn new(data_dir: &std::path::Path, offload: Offload) -> Self {
        KickoffLedger {
            directory: data_dir.join("kickoffs"),
            offload,
            recent: Arc::default(),
        }
    }

    /// `<data_dir>/kickoffs/<job id, hex>`.
    fn path(&self, job_id: &str) -> PathBuf {
        let name: String = job_id.bytes().map(|b| format!("{b:02x}")).collect();
        self.directory.join(name)
    }

    fn remembered(&self, job_id: &str) -> Option<KickoffOutcome> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
            .cloned()
    }

    /// What came of the kick-off of `job_id` sent from this node.
    #[allow(clippy::disallowed_methods)] // std::fs only inside the offload seam.
    pub async fn outcome(&self, job_id: &str) -> KickoffOutcome {
        if let Some(outcome) = self.remembered(job_id) {
            return outcome;
        }
        let path = self.path(job_id);
        match self.offload.run(move || std::fs::read_to_string(path)).await {
            Ok(text) if text.starts_with(AMBIGUOUS_PREFIX) => KickoffOutcome::Ambiguous {
                reason: text[AMBIGUOUS_PREFIX.len()..].to_string(),
            },
            Ok(status_url) if !status_url.is_empty() => KickoffOutcome::Accepted { status_url },
            _ => KickoffOutcome::Unknown,
        }
    }

    /// Records an outcome. An accepted export's status URL, or an ambiguous outcome, is on
    /// disk (synced) before this returns: the EHR has (or may have) an export now, and only
    /// this node knows. `Unknown` forgets the job (its status URL is committed).
    #[allow(clippy::disallowed_methods)] // std::fs only inside the offload seam.
    pub async fn record(&self, job_id: &str, outcome: KickoffOutcome) {
        let path = self.path(job_id);
        let on_disk = match &outcome {
            KickoffOutcome::Accepted { status_url } => Some(status_url.clone()),
            KickoffOutcome::Ambiguous { reason } => Some(format!("{AMBIGUOUS_PREFIX}{reason}")),
            _ => None,
        };
        match &outcome {
            KickoffOutcome::Accepted { .. } | KickoffOutcome::Ambiguous { .. } => {
                let status_url = on_disk.unwrap_or_default();
                let shown = path.clone();
                let written = self
                    .offload
                    .run(move || {
                        if let Some(parent) = path.parent() {
                            fhirhaul_common::private_fs::create_dir_all(parent)?;
                        }
                        let mut file = fhirhaul_common::private_fs::create_file(&path)?;
                        std::io::Write::write_all(&mut file, status_url.as_bytes())?;
                        file.sync_all()
                    })
                    .await;
                if let Err(error) = written {
                    tracing::warn!(path = %shown.display(), %error, "could not record an accepted kick-off on disk");
                }
            }
            KickoffOutcome::Unknown => {
                let _ = self.offload.run(move || std::fs::remove_file(path)).await;
            }
            KickoffOutcome::InProgress | KickoffOutcome::NotAccepted => {}
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if outcome == KickoffOutcome::Unknown {
            recent.remove(job_id);
        } else {
            recent.insert(job_id.to_string(), outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_accepted_kickoff_survives_a_restart_until_it_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = KickoffLedger::new(dir.path(), Offload::Threads);
        assert_eq!(ledger.outcome("job-1").await, KickoffOutcome::Unknown);
        ledger.record("job-1", KickoffOutcome::InProgress).await;
        assert_eq!(ledger.outcome("job-1").await, KickoffOutcome::InProgress);
        let accepted = KickoffOutcome::Accepted {
            status_url: "https://ehr.example/status/7".into(),
        };
        ledger.record("job-1", accepted.clone()).await;
        ledger.record("job-2", KickoffOutcome::NotAccepted).await;
        let ambiguous = KickoffOutcome::Ambiguous {
            reason: "connection reset after sending".into(),
        };
        ledger.record("job-3", ambiguous.clone()).await;
        // A new process knows only what is on disk.
        let restarted = KickoffLedger::new(dir.path(), Offload::Inline);
        assert_eq!(restarted.outcome("job-1").await, accepted);
        assert_eq!(restarted.outcome("job-2").await, KickoffOutcome::Unknown);
        assert_eq!(
            restarted.outcome("job-3").await,
            ambiguous,
            "an ambiguous kick-off is never forgotten"
        );
        // Committed: forgotten, on disk too.
        restarted.record("job-1", KickoffOutcome::Unknown).await;
        let again = KickoffLedger::new(dir.path(), Offload::Threads);
        assert_eq!(again.outcome("job-1").await, KickoffOutcome::Unknown);
    }
}
