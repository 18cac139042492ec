//! A job's files, in chunks shared copy-on-write: cloning the state (to write a snapshot
//! while leases go on) copies one pointer per chunk, and a chunk is copied only when it
//! changes while a clone still holds it. Serialized as the plain list it is.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::FileRecord;

/// Files per chunk: small enough that a copy-on-write costs little, large enough that a
/// clone of a 100,000-file job is a hundred pointers.
const CHUNK: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileList {
    chunks: Vec<Arc<Vec<FileRecord>>>,
    len: usize,
}

impl FileList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, position: usize) -> Option<&FileRecord> {
        self.chunks.get(position / CHUNK)?.get(position % CHUNK)
    }

    /// The file at `position`, for a change (copying its chunk if a clone shares it).
    pub(super) fn get_mut(&mut self, position: usize) -> Option<&mut FileRecord> {
        Arc::make_mut(self.chunks.get_mut(position / CHUNK)?).get_mut(position % CHUNK)
    }

    pub(super) fn push(&mut self, file: FileRecord) {
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Arc::new(Vec::with_capacity(CHUNK)));
        }
        if let Some(last) = self.chunks.last_mut() {
            Arc::make_mut(last).push(file);
            self.len += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &FileRecord> + Clone {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut FileRecord> {
        self.chunks.iter_mut().flat_map(|chunk| Arc::make_mut(chunk).iter_mut())
    }

    /// Files `start..end` (clamped to the list), without walking the ones before.
    pub fn range(&self, start: usize, end: usize) -> impl Iterator<Item = &FileRecord> {
        let end = end.min(self.len);
        let start = start.min(end);
        self.chunks
            .iter()
            .skip(start / CHUNK)
            .flat_map(|chunk| chunk.iter())
            .skip(start % CHUNK)
            .take(end - start)
    }
}

impl std::ops::Index<usize> for FileList {
    type Output = FileRecord;

    fn index(&self, position: usize) -> &FileRecord {
        match self.get(position) {
            Some(file) => file,
            None => panic!("file {position} of a job with {} files", self.len),
        }
    }
}

impl FromIterator<FileRecord> for FileList {
    fn from_iter<I: IntoIterator<Item = FileRecord>>(files: I) -> FileList {
        let mut list = FileList::default();
        for file in files {
            list.push(file);
        }
        list
    }
}

impl<'a> IntoIterator for &'a FileList {
    type Item = &'a FileRecord;
    type IntoIter = Box<dyn Iterator<Item = &'a FileRecord> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl Serialize for FileList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for FileList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<FileList, D::Error> {
        Ok(Vec::<FileRecord>::deserialize(deserializer)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhirhaul_common::manifest::{FileKind, ManifestFile};

    fn file(n: usize) -> FileRecord {
        let manifest = ManifestFile {
            kind: FileKind::Output,
            resource_type: Some("Patient".into()),
            url: format!("https://ehr.example/f/{n}").parse().unwrap(),
            count: None,
        };
        FileRecord::pending(&manifest, format!("t/e/Patient.{n}.ndjson"))
    }

    #[test]
    fn a_list_across_chunks_reads_serializes_and_ranges_like_a_vec() {
        let files: Vec<FileRecord> = (0..CHUNK * 2 + 5).map(file).collect();
        let list: FileList = files.iter().cloned().collect();
        assert_eq!(list.len(), files.len());
        assert_eq!(list[CHUNK + 3], files[CHUNK + 3]);
        assert!(list.get(files.len()).is_none());
        assert_eq!(list.iter().cloned().collect::<Vec<_>>(), files);
        let range: Vec<_> = list.range(CHUNK - 2, CHUNK + 2).cloned().collect();
        assert_eq!(range, files[CHUNK - 2..CHUNK + 2]);
        assert_eq!(list.range(files.len() - 1, usize::MAX).count(), 1);
        assert_eq!(
            serde_json::to_string(&list).unwrap(),
            serde_json::to_string(&files).unwrap(),
            "the same JSON as the plain list (snapshots stay readable both ways)"
        );
        let back: FileList = serde_json::from_str(&serde_json::to_string(&files).unwrap()).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn a_clone_keeps_what_it_saw_while_the_original_changes() {
        let mut list: FileList = (0..CHUNK * 3).map(file).collect();
        let snapshot = list.clone();
        list.get_mut(CHUNK + 1).unwrap().attempts = 7;
        list.push(file(CHUNK * 3));
        assert_eq!(snapshot[CHUNK + 1].attempts, 0, "the clone is unchanged");
        assert_eq!(snapshot.len(), CHUNK * 3);
        assert_eq!(list[CHUNK + 1].attempts, 7);
        assert!(
            Arc::ptr_eq(&list.chunks[0], &snapshot.chunks[0]),
            "unchanged chunks stay shared"
        );
        assert!(!Arc::ptr_eq(&list.chunks[1], &snapshot.chunks[1]));
    }
}
