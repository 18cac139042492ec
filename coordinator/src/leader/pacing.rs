//! How many files of one tenant download at once: adaptive, between 1 and the tenant's
//! `export.max_concurrency`, starting at `export.concurrency`. [`Pacer`] is the decision,
//! pure and driven by the leader's tick: additive increase while throughput rises and the
//! EHR answers without 429/503, multiplicative decrease when it throttles. Workers report
//! the throttled responses they saw with each lease call; the throughput is the tenant's
//! downloaded bytes from the replicated state. [`Pacing`] holds each tenant's pacer for one
//! leader term (a new leader starts again from the configured value).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// How long the pacer watches before it decides again.
pub const WINDOW_MS: u64 = 5_000;

/// Quiet windows at a steady limit after which one more file is tried anyway (the EHR may
/// have freed capacity that a steady limit would never discover).
const PROBE_AFTER_WINDOWS: u32 = 6;

/// Quiet windows at the limit below the last one the EHR throttled before that one is
/// tried again.
const PROBE_CEILING_AFTER_WINDOWS: u32 = 24;

/// A rate counts as risen when it grew by more than this share.
const RISE: f64 = 0.05;

/// What the pacer decided at the end of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Grew { to: usize },
    BackedOff { to: usize },
}

#[derive(Debug, Clone)]
pub struct Pacer {
    limit: usize,
    max: usize,
    window_started_ms: u64,
    bytes_at_window_start: Option<u64>,
    throttled: u64,
    /// The last full window's rate (bytes/s) at the current limit, if measured.
    last_rate: Option<f64>,
    quiet_windows: u32,
    /// One below the limit the EHR last throttled at: growth stops here (so the limit
    /// settles below the EHR's threshold instead of sawing across it), and only a probe
    /// after a long quiet goes past it.
    ceiling: Option<usize>,
    /// The tenant's leases reached the limit at some tick of this window.
    saturated: bool,
}

impl Pacer {
    pub fn new(start: usize, max: usize, now_ms: u64) -> Pacer {
        let max = max.max(1);
        Pacer {
            limit: start.clamp(1, max),
            max,
            window_started_ms: now_ms,
            bytes_at_window_start: None,
            throttled: 0,
            last_rate: None,
            quiet_windows: 0,
            ceiling: None,
            saturated: false,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Workers saw `responses` 429/503 answers from the EHR.
    pub fn throttled(&mut self, responses: u64) {
        self.throttled += responses;
    }

    /// The leader's tick: `bytes` is everything downloaded for the tenant so far, and
    /// `saturated` whether its leases are at the limit now (when they never were during a
    /// window, the limit is not what holds the tenant back, and it stays).
    pub fn tick(&mut self, now_ms: u64, bytes: u64, saturated: bool) -> Option<Change> {
        self.saturated |= saturated;
        let Some(start_bytes) = self.bytes_at_window_start else {
            self.start_window(now_ms, bytes);
            return None;
        };
        let elapsed = now_ms.saturating_sub(self.window_started_ms);
        if elapsed < WINDOW_MS {
            return None;
        }
        let throttled = std::mem::take(&mut self.throttled);
        let saturated = std::mem::take(&mut self.saturated);
        // Bytes can go down (a finished job archived out of the state): no measurement.
        let rate = (bytes >= start_bytes).then(|| (bytes - start_bytes) as f64 * 1000.0 / elapsed as f64);
        self.start_window(now_ms, bytes);
        if throttled > 0 {
            self.ceiling = Some(self.limit.saturating_sub(1).max(1));
            let to = (self.limit / 2).max(1);
            self.last_rate = None;
            self.quiet_windows = 0;
            return (to != self.limit).then(|| {
                self.limit = to;
                Change::BackedOff { to }
            });
        }
        let rate = rate?;
        if !saturated || self.limit >= self.max {
            self.last_rate = Some(rate);
            return None;
        }
        let risen = self.last_rate.is_none_or(|last| rate > last * (1.0 + RISE));
        let at_ceiling = self.ceiling.is_some_and(|ceiling| self.limit >= ceiling);
        self.quiet_windows += 1;
        let probe = self.quiet_windows
            >= if at_ceiling {
                PROBE_CEILING_AFTER_WINDOWS
            } else {
                PROBE_AFTER_WINDOWS
            };
        if (risen && !at_ceiling) || probe {
            if at_ceiling {
                self.ceiling = None;
            }
            self.limit += 1;
            self.quiet_windows = 0;
            self.last_rate = Some(rate);
            return Some(Change::Grew { to: self.limit });
        }
        self.last_rate = Some(rate);
        None
    }

    fn start_window(&mut self, now_ms: u64, bytes: u64) {
        self.window_started_ms = now_ms;
        self.bytes_at_window_start = Some(bytes);
    }
}

/// Each tenant's pacer for one leader term, shared by the term's tick (which decides) and
/// the lease manager (which reads the limits) and the worker service (which reports
/// throttling).
#[derive(Debug, Default)]
pub struct Pacing {
    pacers: Mutex<BTreeMap<String, Pacer>>,
}

impl Pacing {
    /// One pacer per tenant: (name, start, max).
    pub fn new(tenants: impl IntoIterator<Item = (String, usize, usize)>, now_ms: u64) -> Pacing {
        Pacing {
            pacers: Mutex::new(
                tenants
                    .into_iter()
                    .map(|(name, start, max)| (name, Pacer::new(start, max, now_ms)))
                    .collect(),
            ),
        }
    }

    /// Each tenant's pacer from its configuration: it starts at `export.concurrency` and
    /// never goes above `export.max_concurrency` (unset: the start).
    pub fn for_tenants(tenants: &BTreeMap<String, fhirhaul_common::config::TenantConfig>, now_ms: u64) -> Pacing {
        Pacing::new(
            tenants.iter().map(|(name, config)| {
                let start = config.export.concurrency.max(1);
                (name.clone(), start, config.export.max_concurrency.unwrap_or(start))
            }),
            now_ms,
        )
    }

    fn pacers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pacer>> {
        self.pacers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limits(&self) -> BTreeMap<String, usize> {
        self.pacers()
            .iter()
            .map(|(name, p)| (name.clone(), p.limit()))
            .collect()
    }

    pub fn throttled(&self, tenant: &str, responses: u64) {
        if let Some(pacer) = self.pacers().get_mut(tenant) {
            pacer.throttled(responses);
        }
    }

    /// Ticks every tenant's pacer with (bytes so far, saturated); returns what changed.
    pub fn tick(&self, now_ms: u64, observed: &BTreeMap<String, (u64, bool)>) -> Vec<(String, Change)> {
        let mut changes = Vec::new();
        for (name, pacer) in self.pacers().iter_mut() {
            let (bytes, saturated) = observed.get(name).copied().unwrap_or((0, false));
            if let Some(change) = pacer.tick(now_ms, bytes, saturated) {
                changes.push((name.clone(), change));
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EHR that serves `per_file` bytes/s per concurrent download up to `capacity`
    /// downloads, and answers 429 to some requests beyond it; `seconds` of ticks every
    /// 500 ms. Returns the limits seen at each window's end.
    fn run(pacer: &mut Pacer, capacity: usize, seconds: u64, per_file: u64) -> Vec<usize> {
        let mut bytes = 0u64;
        let mut limits = Vec::new();
        for step in 0..=(seconds * 2) {
            let now = step * 500;
            let active = pacer.limit();
            bytes += per_file * active.min(capacity) as u64 / 2;
            if active > capacity {
                pacer.throttled((active - capacity) as u64);
            }
            if pacer.tick(now, bytes, true).is_some() || now % WINDOW_MS == 0 {
                limits.push(pacer.limit());
            }
        }
        limits
    }

    #[test]
    fn it_grows_while_throughput_rises_and_settles_below_the_ehrs_429_threshold_within_a_minute() {
        let mut pacer = Pacer::new(2, 32, 0);
        let limits = run(&mut pacer, 6, 60, 1_000_000);
        let last_20s = &limits[limits.len() - 4..];
        assert!(
            limits.iter().any(|l| *l > 2),
            "it grew from the configured value: {limits:?}"
        );
        assert!(
            last_20s.iter().all(|l| (3..=6).contains(l)),
            "below the EHR's threshold of 6 and not collapsed: {limits:?}"
        );
    }

    #[test]
    fn a_429_halves_the_limit_and_it_never_goes_below_one_or_above_the_maximum() {
        let mut pacer = Pacer::new(8, 8, 0);
        pacer.tick(0, 0, true);
        pacer.throttled(3);
        assert_eq!(pacer.tick(WINDOW_MS, 1000, true), Some(Change::BackedOff { to: 4 }));
        for n in 2..6 {
            pacer.throttled(1);
            pacer.tick(WINDOW_MS * n, 1000, true);
        }
        assert_eq!(pacer.limit(), 1);
        let mut capped = Pacer::new(4, 5, 0);
        run(&mut capped, 100, 120, 1_000_000);
        assert_eq!(capped.limit(), 5, "never above the configured maximum");
    }

    #[test]
    fn an_unsaturated_or_fixed_limit_stays_where_it_is() {
        let mut idle = Pacer::new(4, 16, 0);
        for n in 0..40 {
            assert_eq!(idle.tick(n * WINDOW_MS, n * 1_000_000, false), None);
        }
        assert_eq!(idle.limit(), 4, "the limit was not what held the tenant back");
        let mut fixed = Pacer::new(4, 4, 0);
        run(&mut fixed, 100, 120, 1_000_000);
        assert_eq!(
            fixed.limit(),
            4,
            "no maximum above the start: the configured value holds"
        );
    }
}
