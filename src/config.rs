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
    /// mTLS for the worker, admin and raft APIs (the cluster token comes from the
    /// `FHIRHAUL_CLUSTER_TOKEN` environment variable, never from this file).
    pub tls: Option<TlsFiles>,
    /// This coordinator's raft node id (unique in the group, never reused).
    pub node_id: u64,
    /// The initial coordinator group: every member's id and gRPC address, this one included.
    /// Leave empty for a coordinator alone.
    pub coordinator: Vec<CoordinatorPeer>,
    /// Start with no membership and wait to be added with `fhirhaul cluster add`.
    pub join: bool,
    /// Snapshot the state and compact the raft log every this many entries.
    pub snapshot_every: u64,
    /// A finished job leaves the replicated state once quiet this long (its summary stays;
    /// its files are kept in `<data_dir>/archive/`).
    #[serde(with = "fhirhaul_common::serde_duration")]
    pub archive_after: Duration,
    /// Raft election timeout in 100 ms ticks (default: 10 to 19, spread by node id).
    pub election_tick: Option<usize>,
}

/// One member of the initial coordinator group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorPeer {
    pub id: u64,
    /// Where its gRPC APIs are reached (`http://host:port`, or `https://` with TLS).
    pub address: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: "127.0.0.1:7400".into(),
            data_dir: PathBuf::from("fhirhaul-data/coordinator"),
            lease_duration: Duration::from_secs(30),
            max_file_attempts: 5,
            tls: None,
            node_id: 1,
            coordinator: Vec::new(),
            join: false,
            snapshot_every: 10_000,
            archive_after: fhirhaul_coordinator::node::DEFAULT_ARCHIVE_AFTER,
            election_tick: None,
        }
    }
}

impl ClusterConfig {
    fn check_group(&self) -> Result<(), Error> {
        if self.node_id == 0 {
            return Err(config_error_for("cluster.node_id", "must be 1 or more"));
        }
        if self.snapshot_every == 0 {
            return Err(config_error_for("cluster.snapshot_every", "must be at least 1"));
        }
        if self.election_tick.is_some_and(|ticks| ticks < 4) {
            return Err(config_error_for("cluster.election_tick", "must be at least 4"));
        }
        let mut ids = std::collections::BTreeSet::new();
        for peer in &self.coordinator {
            if peer.id == 0 || !ids.insert(peer.id) {
                return Err(config_error_for(
                    "cluster.coordinator.id",
                    format!("{} is 0 or appears twice", peer.id),
                ));
            }
            let url = url::Url::parse(&peer.address).ok();
            if !url.is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
                return Err(config_error_for(
                    "cluster.coordinator.address",
                    format!("`{}` is not an address like http://10.0.0.1:7400", peer.address),
                ));
            }
        }
        if !self.coordinator.is_empty() && !ids.contains(&self.node_id) && !self.join {
            return Err(config_error_for(
                "cluster.node_id",
                format!(
                    "{} is not in [[cluster.coordinator]]; list this coordinator too, or set join = true",
                    self.node_id
                ),
            ));
        }
        Ok(())
    }

    /// The initial voters by id.
    pub fn peers(&self) -> std::collections::BTreeMap<u64, String> {
        self.coordinator.iter().map(|p| (p.id, p.address.clone())).collect()
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
    match (text.parse::<i64>(), text) {
        (Ok(number), _) => toml::Value::Integer(number),
        (_, "true") => toml::Value::Boolean(true),
        (_, "false") => toml::Value::Boolean(false),
        _ => toml::Value::String(text.to_string()),
    }
}

/// The part of `FHIRHAUL_TENANT_<NAME>_<KEY>` that names a tenant: `epic-prod` → `EPIC_PROD_`.
fn env_prefix(tenant: &str) -> String {
    format!("{}_", tenant.to_uppercase().replace('-', "_"))
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
            // The tenant with the longest matching prefix: FHIRHAUL_TENANT_EPIC_PROD_X is
            // epic-prod's `x`, not epic's `prod_x`.
            let target = tenants
                .iter_mut()
                .filter_map(toml::Value::as_table_mut)
                .filter_map(|tenant| {
                    let prefix = env_prefix(tenant.get("name")?.as_str()?);
                    rest.starts_with(&prefix).then_some((prefix.len(), tenant))
                })
                .max_by_key(|(length, _)| *length);
            if let Some((length, tenant)) = target {
                tenant.insert(rest[length..].to_lowercase(), env_value(&value));
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
        // Two tenants whose override prefixes are the same could not be told apart.
        let mut prefixes: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        let names = table
            .get("tenant")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|tenant| tenant.get("name")?.as_str());
        for name in names {
            if let Some(other) = prefixes.insert(env_prefix(name), name.to_string())
                && other != name
            {
                return Err(config_error_for(
                    "tenant.name",
                    format!(
                        "`{other}` and `{name}` would share the environment prefix FHIRHAUL_TENANT_{}: rename one",
                        env_prefix(name)
                    ),
                ));
            }
        }
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
        config.cluster.check_group()?;
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
    fn a_coordinator_group_is_checked() {
        let group = GOOD.to_string()
            + "node_id = 2\n[[cluster.coordinator]]\nid = 1\naddress = \"http://10.0.0.1:7400\"\n[[cluster.coordinator]]\nid = 2\naddress = \"http://10.0.0.2:7400\"\n";
        let config = parse(&group).unwrap();
        assert_eq!(config.cluster.peers().len(), 2);
        assert_eq!(config.cluster.node_id, 2);
        let missing_self = group.replace("node_id = 2", "node_id = 3");
        let error = parse(&missing_self).unwrap_err().to_string();
        assert!(error.contains("cluster.node_id") && error.contains("join"), "{error}");
        let twice = group.replace("id = 2\naddress", "id = 1\naddress");
        assert!(
            parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("cluster.coordinator.id")
        );
        let bad_address = group.replace("http://10.0.0.2:7400", "10.0.0.2:7400");
        let error = parse(&bad_address).unwrap_err().to_string();
        assert!(error.contains("cluster.coordinator.address"), "{error}");
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

    fn with_second_tenant(name: &str) -> String {
        format!(
            r#"{GOOD}
[[tenant]]
name = "{name}"
base_url = "https://other.example/fhir"
client_id = "other"
private_key = "/keys/other.pem"
"#
        )
    }

    #[test]
    fn tenants_whose_override_prefixes_collide_are_refused() {
        let text = with_second_tenant("epic_prod");
        let error = Config::parse(&text, std::iter::empty()).unwrap_err().to_string();
        assert!(
            error.contains("epic-prod") && error.contains("epic_prod") && error.contains("FHIRHAUL_TENANT_EPIC_PROD_"),
            "{error}"
        );
    }

    #[test]
    fn an_override_goes_to_the_tenant_with_the_longest_matching_name() {
        // `epic` is a prefix of `epic-prod`: EPIC_PROD_CLIENT_ID is epic-prod's client_id,
        // not epic's `prod_client_id`.
        let text = with_second_tenant("epic");
        let environment = vec![
            ("FHIRHAUL_TENANT_EPIC_PROD_CLIENT_ID".to_string(), "prod-id".to_string()),
            ("FHIRHAUL_TENANT_EPIC_CLIENT_ID".to_string(), "epic-id".to_string()),
        ];
        let config = Config::parse(&text, environment.into_iter()).unwrap();
        let client = |name: &str| config.tenant.iter().find(|t| t.name == name).unwrap().client_id.clone();
        assert_eq!(client("epic-prod"), "prod-id");
        assert_eq!(client("epic"), "epic-id");
    }
}
