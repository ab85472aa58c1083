//! When and how long to wait before retrying.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Longest single backoff step.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured; a larger value is clamped (a 5-minute block is better
/// spent retrying now and then than stalling every caller).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base * 2^attempt)]`.
/// `attempt` counts from 0 (the wait after the first failure); `random` is any random u64.
pub fn backoff(base: Duration, cap: Duration, attempt: u32, random: u64) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let ceiling = base.saturating_mul(factor).min(cap);
    let nanos = ceiling.as_nanos() as u64; // at most the cap: fits
    Duration::from_nanos(random % nanos.saturating_add(1))
}

/// `Retry-After` in delay-seconds form, clamped to [`MAX_RETRY_AFTER`]. The HTTP-date form is
/// not used by Cloudflare; it gives None, and the caller falls back to backoff.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let secs = if let Ok(n) = value.parse::<u64>() {
        Duration::from_secs(n)
    } else {
        let f = value.parse::<f64>().ok()?;
        if !f.is_finite() || f < 0.0 {
            return None;
        }
        Duration::from_secs_f64(f.min(MAX_RETRY_AFTER.as_secs_f64()))
    };
    Some(secs.min(MAX_RETRY_AFTER))
}

/// Whether a response status is worth another attempt.
pub fn retryable_status(status: u16) -> bool {
    status == 429 || (500..600).contains(&status)
}

/// A random u64 without a crate: std's `RandomState` is seeded per process from the OS and
/// advanced per instance, so hashing nothing gives a fresh SipHash output each call.
pub fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_bounds() {
        let base = 100 * MS;
        // random = u64::MAX - k walks near the top; the ceiling itself is reachable.
        for attempt in 0..40 {
            let ceiling = (base * 2u32.saturating_pow(attempt.min(20))).min(MAX_BACKOFF);
            for r in [0, 1, 12345, u64::MAX, random_u64()] {
                let d = backoff(base, MAX_BACKOFF, attempt, r);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            }
        }
        assert_eq!(backoff(base, MAX_BACKOFF, 0, 0), Duration::ZERO);
        let n = (100 * MS).as_nanos() as u64;
        assert_eq!(backoff(base, MAX_BACKOFF, 0, n), 100 * MS);
        assert_eq!(backoff(base, MAX_BACKOFF, 3, 800 * 1_000_000), 800 * MS);
        let cap = MAX_BACKOFF.as_nanos() as u64;
        assert_eq!(backoff(base, MAX_BACKOFF, 30, cap), MAX_BACKOFF);
        assert_eq!(backoff(base, MAX_BACKOFF, u32::MAX, cap), MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, MAX_BACKOFF, 5, 99), Duration::ZERO);
    }

    #[test]
    fn backoff_spreads() {
        let waits: Vec<_> = (0..64)
            .map(|_| backoff(100 * MS, MAX_BACKOFF, 4, random_u64()))
            .collect();
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 32, "jitter is not random: {waits:?}");
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("300"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("1e300"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn statuses() {
        for s in [429, 500, 502, 503, 504, 599] {
            assert!(retryable_status(s));
        }
        for s in [200, 400, 401, 403, 404, 409, 413, 414, 600] {
            assert!(!retryable_status(s));
        }
    }
}
