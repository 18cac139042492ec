//! The client core and the simulated EHR on turmoil's simulated network: the HTTP seam
//! ([`HyperTransport`] over a turmoil [`Dialer`]) carries a whole export, with latency,
//! a cut connection, and time that only turmoil advances.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fhirhaul_common::clock::{Entropy, TokioClock};
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::export::{ExportSettings, run_export};
use fhirhaul_common::http::{Connection, Dialer, HyperTransport};
use fhirhaul_common::kickoff::{ExportRequest, ServerProfile};
use fhirhaul_common::status::PollSettings;
use fhirhaul_sim::{ClientCredentials, ServedFile, SimConfig, SimEhr};
use tokio_util::sync::CancellationToken;

struct TurmoilDialer;

#[async_trait::async_trait]
impl Dialer for TurmoilDialer {
    async fn dial(&self, host: &str, port: u16) -> std::io::Result<Box<dyn Connection>> {
        Ok(Box::new(turmoil::net::TcpStream::connect((host, port)).await?))
    }
}

/// What the EHR host publishes for the client host.
#[derive(Default)]
struct Published {
    credentials: Option<ClientCredentials>,
    served: Vec<ServedFile>,
    sim: Option<SimEhr>,
}

/// The saved files' SHA-256s, sorted, and how many resumes it took.
type ExportResult = (Vec<String>, u32);

fn run(seed: u64) -> ExportResult {
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    let mut simulation = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(600))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(30))
        .rng_seed(seed)
        .build();
    let published: Arc<Mutex<Published>> = Arc::default();
    let ehr_slot = Arc::clone(&published);
    simulation.host("ehr", move || {
        let slot = Arc::clone(&ehr_slot);
        async move {
            let config = SimConfig {
                seed,
                patients: 30,
                max_resources_per_file: 60,
                job_duration: Duration::from_secs(20),
                wall_clock_base: Some(base),
                ..SimConfig::default()
            };
            let sim = SimEhr::new(config, "http://ehr:80", "http://ehr:81")?;
            sim.set_faults(|f| {
                f.cut_after_bytes = Some(9_000);
                f.cuts = 2;
                f.status_429 = 2;
            });
            let handler = sim.handler();
            {
                let mut slot = slot.lock().unwrap();
                slot.credentials = Some(sim.new_client("ES384"));
                slot.sim = Some(sim);
            }
            let fhir = turmoil::net::TcpListener::bind("0.0.0.0:80").await?;
            let storage = turmoil::net::TcpListener::bind("0.0.0.0:81").await?;
            let storage_handler = handler.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = storage.accept().await {
                    let handler = storage_handler.clone();
                    tokio::spawn(async move { handler.serve(stream, true).await });
                }
            });
            loop {
                match fhir.accept().await {
                    Ok((stream, _)) => {
                        let handler = handler.clone();
                        tokio::spawn(async move { handler.serve(stream, false).await });
                    }
                    Err(error) => tracing::warn!(%error, "accept failed"),
                }
            }
        }
    });
    let client_slot = Arc::clone(&published);
    let outcome: Arc<Mutex<Option<ExportResult>>> = Arc::default();
    let client_outcome = Arc::clone(&outcome);
    simulation.client("exporter", async move {
        let credentials = loop {
            if let Some(credentials) = client_slot.lock().unwrap().credentials.clone() {
                break credentials;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("key.pem");
        std::fs::write(&key, &credentials.private_key_pem)?;
        let tenant = TenantConfig {
            name: "sim".into(),
            base_url: "http://ehr:80/fhir".parse()?,
            client_id: credentials.client_id.clone(),
            private_key: key,
            algorithm: None,
            kid: Some(credentials.kid.clone()),
            scope: None,
            token_url: None,
            jku: None,
            token_allow_list: vec![],
            assertion_lifetime: Duration::from_secs(240),
            refresh_margin: Duration::from_secs(60),
            profile: ServerProfile::default(),
            export: ExportSettings {
                poll: PollSettings {
                    min_interval: Duration::from_secs(1),
                    max_interval: Duration::from_secs(10),
                    ..PollSettings::default()
                },
                ..ExportSettings::default()
            },
            request: ExportRequest::default(),
        };
        let transport = Arc::new(HyperTransport::new(TurmoilDialer));
        let clock = Arc::new(TokioClock::starting_at(base));
        let client = tenant.connect(transport, clock, Entropy::from_seed(seed), CancellationToken::new())?;
        let report = run_export(
            &client,
            &tenant.request,
            &tenant.profile,
            &tenant.export,
            &dir.path().join("out"),
            CancellationToken::new(),
            |_| {},
        )
        .await?;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let mut slot = client_slot.lock().unwrap();
        let sim = slot.sim.as_ref().expect("the EHR is up");
        slot.served = sim.served_files(1);
        let mut saved: Vec<String> = report.files.iter().map(|f| f.outcome.sha256.clone()).collect();
        saved.sort();
        let mut served: Vec<String> = slot.served.iter().map(|f| f.sha256.clone()).collect();
        served.sort();
        assert_eq!(saved, served, "byte-identical over the simulated network");
        let resumes = report.files.iter().map(|f| f.outcome.resumes).sum();
        *client_outcome.lock().unwrap() = Some((saved, resumes));
        Ok(())
    });
    simulation.run().expect("the simulation ran to completion");
    outcome.lock().unwrap().take().expect("the exporter finished")
}

#[test]
fn an_export_over_a_simulated_network_is_byte_identical() {
    let (files, resumes) = run(7);
    assert!(files.len() >= 5);
    assert!(resumes >= 1, "the planted cuts were resumed");
}

#[test]
fn the_same_seed_gives_the_same_export() {
    assert_eq!(run(11).0, run(11).0);
}

/// An accepted turmoil connection, as tonic's server wants it.
struct Accepted(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The whole cluster on turmoil: the EHR, a coordinator (raft log in sled), two workers,
/// and an operator submitting over gRPC — every byte on the simulated network.
#[test]
fn the_cluster_exports_over_a_simulated_network() {
    use fhirhaul_coordinator::node::{Coordinator, CoordinatorSettings};
    use fhirhaul_proto::v1 as pb;

    let seed = 3;
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    let mut simulation = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(900))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .rng_seed(seed)
        .build();
    let disk = Arc::new(tempfile::tempdir().unwrap());
    let published: Arc<Mutex<Published>> = Arc::default();
    let ehr_slot = Arc::clone(&published);
    simulation.host("ehr", move || {
        let slot = Arc::clone(&ehr_slot);
        async move {
            let config = SimConfig {
                seed,
                patients: 40,
                max_resources_per_file: 40,
                job_duration: Duration::from_secs(30),
                wall_clock_base: Some(base),
                ..SimConfig::default()
            };
            let sim = SimEhr::new(config, "http://ehr:80", "http://ehr:81")?;
            sim.set_faults(|f| {
                f.cut_after_bytes = Some(5_000);
                f.cuts = 3;
            });
            let handler = sim.handler();
            {
                let mut slot = slot.lock().unwrap();
                slot.credentials = Some(sim.new_client("ES384"));
                slot.sim = Some(sim);
            }
            let fhir = turmoil::net::TcpListener::bind("0.0.0.0:80").await?;
            loop {
                if let Ok((stream, _)) = fhir.accept().await {
                    let handler = handler.clone();
                    tokio::spawn(async move { handler.serve(stream, false).await });
                }
            }
        }
    });
    let coordinator_slot = Arc::clone(&published);
    let coordinator_disk = Arc::clone(&disk);
    simulation.host("coordinator", move || {
        let slot = Arc::clone(&coordinator_slot);
        let disk = Arc::clone(&coordinator_disk);
        async move {
            let credentials = loop {
                if let Some(credentials) = slot.lock().unwrap().credentials.clone() {
                    break credentials;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let key = disk.path().join("key.pem");
            std::fs::write(&key, &credentials.private_key_pem)?;
            let tenant = TenantConfig {
                name: "sim".into(),
                base_url: "http://ehr:80/fhir".parse()?,
                client_id: credentials.client_id.clone(),
                private_key: key,
                algorithm: None,
                kid: Some(credentials.kid.clone()),
                scope: None,
                token_url: None,
                jku: None,
                token_allow_list: vec![],
                assertion_lifetime: Duration::from_secs(240),
                refresh_margin: Duration::from_secs(60),
                profile: ServerProfile::default(),
                export: ExportSettings {
                    poll: PollSettings {
                        min_interval: Duration::from_secs(1),
                        max_interval: Duration::from_secs(10),
                        ..PollSettings::default()
                    },
                    ..ExportSettings::default()
                },
                request: ExportRequest::default(),
            };
            let settings = CoordinatorSettings {
                data_dir: disk.path().join("coordinator"),
                lease_duration: Duration::from_secs(10),
                ..CoordinatorSettings::default()
            };
            let transport = Arc::new(HyperTransport::new(TurmoilDialer));
            let coordinator = Coordinator::start(
                settings,
                vec![tenant],
                transport,
                Arc::new(TokioClock::starting_at(base)),
                Entropy::from_seed(seed),
                CancellationToken::new(),
            )
            .await?;
            let listener = turmoil::net::TcpListener::bind("0.0.0.0:7400").await?;
            let incoming = futures_util::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(stream, _)| Accepted(stream));
                Some((accepted, listener))
            });
            fhirhaul_coordinator::grpc::serve_incoming(coordinator, incoming, None, None, CancellationToken::new())
                .await?;
            Ok(())
        }
    });
    for name in ["w1", "w2"] {
        let worker_disk = Arc::clone(&disk);
        simulation.host(name, move || {
            let disk = Arc::clone(&worker_disk);
            async move {
                let settings = fhirhaul_worker::WorkerSettings {
                    coordinator: "http://coordinator:7400".into(),
                    name: name.into(),
                    concurrency: 2,
                    output_dir: disk.path().join("out"),
                    state_dir: disk.path().join(name),
                    download: fhirhaul_common::download::DownloadSettings {
                        checkpoint_every_bytes: 4096,
                        ..Default::default()
                    },
                    cluster_token: None,
                    acquire_wait: Duration::from_secs(5),
                    tls: None,
                    dialer: Some(Arc::new(TurmoilDialer)),
                };
                let transport = Arc::new(HyperTransport::new(TurmoilDialer));
                fhirhaul_worker::run(
                    settings,
                    transport,
                    Arc::new(TokioClock::starting_at(base)),
                    Entropy::from_seed(seed),
                    CancellationToken::new(),
                )
                .await?;
                Ok(())
            }
        });
    }
    let client_slot = Arc::clone(&published);
    let client_disk = Arc::clone(&disk);
    simulation.client("operator", async move {
        let channel = loop {
            let connector = tower::service_fn(|uri: http::Uri| async move {
                TurmoilDialer
                    .dial(uri.host().unwrap_or_default(), uri.port_u16().unwrap_or(80))
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            });
            match tonic::transport::Endpoint::from_static("http://coordinator:7400")
                .connect_with_connector(connector)
                .await
            {
                Ok(channel) => break channel,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut admin = fhirhaul_proto::v1::admin_service_client::AdminServiceClient::new(channel);
        let job_id = loop {
            match admin
                .submit_export(pb::SubmitExportRequest {
                    tenant: "sim".into(),
                    request_json: String::new(),
                    incremental: false,
                })
                .await
            {
                Ok(response) => break response.into_inner().job_id,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let job = loop {
            let job = admin
                .get_job(pb::GetJobRequest { job_id: job_id.clone() })
                .await?
                .into_inner();
            let phase = job.summary.as_ref().map(|s| s.phase).unwrap_or_default();
            if phase == pb::JobPhase::Completed as i32 || phase == pb::JobPhase::Failed as i32 {
                break job;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let summary = job.summary.unwrap();
        assert_eq!(summary.phase, pb::JobPhase::Completed as i32, "{summary:?}");
        assert_eq!(summary.files_failed, 0);
        let served = client_slot.lock().unwrap().sim.as_ref().unwrap().served_files(1);
        let mut expected: Vec<String> = served.iter().map(|f| f.sha256.clone()).collect();
        expected.sort();
        let mut saved = Vec::new();
        for file in &job.files {
            let bytes = std::fs::read(file.location.as_ref().unwrap())?;
            saved.push(
                sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes))
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            );
        }
        saved.sort();
        assert_eq!(saved, expected, "every served file, byte-identical, exactly once");
        assert!(client_disk.path().join("out").join(&job_id).exists());
        Ok(())
    });
    simulation.run().expect("the cluster finished the export");
}
