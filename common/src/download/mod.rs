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
//!
//! A body is whole when its framing says so: Content-Length, the chunked terminator, or the
//! gzip trailer. An identity body without framing (HTTP/1 close-delimited) looks whole even
//! when it was cut, so its end is confirmed: by the manifest's `count` when the body ended
//! on a line boundary with exactly that many resources, else by a `Range` request from the
//! byte after it (416: the end; 206: the rest of the file, continuing the last line).

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
    /// A 429/503 with a `Retry-After` is the EHR working as designed and never counts as a
    /// failed attempt; this bounds the total time one download waits on such answers.
    #[serde(with = "crate::serde_duration")]
    pub throttled_at_most: Duration,
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
            throttled_at_most: Duration::from_secs(24 * 3600),
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
    /// Counts the EHR's 429/503 answers (a cluster's coordinator paces the tenant by them).
    pub throttled: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
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
    /// For `error` files: OperationOutcomes reporting an error or fatal issue.
    #[serde(default)]
    pub ehr_errors: u64,
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
        let created = options
            .offload
            .run(move || crate::private_fs::create_dir_all(&directory))
            .await;
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
        throttled: options.throttled.clone(),
        cancel: options.cancel.clone(),
    };
    let result = driver.drive(resume).await;
    let Driven {
        position,
        resumes,
        restarts,
        notes,
    } = match result {
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
        issues: stats.issues.into_iter().chain(notes).collect(),
        ehr_errors: stats.ehr_errors,
    })
}

struct Driver<'a> {
    client: &'a FhirClient,
    file: &'a ManifestFile,
    auth: Auth,
    settings: &'a DownloadSettings,
    url: SafeUrl,
    commands: mpsc::Sender<Command>,
    throttled: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    cancel: CancellationToken,
}

/// How a body ended.
enum BodyEnd {
    Complete(Checkpoint),
    Cut(Checkpoint, Error),
    /// The connection closed with no framing to say the body was whole: `received` bytes
    /// are in (the checkpoint and a last line that may be partial). A Range request from
    /// there confirms the end or continues the file.
    Unconfirmed(Checkpoint, u64),
}

/// Where a request starts and why.
#[derive(Clone, Copy)]
struct Start {
    /// Byte of the file the request asks from.
    at: u64,
    /// Confirming the end of an unframed body (else resuming from a checkpoint, or whole).
    confirming: bool,
}

/// What `drive` brings back: the final position and the history that led there.
struct Driven {
    position: Checkpoint,
    resumes: u32,
    restarts: u32,
    notes: Vec<String>,
}

impl Driver<'_> {
    /// Runs requests until one body arrives whole.
    async fn drive(&self, resume: Checkpoint) -> Result<Driven> {
        let mut position = resume;
        let mut backoff = Backoff::new(
            self.settings.backoff_min,
            self.settings.backoff_max,
            self.client.entropy().clone(),
        );
        let mut failures = 0u32;
        let mut throttled_for = Duration::ZERO;
        let mut resumes = 0u32;
        let mut restarts = 0u32;
        let mut notes = Vec::new();
        let mut warned_content_type = false;
        // Set after an unframed body: the byte its end must be confirmed at.
        let mut confirm_at: Option<u64> = None;
        loop {
            if self.cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let start = Start {
                at: confirm_at.unwrap_or(position.offset),
                confirming: confirm_at.is_some(),
            };
            let if_range = position
                .validator
                .as_ref()
                .and_then(Validator::if_range)
                .filter(|_| start.at > 0);
            let ranged = start.confirming || if_range.is_some();
            let mut request =
                HttpRequest::new(Method::GET, self.file.url.clone()).header(ACCEPT, "application/fhir+ndjson");
            if ranged {
                request = request
                    .header(ACCEPT_ENCODING, "identity")
                    .header(RANGE, &format!("bytes={}-", start.at));
                if let Some(if_range) = if_range {
                    request = request.header(IF_RANGE, if_range);
                }
            } else {
                request = request.header(ACCEPT_ENCODING, "gzip");
            }
            let outcome = self.attempt(request, &position, start, &mut warned_content_type).await;
            let error = match outcome {
                Ok(Attempt::Body(end, restarted)) => {
                    restarts += u32::from(restarted);
                    resumes += u32::from(ranged && !restarted);
                    match end {
                        BodyEnd::Complete(done) => {
                            return Ok(Driven {
                                position: done,
                                resumes,
                                restarts,
                                notes,
                            });
                        }
                        BodyEnd::Unconfirmed(reached, received) => {
                            let stuck = !restarted && start.confirming && received == start.at;
                            position = reached;
                            if !stuck {
                                failures = 0;
                                backoff.reset();
                                // Ended on a line boundary with exactly the manifest's count:
                                // the count confirms the end.
                                if received == position.offset && self.file.count == Some(position.resources) {
                                    let done = self.end_body(writer::End::Complete).await?;
                                    return Ok(Driven {
                                        position: done.checkpoint,
                                        resumes,
                                        restarts,
                                        notes,
                                    });
                                }
                                confirm_at = Some(received);
                                tracing::debug!(file = %self.url, received, "body ended without framing; confirming its end with a Range request");
                                continue;
                            }
                            confirm_at = Some(received);
                            Error::Protocol {
                                url: self.url.clone(),
                                reason: format!(
                                    "answered a request for the bytes after {received} with an empty body and no length"
                                ),
                            }
                        }
                        BodyEnd::Cut(reached, error) => {
                            let progressed = reached.offset > position.offset || restarted;
                            position = reached;
                            confirm_at = None;
                            if progressed {
                                failures = 0;
                                backoff.reset();
                            }
                            error
                        }
                    }
                }
                Ok(Attempt::Confirmed(done, note)) => {
                    notes.extend(note);
                    return Ok(Driven {
                        position: done,
                        resumes,
                        restarts,
                        notes,
                    });
                }
                Ok(Attempt::RestartWithoutRange(reason)) => {
                    tracing::info!(file = %self.url, %reason, "restarting the file from zero");
                    position = Checkpoint::default();
                    confirm_at = None;
                    restarts += 1;
                    continue;
                }
                Err(error) if error.is_retryable() => error,
                Err(error) => return Err(error),
            };
            if matches!(error, Error::Throttled { .. })
                && let Some(counter) = &self.throttled
            {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let delay = backoff.next_delay(error.retry_after());
            // Throttled with a hint: wait as told, without counting an attempt (up to a
            // total); anything else counts toward giving up.
            let throttled = matches!(
                error,
                Error::Throttled {
                    retry_after: Some(_),
                    ..
                }
            );
            if throttled && throttled_for + delay <= self.settings.throttled_at_most {
                throttled_for += delay;
            } else {
                failures += 1;
                if failures >= self.settings.max_attempts {
                    return Err(error);
                }
            }
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
        start: Start,
        warned_content_type: &mut bool,
    ) -> Result<Attempt> {
        let response = self.client.send(request, self.auth).await?;
        let status = response.status.as_u16();
        let restart = match status {
            200 if start.confirming => {
                // The server sent the whole file again: either it changed (restart), or the
                // server ignores Range and the end cannot be confirmed that way.
                let changed = position.validator.as_ref().and_then(|v| v.changed_in(&response));
                if changed.is_none() {
                    let length = response
                        .header_str("content-length")
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    let note = (length != Some(start.at)).then(|| {
                        format!(
                            "the server sent the file without a length and ignores Range requests, so its end \
                             at byte {} could not be confirmed",
                            start.at
                        )
                    });
                    if let Some(note) = &note {
                        tracing::warn!(file = %self.url, "{note}");
                    }
                    drop(response);
                    let done = self.end_body(writer::End::Complete).await?;
                    return Ok(Attempt::Confirmed(done.checkpoint, note));
                }
                true
            }
            200 => position.offset > 0,
            206 => {
                let range_start = response
                    .header_str("content-range")
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if range_start != Some(start.at) {
                    return Ok(Attempt::RestartWithoutRange(format!(
                        "asked for bytes from {} but got Content-Range {:?}",
                        start.at,
                        response.header_str("content-range")
                    )));
                }
                if let Some(change) = position.validator.as_ref().and_then(|v| v.changed_in(&response)) {
                    return Ok(Attempt::RestartWithoutRange(change));
                }
                false
            }
            416 if start.confirming => {
                // Nothing after the bytes we have: the end is confirmed, unless the server
                // states a length that disagrees.
                let total = response
                    .header_str("content-range")
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if total.is_some_and(|total| total != start.at) {
                    return Ok(Attempt::RestartWithoutRange(format!(
                        "the file ended after {} bytes but the server says it has {:?}",
                        start.at,
                        response.header_str("content-range")
                    )));
                }
                let done = self.end_body(writer::End::Complete).await?;
                return Ok(Attempt::Confirmed(done.checkpoint, None));
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
        let from_zero = restart || start.at == 0;
        // A resumed file keeps the validator of the response that started it.
        let validator = if from_zero {
            Validator::from_response(&response)
        } else {
            position.validator.clone()
        };
        let unframed = response.close_delimited();
        self.ask(|reply| Command::Begin {
            restart: from_zero,
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
        let end = match (&cut, unframed) {
            (Some(_), _) => writer::End::Broken,
            (None, true) => writer::End::Unframed,
            (None, false) => writer::End::Complete,
        };
        let ended = self.end_body(end).await?;
        let body_end = match (cut, ended.cut) {
            (Some(error), _) => BodyEnd::Cut(ended.checkpoint, error),
            (None, Some(reason)) => BodyEnd::Cut(
                ended.checkpoint,
                Error::Network {
                    url: self.url.clone(),
                    message: reason,
                },
            ),
            (None, None) if ended.finished => BodyEnd::Complete(ended.checkpoint),
            (None, None) => BodyEnd::Unconfirmed(ended.checkpoint, ended.received),
        };
        Ok(Attempt::Body(body_end, restart))
    }

    async fn end_body(&self, end: writer::End) -> Result<writer::Ended> {
        self.ask(|reply| Command::EndOfBody { end, reply }).await?
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
    /// The end of an unframed body is confirmed (or, with a note, could not be): the file
    /// is whole.
    Confirmed(Checkpoint, Option<String>),
}

mod writer;

use self::writer::{Command, Writer};
