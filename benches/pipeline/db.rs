//! The database side of the bench: a fresh database per run on the throwaway cluster,
//! backlogs loaded in bulk, and waiting for a drain to finish.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgpushd::secret::Secret;
use tokio_postgres::Client;

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    pgpushd::db::connect(
        &Secret::new(url.to_owned()),
        Duration::from_secs(10),
        "bench",
    )
    .await
}

/// Creates database `name` (dropping a leftover one) with the schema; returns its URL.
pub async fn fresh_database(cluster: &pgpushd::devdb::DevDb, name: &str) -> anyhow::Result<String> {
    let admin = connect(&cluster.url("postgres")).await?;
    // Two statements: a multi-statement string runs as one transaction, which DROP
    // DATABASE refuses.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    let url = cluster.url(name);
    let mut client = connect(&url).await?;
    pgpushd::outbox::migrate::migrate(&mut client).await?;
    Ok(url)
}

pub async fn drop_database(cluster: &pgpushd::devdb::DevDb, name: &str) -> anyhow::Result<()> {
    let admin = connect(&cluster.url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    Ok(())
}

/// The device token of row `seq` (64 hex digits).
pub fn token(seq: u64) -> String {
    format!("{seq:064x}")
}

/// The payload of row `seq`; the raw link sends the same.
pub fn payload(seq: u64) -> serde_json::Value {
    serde_json::json!({"aps": {"alert": format!("Bench #{seq}")}})
}

/// Empties the outbox (between scenarios of a run).
pub async fn empty(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute("TRUNCATE pgpushd.outbox; TRUNCATE pgpushd.unregistered_tokens")
        .await?;
    Ok(())
}

/// Rows still pending in the outbox.
pub async fn pending(client: &Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM pgpushd.outbox WHERE status = 'pending'",
            &[],
        )
        .await?
        .get(0))
}

/// Inserts rows `1..=n` as a pending backlog, in statements of 100,000, then VACUUM
/// ANALYZE and CHECKPOINT so the drain that follows pays for neither the load's
/// bookkeeping nor its checkpoint.
pub async fn load_backlog(client: &Client, n: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut first = 1u64;
    while first <= n {
        let last = (first + 99_999).min(n);
        client
            .execute(
                "INSERT INTO pgpushd.outbox (device_token, payload)
                 SELECT lpad(to_hex(g), 64, '0'),
                        jsonb_build_object('aps', jsonb_build_object('alert', 'Bench #' || g))
                   FROM generate_series($1::bigint, $2::bigint) g",
                &[&(first as i64), &(last as i64)],
            )
            .await
            .context("loading the backlog")?;
        first = last + 1;
    }
    client
        .batch_execute("VACUUM ANALYZE pgpushd.outbox")
        .await?;
    client.batch_execute("CHECKPOINT").await?;
    Ok(started.elapsed())
}

/// Waits until no row is pending, polling every 50 ms with a query that walks the claim
/// index (cheap, unlike counting the table); returns when it saw none.
pub async fn wait_drained(client: &Client, deadline: Duration) -> anyhow::Result<Instant> {
    let give_up = Instant::now() + deadline;
    let probe = client
        .prepare(
            "SELECT 1 FROM pgpushd.outbox WHERE status = 'pending'
              ORDER BY send_after, id LIMIT 1",
        )
        .await?;
    loop {
        if client.query_opt(&probe, &[]).await?.is_none() {
            return Ok(Instant::now());
        }
        if Instant::now() > give_up {
            bail!("rows still pending after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows by status: (sent, other).
pub async fn sent_and_other(client: &Client) -> anyhow::Result<(i64, i64)> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'sent'),
                    count(*) FILTER (WHERE status <> 'sent')
               FROM pgpushd.outbox",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Sends one row through a daemon just started, and waits until it is sent: it opens the
/// APNs connections and lifts their stream limit before anything is measured.
pub async fn warm_up(client: &Client) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO pgpushd.outbox (device_token, payload) VALUES ($1, '{\"aps\":{}}')",
            &[&token(0)],
        )
        .await?;
    wait_drained(client, Duration::from_secs(30)).await?;
    Ok(())
}

/// Waits until the daemon's listener has issued LISTEN (so a notification wakes it).
pub async fn wait_listening(client: &Client, deadline: Duration) -> anyhow::Result<()> {
    let give_up = Instant::now() + deadline;
    loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'pgpushd-listener' AND query ILIKE 'LISTEN%'",
                &[],
            )
            .await?
            .get(0);
        if n > 0 {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("the daemon's listener did not LISTEN within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
