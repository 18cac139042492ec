//! The `fhirhaul.toml` file: tenants (the client core's [`TenantConfig`]), where exports go,
//! and this node's cluster settings. Environment variables override keys
//! (`FHIRHAUL_TENANT_<NAME>_<KEY>`, `FHIRHAUL_CLUSTER_<KEY>`) before validation, so a bad
//! value is reported under its key whichever way it came in.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fhirhaul_common::Error;
use fhirhaul_common::config::{TenantConfig, config_error_for};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where exports are written (`<output_dir>/<job>/…`).
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    #[serde(default)]
    pub tenant: Vec<TenantConfig>,
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// This node's cluster settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Address of the coordinator's gRPC APIs.
    pub listen: String,
    /// Raft log and state of the coordinator.
    pub data_dir: PathBuf,
    /// A lease not renewed for this long goes to another worker.
    #[serde(with = "fhirhaul_common::serde_duration")]
    pub lease_duration: Duration,
    /// Attempts per file before it is recorded as failed.
    pub max_file_attempts: u32,
    /// mTLS for the worker and admin APIs (the cluster token comes from the
    /// `FHIRHAUL_CLUSTER_TOKEN` environment variable, never from this file).
    pub tls: Option<TlsFiles>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: "127.0.0.1:7400".into(),
            data_dir: PathBuf::from("fhirhaul-data/coordinator"),
            lease_duration: Duration::from_secs(30),
            max_file_attempts: 5,
            tls: None,
        }
    }
}

/// PEM files for mutual TLS: the CA both sides trust, and this node's certificate and key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| config_error_for(key, format!("cannot read {}: {e}", path.display())))
}

impl TlsFiles {
    /// Server side: present our certificate, require a client certificate from the CA.
    pub fn server(&self) -> Result<tonic::transport::ServerTlsConfig, Error> {
        let identity = tonic::transport::Identity::from_pem(
            read("cluster.tls.cert", &self.cert)?,
            read("cluster.tls.key", &self.key)?,
        );
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                "cluster.tls.ca",
                &self.ca,
            )?)))
    }

    /// Client side: trust the CA, present our certificate.
    pub fn client(&self) -> Result<tonic::transport::ClientTlsConfig, Error> {
        let identity = tonic::transport::Identity::from_pem(
            read("cluster.tls.cert", &self.cert)?,
            read("cluster.tls.key", &self.key)?,
        );
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(
                "cluster.tls.ca",
                &self.ca,
            )?))
            .identity(identity))
    }
}

fn env_value(text: &str) -> toml::Value {
    match text.parse::<i64>() {
        Ok(number) => toml::Value::Integer(number),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// Applies `FHIRHAUL_TENANT_<NAME>_<KEY>` and `FHIRHAUL_CLUSTER_<KEY>` overrides.
fn apply_overrides(table: &mut toml::Table, environment: impl Iterator<Item = (String, String)>) {
    for (name, value) in environment {
        if let Some(rest) = name.strip_prefix("FHIRHAUL_CLUSTER_") {
            if rest == "TOKEN" {
                continue;
            }
            let cluster = table
                .entry("cluster")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(cluster) = cluster.as_table_mut() {
                cluster.insert(rest.to_lowercase(), env_value(&value));
            }
        } else if let Some(rest) = name.strip_prefix("FHIRHAUL_TENANT_")
            && let Some(tenants) = table.get_mut("tenant").and_then(toml::Value::as_array_mut)
        {
            for tenant in tenants.iter_mut().filter_map(toml::Value::as_table_mut) {
                let Some(tenant_name) = tenant.get("name").and_then(toml::Value::as_str) else {
                    continue;
                };
                let prefix = format!("{}_", tenant_name.to_uppercase().replace('-', "_"));
                if let Some(key) = rest.strip_prefix(&prefix) {
                    tenant.insert(key.to_lowercase(), env_value(&value));
                }
            }
        }
    }
}

/// Names the key at the error's position: `base_url (line 4)`.
fn syntax_error(text: &str, error: &toml::de::Error) -> Error {
    let key = match error.span() {
        Some(span) => {
            let line_number = text[..span.start].lines().count().max(1);
            let line = text[..span.start].rsplit('\n').next().unwrap_or_default().to_string()
                + text[span.start..].split('\n').next().unwrap_or_default();
            let key = line
                .split('=')
                .next()
                .unwrap_or_default()
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']');
            format!("{key} (line {line_number})")
        }
        None => "(file)".to_string(),
    };
    config_error_for(&key, error.message().to_string())
}

impl Config {
    /// Reads, overrides from the environment, and validates; errors name the file and key.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error_for(&path.display().to_string(), format!("cannot read: {e}")))?;
        Self::parse(&text, std::env::vars()).map_err(|e| match e {
            Error::Config { key, reason } => config_error_for(&key, format!("{reason} (in {})", path.display())),
            other => other,
        })
    }

    pub fn parse(text: &str, environment: impl Iterator<Item = (String, String)>) -> Result<Config, Error> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| syntax_error(text, &e))?;
        let before = table.clone();
        apply_overrides(&mut table, environment);
        // With overrides, check the merged document, so their values are reported by key too.
        let merged;
        let document = if table == before {
            text
        } else {
            merged = toml::to_string(&table).map_err(|e| config_error_for("(environment)", e.to_string()))?;
            merged.as_str()
        };
        let config: Config = toml::from_str(document).map_err(|e| syntax_error(document, &e))?;
        let mut names = std::collections::BTreeSet::new();
        for tenant in &config.tenant {
            if !names.insert(tenant.name.clone()) {
                return Err(config_error_for(
                    "tenant.name",
                    format!("`{}` appears twice", tenant.name),
                ));
            }
            tenant.validate()?;
        }
        if config.cluster.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(config_error_for(
                "cluster.listen",
                format!("`{}` is not an address like 127.0.0.1:7400", config.cluster.listen),
            ));
        }
        if config.cluster.lease_duration < Duration::from_millis(500) {
            return Err(config_error_for("cluster.lease_duration", "must be at least 500ms"));
        }
        if config.cluster.max_file_attempts == 0 {
            return Err(config_error_for("cluster.max_file_attempts", "must be at least 1"));
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
[cluster]
listen = "0.0.0.0:7400"
lease_duration = "45s"
"#;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, std::iter::empty())
    }

    #[test]
    fn a_full_config_parses() {
        let config = parse(GOOD).unwrap();
        let tenant = &config.tenant[0];
        assert_eq!(tenant.export.poll.min_interval, Duration::from_secs(30));
        assert_eq!(tenant.export.poll.max_interval, Duration::from_secs(600));
        assert_eq!(
            tenant.request.level,
            fhirhaul_common::kickoff::ExportLevel::Group("registry-1".into())
        );
        assert_eq!(tenant.export.concurrency, 8);
        assert_eq!(config.cluster.lease_duration, Duration::from_secs(45));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let typo = GOOD.replace("client_id = \"abc\"", "client_idd = \"abc\"");
        let error = parse(&typo).unwrap_err().to_string();
        assert!(error.contains("client_idd"), "{error}");
        let bad_duration = GOOD.replace("\"30s\"", "\"soon\"");
        let error = parse(&bad_duration).unwrap_err().to_string();
        assert!(error.contains("`soon` is not a duration"), "{error}");
        let slow_jwt = GOOD.replace("scope =", "assertion_lifetime = \"10m\"\nscope =");
        let error = parse(&slow_jwt).unwrap_err().to_string();
        assert!(error.contains("tenant.epic-prod.assertion_lifetime"), "{error}");
        let inverted = GOOD.replace("\"10m\"", "\"10s\"");
        let error = parse(&inverted).unwrap_err().to_string();
        assert!(error.contains("export.poll.min_interval"), "{error}");
        let bad_listen = GOOD.replace("0.0.0.0:7400", "everywhere");
        assert!(parse(&bad_listen).unwrap_err().to_string().contains("cluster.listen"));
    }

    #[test]
    fn environment_overrides_keys_and_is_validated_like_the_file() {
        let environment = vec![
            (
                "FHIRHAUL_TENANT_EPIC_PROD_CLIENT_ID".to_string(),
                "from-env".to_string(),
            ),
            ("FHIRHAUL_CLUSTER_LEASE_DURATION".to_string(), "2m".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let config = Config::parse(GOOD, environment.into_iter()).unwrap();
        assert_eq!(config.tenant[0].client_id, "from-env");
        assert_eq!(config.cluster.lease_duration, Duration::from_secs(120));
        let bad = vec![(
            "FHIRHAUL_TENANT_EPIC_PROD_BASE_URL".to_string(),
            "not a url".to_string(),
        )];
        let error = Config::parse(GOOD, bad.into_iter()).unwrap_err().to_string();
        assert!(error.contains("base_url"), "{error}");
    }
}
