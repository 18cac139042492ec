//! FHIR pieces the client reads and writes: OperationOutcome text, FHIR instants.

use std::fmt;
use std::time::SystemTime;

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What the EHR said about a failure, in its own words: the OperationOutcome issues when the
/// body is one, otherwise a short excerpt of whatever it sent (an HTML proxy page, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EhrMessage {
    pub text: String,
    /// An issue code of the `transient` family was present, so retrying may help.
    pub transient: bool,
}

impl fmt::Display for EhrMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Deserialize)]
struct OperationOutcome {
    #[serde(rename = "resourceType")]
    resource_type: String,
    #[serde(default)]
    issue: Vec<Issue>,
}

#[derive(Deserialize)]
struct Issue {
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    diagnostics: Option<String>,
    #[serde(default)]
    details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    text: Option<String>,
}

/// Issue codes in the FHIR `transient` family.
const TRANSIENT_CODES: &[&str] = &[
    "transient",
    "lock-error",
    "no-store",
    "exception",
    "timeout",
    "incomplete",
    "throttled",
];

const EXCERPT_CHARS: usize = 300;

/// Whether an OperationOutcome reports an error: an issue of severity `error` or `fatal`
/// (warnings and information do not count). `false` for anything that is not one.
pub fn reports_an_error(body: &[u8]) -> bool {
    serde_json::from_slice::<OperationOutcome>(body).is_ok_and(|outcome| {
        outcome.resource_type == "OperationOutcome"
            && outcome
                .issue
                .iter()
                .any(|issue| matches!(issue.severity.as_deref(), Some("error" | "fatal")))
    })
}

impl EhrMessage {
    /// Reads an error body. Never fails: a body that is not an OperationOutcome is shown as
    /// an excerpt with its content type.
    pub fn from_body(content_type: Option<&str>, body: &[u8]) -> Self {
        if let Some(message) = Self::from_operation_outcome(body) {
            return message;
        }
        let text = String::from_utf8_lossy(body);
        let collapsed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut excerpt: String = collapsed.chars().take(EXCERPT_CHARS).collect();
        if collapsed.chars().count() > EXCERPT_CHARS {
            excerpt.push('…');
        }
        let kind = content_type.unwrap_or("no content type");
        let text = if excerpt.is_empty() {
            format!("empty body ({kind})")
        } else {
            format!("non-FHIR body ({kind}): {excerpt}")
        };
        EhrMessage { text, transient: false }
    }

    /// The issues of an OperationOutcome, or `None` when the body is not one.
    pub fn from_operation_outcome(body: &[u8]) -> Option<Self> {
        let outcome: OperationOutcome = serde_json::from_slice(body).ok()?;
        if outcome.resource_type != "OperationOutcome" {
            return None;
        }
        let mut transient = false;
        let mut parts = Vec::new();
        for issue in &outcome.issue {
            let code = issue.code.as_deref().unwrap_or("unknown");
            transient |= TRANSIENT_CODES.contains(&code);
            let words = issue
                .diagnostics
                .as_deref()
                .or(issue.details.as_ref().and_then(|d| d.text.as_deref()))
                .unwrap_or("(no diagnostics)");
            let severity = issue.severity.as_deref().unwrap_or("error");
            parts.push(format!("{severity} {code}: {words}"));
        }
        if parts.is_empty() {
            parts.push("OperationOutcome with no issues".to_string());
        }
        Some(EhrMessage {
            text: parts.join("; "),
            transient,
        })
    }
}

/// Formats a time as a FHIR `instant` (RFC 3339 with a timezone, UTC here).
pub fn format_instant(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Parses a FHIR `instant`: RFC 3339, timezone required.
pub fn parse_instant(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

pub fn system_time_to_offset(at: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_outcome_issues_are_kept_in_the_ehr_words() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"error","code":"not-supported","diagnostics":"_type Foo is not supported"},
            {"severity":"warning","code":"informational","details":{"text":"see docs"}}]}"#;
        let message = EhrMessage::from_body(Some("application/fhir+json"), body);
        assert_eq!(
            message.text,
            "error not-supported: _type Foo is not supported; warning informational: see docs"
        );
        assert!(!message.transient);
    }

    #[test]
    fn transient_issue_codes_are_recognised() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient","diagnostics":"try later"}]}"#;
        assert!(EhrMessage::from_body(None, body).transient);
    }

    #[test]
    fn html_proxy_page_becomes_an_excerpt() {
        let body = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body></html>";
        let message = EhrMessage::from_body(Some("text/html"), body);
        assert_eq!(
            message.text,
            "non-FHIR body (text/html): <html> <head><title>502 Bad Gateway</title></head> <body>nginx</body></html>"
        );
        let long = vec![b'x'; 5000];
        assert!(EhrMessage::from_body(None, &long).text.len() < 400);
        assert_eq!(EhrMessage::from_body(None, b"").text, "empty body (no content type)");
    }

    #[test]
    fn instants_round_trip_with_timezone() {
        let at = parse_instant("2024-03-01T10:20:30.123+02:00").unwrap();
        assert_eq!(format_instant(at), "2024-03-01T08:20:30.123Z");
        assert!(parse_instant("2024-03-01T10:20:30").is_none(), "timezone is required");
        assert!(parse_instant("2024-03-01").is_none());
    }
}
