//! The fhirhaul client core: everything needed to run one FHIR Bulk Data export against one
//! EHR, and nothing about the cluster.
//!
//! - [`auth`]: SMART Backend Services discovery, client-assertion JWTs, token requests, and
//!   the [`auth::TokenManager`] actor.
//! - [`keys`]: loading and generating RS384/ES384 keys, JWK Sets.
//! - [`http`]: the one HTTP seam ([`http::HttpTransport`]): reqwest in production,
//!   [`http::HyperTransport`] over any [`http::Dialer`] for simulated networks.
//! - [`config`]: one tenant's configuration ([`config::TenantConfig`]) and connecting it.
//! - [`client`]: [`client::FhirClient`], which decides where a token may go, retries once on
//!   401 and follows redirects without leaking the token.
//! - [`kickoff`], [`status`], [`manifest`]: starting an export, polling it, reading manifests.
//! - [`ndjson`] and [`download`]: streaming, validating, resumable file download.
//! - [`export`]: a whole export in one process (kick-off → poll → download every file).
//! - [`output`]: one naming rule and one `summary.json` for every way of exporting.
//! - [`offload`]: the one seam for blocking work (threads, or inline in a simulation).
//! - [`clock`], [`retry`], [`secret`], [`fhir`], [`url_util`], [`error`],
//!   [`serde_duration`]: the small pieces.

pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod download;
pub mod error;
pub mod export;
pub mod fhir;
pub mod http;
pub mod keys;
pub mod kickoff;
pub mod manifest;
pub mod ndjson;
pub mod offload;
pub mod output;
pub mod private_fs;
pub mod retry;
pub mod secret;
pub mod status;
pub mod url_util;

pub use error::{Category, Error, Result};

/// Durations in configuration files, as humans write them: `"15s"`, `"5m"`, `"2h"`,
/// `"250ms"`, or a bare number of seconds.
pub mod serde_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number.parse().ok()?;
        let seconds = match unit.trim() {
            "" | "s" => number,
            "ms" => number / 1000.0,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86400.0,
            _ => return None,
        };
        (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
    }

    pub fn format(duration: &Duration) -> String {
        let millis = duration.as_millis();
        if !millis.is_multiple_of(1000) {
            format!("{millis}ms")
        } else {
            format!("{}s", duration.as_secs())
        }
    }

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
            Raw::Text(text) => parse(&text).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration (use e.g. \"15s\", \"5m\", \"2h\", \"250ms\")"
                ))
            }),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn human_durations_parse() {
            assert_eq!(parse("15s"), Some(Duration::from_secs(15)));
            assert_eq!(parse("5m"), Some(Duration::from_secs(300)));
            assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
            assert_eq!(parse("2"), Some(Duration::from_secs(2)));
            assert_eq!(parse("2 weeks"), None);
            assert_eq!(format(&Duration::from_millis(1500)), "1500ms");
        }
    }
}
