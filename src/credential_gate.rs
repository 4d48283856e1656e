//! What an app does while its push service refuses its credentials (APNs's 403s, FCM's
//! PERMISSION_DENIED or a token endpoint that refuses the service account).
//!
//! A refused credential is the app's problem, not the row's: every row would get the
//! same answer. So the app backs off (capped exponential), answers every notification
//! with `Deferred` without making a request while it waits, then lets one request through
//! as a probe. The probe's success clears it (only the probe's: a request sent before
//! the refusal and answered after it proves nothing). The log says so once per
//! transition.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info};

use crate::backoff::backoff;
use crate::transport::Delivery;

/// `Deferred` never asks to come back sooner than this (no busy loop on a dead app).
pub const MIN_DEFER: Duration = Duration::from_secs(1);

/// One app's standing with its push service.
pub struct CredentialGate {
    app: String,
    /// The service's name, for the log and `/healthz` ("APNs", "FCM").
    service: &'static str,
    backoff_base: Duration,
    backoff_max: Duration,
    /// How long a probe may take to answer: rows wait that long while it is out.
    probe_wait: Duration,
    state: Mutex<Refused>,
}

#[derive(Default)]
struct Refused {
    /// Why the service refused the credentials, while it does.
    reason: Option<String>,
    /// Refusals in a row: the backoff grows with them.
    failures: u32,
    until: Option<Instant>,
    /// A request is out testing whether the credentials work again.
    probing: bool,
}

/// What the credential state allows for the next request.
pub enum Gate<'a> {
    Open,
    /// This request tests the credentials; the slot is released when the guard drops.
    Probe(ProbeGuard<'a>),
    /// No request: the row is deferred.
    Closed(Delivery),
}

impl CredentialGate {
    pub fn new(
        app: &str,
        service: &'static str,
        backoff_base: Duration,
        backoff_max: Duration,
        probe_wait: Duration,
    ) -> CredentialGate {
        CredentialGate {
            app: app.to_owned(),
            service,
            backoff_base,
            backoff_max,
            probe_wait,
            state: Mutex::new(Refused::default()),
        }
    }

    /// `Err` with the service's reason while it refuses the credentials.
    pub fn health(&self) -> Result<(), String> {
        match &self.state.lock().unwrap().reason {
            Some(reason) => Err(format!(
                "{} refuses the credentials: {reason}",
                self.service
            )),
            None => Ok(()),
        }
    }

    /// Whether the next request may go out.
    pub fn gate(&self) -> Gate<'_> {
        let mut r = self.state.lock().unwrap();
        let Some(reason) = &r.reason else {
            return Gate::Open;
        };
        let now = Instant::now();
        match r.until {
            Some(until) if until > now => Gate::Closed(Delivery::Deferred {
                reason: reason.clone(),
                after: (until - now).max(MIN_DEFER),
            }),
            // While the probe is out, defer for as long as it may take to answer:
            // deferring by a second would rewrite the app's whole backlog every second.
            _ if r.probing => Gate::Closed(Delivery::Deferred {
                reason: reason.clone(),
                after: self.probe_wait.max(MIN_DEFER),
            }),
            _ => {
                r.probing = true;
                Gate::Probe(ProbeGuard(self))
            }
        }
    }

    /// The service refused the credentials: the row is deferred, the app backs off.
    pub fn refused(&self, reason: String) -> Delivery {
        let mut r = self.state.lock().unwrap();
        let now = Instant::now();
        // Requests already in flight when the first refusal came do not grow the backoff.
        if let Some(until) = r.until.filter(|u| *u > now) {
            return Delivery::Deferred {
                reason,
                after: (until - now).max(MIN_DEFER),
            };
        }
        let wait = backoff(r.failures, self.backoff_base, self.backoff_max);
        r.failures = r.failures.saturating_add(1);
        r.until = Some(now + wait);
        if r.reason.as_deref() != Some(reason.as_str()) {
            error!(app = %self.app, service = self.service, reason = %reason, retry_in = ?wait,
                   "the service refuses this app's credentials; its rows stay pending");
        } else {
            info!(app = %self.app, service = self.service, reason = %reason, retry_in = ?wait,
                  "the service still refuses this app's credentials");
        }
        r.reason = Some(reason.clone());
        Delivery::Deferred {
            reason,
            after: wait.max(MIN_DEFER),
        }
    }
}

/// Releases the probe slot however the probing request ends (even when dropped). Only a
/// probe reopens a closed gate: a request that went out before the refusal and is
/// answered after it proves nothing about the credentials now, and reopening on it would
/// send the backlog into the next refusal.
pub struct ProbeGuard<'a>(&'a CredentialGate);

impl ProbeGuard<'_> {
    /// The service took the probe: the credentials work again.
    pub fn accepted(self) {
        let mut r = self.0.state.lock().unwrap();
        if r.reason.take().is_some() {
            info!(app = %self.0.app, service = self.0.service,
                  "the service accepts this app's credentials again");
        }
        *r = Refused::default();
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> CredentialGate {
        CredentialGate::new(
            "a",
            "FCM",
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_secs(5),
        )
    }

    fn probe_guard(gate: Gate<'_>) -> ProbeGuard<'_> {
        match gate {
            Gate::Probe(guard) => guard,
            _ => panic!("not a probe"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_closes_the_gate_until_one_probe_answers() {
        let g = gate();
        assert!(matches!(g.gate(), Gate::Open));
        let Delivery::Deferred { after, .. } = g.refused("no".into()) else {
            panic!()
        };
        assert!(
            after >= MIN_DEFER && after <= Duration::from_secs(10),
            "{after:?}"
        );
        assert!(g
            .health()
            .unwrap_err()
            .contains("FCM refuses the credentials: no"));
        assert!(matches!(g.gate(), Gate::Closed(Delivery::Deferred { .. })));
        tokio::time::advance(Duration::from_secs(11)).await;
        let probe = g.gate();
        assert!(matches!(probe, Gate::Probe(_)));
        // A request sent before the refusal and answered now proves nothing: there is
        // no way to accept but the probe's, so the gate stays closed for the others.
        // While the probe is out, others wait for as long as it may take.
        match g.gate() {
            Gate::Closed(Delivery::Deferred { after, .. }) => {
                assert_eq!(after, Duration::from_secs(5))
            }
            _ => panic!("a second probe"),
        }
        probe_guard(probe).accepted();
        assert!(g.health().is_ok());
        assert!(matches!(g.gate(), Gate::Open));
    }
}
