//! Setting a paused app's backlog aside (see `app_gate`, `paused_apps`): while its
//! service refuses the app's credentials, throttles it or cannot be reached, the app's
//! pending rows are parked, out of the claims' way, and one row is made due when the
//! pause ends, as the probe; once the probe is accepted, the parked rows come back. A
//! Web Push service paused on its own has its rows of the app set aside the same way:
//! each statement takes an origin (`$origin`, `https://host[:port]`), and then moves only
//! the rows whose subscription names that push service (`of_origin!`).
//!
//! - **Park** ([`park`]): the app's rows due before `$threshold` (half the parking time
//!   ahead) move to `$park_at` (the parking time ahead), so the claims walking the due
//!   rows in order never meet them, nor claim and defer them a batch at a time, nor find
//!   them all due at once when the pause ends. A dead app's backlog is written once per
//!   half parking time, however often its probes fail. Rows already expired stay: the
//!   claims settle them without sending.
//! - **Probe** ([`probe`]): the app's first row that can be sent (not expired, no token
//!   known unregistered), due by then or parked by us, comes due at `$probe_at`. Never
//!   sooner than it was due: a row only moves earlier from a parking time.
//! - **Release** ([`release`]): the rows parked at any of `$parked` come due now.
//!
//! Each moves rows in chunks, each its own short transaction that skips rows a batch
//! holds, so the other apps' claims and writers never wait on it.

use std::time::{Duration, SystemTime};

use tokio_postgres::Client;

/// Rows moved per statement (and transaction).
pub const CHUNK: i64 = 5000;

/// A Web Push row's push service as `Subscription::origin` writes it (`https://`, the
/// host in lower case, the port unless 443), read from the text of `o.device_token`
/// (JSON never parsed, so no row can make the statement fail; other rows give NULL). The
/// origin must end where the JSON's does (at `/`, `?`, `#` or the closing quote): an
/// endpoint written otherwise (escaped slashes or characters, an upper-case scheme, a
/// name in Unicode) gives NULL or another string, and its row is then not set aside: its
/// push service's gate defers it alone. `of_origin!("$5")`: the row is the origin's in
/// parameter `$5`, or any row of the app when `$5` is NULL.
macro_rules! of_origin {
    ($param:literal) => {
        concat!(
            "(",
            $param,
            "::text IS NULL OR ",
            r#"regexp_replace(lower(substring(o.device_token
                                  FROM '"endpoint"\s*:\s*"(https://[^/"?#\\]*)[/?#"]')),
                          ':443$', '')"#,
            " = ",
            $param,
            ")"
        )
    };
}

/// `now + $1 ms`, by the database's clock.
const AHEAD: &str = "SELECT clock_timestamp() + $1::bigint * interval '1 millisecond'";

const PROBE: &str = concat!(
    "
UPDATE pgpushd.outbox
   SET send_after = $2, last_error = $3
 WHERE id = (SELECT o.id FROM pgpushd.outbox AS o
              WHERE o.status = 'pending' AND o.app = $1
                AND ",
    of_origin!("$5"),
    "
                AND (o.send_after <= $2 OR o.send_after = ANY ($4::timestamptz[]))
                AND (o.expires_at IS NULL OR o.expires_at > $2)
                AND NOT EXISTS (SELECT 1 FROM pgpushd.unregistered_tokens AS u
                                 WHERE u.app = o.app
                                   AND u.device_token =
                                       CASE WHEN o.device_token ~ '^[0-9A-Fa-f]+$'
                                            THEN lower(o.device_token)
                                            ELSE o.device_token END)
              ORDER BY o.send_after, o.id
              LIMIT 1
                FOR UPDATE OF o SKIP LOCKED)
RETURNING id"
);

/// One chunk of the parking, after the key `($3, $4)` of the previous chunk's last row
/// (so no chunk walks past what the others moved). Returns the chunk's last key and its
/// size.
const PARK: &str = concat!(
    "
WITH picked AS (
    SELECT id, send_after FROM pgpushd.outbox AS o
     WHERE status = 'pending' AND send_after < $2 AND (send_after, id) > ($3, $4)
       AND app = $1 AND id <> $5 AND (expires_at IS NULL OR expires_at > now())
       AND ",
    of_origin!("$9"),
    "
     ORDER BY send_after, id
     LIMIT $6
       FOR UPDATE SKIP LOCKED),
moved AS (
    UPDATE pgpushd.outbox AS o
       SET send_after = $7, last_error = $8
      FROM picked WHERE o.id = picked.id)
SELECT send_after, id, count(*) OVER () FROM picked ORDER BY send_after DESC, id DESC LIMIT 1"
);

/// One chunk of the release: rows parked at one of `$2` come due now.
const RELEASE: &str = concat!(
    "
UPDATE pgpushd.outbox AS parked
   SET send_after = clock_timestamp()
  FROM (SELECT id FROM pgpushd.outbox AS o
         WHERE status = 'pending' AND send_after = ANY ($2::timestamptz[]) AND app = $1
           AND ",
    of_origin!("$4"),
    "
         LIMIT $3
           FOR UPDATE SKIP LOCKED) AS s
 WHERE parked.id = s.id"
);

/// The database's clock, `ahead` from now.
pub async fn time_ahead(
    client: &Client,
    ahead: Duration,
) -> Result<SystemTime, tokio_postgres::Error> {
    Ok(client.query_one(AHEAD, &[&millis(ahead)]).await?.get(0))
}

/// Makes `app`'s (`origin`'s, if one) first row that can be sent, due by `probe_at` or
/// parked at one of `parked`, due at `probe_at`; its id, if there was one.
pub async fn probe(
    client: &mut Client,
    app: &str,
    origin: Option<&str>,
    probe_at: SystemTime,
    parked: &[SystemTime],
    reason: &str,
    bound: Duration,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let txn = bounded(client, bound).await?;
    let id = txn
        .query_opt(PROBE, &[&app, &probe_at, &reason, &parked, &origin])
        .await?
        .map(|r| r.get(0));
    txn.commit().await?;
    Ok(id)
}

/// Parks `app`'s (`origin`'s, if one) rows due before `threshold` at `park_at` (all but
/// `probe`); how many.
#[allow(clippy::too_many_arguments)]
pub async fn park(
    client: &mut Client,
    app: &str,
    origin: Option<&str>,
    threshold: SystemTime,
    park_at: SystemTime,
    probe: Option<i64>,
    reason: &str,
    bound: Duration,
) -> Result<u64, tokio_postgres::Error> {
    let mut moved = 0;
    // Before any row: 6,000 years before 1970 (PostgreSQL's timestamps reach 4713 BC).
    let mut after = (
        SystemTime::UNIX_EPOCH - Duration::from_secs(6_000 * 365 * 86_400),
        0i64,
    );
    loop {
        let txn = bounded(client, bound).await?;
        let last = txn
            .query_opt(
                PARK,
                &[
                    &app,
                    &threshold,
                    &after.0,
                    &after.1,
                    &probe.unwrap_or(0),
                    &CHUNK,
                    &park_at,
                    &reason,
                    &origin,
                ],
            )
            .await?;
        txn.commit().await?;
        let Some(last) = last else {
            return Ok(moved);
        };
        let n: i64 = last.get(2);
        moved += n as u64;
        after = (last.get(0), last.get(1));
        if n < CHUNK {
            return Ok(moved);
        }
    }
}

/// Makes `app`'s (`origin`'s, if one) rows parked at one of `parked` due now; how many.
pub async fn release(
    client: &mut Client,
    app: &str,
    origin: Option<&str>,
    parked: &[SystemTime],
    bound: Duration,
) -> Result<u64, tokio_postgres::Error> {
    let mut moved = 0;
    loop {
        let txn = bounded(client, bound).await?;
        let n = txn
            .execute(RELEASE, &[&app, &parked, &CHUNK, &origin])
            .await?;
        txn.commit().await?;
        moved += n;
        if n < CHUNK as u64 {
            return Ok(moved);
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A transaction whose statements the server stops after `bound`, committing without
/// waiting for its WAL to reach the disk (a crash forgets at most a moment of moves: the
/// rows are then where they were, pending).
async fn bounded(
    client: &mut Client,
    bound: Duration,
) -> Result<tokio_postgres::Transaction<'_>, tokio_postgres::Error> {
    let ms = millis(bound).max(1).to_string();
    let txn = client.transaction().await?;
    txn.execute(
        "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $1, true),
                set_config('synchronous_commit', 'off', true)",
        &[&ms],
    )
    .await?;
    Ok(txn)
}
