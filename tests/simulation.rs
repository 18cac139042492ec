//! fhirhaul on turmoil's simulated network, where only turmoil advances time.
//!
//! - A whole export through the client core ([`HyperTransport`] over a turmoil [`Dialer`]).
//! - The whole cluster (EHR, a raft group of three coordinators, workers, an operator over
//!   gRPC) under seeded faults: cut downloads, 429/5xx, latency, partitions of workers and
//!   of coordinators, worker, coordinator and leader crashes. Invariants are checked at the
//!   end of every run, among them that every coordinator holds the same committed state.
//!
//! Each seed of the sweep runs in a process of its own ([`run_isolated`]), which is what
//! makes it replay exactly. A failing seed prints the command that replays it. The sweep
//! size is `FHIRHAUL_SIM_SEEDS` (default 100) from `FHIRHAUL_SIM_FIRST` (default 1);
//! `FHIRHAUL_SIM_SEED=N` runs one seed.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fhirhaul_common::clock::{Entropy, TokioClock};
use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::export::run_export;
use fhirhaul_common::http::HyperTransport;
use fhirhaul_common::offload::Offload;
use fhirhaul_common::status::PollSettings;
use fhirhaul_sim::{ClientCredentials, ServedFile, SimConfig, SimEhr};
use fhirhaul_testkit::turmoil::{Accepted, TurmoilDialer};
use tokio_util::sync::CancellationToken;

/// The tenant every host uses to reach the simulated EHR.
fn sim_tenant(credentials: &ClientCredentials, key_dir: &std::path::Path) -> TenantConfig {
    let mut tenant = fhirhaul_testkit::tenant::sim_tenant("sim", "http://ehr:80/fhir", credentials, key_dir);
    tenant.export.poll = PollSettings {
        min_interval: Duration::from_secs(1),
        max_interval: Duration::from_secs(10),
        ..PollSettings::default()
    };
    tenant
}

/// What the EHR host publishes for the client host.
#[derive(Default)]
struct Published {
    credentials: Option<ClientCredentials>,
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
        let tenant = sim_tenant(&credentials, dir.path());
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
        let served_files: Vec<ServedFile> = client_slot
            .lock()
            .unwrap()
            .sim
            .as_ref()
            .expect("the EHR is up")
            .served_files(1);
        let mut saved: Vec<String> = report.files.iter().map(|f| f.outcome.sha256.clone()).collect();
        saved.sort();
        let mut served: Vec<String> = served_files.iter().map(|f| f.sha256.clone()).collect();
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

/// One cluster run's shape, drawn from its seed.
#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    /// Each coordinator's raft election timeout, in ticks (raft-rs would draw its own).
    election_ticks: [usize; 3],
    patients: u32,
    per_file: u64,
    max_latency_ms: u64,
    cuts: u32,
    cut_after: u64,
    status_429: u32,
    status_500: u32,
    file_500: u32,
    kickoff_429: u32,
    /// The EHR hands out files while the export is still running (partial manifests).
    partial_manifests: bool,
    /// Access token lifetime: short ones expire many times during one export.
    token_lifetime: Duration,
    /// The EHR revokes every token after this many uses (early revocation).
    revoke_token_after_uses: Option<u32>,
    /// One file changes at the EHR (new ETag) once this many of its bytes were served.
    change_file_after_bytes: Option<u64>,
    /// After the first export, an incremental one (`_since` = its transactionTime).
    incremental: bool,
    /// (virtual second, action)
    disruptions: Vec<(u64, Disruption)>,
    /// Message loss: each message sent on a link breaks it with this probability; a
    /// broken link drops everything until it repairs (each later message repairs it
    /// with probability 0.3). turmoil's TCP does not retransmit, so a connection that
    /// lost a segment stalls for good and must be noticed and replaced.
    message_loss: Option<f64>,
    /// Cut the leader off from the other coordinators the moment the EHR accepts the first
    /// kick-off (before the status URL can commit); it rejoins 10 s later.
    cut_leader_at_kickoff: bool,
    /// The EHR's rate limiter blocks each kind of request (kick-off, status, file) with
    /// 429 + Retry-After for this long after the first of its kind.
    busy_for: Option<Duration>,
    /// The first kick-off is accepted and then its connection drops: the job must fail as
    /// ambiguous (an orphan export may exist) rather than kick off again; the operator
    /// then submits again.
    kickoff_drop_after_accept: bool,
    /// A line of the first export's first Patient file is malformed, so that file fails:
    /// the incremental cursor must not move past that export.
    fail_a_file: bool,
    /// Virtual time the run may take.
    duration: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Disruption {
    BounceWorker(usize),
    BounceCoordinator(usize),
    /// Crash and restart whichever coordinator leads at that moment.
    BounceLeader,
    /// Cut a worker off from every coordinator.
    Partition(usize),
    Repair(usize),
    /// Cut a coordinator off from the other two (workers still reach it).
    IsolateCoordinator(usize),
    RejoinCoordinator(usize),
}

const WORKERS: [&str; 2] = ["w1", "w2"];
const COORDINATORS: [&str; 3] = ["c1", "c2", "c3"];

fn coordinator_addresses() -> Vec<String> {
    COORDINATORS.iter().map(|host| format!("http://{host}:7400")).collect()
}

impl Scenario {
    fn quiet(seed: u64) -> Scenario {
        Scenario {
            seed,
            election_ticks: [10, 13, 16],
            patients: 40,
            per_file: 40,
            max_latency_ms: 20,
            cuts: 3,
            cut_after: 5_000,
            status_429: 0,
            status_500: 0,
            file_500: 0,
            kickoff_429: 0,
            partial_manifests: false,
            token_lifetime: Duration::from_secs(300),
            revoke_token_after_uses: None,
            change_file_after_bytes: None,
            incremental: true,
            disruptions: vec![],
            message_loss: None,
            cut_leader_at_kickoff: false,
            busy_for: None,
            kickoff_drop_after_accept: false,
            fail_a_file: false,
            duration: Duration::from_secs(1_800),
        }
    }

    fn from_seed(seed: u64) -> Scenario {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut disruptions = Vec::new();
        for _ in 0..rng.gen_range(0..5) {
            let at = rng.gen_range(5..90);
            let disruption = match rng.gen_range(0..6) {
                0 => Disruption::BounceWorker(rng.gen_range(0..WORKERS.len())),
                1 => Disruption::BounceCoordinator(rng.gen_range(0..COORDINATORS.len())),
                2 => Disruption::BounceLeader,
                3 => {
                    let coordinator = rng.gen_range(0..COORDINATORS.len());
                    disruptions.push((at + rng.gen_range(5..30), Disruption::RejoinCoordinator(coordinator)));
                    Disruption::IsolateCoordinator(coordinator)
                }
                _ => {
                    let worker = rng.gen_range(0..WORKERS.len());
                    disruptions.push((at + rng.gen_range(5..30), Disruption::Repair(worker)));
                    Disruption::Partition(worker)
                }
            };
            disruptions.push((at, disruption));
        }
        disruptions.sort_by_key(|(at, _)| *at);
        // Distinct timeouts, so elections settle; which node gets which is the seed's.
        let mut election_ticks = [10, 13, 16];
        for index in (1..election_ticks.len()).rev() {
            election_ticks.swap(index, rng.gen_range(0..=index));
        }
        let mut scenario = Scenario {
            seed,
            election_ticks,
            patients: rng.gen_range(5..60),
            per_file: rng.gen_range(8..80),
            max_latency_ms: rng.gen_range(1..50),
            cuts: rng.gen_range(0..5),
            cut_after: rng.gen_range(2_000..20_000),
            status_429: rng.gen_range(0..3),
            status_500: rng.gen_range(0..3),
            file_500: rng.gen_range(0..3),
            kickoff_429: rng.gen_range(0..2),
            partial_manifests: rng.gen_bool(0.3),
            token_lifetime: Duration::from_secs(if rng.gen_bool(0.3) { rng.gen_range(15..60) } else { 300 }),
            revoke_token_after_uses: rng.gen_bool(0.2).then(|| rng.gen_range(3..30)),
            change_file_after_bytes: rng.gen_bool(0.2).then(|| rng.gen_range(1_000..8_000)),
            incremental: rng.gen_bool(0.3),
            disruptions,
            // Drawn last, so the draws above (and the seeds that exercise them) stay.
            message_loss: rng.gen_bool(0.25).then(|| rng.gen_range(0.000_2..0.002)),
            cut_leader_at_kickoff: false,
            busy_for: None,
            kickoff_drop_after_accept: false,
            fail_a_file: false,
            duration: Duration::from_secs(1_800),
        };
        // Sometimes a few huge files (one per resource type) instead of many small ones.
        if rng.gen_bool(0.15) {
            scenario.patients = rng.gen_range(150..300);
            scenario.per_file = 1_000_000;
        }
        scenario.cut_leader_at_kickoff = rng.gen_bool(0.1);
        // Drawn after everything above, so older seeds keep their scenarios.
        scenario.kickoff_drop_after_accept = rng.gen_bool(0.1);
        scenario.fail_a_file = rng.gen_bool(0.1);
        if scenario.fail_a_file {
            // The cursor check needs the incremental export that follows.
            scenario.incremental = true;
        }
        scenario
    }
}

fn replay_hint(seed: u64) -> String {
    format!("replay with: FHIRHAUL_SIM_SEED={seed} cargo test --test simulation seed_sweep -- --nocapture")
}

/// Hashes every event fhirhaul's crates log on the simulation's thread, in order, with the
/// simulated time it happened at: two runs with the same trace hash did the same things
/// at the same (virtual) moments. Paths under the run's temporary disk are made relative,
/// since the disk's own name is random.
struct TraceHash {
    disk: String,
    state: Arc<Mutex<(sha2::Sha256, u64)>>,
    holdings: Arc<Mutex<Holdings>>,
}

/// Which worker holds which (job, file, generation) right now, from the workers' own
/// "lease held" / "lease let go" events; a worker that registers again (restarted) holds
/// nothing. Two live holders of one file in one generation is a broken invariant, and so
/// is a checkpoint that moves backwards ("checkpoint stored" events).
#[derive(Default)]
struct Holdings {
    held: std::collections::BTreeMap<(String, String, String), String>,
    /// The last checkpoint each worker stored for each file: (offset, validator).
    checkpoints: std::collections::BTreeMap<(String, String, String), (u64, String)>,
    violations: Vec<String>,
    /// How many holdings were observed (a run that saw none checked nothing).
    seen: u64,
}

impl Holdings {
    fn observe(&mut self, message: &str, fields: &std::collections::BTreeMap<String, String>) {
        let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
        let key = (field("job"), field("file"), field("generation"));
        match message {
            "checkpoint stored" => {
                // A worker's stored checkpoint for a file only moves forward, across its
                // restarts too; it goes back only to restart from zero, or when the file
                // changed at the EHR (a new validator).
                let offset: u64 = field("offset").parse().unwrap_or_default();
                let stored = (field("worker"), field("job"), field("file"));
                let now = (offset, field("validator"));
                if let Some((before, validator)) = self.checkpoints.insert(stored.clone(), now.clone())
                    && offset < before
                    && offset != 0
                    && validator == now.1
                {
                    self.violations
                        .push(format!("{stored:?}: checkpoint moved back from {before} to {offset}"));
                }
            }
            "lease held" => {
                self.seen += 1;
                if let Some(other) = self.held.insert(key.clone(), field("worker"))
                    && other != field("worker")
                {
                    self.violations
                        .push(format!("{other} and {} both hold {key:?}", field("worker")));
                }
            }
            "lease let go" => {
                self.held.remove(&key);
            }
            "registered with the coordinator" => {
                let worker = field("worker");
                self.held.retain(|_, holder| *holder != worker);
            }
            _ => {}
        }
    }
}

#[derive(Default)]
struct FieldText {
    text: String,
    fields: std::collections::BTreeMap<String, String>,
}

impl tracing::field::Visit for FieldText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.text, " {}={value:?}", field.name());
        self.fields.insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TraceHash {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: tracing_subscriber::layer::Context<'_, S>) -> bool {
        metadata.target().starts_with("fhirhaul")
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let metadata = event.metadata();
        if !metadata.target().starts_with("fhirhaul") {
            return;
        }
        let mut fields = FieldText::default();
        event.record(&mut fields);
        if let Some(message) = fields.fields.get("message") {
            self.holdings.lock().unwrap().observe(message, &fields.fields);
        }
        let line = format!(
            "{} {} {}{}\n",
            turmoil::sim_elapsed().unwrap_or_default().as_micros(),
            metadata.level(),
            metadata.target(),
            fields.text.replace(&self.disk, "<disk>")
        );
        if let Ok(path) = std::env::var("FHIRHAUL_SIM_TRACE") {
            use std::io::Write;
            if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = file.write_all(line.as_bytes());
            }
        }
        let mut state = self.state.lock().unwrap();
        sha2::Digest::update(&mut state.0, line.as_bytes());
        state.1 += 1;
    }
}

/// What a cluster run leaves to compare: the outcome digest (sorted file hashes and the
/// kick-off count) and the event trace's hash and length.
struct RunRecord {
    outcome: String,
    trace: String,
    events: u64,
}

/// Runs a scenario and checks the invariants; returns the outcome digest.
fn cluster_run(scenario: Scenario) -> String {
    cluster_run_traced(scenario).outcome
}

fn cluster_run_traced(scenario: Scenario) -> RunRecord {
    use tracing_subscriber::layer::SubscriberExt;
    let disk = Arc::new(tempfile::tempdir().unwrap());
    let state: Arc<Mutex<(sha2::Sha256, u64)>> = Arc::default();
    let holdings: Arc<Mutex<Holdings>> = Arc::default();
    let layer = TraceHash {
        disk: disk.path().display().to_string(),
        state: Arc::clone(&state),
        holdings: Arc::clone(&holdings),
    };
    let subscriber = tracing_subscriber::registry().with(layer);
    let seed = scenario.seed;
    let outcome = tracing::subscriber::with_default(subscriber, || cluster_simulation(scenario, disk));
    let (violations, seen) = {
        let mut holdings = holdings.lock().unwrap();
        (std::mem::take(&mut holdings.violations), holdings.seen)
    };
    assert!(seen > 0, "seed {seed}: no worker was seen holding a lease");
    assert!(
        violations.is_empty(),
        "seed {seed}: what the workers did broke an invariant: {violations:?}\n{}",
        replay_hint(seed)
    );
    let (hasher, events) = std::mem::take(&mut *state.lock().unwrap());
    let trace = sha2::Digest::finalize(hasher)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    RunRecord { outcome, trace, events }
}

/// The cluster simulation itself; returns the outcome digest, which must not depend on
/// anything but the seed.
fn cluster_simulation(scenario: Scenario, disk: Arc<tempfile::TempDir>) -> String {
    use fhirhaul_coordinator::node::{Coordinator, CoordinatorSettings};
    use fhirhaul_coordinator::raft_node::RaftSettings;
    use fhirhaul_proto::connect::{Connector, Coordinators};

    let seed = scenario.seed;
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    let mut simulation = turmoil::Builder::new()
        .simulation_duration(scenario.duration)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(scenario.max_latency_ms.max(1)))
        .fail_rate(scenario.message_loss.unwrap_or(0.0))
        .repair_rate(0.3)
        .rng_seed(seed)
        .build();
    let published: Arc<Mutex<Published>> = Arc::default();
    let ehr_slot = Arc::clone(&published);
    let ehr_scenario = scenario.clone();
    simulation.host("ehr", move || {
        let slot = Arc::clone(&ehr_slot);
        let scenario = ehr_scenario.clone();
        async move {
            let config = SimConfig {
                seed,
                patients: scenario.patients,
                max_resources_per_file: scenario.per_file,
                job_duration: Duration::from_secs(30),
                wall_clock_base: Some(base),
                file_io: fhirhaul_sim::FileIo::Inline,
                partial_manifests: scenario.partial_manifests,
                token_lifetime: scenario.token_lifetime,
                ..SimConfig::default()
            };
            let sim = SimEhr::new(config, "http://ehr:80", "http://ehr:81")?;
            sim.set_faults(|f| {
                f.cut_after_bytes = Some(scenario.cut_after);
                f.cuts = scenario.cuts;
                f.status_429 = scenario.status_429;
                f.status_500 = scenario.status_500;
                f.file_500 = scenario.file_500;
                f.kickoff_429 = scenario.kickoff_429;
                f.revoke_token_after_uses = scenario.revoke_token_after_uses;
                f.change_file_after_bytes = scenario.change_file_after_bytes;
                f.busy_for = scenario.busy_for;
                f.kickoff_drop_after_accept = u32::from(scenario.kickoff_drop_after_accept);
                if scenario.fail_a_file {
                    f.malformed_line = Some(("Patient".into(), 2));
                }
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
    // Each incarnation of a restarted host draws from its own stream: a node that restarted
    // with the same seed would sign JWTs with the `jti`s it already used, which the EHR
    // rightly refuses as replays (found by seed 17 of the sweep).
    let incarnations = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The running incarnation of every coordinator, for the harness and the final checks.
    let handles: Arc<Mutex<std::collections::BTreeMap<u64, Coordinator>>> = Arc::default();
    for (index, host) in COORDINATORS.into_iter().enumerate() {
        let node_id = index as u64 + 1;
        let coordinator_slot = Arc::clone(&published);
        let coordinator_disk = Arc::clone(&disk);
        let coordinator_incarnations = Arc::clone(&incarnations);
        let coordinator_handles = Arc::clone(&handles);
        let election_tick = scenario.election_ticks[index];
        simulation.host(host, move || {
            let slot = Arc::clone(&coordinator_slot);
            let disk = Arc::clone(&coordinator_disk);
            let handles = Arc::clone(&coordinator_handles);
            let incarnation = coordinator_incarnations.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let credentials = loop {
                    if let Some(credentials) = slot.lock().unwrap().credentials.clone() {
                        break credentials;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let keys = disk.path().join(format!("keys-{node_id}"));
                std::fs::create_dir_all(&keys)?;
                let tenant = sim_tenant(&credentials, &keys);
                let settings = CoordinatorSettings {
                    data_dir: disk.path().join(format!("coordinator-{node_id}")),
                    lease_duration: Duration::from_secs(10),
                    raft: RaftSettings {
                        node_id,
                        election_tick: Some(election_tick),
                        snapshot_every: 50,
                        peers: (1..=3).zip(coordinator_addresses()).collect(),
                        ..RaftSettings::default()
                    },
                    offload: Offload::Inline,
                    peer_connector: Connector {
                        dialer: Some(Arc::new(TurmoilDialer)),
                        timeout: Duration::from_secs(10),
                        connect_timeout: Duration::from_secs(1),
                        ..Connector::default()
                    },
                    ..CoordinatorSettings::default()
                };
                let transport = Arc::new(HyperTransport::new(TurmoilDialer));
                let entropy = Entropy::from_seed(seed ^ (incarnation << 32) ^ (0xC0 + node_id));
                let coordinator = Coordinator::start(
                    settings,
                    vec![tenant],
                    transport,
                    Arc::new(TokioClock::starting_at(base)),
                    entropy,
                    CancellationToken::new(),
                )
                .await?;
                handles.lock().unwrap().insert(node_id, coordinator.clone());
                let listener = turmoil::net::TcpListener::bind("0.0.0.0:7400").await?;
                let incoming = futures_util::stream::unfold(listener, |listener| async move {
                    let accepted = listener.accept().await.map(|(stream, _)| Accepted(stream));
                    Some((accepted, listener))
                });
                fhirhaul_coordinator::grpc::serve_incoming(
                    coordinator,
                    incoming,
                    None,
                    false,
                    CancellationToken::new(),
                )
                .await?;
                Ok(())
            }
        });
    }
    for (index, name) in WORKERS.into_iter().enumerate() {
        let worker_disk = Arc::clone(&disk);
        let worker_incarnations = Arc::clone(&incarnations);
        simulation.host(name, move || {
            let disk = Arc::clone(&worker_disk);
            let incarnation = worker_incarnations.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let settings = fhirhaul_worker::WorkerSettings {
                    coordinators: coordinator_addresses(),
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
                    offload: Offload::Inline,
                };
                let transport = Arc::new(HyperTransport::new(TurmoilDialer));
                let entropy = Entropy::from_seed(seed ^ (incarnation << 32) ^ (index as u64 + 1));
                fhirhaul_worker::run(
                    settings,
                    transport,
                    Arc::new(TokioClock::starting_at(base)),
                    entropy,
                    CancellationToken::new(),
                )
                .await?;
                Ok(())
            }
        });
    }
    let client_slot = Arc::clone(&published);
    let client_disk = Arc::clone(&disk);
    let digest: Arc<Mutex<Option<String>>> = Arc::default();
    let client_digest = Arc::clone(&digest);
    let client_handles = Arc::clone(&handles);
    let scenario_incremental = scenario.incremental;
    let scenario_drop = scenario.kickoff_drop_after_accept;
    let scenario_fail_a_file = scenario.fail_a_file;
    let scenario_busy = scenario.busy_for.is_some();
    simulation.client("operator", async move {
        let connector = Connector {
            dialer: Some(Arc::new(TurmoilDialer)),
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            ..Connector::default()
        };
        let cluster = Coordinators::new(&coordinator_addresses(), connector, None)?;
        // Jobs submitted; each may reach the EHR at most once.
        let mut exports = 0u64;
        let first = loop {
            exports += 1;
            let job = operator_export(&cluster, false, &format!("operator-first-{exports}")).await;
            let error = job.summary.as_ref().and_then(|s| s.error.clone()).unwrap_or_default();
            if error.contains("orphan export") {
                // The kick-off's answer was lost after the EHR accepted it: the job failed
                // saying so instead of kicking off again; the operator submits anew.
                assert!(
                    scenario_drop && exports == 1,
                    "an ambiguous kick-off only where one was planted: {error}"
                );
                continue;
            }
            break job;
        };
        assert!(
            !scenario_drop || exports == 2,
            "the planted ambiguous kick-off failed its job"
        );
        let first_saved = check_export(
            &first,
            exports,
            &client_slot,
            &client_disk,
            usize::from(scenario_fail_a_file),
        )?;
        if scenario_fail_a_file {
            let slot = client_slot.lock().unwrap();
            slot.sim.as_ref().unwrap().set_faults(|f| f.malformed_line = None);
        }
        if scenario_incremental {
            // An incremental run: only what changed since the last export that downloaded
            // every file.
            exports += 1;
            let second = operator_export(&cluster, true, "operator-incremental").await;
            check_export(&second, exports, &client_slot, &client_disk, 0)?;
            let since = {
                let slot = client_slot.lock().unwrap();
                let kickoffs = slot.sim.as_ref().unwrap().observed().kickoffs;
                kickoffs.last().and_then(|k| {
                    k.params
                        .iter()
                        .find(|(name, _)| name == "_since")
                        .map(|(_, v)| v.clone())
                })
            };
            // Invariant: an incremental export never skips a file of an earlier job. The
            // cursor moves only past an export whose every file arrived.
            let expected_since = if scenario_fail_a_file {
                None
            } else {
                first.summary.as_ref().and_then(|s| s.transaction_time.clone())
            };
            assert_eq!(
                since, expected_since,
                "the incremental export starts after the last export that downloaded every file"
            );
        }
        if scenario_busy {
            // A 429 with Retry-After never counts as a failure: no lease was given up.
            let attempts: Vec<u32> = first.files.iter().map(|f| f.attempts).collect();
            assert!(
                attempts.iter().all(|a| *a == 1),
                "each file took one lease: {attempts:?}"
            );
            let refusals = client_slot
                .lock()
                .unwrap()
                .sim
                .as_ref()
                .unwrap()
                .observed()
                .busy_refusals;
            for kind in ["kickoff", "status", "file"] {
                assert!(
                    refusals.get(kind).is_some_and(|n| *n > 0),
                    "the rate limiter blocked {kind} requests too: {refusals:?}"
                );
            }
        }
        let kickoffs = client_slot.lock().unwrap().sim.as_ref().unwrap().jobs().len() as u64;
        // Invariant: at most one kick-off per job, even when the EHR accepted one whose
        // answer was lost. Throttled kick-off attempts (429) create nothing.
        assert_eq!(kickoffs, exports, "each job reached the EHR exactly once");
        let saved = first_saved;
        // Every coordinator converges on the same committed state (once partitions heal).
        let mut converged = None;
        for _ in 0..600 {
            let coordinators: Vec<Coordinator> = client_handles.lock().unwrap().values().cloned().collect();
            let mut states = Vec::new();
            for coordinator in &coordinators {
                let applied = *coordinator.raft().applied().borrow();
                if let Ok(state) = coordinator.read(serde_json::to_string).await {
                    states.push((applied, state?));
                }
            }
            if states.len() == COORDINATORS.len() && states.windows(2).all(|w| w[0] == w[1]) {
                converged = Some(states.remove(0));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            converged.is_some(),
            "every coordinator holds the same committed state at the same index"
        );
        *client_digest.lock().unwrap() = Some(format!("{kickoffs}:{}", saved.join(",")));
        Ok(())
    });
    let mut pending = scenario.disruptions.clone();
    let mut cut_leader_at_kickoff = scenario.cut_leader_at_kickoff;
    loop {
        let done = match simulation.step() {
            Ok(done) => done,
            Err(error) => panic!("seed {seed} ({scenario:?}) failed: {error}\n{}", replay_hint(seed)),
        };
        if done {
            break;
        }
        let accepted = || {
            published
                .lock()
                .unwrap()
                .sim
                .as_ref()
                .is_some_and(|sim| !sim.jobs().is_empty())
        };
        if cut_leader_at_kickoff && accepted() {
            cut_leader_at_kickoff = false;
            let leader = handles
                .lock()
                .unwrap()
                .iter()
                .find(|(_, c)| c.raft().status().is_leader)
                .map(|(id, _)| *id as usize - 1);
            if let Some(leader) = leader {
                // The 202 is still on its way to the leader; its commit cannot reach a quorum.
                for other in COORDINATORS.iter().filter(|c| **c != COORDINATORS[leader]) {
                    simulation.partition(COORDINATORS[leader], *other);
                }
                let rejoin = simulation.elapsed().as_secs() + 10;
                pending.push((rejoin, Disruption::RejoinCoordinator(leader)));
                pending.sort_by_key(|(at, _)| *at);
            }
        }
        while let Some((at, disruption)) = pending.first().copied() {
            if simulation.elapsed() < Duration::from_secs(at) {
                break;
            }
            pending.remove(0);
            match disruption {
                Disruption::BounceWorker(index) => simulation.bounce(WORKERS[index]),
                Disruption::BounceCoordinator(index) => simulation.bounce(COORDINATORS[index]),
                Disruption::BounceLeader => {
                    let leader = handles
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|(_, c)| c.raft().status().is_leader)
                        .map(|(id, _)| *id);
                    if let Some(leader) = leader {
                        simulation.bounce(COORDINATORS[leader as usize - 1]);
                    }
                }
                Disruption::Partition(index) => {
                    for coordinator in COORDINATORS {
                        simulation.partition(WORKERS[index], coordinator);
                    }
                }
                Disruption::Repair(index) => {
                    for coordinator in COORDINATORS {
                        simulation.repair(WORKERS[index], coordinator);
                    }
                }
                Disruption::IsolateCoordinator(index) => {
                    for other in COORDINATORS.iter().filter(|c| **c != COORDINATORS[index]) {
                        simulation.partition(COORDINATORS[index], *other);
                    }
                }
                Disruption::RejoinCoordinator(index) => {
                    for other in COORDINATORS.iter().filter(|c| **c != COORDINATORS[index]) {
                        simulation.repair(COORDINATORS[index], *other);
                    }
                }
            }
        }
    }
    digest
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(|| panic!("seed {seed}: the operator did not finish\n{}", replay_hint(seed)))
}

/// Submits an export through whichever coordinator leads, retrying through leader changes
/// like the CLI's user would, and waits until it ends.
async fn operator_export(
    cluster: &fhirhaul_proto::connect::Coordinators,
    incremental: bool,
    request_id: &str,
) -> fhirhaul_proto::v1::GetJobResponse {
    use fhirhaul_proto::v1 as pb;
    use pb::admin_service_client::AdminServiceClient;
    // The same request id on every attempt: a retry after an uncertain outcome (a leader
    // change while the proposal was pending), a lost answer or a timeout finds the job the
    // first attempt created instead of creating a second.
    let request_id = request_id.to_string();
    let job_id = loop {
        let submitted = cluster
            .call(|channel| {
                let request_id = request_id.clone();
                async move {
                    AdminServiceClient::new(channel)
                        .submit_export(pb::SubmitExportRequest {
                            tenant: "sim".into(),
                            request_json: String::new(),
                            incremental,
                            request_id,
                        })
                        .await
                }
            })
            .await;
        if let Ok(response) = submitted {
            break response.into_inner().job_id;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(job) = cluster
            .call(|channel| {
                let job_id = job_id.clone();
                async move {
                    AdminServiceClient::new(channel)
                        .get_job(pb::GetJobRequest {
                            job_id,
                            ..Default::default()
                        })
                        .await
                }
            })
            .await
        else {
            continue;
        };
        let job = job.into_inner();
        let phase = job.summary.as_ref().map(|s| s.phase).unwrap_or_default();
        if phase == pb::JobPhase::Completed as i32 || phase == pb::JobPhase::Failed as i32 {
            return job;
        }
    }
}

/// The invariants of one finished export (the EHR's export number `ehr_job`): it completed;
/// every failed file has a reason; exactly `failed` files failed (planted faults); every
/// other file the EHR served is published exactly once, byte-identical to what it served
/// and to what the coordinator recorded, and nothing else is published. Returns the saved
/// files' SHA-256s, sorted.
fn check_export(
    job: &fhirhaul_proto::v1::GetJobResponse,
    ehr_job: u64,
    ehr: &Mutex<Published>,
    disk: &tempfile::TempDir,
    failed: usize,
) -> std::io::Result<Vec<String>> {
    use fhirhaul_proto::v1 as pb;
    let summary = job.summary.clone().unwrap();
    assert_eq!(
        summary.phase,
        pb::JobPhase::Completed as i32,
        "the export completed: {summary:?}"
    );
    for file in &job.files {
        assert!(
            file.phase != pb::FilePhase::Failed as i32 || file.failure.is_some(),
            "every failed file has a reason"
        );
    }
    assert_eq!(
        summary.files_failed as usize,
        failed,
        "only planted failures: {:?}",
        job.files.iter().filter_map(|f| f.failure.clone()).collect::<Vec<_>>()
    );
    let served = ehr.lock().unwrap().sim.as_ref().unwrap().served_files(ehr_job);
    // The planted malformed line is in the first Patient file the EHR served.
    let first_patient = served
        .iter()
        .filter(|f| f.kind == "output" && f.resource_type.as_deref() == Some("Patient"))
        .map(|f| f.index)
        .min();
    let mut expected: Vec<String> = served
        .iter()
        .filter(|f| failed == 0 || Some(f.index) != first_patient)
        .map(|f| f.sha256.clone())
        .collect();
    expected.sort();
    let mut saved = Vec::new();
    for file in job.files.iter().filter(|f| f.phase != pb::FilePhase::Failed as i32) {
        let bytes = std::fs::read(file.location.as_ref().expect("a location"))?;
        let sha: String = <sha2::Sha256 as sha2::Digest>::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(Some(&sha), file.sha256.as_ref(), "the file on disk is the one reported");
        saved.push(sha);
    }
    saved.sort();
    assert_eq!(
        saved, expected,
        "every served file arrived exactly once, byte-identical"
    );
    let mut published_files = Vec::new();
    assert!(!summary.output_dir.is_empty());
    collect(&disk.path().join("out").join(&summary.output_dir), &mut published_files);
    assert_eq!(
        published_files.len(),
        expected.len(),
        "nothing else was published: {published_files:?}"
    );
    Ok(saved)
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "ndjson") {
            out.push(path);
        }
    }
}

/// The whole cluster on turmoil: the EHR, three coordinators (a raft group, logs in sled),
/// two workers, and an operator submitting over gRPC — every byte on the simulated network.
#[test]
fn the_cluster_exports_over_a_simulated_network() {
    cluster_run(Scenario::quiet(3));
}

/// A leader cut off right after the EHR accepted its kick-off hands the export over: the
/// next leader asks it what came of the kick-off and adopts the export instead of kicking
/// off a second one ("each export was kicked off exactly once" is checked in the run).
#[test]
fn a_leader_cut_off_after_its_kickoff_hands_the_export_over() {
    let mut scenario = Scenario::quiet(5);
    scenario.cut_leader_at_kickoff = true;
    scenario.incremental = false;
    cluster_run(scenario);
}

/// A rate limiter blocks the client for ten minutes (virtual time) on the kick-off, then on
/// status requests, then on files, answering 429 with Retry-After: the export waits it out,
/// never counting those answers as failures, and completes with one kick-off.
#[test]
fn a_ten_minute_rate_limit_on_kickoff_status_and_files_is_waited_out_with_one_kickoff() {
    let mut scenario = Scenario::quiet(7);
    scenario.busy_for = Some(Duration::from_secs(600));
    scenario.incremental = false;
    scenario.duration = Duration::from_secs(3 * 3600);
    cluster_run(scenario);
}

/// The EHR accepts the kick-off and the answer is lost: the job fails saying an orphan
/// export may exist (it is not sent again); the operator's next submission is the only
/// other export the EHR sees.
#[test]
fn a_kickoff_whose_answer_was_lost_is_never_sent_again() {
    let mut scenario = Scenario::quiet(9);
    scenario.kickoff_drop_after_accept = true;
    scenario.incremental = false;
    cluster_run(scenario);
}

/// A file of the first export fails: the incremental export that follows starts from no
/// cursor at all, never from that export's transactionTime (which would skip the file).
#[test]
fn an_export_with_a_failed_file_does_not_move_the_incremental_cursor() {
    let mut scenario = Scenario::quiet(13);
    scenario.fail_a_file = true;
    scenario.incremental = true;
    cluster_run(scenario);
}

/// Many seeds, each with its own population, faults and disruptions, each in a process of
/// its own (see [`run_isolated`]).
#[test]
fn seed_sweep() {
    let seeds: Vec<u64> = match std::env::var("FHIRHAUL_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("FHIRHAUL_SIM_SEED is a number")],
        Err(_) => {
            let number = |name: &str| std::env::var(name).ok().and_then(|n| n.parse::<u64>().ok());
            let count = number("FHIRHAUL_SIM_SEEDS").unwrap_or(100);
            let first = number("FHIRHAUL_SIM_FIRST").unwrap_or(1);
            let mut seeds: Vec<u64> = (first..first + count).collect();
            let range = first..first + count;
            seeds.extend(FOUND_BUGS.iter().filter(|seed| !range.contains(*seed)));
            seeds
        }
    };
    if std::env::var_os(CHILD).is_some() {
        // This process is one seed's run, started by `run_isolated`.
        for seed in seeds {
            let scenario = Scenario::from_seed(seed);
            if std::env::var_os("FHIRHAUL_SIM_SHOW").is_some() {
                eprintln!("{scenario:?}");
            }
            let record = cluster_run_traced(scenario);
            println!("{}", record.line(seed));
        }
        return;
    }
    let failures: Vec<String> = run_isolated(&seeds)
        .into_iter()
        .filter_map(|(seed, run)| {
            run.err().map(|why| {
                format!(
                    "seed {seed} broke an invariant ({:?})\n{why}\n{}",
                    Scenario::from_seed(seed),
                    replay_hint(seed)
                )
            })
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Seeds beyond the default sweep that once broke an invariant; every sweep runs them
/// (`docs/simulation.md` says what each found).
const FOUND_BUGS: [u64; 7] = [116, 156, 196, 360, 384, 387, 496];

/// Set in the environment of a process that runs one seed for [`run_isolated`].
const CHILD: &str = "FHIRHAUL_SIM_CHILD";
/// How a child reports its run on standard output.
const RECORD_PREFIX: &str = "fhirhaul-sim-run";

impl RunRecord {
    fn line(&self, seed: u64) -> String {
        let outcome = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&self.outcome));
        let outcome: String = outcome.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{RECORD_PREFIX} seed={seed} outcome={outcome} trace={} events={}",
            self.trace, self.events
        )
    }
}

/// Runs each seed in a fresh process of this test binary (the `seed_sweep` test with
/// [`CHILD`] set), as many at once as there are cores; returns each seed's record line, or
/// why it failed (the child's panic message; the replay command shows the rest).
///
/// A process of its own is what makes a seed's run exactly repeatable: tokio numbers tasks
/// from one counter per process, and a runtime dropped by a turmoil crash shuts its tasks
/// down in an order that follows those numbers (its task list is sharded by task id). The
/// order decides which closing connection's FIN or RST draws which latency from the
/// simulation's random stream, so two runs in one process — or runs on parallel threads,
/// whose spawns interleave — can part by a millisecond after the first crash. A fresh
/// process numbers the same seed's tasks the same way every time.
fn run_isolated(seeds: &[u64]) -> Vec<(u64, Result<String, String>)> {
    let lanes = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..lanes {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(index) else { break };
                    let run = run_child(seed, index);
                    results.lock().unwrap().push((index, seed, run));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(index, _, _)| *index);
    results.into_iter().map(|(_, seed, run)| (seed, run)).collect()
}

/// Runs one seed in a child process; its traced lines go to
/// `$FHIRHAUL_SIM_TRACE.<seed>.<index>` when that is set.
fn run_child(seed: u64, index: usize) -> Result<String, String> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = std::process::Command::new(exe);
    child
        .args(["seed_sweep", "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("FHIRHAUL_SIM_SEED", seed.to_string())
        .env_remove("FHIRHAUL_SIM_SEEDS");
    if let Some(trace) = std::env::var_os("FHIRHAUL_SIM_TRACE") {
        let mut trace = trace;
        trace.push(format!(".{seed}.{index}"));
        child.env("FHIRHAUL_SIM_TRACE", trace);
    }
    let output = child
        .output()
        .map_err(|e| format!("could not start the seed's process: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // libtest may print "test seed_sweep ... " on the same line first.
    let record = stdout
        .lines()
        .find_map(|line| line.find(RECORD_PREFIX).map(|at| &line[at..]));
    match record {
        Some(line) if output.status.success() => Ok(line.to_string()),
        _ => {
            // The panic message and what follows it; the whole stderr if there is none.
            let why = stderr.find("panicked at").map_or(stderr.as_ref(), |at| &stderr[at..]);
            let why = why.split("\nstack backtrace:").next().unwrap_or(why);
            Err(format!("{} ({})", why.trim(), output.status))
        }
    }
}

#[test]
fn two_live_holders_of_one_file_generation_are_reported() {
    let fields = |worker: &str, generation: &str| -> std::collections::BTreeMap<String, String> {
        [
            ("worker", worker),
            ("job", "job-1"),
            ("file", "job-1/Patient.1.ndjson"),
            ("generation", generation),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let mut holdings = Holdings::default();
    holdings.observe("lease held", &fields("w1", "1"));
    holdings.observe("lease held", &fields("w2", "2"));
    assert!(
        holdings.violations.is_empty(),
        "a newer generation may overlap an old holder"
    );
    holdings.observe("registered with the coordinator", &fields("w2", ""));
    holdings.observe("lease held", &fields("w2", "2"));
    holdings.observe("lease let go", &fields("w1", "1"));
    holdings.observe("lease held", &fields("w1", "2"));
    assert_eq!(holdings.violations.len(), 1, "{:?}", holdings.violations);
}

#[test]
fn a_checkpoint_moving_backwards_is_reported() {
    let stored = |worker: &str, offset: u64, validator: &str| -> std::collections::BTreeMap<String, String> {
        [
            ("worker", worker.to_string()),
            ("job", "job-1".to_string()),
            ("file", "job-1/Patient.1.ndjson".to_string()),
            ("offset", offset.to_string()),
            ("validator", validator.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let mut holdings = Holdings::default();
    holdings.observe("checkpoint stored", &stored("w1", 4096, "a"));
    holdings.observe("checkpoint stored", &stored("w1", 8192, "a"));
    holdings.observe("checkpoint stored", &stored("w2", 4096, "a"));
    holdings.observe("checkpoint stored", &stored("w1", 0, "a"));
    holdings.observe("checkpoint stored", &stored("w1", 4096, "a"));
    holdings.observe("checkpoint stored", &stored("w1", 2048, "b"));
    assert!(
        holdings.violations.is_empty(),
        "other workers, restarts from zero and a changed file are not moving back: {:?}",
        holdings.violations
    );
    holdings.observe("checkpoint stored", &stored("w1", 1024, "b"));
    assert_eq!(holdings.violations.len(), 1, "{:?}", holdings.violations);
}

/// The outcome depends on the seed alone.
#[test]
fn a_seed_replays_to_the_same_outcome() {
    let scenario = Scenario::from_seed(42);
    assert_eq!(cluster_run(scenario.clone()), cluster_run(scenario));
}

/// So should every event, and the virtual moment it happens: everything that would run on
/// another thread runs inline in simulation (`Offload::Inline`, `FileIo::Inline`), turmoil seeds each host's
/// runtime (it needs `--cfg tokio_unstable`, set in `.cargo/config.toml`), and each run has
/// a process of its own ([`run_isolated`] says why). The seeds crash workers, coordinators
/// and the leader. `FHIRHAUL_SIM_TRACE=<path>` writes each run's traced lines to `<path>.<seed>.<run>`,
/// to diff two runs.
#[test]
fn a_seed_replays_to_the_same_event_trace() {
    #[cfg(not(tokio_unstable))]
    panic!(
        "built without --cfg tokio_unstable (a RUSTFLAGS variable replaces .cargo/config.toml's): \
         tokio::select! then picks branches at random and no two runs are alike"
    );
    let seeds: Vec<u64> = match std::env::var("FHIRHAUL_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("FHIRHAUL_SIM_SEED is a number")],
        Err(_) => vec![42, 7, 5, 1234, 21],
    };
    let twice: Vec<u64> = seeds.iter().flat_map(|&seed| [seed, seed]).collect();
    let runs = run_isolated(&twice);
    for pair in runs.chunks(2) {
        let [(seed, first), (_, second)] = pair else {
            unreachable!()
        };
        let first = first.as_ref().unwrap_or_else(|why| panic!("seed {seed}: {why}"));
        let second = second.as_ref().unwrap_or_else(|why| panic!("seed {seed}: {why}"));
        let events: u64 = first
            .rsplit("events=")
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_default();
        assert!(events > 50, "seed {seed}: the trace records the run ({first})");
        assert_eq!(
            first,
            second,
            "seed {seed}: two runs logged different events or at different moments\n{}",
            replay_hint(*seed)
        );
    }
}
