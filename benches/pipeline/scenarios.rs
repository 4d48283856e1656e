//! The scenarios of issue 6, each measured once per call; `main` repeats them and takes
//! medians.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use tokio_postgres::Client;

use crate::db;
use crate::procs::{self, CpuUse, Watched, Workdir};
use crate::raw;
use crate::report::median;

/// How long a measurement waits for other users of the machine to go quiet.
const QUIET_WAIT: Duration = Duration::from_secs(30);

/// Streams the daemon can keep in flight with the shipped defaults
/// (`batch_size` 500 x `max_batches_in_flight` 4).
pub const DAEMON_STREAMS: usize = 500 * 4;

pub struct Env<'a> {
    pub postmaster: Option<i32>,
    pub work: &'a Workdir,
    pub url: String,
    pub client: Client,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Drain {
    pub rows_per_s: f64,
    pub elapsed_s: f64,
    pub load_s: f64,
    pub peak_rss_mb: f64,
    pub cpu: CpuUse,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Raw {
    pub rows_per_s: f64,
    pub cpu: CpuUse,
}

/// Drains a backlog of `rows` with the emulator answering after `latency`, then sends the
/// same rows over the raw link to the same emulator.
pub async fn drain_and_raw(
    env: &Env<'_>,
    rows: u64,
    latency: Duration,
    with_raw: bool,
) -> anyhow::Result<(Drain, Option<Raw>)> {
    db::empty(&env.client).await?;
    let load = db::load_backlog(&env.client, rows).await?;
    let emulator = procs::start_emulator(env.work, latency, None)?;
    let config = env.work.daemon_config(&env.url, &emulator.endpoint)?;

    let mut watched = Watched {
        daemon: None,
        emulator: Some(emulator.proc.pid()),
        postmaster: env.postmaster,
    };
    procs::wait_quiet(QUIET_WAIT).await;
    let before = watched.mark();
    let daemon = procs::start_daemon(env.work, &config)?;
    watched.daemon = Some(daemon.pid());
    let perf = procs::perf_attach(daemon.pid())?;
    let deadline = Duration::from_secs(120 + rows / 1000);
    let done = db::wait_drained(&env.client, deadline)
        .await
        .with_context(|| daemon_log(env.work))?;
    let elapsed = done.duration_since(daemon.started);
    let cpu = watched.since(&before, true);
    let peak_rss_mb = procs::peak_rss_mb(daemon.pid()).unwrap_or(f64::NAN);
    daemon.stop()?;
    if let Some(perf) = perf {
        perf.stop()?;
    }
    let (sent, other) = db::sent_and_other(&env.client).await?;
    if sent != rows as i64 || other != 0 {
        bail!("after the drain: {sent} rows sent and {other} not, of {rows}");
    }
    let drain = Drain {
        rows_per_s: rows as f64 / elapsed.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        load_s: load.as_secs_f64(),
        peak_rss_mb,
        cpu,
    };

    let raw = if with_raw {
        let watched = Watched {
            daemon: None,
            emulator: Some(emulator.proc.pid()),
            postmaster: env.postmaster,
        };
        procs::wait_quiet(QUIET_WAIT).await;
        let before = watched.mark();
        let r = raw::run(&config, rows, DAEMON_STREAMS).await?;
        let cpu = watched.since(&before, false);
        Some(Raw {
            rows_per_s: r.rows as f64 / r.elapsed.as_secs_f64(),
            cpu,
        })
    } else {
        None
    };
    emulator.proc.stop()?;
    Ok((drain, raw))
}

fn daemon_log(work: &Workdir) -> String {
    let text = std::fs::read_to_string(work.path("daemon.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "the daemon's log ends: {}",
        lines[lines.len().saturating_sub(10)..].join("\n")
    )
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    pub rows: u64,
    pub offered_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu: CpuUse,
    /// The database's CPU spent on the daemon's own sessions while the rows arrived, per
    /// row, and the daemon's claims (its transactions) per second: what delivering costs
    /// the database at this rate, at a pace that does not depend on it.
    pub daemon_db_us_per_row: f64,
    pub daemon_claims_per_s: f64,
}

/// CPU seconds the database's sessions serving the daemon (`application_name`
/// `pgpushd-*`) have used so far, from /proc (the database runs here). A session that ended
/// meanwhile takes its time with it: the daemon's sessions live as long as it does.
async fn daemon_sessions_cpu_s(client: &Client) -> anyhow::Result<f64> {
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgpushd-%'",
            &[],
        )
        .await?;
    let ticks: u64 = rows.iter().map(|r| procs::cpu_ticks(r.get(0))).sum();
    Ok(ticks as f64 / procs::clock_ticks())
}

/// Producers commit single-row INSERTs at `rate` rows/s for `duration`; each row's
/// latency runs from its commit (when COMMIT returned to the producer) to the emulator
/// answering it (its record's `at`, in microseconds).
pub async fn latency(env: &Env<'_>, rate: u64, duration: Duration) -> anyhow::Result<Latency> {
    db::empty(&env.client).await?;
    let record = env.work.path("latency-record.jsonl");
    let emulator = procs::start_emulator(env.work, Duration::ZERO, Some(&record))?;
    let config = env.work.daemon_config(&env.url, &emulator.endpoint)?;
    let daemon = procs::start_daemon(env.work, &config)?;
    db::wait_listening(&env.client, Duration::from_secs(30)).await?;
    db::warm_up(&env.client).await?;

    let watched = Watched {
        daemon: Some(daemon.pid()),
        emulator: Some(emulator.proc.pid()),
        postmaster: env.postmaster,
    };
    procs::wait_quiet(QUIET_WAIT).await;
    let commits_before = commits(&env.client).await?;
    let sessions_before = daemon_sessions_cpu_s(&env.client).await?;
    let before = watched.mark();
    let started = tokio::time::Instant::now();
    let mut committed = produce(&env.url, rate, duration, 1).await?;
    let total = committed.len() as u64;
    let elapsed = started.elapsed();
    let offered = total as f64 / elapsed.as_secs_f64();
    db::wait_drained(&env.client, Duration::from_secs(60)).await?;
    let cpu = watched.since(&before, false);
    let sessions_cpu_s = daemon_sessions_cpu_s(&env.client).await? - sessions_before;
    let claims_per_s = daemon_txns(&env.client, &commits_before, total as f64).await?;
    daemon.stop()?;
    emulator.proc.stop()?; // flushes the record file

    let mut latencies = answer_latencies(&record, &mut committed)?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok(Latency {
        rows: latencies.len() as u64,
        offered_per_s: offered,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: *latencies.last().unwrap_or(&f64::NAN),
        cpu,
        daemon_db_us_per_row: sessions_cpu_s * 1e6 / total.max(1) as f64,
        daemon_claims_per_s: claims_per_s,
    })
}

/// Producers commit single-row INSERTs (app `default`) at `rate` rows/s for `duration`,
/// their tokens numbered from `first`; returns when each row's COMMIT returned to its
/// producer, by token.
pub async fn produce(
    url: &str,
    rate: u64,
    duration: Duration,
    first: u64,
) -> anyhow::Result<HashMap<String, SystemTime>> {
    // Enough producers that fsync'd commits keep up with the rate.
    const PRODUCERS: u64 = 8;
    let total = rate * duration.as_millis() as u64 / 1000;
    let period = Duration::from_nanos(1_000_000_000 * PRODUCERS / rate);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let client = db::connect(url).await?;
        tasks.push(tokio::spawn(async move {
            let insert = client
                .prepare(
                    "INSERT INTO pgpushd.outbox (device_token, payload)
                     VALUES ($1, jsonb_build_object('aps', jsonb_build_object('alert', $2::text)))",
                )
                .await?;
            let mut tick =
                tokio::time::interval_at(started + period * p as u32 / PRODUCERS as u32, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut committed = Vec::new();
            let mut seq = first + p;
            while seq < first + total {
                tick.tick().await;
                client
                    .execute(&insert, &[&db::token(seq), &format!("Latency #{seq}")])
                    .await?;
                committed.push((seq, SystemTime::now()));
                seq += PRODUCERS;
            }
            anyhow::Ok(committed)
        }));
    }
    let mut committed: HashMap<String, SystemTime> = HashMap::new();
    for t in tasks {
        for (seq, at) in t.await?? {
            committed.insert(db::token(seq), at);
        }
    }
    Ok(committed)
}

/// Commit-to-answer latencies in ms of the rows in `committed` (by token), from the
/// emulator's record (complete once the emulator has stopped); each row found is taken
/// out of `committed`, and a row the record lacks is an error.
pub fn answer_latencies(
    record: &std::path::Path,
    committed: &mut HashMap<String, SystemTime>,
) -> anyhow::Result<Vec<f64>> {
    let want = committed.len();
    let mut out = Vec::with_capacity(want);
    for line in std::fs::read_to_string(record)?.lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        let token = r["device_token"].as_str().unwrap_or_default();
        let Some(commit) = committed.remove(token) else {
            continue;
        };
        let at = humantime::parse_rfc3339(r["at"].as_str().unwrap_or_default())?;
        out.push(match at.duration_since(commit) {
            Ok(d) => d.as_secs_f64() * 1000.0,
            // Answered before COMMIT returned to the producer.
            Err(e) => -e.duration().as_secs_f64() * 1000.0,
        });
    }
    if !committed.is_empty() {
        bail!(
            "{} of {want} committed rows never reached the emulator",
            committed.len()
        );
    }
    Ok(out)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Producer {
    /// Writers on the bare table (no trigger, out of every daemon's sight): median of
    /// the bare rounds taken in turn with the shipped daemon's (`ratio`'s), and of those
    /// taken with no daemon running (`wakeup_ratio`'s).
    pub tps_bare: f64,
    pub tps_bare_no_daemon: f64,
    /// The trigger installed, no daemon, the awake deadline held ahead: what the wake-up
    /// costs writers while a daemon is awake (no NOTIFY, no delivery).
    pub tps_trigger_awake: f64,
    /// The same with the deadline passed: every INSERT notifies (no daemon listens).
    pub tps_trigger_asleep: f64,
    /// The trigger installed and the daemon running and delivering, as shipped.
    pub tps: f64,
    /// The same with `awake_linger = "0s"`: every INSERT notifies (before schema 4).
    pub tps_notify_always: f64,
    /// Each cycle's ratio to the bare rounds of the same cycle, and their medians: the
    /// figures `main` reports (a drift of the machine's speed weighs on both sides).
    pub wakeup_ratios: Vec<f64>,
    pub wakeup_ratios_asleep: Vec<f64>,
    pub ratios: Vec<f64>,
    pub ratios_notify_always: Vec<f64>,
    pub wakeup_ratio: f64,
    pub wakeup_ratio_asleep: f64,
    pub ratio: f64,
    pub ratio_notify_always: f64,
    /// Rows still pending when the writers of a delivering round stopped (median): a
    /// daemon that falls behind would look cheap.
    pub pending_at_round_end: f64,
    /// Transactions the database committed per second beyond the producers' own: the
    /// daemon's claims, with the shipped settings and with NOTIFY always.
    pub daemon_txns_per_s: f64,
    pub daemon_txns_per_s_notify_always: f64,
    /// The daemon's claims and looks per second while nothing arrives (asleep), from its
    /// metrics.
    pub idle_daemon_claims_per_s: f64,
    /// NOTIFYs the daemon received, and rows it found awake without one, while the
    /// producers inserted (shipped settings, all rounds).
    pub notifications: f64,
    pub rows_found_awake: f64,
    /// Mean over the rounds: the bare rounds taken in turn with the shipped daemon's, the
    /// shipped daemon's, the NOTIFY-always daemon's.
    pub cpu_bare: CpuUse,
    pub cpu: CpuUse,
    pub cpu_notify_always: CpuUse,
}

/// The bare table: the outbox's columns, defaults, constraints and indexes, without its
/// trigger, and out of every daemon's sight (so a daemon can stay running, idle, while
/// writers insert into it).
const BARE: &str = "pgpushd.outbox_bare";

/// Where one round's writers insert, and with what around them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Round {
    /// The bare table.
    Bare,
    /// The outbox with its trigger, no daemon, the awake deadline held ahead: writers
    /// skip NOTIFY, as while a daemon is awake.
    TriggerAwake,
    /// The same with the deadline passed: every INSERT notifies.
    TriggerAsleep,
    /// The outbox, a daemon running and delivering.
    Delivered,
}

/// What one round measured.
struct RoundResult {
    tps: f64,
    cpu: CpuUse,
    /// Delivered rounds: rows pending when the writers stopped, and the database's
    /// commits per second beyond the writers' own.
    pending: f64,
    other_txns_per_s: f64,
}

/// 8 writers of single-row INSERTs in autocommit, in rounds of `round` each. The ratios
/// come from rounds taken in turn with bare-table rounds (A B, then B A, ...), so the
/// machine's drift over minutes weighs on both sides; each is the median of `cycles`
/// cycles' ratios.
/// - No daemon: the bare table, the trigger with the deadline held ahead, passed.
/// - The daemon running and delivering, as shipped, then with NOTIFY on every INSERT;
///   its bare rounds run beside the idle daemon. Then the daemon's idle cost.
///
/// With a `placement`, PostgreSQL and the writers run on its `database` CPUs and the
/// daemon and the emulator on its `daemon` CPUs, throughout (bare table included), and
/// everything goes back on every CPU afterwards.
pub async fn producer(
    env: &Env<'_>,
    round: Duration,
    cycles: usize,
    placement: Option<&procs::Placement>,
) -> anyhow::Result<Producer> {
    let all_cpus = format!("0-{}", procs::machine_cpus() - 1);
    let place = |cpus: &str| -> anyhow::Result<()> {
        procs::pin(std::process::id() as i32, cpus, false)?;
        if let Some(postmaster) = env.postmaster {
            procs::pin(postmaster, cpus, true)?;
        }
        Ok(())
    };
    if let Some(p) = placement {
        place(&p.database)?;
    }
    let result = producer_placed(env, round, cycles, placement.map(|p| p.daemon.as_str())).await;
    if placement.is_some() {
        place(&all_cpus)?;
    }
    result
}

async fn producer_placed(
    env: &Env<'_>,
    round: Duration,
    cycles: usize,
    daemon_cpus: Option<&str>,
) -> anyhow::Result<Producer> {
    db::empty(&env.client).await?;
    env.client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {BARE};
             CREATE TABLE {BARE} (LIKE pgpushd.outbox INCLUDING ALL)"
        ))
        .await?;
    let emulator = procs::start_emulator_on(env.work, Duration::ZERO, None, daemon_cpus)?;
    let watched = |daemon: Option<&procs::Proc>| Watched {
        daemon: daemon.map(|d| d.pid()),
        emulator: Some(emulator.proc.pid()),
        postmaster: env.postmaster,
    };

    // No daemon: what the trigger alone costs, awake and asleep.
    let no_daemon = cycled(
        env,
        &[Round::Bare, Round::TriggerAwake, Round::TriggerAsleep],
        cycles,
        round,
        &watched(None),
    )
    .await?;
    pgpushd::outbox::wakeup::stay_awake(&env.client, Duration::ZERO).await?;

    // The daemon: as shipped, then with NOTIFY on every INSERT (two cycles, one of each
    // order: it is the comparison, not the figure).
    let mut with_daemon = Vec::new();
    for (database, cycles) in [("", cycles), ("awake_linger = \"0s\"", 2)] {
        let metrics = procs::free_addr()?;
        let config =
            env.work
                .daemon_config_with(&env.url, &emulator.endpoint, database, Some(metrics))?;
        let daemon = procs::start_daemon_on(env.work, &config, daemon_cpus)?;
        db::wait_listening(&env.client, Duration::from_secs(30)).await?;
        let heard_before = procs::scrape(metrics, "pgpushd_notifications_total")?;
        let found_before = procs::scrape(metrics, "pgpushd_rows_found_awake_total")?;
        let rounds = cycled(
            env,
            &[Round::Bare, Round::Delivered],
            cycles,
            round,
            &watched(Some(&daemon)),
        )
        .await?;
        let heard = procs::scrape(metrics, "pgpushd_notifications_total")? - heard_before;
        let found = procs::scrape(metrics, "pgpushd_rows_found_awake_total")? - found_before;
        // Idle: well past the linger, nothing arriving.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Claims and looks alike: each is a round trip the database serves.
        let asked = || -> anyhow::Result<f64> {
            Ok(procs::scrape(metrics, "pgpushd_batches_total")?
                + procs::scrape(metrics, "pgpushd_looks_empty_total")?)
        };
        let idle_before = asked()?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle = (asked()? - idle_before) / 10.0;
        daemon.stop()?;
        db::empty(&env.client).await?;
        with_daemon.push((rounds, idle, heard, found));
    }
    emulator.proc.stop()?;
    env.client
        .batch_execute(&format!("DROP TABLE {BARE}"))
        .await?;

    let (shipped, idle_daemon_claims_per_s, notifications, rows_found_awake) =
        with_daemon.remove(0);
    let (always, ..) = with_daemon.remove(0);
    Ok(Producer {
        tps_bare: median(shipped.of(Round::Bare).map(|r| r.tps)),
        tps_bare_no_daemon: median(no_daemon.of(Round::Bare).map(|r| r.tps)),
        tps_trigger_awake: median(no_daemon.of(Round::TriggerAwake).map(|r| r.tps)),
        tps_trigger_asleep: median(no_daemon.of(Round::TriggerAsleep).map(|r| r.tps)),
        tps: median(shipped.of(Round::Delivered).map(|r| r.tps)),
        tps_notify_always: median(always.of(Round::Delivered).map(|r| r.tps)),
        wakeup_ratios: no_daemon.ratios(Round::TriggerAwake),
        wakeup_ratios_asleep: no_daemon.ratios(Round::TriggerAsleep),
        ratios: shipped.ratios(Round::Delivered),
        ratios_notify_always: always.ratios(Round::Delivered),
        wakeup_ratio: median(no_daemon.ratios(Round::TriggerAwake)),
        wakeup_ratio_asleep: median(no_daemon.ratios(Round::TriggerAsleep)),
        ratio: median(shipped.ratios(Round::Delivered)),
        ratio_notify_always: median(always.ratios(Round::Delivered)),
        pending_at_round_end: median(shipped.of(Round::Delivered).map(|r| r.pending)),
        daemon_txns_per_s: median(shipped.of(Round::Delivered).map(|r| r.other_txns_per_s)),
        daemon_txns_per_s_notify_always: median(
            always.of(Round::Delivered).map(|r| r.other_txns_per_s),
        ),
        idle_daemon_claims_per_s,
        notifications,
        rows_found_awake,
        cpu_bare: CpuUse::mean(shipped.of(Round::Bare).map(|r| &r.cpu)),
        cpu: CpuUse::mean(shipped.of(Round::Delivered).map(|r| &r.cpu)),
        cpu_notify_always: CpuUse::mean(always.of(Round::Delivered).map(|r| &r.cpu)),
    })
}

/// Rounds of each kind, per cycle, in the order the kinds were given.
struct Cycles {
    kinds: Vec<Round>,
    cycles: Vec<Vec<RoundResult>>,
}

impl Cycles {
    fn of(&self, kind: Round) -> impl Iterator<Item = &RoundResult> + '_ {
        let at = self
            .kinds
            .iter()
            .position(|k| *k == kind)
            .expect("a kind measured");
        self.cycles.iter().map(move |c| &c[at])
    }

    /// Each cycle's `kind` rounds over its bare round.
    fn ratios(&self, kind: Round) -> Vec<f64> {
        self.of(kind)
            .zip(self.of(Round::Bare))
            .map(|(r, bare)| r.tps / bare.tps)
            .collect()
    }
}

/// `cycles` cycles of one round of each kind, each cycle's order rotated by one from the
/// last (A B C, B C A, C A B, ...) so no kind always goes first.
async fn cycled(
    env: &Env<'_>,
    kinds: &[Round],
    cycles: usize,
    round: Duration,
    watched: &Watched,
) -> anyhow::Result<Cycles> {
    let mut results = Vec::new();
    for cycle in 0..cycles {
        let mut this: Vec<Option<RoundResult>> = kinds.iter().map(|_| None).collect();
        for i in 0..kinds.len() {
            let at = (i + cycle) % kinds.len();
            this[at] = Some(one_round(env, kinds[at], round, watched).await?);
        }
        results.push(
            this.into_iter()
                .map(|r| r.expect("every kind ran"))
                .collect(),
        );
    }
    Ok(Cycles {
        kinds: kinds.to_vec(),
        cycles: results,
    })
}

/// One round from empty tables and a quiet machine; a delivered round then waits until
/// the daemon has delivered its rows.
async fn one_round(
    env: &Env<'_>,
    kind: Round,
    duration: Duration,
    watched: &Watched,
) -> anyhow::Result<RoundResult> {
    db::empty(&env.client).await?;
    env.client
        .batch_execute(&format!("TRUNCATE {BARE}"))
        .await?;
    match kind {
        Round::TriggerAwake => {
            pgpushd::outbox::wakeup::stay_awake(&env.client, Duration::from_secs(3600)).await?
        }
        Round::TriggerAsleep => {
            pgpushd::outbox::wakeup::stay_awake(&env.client, Duration::ZERO).await?
        }
        Round::Bare | Round::Delivered => {}
    }
    let table = match kind {
        Round::Bare => BARE,
        _ => "pgpushd.outbox",
    };
    procs::wait_quiet(QUIET_WAIT).await;
    let commits_before = match kind {
        Round::Delivered => Some(commits(&env.client).await?),
        _ => None,
    };
    let before = watched.mark();
    let tps = writers(&env.url, table, 8, duration).await?;
    let cpu = watched.since(&before, false);
    let (mut pending, mut other_txns_per_s) = (0.0, 0.0);
    if let Some(commits_before) = &commits_before {
        pending = db::pending(&env.client).await? as f64;
        let rows = tps * duration.as_secs_f64();
        other_txns_per_s = daemon_txns(&env.client, commits_before, rows).await?;
        db::wait_drained(&env.client, Duration::from_secs(120)).await?;
    }
    Ok(RoundResult {
        tps,
        cpu,
        pending,
        other_txns_per_s,
    })
}

/// Transactions committed in this database so far (pg_stat_database), and when that was
/// read.
struct Commits {
    count: i64,
    at: Instant,
}

async fn commits(client: &Client) -> anyhow::Result<Commits> {
    // Statistics reach shared memory within a second of a transaction.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let count = client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0);
    Ok(Commits {
        count,
        at: Instant::now(),
    })
}

/// Commits per second since `before` that were not the producers' `rows`, over the whole
/// time between the two readings (the daemon keeps claiming after the producers stop).
async fn daemon_txns(client: &Client, before: &Commits, rows: f64) -> anyhow::Result<f64> {
    let after = commits(client).await?;
    let window = after.at.duration_since(before.at).as_secs_f64();
    Ok(((after.count - before.count) as f64 - rows).max(0.0) / window)
}

/// `n` clients inserting single rows into `table` as fast as they can for `duration`:
/// rows/s.
async fn writers(url: &str, table: &str, n: usize, duration: Duration) -> anyhow::Result<f64> {
    static SEQ: AtomicU64 = AtomicU64::new(10_000_000);
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(db::connect(url).await?);
    }
    let started = Instant::now();
    let stop = started + duration;
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in clients {
        let count = count.clone();
        let table = table.to_owned();
        tasks.push(tokio::spawn(async move {
            let insert = client
                .prepare(&format!(
                    "INSERT INTO {table} (device_token, payload)
                     VALUES ($1, '{{\"aps\":{{\"alert\":\"producer\"}}}}')"
                ))
                .await?;
            while Instant::now() < stop {
                let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                client.execute(&insert, &[&db::token(seq)]).await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
