//! Setting a paused app's backlog aside (see `app_gate`): while its service refuses the
//! app's credentials or throttles it, the app's pending rows due before the pause ends
//! move to when it ends, so the claims walking the due rows in order do not meet them,
//! nor claim and defer them one batch at a time, nor find them all due at once ahead of
//! the other apps' newer rows when it ends.
//!
//! One row, the first in order, comes due when the pause ends: the probe. The rest come
//! back a probe's time later (`request_timeout`): by then the probe has said whether the
//! app may send again, and if it may not, the next pause sets them aside again. So a
//! dead app's backlog is written once per pause.
//!
//! The rows move in chunks, each its own short transaction that skips rows a batch holds
//! (those are deferred by the gate, to the same time), so the other apps' claims and
//! writers never wait on the pass.

use std::time::{Duration, SystemTime};

use tokio_postgres::Client;

/// Rows moved per statement (and transaction).
pub const CHUNK: i64 = 1000;

/// Rows this close before the backlog's time are aside already: the gate deferred them
/// there (by its own reading of the clocks) while a batch held them.
const ASIDE: Duration = Duration::from_millis(500);

/// Where the pause ends, by the database's clock: `$1` and `$2` milliseconds from now,
/// and `$3` (the rows aside already from then on).
const TIMES: &str = "
SELECT clock_timestamp() + $1::bigint * interval '1 millisecond',
       clock_timestamp() + $2::bigint * interval '1 millisecond',
       clock_timestamp() + $3::bigint * interval '1 millisecond'";

/// The probe: the app's first row (`$4` is when the backlog comes back) comes due when
/// the pause ends, `$2`, or stays where it is when that is later: no row is ever sent
/// sooner than it was due (a row a former pause set aside may lie past this one's end).
const PROBE: &str = "
UPDATE pgpushd.outbox
   SET send_after = greatest(send_after, $2), last_error = $3
 WHERE id = (SELECT id FROM pgpushd.outbox
              WHERE status = 'pending' AND send_after < $4 AND app = $1
              ORDER BY send_after, id
              LIMIT 1
                FOR UPDATE SKIP LOCKED)
RETURNING id";

/// The rest, a chunk at a time: due before `$6` (shortly before `$2`), they come back at
/// `$2`. `$4` is the probe row's id (0 for none).
const BACKLOG: &str = "
UPDATE pgpushd.outbox AS o
   SET send_after = $2, last_error = $3
  FROM (SELECT id FROM pgpushd.outbox
         WHERE status = 'pending' AND send_after < $6 AND app = $1 AND id <> $4
         ORDER BY send_after, id
         LIMIT $5
           FOR UPDATE SKIP LOCKED) AS s
 WHERE o.id = s.id";

/// What one pass moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetAside {
    /// The probe row was found and moved to the pause's end.
    pub probe: bool,
    /// Rows moved to a probe's time after it.
    pub rows: u64,
}

/// Sets `app`'s backlog aside: the probe due in `probe_in`, the rest in `backlog_in`;
/// `reason` becomes their `last_error`. Each statement is bounded by `timeout` on the
/// server (`statement_timeout`, `lock_timeout`).
pub async fn set_aside(
    client: &mut Client,
    app: &str,
    probe_in: Duration,
    backlog_in: Duration,
    reason: &str,
    timeout: Duration,
) -> Result<SetAside, tokio_postgres::Error> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let aside_in = backlog_in.saturating_sub(ASIDE).max(probe_in);
    let times = client
        .query_one(TIMES, &[&ms(probe_in), &ms(backlog_in), &ms(aside_in)])
        .await?;
    let (probe_at, backlog_at, aside_from): (SystemTime, SystemTime, SystemTime) =
        (times.get(0), times.get(1), times.get(2));
    let bound = ms(timeout).max(1).to_string();
    let mut moved = SetAside::default();
    let txn = bounded(client, &bound).await?;
    let probe: Option<i64> = txn
        .query_opt(PROBE, &[&app, &probe_at, &reason, &backlog_at])
        .await?
        .map(|r| r.get(0));
    txn.commit().await?;
    moved.probe = probe.is_some();
    loop {
        let txn = bounded(client, &bound).await?;
        let n = txn
            .execute(
                BACKLOG,
                &[
                    &app,
                    &backlog_at,
                    &reason,
                    &probe.unwrap_or(0),
                    &CHUNK,
                    &aside_from,
                ],
            )
            .await?;
        txn.commit().await?;
        moved.rows += n;
        if n < CHUNK as u64 {
            return Ok(moved);
        }
    }
}

/// A transaction whose statements the server stops after `ms` (as text).
async fn bounded<'c>(
    client: &'c mut Client,
    ms: &str,
) -> Result<tokio_postgres::Transaction<'c>, tokio_postgres::Error> {
    let txn = client.transaction().await?;
    txn.execute(
        "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $1, true)",
        &[&ms],
    )
    .await?;
    Ok(txn)
}
