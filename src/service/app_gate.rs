//! An app's standing with its push service: open, or paused while the service refuses
//! the app's credentials (APNs's 403s, FCM's PERMISSION_DENIED, a token endpoint that
//! refuses the service account), throttles the app as a whole (FCM's 503, the same
//! quota answer for one device after another, APNs's TooManyProviderTokenUpdates), or
//! cannot be reached at all (no connection to it can be had: refused, timed out, a proxy
//! that refuses the tunnel).
//!
//! Each is the app's problem, not the row's: every row would get the same answer, and
//! burning the backlog's attempts on it would fail rows that only had to wait. So the
//! app pauses — for the service's `Retry-After` when it gave one, else a capped
//! exponential backoff — and answers every notification with `Deferred` (no request, no
//! attempt counted) until the pause ends. Then one request goes out as a probe; only the
//! probe's acceptance reopens the app (a request sent before the pause and answered after
//! it proves nothing). The log says so once per transition.
//!
//! Rows deferred by a pause come back once it is over and the probe has had its time
//! ([`Pause::backlog_at`]). The daemon parks the app's waiting backlog out of the
//! claims' way meanwhile, makes one row due when the pause ends for the probe, and
//! brings the backlog back once the probe is accepted (`paused_apps`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::backoff::backoff;
use crate::outcome::MAX_RETRY_AFTER;
use crate::service::{Exchanged, Scope};
use crate::transport::{Delivery, Pause, PauseCause};

/// `Deferred` never asks to come back sooner than this (no busy loop on a dead app).
pub const MIN_DEFER: Duration = Duration::from_secs(1);

/// Throttling answers for this many different device tokens in a row, no request
/// accepted between them, mean the service throttles the app, not a device. High enough
/// that a busy app's scattered per-device answers (one in twenty, say) never add up to
/// it by chance; low enough that an app-wide quota costs a few rows one attempt each.
pub const THROTTLED_TARGETS: usize = 10;

/// Refusals in a row, no request accepted between them, after which a refusal that may
/// be about its row (its own topic) is the app's after all: credentials revoked while
/// the app was sending cost at most this many attempts, one row each.
pub const ROW_REFUSALS: u32 = 3;

/// One app's standing with its push service.
pub struct AppGate {
    app: String,
    /// The service's name, for the log and `/healthz` ("APNs", "FCM").
    service: &'static str,
    backoff_base: Duration,
    backoff_max: Duration,
    /// How long a probe may take to answer: rows wait that long while it is out.
    probe_wait: Duration,
    state: Mutex<Standing>,
}

#[derive(Default)]
struct Standing {
    /// Why the app is paused, while it is.
    paused: Option<(PauseCause, String)>,
    /// Pauses in a row: the backoff grows with them.
    failures: u32,
    until: Option<Instant>,
    /// A request is out testing whether the service takes the app's requests again.
    probing: bool,
    /// The current (or last) pause's number, from [`PAUSES`].
    pause_number: u64,
    /// The service accepted a request since the app was last paused (or started).
    proven: bool,
    /// Device tokens (hashed) the service throttled in a row, none accepted between.
    throttled: Vec<u64>,
    /// Refusals that may have been about their row, in a row, none accepted between.
    row_refusals: u32,
}

/// Numbers every pause of every gate.
static PAUSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What the app's standing allows for the next request.
pub enum Gate<'a> {
    Open,
    /// This request is the probe; the slot is released when the guard drops.
    Probe(ProbeGuard<'a>),
    /// No request: the row is deferred.
    Closed(Delivery),
}

impl AppGate {
    pub fn new(
        app: &str,
        service: &'static str,
        backoff_base: Duration,
        backoff_max: Duration,
        probe_wait: Duration,
    ) -> AppGate {
        AppGate {
            app: app.to_owned(),
            service,
            backoff_base,
            backoff_max,
            probe_wait: probe_wait.max(MIN_DEFER),
            state: Mutex::new(Standing::default()),
        }
    }

    /// `Err` with the service's reason while the app is paused.
    pub fn health(&self) -> Result<(), String> {
        match &self.state.lock().unwrap().paused {
            Some((PauseCause::Credentials, reason)) => Err(format!(
                "{} refuses the credentials: {reason}",
                self.service
            )),
            Some((PauseCause::Throttled, reason)) => {
                Err(format!("{} throttles this app: {reason}", self.service))
            }
            Some((PauseCause::Unreachable, reason)) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    /// The app's pause, until a probe is accepted.
    pub fn pause(&self) -> Option<Pause> {
        let s = self.state.lock().unwrap();
        let (cause, reason) = s.paused.clone()?;
        Some(Pause {
            app: self.app.clone(),
            origin: None,
            number: s.pause_number,
            until: s.until?,
            probe_wait: self.probe_wait,
            probing: s.probing,
            cause,
            reason,
        })
    }

    /// Whether the service has accepted a request of this app since its last pause: its
    /// credentials work, so a refusal may be about the row.
    pub fn proven(&self) -> bool {
        self.state.lock().unwrap().proven
    }

    /// Whether the next request may go out.
    pub fn gate(&self) -> Gate<'_> {
        let mut s = self.state.lock().unwrap();
        let Some((_, reason)) = &s.paused else {
            return Gate::Open;
        };
        let now = Instant::now();
        match s.until {
            // Back with the backlog, after the probe has had its time.
            Some(until) if until > now => Gate::Closed(Delivery::Deferred {
                reason: reason.clone(),
                after: (until - now + self.probe_wait).max(MIN_DEFER),
            }),
            // While the probe is out, defer for as long as it may take to answer:
            // deferring by a second would rewrite the app's whole backlog every second.
            _ if s.probing => Gate::Closed(Delivery::Deferred {
                reason: reason.clone(),
                after: self.probe_wait,
            }),
            _ => {
                s.probing = true;
                Gate::Probe(ProbeGuard(self))
            }
        }
    }

    /// One attempt for a row to `token`, through the gate: deferred without a request
    /// while the app is paused; else `exchange` (building the request, sending it, reading
    /// the answer; not started while paused) and its [`Exchanged`] turned into the row's
    /// delivery, a pause begun or ended on the way.
    pub async fn attempt(
        &self,
        token: &str,
        exchange: impl std::future::Future<Output = Exchanged>,
    ) -> Delivery {
        let probe = match self.gate() {
            Gate::Closed(deferred) => return deferred,
            Gate::Open => None,
            Gate::Probe(guard) => Some(guard),
        };
        let delivery = match exchange.await {
            Exchanged::Row(delivery) => delivery,
            Exchanged::Refused {
                reason,
                row_reason: Some(row_reason),
            } => self.refused_maybe_for_row(reason, row_reason),
            Exchanged::Refused { reason, .. } => self.refused(reason),
            Exchanged::Throttled {
                reason,
                after,
                scope: Scope::App,
            } => self.throttled(reason, after),
            Exchanged::Throttled {
                reason,
                after,
                scope: Scope::Target,
            } => self.throttled_target(token, reason, after),
            Exchanged::Unreachable { reason, after } => self.unreachable(reason, after),
        };
        if matches!(
            delivery,
            Delivery::Sent { .. } | Delivery::Unregistered { .. }
        ) {
            self.accepted(probe);
        }
        delivery
    }

    /// The service refused the app's credentials: the row is deferred, the app pauses.
    pub fn refused(&self, reason: String) -> Delivery {
        self.pause_for(PauseCause::Credentials, reason, None)
    }

    /// The service refused a request that may have been refused for its row (one naming
    /// its own topic): while the app's other requests are accepted (it is not paused,
    /// the service took one since its last pause, and fewer than [`ROW_REFUSALS`]
    /// refusals came in a row) the row is retried, counting the attempt, as `row_reason`
    /// says; otherwise it is the app's credentials, as [`AppGate::refused`].
    pub fn refused_maybe_for_row(&self, reason: String, row_reason: String) -> Delivery {
        {
            let mut s = self.state.lock().unwrap();
            s.row_refusals += 1;
            if s.paused.is_none() && s.proven && s.row_refusals < ROW_REFUSALS {
                return Delivery::retry(row_reason);
            }
        }
        self.refused(reason)
    }

    /// The service throttles the app as a whole: the row is deferred, the app pauses for
    /// `after` (the service's `Retry-After`) or its backoff.
    pub fn throttled(&self, reason: String, after: Option<Duration>) -> Delivery {
        self.pause_for(PauseCause::Throttled, reason, after)
    }

    /// No connection to the service could be had: the row is deferred, the app pauses
    /// until its pool tries to connect again (`after`).
    pub fn unreachable(&self, reason: String, after: Duration) -> Delivery {
        self.pause_for(PauseCause::Unreachable, reason, Some(after))
    }

    /// The service throttled one device token: the row is retried (counting the
    /// attempt), unless tokens one after another were, which is the app being throttled.
    pub fn throttled_target(
        &self,
        token: &str,
        reason: String,
        after: Option<Duration>,
    ) -> Delivery {
        {
            let mut s = self.state.lock().unwrap();
            let hash = token_hash(token);
            if !s.throttled.contains(&hash) {
                s.throttled.push(hash);
            }
            // While paused (a probe's answer, or one to a request sent before the pause),
            // it is the app's pause going on.
            if s.paused.is_none() && s.throttled.len() < THROTTLED_TARGETS {
                return Delivery::Retry { reason, after };
            }
        }
        self.throttled(
            format!("{reason} (for {THROTTLED_TARGETS} devices in a row: the app is throttled)"),
            after,
        )
    }

    /// The service took a request (sent, or answered about the token itself): its
    /// credentials work and it is not throttling the app. A probe's acceptance ends the
    /// pause; another request's only counts while the app is not paused.
    pub fn accepted(&self, probe: Option<ProbeGuard<'_>>) {
        let mut s = self.state.lock().unwrap();
        s.throttled.clear();
        s.row_refusals = 0;
        if probe.is_none() && s.paused.is_some() {
            return;
        }
        if let Some((cause, _)) = s.paused.take() {
            match cause {
                PauseCause::Credentials => info!(app = %self.app, service = self.service,
                                           "the service accepts this app's credentials again"),
                PauseCause::Throttled => info!(app = %self.app, service = self.service,
                                          "the service no longer throttles this app"),
                PauseCause::Unreachable => info!(app = %self.app, service = self.service,
                                            "the service is reachable again"),
            }
        }
        *s = Standing {
            proven: true,
            ..Standing::default()
        };
    }

    fn pause_for(&self, cause: PauseCause, reason: String, after: Option<Duration>) -> Delivery {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        // Requests already in flight when the pause began do not start another.
        if let Some(until) = s.until.filter(|u| *u > now) {
            return Delivery::Deferred {
                reason,
                after: (until - now + self.probe_wait).max(MIN_DEFER),
            };
        }
        let wait = match (cause, after) {
            // Until the pool's next connection attempt, but pauses in a row grow (from a
            // second): a pool that never has a connection up says "try again now".
            (PauseCause::Unreachable, Some(after)) => after
                .max(backoff(s.failures, MIN_DEFER, self.backoff_max))
                .min(MAX_RETRY_AFTER),
            (_, Some(after)) => after.clamp(MIN_DEFER, MAX_RETRY_AFTER),
            (_, None) => backoff(s.failures, self.backoff_base, self.backoff_max),
        };
        s.failures = s.failures.saturating_add(1);
        s.until = Some(now + wait);
        s.pause_number = PAUSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        s.proven = false;
        s.throttled.clear();
        s.row_refusals = 0;
        // A connection error's words change each time (how long it lived...): another
        // reason for the same cause is news only for refusals and throttling.
        let new = match &s.paused {
            Some((PauseCause::Unreachable, _)) => cause != PauseCause::Unreachable,
            Some((c, r)) => (*c, r.as_str()) != (cause, reason.as_str()),
            None => true,
        };
        match (cause, new) {
            (PauseCause::Credentials, true) => {
                error!(app = %self.app, service = self.service, reason = %reason, retry_in = ?wait,
                       "the service refuses this app's credentials; its rows stay pending")
            }
            (PauseCause::Throttled, true) => {
                warn!(app = %self.app, service = self.service, reason = %reason, retry_in = ?wait,
                      "the service throttles this app; its rows wait without using attempts")
            }
            (PauseCause::Unreachable, true) => {
                warn!(app = %self.app, service = self.service, reason = %reason, retry_in = ?wait,
                      "the service cannot be reached; this app's rows wait without using attempts")
            }
            (_, false) => info!(app = %self.app, service = self.service, reason = %reason,
                                retry_in = ?wait, "the app is still paused"),
        }
        s.paused = Some((cause, reason.clone()));
        Delivery::Deferred {
            reason,
            after: (wait + self.probe_wait).max(MIN_DEFER),
        }
    }
}

fn token_hash(token: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut h);
    h.finish()
}

/// Holds the probe slot however the probing request ends (even when dropped); pass it
/// to [`AppGate::accepted`] when the service took the probe.
pub struct ProbeGuard<'a>(&'a AppGate);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> AppGate {
        AppGate::new(
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

    fn deferred_for(d: Delivery) -> Duration {
        match d {
            Delivery::Deferred { after, .. } => after,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_closes_the_gate_until_one_probe_answers() {
        let g = gate();
        assert!(matches!(g.gate(), Gate::Open));
        let after = deferred_for(g.refused("no".into()));
        // Back after the pause (5 to 10 s) and the probe's time (5 s).
        assert!(
            after >= Duration::from_secs(10) && after <= Duration::from_secs(15),
            "{after:?}"
        );
        assert!(g
            .health()
            .unwrap_err()
            .contains("FCM refuses the credentials: no"));
        let pause = g.pause().expect("paused");
        assert_eq!(pause.cause, PauseCause::Credentials);
        assert_eq!(pause.backlog_at() - pause.until, Duration::from_secs(5));
        match g.gate() {
            Gate::Closed(d) => assert_eq!(deferred_for(d), after),
            _ => panic!("open while paused"),
        }
        // A request in flight refused too: the same pause.
        assert_eq!(deferred_for(g.refused("no".into())), after);
        // A request sent before the refusal and answered now proves nothing.
        g.accepted(None);
        assert!(g.health().is_err());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!g.pause().unwrap().probing, "the probe is due, not out");
        let probe = g.gate();
        assert!(g.pause().unwrap().probing);
        assert!(matches!(probe, Gate::Probe(_)));
        // While the probe is out, others wait for as long as it may take.
        match g.gate() {
            Gate::Closed(d) => assert_eq!(deferred_for(d), Duration::from_secs(5)),
            _ => panic!("a second probe"),
        }
        assert!(!g.proven());
        g.accepted(Some(probe_guard(probe)));
        assert!(g.health().is_ok());
        assert!(g.proven());
        assert!(matches!(g.gate(), Gate::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_service_pauses_the_app_until_its_pool_tries_again() {
        let g = gate();
        let attempt = |after| {
            g.attempt("t", async move {
                Exchanged::Unreachable {
                    reason: "FCM is unreachable: connection refused".into(),
                    after,
                }
            })
        };
        // Deferred for the pool's wait and the probe's time, not the gate's backoff.
        let d = attempt(Duration::from_secs(2)).await;
        assert_eq!(deferred_for(d), Duration::from_secs(2 + 5));
        let pause = g.pause().expect("paused");
        assert_eq!(pause.cause, PauseCause::Unreachable);
        assert_eq!(
            g.health(),
            Err("FCM is unreachable: connection refused".into())
        );
        // Rows go nowhere meanwhile; the probe then finds the service still down.
        assert!(matches!(g.gate(), Gate::Closed(_)));
        tokio::time::advance(Duration::from_secs(2)).await;
        // "Now" again: pauses in a row grow all the same (the second 1 to 2 s, jittered).
        let d = deferred_for(attempt(Duration::ZERO).await);
        let probe = Duration::from_secs(5);
        assert!(
            d >= MIN_DEFER + probe && d <= 2 * MIN_DEFER + probe,
            "{d:?}"
        );
        assert!(g.pause().unwrap().number > pause.number, "a new pause");
        // Its probe gets through: open again.
        tokio::time::advance(2 * MIN_DEFER).await;
        let sent = g
            .attempt("t", async { Exchanged::Row(Delivery::Sent { id: None }) })
            .await;
        assert!(matches!(sent, Delivery::Sent { .. }), "{sent:?}");
        assert!(g.health().is_ok());
        assert!(matches!(g.gate(), Gate::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_for_a_rows_own_topic_is_the_rows_while_others_are_accepted() {
        let g = gate();
        let row = |d: &Delivery| matches!(d, Delivery::Retry { .. });
        // Not proven yet: the app's.
        assert!(!row(&g.refused_maybe_for_row("no".into(), "topic".into())));
        tokio::time::advance(Duration::from_secs(11)).await;
        g.accepted(Some(probe_guard(g.gate())));
        // Proven: a refusal between acceptances is the row's, again and again.
        for _ in 0..5 {
            assert!(row(&g.refused_maybe_for_row("no".into(), "topic".into())));
            g.accepted(None);
        }
        // Refusals in a row (a key revoked): the app's, after ROW_REFUSALS - 1 attempts.
        for _ in 1..ROW_REFUSALS {
            assert!(row(&g.refused_maybe_for_row("no".into(), "topic".into())));
        }
        assert!(!row(&g.refused_maybe_for_row("no".into(), "topic".into())));
        assert!(g.health().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_pauses_for_the_services_retry_after_capped() {
        let g = gate();
        let after = deferred_for(g.throttled("UNAVAILABLE".into(), Some(Duration::from_secs(90))));
        assert_eq!(after, Duration::from_secs(95));
        assert!(g.health().unwrap_err().contains("FCM throttles this app"));
        let first = g.pause().unwrap().number;
        tokio::time::advance(Duration::from_secs(91)).await;
        let probe = probe_guard(g.gate());
        // The probe throttled again: a second pause, for years asked, an hour given.
        drop(probe);
        let after = deferred_for(g.throttled("UNAVAILABLE".into(), Some(Duration::MAX)));
        assert_eq!(after, MAX_RETRY_AFTER + Duration::from_secs(5));
        assert!(g.pause().unwrap().number > first, "a new pause");
    }

    #[tokio::test(start_paused = true)]
    async fn one_device_throttled_is_the_rows_several_in_a_row_are_the_apps() {
        let g = gate();
        let retry = |d: Delivery| matches!(d, Delivery::Retry { .. });
        // One chatty device, again and again: its rows retry, the app goes on.
        for _ in 0..5 {
            assert!(retry(g.throttled_target(
                "t1",
                "QUOTA_EXCEEDED".into(),
                None
            )));
        }
        for t in 2..THROTTLED_TARGETS {
            assert!(retry(g.throttled_target(
                &format!("t{t}"),
                "QUOTA_EXCEEDED".into(),
                None
            )));
        }
        g.accepted(None);
        for t in 1..THROTTLED_TARGETS {
            assert!(retry(g.throttled_target(
                &format!("u{t}"),
                "QUOTA_EXCEEDED".into(),
                None
            )));
        }
        // One device more before any acceptance: the app is throttled.
        let d = g.throttled_target("u0", "QUOTA_EXCEEDED".into(), Some(Duration::from_secs(30)));
        assert_eq!(deferred_for(d), Duration::from_secs(35));
        assert!(g.health().unwrap_err().contains("10 devices in a row"));
        // Answers to requests already in flight are deferred, not attempts.
        let d = g.throttled_target("v", "QUOTA_EXCEEDED".into(), None);
        assert!(matches!(d, Delivery::Deferred { .. }), "{d:?}");
        let first = g.pause().unwrap().number;
        // The probe throttled: paused again at once, for one device.
        tokio::time::advance(Duration::from_secs(31)).await;
        let probe = probe_guard(g.gate());
        let d = g.throttled_target("w", "QUOTA_EXCEEDED".into(), None);
        drop(probe);
        assert!(matches!(d, Delivery::Deferred { .. }), "{d:?}");
        assert!(g.pause().unwrap().number > first, "a new pause");
    }
}
