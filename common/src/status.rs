//! Polling an export's status URL until the manifest is ready, and cancelling it.
//!
//! [`poll_once`] is one exchange, typed; [`Poller`] is the loop around it: `Retry-After`
//! (seconds or HTTP-date) within configured bounds, exponential backoff with jitter
//! otherwise, 429/503 as "slow down", transient failures retried, partial manifests handed
//! out as they arrive, `link` next pages followed, and an overall deadline plus a no-progress
//! watchdog so an export a server forgot (HAPI answers 202 forever for cancelled jobs) ends.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use http::Method;
use http::header::ACCEPT;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::client::{Auth, FhirClient};
use crate::error::{Error, Result};
use crate::http::HttpRequest;
use crate::manifest::{Manifest, ManifestFile};
use crate::retry::Backoff;
use crate::url_util::SafeUrl;

const MANIFEST_LIMIT: usize = 64 * 1024 * 1024;
const MAX_MANIFEST_PAGES: usize = 100_000;

/// Polling bounds. Every timing is configurable so tests and simulations can shrink them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollSettings {
    /// First wait of our own backoff, when the EHR gives no `Retry-After`.
    #[serde(with = "crate::serde_duration")]
    pub min_interval: Duration,
    /// Longest wait of our own backoff.
    #[serde(with = "crate::serde_duration")]
    pub max_interval: Duration,
    /// The EHR's `Retry-After` is honoured as given between these two bounds (a shorter
    /// one is raised, a longer one lowered).
    #[serde(with = "crate::serde_duration")]
    pub min_retry_after: Duration,
    #[serde(with = "crate::serde_duration")]
    pub max_retry_after: Duration,
    /// Give up on an export that has not completed after this long.
    #[serde(with = "crate::serde_duration")]
    pub deadline: Duration,
    /// Give up when neither `X-Progress` nor the partial manifest changed for this long.
    #[serde(with = "crate::serde_duration")]
    pub stall_timeout: Duration,
    /// Give up after this many transient failures in a row. Throttling with a
    /// `Retry-After` (429/503) is the EHR working as designed and never counts: only the
    /// deadline ends a throttled export.
    pub max_consecutive_errors: u32,
}

impl Default for PollSettings {
    fn default() -> Self {
        PollSettings {
            min_interval: Duration::from_secs(2),
            max_interval: Duration::from_secs(300),
            min_retry_after: crate::retry::HINT_BOUNDS.0,
            max_retry_after: crate::retry::HINT_BOUNDS.1,
            deadline: Duration::from_secs(48 * 3600),
            stall_timeout: Duration::from_secs(6 * 3600),
            max_consecutive_errors: 30,
        }
    }
}

/// One status response.
#[derive(Debug, Clone)]
pub enum PollStep {
    /// 202: still running.
    InProgress {
        progress: Option<String>,
        retry_after: Option<Duration>,
        /// STU3 partial manifest, when the server sent one.
        partial: Option<Manifest>,
    },
    /// 200: done.
    Complete {
        manifest: Manifest,
        /// The `Expires` header: file links may stop working after this.
        expires: Option<SystemTime>,
    },
}

/// One GET of the status URL.
pub async fn poll_once(client: &FhirClient, status_url: &Url) -> Result<PollStep> {
    let request = HttpRequest::new(Method::GET, status_url.clone()).header(ACCEPT, "application/json");
    let response = client.send(request, Auth::Bearer).await?;
    match response.status.as_u16() {
        202 => {
            let progress = response.header_str("x-progress").map(str::to_owned);
            let retry_after = client.retry_after(&response);
            let is_json = response.content_type().is_some_and(|t| t.contains("json"));
            let url = response.url.clone();
            let body = response.read_limited(MANIFEST_LIMIT).await?;
            // A 202 body is usually empty or an OperationOutcome; with allowPartialManifests
            // it may be a manifest of the files ready so far.
            let partial = if is_json && body.windows(15).any(|w| w == b"transactionTime") {
                Some(Manifest::parse(&body, &url)?)
            } else {
                None
            };
            Ok(PollStep::InProgress {
                progress,
                retry_after,
                partial,
            })
        }
        200 => {
            let expires = response
                .header_str("expires")
                .and_then(|v| httpdate::parse_http_date(v).ok());
            let url = response.url.clone();
            let body = response.read_limited(MANIFEST_LIMIT).await?;
            Ok(PollStep::Complete {
                manifest: Manifest::parse(&body, &url)?,
                expires,
            })
        }
        status if (200..300).contains(&status) => Err(Error::Protocol {
            url: SafeUrl::from(&response.url),
            reason: format!("status request answered {status}; expected 202 (in progress) or 200 (complete)"),
        }),
        _ => Err(client.error_from(response).await),
    }
}

/// GETs one `link` next page of a manifest.
pub async fn fetch_manifest_page(client: &FhirClient, url: &Url) -> Result<Manifest> {
    let request = HttpRequest::new(Method::GET, url.clone()).header(ACCEPT, "application/json");
    let response = client.send(request, Auth::Bearer).await?;
    if response.status.as_u16() != 200 {
        return Err(client.error_from(response).await);
    }
    let source = response.url.clone();
    let body = response.read_limited(MANIFEST_LIMIT).await?;
    Manifest::parse(&body, &source)
}

/// What the poller tells its caller while it runs.
#[derive(Debug, Clone)]
pub enum PollEvent {
    /// A new `X-Progress` text.
    Progress(String),
    /// Files from a partial manifest that were not handed out before.
    PartialFiles {
        files: Vec<ManifestFile>,
        requires_access_token: bool,
    },
    /// The poller will wait this long before the next request.
    Waiting { delay: Duration, reason: String },
}

/// The merged result of a completed export: every page, files de-duplicated by URL.
#[derive(Debug, Clone)]
pub struct CompletedExport {
    pub transaction_time: String,
    pub request: Option<String>,
    pub requires_access_token: bool,
    pub files: Vec<ManifestFile>,
    pub expires: Option<SystemTime>,
    /// Every manifest page as received.
    pub pages: Vec<serde_json::Value>,
}

/// The polling loop for one export.
pub struct Poller {
    settings: PollSettings,
    backoff: Backoff,
    /// When the export was submitted, and when it last showed progress, by the client's
    /// clock: the deadline and the stall watchdog count from these.
    started: SystemTime,
    last_change: SystemTime,
    last_progress: Option<String>,
    handed_out: HashSet<Url>,
}

impl Poller {
    /// A poller whose deadline and stall watchdog start now.
    pub fn new(settings: PollSettings, client: &FhirClient) -> Self {
        let now = client.clock().now();
        Self::resuming(settings, client, now, now, None)
    }

    /// A poller for an export submitted at `started` that last showed progress
    /// (`last_progress`) at `last_change`: a coordinator taking over an export keeps its
    /// deadline and watchdog instead of starting them again.
    pub fn resuming(
        settings: PollSettings,
        client: &FhirClient,
        started: SystemTime,
        last_change: SystemTime,
        last_progress: Option<String>,
    ) -> Self {
        let backoff = Backoff::new(settings.min_interval, settings.max_interval, client.entropy().clone())
            .with_hint_bounds(settings.min_retry_after, settings.max_retry_after);
        Poller {
            settings,
            backoff,
            started,
            last_change: last_change.max(started),
            last_progress,
            handed_out: HashSet::new(),
        }
    }

    /// Polls until the export completes, fails, passes its deadline, stalls or is cancelled.
    pub async fn run(
        &mut self,
        client: &FhirClient,
        status_url: &Url,
        cancel: &CancellationToken,
        mut on_event: impl FnMut(PollEvent),
    ) -> Result<CompletedExport> {
        let safe_url = SafeUrl::from(status_url);
        let mut consecutive_errors = 0u32;
        let since = |at: SystemTime| client.clock().now().duration_since(at).unwrap_or_default();
        loop {
            if since(self.started) > self.settings.deadline {
                return Err(Error::Deadline {
                    url: safe_url,
                    limit: self.settings.deadline,
                });
            }
            if since(self.last_change) > self.settings.stall_timeout {
                return Err(Error::Stalled {
                    url: safe_url,
                    limit: self.settings.stall_timeout,
                    last_progress: self.last_progress.clone(),
                });
            }
            let (delay, reason) = match poll_once(client, status_url).await {
                Ok(PollStep::Complete { manifest, expires }) => {
                    return self.complete(client, manifest, expires).await;
                }
                Ok(PollStep::InProgress {
                    progress,
                    retry_after,
                    partial,
                }) => {
                    consecutive_errors = 0;
                    if progress.is_some() && progress != self.last_progress {
                        self.last_change = client.clock().now();
                        self.last_progress = progress.clone();
                        if let Some(text) = progress {
                            tracing::info!(progress = %text, "export in progress");
                            on_event(PollEvent::Progress(text));
                        }
                    }
                    if let Some(partial) = partial {
                        let requires_access_token = partial.requires_access_token;
                        let fresh = self.fresh_files(partial.files);
                        if !fresh.is_empty() {
                            self.last_change = client.clock().now();
                            on_event(PollEvent::PartialFiles {
                                files: fresh,
                                requires_access_token,
                            });
                        }
                    }
                    (self.backoff.next_delay(retry_after), "in progress".to_string())
                }
                // Throttled with a hint: the EHR working as designed. It never counts toward
                // giving up; only the deadline ends a throttled export.
                Err(
                    error @ Error::Throttled {
                        retry_after: Some(_), ..
                    },
                ) => {
                    let delay = self.backoff.next_delay(error.retry_after());
                    tracing::info!(%error, wait_s = delay.as_secs_f64(), "status poll throttled; waiting as asked");
                    (delay, error.to_string())
                }
                Err(error) if error.is_retryable() => {
                    consecutive_errors += 1;
                    if consecutive_errors > self.settings.max_consecutive_errors {
                        return Err(error);
                    }
                    let delay = self.backoff.next_delay(error.retry_after());
                    tracing::warn!(%error, consecutive_errors, wait_s = delay.as_secs_f64(), "status poll failed; will retry");
                    (delay, error.to_string())
                }
                Err(error) => return Err(error),
            };
            on_event(PollEvent::Waiting { delay, reason });
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn fresh_files(&mut self, files: Vec<ManifestFile>) -> Vec<ManifestFile> {
        files
            .into_iter()
            .filter(|file| self.handed_out.insert(file.url.clone()))
            .collect()
    }

    async fn complete(
        &mut self,
        client: &FhirClient,
        first: Manifest,
        expires: Option<SystemTime>,
    ) -> Result<CompletedExport> {
        let mut export = CompletedExport {
            transaction_time: first.transaction_time.clone(),
            request: first.request.clone(),
            requires_access_token: first.requires_access_token,
            files: Vec::new(),
            expires,
            pages: vec![first.raw.clone()],
        };
        let mut seen_files = HashSet::new();
        let mut seen_pages = HashSet::new();
        let mut page = first;
        loop {
            for file in page.files.drain(..) {
                if seen_files.insert(file.url.clone()) {
                    export.files.push(file);
                }
            }
            let Some(next) = page.next.take() else { break };
            if !seen_pages.insert(next.clone()) || seen_pages.len() > MAX_MANIFEST_PAGES {
                return Err(Error::Protocol {
                    url: SafeUrl::from(&next),
                    reason: "manifest `link` pages loop back or never end".into(),
                });
            }
            page = fetch_manifest_page(client, &next).await?;
            export.pages.push(page.raw.clone());
        }
        Ok(export)
    }
}

/// DELETEs the status URL: cancels a running export, or tells the server it may purge a
/// finished one. 202 (and 200/204) and 404 (already gone) all count as done.
pub async fn delete_export(client: &FhirClient, status_url: &Url) -> Result<()> {
    let request = HttpRequest::new(Method::DELETE, status_url.clone()).header(ACCEPT, "application/fhir+json");
    let response = client.send(request, Auth::Bearer).await?;
    match response.status.as_u16() {
        200 | 202 | 204 | 404 => Ok(()),
        _ => Err(client.error_from(response).await),
    }
}
