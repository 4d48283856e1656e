//! The outbox pipeline end to end against a real PostgreSQL, with a scripted transport:
//! wake-ups, claiming, outcomes, and surviving failures of the database connection.

use std::time::{Duration, SystemTime};

use crate::support::*;
use pgpushd::daemon::Daemon;
use pgpushd::transport::Delivery;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_notification_wakes_the_daemon_at_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    let daemon = start(config(&db.url, ""), transport.clone());
    wait_for_listener(&client).await;
    // The first row may be found by the catch-up claim after LISTEN; the second can only
    // be found through its notification (the poll interval is an hour).
    insert_rows(&client, 1, 1).await;
    wait_for_status(&client, "sent", 1, Duration::from_secs(5)).await;
    insert_rows(&client, 2, 1).await;
    wait_for_status(&client, "sent", 2, Duration::from_secs(1)).await;
    let row = client
        .query_one(
            "SELECT apns_id IS NOT NULL, sent_at IS NOT NULL, attempts, last_error
               FROM pgpushd.outbox WHERE id = 2",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i32>(2), 1);
    assert_eq!(row.get::<_, Option<String>>(3), None);
    daemon.stop().await;
}

#[tokio::test]
async fn rows_arrive_by_polling_without_the_trigger() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("DROP TRIGGER outbox_notify ON pgpushd.outbox")
        .await
        .unwrap();
    let transport = ScriptedTransport::new();
    let mut cfg = config(&db.url, "");
    cfg.database.poll_interval = Duration::from_millis(200);
    let daemon = start(cfg, transport.clone());
    wait_for_listener(&client).await;
    insert_rows(&client, 1, 5).await;
    wait_for_status(&client, "sent", 5, Duration::from_secs(5)).await;
    daemon.stop().await;
}

#[tokio::test]
async fn rows_inserted_while_the_listener_was_killed_are_delivered() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    let daemon = start(config(&db.url, ""), transport.clone());
    wait_for_listener(&client).await;

    // Kill the listener's backend and insert at once, before it can reconnect; with a
    // one-hour poll interval only the catch-up after reconnecting can find these rows.
    let killed: bool = client
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'pgpushd-listener'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    insert_rows(&client, 1, 20).await;
    wait_for_status(&client, "sent", 20, Duration::from_secs(10)).await;
    // And it listens again afterwards.
    wait_for_listener(&client).await;
    insert_rows(&client, 21, 1).await;
    wait_for_status(&client, "sent", 21, Duration::from_secs(2)).await;
    daemon.stop().await;
}

#[tokio::test]
async fn the_daemon_survives_a_postgresql_restart() {
    let mut db = TestDb::with_own_cluster().await;
    let transport = ScriptedTransport::new();
    let daemon = start(config(&db.url, ""), transport.clone());
    {
        let client = db.client().await;
        wait_for_listener(&client).await;
        insert_rows(&client, 1, 50).await;
        wait_for_status(&client, "sent", 50, Duration::from_secs(5)).await;
    }

    db.cluster().stop();
    // Long enough for the listener's keepalive and a batch to notice and back off.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        daemon.is_running(),
        "the daemon exited without its database"
    );
    db.cluster().start_server().unwrap();

    let client = db.client().await;
    insert_rows(&client, 51, 50).await;
    wait_for_status(&client, "sent", 100, Duration::from_secs(40)).await;
    assert!(daemon.is_running());
    daemon.stop().await;
}

#[tokio::test]
async fn two_daemons_share_the_work_and_send_each_row_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    insert_rows(&client, 1, 10_000).await;
    let transport = ScriptedTransport::new();
    let a = start(config(&db.url, ""), transport.clone());
    let b = start(config(&db.url, ""), transport.clone());
    wait_for_status(&client, "sent", 10_000, Duration::from_secs(60)).await;
    a.stop().await;
    b.stop().await;

    let mut ids = transport.sent_ids();
    assert_eq!(ids.len(), 10_000, "some rows were sent twice");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10_000);
}

#[tokio::test]
async fn rows_of_a_dead_daemon_are_delivered_by_the_next() {
    let db = TestDb::new().await;
    let client = db.client().await;
    insert_rows(&client, 1, 1_000).await;

    // The first daemon lives on a runtime of its own; shutting that runtime down mid-batch
    // drops its connections as a killed process would (the real binary is SIGKILLed in
    // `commands`).
    let stuck = ScriptedTransport::new();
    *stuck.delay.lock().unwrap() = Duration::from_secs(3600);
    let cfg = config(&db.url, "");
    let first = std::thread::spawn({
        let stuck = stuck.clone();
        move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let d = Daemon::new(cfg, stuck.clone());
                // Until it is mid-batch (a busy machine may take a while to get there).
                let mid_batch = async {
                    while stuck.count() == 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                tokio::select! {
                    _ = d.run(CancellationToken::new()) => {}
                    _ = tokio::time::timeout(Duration::from_secs(30), mid_batch) => {}
                }
            });
            rt.shutdown_background();
        }
    });
    first.join().unwrap();
    assert!(stuck.count() > 0, "the first daemon never got mid-batch");
    assert_eq!(count(&client, "sent").await, 0);

    let transport = ScriptedTransport::new();
    let second = start(config(&db.url, ""), transport.clone());
    wait_for_status(&client, "sent", 1_000, Duration::from_secs(30)).await;
    second.stop().await;
    let row = client
        .query_one(
            "SELECT max(attempts), min(attempts) FROM pgpushd.outbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 1));
}

#[tokio::test]
async fn transient_failures_back_off_then_give_up_at_max_attempts() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    transport.script(
        &token(2),
        Script::Answer(Delivery::retry("503 ServiceUnavailable")),
    );
    let daemon = start(config(&db.url, ""), transport.clone());
    insert_rows(&client, 1, 3).await;

    wait_for_status(&client, "failed", 1, Duration::from_secs(10)).await;
    wait_for_status(&client, "sent", 2, Duration::from_secs(5)).await;
    let row = client
        .query_one(
            "SELECT attempts, last_error FROM pgpushd.outbox WHERE status = 'failed'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    assert_eq!(
        row.get::<_, String>(1),
        "gave up after 3 attempts: 503 ServiceUnavailable"
    );
    let tries = transport.sent_ids().iter().filter(|&&id| id == 2).count();
    assert_eq!(tries, 3);
    daemon.stop().await;
}

#[tokio::test]
async fn a_deferred_app_keeps_its_rows_pending_without_burning_attempts() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    transport.script(
        &token(1),
        Script::Answer(Delivery::Deferred {
            reason: "403 InvalidProviderToken".into(),
            after: Duration::from_millis(100),
        }),
    );
    let daemon = start(config(&db.url, ""), transport.clone());
    insert_rows(&client, 1, 1).await;
    wait_for(
        "several deferred tries",
        Duration::from_secs(10),
        || async { (transport.count() >= 3).then_some(()) },
    )
    .await;
    let row = client
        .query_one(
            "SELECT status, attempts, last_error FROM pgpushd.outbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, String>(2), "403 InvalidProviderToken");

    // The credentials are fixed: the row goes out.
    transport.scripts.lock().unwrap().clear();
    wait_for_status(&client, "sent", 1, Duration::from_secs(5)).await;
    daemon.stop().await;
}

#[tokio::test]
async fn scheduled_rows_wait_and_expired_rows_are_not_sent() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    let daemon = start(config(&db.url, ""), transport.clone());
    wait_for_listener(&client).await;
    client
        .batch_execute(&format!(
            "INSERT INTO pgpushd.outbox (device_token, payload, send_after)
                 VALUES ('{}', '{{}}', now() + interval '1500 milliseconds');
             INSERT INTO pgpushd.outbox (device_token, payload, expires_at)
                 VALUES ('{}', '{{}}', now() - interval '1 second');",
            token(1),
            token(2)
        ))
        .await
        .unwrap();
    wait_for_status(&client, "expired", 1, Duration::from_secs(2)).await;
    assert_eq!(
        count(&client, "sent").await,
        0,
        "a scheduled row went out early"
    );
    // The scheduled row goes out when due, by the daemon's own timer (no notification,
    // a one-hour poll).
    wait_for_status(&client, "sent", 1, Duration::from_secs(5)).await;
    let early: bool = client
        .query_one(
            "SELECT sent_at < send_after FROM pgpushd.outbox WHERE status = 'sent'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!early);
    assert_eq!(transport.count(), 1);

    // A scheduled row alone: its NOTIFY wakes a claim that claims nothing, and that
    // claim still says when the row falls due (its one row of NULLs carries it); nothing
    // else can wake the daemon in time.
    client
        .batch_execute(&format!(
            "INSERT INTO pgpushd.outbox (device_token, payload, send_after)
                 VALUES ('{}', '{{}}', now() + interval '1500 milliseconds')",
            token(3)
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(transport.count(), 1, "a scheduled row went out early");
    wait_for_status(&client, "sent", 2, Duration::from_secs(5)).await;
    assert_eq!(transport.count(), 2);
    daemon.stop().await;
}

#[tokio::test]
async fn unregistered_tokens_are_recorded_and_later_rows_for_them_fail_unsent() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    transport.script(
        &token(1),
        Script::Answer(Delivery::Unregistered {
            reason: "410 Unregistered".into(),
            at,
        }),
    );
    let daemon = start(config(&db.url, ""), transport.clone());
    insert_rows(&client, 1, 1).await;
    wait_for_status(&client, "failed", 1, Duration::from_secs(5)).await;
    let recorded: SystemTime = client
        .query_one(
            "SELECT unregistered_at FROM pgpushd.unregistered_tokens WHERE app = 'default' AND device_token = $1",
            &[&token(1)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, at);

    // Upper-case hex is the same token.
    client
        .execute(
            "INSERT INTO pgpushd.outbox (device_token, payload) VALUES (upper($1), '{}')",
            &[&token(1)],
        )
        .await
        .unwrap();
    wait_for_status(&client, "failed", 2, Duration::from_secs(5)).await;
    assert_eq!(
        transport.count(),
        1,
        "a row for an unregistered token was sent"
    );
    let reason: String = client
        .query_one("SELECT last_error FROM pgpushd.outbox WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reason.starts_with("Unregistered"), "{reason}");
    daemon.stop().await;
}

#[tokio::test]
async fn check_constraints_refuse_bad_rows_inside_the_producers_transaction() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let cases = [
        (
            "device_token",
            "'abc'",
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        (
            "device_token",
            "'zz'",
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        // FCM's characters, but no ':'; and a ':' with a character FCM never uses.
        (
            "device_token",
            "'APA91b-x_y'",
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        (
            "device_token",
            "'dXf1:APA91b/x'",
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        (
            "device_token",
            "'dXf1:' || repeat('b', 1020)",
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        // A Web Push subscription's shape, but an http endpoint; no keys; too long.
        (
            "device_token",
            r#"'{"endpoint":"http://push.example/x","keys":{"p256dh":"B","auth":"A"}}'"#,
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        (
            "device_token",
            r#"'{"endpoint":"https://push.example/x"}'"#,
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        (
            "device_token",
            r#"'{"endpoint":"https://push.example/' || repeat('x', 2000) || '","keys":{"p256dh":"B","auth":"A"}}'"#,
            "outbox_device_token_is_apns_fcm_or_webpush",
        ),
        ("push_type", "'shout'", "outbox_push_type_must_be_known"),
        ("priority", "7", "outbox_priority_must_be_1_5_or_10"),
        (
            "collapse_id",
            "repeat('x', 65)",
            "outbox_collapse_id_must_be_at_most_64_bytes",
        ),
        ("payload", "'[1,2]'", "outbox_payload_must_be_a_json_object"),
    ];
    for (column, value, constraint) in cases {
        let mut columns = vec![
            ("device_token", "'aabb'".to_string()),
            ("payload", "'{}'".into()),
        ];
        columns.retain(|(c, _)| *c != column);
        columns.push((column, value.into()));
        let sql = format!(
            "INSERT INTO pgpushd.outbox ({}) VALUES ({})",
            columns.iter().map(|c| c.0).collect::<Vec<_>>().join(", "),
            columns
                .iter()
                .map(|c| c.1.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let err = client.batch_execute(&sql).await.unwrap_err();
        let db_err = err.as_db_error().expect("a database error");
        assert_eq!(db_err.constraint(), Some(constraint), "{sql}");
    }
    // Both kinds of token are taken: APNs hex in either case, FCM registration tokens.
    client
        .batch_execute(
            "INSERT INTO pgpushd.outbox (device_token, payload) VALUES
                ('AABBcc', '{}'),
                ('fMEP0vJqS0:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx_y', '{}')",
        )
        .await
        .unwrap();
    // The error is PostgreSQL's own for a CHECK, with a DETAIL saying what is wrong.
    let err = client
        .batch_execute(
            "INSERT INTO pgpushd.outbox (device_token, payload, push_type)
             VALUES ('aabb', '{}', 'shout')",
        )
        .await
        .unwrap_err();
    let db_err = err.as_db_error().expect("a database error");
    assert_eq!(
        db_err.code(),
        &tokio_postgres::error::SqlState::CHECK_VIOLATION
    );
    assert_eq!(
        db_err.message(),
        r#"new row for relation "outbox" violates check constraint "outbox_push_type_must_be_known""#
    );
    assert!(
        db_err
            .detail()
            .unwrap_or("")
            .contains("push_type 'shout' is none of"),
        "{db_err:?}"
    );
    assert_eq!(
        (db_err.schema(), db_err.table()),
        (Some("pgpushd"), Some("outbox"))
    );
    // The application's columns are checked while a row is pending: a settled row's
    // outcome is written without them, and a row set pending again is held to them.
    let id: i64 = client
        .query_one(
            "INSERT INTO pgpushd.outbox (device_token, payload, status)
             VALUES ('abc', '[1]', 'failed') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let err = client
        .execute(
            "UPDATE pgpushd.outbox SET status = 'pending' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().and_then(|e| e.constraint()),
        Some("outbox_device_token_is_apns_fcm_or_webpush")
    );
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_and_concurrent_runs_are_serialised() {
    let db = TestDb::unmigrated().await;
    let (mut a, mut b) = (db.client().await, db.client().await);
    assert_eq!(
        pgpushd::outbox::migrate::schema_version(&a).await.unwrap(),
        0
    );
    let (ra, rb) = tokio::join!(
        pgpushd::outbox::migrate::migrate(&mut a),
        pgpushd::outbox::migrate::migrate(&mut b)
    );
    let mut applied = [ra.unwrap(), rb.unwrap()];
    applied.sort();
    let every: Vec<i32> = (1..=pgpushd::outbox::migrate::latest_version()).collect();
    assert_eq!(applied, [vec![], every]);
    assert_eq!(
        pgpushd::outbox::migrate::migrate(&mut a).await.unwrap(),
        Vec::<i32>::new()
    );
    pgpushd::outbox::migrate::ensure_current(&a).await.unwrap();
}

/// Waits until the daemon's listener is connected and has run LISTEN.
async fn wait_for_listener(client: &tokio_postgres::Client) {
    wait_for("the listener", Duration::from_secs(10), || async {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'pgpushd-listener'
                    AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await
}

#[tokio::test]
async fn rows_the_daemon_cannot_read_or_time_fail_alone() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // What PostgreSQL accepts but the daemon cannot hold: a number beyond f64, and (with
    // the constraint that now refuses it dropped, as on an older schema) a row that is
    // never due.
    client
        .batch_execute(
            "ALTER TABLE pgpushd.outbox DROP CONSTRAINT outbox_send_after_must_be_finite;
             INSERT INTO pgpushd.outbox (device_token, payload) VALUES ('aa', '{\"n\": 1e400}');
             INSERT INTO pgpushd.outbox (device_token, payload, send_after) VALUES ('bb', '{}', 'infinity');",
        )
        .await
        .unwrap();
    let transport = ScriptedTransport::new();
    let daemon = start(config(&db.url, ""), transport.clone());
    insert_rows(&client, 1, 5).await;
    wait_for_status(&client, "sent", 5, Duration::from_secs(10)).await;
    wait_for_status(&client, "failed", 1, Duration::from_secs(5)).await;
    let reason: String = client
        .query_one(
            "SELECT last_error FROM pgpushd.outbox WHERE device_token = 'aa'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.starts_with("BadPayload"), "{reason}");
    // The daemon is still at work: a later row goes out too.
    insert_rows(&client, 6, 1).await;
    wait_for_status(&client, "sent", 6, Duration::from_secs(5)).await;
    daemon.stop().await;

    let refused = client
        .batch_execute(
            "ALTER TABLE pgpushd.outbox ADD CONSTRAINT outbox_send_after_must_be_finite
                 CHECK (isfinite(send_after)) NOT VALID;
             INSERT INTO pgpushd.outbox (device_token, payload, send_after) VALUES ('cc', '{}', 'infinity')",
        )
        .await
        .unwrap_err();
    assert_eq!(
        refused.as_db_error().and_then(|e| e.constraint()),
        Some("outbox_send_after_must_be_finite")
    );
}

#[tokio::test]
async fn a_row_whose_outcome_cannot_be_recorded_is_not_resent_forever() {
    use pgpushd::dispatcher::MAX_OUTCOME_WRITE_FAILURES;
    let db = TestDb::new().await;
    let client = db.client().await;
    // The database refuses every UPDATE of row 3.
    client
        .batch_execute(
            "CREATE FUNCTION pg_temp_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'row % refused by the test', OLD.id; END $$;
             CREATE TRIGGER refuse_3 BEFORE UPDATE ON pgpushd.outbox
                FOR EACH ROW WHEN (OLD.id = 3) EXECUTE FUNCTION pg_temp_refuse();",
        )
        .await
        .unwrap();
    let transport = ScriptedTransport::new();
    let mut cfg = config(&db.url, "");
    cfg.database.poll_interval = Duration::from_millis(100);
    let daemon = Daemon::new(cfg, transport.clone());
    let metrics = daemon.metrics().clone();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    insert_rows(&client, 1, 5).await;
    // The other rows are recorded despite row 3.
    wait_for_status(&client, "sent", 4, Duration::from_secs(10)).await;
    // The batch's outcomes are written at once first: that write fails for all five
    // rows, then row 3's alone (the others' are recorded from memory, row by row).
    let failures = u64::from(MAX_OUTCOME_WRITE_FAILURES);
    let first_write_others = 4;
    wait_for(
        "the failed writes counted",
        Duration::from_secs(20),
        || async {
            (metrics.outcome_write_failures.get() >= first_write_others + failures).then_some(())
        },
    )
    .await;
    // Held now: polled every 100ms, it is neither sent nor written again. (A claim that
    // began just before the hold was set may still try once more.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counted = metrics.outcome_write_failures.get();
    assert!(
        counted <= first_write_others + failures + 1,
        "{counted} failed writes"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metrics.outcome_write_failures.get(),
        counted,
        "written again while held"
    );
    let sends_of_3 = transport.sent_ids().iter().filter(|&&id| id == 3).count() as u64;
    assert!(
        (1..=failures + 1).contains(&sends_of_3),
        "row 3 sent {sends_of_3} times"
    );
    assert_eq!(transport.count() as u64, 4 + sends_of_3);
    assert_eq!(count(&client, "pending").await, 1);
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_batch_held_past_max_batch_duration_is_abandoned_and_its_rows_released() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    *transport.delay.lock().unwrap() = Duration::from_secs(30);
    let mut cfg = config(&db.url, "");
    cfg.database.max_batch_duration = Duration::from_secs(1);
    // Never awake, so nothing claims the released rows again for a second.
    cfg.database.awake_linger = Duration::ZERO;
    let daemon = Daemon::new(cfg, transport.clone());
    let metrics = daemon.metrics().clone();
    let progress = daemon.progress();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    wait_for_listener(&client).await;
    insert_rows(&client, 1, 3).await;
    wait_for("the rows sent", Duration::from_secs(5), || async {
        (transport.count() >= 3).then_some(())
    })
    .await;
    // The sends hang for 30s; the batch gives its rows back after about 1s.
    wait_for("the rows released", Duration::from_secs(5), || async {
        let free = client
            .query(
                "SELECT id FROM pgpushd.outbox WHERE status = 'pending' AND attempts = 0
                   FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await
            .unwrap();
        (free.len() == 3).then_some(())
    })
    .await;
    wait_for(
        "the batch counted abandoned",
        Duration::from_secs(5),
        || async {
            (metrics.batches_abandoned.get() >= 1 && progress.borrow().released >= 3).then_some(())
        },
    )
    .await;
    // Once the transport answers again, the rows are delivered.
    *transport.delay.lock().unwrap() = Duration::ZERO;
    wait_for_status(&client, "sent", 3, Duration::from_secs(10)).await;
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_abandoned_batch_counts_an_attempt_for_each_request_that_went_out() {
    // Issue 20, item 8: a batch given up on hands its rows back, and an endpoint slow
    // enough to outlast every batch resent them for ever with no attempt counted. A row
    // whose request went out has had its attempt; one still waiting for a stream has not.
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    *transport.delay.lock().unwrap() = Duration::from_secs(3600);
    transport
        .goes_out
        .lock()
        .unwrap()
        .extend([token(1), token(2)]);
    let mut cfg = config(&db.url, "");
    cfg.database.max_batch_duration = Duration::from_millis(500);
    cfg.database.awake_linger = Duration::ZERO;
    let daemon = Daemon::new(cfg, transport.clone());
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    wait_for_listener(&client).await;
    insert_rows(&client, 1, 3).await;
    // The batch gives up after 0.5 s; the rows' next claim records the attempts (max 3).
    let failed = wait_for("rows 1 and 2 to fail", Duration::from_secs(30), || async {
        let rows = client
            .query(
                "SELECT device_token, last_error FROM pgpushd.outbox WHERE status = 'failed'",
                &[],
            )
            .await
            .unwrap();
        (rows.len() == 2).then_some(rows)
    })
    .await;
    for r in &failed {
        let error: String = r.get(1);
        assert!(
            error.starts_with("gave up after 3 attempts: no answer before the batch gave up"),
            "{error}"
        );
        assert!(r.get::<_, String>(0) != token(3));
    }
    let row3 = client
        .query_one(
            "SELECT status, attempts FROM pgpushd.outbox WHERE device_token = $1",
            &[&token(3)],
        )
        .await
        .unwrap();
    assert_eq!(
        (row3.get::<_, String>(0).as_str(), row3.get::<_, i32>(1)),
        ("pending", 0),
        "its request never went out"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_that_gets_no_answer_is_cancelled_on_the_server() {
    // Issue 20, item 9: the look runs outside any transaction, so no statement_timeout
    // of the batch's bounds it; given up on by the client, it must not run on.
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    let mut cfg = config(&db.url, "");
    cfg.database.poll_interval = Duration::from_millis(200);
    let daemon = Daemon::new(cfg, transport.clone());
    let mut progress = daemon.progress();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    wait_for_listener(&client).await;
    // A claim done: a batch connection has its statements prepared (preparing one would
    // wait for the lock below instead of a look).
    tokio::time::timeout(
        Duration::from_secs(20),
        progress.wait_for(|p| p.claims >= 1),
    )
    .await
    .expect("the catch-up claim")
    .unwrap();
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE pgpushd.outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // The first of them: each poll (every 200 ms) looks on a batch connection of its
    // own while the others wait.
    let look = || async {
        client
            .query(
                "SELECT pid FROM pg_stat_activity
                  WHERE application_name = 'pgpushd-batch' AND wait_event_type = 'Lock'
                    AND query LIKE '%LIMIT 1' ORDER BY query_start LIMIT 1",
                &[],
            )
            .await
            .unwrap()
            .first()
            .map(|r| r.get::<_, i32>(0))
    };
    let pid = wait_for("a look waiting for the lock", Duration::from_secs(20), look).await;
    let stopped = StoppedBackends::stop(vec![pid]);
    // The client gives up after connect_timeout (2 s) and asks the server to cancel.
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(stopped);
    wait_for(
        "the look to end on the server",
        Duration::from_secs(10),
        || async {
            let alive = client
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap();
            alive.is_none().then_some(())
        },
    )
    .await;
    lock.rollback().await.unwrap();
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_claim_stuck_behind_a_lock_gives_up_after_lock_timeout() {
    let db = TestDb::new().await;
    let client = db.client().await;
    insert_rows(&client, 1, 3).await;
    // Another session holds the outbox exclusively (a migration, a careless ALTER).
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE pgpushd.outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let transport = ScriptedTransport::new();
    // connect_timeout is 2s in the test config: the batch's lock_timeout.
    let mut cfg = config(&db.url, "");
    cfg.database.poll_interval = Duration::from_millis(200);
    let daemon = Daemon::new(cfg, transport.clone());
    let metrics = daemon.metrics().clone();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    wait_for(
        "the claim to give up on the lock",
        Duration::from_secs(10),
        || async { (metrics.batch_failures.get() >= 1).then_some(()) },
    )
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    wait_for_status(&client, "sent", 3, Duration::from_secs(40)).await;
    // Again, with the batches' connections ready: now the claim itself waits.
    let before = metrics.batch_failures.get();
    locker
        .batch_execute("BEGIN; LOCK TABLE pgpushd.outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    wait_for(
        "the claim to give up on the lock again",
        Duration::from_secs(10),
        || async { (metrics.batch_failures.get() > before).then_some(()) },
    )
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    insert_rows(&client, 4, 1).await;
    wait_for_status(&client, "sent", 4, Duration::from_secs(40)).await;
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Unregistered tokens keep rows from being sent: APNs hex whatever its case, FCM
/// registration tokens exactly as written (they are case-sensitive).
#[tokio::test]
async fn unregistered_hex_tokens_match_in_any_case_and_fcm_tokens_exactly() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO pgpushd.unregistered_tokens (app, device_token) VALUES
                ('default', 'aabbcc'), ('default', 'dXf1:AbC-_x');
             INSERT INTO pgpushd.outbox (device_token, payload) VALUES
                ('AABBCC', '{}'), ('dXf1:AbC-_x', '{}'), ('dXf1:abc-_x', '{}')",
        )
        .await
        .unwrap();
    let transport = ScriptedTransport::new();
    let daemon = start(config(&db.url, ""), transport.clone());
    wait_for("every row settled", Duration::from_secs(10), || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;
    let statuses: Vec<(String, String)> = client
        .query(
            "SELECT device_token, status FROM pgpushd.outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [
        ("AABBCC", "failed"),
        ("dXf1:AbC-_x", "failed"),
        ("dXf1:abc-_x", "sent"),
    ];
    assert_eq!(
        statuses,
        expected.map(|(t, s)| (t.to_owned(), s.to_owned()))
    );
    assert_eq!(transport.count(), 1);
    daemon.stop().await;

    // Recorded as they will be compared.
    pgpushd::outbox::record_unregistered(
        &client,
        &[
            pgpushd::transport::Unregistered {
                app: "default".into(),
                device_token: "DDEEFF".into(),
                at: std::time::SystemTime::now(),
            },
            pgpushd::transport::Unregistered {
                app: "default".into(),
                device_token: "dXf1:XyZ".into(),
                at: std::time::SystemTime::now(),
            },
        ],
    )
    .await
    .unwrap();
    let stored: Vec<String> = client
        .query(
            "SELECT device_token FROM pgpushd.unregistered_tokens
              WHERE device_token IN ('ddeeff', 'dXf1:XyZ') ORDER BY device_token COLLATE \"C\"",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ["dXf1:XyZ", "ddeeff"]);
}

/// The plan PostgreSQL keeps for `sql` (prepared as `name`, run as `execute`) in a
/// transaction set up as the daemon's batches are, on an empty outbox: what a daemon
/// started on a fresh install keeps using as the table grows. Fails unless it is the
/// generic plan, made once for any parameters.
async fn batch_plan(
    client: &tokio_postgres::Client,
    name: &str,
    sql: &str,
    execute: &str,
) -> String {
    client.batch_execute("BEGIN").await.unwrap();
    client
        .query(
            pgpushd::outbox::BATCH_SETTINGS,
            &[&"10000", &"60000", &"off"],
        )
        .await
        .unwrap();
    client
        .batch_execute(&format!("PREPARE {name} AS {sql}"))
        .await
        .unwrap();
    let rows = client
        .query(&format!("EXPLAIN EXECUTE {execute}"), &[])
        .await
        .unwrap();
    let generic: i64 = client
        .query_one(
            "SELECT generic_plans FROM pg_prepared_statements WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(generic, 1, "{name} was not planned for any parameters");
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_batch_looks_rows_up_by_index_even_when_planned_on_an_empty_outbox() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Planned on an empty table, a plan of the outcomes' UPDATE that scans the whole table
    // (a hash join) looks cheapest, and would be kept as the table grows.
    let record = batch_plan(
        &client,
        "record",
        pgpushd::outbox::RECORD,
        "record('{1,2}', '{sent,sent}', '{NULL,NULL}', '{NULL,NULL}', '{NULL,NULL}', \
         '{t,t}', '{NULL,NULL}', '{NULL,NULL}')",
    )
    .await;
    assert!(
        record.contains("Index Scan using outbox_pkey") && !record.contains("Seq Scan"),
        "{record}"
    );
    // Any cost would pass this threshold: the claim must still not be compiled (over a
    // large backlog, a generic plan's estimate for `LIMIT $1` passes the default one).
    client
        .batch_execute("SET jit_above_cost = 0")
        .await
        .unwrap();
    let claim = batch_plan(
        &client,
        "claim",
        pgpushd::outbox::CLAIM,
        "claim(500, '{}', '{}')",
    )
    .await;
    // The claim's rows and the next due row's lookup, each walking the index.
    assert!(
        claim.contains("Index Scan using outbox_pending_due")
            && claim.contains("Index Only Scan using outbox_pending_due")
            && !claim.contains("Seq Scan")
            && !claim.contains("JIT"),
        "{claim}"
    );
}

#[tokio::test]
async fn an_awake_look_walks_the_index_without_the_batch_settings() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // A look runs outside any transaction, so without BATCH_SETTINGS: its generic plan
    // (what PostgreSQL settles on after five runs), made on an empty outbox, must still
    // be the index's first entry, not a scan and a sort.
    client
        .batch_execute(&format!(
            "PREPARE look AS {}; SET plan_cache_mode = force_generic_plan",
            pgpushd::outbox::LOOK
        ))
        .await
        .unwrap();
    let plan: Vec<String> = client
        .query("EXPLAIN EXECUTE look('{}', '{}')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("outbox_pending_due") && !plan.contains("Seq Scan") && !plan.contains("Sort"),
        "{plan}"
    );
}

#[tokio::test]
async fn a_batch_dropped_mid_way_is_rolled_back_before_the_next_claim() {
    use pgpushd::outbox::{Bounds, Claim};
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut conn = outbox_conn(&db.url).await;
    let bounds = Bounds {
        statement: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        synchronous_commit: "off",
    };
    let claim = conn.claim(bounds, 10, Default::default()).await.unwrap();
    assert!(claim.rows.is_empty());
    drop(claim);
    // A row due after that transaction began: a claim still inside it (whose now() is
    // its start) would not see it due.
    insert_rows(&client, 1, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let Claim { rows, batch, .. } = conn.claim(bounds, 10, Default::default()).await.unwrap();
    assert_eq!(rows.len(), 1);
    batch.rollback().await.unwrap();
    // Rolled back: due again, for anyone.
    let mut other = outbox_conn(&db.url).await;
    let Claim { rows, batch, .. } = other.claim(bounds, 10, Default::default()).await.unwrap();
    assert_eq!(rows.len(), 1);
    batch.rollback().await.unwrap();
    // A batch dropped with rows releases them as it goes, not at its connection's next
    // claim.
    let held = conn.claim(bounds, 10, Default::default()).await.unwrap();
    assert_eq!(held.rows.len(), 1);
    drop(held);
    let give_up = std::time::Instant::now() + Duration::from_secs(5);
    while other
        .claim(bounds, 10, Default::default())
        .await
        .unwrap()
        .rows
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < give_up,
            "the dropped batch's row is still locked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn outcomes_are_committed_with_the_configured_synchronous_commit() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // What each outcome's transaction ran with, seen from inside it.
    client
        .batch_execute(
            "CREATE TABLE seen (id bigint, synchronous_commit text);
             CREATE FUNCTION pg_temp_seen() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO seen VALUES (OLD.id, current_setting('synchronous_commit'));
                   RETURN NEW; END $$;
             CREATE TRIGGER seen BEFORE UPDATE ON pgpushd.outbox
                FOR EACH ROW EXECUTE FUNCTION pg_temp_seen();",
        )
        .await
        .unwrap();
    for (setting, first) in [(None, 1), (Some("on"), 2)] {
        let mut cfg = config(&db.url, "");
        if let Some(s) = setting {
            cfg.database.synchronous_commit = s;
        }
        let daemon = start(cfg, ScriptedTransport::new());
        insert_rows(&client, first, 1).await;
        wait_for_status(&client, "sent", first as i64, Duration::from_secs(10)).await;
        daemon.stop().await;
    }
    let seen: Vec<(i64, String)> = client
        .query("SELECT id, synchronous_commit FROM seen ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(seen, [(1, "off".to_owned()), (2, "on".to_owned())]);
    // The session's own setting is untouched: it was local to the transaction.
    let after: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, "on");
}

/// The outbox's statements on a connection of their own.
async fn outbox_conn(url: &str) -> pgpushd::outbox::OutboxConn {
    let (client, canceller) = pgpushd::db::connect_cancellable(
        &pgpushd::secret::Secret::new(url.to_owned()),
        Duration::from_secs(10),
        "test",
    )
    .await
    .unwrap();
    pgpushd::outbox::OutboxConn::new(client, canceller, Duration::from_secs(10))
        .await
        .unwrap()
}

/// Issue 19: at a trickle, a row costs a claim and its outcome, two round trips; held
/// for the next claim (`outcome_hold`), the outcome rides in that claim's round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_trickle_each_outcome_rides_with_the_next_claim() {
    const ROWS: u64 = 20;
    let mut trips = Vec::new();
    for hold in [Duration::ZERO, Duration::from_millis(500)] {
        let db = TestDb::new().await;
        let client = db.client().await;
        let transport = ScriptedTransport::new();
        let mut cfg = config(&db.url, "");
        cfg.database.outcome_hold = hold;
        let daemon = Daemon::new(cfg, transport.clone());
        let metrics = daemon.metrics().clone();
        let progress = daemon.progress();
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { daemon.run(cancel).await }
        });
        wait_for_listener(&client).await;
        wait_for("the catch-up claim", Duration::from_secs(5), || async {
            (progress.borrow().claims >= 1).then_some(())
        })
        .await;
        let before = metrics.database_round_trips.get();
        // One row at a time, each sent before the next comes.
        for i in 1..=ROWS {
            insert_rows(&client, i, 1).await;
            wait_for("the row sent", Duration::from_secs(5), || async {
                (transport.count() as u64 >= i).then_some(())
            })
            .await;
            // A trickle: the next row comes well within the hold.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for("every row recorded", Duration::from_secs(5), || async {
            (progress.borrow().sent >= ROWS).then_some(())
        })
        .await;
        assert_eq!(count(&client, "sent").await, ROWS as i64);
        trips.push(metrics.database_round_trips.get() - before);
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
    // Without the hold: a claim and an outcome per row. With it: the first claim, one
    // round trip per row after it, and the last outcome's: about ROWS fewer. (Both see a
    // claim or two that finds nothing, a notification's row taken by the claim before;
    // on a loaded machine a row may come before its predecessor's batch holds.)
    assert!(trips[0] >= 2 * ROWS, "{trips:?}");
    assert!(trips[0] - trips[1] >= ROWS * 3 / 4, "{trips:?}");
}

/// A batch holding its outcomes writes them at once when the daemon stops, and its
/// rows are recorded, not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_outcomes_are_written_when_the_daemon_stops() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let transport = ScriptedTransport::new();
    let mut cfg = config(&db.url, "");
    cfg.database.outcome_hold = Duration::from_secs(1);
    cfg.database.max_batch_duration = Duration::from_secs(120);
    let daemon = start(cfg, transport.clone());
    wait_for_listener(&client).await;
    insert_rows(&client, 1, 3).await;
    wait_for("the rows sent", Duration::from_secs(5), || async {
        (transport.count() >= 3).then_some(())
    })
    .await;
    let stopping = std::time::Instant::now();
    daemon.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_millis(900),
        "the stop waited for the hold: {:?}",
        stopping.elapsed()
    );
    assert_eq!(count(&client, "sent").await, 3);
    assert_eq!(transport.count(), 3, "nothing sent twice");
}
