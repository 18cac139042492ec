//! Renewing expired file links. A manifest's links may stop working at its `Expires`; the
//! spec lets a client ask the status URL again for a fresh manifest. A worker whose link
//! fails near that time asks the leader ([`renew_link`]), which GETs the status URL (every
//! page), matches each file of the job to its new link ([`match_links`], pure), commits the
//! new links for every file not yet done, and answers the worker's file's link. A worker
//! whose link was already renewed by another's request gets it without a new request:
//! renewals of one job run one at a time, so links that expire together cost the EHR one
//! fresh manifest, not one per worker.

use std::collections::BTreeMap;

use fhirhaul_common::manifest::{FileKind, ManifestFile};
use fhirhaul_common::status::{PollStep, fetch_manifest_page, poll_once};
use fhirhaul_common::url_util::SafeUrl;

use crate::error::CoordinatorError;
use crate::node::Coordinator;
use crate::state::{Command, FileList, FilePhase, Refusal};
use fhirhaul_common::clock::unix_ms;

/// A file's place in a manifest: its list, its type, and how many files of that list and
/// type come before it. Servers keep manifest order from one answer to the next, so the
/// place, not the URL (which is what changed), identifies the file.
type Place = (FileKind, Option<String>, usize);

fn places<'a>(files: impl Iterator<Item = (FileKind, Option<&'a str>)>) -> Vec<Place> {
    let mut seen: BTreeMap<(FileKind, Option<&str>), usize> = BTreeMap::new();
    files
        .map(|(kind, resource_type)| {
            let n = seen.entry((kind, resource_type)).or_default();
            let place = (kind, resource_type.map(str::to_owned), *n);
            *n += 1;
            place
        })
        .collect()
}

/// The new link of each of `ours` that is not done yet, found at the same place in the
/// `fresh` manifest: `(file index, url)`. A file with no counterpart keeps its link.
pub fn match_links(ours: &FileList, fresh: &[ManifestFile]) -> Vec<(u32, String)> {
    let fresh_places: BTreeMap<Place, &ManifestFile> =
        places(fresh.iter().map(|file| (file.kind, file.resource_type.as_deref())))
            .into_iter()
            .zip(fresh)
            .collect();
    places(ours.iter().map(|file| (file.kind, file.resource_type.as_deref())))
        .into_iter()
        .enumerate()
        .filter(|(index, _)| ours[*index].phase != FilePhase::Done)
        .filter_map(|(index, place)| {
            let url = fresh_places.get(&place)?.url.to_string();
            (url != ours[index].url).then_some((index as u32, url))
        })
        .collect()
}

/// The renewed link of a leased file, and when the new links expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewedLink {
    pub url: String,
    pub links_expire_ms: Option<u64>,
}

/// Renews the link of the file `lease_id` leases (see the module documentation).
pub async fn renew_link(
    coordinator: &Coordinator,
    worker_id: &str,
    lease_id: u64,
    generation: u64,
    failed_url: &str,
) -> Result<RenewedLink, CoordinatorError> {
    let term = coordinator.leader_term()?;
    let job_id = coordinator
        .read(move |state| state.leases.get(&lease_id).map(|at| at.job_id.clone()))
        .await?
        .ok_or(Refusal::LeaseNotLive { lease_id })?;
    // One renewal per job at a time; whoever waited reads the links it committed below.
    let renewal = term.link_renewal(&job_id);
    let _one_at_a_time = renewal.lock().await;
    let (job, file) = {
        let worker = worker_id.to_string();
        coordinator
            .read(move |state| -> Result<_, Refusal> {
                let at = state.leases.get(&lease_id).ok_or(Refusal::LeaseNotLive { lease_id })?;
                let job = state
                    .jobs
                    .get(&at.job_id)
                    .ok_or_else(|| Refusal::UnknownJob(at.job_id.clone()))?;
                let file = job.files.get(at.file as usize).ok_or(Refusal::NoSuchFile {
                    job_id: at.job_id.clone(),
                    file: at.file,
                })?;
                match &file.phase {
                    FilePhase::Leased { worker_id, .. } if *worker_id == worker && file.generation == generation => {}
                    FilePhase::Leased { .. } => {
                        return Err(Refusal::StaleGeneration {
                            lease_id,
                            generation,
                            current: file.generation,
                        });
                    }
                    _ => return Err(Refusal::LeaseNotLive { lease_id }),
                }
                Ok((job.clone(), at.file))
            })
            .await??
    };
    let current = &job.files[file as usize].url;
    if current != failed_url {
        return Ok(RenewedLink {
            url: current.clone(),
            links_expire_ms: job.links_expire_ms,
        });
    }
    let status_url = match (&job.status_url, job.status_deleted) {
        (Some(url), false) => url::Url::parse(url).map_err(|e| CoordinatorError::BadUrl {
            what: "committed status URL",
            url: SafeUrl::from(url.as_str()),
            reason: e.to_string(),
        })?,
        _ => {
            return Err(fhirhaul_common::Error::LinkExpired {
                url: SafeUrl::from(failed_url),
                expired_at_ms: job.links_expire_ms,
                reason: "the export's status URL is gone, so no fresh manifest can be asked for".into(),
            }
            .into());
        }
    };
    let client = term.client(&job.tenant)?;
    let expired = |reason: String| -> CoordinatorError {
        fhirhaul_common::Error::LinkExpired {
            url: SafeUrl::from(failed_url),
            expired_at_ms: job.links_expire_ms,
            reason,
        }
        .into()
    };
    let (mut page, expires) = match poll_once(client, &status_url).await {
        Ok(PollStep::Complete { manifest, expires }) => (manifest, expires),
        Ok(PollStep::InProgress { .. }) => {
            return Err(expired(
                "the status URL answered 202 (in progress) instead of the manifest again".into(),
            ));
        }
        Err(error) => {
            return Err(expired(format!(
                "asking the status URL for a fresh manifest failed: {error}"
            )));
        }
    };
    let mut fresh = std::mem::take(&mut page.files);
    while let Some(next) = page.next.take() {
        page = fetch_manifest_page(client, &next)
            .await
            .map_err(|error| expired(format!("fetching a page of the fresh manifest failed: {error}")))?;
        fresh.append(&mut page.files);
    }
    let links = match_links(&job.files, &fresh);
    let Some((_, url)) = links.iter().find(|(index, _)| *index == file).cloned() else {
        return Err(expired(
            "the fresh manifest has no new link for this file (same link, or no file at its place)".into(),
        ));
    };
    let links_expire_ms = expires.map(unix_ms);
    tracing::info!(job = %job.id, renewed = links.len(), "renewed expired file links from a fresh manifest");
    coordinator
        .lease_command(Command::RenewLinks {
            job_id: job.id.clone(),
            links,
            links_expire_ms,
        })
        .await?;
    Ok(RenewedLink { url, links_expire_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::FileRecord;

    fn ours(kind: FileKind, resource_type: Option<&str>, url: &str, phase: FilePhase) -> FileRecord {
        FileRecord {
            phase,
            ..FileRecord::pending(&fresh(kind, resource_type, url), String::new())
        }
    }

    fn fresh(kind: FileKind, resource_type: Option<&str>, url: &str) -> ManifestFile {
        ManifestFile {
            kind,
            resource_type: resource_type.map(str::to_owned),
            url: url.parse().unwrap(),
            count: None,
        }
    }

    #[test]
    fn files_match_by_list_type_and_position_and_done_files_keep_their_links() {
        let ours: FileList = [
            ours(FileKind::Output, Some("Patient"), "https://s/p1?exp=1", FilePhase::Done),
            ours(
                FileKind::Output,
                Some("Patient"),
                "https://s/p2?exp=1",
                FilePhase::Pending,
            ),
            ours(
                FileKind::Output,
                Some("Observation"),
                "https://s/o1?exp=1",
                FilePhase::Failed,
            ),
            ours(FileKind::Error, None, "https://s/e1?exp=1", FilePhase::Pending),
        ]
        .into_iter()
        .collect();
        // The fresh manifest lists types in another order; positions within a type hold.
        let fresh = vec![
            fresh(FileKind::Error, None, "https://s/e1?exp=2"),
            fresh(FileKind::Output, Some("Observation"), "https://s/o1?exp=2"),
            fresh(FileKind::Output, Some("Patient"), "https://s/p1?exp=2"),
            fresh(FileKind::Output, Some("Patient"), "https://s/p2?exp=2"),
        ];
        assert_eq!(
            match_links(&ours, &fresh),
            vec![
                (1, "https://s/p2?exp=2".to_string()),
                (2, "https://s/o1?exp=2".to_string()),
                (3, "https://s/e1?exp=2".to_string()),
            ]
        );
    }

    #[test]
    fn a_file_without_a_counterpart_or_with_the_same_link_gets_nothing() {
        let ours: FileList = [
            ours(FileKind::Output, Some("Patient"), "https://s/p1", FilePhase::Pending),
            ours(FileKind::Output, Some("Patient"), "https://s/p2", FilePhase::Pending),
        ]
        .into_iter()
        .collect();
        let fresh = vec![fresh(FileKind::Output, Some("Patient"), "https://s/p1")];
        assert_eq!(match_links(&ours, &fresh), vec![]);
    }
}
