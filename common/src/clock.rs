//! Injectable wall-clock time and randomness, so a simulation seed replays a run exactly.
//!
//! Durations and sleeps use `tokio::time` (which paused tests and turmoil control); only the
//! few places that need a calendar time (JWT `exp`, HTTP-date `Retry-After`, `Expires`) ask a
//! [`Clock`]. Every random choice (JWT `jti`, backoff jitter) comes from an [`Entropy`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// A source of calendar time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;

    /// [`Clock::now`] in milliseconds since 1970 (0 before it), as replicated state keeps
    /// times.
    fn now_unix_ms(&self) -> u64 {
        unix_ms(self.now())
    }
}

/// A calendar time in milliseconds since 1970 (0 before it), as replicated state keeps
/// times.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The seam itself: the one read of the wall clock.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Calendar time that advances with `tokio::time`: `base` plus the tokio time elapsed since
/// construction. Under `tokio::time::pause()` or turmoil it is fully deterministic.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(base: SystemTime) -> Self {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// A shared, seedable random number generator. Cloning shares the same stream.
#[derive(Clone)]
pub struct Entropy {
    rng: Arc<Mutex<StdRng>>,
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entropy")
    }
}

impl Entropy {
    /// Seeded from the operating system: for production.
    pub fn from_os() -> Self {
        Self::wrap(StdRng::from_entropy())
    }

    /// A reproducible stream: for tests and simulation.
    pub fn from_seed(seed: u64) -> Self {
        Self::wrap(StdRng::seed_from_u64(seed))
    }

    fn wrap(rng: StdRng) -> Self {
        Entropy {
            rng: Arc::new(Mutex::new(rng)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-draw; the generator state is
        // still a valid generator state.
        let mut guard = self.rng.lock().unwrap_or_else(|poison| poison.into_inner());
        f(&mut guard)
    }

    /// `n` random bytes as lowercase hex (for nonces such as a JWT `jti`).
    pub fn hex(&self, n: usize) -> String {
        let mut bytes = vec![0u8; n];
        self.with(|rng| rng.fill_bytes(&mut bytes));
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A uniformly random duration in `[low, high]`.
    pub fn duration_between(&self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        let nanos = self.with(|rng| rng.gen_range(low.as_nanos()..=high.as_nanos()));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_stream() {
        let a = Entropy::from_seed(7);
        let b = Entropy::from_seed(7);
        assert_eq!(a.hex(16), b.hex(16));
        assert_eq!(
            a.duration_between(Duration::ZERO, Duration::from_secs(9)),
            b.duration_between(Duration::ZERO, Duration::from_secs(9))
        );
        assert_ne!(a.hex(16), Entropy::from_seed(8).hex(16));
    }

    #[test]
    fn duration_between_stays_in_bounds() {
        let entropy = Entropy::from_seed(1);
        for _ in 0..1000 {
            let d = entropy.duration_between(Duration::from_secs(2), Duration::from_secs(3));
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(3));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_tokio_time() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = TokioClock::starting_at(base);
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), base + Duration::from_secs(90));
    }
}
