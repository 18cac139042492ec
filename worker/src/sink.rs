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
    #[error(
        "refusing to publish into {directory}: it belongs to export {owner}, not {export} (two exports must never share a directory)"
    )]
    AnotherExport {
        directory: String,
        owner: String,
        export: String,
    },
}

/// The export a file belongs to: its directory (relative to the sink's root) and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDir {
    pub relative: PathBuf,
    pub id: String,
}

/// The file in each export's directory that names the export it belongs to.
pub const EXPORT_MARKER: &str = ".fhirhaul-export";

/// Publishes verified files.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Moves the verified file at `staged` to `relative` under the sink's root, so that it
    /// becomes visible complete or not at all, and returns where it now is. `relative` has
    /// been checked not to leave the root and lies in `export`'s directory. A sink never
    /// replaces a file of another export: publishing into a directory that belongs to
    /// another export is [`SinkError::AnotherExport`].
    async fn publish(&self, staged: &Path, relative: &Path, export: &ExportDir) -> Result<String, SinkError>;
}

/// A directory on a local or shared filesystem.
pub struct LocalDirectory {
    root: PathBuf,
    offload: Offload,
    /// Export directories already found (or made) the named export's: a marker never
    /// changes once written, so each is checked once, not for every file.
    claimed: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(PathBuf, String)>>>,
}

impl LocalDirectory {
    pub fn new(root: PathBuf, offload: Offload) -> Self {
        LocalDirectory {
            root,
            offload,
            claimed: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Sink for LocalDirectory {
    async fn publish(&self, staged: &Path, relative: &Path, export: &ExportDir) -> Result<String, SinkError> {
        let destination = self.root.join(relative);
        let directory = self.root.join(&export.relative);
        let (from, to, id) = (staged.to_path_buf(), destination.clone(), export.id.clone());
        let claimed = std::sync::Arc::clone(&self.claimed);
        let moved = self
            .offload
            .run(move || -> Result<(), Published> {
                let key = (directory, id);
                let known = claimed.lock().unwrap_or_else(|p| p.into_inner()).contains(&key);
                if !known {
                    claim(&key.0, &key.1)?;
                    claimed.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
                }
                move_into_place(&from, &to).map_err(Published::Io)
            })
            .await;
        match moved {
            Ok(()) => Ok(destination.display().to_string()),
            Err(Published::Io(source)) => Err(SinkError::Io {
                staged: staged.to_path_buf(),
                destination: destination.display().to_string(),
                source,
            }),
            Err(Published::Owned(owner)) => Err(SinkError::AnotherExport {
                directory: self.root.join(&export.relative).display().to_string(),
                owner,
                export: export.id.clone(),
            }),
        }
    }
}

enum Published {
    Io(std::io::Error),
    /// The directory belongs to this export.
    Owned(String),
}

/// Makes sure `directory` is `export`'s: marks a new directory with the export's id, and
/// refuses one marked with another's.
#[allow(clippy::disallowed_methods)] // Runs inside the offload seam (`LocalDirectory::publish`).
fn claim(directory: &Path, export: &str) -> Result<(), Published> {
    fhirhaul_common::private_fs::create_dir_all(directory).map_err(Published::Io)?;
    let marker = directory.join(EXPORT_MARKER);
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&marker) {
        Ok(mut file) => {
            std::io::Write::write_all(&mut file, export.as_bytes()).map_err(Published::Io)?;
            file.sync_all().map_err(Published::Io)
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let owner = std::fs::read_to_string(&marker).map_err(Published::Io)?;
            // A marker being written by another worker of this export reads empty for a
            // moment: that is this export too.
            if owner.is_empty() || owner == export {
                Ok(())
            } else {
                Err(Published::Owned(owner))
            }
        }
        Err(error) => Err(Published::Io(error)),
    }
}

#[allow(clippy::disallowed_methods)] // Runs inside the offload seam (`LocalDirectory::publish`).
/// Renames `staged` to `destination` (atomic on one filesystem); across filesystems,
/// copies beside the destination and renames that into place.
fn move_into_place(staged: &Path, destination: &Path) -> std::io::Result<()> {
    if let Some(parent) = destination.parent() {
        fhirhaul_common::private_fs::create_dir_all(parent)?;
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

    fn export(id: &str) -> ExportDir {
        ExportDir {
            relative: PathBuf::from("sim").join(id),
            id: id.to_string(),
        }
    }

    fn staged(dir: &Path, content: &[u8]) -> PathBuf {
        let staged = dir.join("staging/Patient.1.ndjson");
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, content).unwrap();
        staged
    }

    #[tokio::test]
    async fn a_published_file_is_at_its_relative_path_and_gone_from_staging() {
        let dir = tempfile::tempdir().unwrap();
        for offload in [Offload::Threads, Offload::Inline] {
            let staged = staged(dir.path(), b"{\"resourceType\":\"Patient\"}\n");
            let sink = LocalDirectory::new(dir.path().join(format!("out-{offload:?}")), offload);
            let location = sink
                .publish(&staged, Path::new("sim/e1/Patient.1.ndjson"), &export("e1"))
                .await
                .unwrap();
            assert!(location.ends_with("sim/e1/Patient.1.ndjson"), "{location}");
            assert!(Path::new(&location).is_file());
            assert!(!staged.exists(), "the staged copy moved, not copied");
            let marker = dir.path().join(format!("out-{offload:?}/sim/e1")).join(EXPORT_MARKER);
            assert_eq!(std::fs::read_to_string(marker).unwrap(), "e1");
        }
    }

    #[tokio::test]
    async fn a_file_of_another_export_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalDirectory::new(dir.path().join("out"), Offload::Threads);
        let first = staged(dir.path(), b"first\n");
        sink.publish(&first, Path::new("sim/e1/Patient.1.ndjson"), &export("e1"))
            .await
            .unwrap();
        // The same export publishing the same file again (a retried lease) may.
        let again = staged(dir.path(), b"again\n");
        sink.publish(&again, Path::new("sim/e1/Patient.1.ndjson"), &export("e1"))
            .await
            .unwrap();
        // Another export that somehow names the same directory may not.
        let intruder = staged(dir.path(), b"intruder\n");
        let mut other = export("e2");
        other.relative = PathBuf::from("sim/e1");
        let error = sink
            .publish(&intruder, Path::new("sim/e1/Patient.1.ndjson"), &other)
            .await
            .unwrap_err();
        assert!(matches!(error, SinkError::AnotherExport { .. }), "{error}");
        assert!(error.to_string().contains("belongs to export e1"), "{error}");
        let kept = std::fs::read(dir.path().join("out/sim/e1/Patient.1.ndjson")).unwrap();
        assert_eq!(kept, b"again\n", "the first export's file is intact");
        assert!(intruder.exists(), "the refused file stays staged");
    }

    #[tokio::test]
    async fn a_missing_staged_file_is_an_error_naming_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalDirectory::new(dir.path().join("out"), Offload::Threads);
        let error = sink
            .publish(&dir.path().join("nope"), Path::new("sim/e1/x.ndjson"), &export("e1"))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("nope") && error.contains("sim/e1/x.ndjson"), "{error}");
    }
}
