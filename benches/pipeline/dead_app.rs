//! Issue 20, item 7: one app's trouble never holds up another. A dead app (its key
//! refused by APNs, 200,000 rows waiting) beside a healthy one at 200 rows/s: the healthy
//! app's commit-to-answer latency against its figure alone, and how often the dead rows
//! were written per pause of their app.

use std::time::Duration;

use anyhow::bail;
use tokio_postgres::Client;

use crate::db;
use crate::procs::{self, Workdir};
use crate::scenarios::{answer_latencies, produce, Env};

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadApp {
    pub rate: u64,
    pub dead_rows: u64,
    pub p50_ms_alone: f64,
    pub p99_ms_alone: f64,
    pub p50_ms_beside_dead: f64,
    pub p99_ms_beside_dead: f64,
    /// `p99_ms_beside_dead / p99_ms_alone` (the issue's floor: at most 2).
    pub p99_ratio: f64,
    /// Pauses of the dead app while the healthy app's rows were measured (its backlog
    /// arrived 3 s into the measurement).
    pub pauses: f64,
    /// Writes of dead rows meanwhile (from pg_stat_statements: every row the UPDATEs on
    /// the outbox wrote, less one per healthy row), per dead row and per pause.
    pub dead_writes_per_row_per_pause: f64,
}

/// Measures the healthy app alone, then beside `dead_rows` rows of a dead app.
pub async fn dead_app(
    env: &Env<'_>,
    rate: u64,
    duration: Duration,
    dead_rows: u64,
) -> anyhow::Result<DeadApp> {
    let alone = healthy_app(env, rate, duration, 0).await?;
    let beside = healthy_app(env, rate, duration, dead_rows).await?;
    Ok(DeadApp {
        rate,
        dead_rows,
        p50_ms_alone: alone.p50_ms,
        p99_ms_alone: alone.p99_ms,
        p50_ms_beside_dead: beside.p50_ms,
        p99_ms_beside_dead: beside.p99_ms,
        p99_ratio: beside.p99_ms / alone.p99_ms,
        pauses: beside.pauses,
        dead_writes_per_row_per_pause: beside.dead_writes
            / dead_rows as f64
            / beside.pauses.max(1.0),
    })
}

struct Healthy {
    p50_ms: f64,
    p99_ms: f64,
    pauses: f64,
    dead_writes: f64,
}

/// `[apps.dead]`: the emulator's endpoint and CA, a key it does not know.
fn dead_app_toml(work: &Workdir, endpoint: &str) -> anyhow::Result<String> {
    let key = work.path("Dead.p8");
    std::fs::write(&key, pgpushd_emulator::jwt::generate_signing_key()?)?;
    Ok(format!(
        r#"
[apps.dead]
topic = "{topic}"
endpoint = "{endpoint}"
ca_file = "{ca}"

[apps.dead.token]
key_file = "{key}"
key_id = "{key_id}"
team_id = "{team_id}"
"#,
        topic = procs::TOPIC,
        ca = work.ca_file().display(),
        key = key.display(),
        key_id = procs::KEY_ID,
        team_id = procs::TEAM_ID,
    ))
}

async fn healthy_app(
    env: &Env<'_>,
    rate: u64,
    duration: Duration,
    dead_rows: u64,
) -> anyhow::Result<Healthy> {
    db::empty(&env.client).await?;
    let record = env.work.path("dead-app-record.jsonl");
    let emulator = procs::start_emulator(env.work, Duration::ZERO, Some(&record))?;
    let metrics = procs::free_addr()?;
    let config = env
        .work
        .daemon_config_with(&env.url, &emulator.endpoint, "", Some(metrics))?;
    if dead_rows > 0 {
        let text =
            std::fs::read_to_string(&config)? + &dead_app_toml(env.work, &emulator.endpoint)?;
        std::fs::write(&config, text)?;
    }
    let daemon = procs::start_daemon(env.work, &config)?;
    db::wait_listening(&env.client, Duration::from_secs(30)).await?;
    db::warm_up(&env.client).await?;
    let pauses = || procs::scrape(metrics, "pgpushd_app_pauses_total{app=\"dead\"}");
    env.client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             SELECT pg_stat_statements_reset()",
        )
        .await?;
    // The healthy app's rows arrive all along; a few seconds in, the dead app's backlog
    // lands at once (its first claims, its refusal, its set-aside are measured too).
    let producing = tokio::spawn({
        let url = env.url.clone();
        async move { produce(&url, rate, duration).await }
    });
    if dead_rows > 0 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        env.client
            .execute(
                "INSERT INTO pgpushd.outbox (app, device_token, payload)
                 SELECT 'dead', lpad(to_hex(g), 64, '0'), '{\"aps\":{\"alert\":\"dead\"}}'
                   FROM generate_series(1, $1::bigint) g",
                &[&(dead_rows as i64)],
            )
            .await?;
    }
    let mut committed = producing.await??;
    let healthy_rows = committed.len() as f64;
    wait_healthy_sent(&env.client, Duration::from_secs(60)).await?;
    let pauses = pauses().unwrap_or(0.0);
    let updated: f64 = env
        .client
        .query_one(
            "SELECT coalesce(sum(rows), 0)::float8 FROM pg_stat_statements
              WHERE query ILIKE 'UPDATE pgpushd.outbox%'
                AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await?
        .get(0);
    daemon.stop()?;
    emulator.proc.stop()?; // flushes the record file

    let mut latencies = answer_latencies(&record, &mut committed)?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok(Healthy {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        pauses,
        dead_writes: (updated - healthy_rows).max(0.0),
    })
}

/// Waits until no row of the healthy app is pending.
async fn wait_healthy_sent(client: &Client, deadline: Duration) -> anyhow::Result<()> {
    let give_up = std::time::Instant::now() + deadline;
    loop {
        let pending: i64 = client
            .query_one(
                "SELECT count(*) FROM pgpushd.outbox WHERE app = 'default' AND status = 'pending'",
                &[],
            )
            .await?
            .get(0);
        if pending == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > give_up {
            bail!("{pending} rows of the healthy app still pending after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
