//! How many rows per second the claims are finding: an exponentially weighted average
//! with a time constant (the awake keeper uses `awake_linger`), fed by every claim and
//! read by the keeper to decide whether looking for rows costs the database less than
//! the writers' NOTIFYs would (see `awake`).
//!
//! Each row found at time `tᵢ` contributes `e^(-(t - tᵢ)/τ) / τ`; over a steady arrival of
//! `r` rows per second the sum averages `r`, and it decays to a tenth within `2.3 τ` once
//! rows stop. A burst of `n` rows counts as `n / τ` at once.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct ArrivalRate {
    /// The rate at `at`, rows per second.
    per_second: f64,
    at: Instant,
}

impl ArrivalRate {
    pub fn new(now: Instant) -> ArrivalRate {
        ArrivalRate {
            per_second: 0.0,
            at: now,
        }
    }

    /// `rows` were found at `now`.
    pub fn add(&mut self, rows: u64, now: Instant, tau: Duration) {
        self.per_second = self.per_second(now, tau) + rows as f64 / tau_secs(tau);
        self.at = self.at.max(now);
    }

    /// The rate as of `now`: what was found decays for the time since.
    pub fn per_second(&self, now: Instant, tau: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.per_second * (-elapsed / tau_secs(tau)).exp()
    }
}

/// A zero time constant would divide by zero; the keeper never asks with one (a zero
/// `awake_linger` means never awake), but the arithmetic stays finite regardless.
fn tau_secs(tau: Duration) -> f64 {
    tau.as_secs_f64().max(1e-3)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAU: Duration = Duration::from_secs(1);

    fn steady(rate: u64, for_secs: u64) -> (ArrivalRate, Instant) {
        let start = Instant::now();
        let mut r = ArrivalRate::new(start);
        let gap = Duration::from_secs(1) / rate as u32;
        let mut t = start;
        for _ in 0..rate * for_secs {
            t += gap;
            r.add(1, t, TAU);
        }
        (r, t)
    }

    #[test]
    fn a_steady_arrival_reads_as_its_rate() {
        for rate in [10, 100, 1000] {
            let (r, t) = steady(rate, 10);
            let read = r.per_second(t, TAU);
            // Just after a row: the average plus at most one row's share.
            assert!(
                (rate as f64..rate as f64 + 1.1).contains(&read),
                "{rate}/s read as {read}"
            );
        }
    }

    #[test]
    fn it_decays_once_rows_stop_and_a_burst_counts_whole() {
        let (r, t) = steady(1000, 5);
        let later = r.per_second(t + 3 * TAU, TAU);
        assert!(later < 1000.0 * 0.06, "{later}");
        let mut b = ArrivalRate::new(t);
        b.add(300, t, TAU);
        assert!((b.per_second(t, TAU) - 300.0).abs() < 1e-9);
        assert!(b.per_second(t + TAU, TAU) < 300.0 / 2.0);
    }

    #[test]
    fn a_trickle_stays_far_below_a_threshold_of_hundreds() {
        let (r, t) = steady(10, 60);
        assert!(r.per_second(t, TAU) < 12.0);
    }
}
