//! Issue 20, item 7: one app's trouble never holds up another. A dead app (its key
//! refused by APNs, 200,000 rows waiting) beside a healthy one at 200 rows/s: the healthy
//! app's commit-to-answer latency against its figure alone, and how often the dead rows
//! were written per pause of their app.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::bail;
use tokio_postgres::Client;

use crate::db;
use crate::procs::{self, Workdir};
use crate::scenarios::{answer_latencies, produce, Env};

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadApp {
    pub rate: u64,
    pub dead_rows: u64,
    /// The healthy app alone (a daemon of its own, no dead app configured).
    pub p50_ms_alone: f64,
    pub p99_ms_alone: f64,
    /// While the dead app's backlog arrives (at once, 3 s in) and is parked: its first
    /// requests, its refusal, the claims walking past its rows until they are parked.
    pub p50_ms_arrival: f64,
    pub p99_ms_arrival: f64,
    /// Once the dead backlog is parked and autovacuum has been through: the steady state
    /// of a dead app beside a healthy one.
    pub p50_ms_beside_dead: f64,
    pub p99_ms_beside_dead: f64,
    /// `p99_ms_beside_dead / p99_ms_alone` (the floor: at most 2).
    pub p99_ratio: f64,
    /// How long parking the dead backlog took, from its arrival.
    pub parked_after_s: f64,
    /// When autovacuum had been through the outbox, from the arrival: the steady state
    /// is measured from then on.
    pub vacuumed_after_s: f64,
    /// Pauses of the dead app over the arrival and the steady state.
    pub pauses: f64,
    /// Writes of dead rows meanwhile (the outbox's `n_tup_upd`, less one per healthy row),
    /// per dead row and per pause.
    pub dead_writes_per_row_per_pause: f64,
}

/// Measures the healthy app alone, then beside `dead_rows` rows of a dead app: as they
/// arrive, and once they are parked.
pub async fn dead_app(
    env: &Env<'_>,
    rate: u64,
    duration: Duration,
    dead_rows: u64,
) -> anyhow::Result<DeadApp> {
    let alone = healthy_app(env, rate, duration, 0).await?;
    let beside = healthy_app(env, rate, duration, dead_rows).await?;
    let steady = beside.steady.expect("measured beside a dead app");
    Ok(DeadApp {
        rate,
        dead_rows,
        p50_ms_alone: alone.arrival.0,
        p99_ms_alone: alone.arrival.1,
        p50_ms_arrival: beside.arrival.0,
        p99_ms_arrival: beside.arrival.1,
        p50_ms_beside_dead: steady.0,
        p99_ms_beside_dead: steady.1,
        p99_ratio: steady.1 / alone.arrival.1,
        parked_after_s: beside.parked_after_s,
        vacuumed_after_s: beside.vacuumed_after_s,
        pauses: beside.pauses,
        dead_writes_per_row_per_pause: beside.dead_writes
            / dead_rows as f64
            / beside.pauses.max(1.0),
    })
}

struct Healthy {
    /// (p50, p99) in ms of the first round (alone, or while the dead rows arrive).
    arrival: (f64, f64),
    /// The same once the dead rows are parked.
    steady: Option<(f64, f64)>,
    parked_after_s: f64,
    vacuumed_after_s: f64,
    pauses: f64,
    dead_writes: f64,
}

/// `[apps.dead]`: the emulator's endpoint and CA, a key it does not know.
fn dead_app_toml(work: &Workdir, endpoint: &str) -> anyhow::Result<String> {
    let key = work.path("Dead.p8");
    std::fs::write(&key, pgpushd_emulator::jwt::generate_signing_key()?)?;
    Ok(work.app_toml("dead", endpoint, &key))
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
    let scrape = |series: &str| procs::scrape(metrics, series).unwrap_or(0.0);
    env.client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             SELECT pg_stat_statements_reset()",
        )
        .await?;
    // The healthy app's rows arrive all along; a few seconds in, the dead app's backlog
    // lands at once.
    let producing = tokio::spawn({
        let url = env.url.clone();
        async move { produce(&url, rate, duration, 1).await }
    });
    let updates = || async {
        let n: i64 = env
            .client
            .query_one(
                "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'pgpushd.outbox'::regclass",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok(n as f64)
    };
    let updates_before = updates().await?;
    let mut parked_after_s = 0.0;
    let mut vacuumed_after_s = 0.0;
    if dead_rows > 0 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let arrived = std::time::Instant::now();
        env.client
            .execute(
                "INSERT INTO pgpushd.outbox (app, device_token, payload)
                 SELECT 'dead', lpad(to_hex(g), 64, '0'), '{\"aps\":{\"alert\":\"dead\"}}'
                   FROM generate_series(1, $1::bigint) g",
                &[&(dead_rows as i64)],
            )
            .await?;
        let set_aside = "pgpushd_rows_set_aside_total{app=\"dead\"}";
        while scrape(set_aside) < dead_rows as f64 * 0.95 {
            if arrived.elapsed() > Duration::from_secs(300) {
                bail!("the dead backlog was not parked within 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        parked_after_s = arrived.elapsed().as_secs_f64();
        // Parking leaves the rows' old index entries where the claims walk until a vacuum
        // removes them: the steady state begins once autovacuum has been through.
        loop {
            let vacuumed: bool = env
                .client
                .query_one(
                    "SELECT coalesce(last_autovacuum > now() - $1::float8 * interval '1 second', false)
                       FROM pg_stat_user_tables WHERE relid = 'pgpushd.outbox'::regclass",
                    &[&arrived.elapsed().as_secs_f64()],
                )
                .await?
                .get(0);
            if vacuumed {
                break;
            }
            if arrived.elapsed() > Duration::from_secs(300) {
                bail!("autovacuum did not go through the outbox within 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        vacuumed_after_s = arrived.elapsed().as_secs_f64();
    }
    let mut arrival = producing.await??;
    let mut steady = None;
    if dead_rows > 0 {
        let explain = std::env::var_os("PGPUSHD_BENCH_EXPLAIN").is_some();
        let counters = [
            "pgpushd_awake",
            "pgpushd_looks_empty_total",
            "pgpushd_notifications_total",
            "pgpushd_batches_total",
            "pgpushd_rows_found_awake_total",
            "pgpushd_database_round_trips_total",
            "pgpushd_app_pauses_total{app=\"dead\"}",
        ];
        let before: Vec<f64> = counters.iter().map(|c| scrape(c)).collect();
        steady = Some(produce(&env.url, rate, duration, 10_000_000).await?);
        if explain {
            let top = env
                .client
                .simple_query(
                    "SELECT calls::text, round(total_exec_time)::text, round(mean_exec_time::numeric, 2)::text,
                            left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
                       FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8",
                )
                .await?;
            for m in top {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    eprintln!(
                        "  top: calls {:?} total {:?} ms mean {:?} ms {:?}",
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3)
                    );
                }
            }
            for (c, b) in counters.iter().zip(before) {
                eprintln!("  {c}: {b} -> {}", scrape(c));
            }
        }
    }
    let healthy_rows = (arrival.len() + steady.as_ref().map_or(0, |s| s.len())) as f64;
    wait_healthy_sent(&env.client, Duration::from_secs(60)).await?;
    let pauses = scrape("pgpushd_app_pauses_total{app=\"dead\"}");
    // Backends report their counts at most every second, idle ones within ten.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let updated = updates().await? - updates_before;
    daemon.stop()?;
    emulator.proc.stop()?; // flushes the record file

    let percentiles = |committed: &mut HashMap<String, SystemTime>| -> anyhow::Result<(f64, f64)> {
        let mut latencies = answer_latencies(&record, committed)?;
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        Ok((pct(0.50), pct(0.99)))
    };
    Ok(Healthy {
        arrival: percentiles(&mut arrival)?,
        steady: steady.as_mut().map(percentiles).transpose()?,
        parked_after_s,
        vacuumed_after_s,
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
