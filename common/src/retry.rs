//! Waiting between attempts: `Retry-After` parsing and exponential backoff with jitter.

use std::time::{Duration, SystemTime};

use crate::clock::Entropy;

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (IMF-fixdate, RFC 850 or
/// asctime, as RFC 9110 requires a recipient to accept). A date in the past is a zero delay.
/// Returns `None` for a value that is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // Some servers send a fractional or negative number of seconds.
    if let Ok(seconds) = value.parse::<f64>() {
        if seconds.is_finite() {
            return Some(Duration::from_secs_f64(seconds.clamp(0.0, 1e9)));
        }
        return None;
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Exponential backoff: each delay is drawn uniformly from `[current/2, current]` ("equal
/// jitter"), then `current` doubles up to `max`. A server-given delay replaces the drawn one,
/// clamped to `[min, max]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    entropy: Entropy,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, entropy: Entropy) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            current: min,
            entropy,
        }
    }

    /// The next delay; `server_hint` is a parsed `Retry-After`, honoured within bounds.
    pub fn next_delay(&mut self, server_hint: Option<Duration>) -> Duration {
        let drawn = self
            .entropy
            .duration_between(self.current / 2, self.current)
            .max(self.min);
        self.current = (self.current * 2).min(self.max);
        match server_hint {
            Some(hint) => hint.clamp(self.min, self.max),
            None => drawn,
        }
    }

    /// Back to the shortest delay, after progress was made.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        httpdate::parse_http_date(text).unwrap()
    }

    #[test]
    fn retry_after_seconds_and_all_three_date_forms() {
        let now = at("Sun, 06 Nov 1994 08:49:00 GMT");
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(37))
        );
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now),
            Some(Duration::from_secs(37))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:37 1994", now),
            Some(Duration::from_secs(37))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("-5", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_to_the_cap_and_honours_hints_within_bounds() {
        let min = Duration::from_secs(15);
        let max = Duration::from_secs(300);
        let mut backoff = Backoff::new(min, max, Entropy::from_seed(3));
        let mut last_upper = Duration::ZERO;
        for _ in 0..12 {
            let d = backoff.next_delay(None);
            assert!(d >= min && d <= max, "{d:?}");
            last_upper = last_upper.max(d);
        }
        assert!(last_upper > Duration::from_secs(150), "reaches the cap region");
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(1))), min);
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(9999))), max);
        assert_eq!(
            backoff.next_delay(Some(Duration::from_secs(42))),
            Duration::from_secs(42)
        );
        backoff.reset();
        assert!(backoff.next_delay(None) <= min);
    }
}
