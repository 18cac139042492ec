//! A deterministic synthetic population. Patient `i` of seed `s` always has the same
//! encounters, observations, conditions and medication requests, with references that
//! resolve (every `subject` is an exported Patient, every `encounter` an exported
//! Encounter). Resources are produced one patient at a time, so memory does not grow with
//! the population.
//!
//! JSON is written here by hand (no whitespace, as NDJSON wants), from a fixed alphabet, so
//! the bytes are stable across versions of any JSON library.

/// Resource types this EHR holds.
pub const RESOURCE_TYPES: &[&str] = &["Patient", "Encounter", "Observation", "Condition", "MedicationRequest"];

/// Types with a `status` element, for `_typeFilter=Type?status=…`.
pub fn status_values(kind: &str) -> &'static [&'static str] {
    match kind {
        "Observation" => &["final", "amended", "preliminary"],
        "Encounter" => &["finished", "in-progress"],
        "MedicationRequest" => &["active", "completed", "stopped"],
        _ => &[],
    }
}

/// One generated resource: its top-level elements already serialized, so `_elements` can
/// drop some without re-parsing.
#[derive(Debug, Clone)]
pub struct Resource {
    pub resource_type: &'static str,
    pub id: String,
    /// Seconds since the Unix epoch.
    pub last_updated: i64,
    pub status: Option<&'static str>,
    /// `(name, json)` pairs after `resourceType`, `id` and `meta`.
    pub elements: Vec<(&'static str, String)>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The generator for one seed.
#[derive(Debug, Clone, Copy)]
pub struct Population {
    seed: u64,
    patients: u32,
}

const EPOCH_2020: i64 = 1_577_836_800;
const FIVE_YEARS: u64 = 5 * 365 * 86_400;
const GIVEN: &[&str] = &[
    "Ana", "Ben", "Chidi", "Dana", "Eero", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena",
];
const FAMILY: &[&str] = &[
    "Okafor", "Smith", "Nguyen", "Garcia", "Kowalski", "Haddad", "Tanaka", "Olsen", "Silva", "Novak",
];
const LOINC: &[(&str, &str, &str)] = &[
    ("8867-4", "Heart rate", "/min"),
    ("8310-5", "Body temperature", "Cel"),
    ("29463-7", "Body weight", "kg"),
    ("8302-2", "Body height", "cm"),
    ("2339-0", "Glucose", "mg/dL"),
];
const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("55822004", "Hyperlipidemia"),
];
const MEDICATIONS: &[(&str, &str)] = &[
    ("860975", "metformin 500 MG Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("745679", "albuterol 0.09 MG/ACTUAT Inhaler"),
];

impl Population {
    pub fn new(seed: u64, patients: u32) -> Self {
        Population { seed, patients }
    }

    pub fn patients(&self) -> u32 {
        self.patients
    }

    fn draw(&self, patient: u32, salt: u64) -> u64 {
        splitmix(self.seed ^ splitmix(u64::from(patient).wrapping_mul(0x1000_0001) ^ salt))
    }

    pub fn patient_id(patient: u32) -> String {
        format!("p{patient}")
    }

    /// Parses `p123` back to 123.
    pub fn patient_index(id: &str) -> Option<u32> {
        id.strip_prefix('p')?.parse().ok()
    }

    fn when(&self, patient: u32, salt: u64) -> i64 {
        EPOCH_2020 + (self.draw(patient, salt) % FIVE_YEARS) as i64
    }

    /// Every resource of `kind` that belongs to `patient`, in a fixed order.
    pub fn resources(&self, patient: u32, kind: &str) -> Vec<Resource> {
        let pid = Self::patient_id(patient);
        let subject = format!("{{\"reference\":\"Patient/{pid}\"}}");
        let encounters = 1 + self.draw(patient, 1) % 3;
        let mut out = Vec::new();
        match kind {
            "Patient" => {
                let h = self.draw(patient, 2);
                let given = GIVEN[(h % GIVEN.len() as u64) as usize];
                let family = FAMILY[((h >> 8) % FAMILY.len() as u64) as usize];
                let gender = if h & 1 == 0 { "female" } else { "male" };
                let birth_year = 1930 + (h >> 16) % 90;
                let birth = format!("\"{birth_year}-{:02}-{:02}\"", 1 + (h >> 24) % 12, 1 + (h >> 32) % 28);
                out.push(Resource {
                    resource_type: "Patient",
                    id: pid.clone(),
                    last_updated: self.when(patient, 3),
                    status: None,
                    elements: vec![
                        (
                            "identifier",
                            format!(
                                "[{{\"system\":\"urn:oid:2.16.840.1.113883.19.5\",\"value\":\"MRN{patient:08}\"}}]"
                            ),
                        ),
                        ("active", "true".into()),
                        ("name", format!("[{{\"family\":\"{family}\",\"given\":[\"{given}\"]}}]")),
                        ("gender", format!("\"{gender}\"")),
                        ("birthDate", birth),
                    ],
                });
            }
            "Encounter" => {
                for k in 0..encounters {
                    let status = status_values("Encounter")[(self.draw(patient, 10 + k) % 2) as usize];
                    let start = self.when(patient, 20 + k);
                    out.push(Resource {
                        resource_type: "Encounter",
                        id: format!("e{patient}-{k}"),
                        last_updated: start + 3600,
                        status: Some(status),
                        elements: vec![
                            ("status", format!("\"{status}\"")),
                            (
                                "class",
                                "{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ActCode\",\"code\":\"AMB\"}"
                                    .into(),
                            ),
                            ("type", "[{\"text\":\"Outpatient visit\"}]".into()),
                            ("subject", subject.clone()),
                            ("period", format!("{{\"start\":\"{}\"}}", instant(start))),
                        ],
                    });
                }
            }
            "Observation" => {
                for k in 0..encounters {
                    let per = 2 + self.draw(patient, 30 + k) % 4;
                    for j in 0..per {
                        let h = self.draw(patient, 1000 + k * 16 + j);
                        let (code, display, unit) = LOINC[(h % LOINC.len() as u64) as usize];
                        let status = status_values("Observation")[((h >> 8) % 3) as usize];
                        let value = 20 + (h >> 16) % 150;
                        let at = self.when(patient, 20 + k) + 600 + j as i64 * 60;
                        out.push(Resource {
                            resource_type: "Observation",
                            id: format!("o{patient}-{k}-{j}"),
                            last_updated: at,
                            status: Some(status),
                            elements: vec![
                                ("status", format!("\"{status}\"")),
                                ("category", "[{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/observation-category\",\"code\":\"vital-signs\"}]}]".into()),
                                ("code", format!("{{\"coding\":[{{\"system\":\"http://loinc.org\",\"code\":\"{code}\",\"display\":\"{display}\"}}],\"text\":\"{display}\"}}")),
                                ("subject", subject.clone()),
                                ("encounter", format!("{{\"reference\":\"Encounter/e{patient}-{k}\"}}")),
                                ("effectiveDateTime", format!("\"{}\"", instant(at))),
                                ("valueQuantity", format!("{{\"value\":{value},\"unit\":\"{unit}\",\"system\":\"http://unitsofmeasure.org\",\"code\":\"{unit}\"}}")),
                            ],
                        });
                    }
                }
            }
            "Condition" => {
                let count = self.draw(patient, 40) % 3;
                for k in 0..count {
                    let h = self.draw(patient, 50 + k);
                    let (code, display) = CONDITIONS[(h % CONDITIONS.len() as u64) as usize];
                    out.push(Resource {
                        resource_type: "Condition",
                        id: format!("c{patient}-{k}"),
                        last_updated: self.when(patient, 60 + k),
                        status: None,
                        elements: vec![
                            ("clinicalStatus", "{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/condition-clinical\",\"code\":\"active\"}]}".into()),
                            ("code", format!("{{\"coding\":[{{\"system\":\"http://snomed.info/sct\",\"code\":\"{code}\",\"display\":\"{display}\"}}]}}")),
                            ("subject", subject.clone()),
                            ("encounter", format!("{{\"reference\":\"Encounter/e{patient}-0\"}}")),
                        ],
                    });
                }
            }
            "MedicationRequest" => {
                let count = self.draw(patient, 70) % 4;
                for k in 0..count {
                    let h = self.draw(patient, 80 + k);
                    let (code, display) = MEDICATIONS[(h % MEDICATIONS.len() as u64) as usize];
                    let status = status_values("MedicationRequest")[((h >> 8) % 3) as usize];
                    let at = self.when(patient, 90 + k);
                    out.push(Resource {
                        resource_type: "MedicationRequest",
                        id: format!("m{patient}-{k}"),
                        last_updated: at,
                        status: Some(status),
                        elements: vec![
                            ("status", format!("\"{status}\"")),
                            ("intent", "\"order\"".into()),
                            ("medicationCodeableConcept", format!("{{\"coding\":[{{\"system\":\"http://www.nlm.nih.gov/research/umls/rxnorm\",\"code\":\"{code}\",\"display\":\"{display}\"}}]}}")),
                            ("subject", subject.clone()),
                            ("encounter", format!("{{\"reference\":\"Encounter/e{patient}-0\"}}")),
                            ("authoredOn", format!("\"{}\"", instant(at))),
                        ],
                    });
                }
            }
            _ => {}
        }
        out
    }

    /// Resources removed since `since` (for `deleted` files): a deterministic few patients
    /// lost a Condition.
    pub fn deleted_since(&self, patient: u32) -> Option<String> {
        self.draw(patient, 99)
            .is_multiple_of(4)
            .then(|| format!("Condition/c{patient}-deleted"))
    }
}

/// RFC 3339 UTC, seconds precision.
pub fn instant(unix: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Serializes a resource, keeping only `keep` elements when `_elements` applies (and then
/// tagging it SUBSETTED, as the IG says).
pub fn write_resource(out: &mut Vec<u8>, resource: &Resource, version: u32, keep: Option<&[String]>) {
    use std::io::Write;
    let _ = write!(
        out,
        "{{\"resourceType\":\"{}\",\"id\":\"{}\",\"meta\":{{\"versionId\":\"{}\",\"lastUpdated\":\"{}\"",
        resource.resource_type,
        resource.id,
        version,
        instant(resource.last_updated)
    );
    if keep.is_some() {
        out.extend_from_slice(b",\"tag\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ObservationValue\",\"code\":\"SUBSETTED\"}]");
    }
    out.push(b'}');
    for (name, json) in &resource.elements {
        if let Some(keep) = keep
            && !keep.iter().any(|k| k == name)
        {
            continue;
        }
        let _ = write!(out, ",\"{name}\":{json}");
    }
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_and_references_resolve() {
        let a = Population::new(5, 50);
        let b = Population::new(5, 50);
        let mut encounters = std::collections::HashSet::new();
        for p in 0..50 {
            for e in a.resources(p, "Encounter") {
                encounters.insert(format!("Encounter/{}", e.id));
            }
        }
        for p in 0..50 {
            for kind in RESOURCE_TYPES {
                let (mut x, mut y) = (Vec::new(), Vec::new());
                for r in a.resources(p, kind) {
                    write_resource(&mut x, &r, 1, None);
                    for (name, json) in &r.elements {
                        if *name == "encounter" {
                            let reference = json.trim_start_matches("{\"reference\":\"").trim_end_matches("\"}");
                            assert!(encounters.contains(reference), "{reference} dangles");
                        }
                    }
                }
                for r in b.resources(p, kind) {
                    write_resource(&mut y, &r, 1, None);
                }
                assert_eq!(x, y);
                for line in x.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let value: serde_json::Value = serde_json::from_slice(line).expect("valid JSON");
                    assert_eq!(value["resourceType"], *kind);
                }
            }
        }
    }

    #[test]
    fn elements_subset_is_tagged() {
        let population = Population::new(1, 1);
        let patient = &population.resources(0, "Patient")[0];
        let mut out = Vec::new();
        write_resource(&mut out, patient, 1, Some(&["gender".to_string()]));
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(value.get("gender").is_some());
        assert!(value.get("name").is_none());
        assert_eq!(value["meta"]["tag"][0]["code"], "SUBSETTED");
    }
}
