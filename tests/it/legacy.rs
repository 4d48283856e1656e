//! Rows written before schema version 3's CHECK on `send_after` (issue 9): an infinite
//! `send_after` that the CHECK, NOT VALID, never looked at. The daemon and retention must
//! never write one back (every UPDATE's new row version must satisfy the CHECK), and
//! migration 5 normalises them and validates the constraint.

use std::time::Duration;

use tokio_postgres::Client;

use crate::support::*;

const CONSTRAINT: &str = "outbox_send_after_must_be_finite";

async fn insert_legacy(c: &Client, token: u64, send_after: &str, status: &str) -> i64 {
    c.query_one(
        "INSERT INTO pgpushd.outbox (device_token, payload, send_after, status)
         VALUES ($1, '{\"aps\":{\"alert\":\"legacy\"}}', $2::text::timestamptz, $3)
         RETURNING id",
        &[&token_of(token), &send_after, &status],
    )
    .await
    .unwrap()
    .get(0)
}

fn token_of(i: u64) -> String {
    token(i)
}

/// The database at `version`, as an install of that version left it.
async fn migrate_to(c: &mut Client, version: i32) {
    pgpushd::outbox::migrate::migrate_to(c, version)
        .await
        .unwrap();
}

async fn constraint_validated(c: &Client) -> bool {
    c.query_one(
        "SELECT convalidated FROM pg_constraint WHERE conname = $1",
        &[&CONSTRAINT],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn legacy_infinite_send_after_rows_do_not_wedge_their_batch_or_retention() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // The legacy state: rows written without the CHECK, which is then NOT VALID.
    c.batch_execute(&format!(
        "ALTER TABLE pgpushd.outbox DROP CONSTRAINT {CONSTRAINT}"
    ))
    .await
    .unwrap();
    let due = insert_legacy(&c, 1000, "-infinity", "pending").await;
    let settled = insert_legacy(&c, 1001, "-infinity", "sent").await;
    c.batch_execute(&format!(
        "ALTER TABLE pgpushd.outbox ADD CONSTRAINT {CONSTRAINT}
             CHECK (isfinite(send_after)) NOT VALID"
    ))
    .await
    .unwrap();
    insert_rows(&c, 1, 20).await;

    let transport = ScriptedTransport::new();
    let daemon = start(
        config(
            &db.url,
            "[retention]\nsent = \"1h\"\ninterval = \"100ms\"\n",
        ),
        transport.clone(),
    );
    // The legacy row is claimed first (its send_after sorts first) with the others.
    wait_for_status(&c, "sent", 22, Duration::from_secs(10)).await;
    wait_for(
        "retention stamps the legacy settled row",
        Duration::from_secs(10),
        || async {
            let stamped: bool = c
                .query_one(
                    "SELECT settled_at IS NOT NULL FROM pgpushd.outbox WHERE id = $1",
                    &[&settled],
                )
                .await
                .unwrap()
                .get(0);
            stamped.then_some(())
        },
    )
    .await;
    daemon.stop().await;
    let finite: bool = c
        .query_one(
            "SELECT bool_and(isfinite(send_after) AND isfinite(settled_at))
               FROM pgpushd.outbox WHERE id IN ($1, $2)",
            &[&due, &settled],
        )
        .await
        .unwrap()
        .get(0);
    assert!(finite);
    assert_eq!(transport.count(), 21, "each pending row sent once");
}

#[tokio::test]
async fn migration_5_normalises_legacy_rows_and_validates_the_constraint() {
    let db = TestDb::unmigrated().await;
    let mut c = db.client().await;
    // Written at version 2, before the CHECK existed.
    migrate_to(&mut c, 2).await;
    let minus = insert_legacy(&c, 1, "-infinity", "pending").await;
    let never = insert_legacy(&c, 2, "infinity", "pending").await;
    let settled = insert_legacy(&c, 3, "infinity", "sent").await;
    migrate_to(&mut c, 4).await;
    assert!(!constraint_validated(&c).await);

    assert_eq!(
        pgpushd::outbox::migrate::migrate(&mut c).await.unwrap(),
        (5..=pgpushd::outbox::migrate::latest_version()).collect::<Vec<_>>()
    );
    assert!(constraint_validated(&c).await);
    let rows = c
        .query(
            "SELECT id, status, isfinite(send_after), send_after <= now(), last_error
               FROM pgpushd.outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let row = |id: i64| rows.iter().find(|r| r.get::<_, i64>(0) == id).unwrap();
    // -infinity: still pending, due now.
    assert_eq!(row(minus).get::<_, String>(1), "pending");
    assert!(row(minus).get::<_, bool>(2) && row(minus).get::<_, bool>(3));
    // infinity on a pending row: failed, and says why.
    assert_eq!(row(never).get::<_, String>(1), "failed");
    assert!(row(never).get::<_, bool>(2));
    let why: String = row(never).get(4);
    assert!(
        why.contains("infinity") && why.contains("migration 005"),
        "{why}"
    );
    // A settled row keeps its status, with a finite send_after.
    assert_eq!(row(settled).get::<_, String>(1), "sent");
    assert!(row(settled).get::<_, bool>(2));

    // The daemon delivers the legacy row that was due.
    let transport = ScriptedTransport::new();
    let daemon = start(config(&db.url, ""), transport.clone());
    wait_for_status(&c, "sent", 2, Duration::from_secs(10)).await;
    daemon.stop().await;
    assert_eq!(transport.sent_ids(), [minus]);
}

/// Migration 6 takes the outbox's exclusive lock. Behind a transaction that holds the
/// table (a batch still sending), it gives up within seconds, changing nothing, instead
/// of queueing every writer behind it; once the table is free it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_6_gives_up_rather_than_queue_writers_behind_a_long_batch() {
    let db = TestDb::unmigrated().await;
    let mut c = db.client().await;
    migrate_to(&mut c, 5).await;
    insert_legacy(&c, 1, "now", "pending").await;

    // A batch: its transaction holds claimed rows for as long as they are being sent.
    let mut batch = db.client().await;
    let txn = batch.transaction().await.unwrap();
    txn.execute("SELECT id FROM pgpushd.outbox FOR UPDATE", &[])
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let error = pgpushd::outbox::migrate::migrate(&mut c).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let text = format!("{error:#}");
    assert!(text.contains("006_fcm_tokens"), "{text}");
    assert!(text.contains("run `pgpushd migrate` again"), "{text}");
    assert_eq!(
        pgpushd::outbox::migrate::schema_version(&c).await.unwrap(),
        5
    );

    txn.commit().await.unwrap();
    assert_eq!(
        pgpushd::outbox::migrate::migrate(&mut c).await.unwrap(),
        (6..=pgpushd::outbox::migrate::latest_version()).collect::<Vec<_>>()
    );
}
