//! `cargo bench --bench pipeline`: how fast pgpushd is, measured the same way every time
//! and compared with the limit of the link it drives (issue 6).
//!
//! A throwaway PostgreSQL with fsync on, the emulator and the daemon each in its own
//! process (the release binary cargo built for this bench). Every scenario runs `--runs`
//! times (3; `--quick`: 1, with short runs); the table shows the median, min and max, and
//! `target/bench/pipeline.json` gets the medians (plus every run's figures, the CPU each
//! process used and the machine).
//!
//! Flags (after `--`): `--quick`, `--rows N` (drain backlog, default 200,000),
//! `--runs N`,
//! `--only drain,drain20,latency,producer,db_cost,dead_app,backlog,fcm_drain,webpush_drain`,
//! `--no-fsync`,
//! `--awake-poll-interval D` (every daemon of the run looks that often while awake),
//! `--outcome-hold D` (every daemon holds its outcomes for the next claim that long).

mod db;
mod db_cost;
mod dead_app;
mod fcm;
mod procs;
mod raw;
mod report;
mod scenarios;
mod webpush;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use pgpushd::devdb::DevDb;

use procs::CpuUse;
use report::{Floor, Samples};
use scenarios::Env;

/// What to run, from the command line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub quick: bool,
    pub rows: u64,
    pub backlog_rows: u64,
    pub runs: usize,
    pub latency_rate: u64,
    pub latency_secs: u64,
    /// The producer scenario's rounds: how long each, and how many cycles of them.
    pub producer_secs: u64,
    pub producer_cycles: usize,
    /// The db_cost scenario's cycles (each a bare and a delivered round, in turns).
    pub db_cost_cycles: usize,
    pub only: Option<Vec<String>>,
    /// `--no-fsync`: PostgreSQL with fsync off, to compare with figures taken that way.
    pub fsync: bool,
    /// `--awake-poll-interval D`: every daemon of the run looks that often while awake
    /// (the shipped default otherwise), to measure the dial's other settings.
    pub awake_poll_interval: Option<String>,
    /// `--outcome-hold D`: every daemon of the run holds its outcomes for the next claim
    /// that long (`0s`: commits at once), against the shipped default.
    pub outcome_hold: Option<String>,
}

impl Plan {
    fn from_args() -> anyhow::Result<Plan> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let value = |flag: &str| -> anyhow::Result<Option<String>> {
            match args.iter().position(|a| a == flag) {
                Some(i) => Ok(Some(
                    args.get(i + 1)
                        .with_context(|| format!("{flag} needs a value"))?
                        .clone(),
                )),
                None => Ok(None),
            }
        };
        // A duration flag, kept as written (it goes into the daemons' config) once it
        // parses as the config would.
        let duration = |flag: &str, example: &str| -> anyhow::Result<Option<String>> {
            value(flag)?
                .map(|v| {
                    humantime::parse_duration(&v)
                        .map(|_| v.clone())
                        .with_context(|| format!("{flag} D (as in the config: {example})"))
                })
                .transpose()
        };
        let quick = args.iter().any(|a| a == "--quick");
        let rows = match value("--rows")? {
            Some(v) => v.replace('_', "").parse().context("--rows N")?,
            None if quick => 20_000,
            None => 200_000,
        };
        let runs = match value("--runs")? {
            Some(v) => v.parse().context("--runs N")?,
            None if quick => 1,
            None => 3,
        };
        Ok(Plan {
            quick,
            rows,
            backlog_rows: if quick { rows * 5 } else { 1_000_000 },
            runs,
            latency_rate: 1000,
            latency_secs: if quick { 5 } else { 20 },
            producer_secs: if quick { 2 } else { 4 },
            // Even, so that each order (bare first, delivered first) runs as often.
            producer_cycles: if quick { 2 } else { 6 },
            db_cost_cycles: 2,
            only: value("--only")?.map(|v| v.split(',').map(str::to_owned).collect()),
            fsync: !args.iter().any(|a| a == "--no-fsync"),
            awake_poll_interval: duration("--awake-poll-interval", "5ms")?,
            outcome_hold: duration("--outcome-hold", "0s, 250ms")?,
        })
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    }
}

fn main() -> anyhow::Result<()> {
    let plan = Plan::from_args()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Interrupted (Ctrl-C, SIGTERM): the bench's future is dropped, and with it the
        // daemon, the emulator and the throwaway PostgreSQL (their `Drop`s stop them and
        // remove the cluster's directory), instead of leaving them running.
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = bench(plan) => result,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: stopped what the bench started"),
            _ = terminate.recv() => anyhow::bail!("terminated: stopped what the bench started"),
        }
    })
}

async fn bench(plan: Plan) -> anyhow::Result<()> {
    eprintln!(
        "pipeline bench: {} run(s), {} rows per drain, {} rows of backlog; binary {}",
        plan.runs,
        plan.rows,
        plan.backlog_rows,
        procs::BIN
    );
    let cluster = tokio::task::block_in_place(|| DevDb::start_for_bench(plan.fsync))
        .context("starting a throwaway PostgreSQL")?;
    let postmaster = procs::postmaster_pid(cluster.port());
    let mut work = procs::Workdir::new()?;
    if let Some(every) = &plan.awake_poll_interval {
        work.database_keys = format!("awake_poll_interval = \"{every}\"\n");
    }
    if let Some(hold) = &plan.outcome_hold {
        work.database_keys += &format!("outcome_hold = \"{hold}\"\n");
    }
    let mut samples = Samples::default();
    let mut detail: Vec<serde_json::Value> = Vec::new();

    for run in 1..=plan.runs {
        let name = format!("bench_{run}");
        let url = db::fresh_database(&cluster, &name).await?;
        let env = Env {
            postmaster,
            work: &work,
            client: db::connect(&url).await?,
            url,
        };
        let mut this = BTreeMap::new();
        if plan.wants("drain") {
            let (drain, raw) =
                scenarios::drain_and_raw(&env, plan.rows, Duration::ZERO, true).await?;
            let raw = raw.expect("asked for");
            progress(run, "drain", drain.rows_per_s, "rows/s");
            progress(run, "raw link", raw.rows_per_s, "rows/s");
            samples.add("drain_rows_per_s", drain.rows_per_s);
            samples.add("raw_link_rows_per_s", raw.rows_per_s);
            samples.add("drain_vs_raw", drain.rows_per_s / raw.rows_per_s);
            samples.add("peak_rss_mb", drain.peak_rss_mb);
            // The emulator's share of the machine's CPU (all cores), while the daemon
            // drains and while the raw link runs: far from all of it, so the emulator is
            // not what limits either.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            samples.add("emulator_cpu_share", drain.cpu.emulator / cores);
            samples.add("emulator_cpu_share_raw", raw.cpu.emulator / cores);
            // Other users of the machine during the drain: the run-to-run noise.
            samples.add("others_cpu_cores_drain", drain.cpu.others);
            this.insert("drain", serde_json::to_value(&drain)?);
            this.insert("raw", serde_json::to_value(&raw)?);
        }
        if plan.wants("fcm_drain") {
            let drain = fcm::drain(&env, plan.rows).await?;
            progress(run, "FCM drain", drain.rows_per_s, "rows/s");
            samples.add("fcm_drain_rows_per_s", drain.rows_per_s);
            this.insert("fcm_drain", serde_json::to_value(&drain)?);
        }
        if plan.wants("webpush_drain") {
            let drain = webpush::drain(&env, plan.rows).await?;
            progress(run, "Web Push drain", drain.rows_per_s, "rows/s");
            samples.add("webpush_drain_rows_per_s", drain.rows_per_s);
            // Against the drains of the same run (the machine's speed moves between runs):
            // what encrypting each message costs beside the APNs and FCM requests.
            for (other, key) in [
                ("drain", "webpush_drain_vs_drain"),
                ("fcm_drain", "webpush_drain_vs_fcm_drain"),
            ] {
                if let Some(rate) = this.get(other).and_then(|d| d["rows_per_s"].as_f64()) {
                    samples.add(key, drain.rows_per_s / rate);
                }
            }
            // Where the CPU goes: microseconds per row of the daemon (encrypting, VAPID,
            // HTTP/2, its database work), the emulator (decrypting, checking) and PostgreSQL.
            let us_per_row = |cores: f64| cores * drain.elapsed_s / plan.rows as f64 * 1e6;
            samples.add(
                "webpush_drain_daemon_us_per_row",
                us_per_row(drain.cpu.daemon),
            );
            samples.add(
                "webpush_drain_emulator_us_per_row",
                us_per_row(drain.cpu.emulator),
            );
            samples.add(
                "webpush_drain_postgres_us_per_row",
                us_per_row(drain.cpu.postgres),
            );
            samples.add("webpush_drain_machine_cores", drain.cpu.machine);
            samples.add("others_cpu_cores_webpush_drain", drain.cpu.others);
            this.insert("webpush_drain", serde_json::to_value(&drain)?);
        }
        if plan.wants("drain20") {
            let (drain, raw) =
                scenarios::drain_and_raw(&env, plan.rows, Duration::from_millis(20), true).await?;
            let raw = raw.expect("asked for");
            progress(run, "drain 20 ms", drain.rows_per_s, "rows/s");
            progress(run, "raw link 20 ms", raw.rows_per_s, "rows/s");
            samples.add("drain_20ms_rows_per_s", drain.rows_per_s);
            samples.add("raw_link_20ms_rows_per_s", raw.rows_per_s);
            samples.add("drain_20ms_vs_raw", drain.rows_per_s / raw.rows_per_s);
            this.insert("drain_20ms", serde_json::to_value(&drain)?);
            this.insert("raw_20ms", serde_json::to_value(&raw)?);
        }
        if plan.wants("latency") {
            let l = scenarios::latency(
                &env,
                plan.latency_rate,
                Duration::from_secs(plan.latency_secs),
            )
            .await?;
            progress(run, "latency p50", l.p50_ms, "ms");
            progress(run, "latency p99", l.p99_ms, "ms");
            samples.add("latency_p50_ms", l.p50_ms);
            samples.add("latency_p99_ms", l.p99_ms);
            samples.add("latency_max_ms", l.max_ms);
            samples.add("latency_offered_rows_per_s", l.offered_per_s);
            samples.add("latency_daemon_db_us_per_row", l.daemon_db_us_per_row);
            samples.add("latency_daemon_claims_per_s", l.daemon_claims_per_s);
            this.insert("latency", serde_json::to_value(&l)?);
        }
        if plan.wants("producer") {
            let round = Duration::from_secs(plan.producer_secs);
            let p = scenarios::producer(&env, round, plan.producer_cycles, None).await?;
            progress(run, "producer, bare table", p.tps_bare, "tps");
            progress(run, "producer, pgpushd", p.tps, "tps");
            progress(run, "producer ratio", p.ratio, "");
            progress(run, "producer, NOTIFY always", p.tps_notify_always, "tps");
            samples.add("producer_tps_bare", p.tps_bare);
            samples.add("producer_tps_bare_no_daemon", p.tps_bare_no_daemon);
            // The wake-up's own cost, with nothing delivered meanwhile.
            samples.add("producer_wakeup_ratio", p.wakeup_ratio);
            samples.add("producer_wakeup_ratio_asleep", p.wakeup_ratio_asleep);
            samples.add("producer_tps", p.tps);
            samples.add("producer_ratio", p.ratio);
            samples.add("producer_pending_at_round_end", p.pending_at_round_end);
            samples.add("producer_tps_notify_always", p.tps_notify_always);
            samples.add("producer_ratio_notify_always", p.ratio_notify_always);
            samples.add(
                "producer_daemon_txns_per_s_notify_always",
                p.daemon_txns_per_s_notify_always,
            );
            samples.add("idle_daemon_claims_per_s", p.idle_daemon_claims_per_s);
            samples.add("producer_notifications", p.notifications);
            samples.add("producer_rows_found_awake", p.rows_found_awake);
            // The daemon's own transactions meanwhile (claims, next-due look-ups).
            samples.add("producer_daemon_txns_per_s", p.daemon_txns_per_s);
            // CPU per row of the whole set-up (the machine's cores go to these).
            cpu_per_row(&mut samples, "producer_cpu_us", &p, |c| {
                c.postgres + c.bench + c.daemon + c.emulator
            });
            this.insert("producer", serde_json::to_value(&p)?);
            // The same with the daemon and the emulator on a CPU of their own, as on
            // hosts of their own: what the producers pay for the daemon's database work.
            if let Some(placement) = procs::Placement::apart() {
                let p = scenarios::producer(&env, round, plan.producer_cycles, Some(&placement))
                    .await?;
                progress(run, "producer apart, bare", p.tps_bare, "tps");
                progress(run, "producer apart, pgpushd", p.tps, "tps");
                progress(run, "producer apart ratio", p.ratio, "");
                samples.add("producer_apart_tps_bare", p.tps_bare);
                samples.add("producer_apart_tps", p.tps);
                samples.add("producer_apart_ratio", p.ratio);
                samples.add("producer_apart_wakeup_ratio", p.wakeup_ratio);
                // The same on the database's CPU only (PostgreSQL and the writers).
                cpu_per_row(&mut samples, "producer_apart_db_us", &p, |c| {
                    c.postgres + c.bench
                });
                samples.add("producer_apart_ratio_notify_always", p.ratio_notify_always);
                this.insert(
                    "producer_apart",
                    serde_json::json!({"placement": placement, "figures": p}),
                );
            }
        }
        if plan.wants("db_cost") {
            // At 10 rows/s a round must be long enough for the CPU's clock ticks to count.
            for (rate, secs, name) in [
                (10u64, 40u64, "db_cost_10"),
                (100, 20, "db_cost_100"),
                (1000, 10, "db_cost_1000"),
            ] {
                let secs = if plan.quick { secs / 2 } else { secs };
                let c =
                    db_cost::db_cost(&env, rate, Duration::from_secs(secs), plan.db_cost_cycles)
                        .await?;
                let key = |what: &str| format!("db_cost_{what}_at_{rate}");
                progress(run, &key("ratio"), c.ratio, "");
                samples.add(&key("ratio"), c.ratio);
                samples.add(&key("bare_db_us_per_row"), c.bare_db_us_per_row);
                samples.add(&key("extra_db_us_per_row"), c.extra_db_us_per_row);
                samples.add(&key("p50_ms"), c.p50_ms);
                samples.add(&key("p99_ms"), c.p99_ms);
                samples.add(&key("statements_per_row"), c.statements_per_row);
                samples.add(&key("round_trips_per_row"), c.round_trips_per_row);
                samples.add(&key("claims_per_row"), c.claims_per_row);
                samples.add(&key("looks_per_row"), c.looks_per_row);
                samples.add(&key("notifications_per_row"), c.notifications_per_row);
                for (who, us) in &c.extra_us_per_row_by_process {
                    eprintln!("      {who:<28} {us:>7.0} us extra per row");
                }
                this.insert(name, serde_json::to_value(&c)?);
            }
        }
        if plan.wants("dead_app") {
            let secs = if plan.quick { 10 } else { 30 };
            let d = dead_app::dead_app(&env, 200, Duration::from_secs(secs), 200_000).await?;
            progress(run, "p99 alone", d.p99_ms_alone, "ms");
            progress(run, "p99 as a dead app arrives", d.p99_ms_arrival, "ms");
            progress(run, "p99 beside a dead app", d.p99_ms_beside_dead, "ms");
            progress(run, "dead app p99 ratio", d.p99_ratio, "");
            progress(run, "dead backlog parked after", d.parked_after_s, "s");
            progress(
                run,
                "dead writes/row/pause",
                d.dead_writes_per_row_per_pause,
                "",
            );
            samples.add("dead_app_p99_ms_alone", d.p99_ms_alone);
            samples.add("dead_app_p50_ms_arrival", d.p50_ms_arrival);
            samples.add("dead_app_p99_ms_arrival", d.p99_ms_arrival);
            samples.add("dead_app_p50_ms_beside", d.p50_ms_beside_dead);
            samples.add("dead_app_p99_ms_beside", d.p99_ms_beside_dead);
            samples.add("dead_app_p99_ratio", d.p99_ratio);
            samples.add("dead_app_parked_after_s", d.parked_after_s);
            samples.add("dead_app_vacuumed_after_s", d.vacuumed_after_s);
            samples.add("dead_app_pauses", d.pauses);
            samples.add(
                "dead_app_writes_per_row_per_pause",
                d.dead_writes_per_row_per_pause,
            );
            this.insert("dead_app", serde_json::to_value(&d)?);
        }
        if plan.wants("backlog") {
            let (drain, _) =
                scenarios::drain_and_raw(&env, plan.backlog_rows, Duration::ZERO, false).await?;
            progress(run, "backlog peak RSS", drain.peak_rss_mb, "MB");
            samples.add("backlog_1m_peak_rss_mb", drain.peak_rss_mb);
            samples.add("backlog_1m_rows_per_s", drain.rows_per_s);
            this.insert("backlog", serde_json::to_value(&drain)?);
        }
        drop(env);
        db::drop_database(&cluster, &name).await?;
        detail.push(serde_json::to_value(this)?);
    }

    let floors = floors();
    let table = report::table(&samples, &floors, &plan);
    println!("{table}");
    let path = report::write_json(&samples, &floors, &plan, detail)?;
    eprintln!("medians written to {}", path.display());
    Ok(())
}

/// `{prefix}_per_bare_insert` and `{prefix}_per_delivered_insert`: the microseconds of
/// CPU that `part` of the set-up used per row, in the bare and in the delivering rounds.
/// Writers that fill that CPU keep about the first over the second of their rate.
fn cpu_per_row(
    samples: &mut Samples,
    prefix: &str,
    p: &scenarios::Producer,
    part: fn(&CpuUse) -> f64,
) {
    samples.add(
        &format!("{prefix}_per_bare_insert"),
        part(&p.cpu_bare) / p.tps_bare * 1e6,
    );
    samples.add(
        &format!("{prefix}_per_delivered_insert"),
        part(&p.cpu) / p.tps * 1e6,
    );
}

fn progress(run: usize, what: &str, value: f64, unit: &str) {
    let decimals = if value.abs() < 10.0 { 2 } else { 1 };
    eprintln!("  run {run}: {what:<22} {value:>12.decimals$} {unit}");
}

/// The floors, by key.
fn floors() -> BTreeMap<&'static str, Floor> {
    BTreeMap::from([
        ("drain_rows_per_s", Floor::AtLeast(25_000.0)),
        ("drain_20ms_rows_per_s", Floor::AtLeast(20_000.0)),
        ("latency_p50_ms", Floor::AtMost(3.0)),
        ("latency_p99_ms", Floor::AtMost(15.0)),
        ("producer_ratio", Floor::AtLeast(0.7)),
        ("db_cost_ratio_at_10", Floor::AtMost(1.0)),
        ("db_cost_ratio_at_100", Floor::AtMost(1.5)),
        ("db_cost_ratio_at_1000", Floor::AtMost(0.75)),
        ("db_cost_p50_ms_at_10", Floor::AtMost(3.0)),
        ("db_cost_p50_ms_at_100", Floor::AtMost(3.0)),
        ("db_cost_p50_ms_at_1000", Floor::AtMost(3.0)),
        ("db_cost_p99_ms_at_10", Floor::AtMost(15.0)),
        ("db_cost_p99_ms_at_100", Floor::AtMost(15.0)),
        ("db_cost_p99_ms_at_1000", Floor::AtMost(15.0)),
        ("producer_wakeup_ratio", Floor::AtLeast(0.9)),
        ("dead_app_p99_ratio", Floor::AtMost(2.0)),
        ("dead_app_writes_per_row_per_pause", Floor::AtMost(1.0)),
        ("peak_rss_mb", Floor::AtMost(64.0)),
        ("backlog_1m_peak_rss_mb", Floor::AtMost(64.0)),
    ])
}
