//! Finished jobs' files, kept out of the replicated state. When a coordinator applies
//! [`Command::ArchiveJob`](crate::state::Command::ArchiveJob) the job leaves the state
//! (only its [`ArchivedJob`](crate::state::ArchivedJob) summary stays, constant in size) and
//! this node writes the whole job, files and all, to `<data dir>/archive/<job>.json`, where
//! status calls read it. A coordinator that caught up from a snapshot taken after a job was
//! archived never saw the job's files: it answers with the summary alone.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fhirhaul_common::offload::Offload;
use tokio::sync::watch;

use crate::state::Job;

/// One node's archive, shared by the raft actor (which writes) and status calls (which
/// read). It knows which writes are under way, so a read of a job archived a moment ago
/// waits for its file instead of finding none.
#[derive(Debug)]
pub struct JobArchive {
    dir: PathBuf,
    /// Jobs whose file is being written.
    writing: Mutex<BTreeSet<String>>,
    /// Bumped whenever a write ends (written or failed).
    written: watch::Sender<u64>,
    /// The job read last, with its file's modification time: paging through one job's
    /// files parses its file once (and a file replaced or gone is read again).
    last_read: Mutex<Option<(Arc<Job>, SystemTime)>>,
}

impl JobArchive {
    pub fn new(data_dir: &Path) -> JobArchive {
        JobArchive {
            dir: data_dir.join("archive"),
            writing: Mutex::default(),
            written: watch::Sender::new(0),
            last_read: Mutex::default(),
        }
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's file is about to be written (called when the archiving is applied, before
    /// any later read can see the job archived).
    pub fn will_write(&self, job_id: &str) {
        self.writing().insert(job_id.to_string());
    }

    /// Writes the job (blocking: run it inside the offload seam) and ends the write
    /// [`JobArchive::will_write`] announced, whatever the outcome.
    pub fn write_announced(&self, job: &Job) -> io::Result<()> {
        let written = self.write(job);
        self.writing().remove(&job.id);
        self.written.send_modify(|n| *n += 1);
        written
    }

    /// The archived job with its files, if this coordinator has them: after any write of
    /// it under way has ended.
    pub async fn read_when_written(&self, job_id: &str, offload: Offload) -> io::Result<Option<Arc<Job>>> {
        let mut ended = self.written.subscribe();
        while self.writing().contains(job_id) {
            if ended.changed().await.is_err() {
                break;
            }
        }
        let cached = self.last_read.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cached = cached.filter(|(job, _)| job.id == job_id);
        let (dir, id) = (self.dir.clone(), job_id.to_string());
        let read = offload
            .run(move || -> io::Result<Option<(Arc<Job>, SystemTime)>> {
                let Some(modified) = modified(&dir, &id)? else {
                    return Ok(None);
                };
                match cached {
                    Some((job, at)) if at == modified => Ok(Some((job, at))),
                    _ => Ok(read(&dir, &id)?.map(|job| (Arc::new(job), modified))),
                }
            })
            .await?;
        *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = read.clone();
        let read = read.map(|(job, _)| job);
        Ok(read)
    }

    /// Job ids are the state machine's own (`job-<n>`); anything else is never a file name.
    fn path(&self, job_id: &str) -> Option<PathBuf> {
        let safe = !job_id.is_empty() && job_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        safe.then(|| self.dir.join(format!("{job_id}.json")))
    }

    /// Writes the job (blocking), durably and whole: a temporary file, synced, renamed.
    fn write(&self, job: &Job) -> io::Result<()> {
        use std::io::Write as _;
        let Some(path) = self.path(&job.id) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("job id `{}`", job.id),
            ));
        };
        fhirhaul_common::private_fs::create_dir_all(&self.dir)?;
        let temporary = path.with_extension("json.tmp");
        let mut file = io::BufWriter::new(fhirhaul_common::private_fs::create_file(&temporary)?);
        serde_json::to_writer(&mut file, job).map_err(io::Error::other)?;
        file.flush()?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        #[allow(clippy::disallowed_methods)] // Inside the offload seam.
        std::fs::rename(&temporary, &path)?;
        Ok(())
    }
}

/// Job ids are the state machine's own (`job-<n>`); anything else is never a file name.
fn path(dir: &Path, job_id: &str) -> Option<PathBuf> {
    let safe = !job_id.is_empty() && job_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    safe.then(|| dir.join(format!("{job_id}.json")))
}

/// When the archived job's file in `dir` was last modified, if there is one (blocking).
#[allow(clippy::disallowed_methods)] // Inside the offload seam.
fn modified(dir: &Path, job_id: &str) -> io::Result<Option<SystemTime>> {
    let Some(path) = path(dir, job_id) else {
        return Ok(None);
    };
    match std::fs::metadata(&path) {
        Ok(metadata) => metadata.modified().map(Some),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// The archived job in `dir`, if there is one (blocking).
#[allow(clippy::disallowed_methods)] // Inside the offload seam.
fn read(dir: &Path, job_id: &str) -> io::Result<Option<Job>> {
    let Some(path) = path(dir, job_id) else {
        return Ok(None);
    };
    match std::fs::File::open(&path) {
        Ok(file) => serde_json::from_reader(io::BufReader::new(file))
            .map(Some)
            .map_err(io::Error::other),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Applied, Command, State};

    fn job() -> Job {
        let mut state = State::default();
        let Applied::JobSubmitted { job_id } = state.apply(Command::test_submission()) else {
            panic!("not submitted")
        };
        state.jobs[&job_id].clone()
    }

    #[tokio::test]
    async fn an_archived_job_reads_back_whole_and_odd_ids_are_never_paths() {
        let dir = tempfile::tempdir().unwrap();
        let archive = JobArchive::new(dir.path());
        let job = job();
        archive.will_write(&job.id);
        archive.write_announced(&job).unwrap();
        let read = |id: &'static str| archive.read_when_written(id, Offload::Inline);
        assert_eq!(read("job-1").await.unwrap().as_deref(), Some(&job));
        assert_eq!(read("job-404").await.unwrap(), None);
        assert_eq!(read("../job-1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_read_of_a_job_being_written_waits_for_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Arc::new(JobArchive::new(dir.path()));
        let job = job();
        archive.will_write(&job.id);
        let reader = {
            let archive = Arc::clone(&archive);
            tokio::spawn(async move { archive.read_when_written("job-1", Offload::Inline).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the read waits while the write is under way");
        archive.write_announced(&job).unwrap();
        assert_eq!(reader.await.unwrap().unwrap().as_deref(), Some(&job));
    }
}
