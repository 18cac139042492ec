//! Configuration of one EHR connection (a tenant), as written in `fhirhaul.toml`, and turning
//! it into a connected [`FhirClient`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::auth::{AuthSettings, Authenticator, MAX_ASSERTION_LIFETIME, TokenManager};
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

fn config_error(key: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl TenantConfig {
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
        if self.export.download.max_attempts == 0 {
            return Err(config_error(&key("export.download.max_attempts"), "must be at least 1"));
        }
        self.request
            .validate(&self.profile)
            .map_err(|e| config_error(&key("request"), e.to_string()))
    }

    /// Loads the signing key this tenant names.
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
        let tokens = TokenManager::spawn(authenticator, self.refresh_margin, Arc::clone(&clock), cancel);
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

/// The whole `fhirhaul.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where exports are written (`<output_dir>/<tenant>/<job>/`).
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    #[serde(default)]
    pub tenant: Vec<TenantConfig>,
}

impl Config {
    /// Reads and validates a TOML file; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error(&path.display().to_string(), format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config { key, reason } => config_error(&key, format!("{reason} (in {})", path.display())),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .map(|span| text[..span.start].lines().count().to_string())
                .map(|line| format!("line {line}"))
                .unwrap_or_else(|| "(file)".into());
            config_error(&key, e.message().to_string())
        })?;
        let mut names = std::collections::HashSet::new();
        for tenant in &config.tenant {
            if !names.insert(tenant.name.clone()) {
                return Err(config_error("tenant.name", format!("`{}` appears twice", tenant.name)));
            }
            tenant.validate()?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
output_dir = "/tmp/out"
[[tenant]]
name = "epic-prod"
base_url = "https://ehr.example/api/FHIR/R4"
client_id = "abc"
private_key = "/keys/epic.pem"
scope = "system/Patient.read system/Observation.read"
[tenant.profile]
method = "post"
value_join = "repeat"
[tenant.export]
concurrency = 8
[tenant.export.poll]
min_interval = "30s"
max_interval = "10m"
[tenant.request]
level = { kind = "group", id = "registry-1" }
types = ["Patient", "Observation"]
"#;

    #[test]
    fn a_full_config_parses() {
        let config = Config::parse(GOOD).unwrap();
        let tenant = &config.tenant[0];
        assert_eq!(tenant.export.poll.min_interval, Duration::from_secs(30));
        assert_eq!(tenant.export.poll.max_interval, Duration::from_secs(600));
        assert_eq!(
            tenant.request.level,
            crate::kickoff::ExportLevel::Group("registry-1".into())
        );
        assert_eq!(tenant.export.concurrency, 8);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let typo = GOOD.replace("client_id = \"abc\"", "client_idd = \"abc\"");
        let error = Config::parse(&typo).unwrap_err().to_string();
        assert!(error.contains("client_idd"), "{error}");
        let bad_duration = GOOD.replace("\"30s\"", "\"soon\"");
        let error = Config::parse(&bad_duration).unwrap_err().to_string();
        assert!(error.contains("`soon` is not a duration"), "{error}");
        let slow_jwt = GOOD.replace("scope =", "assertion_lifetime = \"10m\"\nscope =");
        let error = Config::parse(&slow_jwt).unwrap_err().to_string();
        assert!(error.contains("tenant.epic-prod.assertion_lifetime"), "{error}");
        let inverted = GOOD.replace("\"10m\"", "\"10s\"");
        let error = Config::parse(&inverted).unwrap_err().to_string();
        assert!(error.contains("export.poll.min_interval"), "{error}");
    }
}
