//! Retention against a real PostgreSQL: which rows a pass deletes (old settled rows of
//! the configured statuses) and which it keeps (younger ones, other statuses, pending
//! rows whatever their age); `settled_at` as the daemon writes it; the task inside the
//! daemon and across a database restart.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;
use pgpushd::config::RetentionConfig;
use pgpushd::daemon::Daemon;
use pgpushd::retention::{prune_once, Pruned};
use pgpushd::transport::Delivery;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// Inserts one row and returns its id. Ages are SQL intervals ("10 days") before now;
/// `settled` None leaves settled_at NULL (a row settled before schema version 2).
async fn row(
    client: &Client,
    status: &str,
    created: &str,
    settled: Option<&str>,
    sent: Option<&str>,
) -> i64 {
    client
        .query_one(
            "INSERT INTO pgpushd.outbox
                    (device_token, payload, status, created_at, send_after, settled_at, sent_at)
             VALUES ('abcd', '{}', $1, now() - $2::text::interval, now() - $2::text::interval,
                     now() - $3::text::interval, now() - $4::text::interval)
             RETURNING id",
            &[&status, &created, &settled, &sent],
        )
        .await
        .unwrap()
        .get(0)
}

/// A connection to `db` as retention's task has one, with its canceller.
async fn connect(db: &TestDb, role: &str) -> (Client, pgpushd::db::Canceller) {
    pgpushd::db::connect_cancellable(
        &pgpushd::secret::Secret::new(db.url.clone()),
        Duration::from_secs(10),
        role,
    )
    .await
    .unwrap()
}

async fn ids(client: &Client) -> BTreeSet<i64> {
    client
        .query("SELECT id FROM pgpushd.outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn retention(sent: Option<&str>, failed: Option<&str>, expired: Option<&str>) -> RetentionConfig {
    let age = |a: Option<&str>| a.map(|a| humantime::parse_duration(a).unwrap());
    RetentionConfig {
        sent: age(sent),
        failed: age(failed),
        expired: age(expired),
        channels: None,
        interval: Duration::from_millis(100),
        batch_size: 2,
    }
}

#[tokio::test]
async fn a_pass_deletes_old_settled_rows_of_configured_statuses_only() {
    let db = TestDb::new().await;
    let (c, canceller) = connect(&db, "test").await;
    let mut doomed = BTreeSet::new();
    let mut kept = BTreeSet::new();
    // sent = 7d: five old ones (three batches of two), two younger ones.
    for _ in 0..5 {
        doomed.insert(row(&c, "sent", "9 days", Some("8 days"), Some("8 days")).await);
    }
    for _ in 0..2 {
        kept.insert(row(&c, "sent", "6 days", Some("6 days"), Some("6 days")).await);
    }
    // failed = 2d: settled_at decides, not created_at: a row scheduled a month ahead that
    // failed an hour ago is a fresh failure.
    for _ in 0..3 {
        doomed.insert(row(&c, "failed", "3 days", Some("3 days"), None).await);
    }
    kept.insert(row(&c, "failed", "30 days", Some("1 hour"), None).await);
    // expired: no age configured, kept forever however old.
    kept.insert(row(&c, "expired", "400 days", Some("399 days"), None).await);
    // Pending rows are never touched, even with a (bogus) old settled_at.
    kept.insert(row(&c, "pending", "60 days", None, None).await);
    kept.insert(row(&c, "pending", "60 days", Some("50 days"), None).await);
    // Settled before settled_at existed: stamped from sent_at / send_after, then judged.
    doomed.insert(row(&c, "sent", "10 days", None, Some("10 days")).await);
    kept.insert(row(&c, "failed", "1 hour", None, None).await);

    let config = retention(Some("7d"), Some("2d"), None);
    let pruned = prune_once(&c, &canceller, &config, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        pruned,
        Pruned {
            sent: 6,
            failed: 3,
            expired: 0,
            stamped: 2,
            channels: 0,
        }
    );
    assert_eq!(ids(&c).await, kept);
    assert!(doomed.is_disjoint(&kept));
    let unstamped: i64 = c
        .query_one(
            "SELECT count(*) FROM pgpushd.outbox WHERE status <> 'pending' AND settled_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unstamped, 0);

    // Nothing is due any more; expired rows go once an age is set for them.
    let again = prune_once(&c, &canceller, &config, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(again, Pruned::default());
    let config = retention(None, None, Some("1y"));
    let pruned = prune_once(&c, &canceller, &config, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(pruned.expired, 1);
    assert_eq!(ids(&c).await.len(), kept.len() - 1);
}

/// `[retention] channels`: closed channels go by `closed_at`, failed ones never created
/// by `created_at`; active, pending and closing ones stay whatever their age, and so does
/// a failed one with a channel id (APNs may still have it).
#[tokio::test]
async fn a_pass_deletes_channels_ended_long_ago_only() {
    let db = TestDb::new().await;
    let (c, canceller) = connect(&db, "test").await;
    let channel = |status: &'static str,
                   id: Option<&'static str>,
                   created: &'static str,
                   closed: Option<&'static str>| {
        let c = &c;
        async move {
            c.query_one(
                "INSERT INTO pgpushd.channels (status, channel_id, created_at, closed_at)
                 VALUES ($1, $2, now() - $3::text::interval, now() - $4::text::interval)
                 RETURNING id",
                &[&status, &id, &created, &closed],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    let doomed = BTreeSet::from([
        channel("closed", Some("ch1"), "90 days", Some("40 days")).await,
        channel("closed", Some("ch2"), "90 days", Some("31 days")).await,
        channel("failed", None, "35 days", None).await,
    ]);
    let kept = BTreeSet::from([
        channel("closed", Some("ch3"), "90 days", Some("29 days")).await,
        channel("failed", None, "2 days", None).await,
        channel("failed", Some("ch4"), "90 days", None).await,
        channel("active", Some("ch5"), "400 days", None).await,
        channel("pending", None, "400 days", None).await,
        channel("closing", Some("ch6"), "400 days", None).await,
    ]);
    let config = RetentionConfig {
        channels: Some(Duration::from_secs(30 * 86_400)),
        ..retention(None, None, None)
    };
    assert!(config.is_enabled());
    let pruned = prune_once(&c, &canceller, &config, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        pruned,
        Pruned {
            channels: 3,
            ..Pruned::default()
        }
    );
    let left: BTreeSet<i64> = c
        .query("SELECT id FROM pgpushd.channels", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, kept);
    assert!(doomed.is_disjoint(&left));
}

#[tokio::test]
async fn the_daemon_stamps_settled_at_and_runs_retention() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let transport = ScriptedTransport::new();
    transport.script(
        &token(2),
        Script::Answer(Delivery::rejected("BadDeviceToken")),
    );
    transport.script(
        &token(3),
        Script::Answer(Delivery::retry("ServiceUnavailable")),
    );
    let mut cfg = config(
        &db.url,
        "[retention]\nsent = \"1h\"\ninterval = \"100ms\"\n",
    );
    cfg.retry.backoff_base = Duration::from_secs(3600);
    cfg.retry.backoff_max = Duration::from_secs(3600);
    let old = row(&c, "sent", "2 hours", Some("2 hours"), Some("2 hours")).await;

    let daemon = Daemon::new(cfg, transport.clone());
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    insert_rows(&c, 1, 3).await;
    wait_for(
        "rows settled and the old one deleted",
        Duration::from_secs(10),
        || async {
            let counts = counts(&c).await;
            let gone = !ids(&c).await.contains(&old);
            (gone && counts.get("sent") == Some(&1) && counts.get("failed") == Some(&1))
                .then_some(())
        },
    )
    .await;

    let rows = c
        .query(
            "SELECT status, settled_at IS NOT NULL,
                    settled_at BETWEEN created_at AND clock_timestamp(),
                    sent_at IS NULL OR settled_at - sent_at < interval '1 second'
               FROM pgpushd.outbox ORDER BY device_token",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, bool, Option<bool>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        seen,
        [
            ("sent".into(), true, Some(true), true),
            ("failed".into(), true, Some(true), true),
            ("pending".into(), false, None, true),
        ]
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn retention_survives_a_postgresql_restart() {
    let mut db = TestDb::with_own_cluster().await;
    let mut database = config(&db.url, "").database;
    database.connect_timeout = Duration::from_secs(1);
    let cancel = CancellationToken::new();
    let (_settings, watched) = tokio::sync::watch::channel(retention(Some("1h"), None, None));
    let task = tokio::spawn(pgpushd::retention::run(database, watched, cancel.clone()));
    {
        let c = db.client().await;
        row(&c, "sent", "2 hours", Some("2 hours"), Some("2 hours")).await;
        wait_for(
            "the first old row deleted",
            Duration::from_secs(10),
            || async { ids(&c).await.is_empty().then_some(()) },
        )
        .await;
    }

    db.cluster().stop();
    // Several passes' worth of time: they fail and back off.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !task.is_finished(),
        "retention gave up without its database"
    );
    db.cluster().start_server().unwrap();

    let c = db.client().await;
    let young = row(
        &c,
        "sent",
        "10 minutes",
        Some("10 minutes"),
        Some("10 minutes"),
    )
    .await;
    row(&c, "sent", "2 hours", Some("2 hours"), Some("2 hours")).await;
    wait_for(
        "the second old row deleted",
        Duration::from_secs(30),
        || async { (ids(&c).await == BTreeSet::from([young])).then_some(()) },
    )
    .await;
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_reload_turns_retention_on_without_a_restart() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let cfg = config(&db.url, "");
    let old = row(&c, "sent", "2 hours", Some("2 hours"), Some("2 hours")).await;
    let daemon = std::sync::Arc::new(Daemon::new(cfg.clone(), ScriptedTransport::new()));
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let (daemon, cancel) = (daemon.clone(), cancel.clone());
        async move { daemon.run(cancel).await }
    });
    // Off: the old row stays while the daemon runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ids(&c).await.contains(&old), "retention ran while off");

    let reloaded = config(
        &db.url,
        "[retention]\nsent = \"1h\"\ninterval = \"100ms\"\n",
    );
    daemon.reload(&reloaded).unwrap();
    wait_for(
        "the old row deleted after the reload",
        Duration::from_secs(10),
        || async { (!ids(&c).await.contains(&old)).then_some(()) },
    )
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Issue 20, item 9: a retention statement that gets no answer in time does not go on on
/// the server. The outbox is held exclusively, so the pass's first statement waits for
/// it; its backend is stopped there and the pass gives up; once the backend runs again
/// its statement ends, although the lock is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_gets_no_answer_is_cancelled_on_the_server() {
    let db = TestDb::new().await;
    let observer = db.client().await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE pgpushd.outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (c, canceller) = connect(&db, "retention-test").await;
    let config = retention(Some("7d"), None, None);
    let pass = tokio::spawn(async move {
        let result = prune_once(&c, &canceller, &config, Duration::from_secs(2)).await;
        drop(c); // as the task does after an error
        result
    });
    let backend = || async {
        observer
            .query_opt(
                "SELECT pid, wait_event_type IS NOT DISTINCT FROM 'Lock'
                   FROM pg_stat_activity WHERE application_name = 'pgpushd-retention-test'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, bool>(1)))
    };
    let pid = wait_for(
        "the pass waiting for the lock",
        Duration::from_secs(20),
        || async { backend().await.filter(|b| b.1).map(|b| b.0) },
    )
    .await;
    let stopped = StoppedBackends::stop(vec![pid]);
    let e = pass.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("no answer within 2s"), "{e}");
    drop(stopped);
    wait_for(
        "the statement to end on the server",
        Duration::from_secs(10),
        || async { backend().await.is_none().then_some(()) },
    )
    .await;
    lock.rollback().await.unwrap();
}
