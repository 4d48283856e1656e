//! Capped exponential backoff with jitter, shared by everything that waits before trying
//! again: reconnecting to APNs, an app whose credentials are refused, rows sent back to
//! `pending`.

use std::time::Duration;

use rand::Rng;

/// How long to wait before attempt `attempt + 1`, `attempt` counting the failures so far
/// from 0: `base * 2^attempt`, capped at `max`, then "equal jitter" — half the value fixed,
/// the other half random — so many waiters that failed together do not retry together,
/// while each still waits at least half the nominal time.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let nominal = nominal(attempt, base, max);
    let half = nominal / 2;
    let spread = (nominal - half).as_nanos() as u64;
    half + Duration::from_nanos(rand::thread_rng().gen_range(0..=spread))
}

/// `base * 2^attempt`, capped at `max`, without jitter.
pub fn nominal(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubles_and_caps() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        assert_eq!(nominal(0, base, max), Duration::from_secs(2));
        assert_eq!(nominal(1, base, max), Duration::from_secs(4));
        assert_eq!(nominal(4, base, max), Duration::from_secs(32));
        assert_eq!(nominal(5, base, max), max);
        assert_eq!(nominal(1000, base, max), max);
        assert_eq!(
            nominal(u32::MAX, Duration::from_secs(u64::MAX / 2), max),
            max
        );
    }

    #[test]
    fn jitter_stays_between_half_and_whole() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempt in 0..20 {
            let n = nominal(attempt, base, max);
            for _ in 0..50 {
                let b = backoff(attempt, base, max);
                assert!(b >= n / 2 && b <= n, "attempt {attempt}: {b:?} vs {n:?}");
            }
        }
        assert_eq!(backoff(3, Duration::ZERO, max), Duration::ZERO);
    }
}
