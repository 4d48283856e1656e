//! Issue 9's soak: 30,000 rows through the real `pgpushd` binary and the emulator with
//! faults (transient errors, GOAWAYs), the daemon SIGKILLed twice and PostgreSQL restarted
//! once while they drain. Every row ends `sent`, every token reaches the emulator, and few
//! are delivered twice (a SIGKILL mid-batch resends that batch by design).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::*;

const ROWS: u64 = 30_000;
const STATEMENTS: u64 = 3;
const BATCH: u64 = 100;
const IN_FLIGHT: u64 = 4;

fn spawn_daemon(config: &Path, log: &Path) -> Spawned {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Spawned(
        pgpushd_command()
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("PGPUSHD_DATABASE_URL")
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// The daemons' log, for a failure's message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn sigkill(daemon: &mut Spawned) {
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
}

/// Waits until at least `n` rows are `sent`, checking the daemon is still up.
async fn wait_sent(
    client: &tokio_postgres::Client,
    daemon: &mut Spawned,
    n: i64,
    deadline: Duration,
    log: &Path,
) {
    wait_for(&format!("{n} rows sent"), deadline, || {
        let exited = daemon.try_wait().unwrap();
        async move {
            if let Some(status) = exited {
                panic!("the daemon exited ({status}); its log:\n{}", log_tail(log));
            }
            (count(client, "sent").await >= n).then_some(())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_rows_with_kills_and_a_restart_all_arrive() {
    let started = Instant::now();
    let mut db = TestDb::with_own_cluster().await;
    let apns = ApnsSetup::new(|c| {
        c.error_rate = 0.02;
        c.goaway_every = Some(200);
        c.keep_records = 200_000;
    })
    .await;
    let config: PathBuf = apns.dir.path().join("pgpushd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[database]
url = "{url}"
poll_interval = "200ms"
batch_size = {BATCH}
max_batches_in_flight = {IN_FLIGHT}
keepalive_interval = "1s"
connect_timeout = "2s"

[retry]
max_attempts = 20
backoff_base = "50ms"
backoff_max = "500ms"

[daemon]
shutdown_timeout = "5s"
{app}
"#,
            url = db.url,
            app = apns.app_toml
        ),
    )
    .unwrap();
    let log = apns.dir.path().join("daemon.log");

    let client = db.client().await;
    for i in 0..STATEMENTS {
        let per = ROWS / STATEMENTS;
        insert_rows(&client, 1 + i * per, per).await;
    }

    // Kill the first daemon mid-drain, then the second, with PostgreSQL restarted
    // under the third.
    let mut daemon = spawn_daemon(&config, &log);
    for (round, at) in [(1, 3_000), (2, 9_000)] {
        wait_sent(&client, &mut daemon, at, Duration::from_secs(60), &log).await;
        sigkill(&mut daemon);
        eprintln!(
            "soak: daemon {round} killed at {} rows sent ({:?})",
            count(&client, "sent").await,
            started.elapsed()
        );
        daemon = spawn_daemon(&config, &log);
    }
    wait_sent(&client, &mut daemon, 15_000, Duration::from_secs(60), &log).await;
    drop(client);
    tokio::task::block_in_place(|| db.cluster().stop());
    // The outage: the daemon's connections are gone and its reconnects fail meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| db.cluster().start_server()).unwrap();
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon exited while PostgreSQL was down; its log:\n{}",
        log_tail(&log)
    );
    let client = db.client().await;
    eprintln!(
        "soak: PostgreSQL restarted at {} rows sent ({:?})",
        count(&client, "sent").await,
        started.elapsed()
    );

    wait_sent(
        &client,
        &mut daemon,
        ROWS as i64,
        Duration::from_secs(120),
        &log,
    )
    .await;
    let counts = counts(&client).await;
    assert_eq!(
        counts,
        HashMap::from([("sent".to_owned(), ROWS as i64)]),
        "every row sent, none pending or failed"
    );
    sigkill(&mut daemon);

    let records = apns.emulator.records();
    let mut per_token: HashMap<String, u32> = HashMap::new();
    for r in records.iter().filter(|r| r.status == 200) {
        *per_token.entry(r.device_token.clone()).or_default() += 1;
    }
    let stats = apns.emulator.stats();
    let duplicates = per_token.values().filter(|&&n| n > 1).count() as u64;
    eprintln!(
        "soak: {ROWS} rows in {:?}: {duplicates} delivered more than once, {} requests, \
         by status {:?}, {} GOAWAYs, {} connections",
        started.elapsed(),
        stats.requests,
        stats.by_status,
        stats.goaways_sent,
        stats.connections_accepted,
    );
    assert!(
        records.len() < 200_000,
        "the emulator's records were cut short"
    );
    let missing: Vec<String> = (1..=ROWS)
        .map(token)
        .filter(|t| !per_token.contains_key(t))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "tokens never accepted by the emulator, e.g. {missing:?}"
    );
    assert_eq!(per_token.len(), ROWS as usize);
    assert!(stats.goaways_sent > 0, "no GOAWAY was sent: {stats:?}");
    assert!(
        stats.requests > stats.count(200),
        "no transient error was answered: {stats:?}"
    );
    // Each SIGKILL may resend the batches it left in flight.
    assert!(
        duplicates < ROWS / 20,
        "{duplicates} rows delivered more than once; two kills leave at most {} in flight",
        2 * BATCH * IN_FLIGHT
    );
}
