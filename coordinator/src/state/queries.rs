//! Read-only questions the leader asks of replicated state: which leases have expired,
//! which file a worker should get next, how many leases a worker holds.

use std::collections::{BTreeMap, BTreeSet};

use super::{FilePhase, Job, JobPhase, State};

impl State {
    /// Leases held by each worker right now.
    pub fn leases_held(&self, worker_id: &str) -> usize {
        self.leases
            .values()
            .filter(|at| matches!(self.file(at).map(|f| &f.phase), Some(FilePhase::Leased { worker_id: w, .. }) if w == worker_id))
            .count()
    }

    /// Leases whose expiry has passed at `now_ms`: (lease id, generation).
    pub fn expired_leases(&self, now_ms: u64) -> Vec<(u64, u64)> {
        self.leases
            .iter()
            .filter_map(|(id, at)| {
                let file = self.file(at)?;
                match &file.phase {
                    FilePhase::Leased { expires_at_ms, .. } if *expires_at_ms <= now_ms => Some((*id, file.generation)),
                    _ => None,
                }
            })
            .collect()
    }

    /// The next file to give `worker_id`: its own interrupted files first (it can resume
    /// them), then files nobody prefers, oldest job first; never more than
    /// `per_tenant_limit` leases at once for one tenant.
    pub fn next_file_for(&self, worker_id: &str, per_tenant_limit: impl Fn(&str) -> usize) -> Option<(String, u32)> {
        self.next_files_for(&[worker_id], per_tenant_limit).pop().flatten()
    }

    /// [`State::next_file_for`] for several waiting workers at once, in their order: no
    /// file goes to two of them, and the per-tenant limit counts the files handed out here.
    pub fn next_files_for(
        &self,
        worker_ids: &[&str],
        per_tenant_limit: impl Fn(&str) -> usize,
    ) -> Vec<Option<(String, u32)>> {
        let mut leased_per_tenant: BTreeMap<&str, usize> = BTreeMap::new();
        for at in self.leases.values() {
            if let Some(job) = self.jobs.get(&at.job_id) {
                *leased_per_tenant.entry(job.tenant.as_str()).or_default() += 1;
            }
        }
        let mut taken: BTreeSet<(&str, u32)> = BTreeSet::new();
        let mut picks = Vec::with_capacity(worker_ids.len());
        for worker_id in worker_ids {
            let pick = self.pick(worker_id, &leased_per_tenant, &taken, &per_tenant_limit);
            if let Some((job, file)) = pick {
                *leased_per_tenant.entry(job.tenant.as_str()).or_default() += 1;
                taken.insert((job.id.as_str(), file));
            }
            picks.push(pick.map(|(job, file)| (job.id.clone(), file)));
        }
        picks
    }

    fn pick<'a>(
        &'a self,
        worker_id: &str,
        leased_per_tenant: &BTreeMap<&str, usize>,
        taken: &BTreeSet<(&str, u32)>,
        per_tenant_limit: &impl Fn(&str) -> usize,
    ) -> Option<(&'a Job, u32)> {
        let mut candidates: Vec<&Job> = self
            .jobs
            .values()
            .filter(|job| {
                matches!(job.phase, JobPhase::Polling | JobPhase::Downloading)
                    && leased_per_tenant.get(job.tenant.as_str()).copied().unwrap_or(0) < per_tenant_limit(&job.tenant)
            })
            .collect();
        // Oldest job first, by submission order (`job-10` comes after `job-9`, not before
        // `job-2` as the map's text order has it).
        candidates.sort_by_key(|job| (job_number(&job.id), job.id.as_str()));
        let mut fallback = None;
        for job in candidates {
            for (index, file) in job.files.iter().enumerate() {
                let index = index as u32;
                if file.phase != FilePhase::Pending || taken.contains(&(job.id.as_str(), index)) {
                    continue;
                }
                match file.preferred_worker.as_deref() {
                    Some(preferred) if preferred == worker_id => return Some((job, index)),
                    Some(_) => {}
                    None => {
                        if fallback.is_none() {
                            fallback = Some((job, index));
                        }
                    }
                }
            }
        }
        fallback
    }
}

/// The submission number in a job id (`job-12` → 12); ids of another shape sort last.
pub(super) fn job_number(id: &str) -> u64 {
    id.strip_prefix("job-").and_then(|n| n.parse().ok()).unwrap_or(u64::MAX)
}
