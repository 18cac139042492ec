//! Waiting between attempts: `Retry-After` parsing and exponential backoff with jitter.

use std::time::{Duration, SystemTime};

use crate::clock::Entropy;

/// Seconds-since-1970 values at or above this (2001-09-09) are not delays anybody means:
/// some servers send the absolute time to retry at, in seconds or milliseconds.
const EPOCH_SECONDS_FROM: u64 = 1_000_000_000;
const EPOCH_MILLIS_FROM: u64 = 1_000_000_000_000;

/// How a `Retry-After` value was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfterForm {
    /// delay-seconds, as RFC 9110 defines it.
    Seconds,
    /// An HTTP-date.
    Date,
    /// A number too large to be a delay, read as an absolute time in seconds (or
    /// milliseconds) since 1970: not standard, but some servers send it.
    EpochSeconds,
    EpochMillis,
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (IMF-fixdate, RFC 850 or
/// asctime, as RFC 9110 requires a recipient to accept). A date in the past is a zero delay.
/// Returns `None` for a value that is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    parse_retry_after_form(value, now).map(|(delay, _)| delay)
}

/// [`parse_retry_after`], also saying how the value was read, so a caller can log a value
/// that was an absolute time rather than a delay.
pub fn parse_retry_after_form(value: &str, now: SystemTime) -> Option<(Duration, RetryAfterForm)> {
    let value = value.trim();
    if let Ok(number) = value.parse::<u64>() {
        let until = |at: SystemTime| at.duration_since(now).unwrap_or(Duration::ZERO);
        return Some(if number >= EPOCH_MILLIS_FROM {
            (
                until(SystemTime::UNIX_EPOCH + Duration::from_millis(number)),
                RetryAfterForm::EpochMillis,
            )
        } else if number >= EPOCH_SECONDS_FROM {
            (
                until(SystemTime::UNIX_EPOCH + Duration::from_secs(number)),
                RetryAfterForm::EpochSeconds,
            )
        } else {
            (Duration::from_secs(number), RetryAfterForm::Seconds)
        });
    }
    // Some servers send a fractional or negative number of seconds.
    if let Ok(seconds) = value.parse::<f64>() {
        if seconds.is_finite() && seconds < EPOCH_SECONDS_FROM as f64 {
            return Some((Duration::from_secs_f64(seconds.max(0.0)), RetryAfterForm::Seconds));
        }
        return None;
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some((at.duration_since(now).unwrap_or(Duration::ZERO), RetryAfterForm::Date))
}

/// The bounds within which a server's `Retry-After` is honoured as given: below, a server
/// asking for no wait at all; above, a value nobody should wait for in one go.
pub const HINT_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// Exponential backoff: each delay is drawn uniformly from `[current/2, current]` ("equal
/// jitter"), then `current` doubles up to `max`. A server-given delay replaces the drawn
/// one, as given, within the hint bounds ([`HINT_BOUNDS`] unless set): the server knows
/// when it will be ready, and our own backoff bounds do not override it.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    hint_bounds: (Duration, Duration),
    current: Duration,
    entropy: Entropy,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, entropy: Entropy) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            hint_bounds: HINT_BOUNDS,
            current: min,
            entropy,
        }
    }

    /// Honour server hints within `[lowest, highest]` instead of [`HINT_BOUNDS`] (tests and
    /// simulations shrink the lower bound).
    pub fn with_hint_bounds(mut self, lowest: Duration, highest: Duration) -> Self {
        self.hint_bounds = (lowest, highest.max(lowest));
        self
    }

    /// The next delay; `server_hint` is a parsed `Retry-After`, honoured as given within
    /// the hint bounds.
    pub fn next_delay(&mut self, server_hint: Option<Duration>) -> Duration {
        let drawn = self
            .entropy
            .duration_between(self.current / 2, self.current)
            .max(self.min);
        self.current = (self.current * 2).min(self.max);
        match server_hint {
            Some(hint) => hint.clamp(self.hint_bounds.0, self.hint_bounds.1),
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
    fn an_absolute_epoch_is_read_as_a_time_not_a_delay_of_decades() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            parse_retry_after_form("1800000300", now),
            Some((Duration::from_secs(300), RetryAfterForm::EpochSeconds))
        );
        assert_eq!(
            parse_retry_after_form("1800000300000", now),
            Some((Duration::from_secs(300), RetryAfterForm::EpochMillis))
        );
        assert_eq!(
            parse_retry_after_form("1799999999", now),
            Some((Duration::ZERO, RetryAfterForm::EpochSeconds)),
            "an absolute time in the past means now"
        );
        assert_eq!(
            parse_retry_after_form("120", now),
            Some((Duration::from_secs(120), RetryAfterForm::Seconds))
        );
        assert_eq!(
            parse_retry_after("1800000300.5", now),
            None,
            "a fractional epoch is nonsense"
        );
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
        // The server's own delay is honoured as given, outside our backoff bounds too ...
        assert_eq!(
            backoff.next_delay(Some(Duration::from_secs(1))),
            Duration::from_secs(1),
            "an EHR that says 1 s is asked again in 1 s, not in min_interval"
        );
        assert_eq!(
            backoff.next_delay(Some(Duration::from_secs(900))),
            Duration::from_secs(900)
        );
        // ... within sane bounds.
        assert_eq!(backoff.next_delay(Some(Duration::ZERO)), HINT_BOUNDS.0);
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(99_999))), HINT_BOUNDS.1);
        let mut shrunk = Backoff::new(min, max, Entropy::from_seed(3))
            .with_hint_bounds(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(shrunk.next_delay(Some(Duration::ZERO)), Duration::from_millis(100));
        assert_eq!(shrunk.next_delay(Some(Duration::from_secs(60))), Duration::from_secs(5));
        backoff.reset();
        assert!(backoff.next_delay(None) <= min);
    }
}
