//! Finished jobs' files, kept out of the replicated state. When a coordinator applies
//! [`Command::ArchiveJob`](crate::state::Command::ArchiveJob) the job leaves the state
//! (only its [`ArchivedJob`](crate::state::ArchivedJob) summary stays, constant in size) and
//! this node writes the whole job, files and all, to `<data dir>/archive/<job>.json`, where
//! status calls read it. A coordinator that caught up from a snapshot taken after a job was
//! archived never saw the job's files: it answers with the summary alone.

use std::io;
use std::path::{Path, PathBuf};

use crate::state::Job;

#[derive(Debug, Clone)]
pub struct JobArchive {
    dir: PathBuf,
}

impl JobArchive {
    pub fn new(data_dir: &Path) -> JobArchive {
        JobArchive {
            dir: data_dir.join("archive"),
        }
    }

    /// Job ids are the state machine's own (`job-<n>`); anything else is never a file name.
    fn path(&self, job_id: &str) -> Option<PathBuf> {
        let safe = !job_id.is_empty() && job_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        safe.then(|| self.dir.join(format!("{job_id}.json")))
    }

    /// Writes the job (blocking: run it inside the offload seam), durably and whole: a
    /// temporary file, synced, renamed.
    pub fn write(&self, job: &Job) -> io::Result<()> {
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

    /// The archived job with its files, if this coordinator wrote it (blocking).
    #[allow(clippy::disallowed_methods)] // Inside the offload seam.
    pub fn read(&self, job_id: &str) -> io::Result<Option<Job>> {
        let Some(path) = self.path(job_id) else {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Applied, Command, State};

    #[test]
    fn an_archived_job_reads_back_whole_and_odd_ids_are_never_paths() {
        let dir = tempfile::tempdir().unwrap();
        let archive = JobArchive::new(dir.path());
        let mut state = State::default();
        let Applied::JobSubmitted { job_id } = state.apply(Command::SubmitJob {
            tenant: "t".into(),
            request: Default::default(),
            max_file_attempts: 1,
            at_ms: 1,
            request_id: None,
            export_id: None,
            delete_policy: Default::default(),
        }) else {
            panic!("not submitted")
        };
        let job = state.jobs[&job_id].clone();
        archive.write(&job).unwrap();
        assert_eq!(archive.read(&job_id).unwrap(), Some(job));
        assert_eq!(archive.read("job-404").unwrap(), None);
        assert_eq!(archive.read("../job-1").unwrap(), None);
    }
}
