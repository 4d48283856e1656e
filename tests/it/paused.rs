//! One app's trouble never holds up another (issue 20, items 6 and 7): a dead app's
//! backlog (its credentials refused, or its service unreachable) is set aside for each
//! pause, written once per pause, while a healthy app on the same daemon goes on; a 403
//! about one row's own topic fails that row, not the app.

use pgpushd::providers::Providers;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpushd::transport::Transport;

use crate::support::*;

/// A test's database, emulator, the daemon's transport, the daemon, and a client.
type Setup = (
    TestDb,
    ApnsSetup,
    Arc<dyn Transport>,
    Running,
    tokio_postgres::Client,
);

/// The healthy `[apps.default]` and `[apps.dead]`, whose key the emulator does not know
/// (every request answered 403 InvalidProviderToken), probing after 1 s.
async fn two_apps() -> Setup {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let foreign = apns.dir.path().join("Foreign.p8");
    std::fs::write(
        &foreign,
        pgpushd_emulator::jwt::generate_signing_key().unwrap(),
    )
    .unwrap();
    let dead = token_app_toml(
        &apns.emulator.endpoint(),
        &apns.dir.path().join("ca.pem"),
        &foreign,
    )
    .replace("[apps.default", "[apps.dead")
    .replace("request_timeout = \"5s\"", "request_timeout = \"1s\"");
    let cfg = config(&db.url, &format!("{}{dead}", apns.app_toml));
    let (transport, daemon, client) = start_pausing_quickly(&db, cfg).await;
    (db, apns, transport, daemon, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_apps_backlog_waits_aside_written_once_per_pause_while_another_app_goes_on() {
    let (_db, apns, _transport, daemon, client) = two_apps().await;
    let pauses = dead_backlog_waits_aside(daemon, &client, "InvalidProviderToken").await;
    // The dead app asked APNs no more than its first batches (4 of 100 in flight before
    // the first answer) and one probe per pause.
    let refused = apns
        .emulator
        .records()
        .iter()
        .filter(|r| r.status == 403)
        .count() as u64;
    assert!(refused <= 400 + pauses + 1, "{refused} requests refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_apps_backlog_waits_aside_written_once_per_pause_while_another_app_goes_on()
{
    // `[apps.dead]` points at a port where nothing listens: no connection can be had, so
    // the app pauses as one whose credentials are refused does, rather than deferring
    // its rows one by one at each reconnection.
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dead = apns
        .app_toml
        .replace("[apps.default", "[apps.dead")
        .replace(
            &apns.emulator.endpoint(),
            &format!("https://127.0.0.1:{port}"),
        );
    let cfg = config(&db.url, &format!("{}{dead}", apns.app_toml));
    let (_transport, daemon, client) = start_with_timings(
        &db,
        cfg,
        pgpushd::service::Timings {
            reconnect_base: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(1),
            stream_wait: Duration::from_secs(1),
            ..pausing_quickly()
        },
    )
    .await;
    dead_backlog_waits_aside(daemon, &client, "APNs is unreachable").await;
}

/// `[apps.dead]` has a backlog of 5,000 rows and `[apps.default]`'s rows arrive all
/// along for 12 s: the healthy app's are all sent, the dead app's wait (pending, no
/// attempt counted, `why` in `last_error`), parked but for the probe, each written at most
/// once per pause. Stops the daemon; returns the dead app's pauses.
async fn dead_backlog_waits_aside(
    daemon: Running,
    client: &tokio_postgres::Client,
    why: &str,
) -> u64 {
    // Every write of a dead row, counted by a trigger of the test's.
    client
        .batch_execute(
            "CREATE TABLE dead_writes (id bigint NOT NULL);
             CREATE FUNCTION count_dead_write() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO dead_writes VALUES (NEW.id); RETURN NEW; END $$;
             CREATE TRIGGER count_dead_writes AFTER UPDATE ON pgpushd.outbox
                FOR EACH ROW WHEN (NEW.app = 'dead') EXECUTE FUNCTION count_dead_write();
             INSERT INTO pgpushd.outbox (app, device_token, payload)
             SELECT 'dead', lpad(to_hex(i), 64, '0'), '{\"aps\":{\"alert\":\"x\"}}'
               FROM generate_series(1, 5000) AS i;
             NOTIFY pgpushd_outbox;",
        )
        .await
        .unwrap();
    // The healthy app's rows arrive all along, a few at a time.
    let started = Instant::now();
    let mut healthy = 0;
    while started.elapsed() < Duration::from_secs(12) {
        insert_rows(client, healthy + 1, 5).await;
        healthy += 5;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_status(client, "sent", healthy as i64, Duration::from_secs(20)).await;
    let metrics = daemon.metrics.clone();
    daemon.stop().await;
    let pauses = pauses_of(&metrics, "dead");

    let r = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'pending'), max(attempts),
                    count(*) FILTER (WHERE send_after <= now()),
                    count(*) FILTER (WHERE strpos(last_error, $1) > 0)
               FROM pgpushd.outbox WHERE app = 'dead'",
            &[&why],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 5000, "the dead app's rows wait");
    assert_eq!(r.get::<_, i32>(1), 0, "without attempts counted");
    assert!(
        r.get::<_, i64>(2) <= 1,
        "parked, but for the probe (or a row the gate deferred to its end)"
    );
    assert!(r.get::<_, i64>(3) > 0, "no row says {why:?}");
    let parked: i64 = client
        .query_one(
            "SELECT count(*) FROM pgpushd.outbox
              WHERE app = 'dead' AND send_after > now() + interval '30 minutes'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(parked >= 4990, "{parked} rows parked");
    let writes: Vec<(i64, i64)> = client
        .query(
            "SELECT n, count(*) FROM
               (SELECT count(*) AS n FROM dead_writes GROUP BY id) AS w GROUP BY n ORDER BY n",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let most = writes.last().map_or(0, |w| w.0);
    eprintln!("{pauses} pauses; rows by writes: {writes:?}");
    assert!(pauses >= 3, "{pauses} pauses");
    // Parked once; the first batches' rows were deferred by the gate first; a probe row
    // is also made due, sent, deferred: within once per pause.
    assert!(
        most <= pauses as i64 + 1,
        "a dead row written {most} times in {pauses} pauses"
    );
    pauses
}

/// The pauses of `app` whose backlog the daemon set aside.
fn pauses_of(metrics: &pgpushd::metrics::Metrics, app: &str) -> u64 {
    metrics
        .app_pauses
        .get_or_create(&pgpushd::metrics::AppLabels { app: app.into() })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_for_a_rows_own_topic_fails_the_row_and_leaves_the_app_open() {
    // Issue 20, item 6: a topic the key's team does not own is refused with a 403, as
    // the app's credentials are; the app accepting its other requests tells them apart.
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let cfg = config(&db.url, &apns.app_toml);
    let transport = ApnsSetup::transport(&cfg);
    let daemon = start(cfg, transport.clone());
    let client = db.client().await;
    insert_rows(&client, 1, 3).await;
    wait_for_status(&client, "sent", 3, Duration::from_secs(20)).await;

    // The emulator checks the topic before its scripts: a topic of the app's own
    // bundle (a VoIP push's) stands in for another team's, which APNs answers 403.
    let foreign = token(100);
    apns.emulator.script(&foreign, 403, "InvalidProviderToken");
    client
        .execute(
            "INSERT INTO pgpushd.outbox (device_token, payload, push_type, topic)
             VALUES ($1, '{\"aps\":{}}', 'voip', 'com.example.app.voip')",
            &[&foreign],
        )
        .await
        .unwrap();
    insert_rows(&client, 4, 3).await;
    wait_for_status(&client, "failed", 1, Duration::from_secs(20)).await;
    wait_for_status(&client, "sent", 6, Duration::from_secs(20)).await;
    assert!(transport.health().iter().all(|(_, h)| h.is_ok()));
    assert!(transport.paused().is_empty());
    daemon.stop().await;
    let r = client
        .query_one(
            "SELECT attempts, last_error FROM pgpushd.outbox WHERE device_token = $1",
            &[&foreign],
        )
        .await
        .unwrap();
    let error: String = r.get(1);
    assert_eq!(r.get::<_, i32>(0), 3, "{error}");
    assert!(
        error.starts_with("gave up after 3 attempts: InvalidProviderToken")
            && error.contains("the row's own topic \"com.example.app.voip\""),
        "{error}"
    );
}

/// A daemon for `cfg` whose apps pause for 1 to 2 s; its transport, and a client.
async fn start_pausing_quickly(
    db: &TestDb,
    cfg: pgpushd::config::Config,
) -> (Arc<dyn Transport>, Running, tokio_postgres::Client) {
    start_with_timings(db, cfg, pausing_quickly()).await
}

/// Pauses of 1 to 2 s.
fn pausing_quickly() -> pgpushd::service::Timings {
    pgpushd::service::Timings {
        pause_backoff_base: Duration::from_secs(1),
        pause_backoff_max: Duration::from_secs(2),
        ..Default::default()
    }
}

/// A daemon for `cfg` whose apps' clients have these `timings`; its transport, and a
/// client.
async fn start_with_timings(
    db: &TestDb,
    cfg: pgpushd::config::Config,
    timings: pgpushd::service::Timings,
) -> (Arc<dyn Transport>, Running, tokio_postgres::Client) {
    let transport: Arc<dyn Transport> = Arc::new(
        Providers::with_options(
            &cfg.apps,
            pgpushd::providers::Options {
                timings,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let daemon = start(cfg, transport.clone());
    (transport, daemon, db.client().await)
}

/// `[apps.default]` with short pauses (1 to 2 s), its probe's time 1 s.
async fn one_app_pausing_quickly() -> Setup {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let toml = apns
        .app_toml
        .replace("request_timeout = \"5s\"", "request_timeout = \"1s\"");
    let cfg = config(&db.url, &toml);
    let (transport, daemon, client) = start_pausing_quickly(&db, cfg).await;
    (db, apns, transport, daemon, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_apps_parked_backlog_is_due_again_at_once() {
    let (_db, apns, _transport, daemon, client) = one_app_pausing_quickly().await;
    let rows = 2000;
    for i in 1..=rows {
        apns.emulator.script(&token(i), 403, "InvalidProviderToken");
    }
    client
        .batch_execute(&format!(
            "INSERT INTO pgpushd.outbox (device_token, payload)
             SELECT lpad(to_hex(i), 64, '0'), '{{\"aps\":{{\"alert\":\"x\"}}}}'
               FROM generate_series(1, {rows}) AS i"
        ))
        .await
        .unwrap();
    wait_for("the backlog parked", Duration::from_secs(30), || async {
        let parked: i64 = client
            .query_one(
                "SELECT count(*) FROM pgpushd.outbox
                  WHERE send_after > now() + interval '30 minutes'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (parked > rows as i64 - 10).then_some(())
    })
    .await;
    // APNs takes the key again: the next probe is accepted, and the parked rows, an
    // hour ahead, are due at once.
    apns.emulator.clear_scripts();
    wait_for_status(&client, "sent", rows as i64, Duration::from_secs(60)).await;
    let attempts: i64 = client
        .query_one("SELECT sum(attempts) FROM pgpushd.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        attempts, rows as i64,
        "one attempt each: the refusals cost none"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_while_rows_carry_their_own_topic_pauses_the_app_after_a_few_attempts() {
    let (_db, apns, transport, daemon, client) = one_app_pausing_quickly().await;
    insert_rows(&client, 1, 3).await;
    wait_for_status(&client, "sent", 3, Duration::from_secs(20)).await;
    // Every request refused from now on, the rows naming a topic of their own (a VoIP
    // push's): not one row's topic, the app's key.
    for i in 256..286 {
        apns.emulator.script(&token(i), 403, "InvalidProviderToken");
    }
    client
        .batch_execute(
            "INSERT INTO pgpushd.outbox (device_token, payload, push_type, topic)
             SELECT lpad(to_hex(i), 64, '0'), '{\"aps\":{}}', 'voip', 'com.example.app.voip'
               FROM generate_series(256, 285) AS i",
        )
        .await
        .unwrap();
    wait_for("the app paused", Duration::from_secs(20), || async {
        (!transport.paused().is_empty()).then_some(())
    })
    .await;
    let attempts: i64 = client
        .query_one(
            "SELECT coalesce(sum(attempts), 0) FROM pgpushd.outbox WHERE push_type = 'voip'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    daemon.stop().await;
    let limit = i64::from(pgpushd::service::app_gate::ROW_REFUSALS) - 1;
    assert!(
        attempts <= limit,
        "{attempts} attempts burned (at most {limit})"
    );
}

/// One Web Push service's rows are found by their subscription's endpoint as
/// `Subscription::origin` writes it, whatever the JSON's spacing or the host's case, and
/// no other row: another port, another host, a name that merely starts the same, another
/// app, an APNs token, text that is not JSON.
#[tokio::test]
async fn a_push_services_rows_are_told_apart_by_their_endpoints_origin() {
    use pgpushd::outbox::set_aside;
    use pgpushd::webpush::subscription::Subscription;

    let db = TestDb::new().await;
    let mut client = db.client().await;
    let keys = r#""keys":{"p256dh":"BHMblAN5R2-4wR_VtJZvahct1MMOntaS2h8IzO43766prhmtTCqsDo-fooBzdNLgF73GgLVDuX3H2FwFUR0ULhQ","auth":"-bVsP9Rp3nIexGSbs6rbuQ"}"#;
    let sub = |endpoint: &str| format!(r#"{{"endpoint":"{endpoint}",{keys}}}"#);
    let origin = "https://push.example";
    let its = [
        sub("https://push.example/a"),
        sub("https://Push.Example/b"),
        sub("https://push.example:443/c"),
        format!(r#"{{ "endpoint" : "https://push.example/d?x=1", {keys} }}"#),
    ];
    let others = [
        sub("https://push.example:8443/e"),
        // An escaped character: the origin is https://push.example:8443 once unescaped.
        sub(r"https://push.example\u003a8443/h"),
        sub("https://push.example.evil.net/f"),
        sub("https://other.example/g"),
    ];
    for token in &its {
        let parsed = Subscription::parse(token).unwrap();
        assert_eq!(parsed.origin(), origin, "{token}");
    }
    let insert = |app: &'static str, tokens: Vec<String>| {
        let client = &client;
        async move {
            client
                .execute(
                    "INSERT INTO pgpushd.outbox (app, device_token, payload)
                     SELECT $1, t, '{}' FROM unnest($2::text[]) AS t",
                    &[&app, &tokens],
                )
                .await
                .unwrap();
        }
    };
    insert("web", its.to_vec()).await;
    insert("web", others.to_vec()).await;
    insert("other", vec![its[0].clone()]).await;
    insert("web", vec!["ab".repeat(32)]).await;

    let threshold = set_aside::time_ahead(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let park_at = set_aside::time_ahead(&client, Duration::from_secs(3600))
        .await
        .unwrap();
    let bound = Duration::from_secs(10);
    let moved = set_aside::park(
        &mut client,
        "web",
        Some(origin),
        threshold,
        park_at,
        None,
        "paused",
        bound,
    )
    .await
    .unwrap();
    let parked: Vec<String> = client
        .query(
            "SELECT device_token FROM pgpushd.outbox WHERE send_after = $1 ORDER BY id",
            &[&park_at],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(parked, its, "moved {moved}");
    let released = set_aside::release(&mut client, "web", Some(origin), &[park_at], bound)
        .await
        .unwrap();
    assert_eq!(released, its.len() as u64);
}
