//! A client registered with the simulated EHR, as the tenant that exports from it: one
//! recipe for every test, bench and simulation.

use std::path::Path;

use fhirhaul_common::config::TenantConfig;
use fhirhaul_common::keys::SigningAlgorithm;
use fhirhaul_sim::ClientCredentials;

/// Writes the client's private key into `key_dir` and returns tenant `name` for the EHR at
/// `base_url` (its FHIR base), with the client's id, key id and algorithm. Timings are the
/// defaults; tests shrink what they need.
pub fn sim_tenant(name: &str, base_url: &str, credentials: &ClientCredentials, key_dir: &Path) -> TenantConfig {
    let key_path = key_dir.join(format!("{}.pem", credentials.client_id));
    std::fs::write(&key_path, &credentials.private_key_pem).expect("writing the client's key");
    let mut tenant = TenantConfig::new(
        name,
        base_url.parse().expect("the EHR's FHIR base is a URL"),
        credentials.client_id.clone(),
        key_path,
    );
    tenant.algorithm = SigningAlgorithm::parse(credentials.algorithm);
    tenant.kid = Some(credentials.kid.clone());
    tenant
}

/// The same tenant as the `[[tenant]]` TOML a `fhirhaul` process reads, with test-sized
/// polling and backoff (tenant `sim`, six downloads at once).
pub fn sim_tenant_toml(base_url: &str, credentials: &ClientCredentials, key_dir: &Path) -> String {
    let tenant = sim_tenant("sim", base_url, credentials, key_dir);
    format!(
        r#"
[[tenant]]
name = "sim"
base_url = "{base}"
client_id = "{client}"
kid = "{kid}"
private_key = "{key}"
[tenant.export]
concurrency = 6
[tenant.export.poll]
min_interval = "100ms"
max_interval = "500ms"
min_retry_after = "100ms"
max_retry_after = "500ms"
[tenant.export.download]
backoff_min = "50ms"
backoff_max = "500ms"
"#,
        base = base_url,
        client = tenant.client_id,
        kid = credentials.kid,
        key = tenant.private_key.display()
    )
}
