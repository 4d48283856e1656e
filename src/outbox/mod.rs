//! The outbox table's SQL: claiming due rows, writing their outcomes back, and finding
//! when the next row falls due. Migrations live in [`migrate`].
//!
//! A claim is a `SELECT ... FOR UPDATE SKIP LOCKED` in the partial index's order, inside a
//! transaction that stays open while the batch is sent (opened in the same round trip);
//! the outcomes are written with one UPDATE and the transaction commits. One write per
//! row, and a daemon that dies mid-batch leaves nothing behind: its locks go with its
//! connection and the rows are due again.

pub mod channels;
pub mod migrate;
pub mod prune;
pub mod set_aside;
pub mod status;
pub mod wakeup;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, GenericClient, Statement, ToStatement};
use uuid::Uuid;

use crate::channels::MessageStorage;
use crate::db::Canceller;
use crate::outcome::RowUpdate;
use crate::transport::{Broadcast, Notification, Undelivered, Unregistered};

/// The NOTIFY channel the insert trigger signals.
pub const CHANNEL: &str = "pgpushd_outbox";

/// The claim: up to `$1` due rows, locked, oldest `send_after` first, leaving out the
/// rows in `$2` and the apps in `$3`; each row with when the next pending row falls due
/// after `now()` (the claim's snapshot time: rows due by then were claimable by this
/// claim, or are held by another batch or daemon; rows due later, even a moment later,
/// while the batch is being sent, are what to wake up for), in seconds, NULL when none
/// is. When no row is claimed, one row of NULLs but that. One statement, not a claim
/// and a lookup (issue 19: a statement fewer per claim). The database's clock measures
/// the wait, so a skewed host clock cannot make the daemon wake early and spin; `now()`
/// (stable, unlike clock_timestamp()) keeps the lookup an index range scan.
pub const CLAIM: &str = "
SELECT c.*, n.next_due
  FROM (SELECT extract(epoch FROM min(send_after) - now())::float8 AS next_due
          FROM pgpushd.outbox
         WHERE status = 'pending' AND send_after > now() AND send_after < 'infinity') AS n
  LEFT JOIN LATERAL (
       SELECT o.id, o.app, coalesce(o.device_token, ''), o.payload::text, o.push_type, o.priority,
              o.collapse_id, o.topic, o.expires_at, o.attempts, o.expires_at <= now() AS expired,
              EXISTS (SELECT 1 FROM pgpushd.unregistered_tokens u
                      WHERE u.app = o.app
                        AND u.device_token = CASE WHEN o.device_token ~ '^[0-9A-Fa-f]+$'
                                                  THEN lower(o.device_token)
                                                  ELSE o.device_token END) AS unregistered,
              o.channel_id,
              CASE WHEN o.channel_id IS NOT NULL
                   THEN (SELECT ch.message_storage FROM pgpushd.channels ch
                          WHERE ch.app = o.app AND ch.channel_id = o.channel_id) END
         FROM pgpushd.outbox o
        WHERE o.status = 'pending' AND o.send_after <= now()
          AND o.id <> ALL ($2::bigint[]) AND o.app <> ALL ($3::text[])
        ORDER BY o.send_after, o.id
        LIMIT $1
          FOR UPDATE OF o SKIP LOCKED
       ) AS c ON true";

// A legacy row (written before schema version 3's CHECK) may hold an infinite
// send_after; the CHECK applies to every UPDATE's new row version, so the row must never
// get it back, or the whole batch's UPDATE fails. It gets its created_at instead.
pub const RECORD: &str = "
UPDATE pgpushd.outbox AS o
   SET status     = v.status,
       attempts   = o.attempts + v.attempted::int,
       last_error = v.last_error,
       apns_id    = coalesce(v.apns_id, o.apns_id),
       fcm_name   = coalesce(v.fcm_name, o.fcm_name),
       webpush_location = coalesce(v.webpush_location, o.webpush_location),
       sent_at    = CASE WHEN v.status = 'sent' THEN clock_timestamp() ELSE o.sent_at END,
       settled_at = CASE WHEN v.status = 'pending' THEN NULL ELSE clock_timestamp() END,
       send_after = CASE WHEN v.retry_ms IS NOT NULL
                              THEN clock_timestamp() + v.retry_ms * interval '1 millisecond'
                         WHEN isfinite(o.send_after) THEN o.send_after
                         WHEN isfinite(o.created_at) THEN o.created_at
                         ELSE clock_timestamp() END
  FROM unnest($1::bigint[], $2::text[], $3::text[], $4::uuid[], $5::bigint[], $6::bool[],
              $7::text[], $8::text[])
       AS v(id, status, last_error, apns_id, retry_ms, attempted, fcm_name, webpush_location)
 WHERE o.id = v.id";

const UNREGISTER: &str = "
INSERT INTO pgpushd.unregistered_tokens (app, device_token, unregistered_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
    ON CONFLICT (app, device_token) DO UPDATE
   SET unregistered_at = greatest(pgpushd.unregistered_tokens.unregistered_at,
                                  excluded.unregistered_at)";

/// A look, before a poll's claim: when the first pending row not in `$1` (the rows this
/// daemon's batches hold, and rows held back) falls due, after `now()`, leaving out the
/// due rows of the apps in `$2` (paused: the claims leave them out); zero or less when
/// one is due already; no row when no other is pending. A paused app's rows not yet due
/// (its parked backlog) still end the walk, so a look never walks past them. One
/// statement outside any transaction block:
/// a look that finds nothing costs the database one round trip and one index probe
/// (issue 19), where a claim costs a transaction. `ORDER BY ... LIMIT 1` in the index's
/// order leaves the planner no plan but walking the index from its start.
pub const LOOK: &str = "
SELECT extract(epoch FROM send_after - now())::float8
  FROM pgpushd.outbox
 WHERE status = 'pending' AND send_after < 'infinity' AND id <> ALL ($1::bigint[])
   AND (app <> ALL ($2::text[]) OR send_after > now())
 ORDER BY send_after, id
 LIMIT 1";

/// What a claim and a look leave out: rows (held by this daemon's batches, or held back
/// while their outcome cannot be written) and apps (paused, their probe not yet due: see
/// `app_gate`; their rows would only be deferred, and stand in the other apps' way until
/// `paused_apps` has parked them).
#[derive(Debug, Clone, Copy, Default)]
pub struct LeftOut<'a> {
    pub rows: &'a [i64],
    pub apps: &'a [String],
}

/// What a look found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// A row is due now: claim.
    Due,
    /// The first pending row falls due after this long.
    In(Duration),
    /// No row is pending but those excluded.
    Nothing,
}

/// A claimed row.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub notification: Notification,
    /// Past `expires_at` (by the database's clock): not sent, status `expired`.
    pub expired: bool,
    /// The token is in `unregistered_tokens`: fail the row without sending it.
    pub unregistered: bool,
    /// The payload could not be read into JSON here (a number out of range, nesting
    /// too deep): fail the row with this reason rather than stall the queue.
    pub unreadable: Option<String>,
}

/// A database connection with the outbox's statements prepared on it.
pub struct OutboxConn {
    client: Client,
    /// Cancels what the connection runs, on the server: for the look, the one statement
    /// outside a batch's bounded transaction.
    canceller: Canceller,
    settings: Statement,
    claim: Statement,
    record: Statement,
    unregister: Statement,
    look: Statement,
    /// Round trips to the server since [`OutboxConn::take_round_trips`] (for the metric).
    round_trips: u64,
    /// A batch's transaction is open, or was left open by a batch dropped mid-way: roll
    /// it back before the next.
    in_transaction: bool,
}

/// How a batch's transaction plans: every statement of a batch is an index lookup or
/// range scan by design, whatever the planner's statistics say, so each is planned once,
/// for any parameters, the same way, and never compiled (JIT).
///
/// - Without the `enable_*` settings, a generic plan made while the outbox was empty (a
///   fresh install, a truncated table) joins the outcomes to a scan of the whole table,
///   and keeps doing so on every batch until something invalidates it: 9 ms a batch at
///   40,000 rows, growing with the table.
/// - Without `force_generic_plan`, the claim and the outcomes' UPDATE were planned again
///   on every batch: an eighth of the batch connection's CPU in the database.
/// - A generic plan guesses what `LIMIT $1` keeps; over a large backlog its estimate
///   passes `jit_above_cost`, and JIT compiling then took 13 ms of every claim that
///   itself took half a millisecond.
///
/// All measured on PostgreSQL 15. Local to each batch's transaction, with its bounds
/// (`$1`: statement_timeout and lock_timeout, `$2`: idle_in_transaction_session_timeout,
/// in milliseconds): through a transaction pooler, session settings would land on
/// whichever server connection ran them, and stay there for its other clients. One
/// prepared statement, not eight `SET LOCAL`s, which cost a claim a fifth more.
///
/// `$3` is `synchronous_commit` ([`Bounds::synchronous_commit`]): with `off`, the
/// outcomes' commit does not wait for its WAL to reach the disk, and the database flushes
/// many batches' outcomes at once (with the writers' own flushes, or the WAL writer's).
pub const BATCH_SETTINGS: &str = "
SELECT set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true),
       set_config('enable_mergejoin', 'off', true),
       set_config('plan_cache_mode', 'force_generic_plan', true),
       set_config('jit', 'off', true),
       set_config('statement_timeout', $1::text, true),
       set_config('lock_timeout', $1::text, true),
       set_config('idle_in_transaction_session_timeout', $2::text, true),
       set_config('synchronous_commit', $3::text, true)";

impl OutboxConn {
    /// Prepares the statements, each bounded by `statement_timeout` and `lock_timeout`
    /// (preparing locks the outbox: a session holding it exclusively must not stall the
    /// batch). Prepared statements outlive the transaction they were prepared in.
    pub async fn new(
        client: Client,
        canceller: Canceller,
        statement_timeout: Duration,
    ) -> Result<OutboxConn, tokio_postgres::Error> {
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}",
                ms = millis(statement_timeout).max(1)
            ))
            .await?;
        let conn = OutboxConn {
            settings: client.prepare(BATCH_SETTINGS).await?,
            claim: client.prepare(CLAIM).await?,
            record: client.prepare(RECORD).await?,
            unregister: client.prepare(UNREGISTER).await?,
            look: client.prepare(LOOK).await?,
            round_trips: 0,
            client,
            canceller,
            in_transaction: false,
        };
        conn.client.batch_execute("COMMIT").await?;
        Ok(conn)
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// What cancels this connection's statement on the server (see [`OutboxConn::look`]).
    pub fn canceller(&self) -> &Canceller {
        &self.canceller
    }

    /// The round trips this connection made since the last call.
    pub fn take_round_trips(&mut self) -> u64 {
        std::mem::take(&mut self.round_trips)
    }

    async fn rollback_leftover(&mut self) -> Result<(), tokio_postgres::Error> {
        if self.in_transaction {
            self.round_trips += 1;
            self.client.batch_execute("ROLLBACK").await?;
            self.in_transaction = false;
        }
        Ok(())
    }

    /// Looks for due rows without claiming them (see [`LOOK`]), skipping the rows in
    /// `exclude`. Outside any transaction, so without the batches' server-side bounds:
    /// the caller bounds it and drops the connection past that (a look queued behind an
    /// exclusive lock on the outbox then waits on the server until the lock goes, and
    /// ends).
    pub async fn look(&mut self, left_out: LeftOut<'_>) -> Result<Look, tokio_postgres::Error> {
        self.rollback_leftover().await?;
        self.round_trips += 1;
        let row = self
            .client
            .query_opt(&self.look, &[&left_out.rows, &left_out.apps])
            .await?;
        let Some(secs) = row.and_then(|r| r.get::<_, Option<f64>>(0)) else {
            return Ok(Look::Nothing);
        };
        Ok(match secs <= 0.0 {
            true => Look::Due,
            // Past what a Duration holds: as good as never.
            false => Look::In(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)),
        })
    }

    /// Opens a batch's transaction, bounded on the server's side by `bounds`, and locks
    /// up to `limit` due rows in it, oldest `send_after` first, skipping rows other
    /// batches or daemons hold and what is `left_out`.
    ///
    /// The BEGIN, the transaction's settings ([`BATCH_SETTINGS`]: planning and bounds) and
    /// the claim, which also finds the next due row, go in one round trip (pipelined): a daemon
    /// that is awake claims hundreds of times a second, and each round trip costs the
    /// database a wake-up.
    pub async fn claim(
        &mut self,
        bounds: Bounds,
        limit: usize,
        left_out: LeftOut<'_>,
    ) -> Result<Claim<'_>, tokio_postgres::Error> {
        self.rollback_leftover().await?;
        self.round_trips += 1;
        let OutboxConn {
            client,
            settings,
            claim,
            record,
            unregister,
            look: _,
            canceller: _,
            round_trips,
            in_transaction,
        } = self;
        *in_transaction = true;
        let opened = open(client, settings, claim, bounds, limit, left_out).await?;
        Ok(opened.claim(Batch {
            client,
            record,
            unregister,
            settings,
            claim,
            round_trips,
            in_transaction,
        }))
    }
}

/// A claim's answer ([`CLAIM`]'s rows), before it is given its transaction.
struct Opened {
    rows: Vec<tokio_postgres::Row>,
}

/// [`CLAIM`]'s column of the next due row's wait.
const NEXT_DUE_COLUMN: usize = 14;

impl Opened {
    fn claim(self, batch: Batch<'_>) -> Claim<'_> {
        // Every row carries it; with no row claimed, the one row of NULLs does.
        let next_secs: Option<f64> = self.rows.first().and_then(|r| r.get(NEXT_DUE_COLUMN));
        Claim {
            rows: self
                .rows
                .iter()
                .filter(|r| r.get::<_, Option<i64>>(0).is_some())
                .map(claimed)
                .collect(),
            next_due: next_secs.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()),
            batch,
        }
    }
}

/// Sends a claim's BEGIN, settings and claim, in this order as each future is first
/// polled (pipelined, behind whatever was sent before); should the BEGIN or the settings
/// fail, the claim's rows are thrown away with them, never sent unlocked.
async fn open(
    client: &Client,
    settings: &Statement,
    claim: &Statement,
    bounds: Bounds,
    limit: usize,
    left_out: LeftOut<'_>,
) -> Result<Opened, tokio_postgres::Error> {
    let statement_ms = millis(bounds.statement).max(1).to_string();
    let idle_ms = millis(bounds.idle).max(1).to_string();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let (_, _, rows) = futures::future::try_join3(
        client.batch_execute("BEGIN"),
        client.query(
            settings,
            &[&statement_ms, &idle_ms, &bounds.synchronous_commit],
        ),
        client.query(claim, &[&limit, &left_out.rows, &left_out.apps]),
    )
    .await?;
    Ok(Opened { rows })
}

/// What [`OutboxConn::claim`] found, and the open transaction that holds it.
pub struct Claim<'c> {
    pub rows: Vec<Claimed>,
    /// How long after the claim the next pending row falls due (zero if it already has,
    /// as when the claim came back full); `None` when no row waits for a later time.
    pub next_due: Option<Duration>,
    pub batch: Batch<'c>,
}

fn claimed(r: &tokio_postgres::Row) -> Claimed {
    let (payload, unreadable) = parse_payload(r.get(3));
    Claimed {
        notification: Notification {
            id: r.get(0),
            app: r.get(1),
            device_token: r.get(2),
            payload,
            push_type: r.get(4),
            priority: r.get(5),
            collapse_id: r.get(6),
            topic: r.get(7),
            expires_at: r.get(8),
            attempts: r.get(9),
            broadcast: r.get::<_, Option<String>>(12).map(|channel_id| Broadcast {
                channel_id,
                // The CHECK allows nothing else.
                storage: r
                    .get::<_, Option<&str>>(13)
                    .and_then(|s| s.parse::<MessageStorage>().ok()),
            }),
        },
        expired: r.get::<_, Option<bool>>(10).unwrap_or(false),
        unregistered: r.get(11),
        unreadable,
    }
}

/// The server-side bounds of a batch's transaction (issue 9): every statement of the
/// claim and the commit (`statement_timeout`, `lock_timeout`), and how long the session
/// may sit idle in the transaction before PostgreSQL ends it
/// (`idle_in_transaction_session_timeout`), should the daemon's own bound not act; and
/// how durably its commit is flushed (`synchronous_commit`, `[database]`'s key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub statement: Duration,
    pub idle: Duration,
    pub synchronous_commit: &'static str,
}

/// One open claim transaction. Dropping it without [`Batch::commit`] or
/// [`Batch::rollback`] releases its rows untouched: it sends a ROLLBACK as it goes (and
/// the connection sends one before its next claim, should that not have reached the
/// server).
pub struct Batch<'c> {
    client: &'c Client,
    record: &'c Statement,
    unregister: &'c Statement,
    /// For the next claim, when the outcomes ride with it ([`Batch::commit_and_claim`]).
    settings: &'c Statement,
    claim: &'c Statement,
    round_trips: &'c mut u64,
    in_transaction: &'c mut bool,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if *self.in_transaction {
            use futures::FutureExt;
            // Queued on the first poll, ahead of anything sent later on this client; the
            // answer is not waited for.
            let _ = self.client.batch_execute("ROLLBACK").now_or_never();
            *self.in_transaction = false;
        }
    }
}

impl Batch<'_> {
    /// Rolls back: every claimed row is released untouched, nothing is recorded.
    pub async fn rollback(self) -> Result<(), tokio_postgres::Error> {
        *self.round_trips += 1;
        self.client.batch_execute("ROLLBACK").await?;
        *self.in_transaction = false;
        Ok(())
    }

    /// Writes every outcome with one UPDATE (plus one INSERT for newly unregistered
    /// tokens), then commits; the rows whose outcome was not written are returned, with
    /// why, and stay as they were (pending). An `Err` recorded nothing.
    ///
    /// - At once (`careful` false): the UPDATE, the INSERT and the COMMIT in one round
    ///   trip. Should the database refuse any of it (a trigger, a constraint), the COMMIT
    ///   ends the failed transaction as a rollback, and every row is returned unwritten:
    ///   the caller remembers the answers and writes them carefully at the rows' next
    ///   claim.
    /// - Carefully: the UPDATE under a savepoint; if it fails, each row is written alone,
    ///   so that one row cannot keep the others from being recorded.
    pub async fn commit(
        self,
        updates: &[RowUpdate],
        claimed: &[Claimed],
        careful: bool,
    ) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
        let mut unwritten = Vec::new();
        if !updates.is_empty() && !careful {
            *self.round_trips += 1;
            let unregistered = unregistered_keys(updates, claimed);
            // Sent in this order as each future is first polled, in one round trip.
            let result = futures::future::try_join3(
                write_updates(self.client, self.record, updates),
                write_unregistered(self.client, self.unregister, &unregistered),
                self.client.batch_execute("COMMIT"),
            )
            .await;
            return match result {
                Ok(_) => {
                    *self.in_transaction = false;
                    Ok(unwritten)
                }
                // The server refused a statement: the COMMIT behind it rolled back.
                Err(e) if refused(&e) && !self.client.is_closed() => {
                    *self.in_transaction = false;
                    let why = crate::db::describe(&e);
                    Ok(updates.iter().map(|u| (u.id, why.clone())).collect())
                }
                Err(e) => Err(e),
            };
        }
        if !updates.is_empty() {
            // Pipelined: the savepoint costs no round trip of its own.
            *self.round_trips += 1;
            let first = futures::future::try_join(
                self.client.batch_execute("SAVEPOINT outcomes"),
                write_updates(self.client, self.record, updates),
            );
            let written = match first.await {
                Ok(_) => updates.to_vec(),
                Err(e) => {
                    *self.round_trips += 1;
                    if self
                        .client
                        .batch_execute("ROLLBACK TO SAVEPOINT outcomes")
                        .await
                        .is_err()
                    {
                        return Err(e);
                    }
                    let mut written = Vec::with_capacity(updates.len());
                    for u in updates {
                        *self.round_trips += 3;
                        self.client.batch_execute("SAVEPOINT outcome").await?;
                        match write_updates(self.client, self.record, std::slice::from_ref(u)).await
                        {
                            Ok(()) => {
                                self.client
                                    .batch_execute("RELEASE SAVEPOINT outcome")
                                    .await?;
                                written.push(u.clone());
                            }
                            Err(e) => {
                                self.client
                                    .batch_execute("ROLLBACK TO SAVEPOINT outcome")
                                    .await?;
                                unwritten.push((u.id, crate::db::describe(&e)));
                            }
                        }
                    }
                    written
                }
            };
            let unregistered = unregistered_keys(&written, claimed);
            *self.round_trips += u64::from(!unregistered.is_empty());
            write_unregistered(self.client, self.unregister, &unregistered).await?;
        }
        *self.round_trips += 1;
        self.client.batch_execute("COMMIT").await?;
        *self.in_transaction = false;
        Ok(unwritten)
    }
}

impl<'c> Batch<'c> {
    /// Writes every outcome and commits, as [`Batch::commit`] does at once, and opens the
    /// next claim behind it ([`OutboxConn::claim`]'s BEGIN, settings and claim), all in
    /// one round trip: the outcomes ride with the next claim.
    ///
    /// The first result is the outcomes', as [`Batch::commit`] returns them (should the
    /// database refuse the UPDATE, the COMMIT rolls back and every row comes back
    /// unwritten; the claim behind it runs all the same, in a transaction of its own, and
    /// may find those rows due again). The second is the next claim's. An outer `Err`:
    /// the connection failed, and whether the outcomes were recorded is unknown.
    #[allow(clippy::type_complexity)]
    pub async fn commit_and_claim(
        self,
        updates: &[RowUpdate],
        claimed: &[Claimed],
        bounds: Bounds,
        limit: usize,
        left_out: LeftOut<'_>,
    ) -> Result<(Vec<(i64, String)>, Result<Claim<'c>, tokio_postgres::Error>), tokio_postgres::Error>
    {
        *self.round_trips += 1;
        let unregistered = unregistered_keys(updates, claimed);
        let client = self.client;
        // Sent in this order, each future polled once before any answer is read: the
        // outcomes' statements and COMMIT, then the next claim's. Every answer is waited
        // for, so nothing sent is left unread.
        let (committed, opened) = futures::future::join(
            futures::future::try_join3(
                write_updates(client, self.record, updates),
                write_unregistered(client, self.unregister, &unregistered),
                client.batch_execute("COMMIT"),
            ),
            open(client, self.settings, self.claim, bounds, limit, left_out),
        )
        .await;
        // The next claim's transaction is open whatever came of it: a failed one is
        // rolled back as this `Batch` drops (and by the connection before its next claim).
        *self.in_transaction = true;
        let unwritten = match committed {
            Ok(_) => Vec::new(),
            // The server refused a statement: the COMMIT behind it rolled back.
            Err(e) if refused(&e) && !client.is_closed() => {
                let why = crate::db::describe(&e);
                updates.iter().map(|u| (u.id, why.clone())).collect()
            }
            Err(e) => return Err(e),
        };
        Ok((unwritten, opened.map(|o| o.claim(self))))
    }
}

/// Whether the database refused a statement for what it was asked (a constraint, a
/// trigger's exception, a value out of range, a deadlock), as opposed to failing as a
/// server: shutting down, out of resources, an internal error, or the connection lost.
/// Only the first is the rows' doing; the second is a failed batch, retried after a
/// backoff like any other.
fn refused(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return false;
    };
    let class = &db.code().code()[..2];
    db.severity() == "ERROR" && !matches!(class, "08" | "53" | "57" | "58" | "XX")
}

async fn write_updates(
    txn: &impl GenericClient,
    record: &Statement,
    updates: &[RowUpdate],
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<i64> = updates.iter().map(|u| u.id).collect();
    let statuses: Vec<&str> = updates.iter().map(|u| u.status.as_str()).collect();
    // PostgreSQL's text cannot hold NUL; a misbehaving endpoint's reason might.
    let errors: Vec<Option<String>> = updates
        .iter()
        .map(|u| u.last_error.as_ref().map(|e| e.replace('\0', "")))
        .collect();
    let apns_ids: Vec<Option<Uuid>> = updates.iter().map(|u| u.apns_id).collect();
    let retry_ms: Vec<Option<i64>> = updates.iter().map(|u| u.retry_in.map(millis)).collect();
    let attempted: Vec<bool> = updates.iter().map(|u| u.attempted).collect();
    let fcm_names: Vec<Option<&str>> = updates.iter().map(|u| u.fcm_name.as_deref()).collect();
    let locations: Vec<Option<&str>> = updates
        .iter()
        .map(|u| u.webpush_location.as_deref())
        .collect();
    txn.execute(
        record,
        &[
            &ids, &statuses, &errors, &apns_ids, &retry_ms, &attempted, &fcm_names, &locations,
        ],
    )
    .await?;
    Ok(())
}

/// The newly unregistered tokens among `updates`, as [`write_unregistered`] writes them:
/// keyed and sorted, since one INSERT may not touch a key twice (ON CONFLICT would
/// refuse), and concurrent batches insert shared keys in the same order, so they cannot
/// deadlock on each other.
fn unregistered_keys(
    updates: &[RowUpdate],
    claimed: &[Claimed],
) -> BTreeMap<(String, String), SystemTime> {
    let mut keyed = BTreeMap::new();
    for u in updates {
        let Some(at) = u.unregistered_at else {
            continue;
        };
        let Some(c) = claimed.iter().find(|c| c.notification.id == u.id) else {
            continue;
        };
        let n = &c.notification;
        if n.broadcast.is_some() {
            continue; // a channel is not a token: APNs's answer failed the row, and that is all
        }
        keyed
            .entry((n.app.clone(), token_key(&n.device_token)))
            .or_insert(at);
    }
    keyed
}

/// Writes tokens keyed and sorted as [`unregistered_keys`] makes them (the batch's
/// prepared statement, or [`UNREGISTER`]'s text); nothing, and no round trip, when there
/// are none. Returns how many were written.
async fn write_unregistered(
    txn: &impl GenericClient,
    unregister: &(impl ToStatement + Sync + Send + ?Sized),
    keyed: &BTreeMap<(String, String), SystemTime>,
) -> Result<u64, tokio_postgres::Error> {
    if keyed.is_empty() {
        return Ok(0);
    }
    let (mut apps, mut tokens, mut ats) = (Vec::new(), Vec::new(), Vec::new());
    for ((app, token), at) in keyed {
        apps.push(app);
        tokens.push(token);
        ats.push(*at);
    }
    txn.execute(unregister, &[&apps, &tokens, &ats]).await
}

/// A token as `unregistered_tokens` keeps it, and as the claim compares it: APNs hex in
/// lower case (devices report either case), anything else (FCM's tokens, which are
/// case-sensitive) as it is.
pub fn token_key(token: &str) -> String {
    if token.bytes().all(|b| b.is_ascii_hexdigit()) {
        token.to_ascii_lowercase()
    } else {
        token.to_owned()
    }
}

/// Records tokens a transport reported unregistered outside a batch (the binary
/// protocol's feedback service), keeping the later time for a token already there.
/// Tokens are stored by their [`token_key`], as the claim compares them. Returns how many
/// were written.
pub async fn record_unregistered(
    client: &impl GenericClient,
    tokens: &[Unregistered],
) -> Result<u64, tokio_postgres::Error> {
    // One INSERT may not touch the same key twice: keep each token's latest time. Sorted,
    // as batches insert, so the two cannot deadlock.
    let mut latest: BTreeMap<(String, String), SystemTime> = BTreeMap::new();
    for t in tokens {
        let key = (t.app.clone(), token_key(&t.device_token));
        let at_least = latest.entry(key).or_insert(t.at);
        *at_least = (*at_least).max(t.at);
    }
    write_unregistered(client, UNREGISTER, &latest).await
}

// Rows a transport reported sent and then found undelivered (a late binary error packet):
// pending again, due now, the attempt not counted (the gateway discarded it unread). Only
// rows still `sent`: a row the transport reported before its batch committed is locked by
// that batch, and the UPDATE waits for the commit (READ COMMITTED then re-reads the row:
// `sent` now, it is revived; a batch that rolled back left it `pending` anyway). The
// NOTIFY wakes the dispatcher, as an INSERT would.
const REVIVE: &str = "
UPDATE pgpushd.outbox AS o
   SET status = 'pending', send_after = clock_timestamp(), sent_at = NULL,
       settled_at = NULL, last_error = v.reason
  FROM unnest($1::bigint[], $2::text[]) AS v(id, reason)
 WHERE o.id = v.id AND o.status = 'sent'";

/// Sets rows reported `sent` back to `pending` (see [`Undelivered`]); rows no longer
/// `sent` are left alone. Waits for a batch still holding one of them to commit. Returns
/// how many were revived.
pub async fn revive_undelivered(
    client: &impl GenericClient,
    rows: &[Undelivered],
) -> Result<u64, tokio_postgres::Error> {
    // Sorted, so two revivals cannot deadlock on each other.
    let mut keyed: BTreeMap<i64, &str> = BTreeMap::new();
    for r in rows {
        keyed.entry(r.id).or_insert(&r.reason);
    }
    if keyed.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = keyed.keys().copied().collect();
    let reasons: Vec<String> = keyed.values().map(|r| r.replace('\0', "")).collect();
    let revived = client.execute(REVIVE, &[&ids, &reasons]).await?;
    if revived > 0 {
        client
            .execute("SELECT pg_notify($1, '')", &[&CHANNEL])
            .await?;
    }
    Ok(revived)
}

/// The payload's text, kept as PostgreSQL wrote it (it is sent byte for byte), and why
/// the row cannot be sent if its JSON cannot be read here. Parsed only to check it; the
/// parse is dropped.
fn parse_payload(text: String) -> (String, Option<String>) {
    let unreadable = serde_json::from_str::<serde_json::Value>(&text)
        .err()
        .map(|e| format!("BadPayload: the payload cannot be read as JSON here: {e}"));
    (text, unreadable)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
