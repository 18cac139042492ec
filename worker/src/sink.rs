//! Where a verified file goes: the [`Sink`] trait, and its first implementation, a local
//! (or shared) directory ([`LocalDirectory`]). A worker downloads into local staging,
//! verifies, then publishes through the sink; the location the sink returns is what
//! `CompleteLease` reports, so a multi-machine cluster ends with one coherent output set.

use std::path::{Path, PathBuf};

use fhirhaul_common::offload::Offload;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("publishing {staged} to {destination}: {source}")]
    Io {
        staged: PathBuf,
        destination: String,
        #[source]
        source: std::io::Error,
    },
}

/// Publishes verified files.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Moves the verified file at `staged` to `relative` under the sink's root, so that it
    /// becomes visible complete or not at all, and returns where it now is. `relative` has
    /// been checked not to leave the root.
    async fn publish(&self, staged: &Path, relative: &Path) -> Result<String, SinkError>;
}

/// A directory on a local or shared filesystem.
pub struct LocalDirectory {
    root: PathBuf,
    offload: Offload,
}

impl LocalDirectory {
    pub fn new(root: PathBuf, offload: Offload) -> Self {
        LocalDirectory { root, offload }
    }
}

#[async_trait::async_trait]
impl Sink for LocalDirectory {
    async fn publish(&self, staged: &Path, relative: &Path) -> Result<String, SinkError> {
        let destination = self.root.join(relative);
        let (from, to) = (staged.to_path_buf(), destination.clone());
        let moved = self.offload.run(move || move_into_place(&from, &to)).await;
        moved.map_err(|source| SinkError::Io {
            staged: staged.to_path_buf(),
            destination: destination.display().to_string(),
            source,
        })?;
        Ok(destination.display().to_string())
    }
}

#[allow(clippy::disallowed_methods)] // Runs inside the offload seam (`LocalDirectory::publish`).
/// Renames `staged` to `destination` (atomic on one filesystem); across filesystems,
/// copies beside the destination and renames that into place.
fn move_into_place(staged: &Path, destination: &Path) -> std::io::Result<()> {
    if let Some(parent) = destination.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::rename(staged, destination).is_ok() {
        return Ok(());
    }
    let temporary = destination.with_extension("publishing");
    std::fs::copy(staged, &temporary)?;
    std::fs::File::open(&temporary)?.sync_all()?;
    std::fs::rename(&temporary, destination)?;
    std::fs::remove_file(staged)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests set up files directly.
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_published_file_is_at_its_relative_path_and_gone_from_staging() {
        let dir = tempfile::tempdir().unwrap();
        let staged = dir.path().join("staging/Patient.1.ndjson");
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, b"{\"resourceType\":\"Patient\"}\n").unwrap();
        for offload in [Offload::Threads, Offload::Inline] {
            let sink = LocalDirectory::new(dir.path().join(format!("out-{offload:?}")), offload);
            if offload == Offload::Inline {
                std::fs::write(&staged, b"{}\n").unwrap();
            }
            let location = sink
                .publish(&staged, Path::new("job-1/Patient.1.ndjson"))
                .await
                .unwrap();
            assert!(location.ends_with("job-1/Patient.1.ndjson"), "{location}");
            assert!(Path::new(&location).is_file());
            assert!(!staged.exists(), "the staged copy moved, not copied");
        }
    }

    #[tokio::test]
    async fn a_missing_staged_file_is_an_error_naming_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalDirectory::new(dir.path().join("out"), Offload::Threads);
        let error = sink
            .publish(&dir.path().join("nope"), Path::new("job-1/x.ndjson"))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("nope") && error.contains("job-1/x.ndjson"), "{error}");
    }
}
