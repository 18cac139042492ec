//! Partial downloads a worker can resume, in its local sled: key = the file's relative path,
//! value = its URL and the last durable [`Checkpoint`].

use std::path::Path;

use fhirhaul_common::download::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::WorkerError;

#[derive(Serialize, Deserialize)]
struct Stored {
    url: String,
    checkpoint: Checkpoint,
}

#[derive(Clone)]
pub(crate) struct CheckpointStore {
    tree: sled::Tree,
    /// Sync on this task rather than on sled's threads (deterministic simulation).
    inline_io: bool,
}

impl CheckpointStore {
    pub(crate) fn open(path: &Path, inline_io: bool) -> Result<CheckpointStore, WorkerError> {
        let failed = |e: sled::Error| WorkerError::Checkpoints {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let db = sled::open(path).map_err(failed)?;
        Ok(CheckpointStore {
            tree: db.open_tree("checkpoints").map_err(failed)?,
            inline_io,
        })
    }

    /// The checkpoint of `key`, if it was for this URL.
    pub(crate) fn get(&self, key: &str, url: &str) -> Option<Checkpoint> {
        let bytes = self.tree.get(key).ok()??;
        let stored: Stored = serde_json::from_slice(&bytes).ok()?;
        (stored.url == url).then_some(stored.checkpoint)
    }

    /// Records a checkpoint durably. A checkpoint never moves backwards for one URL except
    /// through a restart from zero (offset 0).
    pub(crate) async fn put(&self, key: &str, url: &str, checkpoint: &Checkpoint) {
        if let Some(previous) = self.get(key, url) {
            debug_assert!(
                checkpoint.offset >= previous.offset
                    || checkpoint.offset == 0
                    || checkpoint.validator != previous.validator,
                "checkpoint moved backwards"
            );
        }
        let Ok(bytes) = serde_json::to_vec(&Stored {
            url: url.to_string(),
            checkpoint: checkpoint.clone(),
        }) else {
            return;
        };
        if let Err(error) = self.tree.insert(key, bytes) {
            tracing::warn!(%error, "could not record a checkpoint");
            return;
        }
        let synced = if self.inline_io {
            self.tree.flush().map(|_| ())
        } else {
            self.tree.flush_async().await.map(|_| ())
        };
        if let Err(error) = synced {
            tracing::warn!(%error, "could not sync the checkpoint store");
        }
    }

    pub(crate) fn remove(&self, key: &str) {
        let _ = self.tree.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checkpoints_survive_reopening_and_are_tied_to_their_url() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CheckpointStore::open(dir.path(), false).unwrap();
            let checkpoint = Checkpoint {
                offset: 4096,
                lines: 10,
                resources: 10,
                validator: None,
            };
            store.put("job-1/Patient.1.ndjson", "https://e/f/1", &checkpoint).await;
        }
        let store = CheckpointStore::open(dir.path(), false).unwrap();
        assert_eq!(
            store.get("job-1/Patient.1.ndjson", "https://e/f/1").unwrap().offset,
            4096
        );
        assert!(store.get("job-1/Patient.1.ndjson", "https://e/f/OTHER").is_none());
        store.remove("job-1/Patient.1.ndjson");
        assert!(store.get("job-1/Patient.1.ndjson", "https://e/f/1").is_none());
    }
}
