//! A job's file index: what the leader asks of a job on every lease (which pending file
//! comes next, for this worker or anyone; how many files are done or failed) and what
//! every summary shows (bytes, EHR-reported errors) without walking its files. It is derived from the files, never replicated or serialized: built
//! on first use (after a snapshot is loaded, say) and kept up to date by every change that
//! goes through [`Job::change_file`] and [`Job::push_file`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use super::{FileList, FilePhase, FileRecord, Job};

/// Pending files by who may take them, and counts of settled files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileIndex {
    pub done: usize,
    pub failed: usize,
    /// Bytes downloaded (every file's checkpoint offset) and EHR-reported errors, summed.
    pub bytes: u64,
    pub ehr_errors: u64,
    /// Pending files nobody prefers, in manifest order.
    pub free: BTreeSet<u32>,
    /// Pending files kept for the worker that holds their partial download.
    pub preferred: BTreeMap<String, BTreeSet<u32>>,
}

impl FileIndex {
    pub fn build(files: &FileList) -> FileIndex {
        let mut index = FileIndex::default();
        for (position, file) in files.iter().enumerate() {
            index.add(position as u32, file);
        }
        index
    }

    fn add(&mut self, position: u32, file: &FileRecord) {
        self.bytes += file.progress.offset;
        self.ehr_errors += file.ehr_errors;
        match file.phase {
            FilePhase::Done => self.done += 1,
            FilePhase::Failed => self.failed += 1,
            FilePhase::Leased { .. } => {}
            FilePhase::Pending => match &file.preferred_worker {
                None => {
                    self.free.insert(position);
                }
                Some(worker) => {
                    self.preferred.entry(worker.clone()).or_default().insert(position);
                }
            },
        }
    }

    fn remove(&mut self, position: u32, file: &FileRecord) {
        self.bytes -= file.progress.offset;
        self.ehr_errors -= file.ehr_errors;
        match file.phase {
            FilePhase::Done => self.done -= 1,
            FilePhase::Failed => self.failed -= 1,
            FilePhase::Leased { .. } => {}
            FilePhase::Pending => match &file.preferred_worker {
                None => {
                    self.free.remove(&position);
                }
                Some(worker) => {
                    if let Some(files) = self.preferred.get_mut(worker) {
                        files.remove(&position);
                        if files.is_empty() {
                            self.preferred.remove(worker);
                        }
                    }
                }
            },
        }
    }
}

/// A job's [`FileIndex`], built when first asked for. Two jobs are equal whatever their
/// indexes hold: the index is a function of the files.
#[derive(Debug, Clone, Default)]
pub struct LazyIndex(OnceLock<FileIndex>);

impl PartialEq for LazyIndex {
    fn eq(&self, _: &LazyIndex) -> bool {
        true
    }
}

impl Job {
    /// The job's file index (built now if this is the first question since it was loaded
    /// or its files were changed wholesale).
    pub fn index(&self) -> &FileIndex {
        self.index.0.get_or_init(|| FileIndex::build(&self.files))
    }

    /// Changes one file's record through `change`, keeping the index true; false if there
    /// is no such file.
    pub(super) fn change_file(&mut self, position: u32, change: impl FnOnce(&mut FileRecord)) -> bool {
        let Some(file) = self.files.get_mut(position as usize) else {
            return false;
        };
        match self.index.0.get_mut() {
            Some(index) => {
                index.remove(position, file);
                change(file);
                index.add(position, file);
            }
            None => change(file),
        }
        true
    }

    /// Adds a file at the end of the job's list.
    pub(super) fn push_file(&mut self, file: FileRecord) {
        let position = self.files.len() as u32;
        if let Some(index) = self.index.0.get_mut() {
            index.add(position, &file);
        }
        self.files.push(file);
    }

    /// Changes every file through `change`; the index is rebuilt when next asked for.
    pub(super) fn change_all_files(&mut self, mut change: impl FnMut(&mut FileRecord)) {
        self.files.iter_mut().for_each(&mut change);
        self.index = LazyIndex::default();
    }

    /// Whether the index agrees with the files (for tests and debug builds).
    pub fn index_is_true(&self) -> bool {
        self.index
            .0
            .get()
            .is_none_or(|index| *index == FileIndex::build(&self.files))
    }
}
