//! The awake/asleep hand-over against a real PostgreSQL, with `poll_interval = "1h"` so
//! that a lost wake-up shows as a row that never arrives: writers skip NOTIFY while a
//! daemon is awake and notify again once it sleeps; writers at every isolation level and
//! transactions that straddle the hand-over are delivered; a long transaction keeps the
//! daemon awake without stalling anything; a daemon killed while awake silences NOTIFY
//! only for a moment; two daemons share the work; the schema-4 trigger replaces the old one.
//! The hazard tests wake the daemon with any row (`awake_min_rate = 0`); the rate's own
//! tests (a trickle stays asleep, a burst wakes it) run with the shipped threshold.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pgpushd::config::Config;
use pgpushd::daemon::Daemon;
use pgpushd::outbox::wakeup;
use pgpushd::secret::Secret;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const LINGER: Duration = Duration::from_millis(300);
const QUICKLY: Duration = Duration::from_secs(10);

/// Any row wakes the daemon, and it sleeps after [`LINGER`] without one.
fn wakeup_config(url: &str) -> Config {
    let mut cfg = config(url, "");
    cfg.database.awake_linger = LINGER;
    cfg.database.awake_min_rate = 0;
    // Outcomes written at once: these tests read the awake state right after the rows
    // are recorded, and LINGER is about as short as the shipped outcome_hold.
    cfg.database.outcome_hold = Duration::ZERO;
    cfg
}

/// The shipped rule: awake only while rows come at `awake_min_rate` per second or more.
fn rate_config(url: &str) -> Config {
    let cfg = config(url, "");
    assert_eq!(cfg.database.awake_min_rate, 200, "the shipped threshold");
    cfg
}

fn woke(d: &Awake) -> u64 {
    d.daemon
        .metrics()
        .wakeup_transitions
        .get_or_create(&pgpushd::metrics::TransitionLabels { to: "awake".into() })
        .get()
}

/// A daemon in this process, with its metrics at hand.
struct Awake {
    daemon: Arc<Daemon>,
    transport: Arc<ScriptedTransport>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Awake {
    async fn start(cfg: Config) -> Awake {
        let transport = ScriptedTransport::new();
        let daemon = Arc::new(Daemon::new(cfg, transport.clone()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (daemon, cancel) = (daemon.clone(), cancel.clone());
            async move { daemon.run(cancel).await }
        });
        let mut listening = daemon.listening();
        tokio::time::timeout(QUICKLY, listening.wait_for(|l| *l))
            .await
            .expect("the daemon listens")
            .unwrap();
        Awake {
            daemon,
            transport,
            cancel,
            task,
        }
    }

    fn is_awake(&self) -> bool {
        self.daemon.metrics().awake.get() == 1
    }

    fn notifications(&self) -> u64 {
        self.daemon.metrics().notifications.get()
    }

    async fn wait_awake(&self, awake: bool) {
        let what = if awake {
            "the daemon awake"
        } else {
            "the daemon asleep"
        };
        wait_for(what, QUICKLY, || async {
            (self.is_awake() == awake).then_some(())
        })
        .await;
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Counts the NOTIFYs on the outbox's channel, seen by a connection of the test's own.
struct Notifications {
    seen: Arc<AtomicUsize>,
    _client: Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Notifications {
    async fn listen(url: &str) -> Notifications {
        let (client, mut connection) =
            pgpushd::db::connect_raw(&Secret::new(url.to_owned()), QUICKLY, "test-listen")
                .await
                .unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let driver = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(m)) = messages.next().await {
                    if let AsyncMessage::Notification(_) = m {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        client.batch_execute("LISTEN pgpushd_outbox").await.unwrap();
        Notifications {
            seen,
            _client: client,
            driver,
        }
    }

    fn count(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn insert_one(client: &Client, i: u64) {
    insert_rows(client, i, 1).await;
}

#[tokio::test]
async fn writers_skip_notify_while_a_daemon_is_awake_and_notify_again_once_it_sleeps() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let heard = Notifications::listen(&db.url).await;
    let d = Awake::start(wakeup_config(&db.url)).await;
    assert!(!d.is_awake());

    // Asleep: the first row notifies and wakes the daemon.
    insert_one(&c, 1).await;
    wait_for_status(&c, "sent", 1, QUICKLY).await;
    d.wait_awake(true).await;
    assert_eq!(heard.count(), 1);

    // Awake: 100 single-row INSERTs a few ms apart, found without a NOTIFY each.
    for i in 2..=101 {
        insert_one(&c, i).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_for_status(&c, "sent", 101, QUICKLY).await;
    // `pgpushd status` says so.
    let mut s = plain_client(&db.url).await;
    let report = pgpushd::outbox::status::StatusReport::read(&mut s)
        .await
        .unwrap();
    assert!(report.awake_for.is_some(), "status: {report}");
    assert!(
        heard.count() <= 3,
        "{} NOTIFYs for 100 INSERTs while awake",
        heard.count()
    );
    assert!(d.daemon.metrics().rows_found_awake.get() >= 95);

    // Asleep again after the linger: the next INSERT notifies, and is delivered although
    // the poll is an hour away.
    d.wait_awake(false).await;
    let report = pgpushd::outbox::status::StatusReport::read(&mut s)
        .await
        .unwrap();
    assert_eq!(report.awake_for, None);
    let before = heard.count();
    insert_one(&c, 102).await;
    wait_for_status(&c, "sent", 102, QUICKLY).await;
    assert_eq!(heard.count(), before + 1);
    assert!(d.notifications() >= 2);
    d.stop().await;
}

#[tokio::test]
async fn a_trickle_leaves_the_daemon_asleep_and_each_row_arrives_at_once() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let heard = Notifications::listen(&db.url).await;
    let d = Awake::start(rate_config(&db.url)).await;
    // 20 rows/s for two seconds: a tenth of the threshold. Each row is its own NOTIFY
    // and its own claim, found at once although the poll is an hour away.
    let mut slowest = Duration::ZERO;
    for i in 1..=40u64 {
        let started = std::time::Instant::now();
        insert_one(&c, i).await;
        wait_for_status(&c, "sent", i as i64, QUICKLY).await;
        slowest = slowest.max(started.elapsed());
        assert!(!d.is_awake(), "row {i}: awake at 20 rows/s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a row took {slowest:?}"
    );
    assert_eq!(woke(&d), 0, "woke at a trickle");
    assert_eq!(heard.count(), 40, "every INSERT notified");
    // Asleep, the daemon asks the database nothing between rows: no looks, and one
    // claim per NOTIFY (plus the catch-up at start).
    let progress = d.daemon.progress().borrow().clone();
    assert_eq!(progress.looks, 0, "{progress:?}");
    assert!(progress.claims <= 41 + 2, "{progress:?}");
    d.stop().await;
}

#[tokio::test]
async fn a_burst_wakes_the_daemon_and_its_writers_skip_notify() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let heard = Notifications::listen(&db.url).await;
    let d = Awake::start(rate_config(&db.url)).await;
    // 8 writers, 150 single-row commits each, as fast as they go: thousands a second.
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let writer = plain_client(&db.url).await;
        writers.push(tokio::spawn(async move {
            for i in 0..150u64 {
                insert_one(&writer, 1 + w * 1000 + i).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    wait_for_status(&c, "sent", 1200, QUICKLY).await;
    assert_eq!(woke(&d), 1, "the burst woke it once");
    assert!(
        heard.count() < 600,
        "{} NOTIFYs for 1200 INSERTs: the writers did not see it awake",
        heard.count()
    );
    assert!(d.daemon.metrics().rows_found_awake.get() >= 600);
    // The rate decays once the burst is over: asleep again, and the next row notifies.
    d.wait_awake(false).await;
    let before = heard.count();
    insert_one(&c, 9000).await;
    wait_for_status(&c, "sent", 1201, QUICKLY).await;
    assert_eq!(heard.count(), before + 1);
    d.stop().await;
}

#[tokio::test]
async fn writers_at_every_isolation_level_straddling_the_hand_over_are_delivered() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let d = Awake::start(wakeup_config(&db.url)).await;
    let mut next = 1;
    for level in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        // The writer's snapshot is taken while the daemon sleeps ...
        d.wait_awake(false).await;
        let mut writer = plain_client(&db.url).await;
        let txn = writer
            .build_transaction()
            .isolation_level(match level {
                "READ COMMITTED" => tokio_postgres::IsolationLevel::ReadCommitted,
                "REPEATABLE READ" => tokio_postgres::IsolationLevel::RepeatableRead,
                _ => tokio_postgres::IsolationLevel::Serializable,
            })
            .start()
            .await
            .unwrap();
        txn.query_one("SELECT count(*) FROM pgpushd.outbox", &[])
            .await
            .unwrap();
        // ... the daemon wakes (another writer's row) ...
        insert_one(&c, next).await;
        d.wait_awake(true).await;
        // ... the writer inserts while it is awake (no NOTIFY) and holds its transaction
        // well past the linger, across the daemon's attempts to sleep ...
        txn.execute(
            "INSERT INTO pgpushd.outbox (device_token, payload) VALUES ($1, '{}')",
            &[&token(next + 1)],
        )
        .await
        .unwrap();
        tokio::time::sleep(LINGER * 3).await;
        assert!(
            d.is_awake(),
            "{level}: slept while a writer that saw it awake was open"
        );
        // ... and commits: its row arrives without a NOTIFY or a poll.
        txn.commit().await.unwrap();
        wait_for_status(&c, "sent", next as i64 + 1, QUICKLY).await;
        next += 2;
    }
    assert!(d.daemon.metrics().wakeup_barrier_busy.get() >= 3);
    d.stop().await;
}

#[tokio::test]
async fn a_long_transaction_keeps_the_daemon_awake_without_stalling_other_writers() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let d = Awake::start(wakeup_config(&db.url)).await;
    insert_one(&c, 1).await;
    d.wait_awake(true).await;
    let mut long = plain_client(&db.url).await;
    let txn = long.transaction().await.unwrap();
    txn.execute(
        "INSERT INTO pgpushd.outbox (device_token, payload) VALUES ($1, '{}')",
        &[&token(1000)],
    )
    .await
    .unwrap();
    // Other writers commit one row at a time meanwhile: each arrives promptly.
    for i in 2..=6 {
        tokio::time::sleep(LINGER).await;
        let started = std::time::Instant::now();
        insert_one(&c, i).await;
        wait_for_status(&c, "sent", i as i64, QUICKLY).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "row {i} took {:?}",
            started.elapsed()
        );
    }
    txn.commit().await.unwrap();
    wait_for_status(&c, "sent", 7, QUICKLY).await;
    d.wait_awake(false).await;
    d.stop().await;
}

#[tokio::test]
async fn a_daemon_killed_while_awake_silences_notify_only_for_a_moment() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let url = db.url.clone();
    // The first daemon lives on a runtime of its own: shutting it down is a kill (no
    // graceful sleep, its connections just drop).
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut cfg = wakeup_config(&url);
            cfg.database.awake_linger = Duration::from_secs(3600);
            let d = Awake::start(cfg).await;
            let c = plain_client(&url).await;
            insert_one(&c, 1).await;
            d.wait_awake(true).await;
            wait_for_status(&c, "sent", 1, QUICKLY).await;
            wait_for("the deadline set", QUICKLY, || async {
                wakeup::awake_for(&c).await.unwrap().map(|_| ())
            })
            .await;
        });
        rt.shutdown_background();
    })
    .join()
    .unwrap();
    assert!(
        wakeup::awake_for(&c).await.unwrap().is_some(),
        "the killed daemon's deadline is still ahead at first"
    );
    // Within the hold the deadline passes by itself and writers notify again.
    wait_for("the deadline to pass", pgpushd::awake::HOLD * 3, || async {
        wakeup::awake_for(&c).await.unwrap().is_none().then_some(())
    })
    .await;
    let heard = Notifications::listen(&db.url).await;
    insert_one(&c, 2).await;
    wait_for("a NOTIFY", QUICKLY, || async {
        (heard.count() == 1).then_some(())
    })
    .await;
    // The next daemon's catch-up finds the row.
    let d = Awake::start(wakeup_config(&db.url)).await;
    wait_for_status(&c, "sent", 2, QUICKLY).await;
    d.stop().await;
}

#[tokio::test]
async fn two_daemons_hand_over_without_losing_or_doubling_a_row() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let a = Awake::start(wakeup_config(&db.url)).await;
    let b = Awake::start(wakeup_config(&db.url)).await;
    let mut next = 1;
    // Bursts separated by more than the linger: both fall asleep between them.
    for _ in 0..4 {
        for _ in 0..25 {
            insert_one(&c, next).await;
            next += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(LINGER * 3).await;
    }
    let total = next as i64 - 1;
    wait_for_status(&c, "sent", total, QUICKLY).await;
    assert_eq!(a.transport.count() + b.transport.count(), total as usize);
    let mut ids = a.transport.sent_ids();
    ids.extend(b.transport.sent_ids());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total as usize, "a row was sent twice");
    a.stop().await;
    // One left: stopping gracefully put `a` to sleep properly, `b` goes on alone.
    insert_one(&c, next).await;
    wait_for_status(&c, "sent", total + 1, QUICKLY).await;
    b.stop().await;
}

#[tokio::test]
async fn the_schema_4_trigger_replaces_the_old_one_and_notifies_while_no_daemon_is_awake() {
    let db = TestDb::unmigrated().await;
    let mut c = db.client().await;
    // A database at version 3, as an existing install has it.
    pgpushd::outbox::migrate::migrate_to(&mut c, 3)
        .await
        .unwrap();
    let heard = Notifications::listen(&db.url).await;
    insert_one(&c, 1).await;
    wait_for("the old trigger's NOTIFY", QUICKLY, || async {
        (heard.count() == 1).then_some(())
    })
    .await;

    assert_eq!(
        pgpushd::outbox::migrate::migrate(&mut c).await.unwrap(),
        (4..=pgpushd::outbox::migrate::latest_version()).collect::<Vec<_>>()
    );
    assert!(pgpushd::outbox::migrate::migrate(&mut c)
        .await
        .unwrap()
        .is_empty());
    // No daemon awake: the new trigger notifies.
    insert_one(&c, 2).await;
    wait_for("the new trigger's NOTIFY", QUICKLY, || async {
        (heard.count() == 2).then_some(())
    })
    .await;
    // A deadline ahead: it does not.
    wakeup::stay_awake(&c, Duration::from_secs(60))
        .await
        .unwrap();
    insert_one(&c, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(heard.count(), 2);
    // Asleep again, and a writer role without any privilege on the sequence but SELECT
    // (granted to PUBLIC) notifies as before.
    assert!(wakeup::fall_asleep(&c).await.unwrap());
    let writer = format!("pgpushd_test_writer_{}", std::process::id());
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {writer}; CREATE ROLE {writer};
         GRANT USAGE ON SCHEMA pgpushd TO {writer}; GRANT INSERT ON pgpushd.outbox TO {writer};
         SET ROLE {writer};"
    ))
    .await
    .unwrap();
    insert_one(&c, 4).await;
    wait_for("the writer's NOTIFY", QUICKLY, || async {
        (heard.count() == 3).then_some(())
    })
    .await;
}

/// The keeper's sessions (`pgpushd-wakeup`): pid, and whether it waits for a lock in
/// `stay_awake`'s statement (the one that pushes the deadline ahead).
async fn keeper_sessions(client: &Client) -> Vec<(i32, bool)> {
    client
        .query(
            "SELECT pid, wait_event_type IS NOT DISTINCT FROM 'Lock'
                         AND query LIKE '%clock_timestamp%'
               FROM pg_stat_activity WHERE application_name = 'pgpushd-wakeup'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Issue 20, item 9: a deadline the keeper pushed ahead and got no answer for never lands
/// after the daemon went to sleep (writers would skip NOTIFY with no daemon awake). The
/// keeper's `setval` waits for the sequence's lock (a session holds it), its backend is
/// stopped there, the keeper gives up on it, reconnects and, once the lock is free, falls
/// asleep (the deadline 0). Only then does the stopped backend run again: its statement
/// must not set the deadline ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_got_no_answer_never_lands_after_the_daemon_slept() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut cfg = wakeup_config(&db.url);
    // Awake long enough for its deadline statement to be caught waiting, and for the
    // keeper to give up on it (connect_timeout, 2s) before it wants to sleep.
    cfg.database.awake_linger = Duration::from_secs(5);
    let d = Awake::start(cfg).await;
    insert_one(&c, 1).await;
    d.wait_awake(true).await;

    // ALTER SEQUENCE holds a lock that setval waits for, until this transaction ends.
    let mut locker = plain_client(&db.url).await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("ALTER SEQUENCE pgpushd.awake_until NO CYCLE")
        .await
        .unwrap();
    let stuck = wait_for(
        "the keeper's deadline waiting for the lock",
        QUICKLY,
        || async { keeper_sessions(&c).await.iter().find(|s| s.1).map(|s| s.0) },
    )
    .await;
    let stopped = StoppedBackends::stop(vec![stuck]);
    // The keeper gives up on it and comes back on a connection of its own.
    wait_for("the keeper on a new connection", QUICKLY, || async {
        keeper_sessions(&c)
            .await
            .iter()
            .any(|s| s.0 != stuck)
            .then_some(())
    })
    .await;
    lock.rollback().await.unwrap();
    d.wait_awake(false).await;
    assert_eq!(wakeup::awake_for(&c).await.unwrap(), None);

    // The stopped backend runs again; once it is done, the deadline is still 0.
    drop(stopped);
    wait_for("the stopped backend to finish", QUICKLY, || async {
        (!keeper_sessions(&c).await.iter().any(|s| s.0 == stuck)).then_some(())
    })
    .await;
    let deadline: i64 = c
        .query_one("SELECT pg_sequence_last_value('pgpushd.awake_until')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        deadline, 0,
        "a stale deadline landed after the daemon slept"
    );
    d.stop().await;
}
