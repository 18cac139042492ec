//! The simulated EHR: an independent implementation of the server side of SMART Backend
//! Services and FHIR Bulk Data export, as strict as the specs and as hostile as the worst
//! real EHR. It writes and parses every wire format itself (it does not use the client
//! crate), so one misunderstanding cannot pass on both sides.
//!
//! Layout:
//! - [`population`]: the deterministic synthetic population the exports come from.
//! - [`jose`]: client-assertion verification (RS384/ES384 against registered JWK Sets).
//! - `server`: routing and the handlers (discovery, token, kick-off, status, files).
//! - `spool`: building an export's files on disk (filters applied, faults planted).
//! - [`Faults`]: knobs that make it misbehave; [`Observed`]: what it saw, for assertions.
//!
//! [`SimEhr::start`] serves it on two loopback ports: the FHIR server (with its token
//! endpoint) and a "storage" origin that holds capability URLs, like the cloud buckets real
//! EHRs redirect file downloads to.

// The simulated EHR is the test oracle, not fhirhaul's own code: its blocking file work
// is behind its own seam (`SimConfig::file_io`), its calendar time behind
// `SimConfig::wall_clock_base`, and it is exempt from the workspace's disallowed methods.
#![allow(clippy::disallowed_methods)]

pub mod jose;
pub mod population;
mod server;
mod spool;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p384::elliptic_curve::sec1::ToEncodedPoint;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use jose::RegisteredClient;

/// How status responses carry `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfterStyle {
    Seconds(u64),
    /// An HTTP-date this many seconds ahead.
    HttpDate(u64),
    Absent,
}

/// Which forms of a multi-valued parameter the kick-off accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinPolicy {
    Both,
    /// Repeating a parameter is refused.
    CommaOnly,
    /// Comma-joined values are refused (the STU4 rule).
    RepeatOnly,
}

/// Fixed behaviour of one simulated EHR.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub patients: u32,
    /// Files are split so none holds more resources than this.
    pub max_resources_per_file: u64,
    pub token_lifetime: Duration,
    /// How long an export "runs" before its manifest is ready.
    pub job_duration: Duration,
    pub retry_after: RetryAfterStyle,
    pub requires_access_token: bool,
    /// Honour `allowPartialManifests` with manifests on 202.
    pub partial_manifests: bool,
    /// Split the manifest's `output` into pages of this many entries (`link` next).
    pub manifest_page_size: Option<usize>,
    pub join_policy: JoinPolicy,
    /// Answer file requests with a 307 to the storage origin (Oracle Health does this).
    pub redirect_files: bool,
    /// `capabilities` advertises `permission-v2` (else only `permission-v1`).
    pub permission_v2: bool,
    /// Grant this scope instead of the one requested (a narrower grant).
    pub grant_scope: Option<String>,
    /// Where export files are written; a temporary directory when `None`.
    pub spool_dir: Option<PathBuf>,
    /// gzip file responses when the client offers it.
    pub compress: bool,
    /// File links stop working this long after the manifest that gave them (the status
    /// response's `Expires` says when); asking the status URL again gives fresh links.
    /// `None`: links work as long as the export exists.
    pub link_lifetime: Option<Duration>,
    /// The sim's calendar time at start (default: the wall clock), for reproducible runs.
    pub wall_clock_base: Option<SystemTime>,
    /// Where exports are built and their files read: tokio's blocking pool, or (for a
    /// deterministic simulation, where a pool thread finishes at a real-time moment) the
    /// serving task.
    pub file_io: FileIo,
}

/// Where the simulated EHR does its blocking file work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FileIo {
    #[default]
    Threads,
    Inline,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            patients: 100,
            max_resources_per_file: 1000,
            token_lifetime: Duration::from_secs(300),
            job_duration: Duration::from_millis(300),
            retry_after: RetryAfterStyle::Seconds(1),
            requires_access_token: true,
            partial_manifests: true,
            manifest_page_size: None,
            join_policy: JoinPolicy::Both,
            redirect_files: false,
            permission_v2: true,
            grant_scope: None,
            spool_dir: None,
            compress: true,
            link_lifetime: None,
            file_io: FileIo::Threads,
            wall_clock_base: None,
        }
    }
}

/// Misbehaviour, switchable at run time. Counters are "the next N times".
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub kickoff_429: u32,
    /// The manifest lies about the `count` of files of this type, by this much (a file
    /// that looks short, or long, though it is served whole).
    pub count_off_by: Option<(String, i64)>,
    /// The manifest gives no `count` for any file (the spec makes it optional).
    pub omit_count: bool,
    /// Exports report this many resources they could not export: OperationOutcomes of
    /// severity `error` in the `error` file (next to any warnings).
    pub unexported_resources: u32,
    /// File bodies in identity encoding go out as HTTP/1.0 without `Content-Length`: their
    /// end is where the server closes the connection, so a cut looks like an end.
    pub close_delimited: bool,
    /// A cut (`cut_after_bytes`) lands at the end of a line rather than inside one.
    pub cut_at_line_boundary: bool,
    /// The next N kick-offs are accepted (the export exists and runs) and then the
    /// connection is dropped without an answer, as when a proxy or the network fails
    /// between the EHR and the client.
    pub kickoff_drop_after_accept: u32,
    /// Kick-off answers 200 instead of 202.
    pub kickoff_200: bool,
    /// Kick-off answers 202 without Content-Location.
    pub kickoff_no_location: bool,
    pub status_429: u32,
    pub status_503: u32,
    /// 500 with a `transient` OperationOutcome.
    pub status_500: u32,
    /// Every status request gets this status with an HTML body (a broken proxy).
    pub status_html: Option<u16>,
    /// The export never completes; X-Progress stays the same (HAPI's cancelled jobs).
    pub never_complete: bool,
    /// 500 on file requests.
    pub file_500: u32,
    /// Cut file responses after this many body bytes (`cuts` times).
    pub cut_after_bytes: Option<u64>,
    pub cuts: u32,
    /// Once a response of a file passed this many bytes: change the file (new version,
    /// new ETag) and cut the connection.
    pub change_file_after_bytes: Option<u64>,
    /// File requests answer 200 with an HTML page.
    pub file_html: bool,
    /// Revoke every token after it has been used this many times (early revocation).
    pub revoke_token_after_uses: Option<u32>,
    /// Plant a malformed line at (type, 1-based line) of the first file of that type.
    pub malformed_line: Option<(String, u64)>,
    /// Plant a Patient resource at (type, line) of the first file of that type.
    pub wrong_type_line: Option<(String, u64)>,
    /// Serve each file response no faster than this (a slow link).
    pub throttle_bytes_per_sec: Option<u64>,
    /// A rate limiter that blocks a client for a while: each kind of request (kick-off,
    /// status, file) answers 429 with a `Retry-After` (at most 60 s, never past the end)
    /// for this long after the first request of that kind arrives.
    pub busy_for: Option<Duration>,
    /// An EHR that serves at most this many file downloads at once: a file request
    /// beyond it is answered 429 with `Retry-After: 1`.
    pub max_concurrent_files: Option<usize>,
}

/// A kick-off as the EHR saw it.
#[derive(Debug, Clone)]
pub struct KickoffSeen {
    /// When it arrived (the runtime's clock: virtual under turmoil).
    pub at: tokio::time::Instant,
    pub method: String,
    pub path: String,
    /// Parameters in arrival order, values as sent (comma-joined values not split).
    pub params: Vec<(String, String)>,
    pub prefer: Option<String>,
    pub accept: Option<String>,
    pub content_type: Option<String>,
}

/// A file request as the EHR saw it.
#[derive(Debug, Clone)]
pub struct FileRequestSeen {
    pub job: u64,
    pub file: usize,
    /// `true` for the storage origin.
    pub storage: bool,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub authorization: bool,
    pub accept: Option<String>,
    pub accept_encoding: Option<String>,
    pub status: u16,
}

/// Everything the EHR observed, for tests to assert on.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub kickoffs: Vec<KickoffSeen>,
    pub discovery_requests: u32,
    pub token_requests: u32,
    pub tokens_issued: u32,
    /// Every client assertion received and access token issued, for tests that check
    /// none of them leaks (into logs, errors, files).
    pub secrets_seen: Vec<String>,
    /// Why each rejected token request was rejected.
    pub token_rejections: Vec<String>,
    pub scopes_requested: Vec<String>,
    pub status_requests: u32,
    pub status_accept: Vec<Option<String>>,
    pub unauthorized: u32,
    /// Requests refused with 429 by `Faults::busy_for`, by kind (kick-off, status, file).
    pub busy_refusals: BTreeMap<&'static str, u32>,
    /// File requests refused with 429 by `Faults::max_concurrent_files`.
    pub concurrency_refusals: u32,
    /// The most file downloads served at once.
    pub max_files_in_flight: usize,
    pub file_requests: Vec<FileRequestSeen>,
    /// Requests that brought a bearer token to the storage origin.
    pub token_leaks: u32,
    pub deletes: u32,
}

/// One file of a finished export, as served.
#[derive(Debug, Clone)]
pub struct ServedFile {
    pub index: usize,
    /// `output`, `deleted` or `error`.
    pub kind: &'static str,
    pub resource_type: Option<String>,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub count: u64,
    pub version: u32,
}

/// A ready-to-use client registration, as `fhirhaul sim-ehr` prints it.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub kid: String,
    pub algorithm: &'static str,
    /// PKCS#8 PEM.
    pub private_key_pem: String,
}

struct TokenInfo {
    client_id: String,
    scopes: Vec<String>,
    expires: tokio::time::Instant,
    uses: u32,
}

struct State {
    clients: HashMap<String, RegisteredClient>,
    seen_jti: HashSet<(String, String)>,
    tokens: HashMap<String, TokenInfo>,
    jobs: BTreeMap<u64, spool::Job>,
    next_job: u64,
    rng: StdRng,
    faults: Faults,
    observed: Observed,
    /// When the first request of each kind arrived, for `Faults::busy_for`.
    busy_since: BTreeMap<&'static str, tokio::time::Instant>,
    /// File bodies being served right now.
    files_in_flight: usize,
}

struct Shared {
    config: SimConfig,
    state: Mutex<State>,
    fhir_base: String,
    token_url: String,
    storage_origin: String,
    spool_dir: PathBuf,
    /// Calendar time of the sim: wall clock at start plus tokio time since.
    started_wall: SystemTime,
    started: tokio::time::Instant,
    storage_secret: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn now_wall(&self) -> SystemTime {
        self.started_wall + self.started.elapsed()
    }

    fn now_unix(&self) -> i64 {
        self.now_wall()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default()
    }
}

/// A running simulated EHR. Dropping it stops its servers.
pub struct SimEhr {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    _stop: DropGuard,
    _spool: Option<tempfile::TempDir>,
}

/// Serves connections of a [`SimEhr`] (see [`SimEhr::new`]).
#[derive(Clone)]
pub struct ConnectionHandler {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl ConnectionHandler {
    /// Serves one connection; `storage` selects the storage origin's routes.
    pub async fn serve<I>(&self, io: I, storage: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        server::serve_connection(io, Arc::clone(&self.shared), storage, self.cancel.clone()).await;
    }
}

impl SimEhr {
    /// Serves on two fresh 127.0.0.1 ports.
    pub async fn start(config: SimConfig) -> std::io::Result<SimEhr> {
        let fhir = TcpListener::bind("127.0.0.1:0").await?;
        let storage = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(config, fhir, storage).await
    }

    /// Serves on listeners the caller bound.
    pub async fn serve(config: SimConfig, fhir: TcpListener, storage: TcpListener) -> std::io::Result<SimEhr> {
        let sim = SimEhr::new(
            config,
            &format!("http://{}", fhir.local_addr()?),
            &format!("http://{}", storage.local_addr()?),
        )?;
        let handler = sim.handler();
        tokio::spawn(server::accept_loop(
            fhir,
            Arc::clone(&handler.shared),
            false,
            handler.cancel.clone(),
        ));
        tokio::spawn(server::accept_loop(
            storage,
            Arc::clone(&handler.shared),
            true,
            handler.cancel.clone(),
        ));
        Ok(sim)
    }

    /// A simulated EHR whose connections the caller accepts (on any network) and hands to
    /// [`SimEhr::handler`]. `fhir_origin` and `storage_origin` are how clients reach it
    /// (`http://host:port`).
    pub fn new(config: SimConfig, fhir_origin: &str, storage_origin: &str) -> std::io::Result<SimEhr> {
        let (spool_dir, spool_guard) = match &config.spool_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (dir.clone(), None)
            }
            None => {
                let dir = tempfile::Builder::new().prefix("fhirhaul-sim-").tempdir()?;
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        let mut rng = StdRng::seed_from_u64(config.seed);
        let storage_secret = random_hex(&mut rng, 16);
        let shared = Arc::new(Shared {
            fhir_base: format!("{fhir_origin}/fhir"),
            token_url: format!("{fhir_origin}/auth/token"),
            storage_origin: storage_origin.to_string(),
            spool_dir,
            started_wall: config.wall_clock_base.unwrap_or_else(SystemTime::now),
            started: tokio::time::Instant::now(),
            storage_secret,
            state: Mutex::new(State {
                clients: HashMap::new(),
                seen_jti: HashSet::new(),
                tokens: HashMap::new(),
                jobs: BTreeMap::new(),
                next_job: 1,
                rng,
                faults: Faults::default(),
                observed: Observed::default(),
                busy_since: BTreeMap::new(),
                files_in_flight: 0,
            }),
            config,
        });
        let cancel = CancellationToken::new();
        Ok(SimEhr {
            shared,
            cancel: cancel.clone(),
            _stop: cancel.drop_guard(),
            _spool: spool_guard,
        })
    }

    /// Serves connections for this EHR; cheap to clone into a simulated host.
    pub fn handler(&self) -> ConnectionHandler {
        ConnectionHandler {
            shared: Arc::clone(&self.shared),
            cancel: self.cancel.clone(),
        }
    }

    /// The FHIR base URL (`http://127.0.0.1:PORT/fhir`).
    pub fn base_url(&self) -> &str {
        &self.shared.fhir_base
    }

    pub fn token_url(&self) -> &str {
        &self.shared.token_url
    }

    /// The storage origin (`http://127.0.0.1:PORT`).
    pub fn storage_origin(&self) -> &str {
        &self.shared.storage_origin
    }

    pub fn register_client(&self, client: RegisteredClient) {
        self.shared.lock().clients.insert(client.client_id.clone(), client);
    }

    /// Generates a key pair (`RS384` or `ES384`), registers its public half under a new
    /// client id and returns the credentials a client needs.
    pub fn new_client(&self, algorithm: &'static str) -> ClientCredentials {
        let mut rng = rand::rngs::OsRng;
        let (jwk, pem) = if algorithm == "RS384" {
            let key = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key generation");
            let jwk = json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            });
            (jwk, key.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8").to_string())
        } else {
            let key = p384::SecretKey::random(&mut rng);
            let point = key.public_key().to_encoded_point(false);
            let jwk = json!({
                "kty": "EC",
                "crv": "P-384",
                "x": URL_SAFE_NO_PAD.encode(point.x().expect("x")),
                "y": URL_SAFE_NO_PAD.encode(point.y().expect("y")),
            });
            (jwk, key.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8").to_string())
        };
        let (client_id, kid) = {
            let mut state = self.shared.lock();
            (
                format!("client-{}", random_hex(&mut state.rng, 6)),
                format!("kid-{}", random_hex(&mut state.rng, 6)),
            )
        };
        let mut jwk = jwk;
        jwk["kid"] = Value::String(kid.clone());
        jwk["alg"] = Value::String(algorithm.to_string());
        self.register_client(RegisteredClient {
            client_id: client_id.clone(),
            jwks: json!({ "keys": [jwk] }),
            jku: None,
        });
        ClientCredentials {
            client_id,
            kid,
            algorithm: if algorithm == "RS384" { "RS384" } else { "ES384" },
            private_key_pem: pem,
        }
    }

    /// Changes the fault knobs.
    /// Revokes every registered client and the tokens issued to them, as an EHR does when
    /// an administrator withdraws an app's key: token requests are refused with
    /// `invalid_client` from now on, and tokens in use answer 401.
    pub fn revoke_clients(&self) {
        let mut state = self.shared.lock();
        state.clients.clear();
        state.tokens.clear();
    }

    pub fn set_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.shared.lock().faults);
    }

    /// What the EHR has seen so far.
    pub fn observed(&self) -> Observed {
        self.shared.lock().observed.clone()
    }

    /// The files of a finished export job (ids count from 1), as currently served.
    pub fn served_files(&self, job: u64) -> Vec<ServedFile> {
        let state = self.shared.lock();
        state.jobs.get(&job).map(spool::Job::served_files).unwrap_or_default()
    }

    /// Ids of every export job so far.
    pub fn jobs(&self) -> Vec<u64> {
        self.shared.lock().jobs.keys().copied().collect()
    }
}

fn random_hex(rng: &mut StdRng, bytes: usize) -> String {
    use rand::RngCore;
    let mut buffer = vec![0u8; bytes];
    rng.fill_bytes(&mut buffer);
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}
