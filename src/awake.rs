//! Awake or asleep: while rows keep arriving at `awake_min_rate` per second or more (the
//! average over `awake_linger`), the daemon looks for new ones itself, every
//! `awake_poll_interval`, and tells writers so; their trigger then skips NOTIFY, whose
//! commit-time lock would make the application's commits queue one behind the other.
//! Below half that rate it goes to sleep and relies on NOTIFY again: a look costs the
//! database about what a NOTIFY and its claim cost, so looking hundreds of times a second
//! pays only when rows come about as often (docs/performance.md, "What delivery costs the
//! database").
//!
//! The [`Keeper`] owns the hand-over, on a connection of its own (the SQL and the
//! protocol are in `outbox::wakeup` and `sql/004_wakeup.sql`):
//! - asleep → awake when claims find rows at the rate: it sets the deadline writers read, and keeps
//!   pushing it ahead while claims keep completing (a daemon that dies or stops claiming
//!   lets it pass within [`HOLD`]);
//! - awake → asleep when the rate falls below half of it: it sets the deadline to zero and
//!   crosses the barrier (no writer left that may have seen it awake), then asks the
//!   dispatcher for one last claim. A busy barrier (a writer's transaction still open)
//!   keeps it awake and looking; it never waits for a writer.
//!
//! The dispatcher reports its claims through [`ClaimSignals`] and reads
//! [`Keeper::awake`]'s watch to choose its polling interval.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::backoff;
use crate::db;
use crate::dispatcher::{ClaimSignals, Settings};
use crate::metrics::{Metrics, TransitionLabels};
use crate::outbox::wakeup;
use crate::secret::Secret;

/// How far ahead the deadline writers read is set: how long a daemon killed while awake
/// can keep writers from notifying.
pub const HOLD: Duration = Duration::from_secs(1);
/// How often an awake daemon pushes the deadline ahead.
const EXTEND_EVERY: Duration = Duration::from_millis(250);
/// At a graceful stop, how long to try the barrier before notifying anyway.
const STOP_BARRIER_FOR: Duration = Duration::from_secs(1);

pub struct Keeper {
    pub url: Secret<String>,
    pub connect_timeout: Duration,
    pub settings: watch::Receiver<Settings>,
    pub signals: Arc<ClaimSignals>,
    /// `true` while awake; the dispatcher polls at `awake_poll_interval` then.
    pub awake: watch::Sender<bool>,
    /// Asks the dispatcher for a claim (the last one before sleeping).
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

impl Keeper {
    /// Runs until `cancel`; a daemon awake then falls asleep properly and wakes the others.
    pub async fn run(self, cancel: CancellationToken) {
        let mut conn = Conn::new(&self);
        // The rate is averaged over `awake_linger` from the first claim (the catch-up).
        self.signals
            .average_over(self.settings.borrow().awake_linger);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.signals.found.notified() => {}
            }
            if !self.wants_awake(Toward::Wake) {
                // Rows come too seldom for looking to pay (or a permit left by a claim
                // from before the last sleep): NOTIFY wakes the dispatcher per row.
                continue;
            }
            self.transition(true);
            let stopping = self.stay_awake(&mut conn, &cancel).await;
            if stopping {
                self.stop(&mut conn).await;
                return;
            }
            self.transition(false);
            // The last claim: it sees every row of the writers the barrier waited for.
            self.wake.notify_one();
        }
    }

    /// Keeps the deadline ahead while claims find rows; returns once the barrier is
    /// crossed (`false`) or at `cancel` (`true`).
    async fn stay_awake(&self, conn: &mut Conn<'_>, cancel: &CancellationToken) -> bool {
        let mut extend = true;
        loop {
            if extend {
                if let Err(e) = conn.run(|c| Box::pin(wakeup::stay_awake(c, HOLD))).await {
                    debug!(error = %e, "cannot extend the awake deadline");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return true,
                _ = tokio::time::sleep(EXTEND_EVERY) => {}
            }
            if self.wants_awake(Toward::Stay) {
                // Only a daemon that is claiming may tell writers it is looking.
                extend = self.signals.since(&self.signals.last_claim_ms) < HOLD / 2;
                continue;
            }
            match conn.run(|c| Box::pin(wakeup::fall_asleep(c))).await {
                Ok(true) => return false,
                Ok(false) => {
                    self.metrics.wakeup_barrier_busy.inc();
                    debug!("a writer that may have seen us awake is still open: staying awake");
                }
                Err(e) => debug!(error = %e, "cannot go to sleep yet"),
            }
            extend = true;
        }
    }

    /// A graceful stop while awake: writers notify again, and once the writers that
    /// skipped it are done, a NOTIFY wakes the other daemons to take their rows.
    async fn stop(&self, conn: &mut Conn<'_>) {
        let give_up = Instant::now() + STOP_BARRIER_FOR;
        loop {
            match conn.run(|c| Box::pin(wakeup::fall_asleep(c))).await {
                Ok(true) => break,
                _ if Instant::now() >= give_up => {
                    warn!("stopping while a writer's transaction is open; other daemons find its rows at their next poll");
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        if let Err(e) = conn.run(|c| Box::pin(wakeup::notify(c))).await {
            debug!(error = %e, "cannot wake the other daemons");
        }
        self.transition(false);
    }

    /// Whether looking pays at the rate rows are found: they come at `awake_min_rate` per
    /// second or more (to stay awake, half of it, so that a rate near the threshold does
    /// not flap). With `awake_min_rate = 0`, a row found within `awake_linger` is enough.
    fn wants_awake(&self, toward: Toward) -> bool {
        let (linger, min_rate) = {
            let s = self.settings.borrow();
            (s.awake_linger, s.awake_min_rate)
        };
        if linger.is_zero() {
            return false; // never awake: writers always notify
        }
        // `awake_linger` may have been reloaded: the rate follows it from now on.
        self.signals.average_over(linger);
        if self.signals.since(&self.signals.last_found_ms) >= linger {
            return false;
        }
        let threshold = match toward {
            Toward::Wake => f64::from(min_rate),
            Toward::Stay => f64::from(min_rate) / 2.0,
        };
        self.signals.rows_per_second() >= threshold
    }

    fn transition(&self, awake: bool) {
        let to = if awake { "awake" } else { "asleep" };
        debug!(to, "wake-up state");
        self.awake.send_replace(awake);
        self.metrics.awake.set(awake as i64);
        self.metrics
            .wakeup_transitions
            .get_or_create(&TransitionLabels { to: to.into() })
            .inc();
    }
}

/// What [`Keeper::wants_awake`] decides: whether to wake, or whether to stay awake.
#[derive(Clone, Copy)]
enum Toward {
    Wake,
    Stay,
}

/// The keeper's connection: (re)connected on use, each statement bounded on both ends. A
/// statement that gets no answer in time is cancelled on the server and the connection
/// dropped: a deadline's `setval` that ran later, after the keeper went to sleep, would
/// tell writers to skip NOTIFY with no daemon awake (issue 20, item 9).
struct Conn<'k> {
    keeper: &'k Keeper,
    connection: Option<(Client, db::Canceller)>,
    failures: u32,
    retry_at: Option<Instant>,
}

type Statement<'c, T> = futures::future::BoxFuture<'c, Result<T, tokio_postgres::Error>>;

impl<'k> Conn<'k> {
    fn new(keeper: &'k Keeper) -> Conn<'k> {
        Conn {
            keeper,
            connection: None,
            failures: 0,
            retry_at: None,
        }
    }

    async fn run<T>(
        &mut self,
        statement: impl for<'c> FnOnce(&'c Client) -> Statement<'c, T>,
    ) -> anyhow::Result<T> {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            anyhow::bail!("waiting to reconnect");
        }
        self.keeper.metrics.database_round_trips.inc();
        let result = self.try_run(statement).await;
        match &result {
            Ok(_) => {
                if self.failures > 0 {
                    info!("the wake-up keeper is connected again");
                }
                self.failures = 0;
                self.retry_at = None;
            }
            Err(e) => {
                self.connection = None;
                self.failures += 1;
                let wait = backoff(
                    self.failures - 1,
                    Duration::from_millis(250),
                    Duration::from_secs(30),
                );
                if self.failures == 1 {
                    warn!(
                        error = format!("{e:#}"),
                        "the wake-up keeper lost its database connection; writers notify meanwhile"
                    );
                }
                self.retry_at = Some(Instant::now() + wait);
            }
        }
        result
    }

    async fn try_run<T>(
        &mut self,
        statement: impl for<'c> FnOnce(&'c Client) -> Statement<'c, T>,
    ) -> anyhow::Result<T> {
        let timeout = self.keeper.connect_timeout;
        if self.connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            self.connection =
                Some(db::connect_cancellable(&self.keeper.url, timeout, "wakeup").await?);
        }
        let (client, canceller) = self.connection.as_ref().expect("connected above");
        canceller
            .within(timeout, statement(client))
            .await?
            .map_err(|e| anyhow::anyhow!("{}", db::describe(&e)))
    }
}
