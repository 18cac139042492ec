//! Streaming, validating, resumable download of one manifest file.
//!
//! The network side (an async task) requests the file and pushes body chunks into a bounded
//! channel; a writer on a blocking thread decodes gzip, checks every line
//! ([`crate::ndjson`]), hashes and writes whole lines to `<dest>.part`. Memory is the
//! channel's few chunks plus one partial line, whatever the file's size.
//!
//! When a body breaks off, the writer drops the half line and reports the offset of the last
//! whole line; the next request asks for `Range: bytes=<offset>-` with `If-Range` (a strong
//! ETag, else Last-Modified) and `Accept-Encoding: identity`, so offsets are in the bytes
//! the file holds. A 200 (validator changed, or Range ignored), a 206 for the wrong range or
//! with another ETag, or a 416 restarts the file from zero. The `.part` is renamed to its
//! final name only after the whole body checked out and was synced.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::Method;
use http::header::{ACCEPT, ACCEPT_ENCODING, IF_RANGE, RANGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::client::{Auth, FhirClient};
use crate::error::{Error, Result};
use crate::http::{HttpRequest, HttpResponse};
use crate::manifest::ManifestFile;
use crate::ndjson::{Expect, FeedError, LineChecker};
use crate::offload::Offload;
use crate::retry::Backoff;
use crate::url_util::SafeUrl;

/// Download tuning. Every timing is configurable so tests can shrink it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadSettings {
    /// Attempts in a row that make no progress before the file fails.
    pub max_attempts: u32,
    #[serde(with = "crate::serde_duration")]
    pub backoff_min: Duration,
    #[serde(with = "crate::serde_duration")]
    pub backoff_max: Duration,
    /// Longest NDJSON line accepted.
    pub max_line_bytes: usize,
    /// Sync the partial file and publish a checkpoint every this many bytes (only when
    /// someone receives checkpoints).
    pub checkpoint_every_bytes: u64,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        DownloadSettings {
            max_attempts: 8,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_line_bytes: 64 * 1024 * 1024,
            checkpoint_every_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What identifies the server's version of a file: its ETag (strong or weak) and
/// Last-Modified, as the response that started the file gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validator {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// The opaque part of an entity tag, for weak comparison (RFC 9110 §8.8.3.2).
fn opaque_tag(etag: &str) -> &str {
    etag.strip_prefix("W/").unwrap_or(etag)
}

impl Validator {
    fn from_response(response: &HttpResponse) -> Option<Validator> {
        let validator = Validator {
            etag: response.header_str("etag").map(str::to_owned),
            last_modified: response.header_str("last-modified").map(str::to_owned),
        };
        (validator.etag.is_some() || validator.last_modified.is_some()).then_some(validator)
    }

    /// The `If-Range` value: a strong ETag, else the Last-Modified date. A weak ETag cannot
    /// be used (If-Range compares strongly).
    fn if_range(&self) -> Option<&str> {
        match &self.etag {
            Some(etag) if !etag.starts_with("W/") => Some(etag),
            _ => self.last_modified.as_deref(),
        }
    }

    /// Why a ranged response is not the same version of the file, if it is not. ETags are
    /// compared weakly: the gzip variant's `W/"x"` and the identity `"x"` are one version.
    /// This catches a server whose Last-Modified did not move when the file changed.
    fn changed_in(&self, response: &HttpResponse) -> Option<String> {
        if let (Some(ours), Some(theirs)) = (&self.etag, response.header_str("etag"))
            && opaque_tag(ours) != opaque_tag(theirs)
        {
            return Some(format!("ETag changed from {ours} to {theirs}"));
        }
        if let (Some(ours), Some(theirs)) = (&self.last_modified, response.header_str("last-modified"))
            && ours != theirs
        {
            return Some(format!("Last-Modified changed from {ours} to {theirs}"));
        }
        None
    }
}

/// A durable point in a partial file: its first `offset` bytes are synced to disk, hold
/// `lines` whole lines (`resources` of them non-blank), and came from the `validator`
/// version of the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub offset: u64,
    pub lines: u64,
    pub resources: u64,
    pub validator: Option<Validator>,
}

/// Optional hooks for a download.
#[derive(Default)]
pub struct DownloadOptions {
    /// Continue a partial file from this checkpoint (its `.part` must still be there).
    pub resume: Option<Checkpoint>,
    /// Receives each new durable checkpoint.
    pub checkpoints: Option<watch::Sender<Checkpoint>>,
    pub cancel: CancellationToken,
    /// Where checking, hashing and writing run: the writer and hashing threads, or (only for
    /// a deterministic simulation, where a real thread finishing at a real-time moment moves
    /// everything after it in simulated time) the calling task.
    pub offload: Offload,
}

/// A completed, verified file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOutcome {
    pub path: PathBuf,
    pub bytes: u64,
    /// Non-blank lines.
    pub resources: u64,
    pub sha256: String,
    /// The manifest's `count`, when it disagreed with `resources`.
    pub count_mismatch: Option<u64>,
    /// Times the download continued with a Range request.
    pub resumes: u32,
    /// Times the download had to start over (validator changed, Range ignored).
    pub restarts: u32,
    /// For `error` files: the OperationOutcome issues they hold.
    pub issues: Vec<String>,
}

/// The `.part` name a download writes to before the final rename.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads `file` to `dest`, sending the token only when `requires_token`.
pub async fn download_file(
    client: &FhirClient,
    file: &ManifestFile,
    requires_token: bool,
    dest: &Path,
    settings: &DownloadSettings,
    options: DownloadOptions,
) -> Result<FileOutcome> {
    let url = SafeUrl::from(&file.url);
    let part = part_path(dest);
    if let Some(parent) = dest.parent() {
        let directory = parent.to_path_buf();
        #[allow(clippy::disallowed_methods)] // Inside the offload seam.
        let created = options.offload.run(move || std::fs::create_dir_all(directory)).await;
        created.map_err(|e| Error::io("creating directory", parent, e))?;
    }
    let resume = options.resume.clone().unwrap_or_default();
    let (commands, receiver) = mpsc::channel(16);
    let writer = Writer::open(
        part.clone(),
        &resume,
        LineChecker::new(Expect::for_file(file), settings.max_line_bytes),
        settings.checkpoint_every_bytes,
        options.checkpoints.clone(),
        url.clone(),
        options.offload,
    );
    let (finished_tx, writer_task) = oneshot::channel();
    if options.offload.is_inline() {
        tokio::spawn(async move {
            let _ = finished_tx.send(match writer {
                Ok(writer) => writer.run_here(receiver).await,
                Err(error) => Err(error),
            });
        });
    } else {
        // The writer gets its own thread rather than the blocking pool: it lives as long as
        // the download, and a long-running blocking-pool task would also stop a paused tokio
        // clock (tests, turmoil) from advancing.
        std::thread::Builder::new()
            .name("fhirhaul-writer".into())
            .spawn(move || {
                let _ = finished_tx.send(writer.and_then(|w| w.run(receiver)));
            })
            .map_err(|e| Error::io("starting the writer thread for", &part, e))?;
    }
    let driver = Driver {
        client,
        file,
        auth: if requires_token { Auth::Bearer } else { Auth::Anonymous },
        settings,
        url: url.clone(),
        commands,
        cancel: options.cancel.clone(),
    };
    let result = driver.drive(resume).await;
    let (position, resumes, restarts) = match result {
        Ok(done) => done,
        Err(error) => {
            // Closing the channel lets the writer stop; it keeps the .part for a resume.
            drop(driver);
            // The writer's own error (a bad line, a full disk) explains a closed channel.
            return Err(match writer_task.await {
                Ok(Err(writer_error)) => writer_error,
                _ => error,
            });
        }
    };
    let (reply, answer) = oneshot::channel();
    let finished = match driver.commands.send(Command::Finish { reply }).await {
        Ok(()) => answer.await.ok(),
        Err(_) => None,
    };
    let stats = match finished {
        Some(stats) => stats?,
        None => {
            return Err(match writer_task.await {
                Ok(Err(error)) => error,
                _ => Error::Unavailable {
                    component: "file writer",
                },
            });
        }
    };
    let _ = writer_task.await;
    debug_assert_eq!(stats.bytes, position.offset);
    let (from, to) = (part.clone(), dest.to_path_buf());
    #[allow(clippy::disallowed_methods)] // Inside the offload seam.
    let renamed = options.offload.run(move || std::fs::rename(from, to)).await;
    renamed.map_err(|e| Error::io("renaming finished file to", dest, e))?;
    let count_mismatch = file.count.filter(|count| *count != stats.resources);
    if let Some(count) = count_mismatch {
        tracing::warn!(file = %url, manifest_count = count, resources = stats.resources, "resource count differs from the manifest's count");
    }
    Ok(FileOutcome {
        path: dest.to_path_buf(),
        bytes: stats.bytes,
        resources: stats.resources,
        sha256: stats.sha256,
        count_mismatch,
        resumes,
        restarts,
        issues: stats.issues,
    })
}

struct Driver<'a> {
    client: &'a FhirClient,
    file: &'a ManifestFile,
    auth: Auth,
    settings: &'a DownloadSettings,
    url: SafeUrl,
    commands: mpsc::Sender<Command>,
    cancel: CancellationToken,
}

/// How a body ended.
enum BodyEnd {
    Complete(Checkpoint),
    Cut(Checkpoint, Error),
}

impl Driver<'_> {
    /// Runs requests until one body arrives whole. Returns the final position and how many
    /// resumes and restarts it took.
    async fn drive(&self, resume: Checkpoint) -> Result<(Checkpoint, u32, u32)> {
        let mut position = resume;
        let mut backoff = Backoff::new(
            self.settings.backoff_min,
            self.settings.backoff_max,
            self.client.entropy().clone(),
        );
        let mut failures = 0u32;
        let mut resumes = 0u32;
        let mut restarts = 0u32;
        let mut warned_content_type = false;
        loop {
            if self.cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let if_range = position
                .validator
                .as_ref()
                .and_then(Validator::if_range)
                .filter(|_| position.offset > 0);
            let ranged = if_range.is_some();
            let mut request =
                HttpRequest::new(Method::GET, self.file.url.clone()).header(ACCEPT, "application/fhir+ndjson");
            if let Some(if_range) = if_range {
                request = request
                    .header(ACCEPT_ENCODING, "identity")
                    .header(RANGE, &format!("bytes={}-", position.offset))
                    .header(IF_RANGE, if_range);
            } else {
                request = request.header(ACCEPT_ENCODING, "gzip");
            }
            let outcome = self.attempt(request, &position, &mut warned_content_type).await;
            let error = match outcome {
                Ok(Attempt::Body(BodyEnd::Complete(done), restarted)) => {
                    restarts += u32::from(restarted);
                    resumes += u32::from(ranged && !restarted);
                    return Ok((done, resumes, restarts));
                }
                Ok(Attempt::Body(BodyEnd::Cut(reached, error), restarted)) => {
                    restarts += u32::from(restarted);
                    resumes += u32::from(ranged && !restarted);
                    let progressed = reached.offset > position.offset || restarted;
                    position = reached;
                    if progressed {
                        failures = 0;
                        backoff.reset();
                    }
                    error
                }
                Ok(Attempt::RestartWithoutRange(reason)) => {
                    tracing::info!(file = %self.url, %reason, "restarting the file from zero");
                    position = Checkpoint::default();
                    restarts += 1;
                    continue;
                }
                Err(error) if error.is_retryable() => error,
                Err(error) => return Err(error),
            };
            failures += 1;
            if failures >= self.settings.max_attempts {
                return Err(error);
            }
            let delay = backoff.next_delay(error.retry_after());
            tracing::warn!(file = %self.url, %error, offset = position.offset, delay_ms = delay.as_millis() as u64, "download interrupted; will resume");
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Error::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn attempt(
        &self,
        request: HttpRequest,
        position: &Checkpoint,
        warned_content_type: &mut bool,
    ) -> Result<Attempt> {
        let response = self.client.send(request, self.auth).await?;
        let status = response.status.as_u16();
        let restart = match status {
            200 => position.offset > 0,
            206 => {
                let range_start = response
                    .header_str("content-range")
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if range_start != Some(position.offset) {
                    return Ok(Attempt::RestartWithoutRange(format!(
                        "asked for bytes from {} but got Content-Range {:?}",
                        position.offset,
                        response.header_str("content-range")
                    )));
                }
                if let Some(change) = position.validator.as_ref().and_then(|v| v.changed_in(&response)) {
                    return Ok(Attempt::RestartWithoutRange(change));
                }
                false
            }
            416 => {
                return Ok(Attempt::RestartWithoutRange(
                    "server says the range is not satisfiable".into(),
                ));
            }
            _ => return Err(self.client.error_from(response).await),
        };
        let content_type = response.content_type().unwrap_or("").to_ascii_lowercase();
        if content_type.starts_with("text/html") {
            let message = self.client.error_from(response).await;
            return Err(Error::Protocol {
                url: self.url.clone(),
                reason: format!("served an HTML page where NDJSON was promised ({message})"),
            });
        }
        if !content_type.starts_with("application/fhir+ndjson") && !*warned_content_type {
            *warned_content_type = true;
            tracing::warn!(file = %self.url, content_type = %content_type, "file Content-Type is not application/fhir+ndjson; reading it as NDJSON");
        }
        let gzip = match response.header_str("content-encoding").map(str::trim) {
            None | Some("") | Some("identity") => false,
            Some(encoding) if encoding.eq_ignore_ascii_case("gzip") || encoding.eq_ignore_ascii_case("x-gzip") => true,
            Some(other) => {
                return Err(Error::Protocol {
                    url: self.url.clone(),
                    reason: format!("Content-Encoding `{other}` was not offered (only gzip and identity are)"),
                });
            }
        };
        if restart {
            tracing::info!(file = %self.url, "server sent the whole file (validator changed or Range ignored); restarting from zero");
        }
        // A resumed file keeps the validator of the response that started it.
        let validator = if restart || position.offset == 0 {
            Validator::from_response(&response)
        } else {
            position.validator.clone()
        };
        self.ask(|reply| Command::Begin {
            restart: restart || position.offset == 0,
            gzip,
            validator,
            reply,
        })
        .await??;
        let mut body = response.body;
        let mut cut = None;
        loop {
            let next = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Error::Cancelled),
                next = body.next() => next,
            };
            match next {
                Some(Ok(chunk)) => {
                    if self.commands.send(Command::Data(chunk)).await.is_err() {
                        return Err(Error::Unavailable {
                            component: "file writer",
                        });
                    }
                }
                Some(Err(error)) => {
                    cut = Some(error);
                    break;
                }
                None => break,
            }
        }
        let complete = cut.is_none();
        let reached = self.ask(|reply| Command::EndOfBody { complete, reply }).await??;
        Ok(Attempt::Body(
            match cut {
                None => BodyEnd::Complete(reached),
                Some(error) => BodyEnd::Cut(reached, error),
            },
            restart,
        ))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| Error::Unavailable {
            component: "file writer",
        })?;
        answer.await.map_err(|_| Error::Unavailable {
            component: "file writer",
        })
    }
}

enum Attempt {
    /// A body was read (to its end or until it broke); `bool`: the file restarted from zero.
    Body(BodyEnd, bool),
    RestartWithoutRange(String),
}

enum Command {
    /// A response body starts. `restart`: truncate to zero first.
    Begin {
        restart: bool,
        gzip: bool,
        validator: Option<Validator>,
        reply: oneshot::Sender<Result<()>>,
    },
    Data(Bytes),
    /// The body ended; `complete` is false when it broke off.
    EndOfBody {
        complete: bool,
        reply: oneshot::Sender<Result<Checkpoint>>,
    },
    Finish {
        reply: oneshot::Sender<Result<Stats>>,
    },
}

struct Stats {
    bytes: u64,
    resources: u64,
    sha256: String,
    issues: Vec<String>,
}

/// Bytes a gzip decoder has produced but the checker has not taken yet.
type Decoded = Vec<u8>;

/// SHA-256 on its own thread, so hashing overlaps with checking and writing (either alone
/// is a large share of the per-byte cost; see docs/benchmarks.md).
struct HashPipe {
    sender: Option<std::sync::mpsc::SyncSender<HashMessage>>,
    thread: Option<std::thread::JoinHandle<Sha256>>,
    /// Hashing on the writer's own thread instead ([`Offload::Inline`]).
    here: Option<Sha256>,
}

enum HashMessage {
    Data(Bytes),
    Reset,
}

impl HashPipe {
    fn start(mut hasher: Sha256) -> HashPipe {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<HashMessage>(64);
        let thread = std::thread::Builder::new()
            .name("fhirhaul-sha256".into())
            .spawn(move || {
                for message in receiver {
                    match message {
                        HashMessage::Data(bytes) => hasher.update(&bytes),
                        HashMessage::Reset => hasher = Sha256::new(),
                    }
                }
                hasher
            })
            .ok();
        HashPipe {
            sender: Some(sender),
            thread,
            here: None,
        }
    }

    fn here(hasher: Sha256) -> HashPipe {
        HashPipe {
            sender: None,
            thread: None,
            here: Some(hasher),
        }
    }

    fn send(&mut self, message: HashMessage) -> std::io::Result<()> {
        if let Some(hasher) = &mut self.here {
            match message {
                HashMessage::Data(bytes) => hasher.update(&bytes),
                HashMessage::Reset => *hasher = Sha256::new(),
            }
            return Ok(());
        }
        match &self.sender {
            Some(sender) => sender
                .send(message)
                .map_err(|_| std::io::Error::other("the hashing thread stopped")),
            None => Err(std::io::Error::other("the hashing thread stopped")),
        }
    }

    fn update(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(hasher) = &mut self.here {
            hasher.update(bytes);
            return Ok(());
        }
        self.send(HashMessage::Data(Bytes::copy_from_slice(bytes)))
    }

    fn finish(mut self) -> std::io::Result<String> {
        if let Some(hasher) = self.here.take() {
            return Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect());
        }
        drop(self.sender.take());
        let hasher = self
            .thread
            .take()
            .and_then(|thread| thread.join().ok())
            .ok_or_else(|| std::io::Error::other("the hashing thread could not start or panicked"))?;
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// The blocking side: owns the `.part` file, the hasher and the line checker.
struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: HashPipe,
    written: u64,
    checker: LineChecker,
    gzip: Option<flate2::write::GzDecoder<Decoded>>,
    validator: Option<Validator>,
    checkpoint_every: u64,
    last_checkpoint: u64,
    checkpoints: Option<watch::Sender<Checkpoint>>,
    url: SafeUrl,
}

impl Writer {
    /// Runs on the writer's own thread, or inline on the download's task with
    /// [`Offload::Inline`]: the offload seam is the choice between the two.
    #[allow(clippy::disallowed_methods)]
    fn open(
        path: PathBuf,
        resume: &Checkpoint,
        mut checker: LineChecker,
        checkpoint_every: u64,
        checkpoints: Option<watch::Sender<Checkpoint>>,
        url: SafeUrl,
        offload: Offload,
    ) -> Result<Writer> {
        let mut hasher = Sha256::new();
        let file = if resume.offset > 0 {
            // Continue a partial file: cut it back to the checkpoint and re-hash what stays.
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io("opening partial file", &path, e))?;
            let length = file.metadata().map_err(|e| Error::io("reading", &path, e))?.len();
            if length < resume.offset {
                return Err(Error::io(
                    "resuming",
                    &path,
                    std::io::Error::other(format!(
                        "partial file has {length} bytes but the checkpoint says {}",
                        resume.offset
                    )),
                ));
            }
            file.set_len(resume.offset)
                .map_err(|e| Error::io("truncating", &path, e))?;
            let mut buffer = vec![0u8; 1 << 16];
            let mut reader = (&file).take(resume.offset);
            loop {
                let n = reader.read(&mut buffer).map_err(|e| Error::io("reading", &path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
            }
            file.seek(std::io::SeekFrom::End(0))
                .map_err(|e| Error::io("seeking", &path, e))?;
            checker.resume_from(resume.lines, resume.resources);
            file
        } else {
            File::create(&path).map_err(|e| Error::io("creating", &path, e))?
        };
        Ok(Writer {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: if offload.is_inline() {
                HashPipe::here(hasher)
            } else {
                HashPipe::start(hasher)
            },
            written: resume.offset,
            checker,
            gzip: None,
            validator: resume.validator.clone(),
            checkpoint_every,
            last_checkpoint: resume.offset,
            checkpoints,
            url,
        })
    }

    /// The writer thread's loop.
    fn run(mut self, mut commands: mpsc::Receiver<Command>) -> Result<()> {
        while let Some(command) = commands.blocking_recv() {
            if let Some(reply) = self.handle(command)? {
                let _ = reply.send(self.finish());
                return Ok(());
            }
        }
        Ok(())
    }

    /// The same loop as a task on the caller's runtime ([`Offload::Inline`]).
    async fn run_here(mut self, mut commands: mpsc::Receiver<Command>) -> Result<()> {
        while let Some(command) = commands.recv().await {
            if let Some(reply) = self.handle(command)? {
                let _ = reply.send(self.finish());
                return Ok(());
            }
        }
        Ok(())
    }

    /// One command; the reply to send the finished file's stats to, once it is asked for.
    fn handle(&mut self, command: Command) -> Result<Option<oneshot::Sender<Result<Stats>>>> {
        match command {
            Command::Begin {
                restart,
                gzip,
                validator,
                reply,
            } => {
                let _ = reply.send(self.begin(restart, gzip, validator));
            }
            Command::Data(chunk) => self.data(&chunk)?,
            Command::EndOfBody { complete, reply } => {
                let _ = reply.send(self.end_of_body(complete));
            }
            Command::Finish { reply } => return Ok(Some(reply)),
        }
        Ok(None)
    }

    fn io_error(&self, action: &'static str, error: std::io::Error) -> Error {
        Error::io(action, &self.path, error)
    }

    fn begin(&mut self, restart: bool, gzip: bool, validator: Option<Validator>) -> Result<()> {
        if restart && self.written > 0 {
            self.out.flush().map_err(|e| self.io_error("writing", e))?;
            let file = self.out.get_mut();
            file.set_len(0).map_err(|e| Error::io("truncating", &self.path, e))?;
            file.seek(std::io::SeekFrom::Start(0))
                .map_err(|e| Error::io("seeking", &self.path, e))?;
            self.hasher
                .send(HashMessage::Reset)
                .map_err(|e| self.io_error("hashing", e))?;
            self.written = 0;
            self.last_checkpoint = 0;
            self.checker.resume_from(0, 0);
        }
        self.checker.discard_partial();
        self.validator = validator;
        self.gzip = gzip.then(|| flate2::write::GzDecoder::new(Vec::new()));
        Ok(())
    }

    fn content_error(&self, error: FeedError) -> Error {
        match error {
            FeedError::Line(line) => Error::Content {
                url: self.url.clone(),
                line: line.line,
                reason: line.reason,
            },
            FeedError::Sink(e) => self.io_error("writing", e),
        }
    }

    /// Runs the line checker with a sink that hashes, counts and writes what it passes on.
    fn check_and_write(
        &mut self,
        step: impl FnOnce(&mut LineChecker, &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> Result<(), FeedError>,
    ) -> Result<()> {
        let Writer {
            out,
            hasher,
            written,
            checker,
            ..
        } = self;
        let mut sink = |bytes: &[u8]| {
            hasher.update(bytes)?;
            *written += bytes.len() as u64;
            out.write_all(bytes)
        };
        let result = step(checker, &mut sink);
        result.map_err(|e| self.content_error(e))
    }

    /// Checks decoded bytes and writes the whole lines.
    fn take_decoded(&mut self, decoded: &[u8]) -> Result<()> {
        self.check_and_write(|checker, sink| checker.feed(decoded, sink))
    }

    fn data(&mut self, chunk: &[u8]) -> Result<()> {
        match self.gzip.take() {
            None => self.take_decoded(chunk)?,
            Some(mut decoder) => {
                // flate2 holds decoded bytes back until the next write; flush hands them over
                // now, so a cut loses as little as possible.
                let outcome = decoder.write_all(chunk).and_then(|()| decoder.flush());
                let decoded = std::mem::take(decoder.get_mut());
                self.gzip = Some(decoder);
                if let Err(e) = outcome {
                    return Err(Error::Content {
                        url: self.url.clone(),
                        line: self.checker.lines() + 1,
                        reason: format!("gzip stream is corrupt: {e}"),
                    });
                }
                self.take_decoded(&decoded)?;
            }
        }
        // Mid-file durability points matter only to someone who records them (a worker's
        // checkpoint store); without one, syncing here would only slow the download.
        if self.checkpoints.is_some() && self.written - self.last_checkpoint >= self.checkpoint_every {
            self.sync_checkpoint()?;
        }
        Ok(())
    }

    fn position(&self) -> Checkpoint {
        Checkpoint {
            offset: self.written,
            lines: self.checker.lines(),
            resources: self.checker.resources(),
            validator: self.validator.clone(),
        }
    }

    fn sync_checkpoint(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| self.io_error("writing", e))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| self.io_error("syncing", e))?;
        self.last_checkpoint = self.written;
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.send_replace(self.position());
        }
        Ok(())
    }

    fn end_of_body(&mut self, complete: bool) -> Result<Checkpoint> {
        if complete {
            if let Some(decoder) = self.gzip.take() {
                let decoded = decoder.finish().map_err(|e| Error::Content {
                    url: self.url.clone(),
                    line: self.checker.lines() + 1,
                    reason: format!("gzip stream ended early or is corrupt: {e}"),
                })?;
                self.take_decoded(&decoded)?;
            }
            self.check_and_write(|checker, sink| checker.finish(sink))?;
        } else {
            self.gzip = None;
            self.checker.discard_partial();
        }
        self.sync_checkpoint()?;
        Ok(self.position())
    }

    fn finish(mut self) -> Result<Stats> {
        self.sync_checkpoint()?;
        let sha256 = self.hasher.finish().map_err(|e| Error::io("hashing", &self.path, e))?;
        Ok(Stats {
            bytes: self.written,
            resources: self.checker.resources(),
            sha256,
            issues: self.checker.outcome_issues().to_vec(),
        })
    }
}
