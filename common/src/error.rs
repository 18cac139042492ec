//! The client core's one error type. Every variant says what was wrong and where (URL with
//! its query redacted, file path, manifest field, line number) and keeps the EHR's own words;
//! none carries a token. Whether to retry is a property of the error, not of the call site.

use std::path::PathBuf;
use std::time::Duration;

use crate::fhir::EhrMessage;
use crate::url_util::SafeUrl;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure this is, for counting in status displays. Stored and shown by its
/// lowercase name ([`Category::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Connection refused or reset, timeouts, a body cut mid-stream.
    Network,
    /// The EHR said "slow down" (429/503).
    Throttled,
    /// The EHR answered 5xx or a transient OperationOutcome.
    Server,
    /// The EHR refused us: 4xx with an OperationOutcome.
    Rejected,
    /// Discovery, keys or the token endpoint failed.
    Auth,
    /// The EHR broke the Bulk Data protocol (missing header, bad manifest).
    Protocol,
    /// A downloaded file's content was not valid NDJSON of the promised type.
    Content,
    /// The export ran out of time or stopped making progress.
    Timeout,
    /// Local disk.
    Storage,
    /// The request or configuration the user gave is wrong.
    Config,
    /// Cancelled by the user, or an internal component has stopped.
    Cancelled,
    /// A file ended whole by its framing, but with another number of resources than the
    /// manifest's `count`.
    Incomplete,
    /// A file's link expired and asking the status URL again gave no working one.
    Expired,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The connection failed after the request may have been sent: the server may have
    /// acted on it.
    #[error("network error talking to {url}: {message}")]
    Network { url: SafeUrl, message: String },

    /// The request provably never left: no connection (refused, DNS, connect timeout) or
    /// no TLS session. Safe to send again, even when sending twice would do harm.
    #[error("could not reach {url}: {message}")]
    Unsent { url: SafeUrl, message: String },

    #[error("{url} answered HTTP {status} (slow down){}", retry_hint(.retry_after))]
    Throttled {
        url: SafeUrl,
        status: u16,
        retry_after: Option<Duration>,
    },

    #[error("{url} answered HTTP {status}: {message}")]
    Http {
        url: SafeUrl,
        status: u16,
        message: EhrMessage,
    },

    #[error(
        "token endpoint {url} refused the request: {error}{}{}",
        .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default(),
        .uri.as_deref().map(|u| format!(", see {u}")).unwrap_or_default()
    )]
    OAuth {
        url: SafeUrl,
        status: u16,
        error: String,
        description: Option<String>,
        uri: Option<String>,
    },

    #[error("SMART discovery at {url} failed: {reason}")]
    Discovery { url: SafeUrl, reason: String },

    #[error("signing key problem: {reason}")]
    Key { reason: String },

    #[error("invalid configuration `{key}`: {reason}")]
    Config { key: String, reason: String },

    #[error("invalid export request: {reason}")]
    InvalidRequest { reason: String },

    #[error("{url} broke the Bulk Data protocol: {reason}")]
    Protocol { url: SafeUrl, reason: String },

    #[error("manifest from {url} is invalid: field `{field}` {reason}")]
    Manifest {
        url: SafeUrl,
        field: String,
        reason: String,
    },

    #[error("file {url} line {line}: {reason}")]
    Content { url: SafeUrl, line: u64, reason: String },

    #[error(
        "refusing to send the access token to {url}: its origin is neither the FHIR server's nor in the allow-list"
    )]
    ForeignOrigin { url: SafeUrl },

    #[error("export at {url} passed its deadline of {limit:?}")]
    Deadline { url: SafeUrl, limit: Duration },

    #[error("export at {url} made no progress for {limit:?} (last X-Progress: {last_progress:?})")]
    Stalled {
        url: SafeUrl,
        limit: Duration,
        last_progress: Option<String>,
    },

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },

    #[error(
        "the kick-off to {url} was sent and then the connection broke ({message}): the EHR may have accepted it, \
         so it was not sent again (an orphan export may exist there; set export.kickoff_retry_ambiguous to retry anyway)"
    )]
    AmbiguousKickoff { url: SafeUrl, message: String },

    #[error(
        "file {url} has {actual} resources but the manifest's count is {expected} (downloaded twice, the same both times)"
    )]
    CountMismatch { url: SafeUrl, expected: u64, actual: u64 },

    /// A file's link stopped working at or after the manifest's `Expires`, and a fresh
    /// manifest from the status URL did not give a working one.
    #[error("file {url}: its link expired at {} ({reason})", http_date(.expired_at_ms))]
    LinkExpired {
        url: SafeUrl,
        /// The manifest's `Expires` (unix ms), when it gave one.
        expired_at_ms: Option<u64>,
        reason: String,
    },

    #[error("cancelled")]
    Cancelled,

    #[error("{component} has stopped")]
    Unavailable { component: &'static str },

    /// A failure another fhirhaul component reported over the wire (the coordinator
    /// answering a worker's token request, say), with the category and retryability it had
    /// where it happened.
    #[error("{from}: {message}")]
    Relayed {
        from: &'static str,
        category: Category,
        retryable: bool,
        message: String,
    },
}

impl Category {
    pub const ALL: [Category; 13] = [
        Category::Network,
        Category::Throttled,
        Category::Server,
        Category::Rejected,
        Category::Auth,
        Category::Protocol,
        Category::Content,
        Category::Timeout,
        Category::Storage,
        Category::Config,
        Category::Cancelled,
        Category::Incomplete,
        Category::Expired,
    ];

    /// The lowercase name used in status displays, summaries and replicated state.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Network => "network",
            Category::Throttled => "throttled",
            Category::Server => "server",
            Category::Rejected => "rejected",
            Category::Auth => "auth",
            Category::Protocol => "protocol",
            Category::Content => "content",
            Category::Timeout => "timeout",
            Category::Storage => "storage",
            Category::Config => "config",
            Category::Cancelled => "cancelled",
            Category::Incomplete => "incomplete",
            Category::Expired => "expired",
        }
    }

    /// Whether a failure of this category may succeed if tried again, when nothing more
    /// specific is known (a worker that reported only a category).
    pub fn usually_retryable(self) -> bool {
        matches!(
            self,
            Category::Network | Category::Throttled | Category::Server | Category::Storage
        )
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Category {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .ok_or_else(|| format!("`{text}` is not a failure category"))
    }
}

fn http_date(unix_ms: &Option<u64>) -> String {
    match unix_ms {
        Some(ms) => httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(*ms)),
        None => "an unstated time".into(),
    }
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(", retry after {}s", d.as_secs()),
        None => String::new(),
    }
}

impl Error {
    pub fn category(&self) -> Category {
        match self {
            Error::Network { .. } | Error::Unsent { .. } | Error::AmbiguousKickoff { .. } => Category::Network,
            Error::Throttled { .. } => Category::Throttled,
            Error::Http { status, message, .. } => {
                if *status >= 500 || message.transient {
                    Category::Server
                } else {
                    Category::Rejected
                }
            }
            Error::OAuth { .. } | Error::Discovery { .. } | Error::Key { .. } => Category::Auth,
            Error::Protocol { .. } | Error::Manifest { .. } | Error::ForeignOrigin { .. } => Category::Protocol,
            Error::Content { .. } => Category::Content,
            Error::CountMismatch { .. } => Category::Incomplete,
            Error::LinkExpired { .. } => Category::Expired,
            Error::Deadline { .. } | Error::Stalled { .. } => Category::Timeout,
            Error::Io { .. } => Category::Storage,
            Error::Config { .. } | Error::InvalidRequest { .. } => Category::Config,
            Error::Cancelled | Error::Unavailable { .. } => Category::Cancelled,
            Error::Relayed { category, .. } => *category,
        }
    }

    /// Whether the same request may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Network { .. } | Error::Unsent { .. } | Error::Throttled { .. } => true,
            Error::Http { status, message, .. } => *status >= 500 || message.transient,
            // A token endpoint that is down (5xx) can come back; a refusal cannot.
            Error::OAuth { status, .. } => *status >= 500,
            Error::Relayed { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The delay the server asked for, if it asked.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source: std::sync::Arc::new(source),
        }
    }
}
