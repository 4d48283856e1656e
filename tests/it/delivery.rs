//! Rows through the real APNs transport to the emulator and back: every answer APNs can
//! give ends in the row state the README names, bad rows fail before any request, and
//! connection trouble mid-flight loses nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use pgpushd::transport::Transport;

async fn setup(
    tweak: impl FnOnce(&mut pgpushd_emulator::EmulatorConfig),
) -> (TestDb, ApnsSetup, Running, tokio_postgres::Client) {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(tweak).await;
    let cfg = config(&db.url, &apns.app_toml);
    let transport = ApnsSetup::transport(&cfg);
    let daemon = start(cfg, transport);
    let client = db.client().await;
    (db, apns, daemon, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_reach_the_emulator_and_carry_its_apns_id() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    insert_rows(&client, 1, 300).await;
    wait_for_status(&client, "sent", 300, Duration::from_secs(20)).await;
    daemon.stop().await;

    let by_token: HashMap<String, String> = apns
        .emulator
        .records()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| (r.device_token.clone(), r.apns_id.clone()))
        .collect();
    assert_eq!(by_token.len(), 300);
    for row in client
        .query(
            "SELECT device_token, apns_id::text FROM pgpushd.outbox",
            &[],
        )
        .await
        .unwrap()
    {
        let token: String = row.get(0);
        let apns_id: String = row.get(1);
        assert_eq!(by_token[&token].to_lowercase(), apns_id, "{token}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_row_without_a_priority_goes_at_5_and_an_alert_without_the_header() {
    // Without apns-priority APNs uses 10, which Apple calls an error for background
    // pushes: the emulator refuses it as APNs would (BadPriority).
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    client
        .batch_execute(&format!(
            "INSERT INTO pgpushd.outbox (device_token, payload, push_type) VALUES
               ('{}', '{{\"aps\":{{\"content-available\":1}}}}', 'background'),
               ('{}', '{{\"aps\":{{\"alert\":\"hi\"}}}}', 'alert')",
            token(1),
            token(2)
        ))
        .await
        .unwrap();
    wait_for_status(&client, "sent", 2, Duration::from_secs(20)).await;
    daemon.stop().await;
    let priority_of = |t: String| {
        let records = apns.emulator.records();
        let r = records.iter().find(|r| r.device_token == t).unwrap();
        (r.status, r.priority)
    };
    assert_eq!(priority_of(token(1)), (200, Some(5)));
    assert_eq!(priority_of(token(2)), (200, None), "APNs's default, 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_apns_answer_ends_in_the_row_state_design_md_gives() {
    // (status, reason, row status, last_error must contain, token recorded unregistered)
    let cases: &[(u16, &str, &str, &str, bool)] = &[
        (400, "BadDeviceToken", "failed", "BadDeviceToken", false),
        (
            400,
            "DeviceTokenNotForTopic",
            "failed",
            "DeviceTokenNotForTopic",
            false,
        ),
        (400, "BadCollapseId", "failed", "BadCollapseId", false),
        (400, "TopicDisallowed", "failed", "TopicDisallowed", false),
        (413, "PayloadTooLarge", "failed", "PayloadTooLarge", false),
        (410, "Unregistered", "failed", "Unregistered", true),
        (410, "ExpiredToken", "failed", "ExpiredToken", true),
        (
            429,
            "TooManyRequests",
            "failed",
            "gave up after 3 attempts",
            false,
        ),
        (
            500,
            "InternalServerError",
            "failed",
            "gave up after 3 attempts",
            false,
        ),
        (
            503,
            "ServiceUnavailable",
            "failed",
            "gave up after 3 attempts",
            false,
        ),
        (503, "Shutdown", "failed", "gave up after 3 attempts", false),
        (
            400,
            "SomethingAppleAddsLater",
            "failed",
            "SomethingAppleAddsLater",
            false,
        ),
    ];
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    for (i, (status, reason, ..)) in cases.iter().enumerate() {
        apns.emulator.script(&token(i as u64 + 1), *status, reason);
    }
    let n = cases.len() as u64;
    insert_rows(&client, 1, n + 5).await; // five good rows after them
    wait_for("every row settled", Duration::from_secs(20), || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;
    daemon.stop().await;

    assert_eq!(count(&client, "sent").await, 5);
    for (i, (status, reason, row_status, error, unregistered)) in cases.iter().enumerate() {
        let t = token(i as u64 + 1);
        let row = client
            .query_one(
                "SELECT status, coalesce(last_error, ''), attempts,
                        EXISTS (SELECT 1 FROM pgpushd.unregistered_tokens u WHERE u.device_token = o.device_token)
                   FROM pgpushd.outbox o WHERE device_token = $1",
                &[&t],
            )
            .await
            .unwrap();
        let case = format!("{status} {reason}");
        assert_eq!(row.get::<_, String>(0), *row_status, "{case}");
        let last_error: String = row.get(1);
        assert!(last_error.contains(error), "{case}: {last_error}");
        assert_eq!(row.get::<_, bool>(3), *unregistered, "{case}");
        let expected_attempts = if error.starts_with("gave up") { 3 } else { 1 };
        assert_eq!(row.get::<_, i32>(2), expected_attempts, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_keep_rows_pending_and_burn_no_attempts() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    apns.emulator.script(&token(1), 403, "InvalidProviderToken");
    insert_rows(&client, 1, 1).await;
    wait_for("the app to be refused", Duration::from_secs(10), || async {
        let row = client
            .query_one("SELECT last_error FROM pgpushd.outbox", &[])
            .await
            .unwrap();
        row.get::<_, Option<String>>(0)
            .filter(|e| e.contains("InvalidProviderToken"))
    })
    .await;
    let row = client
        .query_one("SELECT status, attempts FROM pgpushd.outbox", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_fail_before_any_request_and_block_nothing() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    // Rows the CHECK constraints would refuse can still exist (inserted before them, or
    // with them relaxed): the daemon must cope.
    client
        .batch_execute("ALTER TABLE pgpushd.outbox DROP CONSTRAINT outbox_row_is_valid")
        .await
        .unwrap();
    let big = "x".repeat(5000);
    let bad: Vec<(&str, String, &str)> = vec![
        ("odd-length token", format!("('{}', '{{}}', 'alert', 'default', NULL, NULL, NULL)", "abc"), "BadDeviceToken"),
        ("non-hex token", format!("('{}', '{{}}', 'alert', 'default', NULL, NULL, NULL)", "zz".repeat(32)), "BadDeviceToken"),
        ("payload too large", format!("('{}', '{{\"aps\":{{\"alert\":\"{big}\"}}}}', 'alert', 'default', NULL, NULL, NULL)", token(901)), "PayloadTooLarge"),
        ("unknown push type", format!("('{}', '{{}}', 'shout', 'default', NULL, NULL, NULL)", token(903)), "push type"),
        ("voip to a plain topic", format!("('{}', '{{}}', 'voip', 'default', NULL, 'com.example.app', NULL)", token(904)), "topic"),
        ("background at priority 10", format!("('{}', '{{}}', 'background', 'default', 10, NULL, NULL)", token(905)), "priority"),
        ("collapse id over 64 bytes", format!("('{}', '{{}}', 'alert', 'default', NULL, NULL, '{}')", token(906), "c".repeat(65)), "collapse"),
        ("payload not an object", format!("('{}', '[1,2]', 'alert', 'default', NULL, NULL, NULL)", token(907)), "object"),
    ];
    let mut values = Vec::new();
    for (i, (_, v, _)) in bad.iter().enumerate() {
        values.push(v.clone());
        values.push(format!(
            "('{}', '{{}}', 'alert', 'default', NULL, NULL, NULL)",
            token(i as u64 + 1)
        ));
    }
    client
        .batch_execute(&format!(
            "INSERT INTO pgpushd.outbox (device_token, payload, push_type, app, priority, topic, collapse_id) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    wait_for("every row settled", Duration::from_secs(20), || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;
    daemon.stop().await;

    assert_eq!(
        count(&client, "sent").await,
        bad.len() as i64,
        "good rows were blocked"
    );
    let rows = client
        .query(
            "SELECT status, coalesce(last_error, ''), attempts FROM pgpushd.outbox WHERE id % 2 = 1 ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    for ((what, _, expected), row) in bad.iter().zip(rows) {
        assert_eq!(row.get::<_, String>(0), "failed", "{what}");
        let e: String = row.get(1);
        assert!(
            e.to_lowercase().contains(&expected.to_lowercase()),
            "{what}: {e}"
        );
    }
    assert_eq!(
        apns.emulator.records().len(),
        bad.len(),
        "the emulator saw requests for bad rows"
    );
}

/// A row's status, last_error and attempts, by its token.
async fn row_state(client: &tokio_postgres::Client, token: &str) -> (String, String, i32) {
    let row = client
        .query_one(
            "SELECT status, coalesce(last_error, ''), attempts FROM pgpushd.outbox
              WHERE device_token = $1",
            &[&token],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Mid rolling upgrade, a row may name an app only the upgraded daemons' config has: the
/// others keep it pending (an attempt counted, backing off) rather than fail it, and it
/// fails only after `max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_for_an_app_this_config_lacks_waits_for_a_daemon_that_has_it() {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let client = db.client().await;
    // An old daemon: no [apps.newapp]; a long backoff so the first attempt stays visible.
    let mut old = config(&db.url, &apns.app_toml);
    old.retry.backoff_base = Duration::from_secs(600);
    old.retry.backoff_max = Duration::from_secs(600);
    let daemon = start(old.clone(), ApnsSetup::transport(&old));
    let new_token = token(1);
    client
        .execute(
            "INSERT INTO pgpushd.outbox (app, device_token, payload)
             VALUES ('newapp', $1, '{\"aps\":{\"alert\":\"hi\"}}')",
            &[&new_token],
        )
        .await
        .unwrap();
    insert_rows(&client, 2, 1).await; // a row for an app it has goes out meanwhile
    wait_for_status(&client, "sent", 1, Duration::from_secs(10)).await;
    wait_for("the first attempt", Duration::from_secs(10), || async {
        (row_state(&client, &new_token).await.2 > 0).then_some(())
    })
    .await;
    daemon.stop().await;
    let (row_status, last_error, attempts) = row_state(&client, &new_token).await;
    assert_eq!(row_status, "pending", "{last_error}");
    assert!(
        last_error.contains("no [apps.newapp] section in this daemon's config"),
        "{last_error}"
    );
    assert_eq!(attempts, 1);
    assert!(apns
        .emulator
        .records()
        .iter()
        .all(|r| r.device_token != new_token));

    // An upgraded daemon, whose config has the app, delivers it (once due: the backoff
    // is cut short here rather than waited out).
    client
        .execute("UPDATE pgpushd.outbox SET send_after = now()", &[])
        .await
        .unwrap();
    let both = format!(
        "{}{}",
        apns.app_toml,
        apns.app_toml.replace("apps.default", "apps.newapp")
    );
    let new = config(&db.url, &both);
    let daemon = start(new.clone(), ApnsSetup::transport(&new));
    wait_for_status(&client, "sent", 2, Duration::from_secs(10)).await;
    daemon.stop().await;
    assert_eq!(row_state(&client, &new_token).await.2, 2);

    // With no daemon that has it, the row fails after max_attempts, like any transient
    // failure.
    let lost_token = token(3);
    client
        .execute(
            "INSERT INTO pgpushd.outbox (app, device_token, payload) VALUES ('nosuch', $1, '{}')",
            &[&lost_token],
        )
        .await
        .unwrap();
    let plain = config(&db.url, &apns.app_toml);
    let daemon = start(plain.clone(), ApnsSetup::transport(&plain));
    wait_for_status(&client, "failed", 1, Duration::from_secs(10)).await;
    daemon.stop().await;
    let (_, last_error, attempts) = row_state(&client, &lost_token).await;
    assert_eq!(attempts, 3);
    assert!(
        last_error.starts_with("gave up after 3 attempts")
            && last_error.contains("no [apps.nosuch] section in this daemon's config"),
        "{last_error}"
    );
}

/// The payload reaches APNs as PostgreSQL holds it: numbers beyond 64 bits and decimals
/// longer than an f64's are not rounded on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_reach_apns_byte_for_byte_as_postgresql_holds_them() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    client
        .execute(
            "INSERT INTO pgpushd.outbox (device_token, payload) VALUES ($1, $2::text::jsonb)",
            &[
                &token(1),
                &r#"{"aps":{"alert":"x"},"big":123456789012345678901234567890,"pi":3.14159265358979323846264338327950288}"#,
            ],
        )
        .await
        .unwrap();
    wait_for_status(&client, "sent", 1, Duration::from_secs(10)).await;
    daemon.stop().await;
    let stored: String = client
        .query_one("SELECT payload::text FROM pgpushd.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        stored.contains("123456789012345678901234567890"),
        "{stored}"
    );
    assert!(
        stored.contains("3.14159265358979323846264338327950288"),
        "{stored}"
    );
    let records = apns.emulator.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        std::str::from_utf8(&records[0].payload).unwrap(),
        stored,
        "the body is not PostgreSQL's text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_mid_flight_loses_nothing() {
    let (_db, _apns, daemon, client) = setup(|c| c.goaway_every = Some(50)).await;
    insert_rows(&client, 1, 1000).await;
    wait_for_status(&client, "sent", 1000, Duration::from_secs(30)).await;
    assert_eq!(count(&client, "failed").await, 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_mid_flight_lose_nothing() {
    let (_db, apns, daemon, client) = setup(|c| c.latency = Duration::from_millis(20)).await;
    insert_rows(&client, 1, 2000).await;
    for _ in 0..3 {
        wait_for("requests in flight", Duration::from_secs(10), || async {
            (apns.emulator.stats().connections_open > 0).then_some(())
        })
        .await;
        apns.emulator.drop_connections();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_status(&client, "sent", 2000, Duration::from_secs(60)).await;
    assert_eq!(count(&client, "failed").await, 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_uses_the_stream_limit_apns_raises_after_the_first_success() {
    // Token auth: the emulator starts each connection at MAX_CONCURRENT_STREAMS = 1 and
    // raises it after the first 200, as APNs does. One connection, slow answers: only a
    // client that follows the raise gets many requests in flight.
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|c| c.latency = Duration::from_millis(300)).await;
    let app = apns.app_toml.replace("connections = 2", "connections = 1");
    let cfg = config(&db.url, &app);
    let transport = ApnsSetup::transport(&cfg);
    let daemon = start(cfg, transport);
    let client = db.client().await;
    insert_rows(&client, 1, 400).await;
    wait_for(
        "many streams in flight on one connection",
        Duration::from_secs(20),
        || async { (apns.emulator.stats().requests_in_flight >= 50).then_some(()) },
    )
    .await;
    wait_for_status(&client, "sent", 400, Duration::from_secs(20)).await;
    daemon.stop().await;
    let stats = apns.emulator.stats();
    assert_eq!(stats.connections_accepted, 1, "{stats:?}");
    assert_eq!(
        stats.streams_refused, 0,
        "the client overran the limit: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_noticed_by_ping_and_replaced() {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let cfg = config(
        &db.url,
        &apns.app_toml.replace("connections = 2", "connections = 1"),
    );
    let options = pgpushd::providers::Options {
        timings: pgpushd::service::Timings {
            ping_interval: Duration::from_millis(200),
            ping_timeout: Duration::from_millis(300),
            reconnect_base: Duration::from_millis(50),
            ..Default::default()
        },
        ..Default::default()
    };
    let transport: Arc<dyn Transport> =
        Arc::new(pgpushd::providers::Providers::with_options(&cfg.apps, options).unwrap());
    let daemon = start(cfg, transport);
    let client = db.client().await;
    insert_rows(&client, 1, 1).await;
    wait_for_status(&client, "sent", 1, Duration::from_secs(5)).await;

    // The server goes silent: no answers, no PING replies. The client must notice by
    // itself (no request is waiting) and connect anew.
    apns.emulator.stall(true);
    wait_for(
        "a replacement connection",
        Duration::from_secs(10),
        || async { (apns.emulator.stats().connections_accepted >= 2).then_some(()) },
    )
    .await;
    apns.emulator.stall(false);
    wait_for(
        "the silent connection closed",
        Duration::from_secs(10),
        || async { (apns.emulator.stats().connections_open == 1).then_some(()) },
    )
    .await;
    insert_rows(&client, 2, 10).await;
    wait_for_status(&client, "sent", 11, Duration::from_secs(10)).await;
    assert_eq!(count(&client, "failed").await, 0);
    daemon.stop().await;
}

/// Certificate auth end to end: a client certificate from the emulator's client CA, as
/// a .p12 and as a PEM whose key is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_auth_with_a_p12_and_with_an_encrypted_pem_key() {
    use openssl::pkcs12::Pkcs12;
    use openssl::pkey::PKey;
    use openssl::symm::Cipher;
    use openssl::x509::X509;
    use pgpushd_emulator::tls::CertificateAuthority;
    use pgpushd_emulator::{Emulator, EmulatorAuth, EmulatorConfig};

    let dir = tempfile::tempdir().unwrap();
    let client_ca = CertificateAuthority::generate("pgpushd test client CA").unwrap();
    let issued = client_ca
        .issue_client("Apple Push Services: com.example.app")
        .unwrap();
    let cert = X509::from_pem(&issued.cert_pem).unwrap();
    let key = PKey::private_key_from_pem(&issued.key_pem).unwrap();
    std::fs::write(dir.path().join("pass"), "s3cret\n").unwrap();
    let p12 = Pkcs12::builder()
        .name("push")
        .pkey(&key)
        .cert(&cert)
        .build2("s3cret")
        .unwrap();
    std::fs::write(dir.path().join("push.p12"), p12.to_der().unwrap()).unwrap();
    let encrypted_key = key
        .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), b"s3cret")
        .unwrap();
    std::fs::write(
        dir.path().join("ck.pem"),
        [issued.cert_pem.as_slice(), encrypted_key.as_slice()].concat(),
    )
    .unwrap();

    let emulator = Emulator::start(EmulatorConfig {
        auth: EmulatorAuth::ClientCertificate {
            ca_pem: client_ca.cert_pem(),
        },
        topic: Some(TOPIC.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::write(dir.path().join("ca.pem"), emulator.ca_pem()).unwrap();
    let app = |name: &str, file: &str| {
        format!(
            r#"
[apps.{name}]
topic = "{TOPIC}"
endpoint = "{endpoint}"
ca_file = "{dir}/ca.pem"
[apps.{name}.certificate]
file = "{dir}/{file}"
passphrase_file = "{dir}/pass"
"#,
            endpoint = emulator.endpoint(),
            dir = dir.path().display(),
        )
    };
    let db = TestDb::new().await;
    let cfg = config(
        &db.url,
        &format!("{}{}", app("p12", "push.p12"), app("pem", "ck.pem")),
    );
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO pgpushd.outbox (app, device_token, payload)
             SELECT CASE WHEN g % 2 = 0 THEN 'p12' ELSE 'pem' END, lpad(to_hex(g), 64, '0'), '{}'
               FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    wait_for_status(&client, "sent", 20, Duration::from_secs(10)).await;
    daemon.stop().await;
    assert_eq!(emulator.stats().count(200), 20);
}

/// A Live Activity's three events as rows: sent with their push type and topic; one a
/// device would drop fails before any request, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_activity_rows_start_update_and_end_and_bad_ones_fail_unsent() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rows = [
        (
            token(1),
            serde_json::json!({"aps": {"event": "start", "timestamp": now,
                "attributes-type": "DeliveryAttributes", "attributes": {"order": "1234"},
                "content-state": {"eta": "12:30"},
                "alert": {"title": "Order 1234", "body": "On its way"}}}),
        ),
        (
            token(2),
            serde_json::json!({"aps": {"event": "update", "timestamp": now + 1,
                "content-state": {"eta": "12:40"}}}),
        ),
        (
            token(2),
            serde_json::json!({"aps": {"event": "end", "timestamp": now + 2,
                "content-state": {"eta": "delivered"}, "dismissal-date": now + 600}}),
        ),
        // No content-state: the device would drop it.
        (
            token(3),
            serde_json::json!({"aps": {"event": "update", "timestamp": now}}),
        ),
    ];
    for (token, payload) in &rows {
        client
            .execute(
                "INSERT INTO pgpushd.outbox (device_token, payload, push_type)
                 VALUES ($1, $2, 'liveactivity')",
                &[token, payload],
            )
            .await
            .unwrap();
    }
    wait_for("every row settled", Duration::from_secs(20), || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;
    daemon.stop().await;
    assert_eq!(count(&client, "sent").await, 3);
    let failed: String = client
        .query_one(
            "SELECT last_error FROM pgpushd.outbox WHERE status = 'failed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failed.contains("needs aps.content-state"), "{failed}");
    let records = apns.emulator.records();
    assert_eq!(records.len(), 3, "the bad row cost a request");
    assert!(records.iter().all(|r| r.status == 200), "{records:?}");
}
