//! Configuration of one EHR connection (a tenant), as written in a `[[tenant]]` table of
//! `fhirhaul.toml`, and turning it into a connected [`FhirClient`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::auth::{AuthSettings, Authenticator, MAX_ASSERTION_LIFETIME, TokenManager, TokenTimings};
use crate::client::FhirClient;
use crate::clock::{Clock, Entropy};
use crate::error::{Error, Result};
use crate::export::ExportSettings;
use crate::http::HttpTransport;
use crate::keys::{SigningAlgorithm, SigningKey};
use crate::kickoff::{ExportRequest, ServerProfile};

/// One EHR and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// The FHIR base URL (`https://ehr.example/api/FHIR/R4`).
    pub base_url: Url,
    pub client_id: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// RS384 or ES384; taken from the key when absent.
    #[serde(default)]
    pub algorithm: Option<SigningAlgorithm>,
    /// The key id registered with the EHR; the RFC 7638 thumbprint when absent.
    #[serde(default)]
    pub kid: Option<String>,
    /// Sent verbatim (e.g. Epic's `system/Patient.read system/Observation.read`).
    #[serde(default)]
    pub scope: Option<String>,
    /// Overrides the discovered token endpoint.
    #[serde(default)]
    pub token_url: Option<String>,
    /// JWKS URL to put in the JWT header as `jku` (must be the registered one).
    #[serde(default)]
    pub jku: Option<String>,
    /// Origins besides the FHIR server's that may receive the access token.
    #[serde(default)]
    pub token_allow_list: Vec<Url>,
    #[serde(default = "default_assertion_lifetime", with = "crate::serde_duration")]
    pub assertion_lifetime: Duration,
    #[serde(default = "default_refresh_margin", with = "crate::serde_duration")]
    pub refresh_margin: Duration,
    /// After the EHR refuses the client (`invalid_client`, a revoked key), how long every
    /// caller gets that refusal back before another assertion is signed and sent.
    #[serde(default = "default_auth_refusal_hold", with = "crate::serde_duration")]
    pub auth_refusal_hold: Duration,
    #[serde(default)]
    pub profile: ServerProfile,
    #[serde(default)]
    pub export: ExportSettings,
    /// The export `fhirhaul run` performs for this tenant.
    #[serde(default)]
    pub request: ExportRequest,
}

fn default_assertion_lifetime() -> Duration {
    Duration::from_secs(240)
}

fn default_refresh_margin() -> Duration {
    Duration::from_secs(300)
}

fn default_auth_refusal_hold() -> Duration {
    Duration::from_secs(60)
}

fn config_error(key: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl TenantConfig {
    /// A tenant with every optional setting at its default (what a `[[tenant]]` table with
    /// only these four keys gives).
    pub fn new(name: impl Into<String>, base_url: Url, client_id: impl Into<String>, private_key: PathBuf) -> Self {
        TenantConfig {
            name: name.into(),
            base_url,
            client_id: client_id.into(),
            private_key,
            algorithm: None,
            kid: None,
            scope: None,
            token_url: None,
            jku: None,
            token_allow_list: Vec::new(),
            assertion_lifetime: default_assertion_lifetime(),
            refresh_margin: default_refresh_margin(),
            auth_refusal_hold: default_auth_refusal_hold(),
            profile: ServerProfile::default(),
            export: ExportSettings::default(),
            request: ExportRequest::default(),
        }
    }

    /// Checks what serde cannot: value ranges and relations between keys.
    pub fn validate(&self) -> Result<()> {
        let key = |field: &str| format!("tenant.{}.{field}", self.name);
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(config_error(
                "tenant.name",
                format!("`{}` must be letters, digits, - or _", self.name),
            ));
        }
        if !matches!(self.base_url.scheme(), "https" | "http") {
            return Err(config_error(&key("base_url"), "must be an http(s) URL"));
        }
        if self.client_id.trim().is_empty() {
            return Err(config_error(&key("client_id"), "must not be empty"));
        }
        if self.assertion_lifetime > MAX_ASSERTION_LIFETIME || self.assertion_lifetime < Duration::from_secs(10) {
            return Err(config_error(
                &key("assertion_lifetime"),
                "must be between 10s and 300s (SMART caps it at five minutes)",
            ));
        }
        if let Some(token_url) = &self.token_url
            && Url::parse(token_url).is_err()
        {
            return Err(config_error(
                &key("token_url"),
                format!("`{token_url}` is not an absolute URL"),
            ));
        }
        let poll = &self.export.poll;
        if poll.min_interval.is_zero() || poll.min_interval > poll.max_interval {
            return Err(config_error(
                &key("export.poll.min_interval"),
                "must be above zero and at most max_interval",
            ));
        }
        if self.export.concurrency == 0 {
            return Err(config_error(&key("export.concurrency"), "must be at least 1"));
        }
        if self
            .export
            .max_concurrency
            .is_some_and(|max| max < self.export.concurrency)
        {
            return Err(config_error(
                &key("export.max_concurrency"),
                "must be at least export.concurrency",
            ));
        }
        if self.export.download.max_attempts == 0 {
            return Err(config_error(&key("export.download.max_attempts"), "must be at least 1"));
        }
        self.request
            .validate(&self.profile)
            .map_err(|e| config_error(&key("request"), e.to_string()))
    }

    /// Loads the signing key this tenant names.
    #[allow(clippy::disallowed_methods)] // A key file of a few KB, read at start and once per term.
    pub fn signing_key(&self) -> Result<SigningKey> {
        let pem = std::fs::read_to_string(&self.private_key).map_err(|e| {
            config_error(
                &format!("tenant.{}.private_key", self.name),
                format!("cannot read {}: {e}", self.private_key.display()),
            )
        })?;
        SigningKey::from_pem(&pem, self.algorithm, self.kid.clone()).map_err(|e| {
            config_error(
                &format!("tenant.{}.private_key", self.name),
                format!("{}: {e}", self.private_key.display()),
            )
        })
    }

    /// Connects: loads the key, starts the token manager, returns the client.
    pub fn connect(
        &self,
        transport: Arc<dyn HttpTransport>,
        clock: Arc<dyn Clock>,
        entropy: Entropy,
        cancel: CancellationToken,
    ) -> Result<FhirClient> {
        let key = self.signing_key()?;
        let mut settings = AuthSettings::new(self.base_url.clone(), self.client_id.clone());
        settings.token_url = self.token_url.clone();
        settings.scope = self.scope.clone();
        settings.jku = self.jku.clone();
        settings.assertion_lifetime = self.assertion_lifetime;
        settings.refresh_margin = self.refresh_margin;
        let authenticator = Authenticator::new(
            Arc::clone(&transport),
            settings,
            key,
            Arc::clone(&clock),
            entropy.clone(),
        );
        let tokens = TokenManager::spawn(
            authenticator,
            TokenTimings {
                refresh_margin: self.refresh_margin,
                refusal_hold: self.auth_refusal_hold,
            },
            Arc::clone(&clock),
            cancel,
        );
        Ok(FhirClient::new(
            transport,
            self.base_url.clone(),
            Arc::new(tokens),
            &self.token_allow_list,
            clock,
            entropy,
        ))
    }
}

/// A configuration error naming the key.
pub fn config_error_for(key: &str, reason: impl Into<String>) -> Error {
    config_error(key, reason)
}
