//! `pgpushd.channels`'s SQL (`sql/008_channels.sql`): claiming the channels to create or
//! delete under a lease, writing what APNs answered back under that lease, and reading
//! the table for the reconcile, the gauges and `pgpushd channels list`.
//!
//! A claim is one statement outside any transaction: it locks the due rows (`SKIP
//! LOCKED`), writes a lease on them and commits, so the lease is in the table *before*
//! any request goes to APNs. A create is not idempotent at APNs (each one makes a new
//! channel); a lease found run out with no outcome means its daemon died, maybe after
//! APNs made the channel, and the next claim says so (`uncertain`). Every write-back
//! names its lease: a daemon that lost its lease (it stalled past it, and another claimed
//! the row) writes nothing.

use std::time::Duration;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::channels::outcome::{ChannelUpdate, ClaimedChannel, Status};
use crate::channels::reconcile::TableChannel;
use crate::channels::MessageStorage;

/// The NOTIFY channel the table's triggers signal (a new channel, one asked to close).
pub const CHANNEL: &str = "pgpushd_channels";

const CLAIM: &str = "
WITH due AS (
    SELECT id, lease_until IS NOT NULL AND channel_id IS NULL AS uncertain
      FROM pgpushd.channels
     WHERE status IN ('pending', 'closing') AND send_after <= now()
       AND (lease_until IS NULL OR lease_until < now())
     ORDER BY send_after, id
     LIMIT $1
       FOR UPDATE SKIP LOCKED)
UPDATE pgpushd.channels AS c
   SET lease = $2, lease_until = now() + $3::bigint * interval '1 millisecond'
  FROM due
 WHERE c.id = due.id
RETURNING c.id, c.app, c.message_storage, c.status, c.channel_id, c.attempts, due.uncertain";

// Every expression reads the row as it was: `status` is the application's latest word
// (it may have asked for `closing` while the lease was out).
const WRITE: &str = "
UPDATE pgpushd.channels
   SET status       = CASE WHEN status = 'closing' THEN $3 ELSE $2 END,
       channel_id   = coalesce($4, channel_id),
       attempts     = attempts + $5::int,
       last_error   = $6,
       send_after   = CASE WHEN $7::bigint IS NOT NULL
                           THEN clock_timestamp() + $7::bigint * interval '1 millisecond'
                           ELSE send_after END,
       activated_at = CASE WHEN $4::text IS NOT NULL
                           THEN coalesce(activated_at, clock_timestamp()) ELSE activated_at END,
       closed_at    = CASE WHEN (CASE WHEN status = 'closing' THEN $3 ELSE $2 END) = 'closed'
                           THEN clock_timestamp() ELSE closed_at END,
       lease        = NULL,
       -- kept set on a row still uncertain (see `ChannelUpdate::uncertain`): the claim
       -- reads a lease_until with no channel id as a create whose outcome is unknown
       lease_until  = CASE WHEN $9 AND channel_id IS NULL THEN clock_timestamp() END
 WHERE id = $1 AND lease = $8
RETURNING status";

/// A create that got no answer: its lease ends after `$4` ms (time for a server that
/// acts late to list what it made), and the claim after that finds the row uncertain.
const UNSURE: &str = "
UPDATE pgpushd.channels
   SET lease_until = now() + $4::bigint * interval '1 millisecond', last_error = $3
 WHERE id = $1 AND lease = $2";

const CHANNEL_OF: &str = "SELECT channel_id FROM pgpushd.channels WHERE id = $1";

const NAMED: &str = "
SELECT id, channel_id, status FROM pgpushd.channels
 WHERE app = $1 AND channel_id IS NOT NULL
 ORDER BY id";

/// Whether another lease of the app is out: a create in flight, whose channel APNs may
/// list before its row names it.
const OTHER_LEASE: &str = "
SELECT EXISTS (SELECT 1 FROM pgpushd.channels
                WHERE app = $1 AND lease_until >= now() AND lease IS DISTINCT FROM $2)";

/// When the next step of any channel falls due (a lease running out included), from now.
const NEXT_DUE: &str = "
SELECT extract(epoch FROM min(greatest(send_after, coalesce(lease_until, send_after))) - now())::float8
  FROM pgpushd.channels
 WHERE status IN ('pending', 'closing')";

const COUNTS: &str = "
SELECT app, status, count(*) FROM pgpushd.channels
 WHERE status <> 'closed'
 GROUP BY app, status";

/// Claims up to `limit` due channels under `lease`, held for `lease_for`.
pub async fn claim(
    client: &Client,
    limit: i64,
    lease: Uuid,
    lease_for: Duration,
) -> Result<Vec<ClaimedChannel>, tokio_postgres::Error> {
    let rows = client
        .query(CLAIM, &[&limit, &lease, &(lease_for.as_millis() as i64)])
        .await?;
    let mut claimed: Vec<ClaimedChannel> = rows
        .iter()
        .map(|r| ClaimedChannel {
            id: r.get(0),
            app: r.get(1),
            // The CHECKs allow nothing else.
            storage: r.get::<_, &str>(2).parse().unwrap_or(MessageStorage::None),
            status: Status::parse(r.get(3)).unwrap_or(Status::Pending),
            channel_id: r.get(4),
            attempts: r.get(5),
            uncertain: r.get(6),
        })
        .collect();
    claimed.sort_by_key(|c| c.id);
    Ok(claimed)
}

/// What a write-back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The row's status now.
    Done(Status),
    /// The lease was gone (taken by another daemon after it ran out): nothing written.
    LeaseLost,
}

/// Writes `u` back, under `lease`.
pub async fn write(
    client: &Client,
    u: &ChannelUpdate,
    lease: Uuid,
) -> Result<Written, tokio_postgres::Error> {
    let retry_ms = u.retry_in.map(|d| d.as_millis() as i64);
    let row = client
        .query_opt(
            WRITE,
            &[
                &u.id,
                &u.status.as_str(),
                &u.if_closing.as_str(),
                &u.channel_id,
                &(u.attempted as i32),
                &u.last_error,
                &retry_ms,
                &lease,
                &u.uncertain,
            ],
        )
        .await?;
    Ok(match row {
        Some(r) => Written::Done(Status::parse(r.get(0)).unwrap_or(u.status)),
        None => Written::LeaseLost,
    })
}

/// Ends the lease of a create that got no answer (see [`UNSURE`]).
pub async fn unsure(
    client: &Client,
    id: i64,
    lease: Uuid,
    reason: &str,
    wait: Duration,
) -> Result<(), tokio_postgres::Error> {
    let wait_ms = wait.as_millis() as i64;
    client
        .execute(UNSURE, &[&id, &lease, &reason, &wait_ms])
        .await?;
    Ok(())
}

/// The channel id row `id` names now.
pub async fn channel_of(client: &Client, id: i64) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(CHANNEL_OF, &[&id])
        .await?
        .and_then(|r| r.get(0)))
}

/// Every row of `app` that names an APNs channel, whatever its status.
pub async fn named(client: &Client, app: &str) -> Result<Vec<TableChannel>, tokio_postgres::Error> {
    let rows = client.query(NAMED, &[&app]).await?;
    Ok(rows
        .iter()
        .map(|r| TableChannel {
            id: r.get(0),
            channel_id: r.get(1),
            status: Status::parse(r.get(2)).unwrap_or(Status::Active),
        })
        .collect())
}

/// Whether a lease of `app` other than `mine` is out.
pub async fn other_lease_out(
    client: &Client,
    app: &str,
    mine: Uuid,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client.query_one(OTHER_LEASE, &[&app, &mine]).await?.get(0))
}

/// How long until the next channel's step falls due (zero or less: due now); `None` when
/// no channel waits for one.
pub async fn next_due(client: &Client) -> Result<Option<Duration>, tokio_postgres::Error> {
    let secs: Option<f64> = client.query_one(NEXT_DUE, &[]).await?.get(0);
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Channels per app and status, `closed` ones left out.
pub async fn counts(client: &Client) -> Result<Vec<(String, Status, i64)>, tokio_postgres::Error> {
    let rows = client.query(COUNTS, &[]).await?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r.get(0), Status::parse(r.get(1))?, r.get(2))))
        .collect())
}
