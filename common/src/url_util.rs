//! URL helpers: origins, joining onto a FHIR base, and a display form safe for logs.

use std::fmt;

use url::Url;

/// A URL for errors and logs: the query string is dropped (signed storage URLs carry
/// credentials there), user info is dropped, the rest is kept so the operator can find it.
#[derive(Clone, PartialEq, Eq)]
pub struct SafeUrl(String);

impl SafeUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&Url> for SafeUrl {
    fn from(url: &Url) -> Self {
        let mut shown = url.clone();
        let had_query = shown.query().is_some();
        shown.set_query(None);
        shown.set_fragment(None);
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        let mut text = shown.to_string();
        if had_query {
            text.push_str("?…");
        }
        SafeUrl(text)
    }
}

impl From<&str> for SafeUrl {
    fn from(text: &str) -> Self {
        match Url::parse(text) {
            Ok(url) => SafeUrl::from(&url),
            Err(_) => SafeUrl(text.split('?').next().unwrap_or_default().to_string()),
        }
    }
}

impl fmt::Display for SafeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SafeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Whether two URLs share scheme, host and port.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// `base` + `/` + `segments`, keeping whatever path the base has (`https://x/r4/t1` +
/// `Patient/$export` is `https://x/r4/t1/Patient/$export`). Each segment is path-escaped.
pub fn join_path(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty();
        for segment in segments {
            path.push(segment);
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_url_hides_query_and_credentials() {
        let url = Url::parse("https://user:pw@store.example/bucket/f.ndjson?X-Amz-Signature=abc").unwrap();
        let shown = SafeUrl::from(&url).to_string();
        assert_eq!(shown, "https://store.example/bucket/f.ndjson?…");
    }

    #[test]
    fn join_keeps_base_path_and_escapes_segments() {
        let base = Url::parse("https://ehr.example/r4/tenant-1/").unwrap();
        let url = join_path(&base, &["Group", "a b/c", "$export"]);
        assert_eq!(url.as_str(), "https://ehr.example/r4/tenant-1/Group/a%20b%2Fc/$export");
        let base = Url::parse("https://ehr.example/r4").unwrap();
        assert_eq!(
            join_path(&base, &[".well-known", "smart-configuration"]).as_str(),
            "https://ehr.example/r4/.well-known/smart-configuration"
        );
    }

    #[test]
    fn origins_compare_scheme_host_port() {
        let a = Url::parse("https://ehr.example/fhir").unwrap();
        assert!(same_origin(&a, &Url::parse("https://ehr.example/files/1").unwrap()));
        assert!(!same_origin(&a, &Url::parse("https://ehr.example:8443/x").unwrap()));
        assert!(!same_origin(&a, &Url::parse("http://ehr.example/x").unwrap()));
        assert!(!same_origin(&a, &Url::parse("https://storage.example/x").unwrap()));
    }
}
