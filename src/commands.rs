//! The subcommands. Each is glue: read arguments and config, call the crates, print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fhirhaul_common::clock::{Entropy, SystemClock};
use fhirhaul_common::config::TenantConfig;

use crate::config::Config;
use fhirhaul_common::http::{ReqwestTransport, TransportSettings};
use fhirhaul_common::keys::{Jwks, SigningAlgorithm, SigningKey};
use fhirhaul_common::status::PollSettings;
use fhirhaul_sim::{SimConfig, SimEhr};

#[derive(clap::Args)]
pub struct RunArgs {
    /// fhirhaul.toml with the EHR to export from; without it the built-in simulated EHR is used.
    #[arg(long, env = "FHIRHAUL_CONFIG")]
    config: Option<PathBuf>,
    /// Which tenant of the config (default: the first).
    #[arg(long)]
    tenant: Option<String>,
    /// Output directory (default: output_dir from the config, else ./fhirhaul-out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Simulated EHR only: patients in the synthetic population.
    #[arg(long, default_value_t = 200)]
    patients: u32,
    /// Simulated EHR only: population seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Local workers.
    #[arg(long, default_value_t = 3)]
    workers: u32,
}

#[derive(clap::Args)]
pub struct SimArgs {
    /// Port for the FHIR server (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, default_value_t = 1000)]
    patients: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the generated client's private key.
    #[arg(long, default_value = "sim-client.pem")]
    key_out: PathBuf,
    /// How long an export takes before its manifest is ready.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    job_duration: Duration,
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    fhirhaul_common::serde_duration::parse(text).ok_or_else(|| format!("`{text}` is not a duration like 5s, 2m, 250ms"))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn transport() -> anyhow::Result<Arc<ReqwestTransport>> {
    Ok(Arc::new(ReqwestTransport::new(&TransportSettings::default())?))
}

fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// `fhirhaul run`: the embedded default — a one-node coordinator and local workers in this
/// process, speaking gRPC over loopback, exporting from the configured EHR or from the
/// built-in simulated one.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cancel = crate::cluster::shutdown_on_signal();
    let (tenant, out_root, _sim) = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            let tenant = match &args.tenant {
                Some(name) => config
                    .tenant
                    .iter()
                    .find(|t| &t.name == name)
                    .cloned()
                    .with_context(|| format!("no tenant `{name}` in {}", path.display()))?,
                None => config
                    .tenant
                    .first()
                    .cloned()
                    .with_context(|| format!("{} has no [[tenant]]", path.display()))?,
            };
            let out = args
                .out
                .clone()
                .or(config.output_dir.clone())
                .unwrap_or_else(|| PathBuf::from("fhirhaul-out"));
            (tenant, out, None)
        }
        None => {
            let out = args.out.clone().unwrap_or_else(|| PathBuf::from("fhirhaul-out"));
            let (tenant, sim) = embedded_sim_tenant(&args, &out).await?;
            (tenant, out, Some(sim))
        }
    };
    let run_dir = out_root.join(&tenant.name).join(timestamp());
    let state_dir = run_dir.join(".fhirhaul");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port for the coordinator")?;
    let address = format!("http://{}", listener.local_addr()?);
    let cluster = cancel.child_token();
    let settings = fhirhaul_coordinator::node::CoordinatorSettings {
        data_dir: state_dir.join("coordinator"),
        cluster_token: crate::cluster::cluster_token(),
        ..Default::default()
    };
    // Loopback only, so plaintext.
    let coordinator =
        crate::cluster::start_coordinator(vec![tenant.clone()], settings, listener, None, cluster.clone()).await?;
    let workers = args.workers.max(1);
    let per_worker = (tenant.export.concurrency as u32).div_ceil(workers).max(1);
    let mut worker_tasks = Vec::new();
    for index in 1..=workers {
        let settings = crate::cluster::worker_settings(
            vec![address.clone()],
            format!("local-{index}"),
            per_worker,
            run_dir.clone(),
            state_dir.join(format!("worker-{index}")),
        );
        worker_tasks.push(tokio::spawn(fhirhaul_worker::run(
            settings,
            transport()?,
            Arc::new(SystemClock),
            Entropy::from_os(),
            cluster.clone(),
        )));
    }
    println!(
        "exporting from {} with a local coordinator ({address}) and {workers} workers",
        tenant.base_url
    );
    let started = Instant::now();
    let job_id = coordinator.submit(&tenant.name, None, false).await?;
    let admin = crate::cluster::Admin::new(std::slice::from_ref(&address), None)?;
    let job = crate::cluster::follow(&admin, &job_id).await?;
    let export_dir = run_dir.join(&job_id);
    let report = write_summary(&coordinator, &job_id, &export_dir).await?;
    cluster.cancel();
    for task in worker_tasks {
        let _ = task.await;
    }
    print_report(&report, &export_dir, started.elapsed());
    Ok(crate::cluster::exit_for(&job))
}

/// The summary a user checks: every file's path, SHA-256 and counts; every failure's reason.
async fn write_summary(
    coordinator: &fhirhaul_coordinator::node::Coordinator,
    job_id: &str,
    export_dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let job = coordinator.job(job_id).await?;
    let files: Vec<serde_json::Value> = job
        .files
        .iter()
        .filter(|f| f.phase == fhirhaul_coordinator::state::FilePhase::Done)
        .map(|f| {
            serde_json::json!({
                "path": f.location, "kind": f.kind, "resource_type": f.resource_type,
                "sha256": f.sha256, "bytes": f.progress.offset, "resources": f.progress.resources, "issues": f.issues,
            })
        })
        .collect();
    let failed: Vec<serde_json::Value> = job
        .files
        .iter()
        .filter(|f| f.phase == fhirhaul_coordinator::state::FilePhase::Failed)
        .map(|f| {
            let (category, error) = match &f.failure {
                Some((category, error)) => (Some(*category), error.clone()),
                None => (None, String::new()),
            };
            serde_json::json!({ "url": fhirhaul_common::url_util::SafeUrl::from(f.url.as_str()).to_string(), "category": category, "error": error })
        })
        .collect();
    let report = serde_json::json!({
        "job_id": job.id, "phase": job.phase, "error": job.error, "transaction_time": job.transaction_time,
        "files": files, "failed": failed,
    });
    std::fs::create_dir_all(export_dir).with_context(|| format!("creating {}", export_dir.display()))?;
    let path = export_dir.join("summary.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

/// Starts the built-in simulated EHR and a tenant registered with it.
async fn embedded_sim_tenant(args: &RunArgs, out: &Path) -> anyhow::Result<(TenantConfig, SimEhr)> {
    let sim = SimEhr::start(SimConfig {
        seed: args.seed,
        patients: args.patients,
        job_duration: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await
    .context("starting the simulated EHR")?;
    let credentials = sim.new_client("ES384");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key_path = out.join("sim-client.pem");
    write_private(&key_path, &credentials.private_key_pem)?;
    println!(
        "no --config given: using the built-in simulated EHR at {} ({} patients)",
        sim.base_url(),
        args.patients
    );
    let mut tenant = TenantConfig::new("sim", sim.base_url().parse()?, credentials.client_id, key_path);
    tenant.algorithm = Some(SigningAlgorithm::ES384);
    tenant.kid = Some(credentials.kid);
    // The simulated EHR finishes in seconds and asks for 1 s between polls.
    tenant.export.poll = PollSettings {
        min_interval: Duration::from_millis(500),
        max_interval: Duration::from_secs(5),
        ..PollSettings::default()
    };
    tenant.request.allow_partial_manifests = true;
    tenant.validate()?;
    Ok((tenant, sim))
}

fn print_report(report: &serde_json::Value, export_dir: &Path, elapsed: Duration) {
    let files = report["files"].as_array().map(Vec::len).unwrap_or(0);
    let resources: u64 = report["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["resources"].as_u64())
        .sum();
    let bytes: u64 = report["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["bytes"].as_u64())
        .sum();
    if let Some(error) = report["error"].as_str() {
        println!("export failed: {error}");
    }
    println!(
        "done in {:.1}s: {files} file(s), {resources} resources, {:.1} MB in {}",
        elapsed.as_secs_f64(),
        bytes as f64 / 1e6,
        export_dir.display()
    );
    println!(
        "summary with SHA-256 of every file: {}",
        export_dir.join("summary.json").display()
    );
    if let Some(since) = report["transaction_time"].as_str() {
        println!("next incremental export: _since={since}");
    }
    let failed = report["failed"].as_array().cloned().unwrap_or_default();
    if !failed.is_empty() {
        println!("{} file(s) failed:", failed.len());
        for failure in failed {
            println!(
                "  [{}] {}: {}",
                failure["category"].as_str().unwrap_or(""),
                failure["url"].as_str().unwrap_or(""),
                failure["error"].as_str().unwrap_or("")
            );
        }
    }
}

/// `fhirhaul sim-ehr`
pub async fn sim_ehr(args: SimArgs) -> anyhow::Result<ExitCode> {
    let fhir = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{}", args.port))?;
    let storage = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let sim = SimEhr::serve(
        SimConfig {
            seed: args.seed,
            patients: args.patients,
            job_duration: args.job_duration,
            ..SimConfig::default()
        },
        fhir,
        storage,
    )
    .await?;
    let credentials = sim.new_client("ES384");
    write_private(&args.key_out, &credentials.private_key_pem)?;
    println!("simulated EHR serving FHIR at {}", sim.base_url());
    println!(
        "token endpoint {}; storage origin {}",
        sim.token_url(),
        sim.storage_origin()
    );
    println!("registered client (ES384); put this in fhirhaul.toml:\n");
    println!(
        "[[tenant]]\nname = \"sim\"\nbase_url = \"{}\"\nclient_id = \"{}\"\nkid = \"{}\"\nprivate_key = \"{}\"",
        sim.base_url(),
        credentials.client_id,
        credentials.kid,
        args.key_out.display()
    );
    println!("[tenant.export.poll]\nmin_interval = \"1s\"\nmax_interval = \"5s\"\n");
    println!("press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    Ok(ExitCode::SUCCESS)
}

/// `fhirhaul keys generate`
pub fn keys_generate(alg: &str, out: &Path, kid: Option<String>, add_to: Option<&Path>) -> anyhow::Result<ExitCode> {
    let Some(algorithm) = SigningAlgorithm::parse(alg) else {
        bail!("--alg `{alg}` is not RS384 or ES384");
    };
    let mut jwks = match add_to {
        Some(path) => {
            Jwks::parse(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)?
        }
        None => Jwks::default(),
    };
    let (key, pem) = SigningKey::generate(algorithm, kid)?;
    jwks.add(key.public_jwk().clone())?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key_path = out.join(format!("{}.pem", key.kid()));
    if key_path.exists() {
        bail!("{} already exists; not overwriting a private key", key_path.display());
    }
    write_private(&key_path, &pem)?;
    let jwks_path = add_to.map(Path::to_path_buf).unwrap_or_else(|| out.join("jwks.json"));
    std::fs::write(&jwks_path, serde_json::to_string_pretty(&jwks)?)
        .with_context(|| format!("writing {}", jwks_path.display()))?;
    println!("private key ({algorithm}, kid {}): {}", key.kid(), key_path.display());
    println!(
        "JWK Set with {} key(s) to register or host: {}",
        jwks.keys.len(),
        jwks_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `fhirhaul check-config`
pub fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    for tenant in &config.tenant {
        tenant
            .signing_key()
            .map(|key| {
                println!(
                    "tenant {}: {} as {} ({} key, kid {})",
                    tenant.name,
                    tenant.base_url,
                    tenant.client_id,
                    key.algorithm(),
                    key.kid()
                )
            })
            .unwrap_or_else(|error| {
                println!(
                    "tenant {}: {} as {} (key not loadable: {error})",
                    tenant.name, tenant.base_url, tenant.client_id
                )
            });
    }
    println!(
        "cluster: listen {}, data in {}, leases {}s, mTLS {}",
        config.cluster.listen,
        config.cluster.data_dir.display(),
        config.cluster.lease_duration.as_secs(),
        if config.cluster.tls.is_some() { "on" } else { "off" }
    );
    println!("{} is valid", path.display());
    Ok(ExitCode::SUCCESS)
}
