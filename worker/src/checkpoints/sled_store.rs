//! Checkpoints in the worker's local sled, synced before `put` returns.

use std::path::Path;

use fhirhaul_common::download::Checkpoint;
use fhirhaul_common::offload::Offload;
use serde::{Deserialize, Serialize};

use super::{CheckpointStore, moves_forward};
use crate::WorkerError;

#[derive(Serialize, Deserialize)]
struct Stored {
    url: String,
    checkpoint: Checkpoint,
}

#[derive(Clone)]
pub struct SledCheckpoints {
    tree: sled::Tree,
    /// Where sled's reads, writes and syncs run.
    offload: Offload,
}

impl SledCheckpoints {
    /// Opens (or creates) the store at `path`. Only one process can hold it: a second
    /// worker pointed at the same state directory gets an error naming it.
    #[allow(clippy::disallowed_methods)] // Opened once, when the worker starts.
    pub fn open(path: &Path, offload: Offload) -> Result<SledCheckpoints, WorkerError> {
        let failed = |e: sled::Error| WorkerError::Checkpoints {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        // The state directory (checkpoints, and the partial files beside them) is the
        // worker's alone.
        if let Some(state_dir) = path.parent() {
            fhirhaul_common::private_fs::create_dir_all(state_dir).map_err(|e| WorkerError::Checkpoints {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        let db = sled::open(path).map_err(failed)?;
        Ok(SledCheckpoints {
            tree: db.open_tree("checkpoints").map_err(failed)?,
            offload,
        })
    }

    fn read(tree: &sled::Tree, key: &str, url: &str) -> Option<Checkpoint> {
        let bytes = tree.get(key).ok()??;
        let stored: Stored = serde_json::from_slice(&bytes).ok()?;
        (stored.url == url).then_some(stored.checkpoint)
    }
}

#[async_trait::async_trait]
impl CheckpointStore for SledCheckpoints {
    async fn get(&self, key: &str, url: &str) -> Option<Checkpoint> {
        let (tree, key, url) = (self.tree.clone(), key.to_string(), url.to_string());
        self.offload.run(move || Self::read(&tree, &key, &url)).await
    }

    async fn put(&self, key: &str, url: &str, checkpoint: &Checkpoint) {
        let Ok(bytes) = serde_json::to_vec(&Stored {
            url: url.to_string(),
            checkpoint: checkpoint.clone(),
        }) else {
            return;
        };
        let (tree, key, url, checkpoint) = (self.tree.clone(), key.to_string(), url.to_string(), checkpoint.clone());
        let written = self
            .offload
            .run(move || {
                if let Some(previous) = Self::read(&tree, &key, &url) {
                    debug_assert!(moves_forward(&previous, &checkpoint), "checkpoint moved backwards");
                }
                tree.insert(key, bytes)?;
                tree.flush()
            })
            .await;
        if let Err(error) = written {
            tracing::warn!(%error, "could not record a checkpoint");
        }
    }

    async fn remove(&self, key: &str) {
        let (tree, key) = (self.tree.clone(), key.to_string());
        let removed = self.offload.run(move || tree.remove(key)).await;
        if let Err(error) = removed {
            tracing::warn!(%error, "could not forget a checkpoint");
        }
    }
}
