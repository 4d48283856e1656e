//! What the outbox holds: `pgpushd status`'s [`StatusReport`], read in one consistent
//! snapshot and rendered as aligned text tables; the daemon's cheap [`Queue`] gauges; the
//! demo's [`Totals`]. `commands::status` renders the report, as text for people or JSON
//! for scripts.
//!
//! What each figure costs on a large outbox:
//! - pending, due and retrying counts and the oldest due row walk the partial index of
//!   pending rows (the claim's index): proportional to what is pending, not to the table;
//! - sent, failed and expired totals are exact counts, which take one scan of the table
//!   (measured: 0.2 s per million rows); [retention] keeps that bounded;
//! - recent errors walk the `outbox_settled` index over the last 24 hours' failed and
//!   expired rows, plus the pending rows carrying an error;
//! - unregistered tokens: a count per app (a scan of that narrow table) and the newest
//!   few through its `unregistered_at` index.
//!
//! Legacy rows may hold `'infinity'` or `'-infinity'` timestamps (the CHECK of schema
//! version 3 is `NOT VALID`): every age is computed in SQL only for finite values, an
//! infinite one becomes `Duration::MAX` (shown as such), and a row scheduled at
//! `'infinity'`, which never falls due, is counted apart. Device tokens are shown
//! shortened ([`crate::transport::short_token`]) unless `pgpushd status` is asked for them whole.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::{Client, IsolationLevel};

/// How many of the most common errors are shown.
pub const TOP_ERRORS: usize = 10;
/// How many of the newest unregistered tokens are shown.
pub const NEWEST_UNREGISTERED: usize = 5;
/// The window for "recent" errors.
pub const ERROR_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// `pgpushd status` shows the batch transactions open longer than this.
pub const LONG_BATCH: Duration = Duration::from_secs(60);

/// The batches' open transactions, from `pg_stat_activity`: the sessions the daemon
/// names `pgpushd-batch` (see `db::connect`; a URL that sets its own `application_name`
/// hides them). Sessions of other roles show without `xact_start` unless the reader has
/// `pg_read_all_stats`.
const LONG_BATCHES: &str = "
SELECT count(*), extract(epoch FROM max(clock_timestamp() - xact_start))::float8
  FROM pg_stat_activity
 WHERE application_name = 'pgpushd-batch'
   AND xact_start < clock_timestamp() - $1::float8 * interval '1 second'";

/// The two gauges the daemon refreshes every few seconds (metrics, systemd's STATUS).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Queue {
    /// Rows pending, due or not.
    pub pending: i64,
    /// How long the pending row that has been due longest has waited, in seconds; 0
    /// when none is due.
    pub oldest_due_age: f64,
}

impl Queue {
    /// Both walk the partial index of pending rows.
    pub async fn read(client: &Client) -> Result<Queue, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM pgpushd.outbox WHERE status = 'pending'),
                        coalesce((SELECT extract(epoch FROM now() - min(send_after))::float8
                                    FROM pgpushd.outbox
                                   WHERE status = 'pending' AND send_after <= now()
                                     AND isfinite(send_after)), 0)",
                &[],
            )
            .await?;
        Ok(Queue {
            pending: row.get(0),
            oldest_due_age: row.get(1),
        })
    }
}

/// Rows by fate over the whole table (one scan): the demo's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub sent: i64,
    /// Failed or expired.
    pub failed: i64,
    pub pending: i64,
}

impl Totals {
    pub async fn read(client: &Client) -> Result<Totals, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'sent'),
                        count(*) FILTER (WHERE status IN ('failed', 'expired')),
                        count(*) FILTER (WHERE status = 'pending')
                   FROM pgpushd.outbox",
                &[],
            )
            .await?;
        Ok(Totals {
            sent: row.get(0),
            failed: row.get(1),
            pending: row.get(2),
        })
    }
}

/// A snapshot of the outbox, for `pgpushd status`.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// Per app, by name.
    pub apps: Vec<AppCounts>,
    /// The pending row that has been due longest: how far behind the daemons are.
    pub oldest_due: Option<OldestDue>,
    /// How long until the next scheduled (or retried) row falls due.
    pub next_scheduled: Option<Duration>,
    /// Pending rows whose `send_after` is `'infinity'` (legacy rows): never due.
    pub never_due: i64,
    /// How long a daemon is still awake by the deadline writers read (they skip NOTIFY
    /// meanwhile); `None`: asleep, writers notify.
    pub awake_for: Option<Duration>,
    /// The most common `last_error`s of rows failed or expired in the last
    /// [`ERROR_WINDOW`] and of pending rows waiting to be retried, most frequent first.
    pub errors: Vec<ErrorCount>,
    /// Per app, by name.
    pub unregistered: Vec<UnregisteredApp>,
    /// The most recently unregistered tokens, newest first.
    pub newest_unregistered: Vec<UnregisteredToken>,
    /// Batch transactions (any daemon's) open longer than `long_batch_after`.
    pub long_batches: i64,
    /// How long the oldest of them has been open.
    pub longest_batch: Option<Duration>,
    pub long_batch_after: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppCounts {
    pub app: String,
    pub pending: i64,
    /// Pending and due now (`send_after` has passed): waiting for a daemon.
    pub due: i64,
    /// Pending after at least one failed attempt.
    pub retrying: i64,
    pub sent: i64,
    pub failed: i64,
    pub expired: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OldestDue {
    pub id: i64,
    pub app: String,
    pub attempts: i32,
    /// How long it has been due; `Duration::MAX` for a `send_after` of `'-infinity'`.
    pub overdue: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorCount {
    /// `failed`, `expired`, or `pending` (waiting for a retry).
    pub status: String,
    pub app: String,
    pub error: String,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnregisteredApp {
    pub app: String,
    pub tokens: i64,
    /// How long ago the newest of them was reported.
    pub newest: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnregisteredToken {
    pub app: String,
    pub device_token: String,
    pub ago: Duration,
}

const PENDING: &str = "
SELECT app,
       count(*),
       count(*) FILTER (WHERE send_after <= now()),
       count(*) FILTER (WHERE attempts > 0)
  FROM pgpushd.outbox
 WHERE status = 'pending'
 GROUP BY app";

const SETTLED: &str = "
SELECT app,
       count(*) FILTER (WHERE status = 'sent'),
       count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'expired')
  FROM pgpushd.outbox
 WHERE status <> 'pending'
 GROUP BY app";

// Exactly the claim's order, so the first entry of the partial index answers it. A
// send_after of '-infinity' sorts first; `now() - '-infinity'` is an error before
// PostgreSQL 17, hence the CASE (and `seconds` maps the infinite float to Duration::MAX).
const OLDEST_DUE: &str = "
SELECT id, app, attempts,
       CASE WHEN isfinite(send_after) THEN extract(epoch FROM now() - send_after)::float8
            ELSE 'Infinity'::float8 END
  FROM pgpushd.outbox
 WHERE status = 'pending' AND send_after <= now()
 ORDER BY send_after, id
 LIMIT 1";

// The next finite send_after; rows at 'infinity' never fall due and are counted apart.
const NEXT_SCHEDULED: &str = "
SELECT extract(epoch FROM min(send_after) FILTER (WHERE send_after < 'infinity') - now())::float8,
       count(*) FILTER (WHERE send_after = 'infinity')
  FROM pgpushd.outbox
 WHERE status = 'pending' AND send_after > now()";

const ERRORS: &str = "
SELECT status, app, last_error, count(*)
  FROM (SELECT status, app, coalesce(last_error, '(no error recorded)') AS last_error
          FROM pgpushd.outbox
         WHERE status IN ('failed', 'expired')
           AND settled_at > now() - $1::bigint * interval '1 second'
        UNION ALL
        SELECT status, app, last_error
          FROM pgpushd.outbox
         WHERE status = 'pending' AND last_error IS NOT NULL) AS recent
 GROUP BY status, app, last_error
 ORDER BY count(*) DESC, status, app, last_error
 LIMIT $2";

const UNREGISTERED: &str = "
SELECT app, count(*),
       CASE WHEN isfinite(max(unregistered_at))
            THEN extract(epoch FROM now() - max(unregistered_at))::float8
            WHEN max(unregistered_at) > now() THEN 0
            ELSE 'Infinity'::float8 END
  FROM pgpushd.unregistered_tokens
 GROUP BY app
 ORDER BY app";

const NEWEST_UNREGISTERED_SQL: &str = "
SELECT app, device_token,
       CASE WHEN isfinite(unregistered_at)
            THEN extract(epoch FROM now() - unregistered_at)::float8
            WHEN unregistered_at > now() THEN 0
            ELSE 'Infinity'::float8 END
  FROM pgpushd.unregistered_tokens
 ORDER BY unregistered_at DESC
 LIMIT $1";

impl StatusReport {
    /// Reads every figure in one read-only, repeatable-read transaction, so they agree
    /// with each other.
    pub async fn read(client: &mut Client) -> Result<StatusReport, tokio_postgres::Error> {
        Self::read_bounded(client, LONG_BATCH, None).await
    }

    /// [`StatusReport::read`], with each statement bounded by the server to `bound`
    /// (`statement_timeout`), and the transaction ended by the server should the client
    /// leave it idle that long (`idle_in_transaction_session_timeout`): a client that
    /// gave up (or vanished) leaves no scan running, and no snapshot held. Both are local
    /// to the transaction, so a transaction pooler carries them to no other client.
    pub async fn read_within(
        client: &mut Client,
        bound: Duration,
    ) -> Result<StatusReport, tokio_postgres::Error> {
        Self::read_bounded(client, LONG_BATCH, Some(bound)).await
    }

    /// [`StatusReport::read`], counting batch transactions open longer than
    /// `long_batch_after`.
    pub async fn read_with(
        client: &mut Client,
        long_batch_after: Duration,
    ) -> Result<StatusReport, tokio_postgres::Error> {
        Self::read_bounded(client, long_batch_after, None).await
    }

    async fn read_bounded(
        client: &mut Client,
        long_batch_after: Duration,
        bound: Option<Duration>,
    ) -> Result<StatusReport, tokio_postgres::Error> {
        let txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        if let Some(bound) = bound {
            // Before the first query, which takes the snapshot.
            let ms = bound.as_millis().clamp(1, i32::MAX as u128);
            txn.batch_execute(&format!(
                "SET LOCAL statement_timeout = {ms}; \
                 SET LOCAL idle_in_transaction_session_timeout = {ms}"
            ))
            .await?;
        }

        let mut apps: BTreeMap<String, AppCounts> = BTreeMap::new();
        for r in txn.query(PENDING, &[]).await? {
            let a = entry(&mut apps, r.get(0));
            a.pending = r.get(1);
            a.due = r.get(2);
            a.retrying = r.get(3);
        }
        for r in txn.query(SETTLED, &[]).await? {
            let a = entry(&mut apps, r.get(0));
            a.sent = r.get(1);
            a.failed = r.get(2);
            a.expired = r.get(3);
        }
        let oldest_due = txn.query_opt(OLDEST_DUE, &[]).await?.map(|r| OldestDue {
            id: r.get(0),
            app: r.get(1),
            attempts: r.get(2),
            overdue: seconds(r.get(3)),
        });
        let next = txn.query_one(NEXT_SCHEDULED, &[]).await?;
        let next_scheduled = next.get::<_, Option<f64>>(0).map(seconds);
        let never_due = next.get(1);
        let window = ERROR_WINDOW.as_secs() as i64;
        let errors = txn
            .query(ERRORS, &[&window, &(TOP_ERRORS as i64)])
            .await?
            .iter()
            .map(|r| ErrorCount {
                status: r.get(0),
                app: r.get(1),
                error: r.get(2),
                count: r.get(3),
            })
            .collect();
        let unregistered = txn
            .query(UNREGISTERED, &[])
            .await?
            .iter()
            .map(|r| UnregisteredApp {
                app: r.get(0),
                tokens: r.get(1),
                newest: seconds(r.get(2)),
            })
            .collect();
        let newest_unregistered = txn
            .query(NEWEST_UNREGISTERED_SQL, &[&(NEWEST_UNREGISTERED as i64)])
            .await?
            .iter()
            .map(|r| UnregisteredToken {
                app: r.get(0),
                device_token: r.get(1),
                ago: seconds(r.get(2)),
            })
            .collect();
        let awake_for = super::wakeup::awake_for(&txn).await?;
        let long = txn
            .query_one(LONG_BATCHES, &[&long_batch_after.as_secs_f64()])
            .await?;
        let long_batches: i64 = long.get(0);
        let longest_batch = long.get::<_, Option<f64>>(1).map(seconds);
        txn.commit().await?;
        Ok(StatusReport {
            apps: apps.into_values().collect(),
            oldest_due,
            next_scheduled,
            never_due,
            awake_for,
            errors,
            unregistered,
            newest_unregistered,
            long_batches,
            longest_batch,
            long_batch_after,
        })
    }
}

fn entry(apps: &mut BTreeMap<String, AppCounts>, app: String) -> &mut AppCounts {
    apps.entry(app.clone()).or_insert_with(|| AppCounts {
        app,
        ..AppCounts::default()
    })
}

/// Seconds from SQL as a `Duration`: negative (or NaN) is 0, and what no `Duration` can
/// hold (an infinite timestamp's age) is `Duration::MAX`.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}
