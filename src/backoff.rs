//! Exponential backoff with jitter, for everything that waits before trying again:
//! rows after a transient APNs failure, database and APNs reconnects.

use std::time::Duration;

use rand::Rng;

/// The wait before try number `attempt` (1 = the first retry): `base * 2^(attempt-1)`,
/// capped at `max`, then "equal jitter": half of it fixed, half random, so that many
/// waiters that failed together do not come back together.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    half + rand::thread_rng().gen_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_its_jitter_and_stops_at_max() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        for _ in 0..100 {
            let first = backoff(1, base, max);
            assert!(
                first >= Duration::from_secs(1) && first <= base,
                "{first:?}"
            );
            let third = backoff(3, base, max);
            assert!(third >= Duration::from_secs(4) && third <= Duration::from_secs(8));
            let late = backoff(40, base, max);
            assert!(late >= Duration::from_secs(30) && late <= max, "{late:?}");
        }
    }
}
