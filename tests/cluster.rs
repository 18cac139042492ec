//! The cluster as separate processes on 127.0.0.1: a coordinator, workers, and the
//! simulated EHR (in this test process, so its observations can be asserted). Processes
//! are killed with SIGKILL where the test says so, and always at the end.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_client::AdminServiceClient;
use fhirhaul_proto::v1::worker_service_client::WorkerServiceClient;
use fhirhaul_sim::{SimConfig, SimEhr};
use fhirhaul_testkit::processes::{
    Process, assert_completed, assert_output_identical, export_dir, free_port, has_ended, sim_with_tenant,
    spawn_coordinator, spawn_worker, wait_for_job,
};

struct Cluster {
    sim: SimEhr,
    dir: tempfile::TempDir,
    port: u16,
    coordinator: Option<Process>,
    workers: BTreeMap<String, Process>,
    lease: &'static str,
    /// Set for mutual TLS: the client configuration and the workers' TLS arguments.
    tls: Option<(tonic::transport::ClientTlsConfig, Vec<String>)>,
}

impl Cluster {
    async fn start(config: SimConfig, lease: &'static str) -> Cluster {
        Self::start_with(config, lease, "", None).await
    }

    async fn start_with(
        config: SimConfig,
        lease: &'static str,
        extra_toml: &str,
        tls: Option<(tonic::transport::ClientTlsConfig, Vec<String>)>,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (sim, tenant) = sim_with_tenant(config, dir.path()).await;
        let config = format!("{tenant}{extra_toml}\n");
        std::fs::write(dir.path().join("fhirhaul.toml"), config).unwrap();
        let mut cluster = Cluster {
            sim,
            dir,
            port: free_port(),
            coordinator: None,
            workers: BTreeMap::new(),
            lease,
            tls,
        };
        cluster.start_coordinator();
        cluster
    }

    fn address(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    async fn channel(&self) -> Option<tonic::transport::Channel> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.address()).ok()?;
        if let Some((tls, _)) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).ok()?;
        }
        endpoint.connect().await.ok()
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn start_coordinator(&mut self) {
        self.coordinator = Some(spawn_coordinator(
            &self.dir.path().join("fhirhaul.toml"),
            self.port,
            &self.dir.path().join("coordinator"),
            &["--lease-duration", self.lease],
        ));
    }

    fn start_worker(&mut self, name: &str) {
        let tls = self.tls.as_ref().map(|(_, args)| args.clone()).unwrap_or_default();
        let worker = spawn_worker(
            &self.address(),
            name,
            &self.out(),
            &self.dir.path().join("workers").join(name),
            &tls,
        );
        self.workers.insert(name.to_string(), worker);
    }

    async fn admin(&self) -> AdminServiceClient<tonic::transport::Channel> {
        for _ in 0..50 {
            if let Some(channel) = self.channel().await {
                return AdminServiceClient::new(channel);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("coordinator unreachable");
    }

    async fn submit(&self, request_json: &str) -> String {
        self.submit_for("sim", request_json, false).await
    }

    async fn submit_for(&self, tenant: &str, request_json: &str, incremental: bool) -> String {
        self.submission(tenant, request_json, incremental).await.job_id
    }

    async fn submission(&self, tenant: &str, request_json: &str, incremental: bool) -> pb::SubmitExportResponse {
        let mut admin = self.admin().await;
        let submitted = admin.submit_export(pb::SubmitExportRequest {
            tenant: tenant.into(),
            request_json: request_json.into(),
            incremental,
            request_id: String::new(),
        });
        let response = tokio::time::timeout(Duration::from_secs(30), submitted)
            .await
            .unwrap_or_else(|_| panic!("submitting to {tenant} got no answer in 30 s"))
            .unwrap();
        response.into_inner()
    }

    async fn job(&self, job_id: &str) -> Option<pb::GetJobResponse> {
        let mut admin = AdminServiceClient::new(self.channel().await?);
        admin
            .get_job(pb::GetJobRequest {
                job_id: job_id.into(),
                ..Default::default()
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Polls the job until `done` holds, or panics after `limit`.
    async fn wait_for(
        &self,
        job_id: &str,
        limit: Duration,
        done: impl Fn(&pb::GetJobResponse) -> bool,
    ) -> pb::GetJobResponse {
        wait_for_job(|| self.job(job_id), &format!("job {job_id}"), limit, done).await
    }

    async fn wait_completed(&self, job_id: &str, limit: Duration) -> pb::GetJobResponse {
        let job = self.wait_for(job_id, limit, has_ended).await;
        assert_completed(&job);
        job
    }

    async fn assert_output_identical(&self, job_id: &str) -> usize {
        let job = self.wait_for(job_id, Duration::from_secs(10), |_| true).await;
        assert_output_identical(&self.sim, &export_dir(&self.out(), &job))
    }
}

fn leased_by(job: &pb::GetJobResponse) -> Vec<(usize, String, u64)> {
    job.files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.phase == pb::FilePhase::Leased as i32)
        .filter_map(|(i, f)| f.worker_id.clone().map(|w| (i, w, f.bytes)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_files_over_three_worker_processes_arrive_byte_identical() {
    let config = SimConfig {
        patients: 100,
        max_resources_per_file: 12,
        job_duration: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    for name in ["w1", "w2", "w3"] {
        cluster.start_worker(name);
    }
    let job_id = cluster.submit("").await;
    cluster.wait_completed(&job_id, Duration::from_secs(120)).await;
    let files = cluster.assert_output_identical(&job_id).await;
    assert!(files >= 50, "only {files} files");
    assert_eq!(cluster.sim.observed().kickoffs.len(), 1);
    // `fhirhaul status <job>` lists every file (paged from the coordinator).
    let status = fhirhaul_testkit::processes::fhirhaul()
        .args(["status", "--coordinator", &cluster.address(), &job_id])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.trim_start().starts_with("done ")).count(),
        files,
        "{stdout}"
    );
    let mut admin = cluster.admin().await;
    let workers = admin
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 3);
}

/// Big files on a slow link, so a kill lands mid-download.
fn slow_config() -> SimConfig {
    SimConfig {
        patients: 120,
        max_resources_per_file: 100_000,
        job_duration: Duration::from_millis(200),
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_leases_expire_and_others_finish_the_export() {
    let mut cluster = Cluster::start(slow_config(), "2s").await;
    cluster.sim.set_faults(|f| f.throttle_bytes_per_sec = Some(150_000));
    for name in ["w1", "w2", "w3"] {
        cluster.start_worker(name);
    }
    let job_id = cluster.submit("").await;
    // The biggest file (Observation, ~0.5 MB: seconds on this link), so the kill lands
    // mid-download rather than just after a small file finished.
    let big_and_started = |job: &pb::GetJobResponse, (index, _, bytes): &(usize, String, u64)| {
        *bytes > 0 && job.files[*index].resource_type.as_deref() == Some("Observation")
    };
    let job = cluster
        .wait_for(&job_id, Duration::from_secs(60), |job| {
            leased_by(job).iter().any(|leased| big_and_started(job, leased))
        })
        .await;
    let (file, victim, _) = leased_by(&job)
        .into_iter()
        .find(|leased| big_and_started(&job, leased))
        .unwrap();
    cluster.workers.get_mut(&victim).unwrap().kill_hard();
    let job = cluster.wait_completed(&job_id, Duration::from_secs(120)).await;
    cluster.assert_output_identical(&job_id).await;
    assert!(
        job.files[file].attempts >= 2,
        "the killed worker's file was leased again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_resumes_its_partial_file_with_a_range_request() {
    let mut cluster = Cluster::start(slow_config(), "5s").await;
    cluster.sim.set_faults(|f| f.throttle_bytes_per_sec = Some(150_000));
    cluster.start_worker("w1");
    let job_id = cluster.submit(r#"{"types":["Observation"]}"#).await;
    // Wait until the coordinator has seen progress (so a checkpoint exists on w1's disk).
    cluster
        .wait_for(&job_id, Duration::from_secs(60), |job| {
            leased_by(job).iter().any(|(_, _, bytes)| *bytes > 50_000)
        })
        .await;
    cluster.workers.get_mut("w1").unwrap().kill_hard();
    cluster.sim.set_faults(|f| f.throttle_bytes_per_sec = None);
    cluster.start_worker("w1");
    cluster.wait_completed(&job_id, Duration::from_secs(60)).await;
    cluster.assert_output_identical(&job_id).await;
    let observed = cluster.sim.observed();
    let served = std::fs::read(&cluster.sim.served_files(1)[0].path).unwrap();
    let resumed: Vec<u64> = observed
        .file_requests
        .iter()
        .filter_map(|r| r.range.as_deref())
        .filter_map(|r| r.trim_start_matches("bytes=").trim_end_matches('-').parse().ok())
        .collect();
    assert_eq!(resumed.len(), 1, "one resume: {resumed:?}");
    let offset = resumed[0] as usize;
    assert!(
        offset > 0 && served[offset - 1] == b'\n',
        "the resume starts at the checkpointed line boundary {offset}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_polling_and_never_kicks_off_twice() {
    let config = SimConfig {
        patients: 40,
        max_resources_per_file: 20,
        job_duration: Duration::from_secs(3),
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start(config, "3s").await;
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    let job_id = cluster.submit("").await;
    cluster
        .wait_for(&job_id, Duration::from_secs(30), |job| {
            job.summary
                .as_ref()
                .is_some_and(|s| s.phase == pb::JobPhase::Polling as i32)
        })
        .await;
    // Killed and reaped: its port and its sled lock are free at once.
    cluster.coordinator.take().unwrap().kill_hard();
    cluster.start_coordinator();
    cluster.wait_completed(&job_id, Duration::from_secs(60)).await;
    cluster.assert_output_identical(&job_id).await;
    let observed = cluster.sim.observed();
    assert_eq!(observed.kickoffs.len(), 1, "exactly one kick-off reached the EHR");
    assert!(observed.status_requests >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_expiring_during_the_export_fails_no_file() {
    // Many ~100 KB files at 100 KB/s over four slots: the export outlives several tokens,
    // and files keep starting after the first token has expired.
    let config = SimConfig {
        token_lifetime: Duration::from_secs(2),
        max_resources_per_file: 200,
        ..slow_config()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    cluster.sim.set_faults(|f| f.throttle_bytes_per_sec = Some(100_000));
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    let started = tokio::time::Instant::now();
    let job_id = cluster.submit("").await;
    cluster.wait_completed(&job_id, Duration::from_secs(120)).await;
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "the export outlived the first token"
    );
    cluster.assert_output_identical(&job_id).await;
    let observed = cluster.sim.observed();
    assert!(
        observed.tokens_issued >= 2,
        "tokens were refreshed during the export: {}",
        observed.tokens_issued
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lease_holders_renewal_and_completion_are_refused() {
    let config = SimConfig {
        patients: 10,
        job_duration: Duration::from_millis(100),
        ..SimConfig::default()
    };
    let cluster = Cluster::start(config, "1s").await;
    let job_id = cluster.submit(r#"{"types":["Patient"]}"#).await;
    let mut workers = WorkerServiceClient::connect(cluster.address()).await.unwrap();
    for name in ["stale", "fresh"] {
        workers
            .register(pb::RegisterRequest {
                name: name.into(),
                concurrency: 1,
            })
            .await
            .unwrap();
    }
    let acquire = |name: &'static str| {
        let mut client = workers.clone();
        async move {
            client
                .acquire_lease(pb::AcquireLeaseRequest {
                    worker_id: name.into(),
                    wait_ms: 10_000,
                })
                .await
                .unwrap()
                .into_inner()
                .lease
                .expect("a lease")
        }
    };
    let first = acquire("stale").await;
    // "stale" goes silent; after the lease period the file goes to "fresh".
    let second = acquire("fresh").await;
    assert_eq!(second.file_url, first.file_url);
    assert_eq!(second.generation, first.generation + 1);
    let complete = |lease: &pb::Lease, worker: &str| pb::CompleteLeaseRequest {
        worker_id: worker.into(),
        lease_id: lease.lease_id.clone(),
        generation: lease.generation,
        bytes: 1,
        resources: 1,
        sha256: "0".repeat(64),
        location: "/nowhere".into(),
        issues: vec![],
        ehr_errors: 0,
        throttled: 0,
    };
    let renewal = workers
        .renew_lease(pb::RenewLeaseRequest {
            worker_id: "stale".into(),
            lease_id: first.lease_id.clone(),
            generation: first.generation,
            progress: None,
            throttled: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(renewal.code(), tonic::Code::Aborted, "{renewal:?}");
    let refused = workers.complete_lease(complete(&first, "stale")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Aborted);
    assert!(
        refused.message().contains("not live") || refused.message().contains("stale"),
        "{}",
        refused.message()
    );
    workers.complete_lease(complete(&second, "fresh")).await.unwrap();
    let job = cluster.job(&job_id).await.unwrap();
    assert_eq!(
        job.files[0].location.as_deref(),
        Some("/nowhere"),
        "the newer owner's result stands"
    );
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_protects_the_cluster_apis() {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let certs = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = issue(vec!["worker".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let ca = write_pem(certs.path(), "ca.pem", &ca_cert.pem());
    let server_cert = write_pem(certs.path(), "server.pem", &server_cert);
    let server_key = write_pem(certs.path(), "server.key", &server_key);
    let client_cert_path = write_pem(certs.path(), "client.pem", &client_cert);
    let client_key_path = write_pem(certs.path(), "client.key", &client_key);
    let extra = format!(
        "[cluster.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        ca.display(),
        server_cert.display(),
        server_key.display()
    );
    let ca_certificate = tonic::transport::Certificate::from_pem(ca_cert.pem());
    let client_tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca_certificate.clone())
        .identity(tonic::transport::Identity::from_pem(client_cert, client_key));
    let worker_args = vec![
        "--tls-ca".to_string(),
        ca.display().to_string(),
        "--tls-cert".to_string(),
        client_cert_path.display().to_string(),
        "--tls-key".to_string(),
        client_key_path.display().to_string(),
    ];
    let config = SimConfig {
        patients: 20,
        job_duration: Duration::from_millis(100),
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start_with(config, "5s", &extra, Some((client_tls, worker_args))).await;
    cluster.start_worker("w1");
    let job_id = cluster.submit("").await;
    cluster.wait_completed(&job_id, Duration::from_secs(60)).await;
    cluster.assert_output_identical(&job_id).await;

    // Without a client certificate, or without TLS, nothing gets through.
    let no_identity = tonic::transport::ClientTlsConfig::new().ca_certificate(ca_certificate);
    let refused = match tonic::transport::Endpoint::from_shared(cluster.address())
        .unwrap()
        .tls_config(no_identity)
        .unwrap()
        .connect()
        .await
    {
        Ok(channel) => AdminServiceClient::new(channel)
            .list_jobs(pb::ListJobsRequest {})
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was let in");
    let plaintext = format!("http://127.0.0.1:{}", cluster.port);
    let refused = match AdminServiceClient::connect(plaintext).await {
        Ok(mut client) => client.list_jobs(pb::ListJobsRequest {}).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext client was let in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_export_uses_the_last_transaction_time_as_since() {
    let config = SimConfig {
        patients: 20,
        job_duration: Duration::from_millis(100),
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    cluster.start_worker("w1");
    let first = cluster.submit("").await;
    let done = cluster.wait_completed(&first, Duration::from_secs(60)).await;
    let transaction_time = done.summary.unwrap().transaction_time.expect("transactionTime kept");
    // Let the EHR's clock (the wall clock, to the second) pass the first export's
    // transactionTime: a condition with a deadline, not a fixed wait.
    let first_instant = time::OffsetDateTime::parse(&transaction_time, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 transactionTime");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while time::OffsetDateTime::now_utc().unix_timestamp() <= first_instant.unix_timestamp() {
        assert!(tokio::time::Instant::now() < deadline, "the clock did not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = cluster.submission("sim", "", true).await;
    assert_eq!(
        (second.since.as_deref(), second.since_from_job.as_deref()),
        (Some(transaction_time.as_str()), Some(first.as_str())),
        "the submission names the cursor it uses and the job it came from"
    );
    cluster.wait_completed(&second.job_id, Duration::from_secs(60)).await;
    let kickoffs = cluster.sim.observed().kickoffs;
    assert_eq!(kickoffs.len(), 2);
    assert!(!kickoffs[0].params.iter().any(|(k, _)| k == "_since"));
    let since: Vec<&str> = kickoffs[1]
        .params
        .iter()
        .filter(|(k, _)| k == "_since")
        .map(|(_, v)| v.as_str())
        .collect();
    let expected =
        time::OffsetDateTime::parse(&transaction_time, &time::format_description::well_known::Rfc3339).unwrap();
    let sent = time::OffsetDateTime::parse(since[0], &time::format_description::well_known::Rfc3339).unwrap();
    assert_eq!(sent, expected, "the second export starts where the first ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_ends_the_job_once_with_the_ehrs_words_and_few_token_requests() {
    // Many ~100 KB files at 100 KB/s over four slots: the key is revoked mid-download.
    let config = SimConfig {
        max_resources_per_file: 200,
        ..slow_config()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    cluster.sim.set_faults(|f| f.throttle_bytes_per_sec = Some(100_000));
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    let job_id = cluster.submit("").await;
    cluster
        .wait_for(&job_id, Duration::from_secs(60), |job| {
            job.summary.as_ref().is_some_and(|s| s.files_done >= 1)
        })
        .await;
    let before = cluster.sim.observed().token_requests;
    cluster.sim.revoke_clients();
    let job = cluster.wait_for(&job_id, Duration::from_secs(60), has_ended).await;
    let summary = job.summary.clone().unwrap();
    assert_eq!(summary.phase, pb::JobPhase::Failed as i32, "{summary:?}");
    let error = summary.error.unwrap_or_default();
    assert!(
        error.contains("the EHR refused the client")
            && error.contains("invalid_client")
            && error.contains("unknown client"),
        "the EHR's own words: {error}"
    );
    let after = cluster.sim.observed().token_requests - before;
    // One refresh when the revoked token is refused, answered from memory for every other
    // worker and file (the hold is longer than this test): not one per file or attempt.
    assert!(after <= 2, "{after} token requests after the revocation");
    assert!(
        job.files
            .iter()
            .filter(|f| f.phase != pb::FilePhase::Done as i32)
            .all(|f| f.failure_category == Some(pb::FailureCategory::Auth as i32)),
        "every unfinished file failed as auth"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_sent_twice_with_one_request_id_is_one_job_and_one_kickoff() {
    let config = SimConfig {
        patients: 10,
        job_duration: Duration::from_millis(100),
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    cluster.start_worker("w1");
    let submit = || pb::SubmitExportRequest {
        tenant: "sim".into(),
        request_json: r#"{"types":["Patient"]}"#.into(),
        incremental: false,
        request_id: "cli-3b9e0c".into(),
    };
    let first = cluster
        .admin()
        .await
        .submit_export(submit())
        .await
        .unwrap()
        .into_inner();
    // The answer was lost, say: the CLI asks again with the same id.
    let again = cluster
        .admin()
        .await
        .submit_export(submit())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert!(!again.created, "the retry found the first job");
    assert_eq!(again.job_id, first.job_id);
    cluster.wait_completed(&first.job_id, Duration::from_secs(60)).await;
    let jobs = cluster
        .admin()
        .await
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1);
    assert_eq!(cluster.sim.observed().kickoffs.len(), 1, "one export at the EHR");
    let refused = cluster
        .admin()
        .await
        .submit_export(pb::SubmitExportRequest {
            request_id: "not printable\u{7}".into(),
            ..submit()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_started_again_with_fresh_state_never_overwrites_the_first_export() {
    let config = SimConfig {
        patients: 20,
        job_duration: Duration::from_millis(100),
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    cluster.start_worker("w1");
    let first_id = cluster.submit(r#"{"types":["Patient","Condition"]}"#).await;
    let first = cluster.wait_completed(&first_id, Duration::from_secs(60)).await;
    // A new user's mistake: the same output directory, a new data directory.
    cluster.coordinator.take().unwrap().kill_hard();
    cluster.workers.clear();
    std::fs::remove_dir_all(cluster.dir.path().join("coordinator")).unwrap();
    std::fs::remove_dir_all(cluster.dir.path().join("workers")).unwrap();
    cluster.start_coordinator();
    cluster.start_worker("w1");
    let second_id = cluster.submit(r#"{"types":["Patient","Condition"]}"#).await;
    assert_eq!(second_id, first_id, "fresh state numbers its jobs from 1 again");
    let second = cluster.wait_completed(&second_id, Duration::from_secs(60)).await;
    let (first_dir, second_dir) = (export_dir(&cluster.out(), &first), export_dir(&cluster.out(), &second));
    assert_ne!(first_dir, second_dir, "each export has a directory of its own");
    for job in [&first, &second] {
        for file in &job.files {
            let location = file.location.as_ref().expect("published");
            let bytes = std::fs::read(location).unwrap();
            let sha: String = fhirhaul_testkit::processes::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            assert_eq!(Some(&sha), file.sha256.as_ref(), "{location} is intact");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_is_closed_to_the_network_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, tenant) = sim_with_tenant(SimConfig::default(), dir.path()).await;
    let config = dir.path().join("fhirhaul.toml");
    std::fs::write(&config, &tenant).unwrap();
    let coordinator = |listen: &str, token: Option<&str>| {
        let mut command = fhirhaul_testkit::processes::fhirhaul();
        command
            .arg("coordinator")
            .arg("--config")
            .arg(&config)
            .args(["--listen", listen])
            .arg("--data-dir")
            .arg(dir.path().join("coordinator"))
            .env_remove("FHIRHAUL_CLUSTER_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(token) = token {
            command.env("FHIRHAUL_CLUSTER_TOKEN", token);
        }
        command
    };
    // Every interface, no TLS, no token: refused, naming both ways to fix it.
    let refused = coordinator("0.0.0.0:0", None).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("[cluster.tls]") && stderr.contains("FHIRHAUL_CLUSTER_TOKEN"),
        "{stderr}"
    );
    // Reflection (unauthenticated: it lists every API) is served on loopback only.
    let reflection = |port: u16| async move {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ServerReflectionClient::new(channel);
        match client.server_reflection_info(tokio_stream::iter(vec![request])).await {
            Ok(mut answers) => answers.get_mut().message().await.map(|m| m.is_some()),
            Err(status) => Err(status),
        }
    };
    let loopback = free_port();
    let mut child = coordinator(&format!("127.0.0.1:{loopback}"), None).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let running = Process(child);
    assert!(line.contains("coordinator listening on"), "{line:?}");
    assert_eq!(
        reflection(loopback).await.ok(),
        Some(true),
        "reflection answers on loopback"
    );
    drop(running);
    // With a cluster token it serves, and a call without the token gets nothing.
    let port = free_port();
    let mut child = coordinator(&format!("0.0.0.0:{port}"), Some("s3cret-token"))
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let _running = Process(child);
    assert!(line.contains("coordinator listening on"), "{line:?}");
    let refused = reflection(port).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::Unimplemented,
        "no reflection beyond loopback unless --reflection"
    );
    let mut workers = WorkerServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let refused = workers
        .get_token(pb::GetTokenRequest {
            worker_id: "intruder".into(),
            tenant: "sim".into(),
            refused_generation: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let refused = workers
        .register(pb::RegisterRequest {
            name: "intruder".into(),
            concurrency: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_count_disagrees_is_fetched_once_more_then_failed_as_incomplete() {
    let config = SimConfig {
        patients: 30,
        job_duration: Duration::from_millis(100),
        ..SimConfig::default()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    // The manifest says every Patient file holds one resource more than it does.
    cluster.sim.set_faults(|f| f.count_off_by = Some(("Patient".into(), 1)));
    cluster.start_worker("w1");
    let job_id = cluster.submit(r#"{"types":["Patient","Condition"]}"#).await;
    let job = cluster.wait_for(&job_id, Duration::from_secs(60), has_ended).await;
    let summary = job.summary.clone().unwrap();
    assert_eq!(summary.phase, pb::JobPhase::Completed as i32);
    let patients: Vec<&pb::FileState> = job
        .files
        .iter()
        .filter(|f| f.resource_type.as_deref() == Some("Patient"))
        .collect();
    assert!(!patients.is_empty());
    for file in &patients {
        assert_eq!(
            file.phase,
            pb::FilePhase::Failed as i32,
            "a short file does not pass: {file:?}"
        );
        assert_eq!(file.failure_category, Some(pb::FailureCategory::Incomplete as i32));
        let reason = file.failure.clone().unwrap_or_default();
        assert!(reason.contains("manifest's count is"), "{reason}");
        assert_eq!(file.attempts, 1, "the second download happens within the one lease");
    }
    for file in job
        .files
        .iter()
        .filter(|f| f.resource_type.as_deref() == Some("Condition"))
    {
        assert_eq!(file.phase, pb::FilePhase::Done as i32);
        assert_eq!(file.expected_count, Some(file.resources), "counts shown side by side");
    }
    let downloads_of = |index: usize| {
        cluster
            .sim
            .observed()
            .file_requests
            .iter()
            .filter(|r| r.file == index && r.status < 300)
            .count()
    };
    let first_patient = cluster
        .sim
        .served_files(1)
        .iter()
        .find(|f| f.resource_type.as_deref() == Some("Patient"))
        .map(|f| f.index)
        .unwrap();
    assert_eq!(downloads_of(first_patient), 2, "downloaded once more before failing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_file_links_are_renewed_from_the_status_url_and_the_export_completes() {
    // Links live one second; on this slow link most files start (or resume after a cut)
    // after their link expired.
    let config = SimConfig {
        link_lifetime: Some(Duration::from_secs(1)),
        ..slow_config()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    cluster.sim.set_faults(|f| {
        f.throttle_bytes_per_sec = Some(200_000);
        f.cut_after_bytes = Some(100_000);
        f.cuts = 3;
    });
    // Two slots for every type's file: most start after their link expired.
    cluster.start_worker("w1");
    let job_id = cluster.submit("").await;
    let job = cluster.wait_completed(&job_id, Duration::from_secs(120)).await;
    cluster.assert_output_identical(&job_id).await;
    let summary = job.summary.unwrap();
    assert_eq!(summary.files_failed, 0, "{:?}", job.files);
    let observed = cluster.sim.observed();
    let expired = observed.file_requests.iter().filter(|r| r.status == 404).count();
    assert!(expired >= 1, "some link expired before it was used");
    assert!(
        observed.file_requests.iter().any(|r| r.status == 206),
        "the cut file resumed with a Range request"
    );
    assert_eq!(
        observed.kickoffs.len(),
        1,
        "renewal asks the status URL, never kicks off again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_that_expire_together_cost_the_ehr_one_fresh_manifest() {
    let config = SimConfig {
        link_lifetime: Some(Duration::from_secs(2)),
        ..slow_config()
    };
    let mut cluster = Cluster::start(config, "5s").await;
    let job_id = cluster.submit("").await;
    let ready = cluster
        .wait_for(&job_id, Duration::from_secs(30), |job| {
            job.summary
                .as_ref()
                .is_some_and(|s| s.phase == pb::JobPhase::Downloading as i32)
        })
        .await;
    assert!(
        ready.files.len() >= 4,
        "enough files for every slot: {}",
        ready.files.len()
    );
    let polled = cluster.sim.observed().status_requests;
    // Every link has expired by the time the workers start (four slots at once).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    let job = cluster.wait_completed(&job_id, Duration::from_secs(60)).await;
    assert_eq!(job.summary.unwrap().files_failed, 0);
    let observed = cluster.sim.observed();
    let refused = observed.file_requests.iter().filter(|r| r.status == 404).count();
    assert!(refused >= 1, "some link had expired");
    assert_eq!(
        observed.status_requests - polled,
        1,
        "{refused} expired link(s) renewed by one fresh manifest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_broken_key_or_refusing_ehr_fails_only_its_own_jobs() {
    let config = SimConfig {
        patients: 30,
        job_duration: Duration::from_millis(200),
        ..SimConfig::default()
    };
    // A second EHR that refuses the client it registered, and a tenant whose key file is
    // missing; both next to the working tenant `sim`.
    let refusing = SimEhr::start(config.clone()).await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let credentials = refusing.new_client("ES384");
    let refusing_tenant = fhirhaul_testkit::tenant::sim_tenant_toml(refusing.base_url(), &credentials, keys.path())
        .replace("name = \"sim\"", "name = \"refusing\"");
    refusing.revoke_clients();
    let broken_tenant = format!(
        "\n[[tenant]]\nname = \"broken\"\nbase_url = \"{}\"\nclient_id = \"c\"\nprivate_key = \"{}\"\n",
        refusing.base_url(),
        keys.path().join("missing.pem").display()
    );
    let mut cluster = Cluster::start_with(config, "5s", &format!("{refusing_tenant}{broken_tenant}"), None).await;
    cluster.start_worker("w1");
    let broken = cluster.submit_for("broken", "", false).await;
    let refused = cluster.submit_for("refusing", "", false).await;
    let working = cluster.submit("").await;
    cluster.wait_completed(&working, Duration::from_secs(60)).await;
    cluster.assert_output_identical(&working).await;
    for (job_id, words) in [(&broken, "missing.pem"), (&refused, "invalid_client")] {
        let job = cluster.wait_for(job_id, Duration::from_secs(60), has_ended).await;
        let summary = job.summary.unwrap();
        assert_eq!(summary.phase, pb::JobPhase::Failed as i32, "{summary:?}");
        let error = summary.error.unwrap_or_default();
        assert!(error.contains(words), "{job_id} failed with its own reason: {error}");
    }
}
