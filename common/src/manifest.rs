//! The completion manifest: parsed strictly where the IG is strict, leniently where real
//! servers differ (STU4 `outcome`, `extension` as object or array, unknown fields kept).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::error::{Error, Result};
use crate::fhir::parse_instant;
use crate::url_util::SafeUrl;

/// Which list of the manifest a file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// `output`: resources of `type`.
    Output,
    /// `deleted`: transaction Bundles of DELETE entries.
    Deleted,
    /// `error` (STU4: `outcome`): OperationOutcome resources.
    Error,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Output => "output",
            FileKind::Deleted => "deleted",
            FileKind::Error => "error",
        }
    }
}

/// One file to download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub kind: FileKind,
    /// The `type` the manifest gives; `None` for `organizeOutputBy` output.
    pub resource_type: Option<String>,
    pub url: Url,
    pub count: Option<u64>,
}

/// A parsed manifest page.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub transaction_time: String,
    pub request: Option<String>,
    pub requires_access_token: bool,
    pub files: Vec<ManifestFile>,
    /// `link` with relation `next`: another page of this manifest.
    pub next: Option<Url>,
    /// The manifest exactly as received, unknown fields and extensions included.
    pub raw: Value,
}

fn is_type_name(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

impl Manifest {
    /// Parses and validates a manifest received from `source`.
    pub fn parse(body: &[u8], source: &Url) -> Result<Manifest> {
        let bad = |field: &str, reason: String| Error::Manifest {
            url: SafeUrl::from(source),
            field: field.to_string(),
            reason,
        };
        let raw: Value = serde_json::from_slice(body).map_err(|e| {
            bad(
                "(document)",
                format!(
                    "is not JSON: {e}; body starts {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(80)])
                ),
            )
        })?;
        let object = raw
            .as_object()
            .ok_or_else(|| bad("(document)", "is not a JSON object".into()))?;
        let transaction_time = match object.get("transactionTime") {
            Some(Value::String(text)) if parse_instant(text).is_some() => text.clone(),
            Some(other) => {
                return Err(bad(
                    "transactionTime",
                    format!("{other} is not a FHIR instant with a timezone"),
                ));
            }
            None => return Err(bad("transactionTime", "is missing".into())),
        };
        let request = match object.get("request") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(other) => return Err(bad("request", format!("{other} is not a string"))),
        };
        let requires_access_token = match object.get("requiresAccessToken") {
            Some(Value::Bool(flag)) => *flag,
            None => {
                tracing::warn!(url = %SafeUrl::from(source), "manifest has no requiresAccessToken; assuming true");
                true
            }
            Some(other) => return Err(bad("requiresAccessToken", format!("{other} is not true or false"))),
        };
        let mut files = Vec::new();
        for (field, kind) in [
            ("output", FileKind::Output),
            ("deleted", FileKind::Deleted),
            ("error", FileKind::Error),
            ("outcome", FileKind::Error),
        ] {
            let entries = match object.get(field) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(entries)) => entries,
                Some(other) => {
                    return Err(bad(
                        field,
                        format!("is {} where an array was expected", json_kind(other)),
                    ));
                }
            };
            for (index, entry) in entries.iter().enumerate() {
                files.push(parse_file(entry, kind, &format!("{field}[{index}]"), source)?);
            }
        }
        let mut next = None;
        match object.get("link") {
            None | Some(Value::Null) => {}
            Some(Value::Array(links)) => {
                for (index, link) in links.iter().enumerate() {
                    if link.get("relation").and_then(Value::as_str) == Some("next") {
                        let field = format!("link[{index}].url");
                        let text = link
                            .get("url")
                            .and_then(Value::as_str)
                            .ok_or_else(|| bad(&field, "is missing".into()))?;
                        next = Some(
                            absolute_url(text)
                                .ok_or_else(|| bad(&field, format!("`{text}` is not an absolute http(s) URL")))?,
                        );
                    }
                }
            }
            Some(other) => {
                return Err(bad(
                    "link",
                    format!("is {} where an array was expected", json_kind(other)),
                ));
            }
        }
        Ok(Manifest {
            transaction_time,
            request,
            requires_access_token,
            files,
            next,
            raw,
        })
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn absolute_url(text: &str) -> Option<Url> {
    Url::parse(text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

fn parse_file(entry: &Value, kind: FileKind, field: &str, source: &Url) -> Result<ManifestFile> {
    let bad = |member: &str, reason: String| Error::Manifest {
        url: SafeUrl::from(source),
        field: format!("{field}{member}"),
        reason,
    };
    if !entry.is_object() {
        return Err(bad("", format!("is {} where an object was expected", json_kind(entry))));
    }
    let url_text = match entry.get("url") {
        Some(Value::String(text)) => text,
        Some(other) => return Err(bad(".url", format!("{other} is not a string"))),
        None => return Err(bad(".url", "is missing".into())),
    };
    let url = absolute_url(url_text).ok_or_else(|| {
        bad(
            ".url",
            format!("`{}` is not an absolute http(s) URL", SafeUrl::from(url_text.as_str())),
        )
    })?;
    let resource_type = match entry.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if is_type_name(text) => Some(text.clone()),
        Some(other) => return Err(bad(".type", format!("{other} is not a FHIR resource type name"))),
    };
    let count = match entry.get("count") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .ok_or_else(|| bad(".count", format!("{value} is not a non-negative integer")))?,
        ),
    };
    Ok(ManifestFile {
        kind,
        resource_type,
        url,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Url {
        Url::parse("https://ehr.example/status/1").unwrap()
    }

    #[test]
    fn full_manifest_with_stu4_outcome_and_extensions_parses() {
        let body = br#"{
            "transactionTime": "2024-05-01T10:00:00.000Z",
            "request": "https://ehr.example/Patient/$export?_type=Patient",
            "requiresAccessToken": true,
            "output": [{"type":"Patient","url":"https://ehr.example/f/1","count":10},
                       {"url":"https://ehr.example/f/2"}],
            "deleted": [{"type":"Bundle","url":"https://ehr.example/f/3"}],
            "error": [],
            "outcome": [{"type":"OperationOutcome","url":"https://ehr.example/f/4"}],
            "extension": [{"url":"x","valueString":"y"}],
            "link": [{"relation":"next","url":"https://ehr.example/status/1?page=2"}],
            "somethingNew": 42
        }"#;
        let manifest = Manifest::parse(body, &source()).unwrap();
        assert_eq!(manifest.files.len(), 4);
        assert_eq!(manifest.files[0].count, Some(10));
        assert_eq!(manifest.files[1].resource_type, None);
        assert_eq!(manifest.files[2].kind, FileKind::Deleted);
        assert_eq!(manifest.files[3].kind, FileKind::Error);
        assert_eq!(manifest.next.unwrap().as_str(), "https://ehr.example/status/1?page=2");
        assert_eq!(manifest.raw["somethingNew"], 42);
        let object_extension = br#"{"transactionTime":"2024-05-01T10:00:00Z","requiresAccessToken":false,"output":[],"extension":{"a":1}}"#;
        assert!(
            !Manifest::parse(object_extension, &source())
                .unwrap()
                .requires_access_token
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: &[(&[u8], &str)] = &[
            (b"<html>oops</html>", "(document)"),
            (br#"{"requiresAccessToken":true,"output":[]}"#, "transactionTime"),
            (br#"{"transactionTime":"yesterday","output":[]}"#, "transactionTime"),
            (br#"{"transactionTime":"2024-05-01T10:00:00Z","requiresAccessToken":"yes"}"#, "requiresAccessToken"),
            (br#"{"transactionTime":"2024-05-01T10:00:00Z","output":{}}"#, "output"),
            (br#"{"transactionTime":"2024-05-01T10:00:00Z","output":[{"type":"Patient","url":"/f/1"}]}"#, "output[0].url"),
            (br#"{"transactionTime":"2024-05-01T10:00:00Z","output":[{"type":"../../etc","url":"https://e/f"}]}"#, "output[0].type"),
            (br#"{"transactionTime":"2024-05-01T10:00:00Z","output":[{"type":"Patient","url":"https://e/f","count":-1}]}"#, "output[0].count"),
            (br#"{"transactionTime":"2024-05-01T10:00:00Z","output":[{"type":"Patient","url":"file:///etc/passwd"}]}"#, "output[0].url"),
        ];
        for (body, field) in cases {
            let error = Manifest::parse(body, &source()).unwrap_err();
            assert!(
                error.to_string().contains(&format!("`{field}`")),
                "{error} should name {field}"
            );
        }
    }
}
