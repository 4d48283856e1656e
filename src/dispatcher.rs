//! The dispatcher: wake -> claim -> send -> record, with several batches in flight.
//!
//! One loop owns every decision (when to claim, how many batches run); each batch is a
//! task with its own database connection and transaction (see `outbox`). A batch reports
//! as soon as its claim returns, so when a claim comes back full the next one starts
//! while the first is still being sent: a backlog drains with every slot busy, and an idle
//! daemon claims once per wake-up.
//!
//! Wake-ups are coalesced: a notification, the poll timer, or the moment the next
//! scheduled/retried row falls due. A notification, a due row or a backlog claims at
//! once; a poll first looks (one statement, `outbox::LOOK`) unless the last batch found
//! rows, and claims only when the look finds a row due. On cancellation the loop stops claiming and waits for
//! the batches in flight to send and record. When `hard_stop` fires (the drain deadline),
//! each batch stops waiting: it records the rows already answered and releases the rest
//! untouched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::arrival_rate::ArrivalRate;
use crate::backoff::backoff;
use crate::config::RetryConfig;
use crate::db;
use crate::metrics::Metrics;
use crate::outbox::{Bounds, Claim, Claimed, LeftOut, Look, OutboxConn};
use crate::outcome::{RowStatus, RowUpdate};
use crate::secret::Secret;
use crate::transport::{self, Delivery, Transport};

/// Waits after database errors: from a quarter second up to this.
const MAX_DB_RETRY_WAIT: Duration = Duration::from_secs(30);

/// The loop turns at least this often (or as often as its [`Heartbeat`] asks, when that
/// is more often), so the heartbeat proves it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// When the dispatcher loop last turned, for the systemd watchdog: a wedged loop stops
/// beating and gets the process restarted.
/// It also knows the batches' open transactions: one open longer than its bound (see
/// [`Heartbeat::stuck_batch`]) is stuck, which `/healthz` and the watchdog report.
#[derive(Debug)]
pub struct Heartbeat {
    /// How often the loop beats.
    every: Duration,
    start: Instant,
    last_ms: AtomicU64,
    /// When each open batch transaction began, by batch number.
    open: Mutex<HashMap<u64, Instant>>,
    next_batch: AtomicU64,
    /// A batch open longer than this is stuck; 0 until the dispatcher sets it.
    stuck_after_ms: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::beating_every(HEARTBEAT_EVERY)
    }
}

/// A batch's transaction, counted open for as long as this lives.
struct OpenBatch<'h> {
    heartbeat: &'h Heartbeat,
    number: u64,
}

impl Drop for OpenBatch<'_> {
    fn drop(&mut self) {
        self.heartbeat.open.lock().unwrap().remove(&self.number);
    }
}

impl Heartbeat {
    /// A heartbeat for a watchdog that checks `age()` against `every` or more: the loop
    /// beats that often (at most [`HEARTBEAT_EVERY`], at least every 10 ms).
    pub fn beating_every(every: Duration) -> Heartbeat {
        Heartbeat {
            every: every.clamp(Duration::from_millis(10), HEARTBEAT_EVERY),
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            open: Mutex::default(),
            next_batch: AtomicU64::new(0),
            stuck_after_ms: AtomicU64::new(0),
        }
    }

    fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the loop last turned.
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// How long the oldest open batch transaction has been open, when that is past the
    /// bound (`max_batch_duration` and a grace): its task is wedged, since the batch
    /// abandons itself at `max_batch_duration`.
    pub fn stuck_batch(&self) -> Option<Duration> {
        let bound = Duration::from_millis(self.stuck_after_ms.load(Ordering::Relaxed));
        if bound.is_zero() {
            return None;
        }
        let oldest = self.open.lock().unwrap().values().min()?.elapsed();
        (oldest > bound).then_some(oldest)
    }

    fn stuck_after(&self, bound: Duration) {
        let ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX).max(1);
        self.stuck_after_ms.store(ms, Ordering::Relaxed);
    }

    fn open_batch(&self) -> OpenBatch<'_> {
        let number = self.next_batch.fetch_add(1, Ordering::Relaxed);
        self.open.lock().unwrap().insert(number, Instant::now());
        OpenBatch {
            heartbeat: self,
            number,
        }
    }
}

/// After this many failed writes of a row's outcome (the first after its one send, the
/// others from memory), the row is held (not claimed) for [`HOLD_UNRECORDED`].
pub const MAX_OUTCOME_WRITE_FAILURES: u32 = 3;
/// How long a batch waits for a row another batch of this daemon still holds (one the
/// server released at that batch's COMMIT, whose answer it has yet to read).
const HELD_ROW_WAIT: Duration = Duration::from_secs(1);
/// How long a row whose outcome keeps failing to be recorded is left unclaimed.
pub const HOLD_UNRECORDED: Duration = Duration::from_secs(600);
/// At most this many unrecorded outcomes are remembered; past it, rows are resent.
const MAX_UNRECORDED: usize = 10_000;
/// A remembered outcome is forgotten this long after it was answered (the row may have
/// been recorded by another daemon since, and revived): its row is sent again then.
const FORGET_UNRECORDED: Duration = Duration::from_secs(3600);

/// Outcomes that were answered but could not be recorded (issue 9): the rows were sent,
/// and stay pending. The next claim of such a row records the remembered outcome instead
/// of sending it again; after [`MAX_OUTCOME_WRITE_FAILURES`] failed writes the row is held
/// out of the claims for [`HOLD_UNRECORDED`]. In memory and bounded: a restart forgets it
/// (at least once delivery, as before), and past [`MAX_UNRECORDED`] rows are resent.
#[derive(Default)]
struct Unrecorded {
    rows: Mutex<HashMap<i64, Remembered>>,
}

struct Remembered {
    since: Instant,
    update: RowUpdate,
    failures: u32,
    held_until: Option<Instant>,
}

impl Unrecorded {
    /// The rows not to claim now.
    fn held(&self) -> Vec<i64> {
        let now = Instant::now();
        let mut rows = self.rows.lock().unwrap();
        rows.retain(|_, r| r.since + FORGET_UNRECORDED > now);
        rows.iter()
            .filter(|(_, r)| r.held_until.is_some_and(|t| t > now))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The answer already had for row `id`, if its recording failed.
    fn answer(&self, id: i64) -> Option<RowUpdate> {
        self.rows.lock().unwrap().get(&id).map(|r| r.update.clone())
    }

    /// Whether a batch of these rows writes its outcomes carefully (under a savepoint, row
    /// by row should that fail): one of them has an answer remembered, one whose outcome
    /// the database refused before; or the memory is full, so that a refused write could
    /// not be remembered and the batch would be sent again whole.
    fn write_carefully(&self, claimed: &[Claimed]) -> bool {
        let rows = self.rows.lock().unwrap();
        rows.len() >= MAX_UNRECORDED
            || (!rows.is_empty()
                && claimed
                    .iter()
                    .any(|c| rows.contains_key(&c.notification.id)))
    }

    fn recorded(&self, ids: impl Iterator<Item = i64>) {
        let mut rows = self.rows.lock().unwrap();
        if !rows.is_empty() {
            for id in ids {
                rows.remove(&id);
            }
        }
    }

    /// Remembers outcomes that could not be written; returns the rows now held.
    fn failed<'u>(&self, updates: impl Iterator<Item = &'u RowUpdate>) -> Vec<i64> {
        let mut rows = self.rows.lock().unwrap();
        let mut held = Vec::new();
        for u in updates {
            if !rows.contains_key(&u.id) && rows.len() >= MAX_UNRECORDED {
                continue;
            }
            let r = rows.entry(u.id).or_insert_with(|| Remembered {
                since: Instant::now(),
                update: u.clone(),
                failures: 0,
                held_until: None,
            });
            r.failures += 1;
            if r.failures >= MAX_OUTCOME_WRITE_FAILURES {
                r.held_until = Some(Instant::now() + HOLD_UNRECORDED);
                held.push(u.id);
            }
        }
        held
    }
}

/// What the dispatcher tells the awake keeper (`awake`): when its claims (and looks)
/// complete, when they find rows, and how many rows per second they find.
#[derive(Debug)]
pub struct ClaimSignals {
    start: Instant,
    pub(crate) last_claim_ms: AtomicU64,
    pub(crate) last_found_ms: AtomicU64,
    pub(crate) found: Notify,
    rate: Mutex<ArrivalRate>,
    /// The time constant the rate is averaged over (`awake_linger`), in ms.
    rate_tau_ms: AtomicU64,
}

impl Default for ClaimSignals {
    fn default() -> Self {
        let start = Instant::now();
        ClaimSignals {
            start,
            last_claim_ms: AtomicU64::new(0),
            last_found_ms: AtomicU64::new(0),
            found: Notify::new(),
            rate: Mutex::new(ArrivalRate::new(start)),
            rate_tau_ms: AtomicU64::new(1000),
        }
    }
}

impl ClaimSignals {
    /// A claim (or a look, which finds none) completed and took `rows` rows.
    pub fn claimed(&self, rows: usize) {
        let now = Instant::now();
        let ms = now.duration_since(self.start).as_millis() as u64;
        self.last_claim_ms.store(ms, Ordering::Relaxed);
        if rows > 0 {
            self.rate
                .lock()
                .unwrap()
                .add(rows as u64, now, self.rate_tau());
            self.last_found_ms.store(ms, Ordering::Relaxed);
            self.found.notify_one();
        }
    }

    /// Rows per second the claims are finding, averaged over [`Self::average_over`].
    pub fn rows_per_second(&self) -> f64 {
        self.rate
            .lock()
            .unwrap()
            .per_second(Instant::now(), self.rate_tau())
    }

    /// The time constant of [`Self::rows_per_second`] (the keeper sets `awake_linger`).
    pub fn average_over(&self, tau: Duration) {
        let ms = u64::try_from(tau.as_millis()).unwrap_or(u64::MAX).max(1);
        self.rate_tau_ms.store(ms, Ordering::Relaxed);
    }

    fn rate_tau(&self) -> Duration {
        Duration::from_millis(self.rate_tau_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn since(&self, ms: &AtomicU64) -> Duration {
        let last = Duration::from_millis(ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// What a reload may change (see `daemon`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub poll_interval: Duration,
    /// The polling interval while awake (see `awake`).
    pub awake_poll_interval: Duration,
    pub awake_linger: Duration,
    /// Rows per second at which the daemon wakes (see `awake`).
    pub awake_min_rate: u32,
    /// `synchronous_commit` for the batches' transactions (see `outbox::Bounds`).
    pub synchronous_commit: &'static str,
    pub batch_size: usize,
    pub max_batches_in_flight: usize,
    /// The longest a batch may hold its transaction; then it is abandoned.
    pub max_batch_duration: Duration,
    pub retry: RetryConfig,
    /// How long a batch with answered rows waits for the next claim to carry its
    /// outcomes (`[database] outcome_hold`); zero: it commits at once.
    pub outcome_hold: Duration,
}

pub struct Dispatcher {
    pub url: Secret<String>,
    pub connect_timeout: Duration,
    pub settings: watch::Receiver<Settings>,
    pub transport: Arc<dyn Transport>,
    /// Notified by the listener (and anyone else who knows rows are waiting).
    pub wake: Arc<Notify>,
    /// Totals, for status lines, metrics and tests.
    pub progress: watch::Sender<Progress>,
    pub metrics: Arc<Metrics>,
    pub heartbeat: Arc<Heartbeat>,
    /// `Err(reason)` while batches fail on database errors.
    pub database: watch::Sender<Result<(), String>>,
    /// The drain deadline: batches record what was answered and release the rest.
    pub hard_stop: CancellationToken,
    /// `true` while awake: look every `awake_poll_interval` (see `awake`).
    pub awake: watch::Receiver<bool>,
    /// Where claims are reported, for the awake keeper.
    pub signals: Arc<ClaimSignals>,
}

/// Running totals since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Claims completed (a first one means the catch-up after start is done).
    pub claims: u64,
    /// Looks that found no row due, and so claimed nothing (see `outbox::LOOK`).
    pub looks: u64,
    pub sent: u64,
    pub failed: u64,
    pub expired: u64,
    /// Rows sent back to `pending` (transient errors or a deferred app).
    pub retried: u64,
    /// Claimed rows released untouched at the drain deadline, unanswered.
    pub released: u64,
}

/// What a batch task hands back to the loop.
struct BatchEnd {
    /// The connection, unless it failed.
    conn: Option<OutboxConn>,
    result: anyhow::Result<BatchReport>,
}

#[derive(Default)]
struct BatchReport {
    /// A look found no row due: nothing was claimed, no transaction opened.
    looked_only: bool,
    claimed: usize,
    /// Rows whose sends were abandoned at the drain deadline (released untouched).
    abandoned: usize,
    /// When the next future row falls due: this batch's retries, and after a short claim
    /// the earliest scheduled row.
    next_due: Option<Instant>,
    counts: Progress,
}

/// What a batch task knows; shared by all of them.
struct BatchContext {
    url: Secret<String>,
    connect_timeout: Duration,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    hard_stop: CancellationToken,
    signals: Arc<ClaimSignals>,
    unrecorded: Unrecorded,
    /// The rows this daemon's open batches hold: a look skips them.
    in_flight: InFlightRows,
    heartbeat: Arc<Heartbeat>,
    /// The batch holding its outcomes for the next claim, if one is (see [`hold`]).
    holder: Mutex<Option<tokio::sync::oneshot::Sender<Order>>>,
    /// Notified when a batch begins to hold.
    held: Notify,
    /// The reports of the links a holding batch recorded, each with the next claim.
    links: mpsc::UnboundedSender<BatchReport>,
    /// Cancelled when the dispatcher stops: no batch holds its outcomes any longer.
    stopping: CancellationToken,
}

impl Dispatcher {
    /// Runs until `cancel`, then lets the batches in flight finish.
    pub async fn run(mut self, cancel: CancellationToken) {
        let (links_tx, mut links_rx) = mpsc::unbounded_channel::<BatchReport>();
        let ctx = Arc::new(BatchContext {
            url: self.url.clone(),
            connect_timeout: self.connect_timeout,
            transport: self.transport.clone(),
            metrics: self.metrics.clone(),
            hard_stop: self.hard_stop.clone(),
            signals: self.signals.clone(),
            unrecorded: Unrecorded::default(),
            in_flight: InFlightRows::default(),
            heartbeat: self.heartbeat.clone(),
            holder: Mutex::default(),
            held: Notify::new(),
            links: links_tx,
            stopping: cancel.child_token(),
        });
        let mut settings = self.settings.borrow_and_update().clone();
        let mut idle: Vec<OutboxConn> = Vec::new();
        let mut batches = JoinSet::new();
        let (claimed_tx, mut claimed_rx) = mpsc::unbounded_channel::<bool>();
        // What the next batch should do (the first: the catch-up claim), and whether the
        // last claim came back full.
        let mut want = Some(Start::Claim);
        let mut backlog = false;
        // Whether the last batch found rows: a timer's look then claims at once.
        let mut last_found = false;
        let mut awake = *self.awake.borrow_and_update();
        let poll_every = |s: &Settings, awake: bool| match awake {
            true => s.awake_poll_interval,
            false => s.poll_interval,
        };
        let mut next_poll = Instant::now() + poll_every(&settings, awake);
        let mut next_due: Option<Instant> = None;
        let mut db_failures = 0u32;
        let mut db_retry_at: Option<Instant> = None;

        loop {
            self.heartbeat.beat();
            self.heartbeat
                .stuck_after(settings.max_batch_duration + 2 * self.connect_timeout);
            let db_ready = db_retry_at.is_none_or(|t| Instant::now() >= t);
            while db_ready && (want.is_some() || backlog) {
                let start = match want {
                    Some(Start::Look) if !backlog => Start::Look,
                    _ => Start::Claim,
                };
                // A batch holding its outcomes takes a claim (they ride with it), even
                // when as many batches are in flight as may be: it is one of them.
                if start == Start::Claim {
                    let holder = ctx.holder.lock().unwrap().take();
                    let order = || Order {
                        settings: settings.clone(),
                        awake,
                    };
                    if holder.is_some_and(|h| h.send(order()).is_ok()) {
                        want = None;
                        continue;
                    }
                }
                if batches.len() >= settings.max_batches_in_flight {
                    break;
                }
                want = None;
                let batch = run_batch(
                    idle.pop(),
                    ctx.clone(),
                    settings.clone(),
                    awake,
                    start,
                    claimed_tx.clone(),
                );
                batches.spawn(batch.instrument(tracing::debug_span!("batch")));
            }
            let mut wake_at = next_due.map_or(next_poll, |d| d.min(next_poll));
            if let Some(t) = db_retry_at.filter(|_| !db_ready) {
                wake_at = t;
            }
            let beat_at = Instant::now() + self.heartbeat.every;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => want = Some(Start::Claim),
                _ = tokio::time::sleep_until(wake_at) => {
                    let now = Instant::now();
                    if now >= next_poll {
                        next_poll = now + poll_every(&settings, awake);
                        // A poll looks first, unless rows are coming: then it claims.
                        let poll = if last_found { Start::Claim } else { Start::Look };
                        want = Some(want.map_or(poll, |w| w.max(poll)));
                    }
                    if next_due.is_some_and(|d| now >= d) {
                        next_due = None;
                        want = Some(Start::Claim);
                    }
                }
                _ = tokio::time::sleep_until(beat_at), if beat_at < wake_at => {}
                Some(full) = claimed_rx.recv() => backlog = full,
                // A batch began to hold its outcomes: it may take a claim waiting for room.
                _ = ctx.held.notified() => {}
                Some(report) = links_rx.recv() => {
                    last_found = report.claimed > 0;
                    if let Some(due) = report.next_due {
                        next_due = Some(next_due.map_or(due, |n| n.min(due)));
                    }
                    self.record(report);
                }
                Some(end) = batches.join_next() => {
                    // A panicking batch (a bug) must not take the loop and the other
                    // batches with it: its rows are released, like any failed batch's.
                    let end = end.unwrap_or_else(|e| BatchEnd {
                        conn: None,
                        result: Err(anyhow::anyhow!("batch task failed: {e}")),
                    });
                    if let Some(conn) = end.conn {
                        idle.push(conn);
                    }
                    match end.result {
                        Ok(report) => {
                            last_found = report.claimed > 0;
                            db_failures = 0;
                            db_retry_at = None;
                            self.database.send_if_modified(|h| {
                                let changed = h.is_err();
                                *h = Ok(());
                                changed
                            });
                            if let Some(due) = report.next_due {
                                next_due = Some(next_due.map_or(due, |n| n.min(due)));
                            }
                            self.record(report);
                        }
                        Err(e) => {
                            db_failures += 1;
                            let wait = backoff(db_failures - 1, Duration::from_millis(250), MAX_DB_RETRY_WAIT);
                            warn!(error = format!("{e:#}"), retry_in = ?wait, "batch failed; its rows stay pending");
                            self.metrics.batch_failures.inc();
                            let _ = self.database.send_replace(Err(format!("{e:#}")));
                            db_retry_at = Some(Instant::now() + wait);
                            // Whatever was claimed is released; claim again after the wait.
                            want = Some(Start::Claim);
                            backlog = false;
                        }
                    }
                }
                Ok(()) = self.settings.changed() => {
                    settings = self.settings.borrow_and_update().clone();
                    next_poll = Instant::now() + poll_every(&settings, awake);
                    want = Some(Start::Claim);
                }
                Ok(()) = self.awake.changed() => {
                    awake = *self.awake.borrow_and_update();
                    next_poll = Instant::now() + poll_every(&settings, awake);
                }
            }
        }
        debug!(in_flight = batches.len(), "dispatcher draining");
        // A batch holding its outcomes commits them now.
        ctx.stopping.cancel();
        drop(ctx.holder.lock().unwrap().take());
        while let Some(end) = batches.join_next().await {
            if let Ok(BatchEnd {
                result: Ok(report), ..
            }) = end
            {
                self.record(report);
            }
        }
        while let Ok(report) = links_rx.try_recv() {
            self.record(report);
        }
    }

    fn record(&self, report: BatchReport) {
        if report.looked_only {
            self.metrics.looks_empty.inc();
            self.progress.send_modify(|p| p.looks += 1);
            return;
        }
        self.metrics.batches.inc();
        self.progress.send_modify(|p| {
            p.claims += 1;
            p.sent += report.counts.sent;
            p.failed += report.counts.failed;
            p.expired += report.counts.expired;
            p.retried += report.counts.retried;
            p.released += report.abandoned as u64;
        });
    }
}

/// How a batch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Start {
    /// Look first (one statement, no transaction), and claim only if a row is due: a
    /// poll, when the last batch found nothing.
    Look,
    /// Claim at once: a NOTIFY, a row falling due, a backlog, the catch-up.
    Claim,
}

/// The rows this daemon's open batches hold, by id, from their claim until their
/// outcomes are recorded (or remembered, see [`Unrecorded`]).
#[derive(Default)]
struct InFlightRows {
    rows: Mutex<std::collections::HashSet<i64>>,
    /// Notified when a batch lets go of its rows.
    released: Notify,
}

impl InFlightRows {
    /// Holds `claimed` for this batch. A row another batch of this daemon still holds
    /// is one whose outcome that batch's commit failed to write and that it has not yet
    /// remembered (the database released the row at its COMMIT, before the answer came
    /// back): this waits until that batch lets go, so that the answer is remembered
    /// before this batch settles the row, and the row is not sent again. It waits until
    /// `until` at most: a row still held then is left out of `claimed` (this batch's
    /// commit releases it untouched).
    async fn hold<'r>(&'r self, claimed: &mut Vec<Claimed>, until: Instant) -> HeldRows<'r> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut rows = self.rows.lock().unwrap();
                let held_elsewhere = |c: &Claimed| rows.contains(&c.notification.id);
                if !claimed.iter().any(held_elsewhere) || Instant::now() >= until {
                    claimed.retain(|c| !rows.contains(&c.notification.id));
                    let ids: Vec<i64> = claimed.iter().map(|c| c.notification.id).collect();
                    rows.extend(ids.iter().copied());
                    return HeldRows { rows: self, ids };
                }
            }
            tokio::select! {
                _ = released => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn ids(&self) -> Vec<i64> {
        self.rows.lock().unwrap().iter().copied().collect()
    }
}

/// A batch's rows, in [`InFlightRows`] for as long as this lives.
struct HeldRows<'r> {
    rows: &'r InFlightRows,
    ids: Vec<i64>,
}

impl Drop for HeldRows<'_> {
    fn drop(&mut self) {
        let mut rows = self.rows.rows.lock().unwrap();
        for id in &self.ids {
            rows.remove(id);
        }
        drop(rows);
        self.rows.released.notify_waiters();
    }
}

/// One batch: claim, send every row at once, record the outcomes, commit.
async fn run_batch(
    conn: Option<OutboxConn>,
    ctx: Arc<BatchContext>,
    settings: Settings,
    awake: bool,
    start: Start,
    claimed_tx: mpsc::UnboundedSender<bool>,
) -> BatchEnd {
    let mut conn = match conn.filter(|c| !c.is_closed()) {
        Some(c) => c,
        None => match connect(&ctx).await {
            Ok(c) => c,
            Err(e) => {
                let _ = claimed_tx.send(false);
                return BatchEnd {
                    conn: None,
                    result: Err(e),
                };
            }
        },
    };
    let result = batch(&mut conn, &ctx, &settings, awake, start, &claimed_tx).await;
    ctx.metrics
        .database_round_trips
        .inc_by(conn.take_round_trips());
    if result.is_err() {
        let _ = claimed_tx.send(false);
    }
    BatchEnd {
        conn: result.is_ok().then_some(conn),
        result,
    }
}

async fn connect(ctx: &BatchContext) -> anyhow::Result<OutboxConn> {
    let (client, canceller) =
        db::connect_cancellable(&ctx.url, ctx.connect_timeout, "batch").await?;
    OutboxConn::new(client, canceller, ctx.connect_timeout)
        .await
        .map_err(|e| anyhow::anyhow!("preparing the outbox queries: {}", db::describe(&e)))
}

/// The apps paused whose probe is not due yet (see `app_gate`), which looks and claims
/// leave out, and when the first of those probes is due.
fn paused(ctx: &BatchContext) -> (Vec<String>, Option<Instant>) {
    let now = Instant::now();
    // A whole app's: one Web Push service's pause is only its own rows', which the
    // claims cannot tell apart (they are parked instead).
    let pauses: Vec<_> = ctx
        .transport
        .paused()
        .into_iter()
        .filter(|p| p.until > now && p.origin.is_none())
        .collect();
    let first = pauses.iter().map(|p| p.until).min();
    (pauses.into_iter().map(|p| p.app).collect(), first)
}

/// A look (see `outbox::LOOK`): `None` when a row is due (claim it now), else what the
/// look found, as a report of no rows.
async fn look(conn: &mut OutboxConn, ctx: &BatchContext) -> anyhow::Result<Option<BatchReport>> {
    let mut rows = ctx.unrecorded.held();
    rows.extend(ctx.in_flight.ids());
    let (apps, first_probe) = paused(ctx);
    let left_out = LeftOut {
        rows: &rows,
        apps: &apps,
    };
    // Outside any transaction, so no statement_timeout of the batch's bounds it: one
    // without an answer in time is cancelled on the server (a look waiting behind a
    // lock would otherwise run on, and its connection is dropped).
    let canceller = conn.canceller().clone();
    let found = canceller
        .within(ctx.connect_timeout, conn.look(left_out))
        .await
        .map_err(|e| anyhow::anyhow!("looking for rows: {e}"))?
        .map_err(|e| anyhow::anyhow!("looking for rows: {}", db::describe(&e)))?;
    let next_due = match found {
        Look::Due => return Ok(None),
        Look::In(wait) => Instant::now().checked_add(wait),
        Look::Nothing => None,
    };
    // A paused app left out of the look has its probe due when its pause ends.
    let next_due = next_due.into_iter().chain(first_probe).min();
    ctx.signals.claimed(0);
    Ok(Some(BatchReport {
        looked_only: true,
        next_due,
        ..BatchReport::default()
    }))
}

async fn batch(
    conn: &mut OutboxConn,
    ctx: &BatchContext,
    settings: &Settings,
    awake: bool,
    start: Start,
    claimed_tx: &mpsc::UnboundedSender<bool>,
) -> anyhow::Result<BatchReport> {
    if start == Start::Look {
        if let Some(nothing_due) = look(conn, ctx).await? {
            let _ = claimed_tx.send(false);
            return Ok(nothing_due);
        }
    }
    let (mut settings, mut awake) = (settings.clone(), awake);
    let mut open = ctx.heartbeat.open_batch();
    let (paused_apps, _) = paused(ctx);
    let mut claim = conn
        .claim(
            bounds(ctx, &settings),
            settings.batch_size,
            LeftOut {
                rows: &ctx.unrecorded.held(),
                apps: &paused_apps,
            },
        )
        .await
        .map_err(sql("claiming rows"))?;
    loop {
        let Claim {
            rows: mut claimed,
            next_due,
            batch: txn,
        } = claim;
        let deadline = Instant::now() + settings.max_batch_duration;
        // Held until this link's outcomes are recorded (dropped at the end of each turn,
        // before the next claim's rows are held: they may be some of these). The other
        // batch has committed by then and only has its answer to read: a row it holds
        // longer than HELD_ROW_WAIT is released untouched rather than hold this
        // transaction open.
        let claim_size = claimed.len();
        let wait_until = deadline.min(Instant::now() + HELD_ROW_WAIT);
        let _held = ctx.in_flight.hold(&mut claimed, wait_until).await;
        let link = send(
            ctx,
            &settings,
            awake,
            Sent {
                claimed: &claimed,
                claim_size,
                deadline,
            },
            next_due,
            claimed_tx,
        )
        .await;
        let order = match link.abandoned == 0 && !link.careful && !link.updates.is_empty() {
            true => hold(ctx, settings.outcome_hold).await,
            false => None,
        };
        let Some(order) = order else {
            // The server bounds each statement; this bounds a connection that went silent.
            let commit = tokio::time::timeout(
                2 * ctx.connect_timeout,
                txn.commit(&link.updates, &claimed, link.careful),
            );
            let committed = match commit.await {
                Ok(committed) => committed.map_err(|e| (db::describe(&e), Some(e))),
                Err(_) => Err(("no answer to the commit".to_owned(), None)),
            };
            return recorded(ctx, &claimed, link, committed);
        };
        // The outcomes ride with the next claim, in one round trip.
        let (paused_apps, _) = paused(ctx);
        let held = ctx.unrecorded.held();
        let next = tokio::time::timeout(
            2 * ctx.connect_timeout,
            txn.commit_and_claim(
                &link.updates,
                &claimed,
                bounds(ctx, &order.settings),
                order.settings.batch_size,
                LeftOut {
                    rows: &held,
                    apps: &paused_apps,
                },
            ),
        );
        let (committed, next) = match next.await {
            Ok(Ok((unwritten, next))) => (Ok(unwritten), Some(next)),
            Ok(Err(e)) => (Err((db::describe(&e), Some(e))), None),
            Err(_) => (Err(("no answer to the commit".to_owned(), None)), None),
        };
        // This link's outcomes first: a row they failed to record is remembered before
        // the next claim's rows are looked at (the claim may have found it due again).
        let report = recorded(ctx, &claimed, link, committed)?;
        let _ = ctx.links.send(report);
        claim = next
            .expect("a recorded link has its next claim")
            .map_err(sql("claiming rows"))?;
        (settings, awake) = (order.settings, order.awake);
        open = {
            drop(open);
            ctx.heartbeat.open_batch()
        };
    }
}

fn sql(what: &'static str) -> impl Fn(tokio_postgres::Error) -> anyhow::Error {
    move |e| anyhow::anyhow!("{what}: {}", db::describe(&e))
}

/// A batch transaction's server-side bounds under `settings`.
fn bounds(ctx: &BatchContext, settings: &Settings) -> Bounds {
    Bounds {
        statement: ctx.connect_timeout,
        idle: settings.max_batch_duration + settings.outcome_hold + ctx.connect_timeout,
        synchronous_commit: settings.synchronous_commit,
    }
}

/// What the dispatcher asks of a batch that holds its outcomes: claim, under these
/// settings (the outcomes ride with the claim).
struct Order {
    settings: Settings,
    awake: bool,
}

/// Offers this batch's outcomes to the next claim for up to `hold` (see
/// [`Settings::outcome_hold`]): the dispatcher's order when a claim comes meanwhile, else
/// `None` (commit alone). One batch holds at a time; the drain, the hard stop and the
/// dispatcher's end take the offer back.
async fn hold(ctx: &BatchContext, hold: Duration) -> Option<Order> {
    if hold.is_zero() || ctx.hard_stop.is_cancelled() {
        return None;
    }
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    {
        let mut holder = ctx.holder.lock().unwrap();
        if holder.is_some() || ctx.stopping.is_cancelled() {
            return None;
        }
        *holder = Some(tx);
    }
    ctx.held.notify_one();
    tokio::select! {
        order = &mut rx => return order.ok(),
        _ = tokio::time::sleep(hold) => {}
        _ = ctx.hard_stop.cancelled() => {}
        _ = ctx.stopping.cancelled() => {}
    }
    // Take the offer back, unless the dispatcher took it first: then its order is on the
    // way (or the offer was dropped).
    if ctx.holder.lock().unwrap().take().is_some() {
        return None;
    }
    rx.await.ok()
}

/// One link of a batch: its rows sent, and what to write.
struct Link {
    updates: Vec<RowUpdate>,
    /// The claimed row of each update, by index into the claim's rows.
    rows: Vec<usize>,
    careful: bool,
    abandoned: usize,
    /// After a short claim, the next scheduled row.
    scheduled: Option<Instant>,
}

/// A claim's rows to send: `claimed`, out of the `claim_size` the claim took (the others
/// were still held by another batch, and are released untouched), by `deadline`.
struct Sent<'a> {
    claimed: &'a [Claimed],
    claim_size: usize,
    deadline: Instant,
}

/// Sends every row of a claim at once and settles each; what to write.
async fn send(
    ctx: &BatchContext,
    settings: &Settings,
    awake: bool,
    rows: Sent<'_>,
    next_due: Option<Duration>,
    claimed_tx: &mpsc::UnboundedSender<bool>,
) -> Link {
    let Sent {
        claimed,
        claim_size,
        deadline,
    } = rows;
    let left_out = claim_size - claimed.len();
    let careful = ctx.unrecorded.write_carefully(claimed);
    let full = claim_size == settings.batch_size;
    let _ = claimed_tx.send(full);
    ctx.signals.claimed(claimed.len());
    if awake {
        ctx.metrics.rows_found_awake.inc_by(claimed.len() as u64);
    }
    // After a short claim, the next scheduled row (a full one means more are due now).
    let claimed_at = Instant::now();
    let scheduled = match full {
        true => None,
        false => next_due.map(|d| claimed_at + d),
    };

    // Per row, whether its request went out: if its answer never comes (the batch given
    // up, the drain's deadline), the attempt counts all the same.
    let went_out: Vec<Arc<AtomicBool>> = claimed.iter().map(|_| Arc::default()).collect();
    let mut sends: FuturesUnordered<_> = claimed
        .iter()
        .enumerate()
        .zip(&went_out)
        .map(|((i, c), out)| async move { (i, settle(c, ctx, &settings.retry, out).await) })
        .collect();
    let mut settled = Vec::with_capacity(claimed.len());
    loop {
        tokio::select! {
            next = sends.next() => match next {
                Some(s) => settled.push(s),
                None => break,
            },
            _ = ctx.hard_stop.cancelled() => {
                warn!(answered = settled.len(), unanswered = sends.len(),
                      "drain deadline: recording the answered rows, releasing the rest untouched");
                break;
            }
            _ = tokio::time::sleep_until(deadline) => {
                // Held too long: record what is known (the answers, and an attempt for
                // each request that went out unanswered) and give the other rows back
                // untouched, rather than hold the transaction any longer.
                warn!(claimed = claimed.len(), answered = settled.len(), unanswered = sends.len(),
                      max_batch_duration = ?settings.max_batch_duration,
                      "batch held its transaction past max_batch_duration: recording the answered rows, releasing the rest");
                ctx.metrics.batches_abandoned.inc();
                break;
            }
        }
    }
    // Rows left out (another batch still held them) are released with the unanswered.
    let abandoned = sends.len() + left_out;
    if left_out > 0 {
        warn!(
            left_out,
            "rows another batch still held after its commit's time were released untouched"
        );
    }
    drop(sends);
    let (mut rows, mut updates): (Vec<usize>, Vec<RowUpdate>) = settled.into_iter().unzip();
    // Given up on (the drain's deadline, max_batch_duration): rows whose request went
    // out unanswered count the attempt.
    for (i, u) in unanswered_attempts(claimed, &went_out, &updates, settings) {
        rows.push(i);
        updates.push(u);
    }
    Link {
        updates,
        rows,
        careful,
        abandoned,
        scheduled,
    }
}

/// What a link's commit came to: the rows whose outcome the database refused (with
/// why), or why nothing was recorded (the database's error, none for no answer).
type Committed = Result<Vec<(i64, String)>, (String, Option<tokio_postgres::Error>)>;

/// After a link's commit: what was recorded, counted and reported; the answers whose
/// recording failed are remembered (an `Err`, when nothing was recorded).
fn recorded(
    ctx: &BatchContext,
    claimed: &[Claimed],
    link: Link,
    committed: Committed,
) -> anyhow::Result<BatchReport> {
    let Link {
        mut updates,
        mut rows,
        abandoned,
        scheduled,
        ..
    } = link;
    let unwritten = match committed {
        Ok(unwritten) => unwritten,
        Err((why, e)) => {
            // Sent, and nothing recorded: remember the answers rather than resend.
            outcomes_not_recorded(ctx, &updates, &why);
            return Err(match e {
                Some(e) => sql("recording outcomes")(e),
                None => anyhow::anyhow!(
                    "recording outcomes: no answer within {:?}",
                    2 * ctx.connect_timeout
                ),
            });
        }
    };
    let mut retry_unwritten = None;
    if !unwritten.is_empty() {
        let refused: Vec<RowUpdate> = updates
            .iter()
            .filter(|u| unwritten.iter().any(|(id, _)| *id == u.id))
            .cloned()
            .collect();
        let held = outcomes_not_recorded(ctx, &refused, &unwritten[0].1);
        if held.len() < refused.len() {
            // Record the rest from memory soon.
            retry_unwritten = Some(Instant::now() + Duration::from_secs(1));
        }
        (rows, updates) = rows
            .into_iter()
            .zip(updates)
            .filter(|(_, u)| !unwritten.iter().any(|(id, _)| *id == u.id))
            .unzip();
    }
    ctx.unrecorded.recorded(updates.iter().map(|u| u.id));
    for (&i, u) in rows.iter().zip(&updates) {
        ctx.metrics.row(
            &claimed[i].notification.app,
            u.status,
            u.attempted,
            u.last_error.as_deref(),
        );
    }

    let mut report = BatchReport {
        claimed: claimed.len(),
        abandoned,
        ..BatchReport::default()
    };
    for u in &updates {
        match u.status {
            RowStatus::Sent => report.counts.sent += 1,
            RowStatus::Failed => report.counts.failed += 1,
            RowStatus::Expired => report.counts.expired += 1,
            RowStatus::Pending => report.counts.retried += 1,
        }
    }
    // This batch's own retries, and the next scheduled row.
    let committed_at = Instant::now();
    // Rows released unanswered are due again: claimed again soon, not at once.
    let released = (abandoned > 0).then(|| committed_at + Duration::from_secs(1));
    report.next_due = updates
        .iter()
        .filter_map(|u| u.retry_in.map(|d| committed_at + d))
        .chain(scheduled)
        .chain(retry_unwritten)
        .chain(released)
        .min();
    if report.claimed > 0 {
        debug!(
            claimed = report.claimed,
            sent = report.counts.sent,
            failed = report.counts.failed,
            retried = report.counts.retried,
            expired = report.counts.expired,
            "batch recorded"
        );
    }
    Ok(report)
}

/// Remembers answered outcomes the database did not record, counts and logs them;
/// returns the rows now held out of the claims.
fn outcomes_not_recorded(ctx: &BatchContext, updates: &[RowUpdate], error: &str) -> Vec<i64> {
    if updates.is_empty() {
        return Vec::new();
    }
    ctx.metrics
        .outcome_write_failures
        .inc_by(updates.len() as u64);
    let ids: Vec<i64> = updates.iter().map(|u| u.id).collect();
    let held = ctx.unrecorded.failed(updates.iter());
    warn!(
        ?ids,
        error, "outcomes answered but not recorded; recording them from memory next, not resending"
    );
    if !held.is_empty() {
        tracing::error!(ids = ?held, failures = MAX_OUTCOME_WRITE_FAILURES, hold = ?HOLD_UNRECORDED,
                        "outcomes keep failing to be recorded; not claiming these rows for a while");
    }
    held
}

/// The rows of `claimed` not `answered` whose request went out: each counts an attempt
/// with no answer, as a timed-out request does.
fn unanswered_attempts(
    claimed: &[Claimed],
    went_out: &[Arc<AtomicBool>],
    answered: &[RowUpdate],
    settings: &Settings,
) -> Vec<(usize, RowUpdate)> {
    let answered: std::collections::HashSet<i64> = answered.iter().map(|u| u.id).collect();
    claimed
        .iter()
        .enumerate()
        .zip(went_out)
        .filter(|((_, c), out)| {
            out.load(Ordering::Relaxed) && !answered.contains(&c.notification.id)
        })
        .map(|((i, c), _)| {
            let reason = format!(
                "no answer before the batch gave up (max_batch_duration {:?}, or the drain's \
                 deadline): the request went out, so it counts as an attempt",
                settings.max_batch_duration
            );
            (
                i,
                RowUpdate::after(&c.notification, Delivery::retry(reason), &settings.retry),
            )
        })
        .collect()
}

/// One row's fate: not sent at all (expired, unregistered token, an answer already had
/// whose recording failed), or one attempt (`went_out` is set once its request left).
async fn settle(
    c: &Claimed,
    ctx: &BatchContext,
    retry: &RetryConfig,
    went_out: &Arc<AtomicBool>,
) -> RowUpdate {
    let n = &c.notification;
    if let Some(answered) = ctx.unrecorded.answer(n.id) {
        return answered;
    }
    if c.expired {
        return RowUpdate::expired(n);
    }
    if c.unregistered {
        return RowUpdate::previously_unregistered(n);
    }
    if let Some(reason) = &c.unreadable {
        return RowUpdate::after(n, Delivery::rejected(reason.clone()), retry);
    }
    let _in_flight = InFlight::new(&ctx.metrics);
    let started = Instant::now();
    let delivery = transport::watch_request(went_out.clone(), ctx.transport.send(n)).await;
    ctx.metrics
        .request_latency
        .get_or_create(&ctx.metrics.app_label(&n.app))
        .observe(started.elapsed().as_secs_f64());
    RowUpdate::after(n, delivery, retry)
}

/// Counts a request in flight for as long as it lives (also when abandoned).
struct InFlight<'m>(&'m Metrics);

impl<'m> InFlight<'m> {
    fn new(metrics: &'m Metrics) -> Self {
        metrics.requests_in_flight.inc();
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.requests_in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Notification;

    fn notification(id: i64) -> Notification {
        Notification {
            id,
            app: "default".into(),
            device_token: "ab".into(),
            payload: "{}".into(),
            push_type: "alert".into(),
            priority: None,
            collapse_id: None,
            topic: None,
            expires_at: None,
            attempts: 0,
            broadcast: None,
        }
    }

    fn claimed(ids: &[i64]) -> Vec<Claimed> {
        ids.iter()
            .map(|&id| Claimed {
                notification: notification(id),
                expired: false,
                unregistered: false,
                unreadable: None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn unrecorded_outcomes_are_held_after_repeated_failures_then_forgotten() {
        let u = RowUpdate::expired(&notification(7));
        let memory = Unrecorded::default();
        for _ in 1..MAX_OUTCOME_WRITE_FAILURES {
            assert!(memory.failed([&u].into_iter()).is_empty());
            assert_eq!(memory.answer(7), Some(u.clone()));
        }
        assert_eq!(memory.failed([&u].into_iter()), [7]);
        assert_eq!(memory.held(), [7]);
        tokio::time::advance(HOLD_UNRECORDED).await;
        assert!(memory.held().is_empty(), "claimed again after the hold");
        assert_eq!(
            memory.answer(7),
            Some(u.clone()),
            "and recorded from memory"
        );
        tokio::time::advance(FORGET_UNRECORDED).await;
        assert!(memory.held().is_empty());
        assert_eq!(memory.answer(7), None, "forgotten");
        memory.failed([&u].into_iter());
        memory.recorded([7].into_iter());
        assert_eq!(memory.answer(7), None);
    }

    /// A row another batch still holds (its COMMIT released the row on the server, and
    /// the failed outcome is not remembered yet) is settled only once that batch lets go.
    #[tokio::test]
    async fn a_row_still_held_by_another_batch_waits_for_it() {
        let rows = InFlightRows::default();
        let never = Instant::now() + Duration::from_secs(3600);
        let first = rows.hold(&mut claimed(&[1, 2]), never).await;
        let other = rows.hold(&mut claimed(&[3]), never).await;
        let mut later = claimed(&[2, 4]);
        let held = {
            let mut overlapping = std::pin::pin!(rows.hold(&mut later, never));
            assert!(
                futures::poll!(overlapping.as_mut()).is_pending(),
                "row 2 is still held"
            );
            drop(other);
            assert!(futures::poll!(overlapping.as_mut()).is_pending());
            drop(first);
            overlapping.await
        };
        let mut ids = rows.ids();
        ids.sort_unstable();
        assert_eq!(ids, [2, 4]);
        drop(held);
        assert!(rows.ids().is_empty());
        assert_eq!(later.len(), 2, "none left out");
    }

    /// A row still held at the wait's end is left out of the batch, the others held.
    #[tokio::test(start_paused = true)]
    async fn a_row_held_past_the_wait_is_left_out() {
        let rows = InFlightRows::default();
        let _first = rows
            .hold(&mut claimed(&[1]), Instant::now() + Duration::from_secs(1))
            .await;
        let mut later = claimed(&[1, 2]);
        let waited = Instant::now();
        let _held = rows
            .hold(&mut later, Instant::now() + Duration::from_secs(4))
            .await;
        assert_eq!(waited.elapsed(), Duration::from_secs(4));
        let ids: Vec<i64> = later.iter().map(|c| c.notification.id).collect();
        assert_eq!(ids, [2]);
        let mut held = rows.ids();
        held.sort_unstable();
        assert_eq!(held, [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_open_past_its_bound_is_stuck() {
        let h = Heartbeat::default();
        let open = h.open_batch();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(h.stuck_batch(), None, "no bound yet");
        h.stuck_after(Duration::from_secs(100));
        assert_eq!(h.stuck_batch(), None);
        let _later = h.open_batch();
        tokio::time::advance(Duration::from_secs(41)).await;
        assert_eq!(
            h.stuck_batch(),
            Some(Duration::from_secs(101)),
            "the oldest"
        );
        drop(open);
        assert_eq!(h.stuck_batch(), None);
    }
}
