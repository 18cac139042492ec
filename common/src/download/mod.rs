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

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use http::Method;
use http::header::{ACCEPT, ACCEPT_ENCODING, IF_RANGE, RANGE};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::client::{Auth, FhirClient};
use crate::error::{Error, Result};
use crate::http::{HttpRequest, HttpResponse};
use crate::manifest::ManifestFile;
use crate::ndjson::{Expect, LineChecker};
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
    /// Accept a file whose number of resources differs from the manifest's `count` (with
    /// a warning in its issues) instead of downloading it once more and then failing it.
    #[serde(default)]
    pub accept_count_mismatch: bool,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        DownloadSettings {
            max_attempts: 8,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_line_bytes: 64 * 1024 * 1024,
            checkpoint_every_bytes: 32 * 1024 * 1024,
            accept_count_mismatch: false,
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

mod writer;

use self::writer::{Command, Writer};
