//! Shared set-up for tests that run the client core against the simulated EHR over real
//! loopback TCP.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fhirhaul_common::client::FhirClient;
use fhirhaul_common::clock::{Entropy, SystemClock};
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::download::DownloadSettings;
use fhirhaul_common::export::{ExportEvent, ExportReport, ExportSettings, run_export};
use fhirhaul_common::http::{ReqwestTransport, TransportSettings};
use fhirhaul_common::kickoff::ExportRequest;
use fhirhaul_common::status::PollSettings;
use fhirhaul_sim::{ClientCredentials, SimConfig, SimEhr};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

pub struct Harness {
    pub sim: SimEhr,
    pub tenant: TenantConfig,
    pub client: FhirClient,
    pub dir: tempfile::TempDir,
    pub cancel: CancellationToken,
}

/// A small, fast simulated EHR.
pub fn sim_config() -> SimConfig {
    SimConfig {
        patients: 40,
        max_resources_per_file: 100,
        job_duration: Duration::from_millis(200),
        ..SimConfig::default()
    }
}

/// Timings shrunk for tests (the sim asks for 1 s between polls; the tests honour its
/// hints only up to 300 ms).
pub fn fast_settings() -> ExportSettings {
    ExportSettings {
        poll: PollSettings {
            min_interval: Duration::from_millis(20),
            max_interval: Duration::from_millis(300),
            min_retry_after: Duration::from_millis(20),
            max_retry_after: Duration::from_millis(300),
            ..PollSettings::default()
        },
        download: DownloadSettings {
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            ..DownloadSettings::default()
        },
        concurrency: 4,
        max_concurrency: None,
        delete_when_done: false,
        delete_after_failure: false,
        kickoff_attempts: 5,
        kickoff_retry_ambiguous: false,
    }
}

pub fn tenant_for(sim: &SimEhr, credentials: &ClientCredentials, dir: &Path) -> TenantConfig {
    let mut tenant = fhirhaul_testkit::tenant::sim_tenant("test", sim.base_url(), credentials, dir);
    tenant.export = fast_settings();
    tenant
}

pub fn connect(tenant: &TenantConfig, cancel: &CancellationToken) -> FhirClient {
    let transport = Arc::new(ReqwestTransport::new(&TransportSettings::default()).unwrap());
    tenant
        .connect(transport, Arc::new(SystemClock), Entropy::from_seed(7), cancel.clone())
        .unwrap()
}

pub async fn harness_with(
    config: SimConfig,
    algorithm: &'static str,
    adjust: impl FnOnce(&mut TenantConfig),
) -> Harness {
    let sim = SimEhr::start(config).await.unwrap();
    let credentials = sim.new_client(algorithm);
    let dir = tempfile::tempdir().unwrap();
    let mut tenant = tenant_for(&sim, &credentials, dir.path());
    adjust(&mut tenant);
    let cancel = CancellationToken::new();
    let client = connect(&tenant, &cancel);
    Harness {
        sim,
        tenant,
        client,
        dir,
        cancel,
    }
}

pub async fn harness(config: SimConfig) -> Harness {
    harness_with(config, "ES384", |_| {}).await
}

impl Harness {
    pub fn out(&self) -> std::path::PathBuf {
        self.dir.path().join("out")
    }

    pub async fn export(&self, request: &ExportRequest) -> fhirhaul_common::Result<ExportReport> {
        self.export_collecting(request).await.0
    }

    pub async fn export_collecting(
        &self,
        request: &ExportRequest,
    ) -> (fhirhaul_common::Result<ExportReport>, Vec<String>) {
        let mut events = Vec::new();
        let result = run_export(
            &self.client,
            request,
            &self.tenant.profile,
            &self.tenant.export,
            &self.out(),
            self.cancel.clone(),
            |event| {
                events.push(describe(&event));
            },
        )
        .await;
        (result, events)
    }

    /// Every saved file equals, byte for byte, what the EHR now serves, and every file the
    /// EHR serves was saved exactly once.
    pub fn assert_identical(&self, report: &ExportReport) {
        let job = *self.sim.jobs().last().expect("a job");
        let served = self.sim.served_files(job);
        assert!(report.failed.is_empty(), "failed files: {:?}", report.failed);
        assert_eq!(report.files.len(), served.len(), "every served file saved once");
        for saved in &report.files {
            let bytes = std::fs::read(&saved.outcome.path).unwrap();
            let sha = hex(&sha2::Sha256::digest(&bytes));
            assert_eq!(sha, saved.outcome.sha256, "reported hash matches the file on disk");
            let matching = served.iter().find(|s| s.sha256 == sha);
            let served_file =
                matching.unwrap_or_else(|| panic!("{} matches no served file", saved.outcome.path.display()));
            assert_eq!(served_file.bytes, bytes.len() as u64);
            assert_eq!(
                served_file.count, saved.outcome.resources,
                "resource count equals the served count"
            );
            assert_eq!(saved.outcome.count_mismatch, None);
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn describe(event: &ExportEvent) -> String {
    match event {
        ExportEvent::Accepted { .. } => "accepted".into(),
        ExportEvent::Poll(poll) => format!("poll {poll:?}"),
        ExportEvent::ManifestReady { files, .. } => format!("manifest {files}"),
        ExportEvent::FileDone { outcome, .. } => format!("done {}", outcome.path.display()),
        ExportEvent::FileFailed { error, .. } => format!("failed {error}"),
    }
}
