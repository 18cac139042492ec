//! The subcommands. Each is glue: read arguments and config, call the crates, print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fhirhaul_common::clock::{Entropy, SystemClock};
use fhirhaul_common::config::TenantConfig;

use fhirhaul_common::keys::{Jwks, SigningAlgorithm, SigningKey};
use fhirhaul_common::output::Summary;
use fhirhaul_common::status::PollSettings;
use fhirhaul_coordinator::state::Cleanup;
use fhirhaul_embedded::{Embedded, EmbeddedSettings};
use fhirhaul_sim::{SimConfig, SimEhr};

use crate::config::Config;
use crate::process::{cluster_token, parse_duration, shutdown_on_signal, transport};

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
    /// Start a new export even if an earlier run left one unfinished (that one is
    /// cancelled, and DELETEd at the EHR). Without it, the same command carries on with
    /// the unfinished export: same status URL, no new kick-off, partial files resumed.
    #[arg(long)]
    fresh: bool,
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

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    fhirhaul_common::private_fs::write(path, contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
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
    let cancel = shutdown_on_signal();
    let (tenant, out_root, sim) = match &args.config {
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
    // One state directory per tenant, so the same command again resumes; the built-in
    // simulated EHR starts anew each time (its exports do not outlive it), so it gets a
    // fresh one per run.
    let state_dir = match &sim {
        None => out_root.join(&tenant.name).join(".fhirhaul"),
        Some(_) => out_root.join(&tenant.name).join(".fhirhaul").join(timestamp()),
    };
    let embedded = Embedded::start(
        EmbeddedSettings {
            tenant: tenant.clone(),
            state_dir: state_dir.clone(),
            output_dir: out_root.clone(),
            workers: args.workers,
            cluster_token: cluster_token(),
        },
        transport()?,
        Arc::new(SystemClock),
        Entropy::from_os(),
    )
    .await?;
    println!(
        "exporting from {} with a local coordinator ({}) and {} workers",
        tenant.base_url,
        embedded.address(),
        args.workers.max(1)
    );
    let started = Instant::now();
    let job_id = match embedded.unfinished().await? {
        Some(job_id) if !args.fresh => {
            println!(
                "resuming {job_id}, left unfinished by an earlier run (state in {}); no new kick-off",
                state_dir.display()
            );
            job_id
        }
        unfinished => {
            if let Some(job_id) = unfinished {
                println!("--fresh: cancelling {job_id}, left unfinished by an earlier run");
                embedded.cancel(&job_id).await?;
            }
            embedded.submit().await?
        }
    };
    let admin = crate::cluster::Admin::new(&[embedded.address().to_string()], None)?;
    let followed = tokio::select! {
        job = crate::cluster::follow(&admin, &job_id) => Some(job?),
        _ = cancel.cancelled() => None,
    };
    let cleanup = match followed {
        // The export ended: its DELETE at the EHR (when the policy asks for one) is part
        // of the run, so the process does not exit before it is sent.
        Some(_) => Some(wait_for_cleanup(&embedded, &job_id, &cancel).await?),
        None => None,
    };
    let (summary, export_dir) = embedded.write_summary(&job_id, &out_root).await?;
    let files_known = embedded.coordinator().job(&job_id).await?.files.len();
    let cursor = embedded.cursor().await?;
    embedded.shutdown().await;
    let Some(job) = followed else {
        println!(
            "stopped: {} of {files_known} file(s) saved in {}; partial files keep their checkpoints (summary so far in summary.json).\n\
             Run the same command again to resume it (no new kick-off), or add --fresh to start over.",
            summary.files.len(),
            export_dir.display()
        );
        return Ok(ExitCode::from(130));
    };
    print_report(&summary, &export_dir, started.elapsed(), cursor.as_deref());
    match cleanup {
        Some(Cleanup::Deleted) => println!("the export was DELETEd at the EHR"),
        Some(Cleanup::Failed(reason)) => {
            println!("the EHR refused to DELETE the export ({reason}); it will expire it in its own time")
        }
        Some(Cleanup::Due { .. }) => println!("the export's DELETE at the EHR did not finish in time; it stays there"),
        Some(Cleanup::Kept) if summary.failed.is_empty() => {
            println!("the export stays at the EHR until it expires it (export.delete_when_done is off)")
        }
        Some(Cleanup::Kept) => println!(
            "the export stays at the EHR, so failed files can be fetched again (export.delete_after_failure is off)"
        ),
        Some(Cleanup::None) | None => {}
    }
    Ok(crate::cluster::exit_for(&job))
}

/// How long `run` waits for an ended export's DELETE (three tries, ten and twenty seconds
/// apart, fit).
const CLEANUP_WAIT: Duration = Duration::from_secs(60);

/// Waits until the ended job's cleanup at the EHR is no longer due (done, failed for good,
/// or not wanted), at most [`CLEANUP_WAIT`] or until interrupted.
async fn wait_for_cleanup(
    embedded: &Embedded,
    job_id: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Cleanup> {
    let deadline = Instant::now() + CLEANUP_WAIT;
    loop {
        let cleanup = embedded.coordinator().job(job_id).await?.cleanup();
        if !matches!(cleanup, Cleanup::Due { .. }) || Instant::now() >= deadline || cancel.is_cancelled() {
            return Ok(cleanup);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    fhirhaul_common::private_fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
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

/// The end-of-run report. `cursor` is the tenant's incremental cursor after the job: the
/// next `_since` is announced only when this export moved it there.
fn print_report(summary: &Summary, export_dir: &Path, elapsed: Duration, cursor: Option<&str>) {
    if let Some(error) = &summary.error {
        println!("export failed: {error}");
    }
    let mut extra = String::new();
    if summary.error_records() > 0 {
        extra.push_str(&format!(", {} EHR error record(s)", summary.error_records()));
    }
    if summary.deletion_bundles() > 0 {
        extra.push_str(&format!(", {} deletion bundle(s)", summary.deletion_bundles()));
    }
    println!(
        "done in {:.1}s: {} file(s), {} resources{extra}, {:.1} MB in {}",
        elapsed.as_secs_f64(),
        summary.files.len(),
        summary.resources(),
        summary.bytes() as f64 / 1e6,
        export_dir.display()
    );
    if summary.ehr_errors() > 0 {
        println!(
            "the EHR reports {} error(s) in its error files: data it could not export (exit status 3):",
            summary.ehr_errors()
        );
        let issues = summary
            .files
            .iter()
            .filter(|f| f.ehr_errors > 0)
            .flat_map(|f| f.issues.iter());
        for issue in issues.clone().take(10) {
            println!("  {issue}");
        }
        if issues.count() > 10 {
            println!("  … (all of them in summary.json and the error files)");
        }
    }
    println!(
        "summary with SHA-256 of every file: {}",
        export_dir.join("summary.json").display()
    );
    match (&summary.transaction_time, cursor) {
        (Some(reached), Some(cursor)) if reached == cursor => {
            println!("next incremental export: _since={cursor}");
        }
        (Some(_), cursor) => println!(
            "the incremental cursor did not move (it moves only when every file of an export is downloaded){}",
            cursor
                .map(|c| format!("; next incremental export: _since={c}"))
                .unwrap_or_default()
        ),
        (None, _) => {}
    }
    if !summary.failed.is_empty() {
        println!("{} file(s) failed:", summary.failed.len());
        for failure in &summary.failed {
            println!("  [{}] {}: {}", failure.category, failure.url, failure.error);
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
    let mut broken = Vec::new();
    for tenant in &config.tenant {
        match tenant.signing_key() {
            Ok(key) => println!(
                "tenant {}: {} as {} ({} key, kid {})",
                tenant.name,
                tenant.base_url,
                tenant.client_id,
                key.algorithm(),
                key.kid()
            ),
            Err(error) => {
                println!(
                    "tenant {}: {} as {}: KEY NOT LOADABLE: {error}",
                    tenant.name, tenant.base_url, tenant.client_id
                );
                broken.push(tenant.name.clone());
            }
        }
    }
    println!(
        "cluster (for `fhirhaul coordinator`; `run` starts its own one-node cluster on loopback and \
         ignores this): listen {}, data in {}, leases {}s, mTLS {}",
        config.cluster.listen,
        config.cluster.data_dir.display(),
        config.cluster.lease_duration.as_secs(),
        if config.cluster.tls.is_some() { "on" } else { "off" }
    );
    if !broken.is_empty() {
        println!(
            "{} is NOT usable: the signing key of tenant(s) {} cannot be loaded",
            path.display(),
            broken.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("{} is valid", path.display());
    Ok(ExitCode::SUCCESS)
}
