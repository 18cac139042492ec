//! NDJSON line checking, sans I/O: bytes go in as they arrive, whole validated lines come
//! out to a sink, a partial line waits for the rest. Lines are passed on byte-for-byte
//! (`\r\n`, blank lines and all) so the saved file is exactly what the server sent.
//!
//! Each non-blank line must be UTF-8, one JSON object, whose `resourceType` fits the
//! manifest entry: the entry's `type` for output, a transaction `Bundle` for `deleted`, an
//! `OperationOutcome` for `error`. Only `resourceType` (and a Bundle's `type`) are kept while
//! parsing; everything else is checked for syntax and skipped, so memory stays flat.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::manifest::{FileKind, ManifestFile};

/// What each line of a file must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Resources of this type.
    Type(String),
    /// Any resource (`organizeOutputBy` output mixes types and `Parameters` headers).
    AnyResource,
    /// Transaction Bundles (a manifest's `deleted` files).
    DeletedBundle,
    /// OperationOutcome resources (a manifest's `error` files).
    OperationOutcome,
}

impl Expect {
    pub fn for_file(file: &ManifestFile) -> Self {
        match (file.kind, &file.resource_type) {
            (FileKind::Output, Some(kind)) => Expect::Type(kind.clone()),
            (FileKind::Output, None) => Expect::AnyResource,
            (FileKind::Deleted, _) => Expect::DeletedBundle,
            (FileKind::Error, _) => Expect::OperationOutcome,
        }
    }
}

/// A line that is not what the manifest promised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based physical line number (blank lines count).
    pub line: u64,
    pub reason: String,
}

/// Why feeding stopped.
#[derive(Debug)]
pub enum FeedError {
    Line(LineError),
    Sink(std::io::Error),
}

impl From<std::io::Error> for FeedError {
    fn from(error: std::io::Error) -> Self {
        FeedError::Sink(error)
    }
}

/// The checker for one file.
#[derive(Debug)]
pub struct LineChecker {
    expect: Expect,
    max_line_bytes: usize,
    partial: Vec<u8>,
    lines: u64,
    resources: u64,
    outcome_issues: Vec<String>,
    /// OperationOutcomes (in an `error` file) that report an error or a fatal issue.
    outcome_errors: u64,
}

const MAX_KEPT_ISSUES: usize = 50;

impl LineChecker {
    pub fn new(expect: Expect, max_line_bytes: usize) -> Self {
        LineChecker {
            expect,
            max_line_bytes,
            partial: Vec::new(),
            lines: 0,
            resources: 0,
            outcome_issues: Vec::new(),
            outcome_errors: 0,
        }
    }

    /// Resources (non-blank lines) accepted so far.
    pub fn resources(&self) -> u64 {
        self.resources
    }

    /// Physical lines (blank ones included) accepted so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// The bytes of a line still waiting for its newline.
    pub fn pending_bytes(&self) -> usize {
        self.partial.len()
    }

    /// For `error` files: the issues read, in the EHR's words (the first 50).
    pub fn outcome_issues(&self) -> &[String] {
        &self.outcome_issues
    }

    /// OperationOutcomes checked so far whose issues include an error or a fatal one.
    pub fn outcome_errors(&self) -> u64 {
        self.outcome_errors
    }

    /// Whether this checker reads OperationOutcomes (an `error` file), whose counts and
    /// issues a resume must read again from the kept part of the file.
    pub fn reads_outcomes(&self) -> bool {
        self.expect == Expect::OperationOutcome
    }

    /// Restores counts when resuming a file whose first `lines` lines were checked before.
    pub fn resume_from(&mut self, lines: u64, resources: u64) {
        self.lines = lines;
        self.resources = resources;
        self.partial.clear();
    }

    /// Drops a line that was cut mid-way (the connection broke); the resume starts at its
    /// first byte.
    pub fn discard_partial(&mut self) {
        self.partial.clear();
    }

    /// Checks `data`, passing every whole, valid line to `sink` in order.
    pub fn feed(&mut self, data: &[u8], sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> Result<(), FeedError> {
        let mut rest = data;
        if !self.partial.is_empty() {
            match memchr::memchr(b'\n', rest) {
                None => {
                    self.keep_partial(rest)?;
                    return Ok(());
                }
                Some(newline) => {
                    self.keep_partial(&rest[..=newline])?;
                    let line = std::mem::take(&mut self.partial);
                    self.check(&line)?;
                    sink(&line)?;
                    self.partial = line;
                    self.partial.clear();
                    rest = &rest[newline + 1..];
                }
            }
        }
        let mut consumed = 0;
        for newline in memchr::memchr_iter(b'\n', rest) {
            self.check(&rest[consumed..=newline])?;
            consumed = newline + 1;
        }
        if consumed > 0 {
            sink(&rest[..consumed])?;
        }
        self.keep_partial(&rest[consumed..])?;
        Ok(())
    }

    /// The body ended: a last line without a final newline is checked and passed on.
    pub fn finish(&mut self, sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> Result<(), FeedError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.partial);
        self.check(&line)?;
        sink(&line)?;
        Ok(())
    }

    fn keep_partial(&mut self, bytes: &[u8]) -> Result<(), FeedError> {
        if self.partial.len() + bytes.len() > self.max_line_bytes {
            return Err(FeedError::Line(LineError {
                line: self.lines + 1,
                reason: format!("is longer than {} bytes (the configured limit)", self.max_line_bytes),
            }));
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    fn check(&mut self, raw: &[u8]) -> Result<(), FeedError> {
        self.lines += 1;
        let line_number = self.lines;
        let fail = |reason: String| {
            FeedError::Line(LineError {
                line: line_number,
                reason,
            })
        };
        let mut line = raw.strip_suffix(b"\n").unwrap_or(raw);
        line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if line.starts_with(b"\xEF\xBB\xBF") {
            return Err(fail(
                "starts with a UTF-8 byte order mark, which NDJSON does not allow".into(),
            ));
        }
        if let Err(e) = std::str::from_utf8(line) {
            return Err(fail(format!("is not valid UTF-8 (at byte {})", e.valid_up_to())));
        }
        if line.first() == Some(&b'<') {
            return Err(fail(format!(
                "looks like HTML, not NDJSON: {:?}",
                String::from_utf8_lossy(&line[..line.len().min(60)])
            )));
        }
        let wants_bundle_type = self.expect == Expect::DeletedBundle;
        let head = Head::parse(line, wants_bundle_type).map_err(|e| fail(format!("is not a JSON object: {e}")))?;
        let Some(resource_type) = head.resource_type else {
            return Err(fail("has no `resourceType`".into()));
        };
        match &self.expect {
            Expect::Type(expected) if &resource_type != expected => {
                return Err(fail(format!(
                    "is a {resource_type} resource in a file the manifest says holds {expected}"
                )));
            }
            Expect::DeletedBundle
                if resource_type != "Bundle" || head.bundle_type.as_deref() != Some("transaction") =>
            {
                return Err(fail(format!(
                    "is a {resource_type} (type {:?}) in a `deleted` file, which must hold transaction Bundles",
                    head.bundle_type.as_deref().unwrap_or("none")
                )));
            }
            Expect::OperationOutcome => {
                if resource_type != "OperationOutcome" {
                    return Err(fail(format!(
                        "is a {resource_type} in an `error` file, which must hold OperationOutcomes"
                    )));
                }
                if crate::fhir::reports_an_error(line) {
                    self.outcome_errors += 1;
                }
                if self.outcome_issues.len() < MAX_KEPT_ISSUES
                    && let Some(message) = crate::fhir::EhrMessage::from_operation_outcome(line)
                {
                    self.outcome_issues.push(message.text);
                }
            }
            _ => {}
        }
        self.resources += 1;
        Ok(())
    }
}

/// The members of a resource the checker needs.
struct Head {
    resource_type: Option<String>,
    bundle_type: Option<String>,
}

impl Head {
    fn parse(line: &[u8], wants_bundle_type: bool) -> Result<Head, serde_json::Error> {
        let mut deserializer = serde_json::Deserializer::from_slice(line);
        let head = deserializer.deserialize_any(HeadVisitor { wants_bundle_type })?;
        deserializer.end()?;
        Ok(head)
    }
}

struct HeadVisitor {
    wants_bundle_type: bool,
}

enum Key {
    ResourceType,
    Type,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "resourceType" => Key::ResourceType,
                    "type" => Key::Type,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
        let mut head = Head {
            resource_type: None,
            bundle_type: None,
        };
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::ResourceType => {
                    if head.resource_type.is_some() {
                        return Err(de::Error::custom("`resourceType` appears twice"));
                    }
                    head.resource_type = Some(map.next_value::<String>()?);
                }
                Key::Type if self.wants_bundle_type => {
                    head.bundle_type = map.next_value::<serde_json::Value>()?.as_str().map(str::to_owned);
                }
                Key::Type | Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(expect: Expect, chunks: &[&[u8]]) -> (Result<(), FeedError>, Vec<u8>, LineChecker) {
        let mut checker = LineChecker::new(expect, 1024);
        let mut out = Vec::new();
        let mut sink = |bytes: &[u8]| {
            out.extend_from_slice(bytes);
            Ok(())
        };
        for chunk in chunks {
            if let Err(e) = checker.feed(chunk, &mut sink) {
                return (Err(e), out, checker);
            }
        }
        let result = checker.finish(&mut sink);
        (result, out, checker)
    }

    fn line_error(result: Result<(), FeedError>) -> LineError {
        match result {
            Err(FeedError::Line(e)) => e,
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn crlf_blank_lines_and_missing_final_newline_pass_through_unchanged() {
        let data: &[u8] =
            b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\r\n\n{\"resourceType\":\"Patient\",\"id\":\"2\"}";
        // Split at every position to prove chunk boundaries never matter.
        for split in 0..data.len() {
            let (result, out, checker) = run(Expect::Type("Patient".into()), &[&data[..split], &data[split..]]);
            result.unwrap();
            assert_eq!(out, data);
            assert_eq!(checker.resources(), 2);
            assert_eq!(checker.lines(), 3);
        }
    }

    #[test]
    fn zero_line_file_is_fine() {
        let (result, out, checker) = run(Expect::Type("Patient".into()), &[b""]);
        result.unwrap();
        assert!(out.is_empty());
        assert_eq!(checker.resources(), 0);
    }

    #[test]
    fn wrong_type_is_reported_with_its_line_number() {
        let data: &[u8] = b"{\"resourceType\":\"Observation\"}\n\n{\"resourceType\":\"Patient\"}\n";
        let (result, out, _) = run(Expect::Type("Observation".into()), &[data]);
        let error = line_error(result);
        assert_eq!(error.line, 3);
        assert_eq!(
            error.reason,
            "is a Patient resource in a file the manifest says holds Observation"
        );
        assert!(out.is_empty() || out == b"{\"resourceType\":\"Observation\"}\n\n");
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"resourceType\":\"Patient\"\n", "is not a JSON object"),
            (b"[1,2]\n", "is not a JSON object"),
            (b"{\"id\":\"1\"}\n", "has no `resourceType`"),
            (b"\xEF\xBB\xBF{\"resourceType\":\"Patient\"}\n", "byte order mark"),
            (b"{\"resourceType\":\"Patient\",\"x\":\"\xff\"}\n", "not valid UTF-8"),
            (b"<html><body>Gateway Timeout</body></html>\n", "looks like HTML"),
            (b"{\"resourceType\":\"Patient\"} {}\n", "is not a JSON object"),
            (
                b"{\"resourceType\":\"Patient\",\"resourceType\":\"Patient\"}\n",
                "appears twice",
            ),
        ];
        for (data, expected) in cases {
            let error = line_error(run(Expect::Type("Patient".into()), &[data]).0);
            assert_eq!(error.line, 1);
            assert!(
                error.reason.contains(expected),
                "{} should contain {expected}",
                error.reason
            );
        }
    }

    #[test]
    fn overlong_line_is_refused_without_buffering_it_all() {
        let long = vec![b'a'; 2000];
        let error = line_error(run(Expect::AnyResource, &[&long]).0);
        assert!(error.reason.contains("longer than 1024 bytes"));
    }

    #[test]
    fn deleted_and_error_files_have_their_own_rules() {
        let bundle: &[u8] = b"{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[{\"request\":{\"method\":\"DELETE\",\"url\":\"Patient/1\"}}]}\n";
        run(Expect::DeletedBundle, &[bundle]).0.unwrap();
        let not_transaction: &[u8] = b"{\"resourceType\":\"Bundle\",\"type\":\"searchset\"}\n";
        assert!(
            line_error(run(Expect::DeletedBundle, &[not_transaction]).0)
                .reason
                .contains("transaction")
        );
        let outcome: &[u8] = b"{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"error\",\"code\":\"processing\",\"diagnostics\":\"Patient/9 could not be read\"}]}\n";
        let (result, _, checker) = run(Expect::OperationOutcome, &[outcome]);
        result.unwrap();
        assert_eq!(
            checker.outcome_issues(),
            ["error processing: Patient/9 could not be read"]
        );
        assert_eq!(checker.outcome_errors(), 1);
        let warning: &[u8] = b"{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"warning\",\"code\":\"informational\",\"diagnostics\":\"2 codes unmapped\"}]}\n";
        let (result, _, checker) = run(Expect::OperationOutcome, &[warning, outcome, outcome]);
        result.unwrap();
        assert_eq!(checker.outcome_errors(), 2, "warnings are not errors");
        // A CodeableConcept `type` on an ordinary resource is skipped, not misread.
        let encounter: &[u8] = b"{\"resourceType\":\"Encounter\",\"type\":[{\"text\":\"x\"}]}\n";
        run(Expect::Type("Encounter".into()), &[encounter]).0.unwrap();
    }

    #[test]
    fn cut_line_is_discarded_and_resumed() {
        let mut checker = LineChecker::new(Expect::AnyResource, 1024);
        let mut out = Vec::new();
        let mut sink = |bytes: &[u8]| {
            out.extend_from_slice(bytes);
            Ok(())
        };
        checker
            .feed(b"{\"resourceType\":\"A\"}\n{\"resourceType\":\"B", &mut sink)
            .unwrap();
        assert_eq!(checker.pending_bytes(), 18);
        checker.discard_partial();
        checker.feed(b"{\"resourceType\":\"B\"}\n", &mut sink).unwrap();
        checker.finish(&mut sink).unwrap();
        assert_eq!(out, b"{\"resourceType\":\"A\"}\n{\"resourceType\":\"B\"}\n");
        assert_eq!(checker.resources(), 2);
    }
}
