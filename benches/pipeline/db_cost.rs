//! `db_cost` (issue 19): what delivering a row costs PostgreSQL, against what inserting it
//! cost, at a trickle, a steady stream and a busy one.
//!
//! One writer commits single-row INSERTs at a fixed rate (fsync on), in rounds taken in
//! turns (bare then delivered, then delivered then bare):
//! - bare: the bare table (the outbox's columns, constraints and indexes, no trigger, out
//!   of the daemon's sight), the daemon running but asleep;
//! - delivered: the outbox, the daemon delivering to the emulator.
//!
//! A round's database CPU is every PostgreSQL process's, backends that exited meanwhile
//! included (the postmaster's reaped children). A delivered round ends once every row is
//! sent and the daemon is asleep again, so its awake tail is counted too.
//! `db_cost_ratio` = (delivered - bare) / bare, per row, each cycle's ratio then the median.
//! Beside it: the latency of each delivered row (commit to the emulator's answer), and what
//! the daemon asked of the database per row: statements (pg_stat_statements, the daemon's
//! role only), round trips, claims and looks (its metrics).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::db;
use crate::procs;
use crate::report::median;
use crate::scenarios::Env;
use anyhow::{bail, Context};

/// The writer's role: the daemon's statements are then those of every other role.
const WRITER: &str = "bench_writer";
const BARE: &str = "pgpushd.outbox_bare_db_cost";

#[derive(Debug, Clone, serde::Serialize)]
pub struct DbCost {
    pub rate: u64,
    pub round_s: f64,
    /// Database CPU per row: the bare rounds, the delivered rounds, the difference.
    pub bare_db_us_per_row: f64,
    pub delivered_db_us_per_row: f64,
    pub extra_db_us_per_row: f64,
    /// Each cycle's extra over its bare, and their median.
    pub ratios: Vec<f64>,
    pub ratio: f64,
    /// The rate the writer managed (it may fall behind at fsync's pace).
    pub offered_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub statements_per_row: f64,
    pub round_trips_per_row: f64,
    pub claims_per_row: f64,
    pub looks_per_row: f64,
    pub notifications_per_row: f64,
    /// The daemon's statements by calls in the last delivered round, most called first.
    pub top_statements: Vec<(String, i64)>,
    /// Where the database's CPU went, by process (the writer's backend, each of the
    /// daemon's connections by `application_name`, the WAL writer, ...), in µs per row:
    /// the delivered rounds' minus the bare rounds', largest first.
    pub extra_us_per_row_by_process: Vec<(String, f64)>,
}

struct RoundResult {
    rows: u64,
    db_us_per_row: f64,
    offered_per_s: f64,
    /// When each delivered row's INSERT committed, by token.
    committed: HashMap<String, SystemTime>,
    statements: i64,
    top: Vec<(String, i64)>,
    metrics: HashMap<&'static str, f64>,
    /// The database's CPU by process, in nanoseconds.
    by_process: HashMap<String, f64>,
}

const SERIES: [&str; 4] = [
    "pgpushd_database_round_trips_total",
    "pgpushd_batches_total",
    "pgpushd_looks_empty_total",
    "pgpushd_notifications_total",
];

pub async fn db_cost(
    env: &Env<'_>,
    rate: u64,
    round: Duration,
    cycles: usize,
) -> anyhow::Result<DbCost> {
    db::empty(&env.client).await?;
    env.client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {BARE};
             CREATE TABLE {BARE} (LIKE pgpushd.outbox INCLUDING ALL);
             CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{WRITER}') THEN
                     CREATE ROLE {WRITER} LOGIN SUPERUSER;
                 END IF;
             END $$;"
        ))
        .await
        .context("preparing the db_cost scenario (pg_stat_statements preloaded?)")?;
    let writer_url = env
        .url
        .replace("postgres://postgres@", &format!("postgres://{WRITER}@"));
    let record = env.work.path("db-cost-record.jsonl");
    let _ = std::fs::remove_file(&record);
    let emulator = procs::start_emulator(env.work, Duration::ZERO, Some(&record))?;
    let metrics = procs::free_addr()?;
    let config = env
        .work
        .daemon_config_with(&env.url, &emulator.endpoint, "", Some(metrics))?;
    let daemon = procs::start_daemon(env.work, &config)?;
    db::wait_listening(&env.client, Duration::from_secs(30)).await?;
    db::warm_up(&env.client).await?;

    let mut bare = Vec::new();
    let mut delivered = Vec::new();
    let mut ratios = Vec::new();
    let mut seq = 1u64;
    for cycle in 0..cycles {
        let order = if cycle % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut this = [None, None];
        for deliver in order {
            let r = one_round(env, &writer_url, deliver, rate, round, &mut seq, metrics)
                .await
                .with_context(|| format!("{rate} rows/s, delivered: {deliver}"))?;
            eprintln!(
                "    {rate:>5} rows/s {:<9} {:>7.0} us of database CPU per row",
                if deliver { "delivered" } else { "bare" },
                r.db_us_per_row
            );
            this[deliver as usize] = Some(r);
        }
        let [Some(b), Some(d)] = this else {
            unreachable!("both rounds ran")
        };
        ratios.push((d.db_us_per_row - b.db_us_per_row) / b.db_us_per_row);
        bare.push(b);
        delivered.push(d);
    }
    daemon.stop()?;
    emulator.proc.stop()?; // flushes the record file
    env.client
        .batch_execute(&format!("DROP TABLE {BARE}"))
        .await?;

    let mut committed: HashMap<String, SystemTime> = HashMap::new();
    for r in &mut delivered {
        committed.extend(r.committed.drain());
    }
    let mut latencies = crate::scenarios::answer_latencies(&record, &mut committed)?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let rows: u64 = delivered.iter().map(|r| r.rows).sum();
    let per_row = |series: &str| {
        delivered.iter().map(|r| r.metrics[series]).sum::<f64>() / rows.max(1) as f64
    };
    let bare_us = median(bare.iter().map(|r| r.db_us_per_row));
    let delivered_us = median(delivered.iter().map(|r| r.db_us_per_row));
    Ok(DbCost {
        rate,
        round_s: round.as_secs_f64(),
        bare_db_us_per_row: bare_us,
        delivered_db_us_per_row: delivered_us,
        extra_db_us_per_row: delivered_us - bare_us,
        ratio: median(ratios.iter().copied()),
        ratios,
        offered_per_s: median(delivered.iter().map(|r| r.offered_per_s)),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        statements_per_row: delivered.iter().map(|r| r.statements).sum::<i64>() as f64
            / rows.max(1) as f64,
        round_trips_per_row: per_row(SERIES[0]),
        claims_per_row: per_row(SERIES[1]),
        looks_per_row: per_row(SERIES[2]),
        notifications_per_row: per_row(SERIES[3]),
        top_statements: delivered.last().map(|r| r.top.clone()).unwrap_or_default(),
        extra_us_per_row_by_process: by_process(&bare, &delivered),
    })
}

/// Each process's CPU per row, the delivered rounds' minus the bare rounds', in µs.
fn by_process(bare: &[RoundResult], delivered: &[RoundResult]) -> Vec<(String, f64)> {
    let per_row = |rounds: &[RoundResult]| {
        let rows = rounds.iter().map(|r| r.rows).sum::<u64>().max(1) as f64;
        let mut sum: HashMap<String, f64> = HashMap::new();
        for r in rounds {
            for (who, ns) in &r.by_process {
                *sum.entry(who.clone()).or_default() += ns / 1e3 / rows;
            }
        }
        sum
    };
    let (bare, delivered) = (per_row(bare), per_row(delivered));
    let mut extra: Vec<(String, f64)> = bare
        .keys()
        .chain(delivered.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|who| {
            let us =
                delivered.get(who).copied().unwrap_or(0.0) - bare.get(who).copied().unwrap_or(0.0);
            (who.clone(), us)
        })
        .collect();
    extra.sort_by(|a, b| b.1.total_cmp(&a.1));
    extra
}

/// Whose a PostgreSQL process is, for the split of the database's CPU.
fn process_name(backend_type: &str, application: &str, user: &str) -> String {
    match backend_type {
        "client backend" if user == WRITER => "the writer".to_owned(),
        "client backend" if application.starts_with("pgpushd-") => application.to_owned(),
        "client backend" => "the bench's own connection".to_owned(),
        "autovacuum worker" | "autovacuum launcher" => "autovacuum".to_owned(),
        "walwriter" | "checkpointer" | "background writer" => backend_type.to_owned(),
        _ => "other background processes".to_owned(),
    }
}

/// The CPU each process used between two readings, by [`process_name`]; the processes
/// that exited meanwhile together, as "exited".
async fn cpu_by_process(
    client: &tokio_postgres::Client,
    postmaster: i32,
    before: &procs::PostgresCpu,
    after: &procs::PostgresCpu,
) -> anyhow::Result<HashMap<String, f64>> {
    let names: HashMap<i32, String> = client
        .query(
            "SELECT pid, backend_type, coalesce(application_name, ''), coalesce(usename::text, '')
               FROM pg_stat_activity",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), process_name(r.get(1), r.get(2), r.get(3))))
        .collect();
    let mut split: HashMap<String, f64> = HashMap::new();
    for (pid, ns) in &after.by_pid {
        let who = match names.get(pid) {
            Some(name) => name.clone(),
            None if *pid == postmaster => "postmaster".to_owned(),
            None => "other background processes".to_owned(),
        };
        *split.entry(who).or_default() +=
            ns.saturating_sub(*before.by_pid.get(pid).unwrap_or(&0)) as f64;
    }
    let gone: u64 = before
        .by_pid
        .iter()
        .filter(|(pid, _)| !after.by_pid.contains_key(pid))
        .map(|(_, ns)| ns)
        .sum();
    let exited = after.reaped_ns.saturating_sub(before.reaped_ns) as f64 - gone as f64;
    *split.entry("exited".to_owned()).or_default() += exited;
    Ok(split)
}

async fn one_round(
    env: &Env<'_>,
    writer_url: &str,
    deliver: bool,
    rate: u64,
    duration: Duration,
    seq: &mut u64,
    metrics: std::net::SocketAddr,
) -> anyhow::Result<RoundResult> {
    db::empty(&env.client).await?;
    env.client
        .batch_execute(&format!("TRUNCATE {BARE}; CHECKPOINT"))
        .await?;
    wait_asleep(metrics).await?;
    procs::wait_quiet(Duration::from_secs(30)).await;
    let writer = db::connect(writer_url).await?;
    let table = if deliver { "pgpushd.outbox" } else { BARE };
    let insert = writer
        .prepare(&format!(
            "INSERT INTO {table} (device_token, payload)
             VALUES ($1, jsonb_build_object('aps', jsonb_build_object('alert', $2::text)))"
        ))
        .await?;
    env.client
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await?;
    let scraped = |m: std::net::SocketAddr| -> anyhow::Result<HashMap<&'static str, f64>> {
        SERIES
            .iter()
            .map(|s| Ok((*s, procs::scrape(m, s)?)))
            .collect()
    };
    let metrics_before = scraped(metrics)?;
    let postmaster = env.postmaster.context("the postmaster's pid")?;
    let ticks_before = procs::postgres_ticks(postmaster);
    let cpu_before = procs::postgres_cpu(postmaster);

    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut committed: HashMap<String, SystemTime> = HashMap::with_capacity(total as usize);
    for _ in 0..total {
        tick.tick().await;
        let token = db::token(*seq);
        writer
            .execute(&insert, &[&token, &format!("db_cost #{seq}")])
            .await?;
        committed.insert(token, SystemTime::now());
        *seq += 1;
    }
    let offered_per_s = total as f64 / started.elapsed().as_secs_f64();
    if deliver {
        db::wait_drained(&writer, Duration::from_secs(60)).await?;
        wait_asleep(metrics).await?;
    }
    let ticks = procs::postgres_ticks(postmaster) - ticks_before;
    let cpu_after = procs::postgres_cpu(postmaster);
    let by_process = cpu_by_process(&writer, postmaster, &cpu_before, &cpu_after).await?;
    let metrics_after = scraped(metrics)?;
    let statements = writer
        .query(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls::bigint
               FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
              WHERE r.rolname <> $1 AND query NOT LIKE '%pg_stat_statements%' AND s.dbid = (SELECT oid FROM pg_database
                                                   WHERE datname = current_database())
              ORDER BY calls DESC",
            &[&WRITER],
        )
        .await?;
    let top: Vec<(String, i64)> = statements
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    if !deliver {
        committed.clear();
    }
    Ok(RoundResult {
        rows: total,
        db_us_per_row: ticks as f64 / procs::clock_ticks() * 1e6 / total.max(1) as f64,
        offered_per_s,
        committed,
        statements: if deliver {
            top.iter().map(|(_, calls)| calls).sum()
        } else {
            0
        },
        top: top.into_iter().take(12).collect(),
        metrics: SERIES
            .iter()
            .map(|s| (*s, metrics_after[s] - metrics_before[s]))
            .collect(),
        by_process,
    })
}

/// Waits until the daemon says it is asleep (after a delivered round, the rate decays).
async fn wait_asleep(metrics: std::net::SocketAddr) -> anyhow::Result<()> {
    let give_up = Instant::now() + Duration::from_secs(30);
    while procs::scrape(metrics, "pgpushd_awake")? > 0.0 {
        if Instant::now() > give_up {
            bail!("the daemon stayed awake 30 s after its rows stopped");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
