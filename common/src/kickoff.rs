//! Starting an export: the request model, its validation, building the GET or POST, and the
//! kick-off exchange (202 + `Content-Location`, bounded retries on 429/503).

use std::time::Duration;

use http::Method;
use http::header::{ACCEPT, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use crate::client::{Auth, FhirClient};
use crate::error::{Error, Result};
use crate::fhir::{format_instant, parse_instant};
use crate::http::HttpRequest;
use crate::url_util::{SafeUrl, join_path};

/// Which population to export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum ExportLevel {
    /// `[base]/$export`
    System,
    /// `[base]/Patient/$export`
    #[default]
    Patient,
    /// `[base]/Group/[id]/$export`
    Group(String),
}

/// GET with query parameters, or POST with a `Parameters` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KickoffMethod {
    /// GET, unless the request needs POST (`patient`).
    #[default]
    Auto,
    Get,
    Post,
}

/// How several values of one parameter are sent. Some EHRs reject one form; STU4 forbids
/// comma-joining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ValueJoin {
    /// `_type=Patient,Observation`
    #[default]
    Comma,
    /// `_type=Patient&_type=Observation`
    Repeat,
}

/// What a given EHR accepts, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServerProfile {
    pub method: KickoffMethod,
    pub value_join: ValueJoin,
    /// Send `Prefer: handling=lenient` (ignore unsupported parameters instead of failing).
    pub lenient: bool,
}

/// One export's parameters, as the Bulk Data IG names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExportRequest {
    pub level: ExportLevel,
    pub output_format: Option<String>,
    /// FHIR instant (timezone required).
    pub since: Option<String>,
    /// FHIR instant (timezone required). STU3.
    pub until: Option<String>,
    pub types: Vec<String>,
    pub elements: Vec<String>,
    /// Each `Type?search` filter, not URL-encoded.
    pub type_filters: Vec<String>,
    /// Patient references (`Patient/123`). POST only; not at system level.
    pub patients: Vec<String>,
    pub include_associated_data: Vec<String>,
    /// STU3 `organizeOutputBy` (e.g. `Patient`).
    pub organize_output_by: Option<String>,
    /// STU3 `allowPartialManifests`.
    pub allow_partial_manifests: bool,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidRequest { reason: reason.into() }
}

fn is_type_name(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

impl ExportRequest {
    /// Checks everything that can be checked before talking to the EHR.
    pub fn validate(&self, profile: &ServerProfile) -> Result<()> {
        if let ExportLevel::Group(id) = &self.level
            && (id.is_empty()
                || id.len() > 64
                || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            return Err(invalid(format!(
                "group id `{id}` is not a FHIR id (1-64 of A-Z a-z 0-9 - .)"
            )));
        }
        if !self.patients.is_empty() {
            if self.level == ExportLevel::System {
                return Err(invalid(
                    "`patient` is not allowed at system level; use Patient or Group",
                ));
            }
            if profile.method == KickoffMethod::Get {
                return Err(invalid(
                    "`patient` can only be sent with POST, but the server profile says GET",
                ));
            }
            for patient in &self.patients {
                if !patient.starts_with("Patient/") || patient.len() <= "Patient/".len() {
                    return Err(invalid(format!(
                        "patient `{patient}` is not a reference like `Patient/123`"
                    )));
                }
            }
        }
        let since = self.instant("since", &self.since)?;
        let until = self.instant("until", &self.until)?;
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(invalid("`since` must be before `until`"));
        }
        for kind in &self.types {
            if !is_type_name(kind) {
                return Err(invalid(format!("`{kind}` in types is not a FHIR resource type name")));
            }
        }
        for filter in &self.type_filters {
            match filter.split_once('?') {
                Some((kind, query)) if is_type_name(kind) && !query.is_empty() => {}
                _ => {
                    return Err(invalid(format!(
                        "type filter `{filter}` is not of the form `Type?search`"
                    )));
                }
            }
        }
        for element in &self.elements {
            if element.is_empty() || element.contains(',') {
                return Err(invalid(format!(
                    "element `{element}` is not `Type.element` or `element`"
                )));
            }
        }
        Ok(())
    }

    fn instant(&self, name: &str, value: &Option<String>) -> Result<Option<time::OffsetDateTime>> {
        match value {
            None => Ok(None),
            Some(text) => parse_instant(text).map(Some).ok_or_else(|| {
                invalid(format!(
                    "`{name}` `{text}` is not a FHIR instant with a timezone (e.g. 2024-01-31T00:00:00Z)"
                ))
            }),
        }
    }

    fn uses_post(&self, profile: &ServerProfile) -> bool {
        match profile.method {
            KickoffMethod::Post => true,
            KickoffMethod::Get => false,
            KickoffMethod::Auto => !self.patients.is_empty(),
        }
    }

    /// The kick-off URL for this level.
    pub fn url(&self, base: &Url) -> Url {
        match &self.level {
            ExportLevel::System => join_path(base, &["$export"]),
            ExportLevel::Patient => join_path(base, &["Patient", "$export"]),
            ExportLevel::Group(id) => join_path(base, &["Group", id, "$export"]),
        }
    }

    /// (name, values, FHIR type) for every parameter that is set. `_typeFilter` and
    /// `patient` are always one value per parameter.
    fn parameters(&self, join: ValueJoin) -> Vec<(&'static str, Vec<String>, &'static str)> {
        let mut out = Vec::new();
        let mut push_list = |name: &'static str, values: &[String], kind: &'static str, joinable: bool| {
            if values.is_empty() {
                return;
            }
            if joinable && join == ValueJoin::Comma {
                out.push((name, vec![values.join(",")], kind));
            } else {
                out.push((name, values.to_vec(), kind));
            }
        };
        if let Some(format) = &self.output_format {
            push_list("_outputFormat", std::slice::from_ref(format), "valueString", false);
        }
        let normalise = |v: &Option<String>| v.as_deref().and_then(parse_instant).map(format_instant);
        if let Some(since) = normalise(&self.since) {
            push_list("_since", &[since], "valueInstant", false);
        }
        if let Some(until) = normalise(&self.until) {
            push_list("_until", &[until], "valueInstant", false);
        }
        push_list("_type", &self.types, "valueString", true);
        push_list("_elements", &self.elements, "valueString", true);
        push_list("_typeFilter", &self.type_filters, "valueString", false);
        push_list(
            "includeAssociatedData",
            &self.include_associated_data,
            "valueCode",
            true,
        );
        if let Some(organize) = &self.organize_output_by {
            push_list("organizeOutputBy", std::slice::from_ref(organize), "valueString", false);
        }
        if self.allow_partial_manifests {
            push_list("allowPartialManifests", &["true".to_string()], "valueBoolean", false);
        }
        let patients: Vec<String> = self.patients.clone();
        push_list("patient", &patients, "valueReference", false);
        out
    }

    /// Builds the kick-off HTTP request (without the token).
    pub fn build(&self, base: &Url, profile: &ServerProfile) -> Result<HttpRequest> {
        self.validate(profile)?;
        let mut url = self.url(base);
        let parameters = self.parameters(profile.value_join);
        let prefer = if profile.lenient {
            "respond-async, handling=lenient"
        } else {
            "respond-async"
        };
        if self.uses_post(profile) {
            let mut entries = Vec::new();
            for (name, values, kind) in parameters {
                for value in values {
                    let typed = match kind {
                        "valueReference" => json!({ "reference": value }),
                        "valueBoolean" => Value::Bool(value == "true"),
                        _ => Value::String(value),
                    };
                    let mut entry = serde_json::Map::new();
                    entry.insert("name".into(), Value::String(name.into()));
                    entry.insert(kind.into(), typed);
                    entries.push(Value::Object(entry));
                }
            }
            let body = json!({ "resourceType": "Parameters", "parameter": entries });
            return Ok(HttpRequest::new(Method::POST, url)
                .header(ACCEPT, "application/fhir+json")
                .header(http::header::HeaderName::from_static("prefer"), prefer)
                .header(CONTENT_TYPE, "application/fhir+json")
                .body(body.to_string()));
        }
        {
            let mut query = url.query_pairs_mut();
            for (name, values, _) in &parameters {
                for value in values {
                    query.append_pair(name, value);
                }
            }
        }
        if parameters.is_empty() {
            url.set_query(None);
        }
        Ok(HttpRequest::new(Method::GET, url)
            .header(ACCEPT, "application/fhir+json")
            .header(http::header::HeaderName::from_static("prefer"), prefer))
    }
}

/// The EHR accepted the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Where to poll (`Content-Location`, resolved against the kick-off URL).
    pub status_url: Url,
}

/// Kicks off an export. 429 and 503 wait (`Retry-After`, else backoff) and retry up to
/// `max_attempts` in all; any other failure is returned with the EHR's words.
/// When a kick-off is sent again.
#[derive(Debug, Clone, Copy)]
pub struct KickoffRetries {
    /// Attempts while the EHR cannot be reached, or throttles without saying for how long.
    pub max_attempts: u32,
    /// Send again after the connection broke once the request was sent (see
    /// [`Error::AmbiguousKickoff`]).
    pub retry_ambiguous: bool,
    /// Throttling with a `Retry-After` is waited out and never counts as an attempt; this
    /// bounds the whole wait (the export's deadline).
    pub throttled_at_most: Duration,
}

/// Sends the kick-off, retrying while the EHR throttles and while the request provably
/// never left (`Error::Unsent`). A connection that broke after the request was sent is
/// [`Error::AmbiguousKickoff`] (the EHR may hold an export nobody will poll) unless
/// `retries.retry_ambiguous` says to send it again anyway.
pub async fn kick_off(
    client: &FhirClient,
    request: &ExportRequest,
    profile: &ServerProfile,
    retries: KickoffRetries,
    backoff: &mut crate::retry::Backoff,
) -> Result<Accepted> {
    let http_request = request.build(client.base(), profile)?;
    let (max_attempts, retry_ambiguous) = (retries.max_attempts, retries.retry_ambiguous);
    let started = client.clock().now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let response = client.send(http_request.clone(), Auth::Bearer).await;
        let response = match response {
            Ok(response) => response,
            // Never sent: sending again cannot start a second export.
            Err(error @ Error::Unsent { .. }) if attempt < max_attempts => {
                let delay = backoff.next_delay(None);
                tracing::warn!(%error, attempt, delay_s = delay.as_secs_f64(), "kick-off could not reach the EHR; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
            // Sent, and then the connection broke: the EHR may have accepted it. Sending it
            // again could start a second export, so only an explicit setting does.
            Err(Error::Network { url, message }) if retry_ambiguous && attempt < max_attempts => {
                let delay = backoff.next_delay(None);
                tracing::warn!(%url, %message, attempt, delay_s = delay.as_secs_f64(), "kick-off connection broke after sending; retrying as configured (the EHR may hold an orphan export)");
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(Error::Network { url, message }) => {
                return Err(Error::AmbiguousKickoff { url, message });
            }
            Err(error) => return Err(error),
        };
        let url = SafeUrl::from(&response.url);
        match response.status.as_u16() {
            202 => {
                let location = response.header_str("content-location").ok_or_else(|| Error::Protocol {
                    url: url.clone(),
                    reason: "kick-off answered 202 without a Content-Location header".into(),
                })?;
                let status_url = response.url.join(location).map_err(|e| Error::Protocol {
                    url: url.clone(),
                    reason: format!("kick-off Content-Location `{location}` is not a URL: {e}"),
                })?;
                tracing::info!(status_url = %SafeUrl::from(&status_url), "export accepted");
                return Ok(Accepted { status_url });
            }
            200 => {
                return Err(Error::Protocol {
                    url,
                    reason: "kick-off answered 200; Bulk Data requires 202 Accepted with a Content-Location (is `Prefer: respond-async` being stripped by a proxy?)".into(),
                });
            }
            status if (200..300).contains(&status) => {
                return Err(Error::Protocol {
                    url,
                    reason: format!("kick-off answered {status}; expected 202 Accepted"),
                });
            }
            _ => {
                let error = client.error_from(response).await;
                let throttled_for = client.clock().now().duration_since(started).unwrap_or_default();
                match &error {
                    // The EHR says when to come back: wait, and do not count it.
                    Error::Throttled {
                        retry_after: Some(_), ..
                    } if throttled_for < retries.throttled_at_most => {
                        attempt -= 1;
                    }
                    Error::Throttled { retry_after: None, .. } if attempt < max_attempts => {}
                    _ => return Err(error),
                }
                let delay = backoff.next_delay(error.retry_after());
                tracing::warn!(%error, attempt, wait_s = delay.as_secs_f64(), "kick-off throttled; waiting");
                tokio::time::sleep(delay).await;
                continue;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://ehr.example/r4/t1").unwrap()
    }

    fn query(request: &HttpRequest) -> Vec<(String, String)> {
        request
            .url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn urls_for_each_level_keep_the_base_path() {
        let mut request = ExportRequest {
            level: ExportLevel::System,
            ..Default::default()
        };
        assert_eq!(request.url(&base()).as_str(), "https://ehr.example/r4/t1/$export");
        request.level = ExportLevel::Patient;
        assert_eq!(
            request.url(&base()).as_str(),
            "https://ehr.example/r4/t1/Patient/$export"
        );
        request.level = ExportLevel::Group("g-1.a".into());
        assert_eq!(
            request.url(&base()).as_str(),
            "https://ehr.example/r4/t1/Group/g-1.a/$export"
        );
    }

    #[test]
    fn get_encodes_every_parameter_once() {
        let request = ExportRequest {
            level: ExportLevel::Patient,
            output_format: Some("application/fhir+ndjson".into()),
            since: Some("2024-01-01T00:00:00+01:00".into()),
            until: Some("2024-06-01T00:00:00Z".into()),
            types: vec!["Patient".into(), "Observation".into()],
            elements: vec!["Observation.code".into()],
            type_filters: vec!["Observation?status=final&code=http://loinc.org|1234-5".into()],
            include_associated_data: vec!["LatestProvenanceResources".into()],
            ..Default::default()
        };
        let built = request.build(&base(), &ServerProfile::default()).unwrap();
        assert_eq!(built.method, Method::GET);
        assert_eq!(built.headers["accept"], "application/fhir+json");
        assert_eq!(built.headers["prefer"], "respond-async");
        let pairs = query(&built);
        assert!(pairs.contains(&("_since".into(), "2023-12-31T23:00:00Z".into())));
        assert!(pairs.contains(&("_type".into(), "Patient,Observation".into())));
        assert!(pairs.contains(&(
            "_typeFilter".into(),
            "Observation?status=final&code=http://loinc.org|1234-5".into()
        )));
        assert!(
            built
                .url
                .as_str()
                .contains("_typeFilter=Observation%3Fstatus%3Dfinal%26code%3Dhttp%3A%2F%2Floinc.org%7C1234-5")
        );
    }

    #[test]
    fn repeat_mode_repeats_and_lenient_adds_the_preference() {
        let request = ExportRequest {
            types: vec!["Patient".into(), "Condition".into()],
            ..Default::default()
        };
        let profile = ServerProfile {
            value_join: ValueJoin::Repeat,
            lenient: true,
            ..Default::default()
        };
        let built = request.build(&base(), &profile).unwrap();
        let types: Vec<_> = query(&built).into_iter().filter(|(k, _)| k == "_type").collect();
        assert_eq!(types.len(), 2);
        assert_eq!(built.headers["prefer"], "respond-async, handling=lenient");
    }

    #[test]
    fn patient_forces_post_with_value_references() {
        let request = ExportRequest {
            level: ExportLevel::Group("all".into()),
            types: vec!["Patient".into()],
            patients: vec!["Patient/1".into(), "Patient/2".into()],
            allow_partial_manifests: true,
            ..Default::default()
        };
        let built = request.build(&base(), &ServerProfile::default()).unwrap();
        assert_eq!(built.method, Method::POST);
        assert_eq!(built.headers["content-type"], "application/fhir+json");
        let body: Value = serde_json::from_slice(&built.body).unwrap();
        assert_eq!(body["resourceType"], "Parameters");
        let parameters = body["parameter"].as_array().unwrap();
        let patients: Vec<_> = parameters.iter().filter(|p| p["name"] == "patient").collect();
        assert_eq!(patients.len(), 2);
        assert_eq!(patients[0]["valueReference"]["reference"], "Patient/1");
        assert!(
            parameters
                .iter()
                .any(|p| p["name"] == "allowPartialManifests" && p["valueBoolean"] == true)
        );
        assert!(built.url.query().is_none());
    }

    #[test]
    fn bad_requests_are_named() {
        let system_patient = ExportRequest {
            level: ExportLevel::System,
            patients: vec!["Patient/1".into()],
            ..Default::default()
        };
        let error = system_patient.build(&base(), &ServerProfile::default()).unwrap_err();
        assert!(error.to_string().contains("`patient` is not allowed at system level"));
        let get_patient = ExportRequest {
            patients: vec!["Patient/1".into()],
            ..Default::default()
        };
        let profile = ServerProfile {
            method: KickoffMethod::Get,
            ..Default::default()
        };
        assert!(
            get_patient
                .build(&base(), &profile)
                .unwrap_err()
                .to_string()
                .contains("only be sent with POST")
        );
        let no_zone = ExportRequest {
            since: Some("2024-01-01T00:00:00".into()),
            ..Default::default()
        };
        assert!(
            no_zone
                .validate(&ServerProfile::default())
                .unwrap_err()
                .to_string()
                .contains("`since`")
        );
        let bad_type = ExportRequest {
            types: vec!["../etc".into()],
            ..Default::default()
        };
        assert!(bad_type.validate(&ServerProfile::default()).is_err());
        let bad_group = ExportRequest {
            level: ExportLevel::Group("a/b".into()),
            ..Default::default()
        };
        assert!(bad_group.validate(&ServerProfile::default()).is_err());
    }
}
