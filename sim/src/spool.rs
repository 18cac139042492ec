//! Building an export: which patients and resources it holds (`_type`, `_since`/`_until`,
//! `_typeFilter`, `_elements`, `patient`, the Group), written to files on disk with their
//! length, SHA-256 and count. Faults that corrupt content are planted here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::population::{Population, write_resource};
use crate::{Faults, ServedFile};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Level {
    System,
    Patient,
    Group(String),
}

/// A validated kick-off.
#[derive(Debug, Clone)]
pub(crate) struct ExportParams {
    pub level: Level,
    pub types: Vec<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub elements: Vec<String>,
    /// (type, allowed status values); several filters for one type are OR'ed.
    pub type_filters: Vec<(String, Vec<String>)>,
    pub patients: Option<Vec<u32>>,
    pub organize_by_patient: bool,
    pub allow_partial: bool,
    /// Parameters ignored under `handling=lenient`, reported in the `error` file.
    pub ignored: Vec<String>,
    pub request_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Output,
    Deleted,
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

/// One file of an export and how to make it again (for the "file changed" fault).
#[derive(Debug, Clone)]
pub(crate) struct SpooledFile {
    pub index: usize,
    pub kind: FileKind,
    pub resource_type: Option<String>,
    /// Positions in the job's member list this file covers.
    pub members: std::ops::Range<usize>,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub count: u64,
    pub version: u32,
    pub last_modified: SystemTime,
    /// Which slice of the export it is; file `i` becomes ready at (i+1)/(n+1) of the job.
    pub ready_fraction: f64,
}

impl SpooledFile {
    pub fn etag(&self) -> String {
        format!("\"{}-v{}\"", &self.sha256[..16], self.version)
    }
}

#[derive(Debug)]
pub(crate) enum JobState {
    Building,
    Ready(Vec<SpooledFile>),
    Failed(String),
}

#[derive(Debug)]
pub(crate) struct Job {
    pub id: u64,
    pub client_id: String,
    pub created: tokio::time::Instant,
    pub transaction_time: i64,
    pub params: ExportParams,
    pub members: Vec<u32>,
    pub state: JobState,
    pub deleted: bool,
}

impl Job {
    pub fn served_files(&self) -> Vec<ServedFile> {
        match &self.state {
            JobState::Ready(files) => files
                .iter()
                .map(|f| ServedFile {
                    index: f.index,
                    kind: f.kind.as_str(),
                    resource_type: f.resource_type.clone(),
                    path: f.path.clone(),
                    bytes: f.bytes,
                    sha256: f.sha256.clone(),
                    count: f.count,
                    version: f.version,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// The patients a job covers, in order.
pub(crate) fn members(level: &Level, patients: u32, explicit: &Option<Vec<u32>>) -> Vec<u32> {
    let in_scope = |p: u32| match level {
        Level::Group(id) if id == "even" => p.is_multiple_of(2),
        _ => true,
    };
    match explicit {
        Some(list) => list.iter().copied().filter(|p| in_scope(*p)).collect(),
        None => (0..patients).filter(|p| in_scope(*p)).collect(),
    }
}

/// Groups this EHR has.
pub(crate) fn group_exists(id: &str) -> bool {
    matches!(id, "all" | "even")
}

struct Planted<'a> {
    faults: &'a Faults,
    /// Types whose first file has been written (faults go in the first file only).
    first_done: Vec<String>,
}

fn keep_for(elements: &[String], kind: &str) -> Option<Vec<String>> {
    if elements.is_empty() {
        return None;
    }
    let keep: Vec<String> = elements
        .iter()
        .filter_map(|e| match e.split_once('.') {
            Some((t, name)) if t == kind => Some(name.to_string()),
            Some(_) => None,
            None => Some(e.clone()),
        })
        .collect();
    (!keep.is_empty()).then_some(keep)
}

fn passes(params: &ExportParams, kind: &str, last_updated: i64, status: Option<&str>) -> bool {
    if params.since.is_some_and(|since| last_updated <= since)
        || params.until.is_some_and(|until| last_updated >= until)
    {
        return false;
    }
    let filters: Vec<&Vec<String>> = params
        .type_filters
        .iter()
        .filter(|(t, _)| t == kind)
        .map(|(_, v)| v)
        .collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|allowed| status.is_some_and(|s| allowed.iter().any(|a| a == s)))
}

/// Writes the lines of one file (output of `kind`, or organized-by-patient when `kind` is
/// `None`) for `members`, calling `line` for each.
fn render(
    population: &Population,
    params: &ExportParams,
    kind: Option<&str>,
    members: &[u32],
    version: u32,
    out: &mut dyn FnMut(&[u8]),
) {
    let mut buffer = Vec::with_capacity(2048);
    for &patient in members {
        match kind {
            Some(kind) => {
                let keep = keep_for(&params.elements, kind);
                for resource in population.resources(patient, kind) {
                    if passes(params, kind, resource.last_updated, resource.status) {
                        buffer.clear();
                        write_resource(&mut buffer, &resource, version, keep.as_deref());
                        out(&buffer);
                    }
                }
            }
            None => {
                buffer.clear();
                buffer.extend_from_slice(
                    format!(
                        "{{\"resourceType\":\"Parameters\",\"parameter\":[{{\"name\":\"header\",\"valueReference\":{{\"reference\":\"Patient/{}\"}}}}]}}\n",
                        Population::patient_id(patient)
                    )
                    .as_bytes(),
                );
                out(&buffer);
                for kind in &params.types {
                    let keep = keep_for(&params.elements, kind);
                    for resource in population.resources(patient, kind) {
                        if passes(params, kind, resource.last_updated, resource.status) {
                            buffer.clear();
                            write_resource(&mut buffer, &resource, version, keep.as_deref());
                            out(&buffer);
                        }
                    }
                }
            }
        }
    }
}

struct Written {
    bytes: u64,
    sha256: String,
    count: u64,
}

fn write_file(path: &Path, fill: impl FnOnce(&mut dyn FnMut(&[u8]))) -> std::io::Result<Written> {
    let file = std::fs::File::create(path)?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut count = 0u64;
    let mut failure = None;
    fill(&mut |line: &[u8]| {
        if failure.is_some() {
            return;
        }
        hasher.update(line);
        bytes += line.len() as u64;
        count += 1;
        if let Err(e) = writer.write_all(line) {
            failure = Some(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    writer.flush()?;
    writer.get_ref().sync_all()?;
    Ok(Written {
        bytes,
        sha256: hasher.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        count,
    })
}

/// Builds every file of a job. Runs on a blocking thread.
pub(crate) fn build(
    population: Population,
    params: &ExportParams,
    members: &[u32],
    dir: &Path,
    max_per_file: u64,
    faults: &Faults,
    now: SystemTime,
) -> std::io::Result<Vec<SpooledFile>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let mut planted = Planted {
        faults,
        first_done: Vec::new(),
    };
    let kinds: Vec<Option<String>> = if params.organize_by_patient {
        vec![None]
    } else {
        params.types.iter().cloned().map(Some).collect()
    };
    for kind in kinds {
        // Cut the member list into runs of about `max_per_file` resources.
        let mut start = 0;
        while start < members.len() {
            let mut end = start;
            let mut resources = 0u64;
            while end < members.len() && (resources < max_per_file || end == start) {
                let mut n = 0u64;
                render(
                    &population,
                    params,
                    kind.as_deref(),
                    &members[end..end + 1],
                    1,
                    &mut |_| n += 1,
                );
                resources += n;
                end += 1;
            }
            if resources > 0 {
                let index = files.len();
                let file = spool_one(
                    &population,
                    params,
                    &kind,
                    members,
                    start..end,
                    index,
                    dir,
                    1,
                    &mut planted,
                    now,
                )?;
                files.push(file);
                if let Some(kind) = &kind {
                    planted.first_done.push(kind.clone());
                }
            }
            start = end;
        }
    }
    if params.since.is_some() {
        let deleted: Vec<String> = members.iter().filter_map(|p| population.deleted_since(*p)).collect();
        if !deleted.is_empty() {
            let index = files.len();
            let path = dir.join(format!("{index}.ndjson"));
            let written = write_file(&path, |out| {
                for chunk in deleted.chunks(50) {
                    let entries: Vec<String> = chunk
                        .iter()
                        .map(|r| format!("{{\"request\":{{\"method\":\"DELETE\",\"url\":\"{r}\"}}}}"))
                        .collect();
                    out(format!(
                        "{{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[{}]}}\n",
                        entries.join(",")
                    )
                    .as_bytes());
                }
            })?;
            files.push(finish(
                index,
                FileKind::Deleted,
                Some("Bundle".into()),
                0..0,
                path,
                written,
                1,
                now,
            ));
        }
    }
    if !params.ignored.is_empty() || faults.unexported_resources > 0 {
        let index = files.len();
        let path = dir.join(format!("{index}.ndjson"));
        let written = write_file(&path, |out| {
            for ignored in &params.ignored {
                let text = ignored.replace('\\', "\\\\").replace('"', "\\\"");
                out(format!("{{\"resourceType\":\"OperationOutcome\",\"issue\":[{{\"severity\":\"warning\",\"code\":\"not-supported\",\"diagnostics\":\"{text}\"}}]}}\n").as_bytes());
            }
            for n in 1..=faults.unexported_resources {
                out(format!("{{\"resourceType\":\"OperationOutcome\",\"issue\":[{{\"severity\":\"error\",\"code\":\"processing\",\"diagnostics\":\"Observation/unreadable-{n} could not be exported\"}}]}}\n").as_bytes());
            }
        })?;
        files.push(finish(
            index,
            FileKind::Error,
            Some("OperationOutcome".into()),
            0..0,
            path,
            written,
            1,
            now,
        ));
    }
    let n = files.len() as f64;
    for (i, file) in files.iter_mut().enumerate() {
        file.ready_fraction = (i as f64 + 1.0) / (n + 1.0);
    }
    Ok(files)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    index: usize,
    kind: FileKind,
    resource_type: Option<String>,
    members: std::ops::Range<usize>,
    path: PathBuf,
    written: Written,
    version: u32,
    now: SystemTime,
) -> SpooledFile {
    SpooledFile {
        index,
        kind,
        resource_type,
        members,
        path,
        bytes: written.bytes,
        sha256: written.sha256,
        count: written.count,
        version,
        last_modified: now,
        ready_fraction: 1.0,
    }
}

#[allow(clippy::too_many_arguments)]
fn spool_one(
    population: &Population,
    params: &ExportParams,
    kind: &Option<String>,
    members: &[u32],
    range: std::ops::Range<usize>,
    index: usize,
    dir: &Path,
    version: u32,
    planted: &mut Planted<'_>,
    now: SystemTime,
) -> std::io::Result<SpooledFile> {
    let path = dir.join(format!("{index}.v{version}.ndjson"));
    let first_of_kind = kind.as_ref().is_some_and(|k| !planted.first_done.contains(k));
    let plant = |fault: &Option<(String, u64)>| -> Option<u64> {
        match (fault, kind) {
            (Some((t, line)), Some(k)) if t == k && first_of_kind => Some(*line),
            _ => None,
        }
    };
    let malformed_at = plant(&planted.faults.malformed_line);
    let wrong_type_at = plant(&planted.faults.wrong_type_line);
    let kind_name = kind.clone().unwrap_or_default();
    let written = write_file(&path, |out| {
        let mut line_number = 0u64;
        render(
            population,
            params,
            kind.as_deref(),
            &members[range.clone()],
            version,
            &mut |line| {
                line_number += 1;
                if malformed_at == Some(line_number) {
                    out(format!("{{\"resourceType\":\"{kind_name}\",\"id\":\"broken\",\"status\":\n").as_bytes());
                } else if wrong_type_at == Some(line_number) {
                    out(b"{\"resourceType\":\"Patient\",\"id\":\"intruder\"}\n");
                } else {
                    out(line);
                }
            },
        );
    })?;
    let resource_type = kind.clone();
    Ok(finish(
        index,
        FileKind::Output,
        resource_type,
        range,
        path,
        written,
        version,
        now,
    ))
}

/// Makes a new version of an output file (new `meta.versionId`, so new bytes and ETag).
pub(crate) fn respool(
    population: Population,
    params: &ExportParams,
    members: &[u32],
    dir: &Path,
    file: &SpooledFile,
    now: SystemTime,
) -> std::io::Result<SpooledFile> {
    let no_faults = Faults::default();
    let mut planted = Planted {
        faults: &no_faults,
        first_done: Vec::new(),
    };
    let mut next = spool_one(
        &population,
        params,
        &file.resource_type,
        members,
        file.members.clone(),
        file.index,
        dir,
        file.version + 1,
        &mut planted,
        now,
    )?;
    next.ready_fraction = file.ready_fraction;
    Ok(next)
}
