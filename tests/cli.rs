//! The `fhirhaul` binary as a user runs it.

// Tests and benchmarks set up files and measure wall time directly; clippy.toml lists
// what the simulated crates may not call.
#![allow(clippy::disallowed_methods)]

use fhirhaul_testkit::processes::fhirhaul;

#[test]
fn run_with_no_config_exports_from_the_built_in_simulated_ehr() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output = fhirhaul()
        .args(["run", "--patients", "30", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("done in"), "{stdout}");
    assert!(stdout.contains("summary with SHA-256"), "{stdout}");
    assert!(
        stdout.contains("next incremental export: _since="),
        "every file arrived, so the cursor moved: {stdout}"
    );
    // <out>/<tenant>/<export id>/, beside the state in <out>/<tenant>/.fhirhaul/.
    let exports: Vec<std::path::PathBuf> = std::fs::read_dir(out.join("sim"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().is_some_and(|n| n != ".fhirhaul"))
        .collect();
    assert_eq!(exports.len(), 1, "{exports:?}");
    let export_dir = &exports[0];
    assert!(
        stdout.contains(&export_dir.display().to_string()),
        "the export's directory is printed: {stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(export_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["phase"], "Completed");
    let files = summary["files"].as_array().unwrap();
    assert!(files.len() >= 5);
    assert!(
        files
            .iter()
            .all(|f| std::path::Path::new(f["path"].as_str().unwrap()).exists())
    );
    assert!(summary["failed"].as_array().unwrap().is_empty());
}

#[test]
fn keys_generate_writes_a_key_and_a_rotatable_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let first = fhirhaul()
        .args(["keys", "generate", "--alg", "ES384", "--kid", "k1", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let jwks_path = dir.path().join("jwks.json");
    let second = fhirhaul()
        .args(["keys", "generate", "--alg", "RS384", "--kid", "k2", "--out"])
        .arg(dir.path())
        .arg("--add-to")
        .arg(&jwks_path)
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let jwks: serde_json::Value = serde_json::from_slice(&std::fs::read(&jwks_path).unwrap()).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "both keys kept for rotation");
    assert_eq!(keys[0]["kid"], "k1");
    assert_eq!(keys[1]["kty"], "RSA");
    assert!(
        keys.iter().all(|k| k.get("d").is_none()),
        "no private members in the JWKS"
    );
    let pem = std::fs::read_to_string(dir.path().join("k1.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let again = fhirhaul()
        .args(["keys", "generate", "--kid", "k1", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success(), "an existing private key is never overwritten");
}

#[test]
fn a_bad_config_names_the_key_and_the_example_config_parses() {
    // The example's key files exist only on a real deployment: it parses, and
    // check-config says exactly which key it cannot load, and fails.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/fhirhaul.example.toml");
    let checked = fhirhaul()
        .arg("check-config")
        .arg("--config")
        .arg(&example)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(!checked.status.success(), "{stdout}");
    assert!(
        stdout.contains("tenant epic-prod") && stdout.contains("KEY NOT LOADABLE") && stdout.contains("NOT usable"),
        "{stdout}{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // The same tenant with a key that loads is valid.
    let keys = tempfile::tempdir().unwrap();
    let generated = fhirhaul()
        .args(["keys", "generate", "--kid", "k1", "--out"])
        .arg(keys.path())
        .output()
        .unwrap();
    assert!(generated.status.success());
    let config = keys.path().join("ok.toml");
    std::fs::write(
        &config,
        format!(
            "[[tenant]]\nname = \"ok\"\nbase_url = \"https://e.example/fhir\"\nclient_id = \"c\"\nkid = \"k1\"\nprivate_key = \"{}\"\n",
            keys.path().join("k1.pem").display()
        ),
    )
    .unwrap();
    let checked = fhirhaul()
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(stdout.contains("tenant ok") && stdout.contains("is valid"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[tenant]]\nname = \"x\"\nbase_url = \"https://e.example/fhir\"\nclient_id = \"c\"\nprivate_key = \"k.pem\"\n[tenant.export]\nconcurrency = 0\n").unwrap();
    let output = fhirhaul().args(["run", "--config"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tenant.x.export.concurrency"), "{stderr}");

    std::fs::write(&path, "[[tenant]]\nname = \"x\"\nbase_url = \"https://e.example/fhir\"\nclient_id = \"c\"\nprivate_key = \"k.pem\"\n[tenant.export]\nconcurrency = 8\nmax_concurrency = 4\n").unwrap();
    let output = fhirhaul().args(["run", "--config"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tenant.x.export.max_concurrency") && stderr.contains("at least export.concurrency"),
        "{stderr}"
    );
}
