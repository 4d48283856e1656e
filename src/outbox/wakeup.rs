//! The SQL of the awake/asleep hand-over (`sql/004_wakeup.sql` explains the protocol):
//! the deadline writers read, and the barrier a daemon crosses before it sleeps.

use std::time::Duration;

use tokio_postgres::{Client, GenericClient};

use super::CHANNEL;

/// The advisory lock the trigger takes shared and a daemon going to sleep takes
/// exclusively: ('pgpu', 'wake').
pub const BARRIER: (i32, i32) = (1_885_827_189, 2_002_873_189);

/// Tells writers a daemon is awake for `hold` from now (the database's clock).
pub async fn stay_awake(client: &Client, hold: Duration) -> Result<(), tokio_postgres::Error> {
    let hold_ms = i64::try_from(hold.as_millis()).unwrap_or(i64::MAX);
    client
        .execute(
            "SELECT setval('pgpushd.awake_until',
                           (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $1, true)",
            &[&hold_ms],
        )
        .await?;
    Ok(())
}

/// Tells writers to notify again, then waits for the writers that may have read an
/// earlier deadline: `true` once none is left (their rows are committed or gone),
/// `false` if one still holds its transaction open (never waits for it).
///
/// One round trip: the two statements are pipelined, and run in the order sent.
pub async fn fall_asleep(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let (_, row) = futures::future::try_join(
        client.execute("SELECT setval('pgpushd.awake_until', 0, true)", &[]),
        client.query_one(
            "SELECT pg_try_advisory_xact_lock($1, $2)",
            &[&BARRIER.0, &BARRIER.1],
        ),
    )
    .await?;
    Ok(row.get(0))
}

/// Wakes every listening daemon, as a writer's NOTIFY would.
pub async fn notify(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_notify($1, '')", &[&CHANNEL])
        .await?;
    Ok(())
}

/// How long a daemon is still awake by the deadline writers read; `None` when asleep.
pub async fn awake_for(
    client: &impl GenericClient,
) -> Result<Option<Duration>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(pg_sequence_last_value('pgpushd.awake_until'), 0)
                    - (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await?;
    let left: i64 = row.get(0);
    Ok((left > 0).then(|| Duration::from_millis(left as u64)))
}
