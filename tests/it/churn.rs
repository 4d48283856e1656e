//! Rows through the real APNs transport to an independent HTTP/2 server that churns as a
//! busy Apple front end does (`tests/fixtures/churn_apns.py`, Python's `h2`): a graceful
//! GOAWAY every 100 requests on a connection, 5% of answers 500/503/429, at most 50
//! streams. Every row must settle within three times the fault-free time, measured in the
//! same test against the same server with its faults off.

use std::time::{Duration, Instant};

use crate::python_server::{python_h2, server_certificate, PythonServer};
use crate::support::*;

const ROWS: u64 = 2000;

/// Runs `ROWS` rows through a daemon against a server started with `args`; how long
/// until every row settled, and the rows sent.
async fn settle_all(args: &[&str], deadline: Duration) -> (Duration, i64) {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = server_certificate(dir.path(), "churn test CA");
    let server = PythonServer::start("churn_apns.py", dir.path(), "server", args);
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(
        &key_file,
        pgpushd_emulator::jwt::generate_signing_key().unwrap(),
    )
    .unwrap();
    let app_toml = token_app_toml(
        &format!("https://localhost:{}", server.port),
        &ca_file,
        &key_file,
    );
    let db = TestDb::new().await;
    let cfg = config(&db.url, &app_toml);
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let client = db.client().await;
    let started = Instant::now();
    insert_rows(&client, 1, ROWS).await;
    wait_for("every row settled", deadline, || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;
    let took = started.elapsed();
    daemon.stop().await;
    let sent = count(&client, "sent").await;
    for row in client
        .query(
            "SELECT left(last_error, 160), attempts, count(*) FROM pgpushd.outbox
              WHERE status <> 'sent' GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5",
            &[],
        )
        .await
        .unwrap()
    {
        eprintln!(
            "not sent: {} x{} ({} attempts)",
            row.get::<_, Option<String>>(0).unwrap_or_default(),
            row.get::<_, i64>(2),
            row.get::<_, i32>(1)
        );
    }
    drop(server);
    (took, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_churning_server_settles_every_row_within_three_times_the_fault_free_time() {
    if !python_h2() {
        return;
    }
    let (calm, sent) = settle_all(&["--max-streams", "50"], Duration::from_secs(60)).await;
    assert_eq!(sent, ROWS as i64);
    let (churn, sent) = settle_all(
        &[
            "--max-streams",
            "50",
            "--goaway-every",
            "100",
            "--fault-rate",
            "0.05",
        ],
        (calm * 3).max(Duration::from_secs(2)) + Duration::from_secs(30),
    )
    .await;
    let ratio = churn.as_secs_f64() / calm.as_secs_f64();
    eprintln!("churn: fault-free {calm:?}, churning {churn:?}, ratio {ratio:.2}, {sent} sent");
    // With max_attempts 3, a row fails only after three faults in a row (1 in 8,000).
    assert!(sent >= ROWS as i64 - 5, "{sent} of {ROWS} sent");
    assert!(
        churn <= (calm * 3).max(Duration::from_secs(1)),
        "fault-free {calm:?}, churning {churn:?}: {ratio:.2} times"
    );
}

/// Streams reset by the server and connections cut in the middle of a frame: every row
/// still settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_cut_connections_settle_every_row() {
    if !python_h2() {
        return;
    }
    let (_, sent) = settle_all(
        &[
            "--max-streams",
            "50",
            "--reset-rate",
            "0.03",
            "--cut-every",
            "300",
        ],
        Duration::from_secs(90),
    )
    .await;
    assert!(sent >= ROWS as i64 - 20, "{sent} of {ROWS} sent");
}
