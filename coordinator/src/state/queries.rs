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
    /// Each pick looks only at the jobs' pending-file indexes: its cost does not grow with
    /// the number of files.
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
        // Oldest job first, by submission order (`job-10` comes after `job-9`, not before
        // `job-2` as the map's text order has it).
        let mut jobs: Vec<&Job> = self
            .jobs
            .values()
            .filter(|job| matches!(job.phase, JobPhase::Polling | JobPhase::Downloading))
            .collect();
        jobs.sort_by_key(|job| (job_number(&job.id), job.id.as_str()));
        let mut round = Round::default();
        let mut picks = Vec::with_capacity(worker_ids.len());
        for worker_id in worker_ids {
            let open = jobs.iter().copied().filter(|job| {
                leased_per_tenant.get(job.tenant.as_str()).copied().unwrap_or(0) < per_tenant_limit(&job.tenant)
            });
            let pick = round.pick(worker_id, open);
            if let Some((job, _)) = pick {
                *leased_per_tenant.entry(job.tenant.as_str()).or_default() += 1;
            }
            picks.push(pick.map(|(job, file)| (job.id.clone(), file)));
        }
        picks
    }
}

/// What one round of picks has handed out so far.
#[derive(Default)]
struct Round<'a> {
    /// Files kept for a worker, handed out.
    taken: BTreeSet<(&'a str, u32)>,
    /// Per job, the last free file handed out (free files go in manifest order).
    free_after: BTreeMap<&'a str, u32>,
}

impl<'a> Round<'a> {
    /// `worker_id`'s own interrupted files first (it can resume them), in any open job,
    /// then the first free file of the oldest open job.
    fn pick(&mut self, worker_id: &str, open: impl Iterator<Item = &'a Job> + Clone) -> Option<(&'a Job, u32)> {
        for job in open.clone() {
            let Some(kept) = job.index().preferred.get(worker_id) else {
                continue;
            };
            if let Some(&file) = kept
                .iter()
                .find(|file| !self.taken.contains(&(job.id.as_str(), **file)))
            {
                self.taken.insert((job.id.as_str(), file));
                return Some((job, file));
            }
        }
        for job in open {
            let free = &job.index().free;
            let next = match self.free_after.get(job.id.as_str()) {
                Some(&last) => free.range(last + 1..).next(),
                None => free.iter().next(),
            };
            if let Some(&file) = next {
                self.free_after.insert(job.id.as_str(), file);
                return Some((job, file));
            }
        }
        None
    }
}

/// The submission number in a job id (`job-12` → 12); ids of another shape sort last.
pub(super) fn job_number(id: &str) -> u64 {
    id.strip_prefix("job-").and_then(|n| n.parse().ok()).unwrap_or(u64::MAX)
}
