//! Retention's SQL: deleting settled rows older than an age, a small batch at a time.
//!
//! Each statement is its own short transaction that locks only the rows it deletes
//! (`FOR UPDATE SKIP LOCKED`, so it never waits for anyone), walking the
//! `outbox_settled` index oldest first: a batch costs what it deletes, however large the
//! table. Pending rows are never touched: every statement names a settled status.

use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::outcome::RowStatus;

/// Rows settled before `settled_at` existed (schema version 1), or by an older daemon
/// during an upgrade, get their best estimate: `sent_at` for sent rows, and for failed and
/// expired rows `send_after`, when they last fell due, i.e. their final attempt.
const STAMP_UNSETTLED: &str = "
UPDATE pgpushd.outbox
   SET settled_at = coalesce(sent_at, CASE WHEN isfinite(send_after)
                                           THEN greatest(send_after, created_at)
                                           ELSE created_at END),
       -- A legacy infinite send_after would violate schema 3's CHECK (see RECORD).
       send_after = CASE WHEN isfinite(send_after) THEN send_after ELSE created_at END
 WHERE id IN (SELECT id FROM pgpushd.outbox
               WHERE status <> 'pending' AND settled_at IS NULL
               LIMIT $1
                 FOR UPDATE SKIP LOCKED)";

/// Fills in `settled_at` for up to `limit` settled rows that lack it; returns how many.
pub async fn stamp_unsettled(
    client: &impl GenericClient,
    limit: usize,
) -> Result<u64, tokio_postgres::Error> {
    client.execute(STAMP_UNSETTLED, &[&to_i64(limit)]).await
}

/// Deletes up to `limit` rows of `status` settled more than `age` ago (by the database's
/// clock), oldest first; returns how many. `status` must be a settled one.
pub async fn delete_settled(
    client: &impl GenericClient,
    status: RowStatus,
    age: Duration,
    limit: usize,
) -> Result<u64, tokio_postgres::Error> {
    assert!(
        status != RowStatus::Pending,
        "retention never deletes pending rows"
    );
    // The status is a literal, not a parameter, so that even a generic plan can prove the
    // partial index's `status <> 'pending'` and walk it.
    let sql = format!(
        "DELETE FROM pgpushd.outbox
          WHERE id IN (SELECT id FROM pgpushd.outbox
                        WHERE status = '{status}'
                          AND settled_at < now() - $1::bigint * interval '1 millisecond'
                        ORDER BY settled_at
                        LIMIT $2
                          FOR UPDATE SKIP LOCKED)",
        status = status.as_str()
    );
    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    client.execute(&sql, &[&age_ms, &to_i64(limit)]).await
}

/// Deletes up to `limit` broadcast channels that ended more than `age` ago (by the
/// database's clock): closed (deleted at APNs) since `closed_at`, or failed without a
/// channel id (never created) since `created_at`. A failed row with a channel id may
/// still have its channel at APNs, so it stays for `pgpushd channels list` to show.
/// Returns how many.
pub async fn delete_channels(
    client: &impl GenericClient,
    age: Duration,
    limit: usize,
) -> Result<u64, tokio_postgres::Error> {
    const SQL: &str = "
DELETE FROM pgpushd.channels
 WHERE id IN (SELECT id FROM pgpushd.channels
               WHERE (status = 'closed'
                      AND closed_at < now() - $1::bigint * interval '1 millisecond')
                  OR (status = 'failed' AND channel_id IS NULL
                      AND created_at < now() - $1::bigint * interval '1 millisecond')
               LIMIT $2
                 FOR UPDATE SKIP LOCKED)";
    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    client.execute(SQL, &[&age_ms, &to_i64(limit)]).await
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
