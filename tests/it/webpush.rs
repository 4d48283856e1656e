//! Browser rows end to end: real PostgreSQL, the daemon with `Providers`, and the Web
//! Push emulator (a push service that also plays the browser: it holds each
//! subscription's private key, checks VAPID and decrypts as RFC 8291 and 8292 say)
//! standing in for Mozilla's, Google's and Apple's push services. What a row becomes for
//! every answer the README names, two push services side by side, a reloaded VAPID key,
//! and pgpushd's encryption opened by an implementation that is not ours (Python's
//! `http_ece`).

use std::sync::Arc;
use std::time::Duration;

use pgpushd::providers::Providers;
use pgpushd::webpush::vapid::VapidKey;
use pgpushd_emulator::webpush::{
    Subscription, WebPushEmulator, WebPushEmulatorConfig, WebPushScript,
};

use crate::support::*;

/// A Web Push emulator, its CA, the app's VAPID key in files, and `[apps.web]`.
pub struct WebpushSetup {
    pub emulator: WebPushEmulator,
    pub dir: tempfile::TempDir,
    /// The application server key (65 bytes) browsers subscribe with.
    pub public_key: Vec<u8>,
    pub key_file: std::path::PathBuf,
    /// TOML for `[apps.web]`.
    pub app_toml: String,
}

impl WebpushSetup {
    pub async fn new(tweak: impl FnOnce(&mut WebPushEmulatorConfig)) -> WebpushSetup {
        let mut cfg = WebPushEmulatorConfig::default();
        tweak(&mut cfg);
        let emulator = WebPushEmulator::start(cfg).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("webpush-ca.pem");
        std::fs::write(&ca, emulator.ca_pem()).unwrap();
        let key_file = dir.path().join("vapid.pem");
        let public_key = write_key(&key_file);
        let app_toml = format!(
            r#"
[apps.web]
provider = "webpush"
ca_file = "{ca}"
connections = 1
request_timeout = "5s"

[apps.web.webpush]
key_file = "{key}"
subject = "mailto:ops@example.com"
push_services = ["localhost", "127.0.0.1"]
"#,
            ca = ca.display(),
            key = key_file.display(),
        );
        WebpushSetup {
            emulator,
            dir,
            public_key,
            key_file,
            app_toml,
        }
    }

    /// A browser's subscription, made with the app's key.
    pub fn subscribe(&self) -> Arc<Subscription> {
        self.emulator.subscribe(Some(&self.public_key)).unwrap()
    }
}

/// A new VAPID key at `path`; its public key.
fn write_key(path: &std::path::Path) -> Vec<u8> {
    let key = VapidKey::generate().unwrap();
    std::fs::write(path, key.to_pem().unwrap()).unwrap();
    pgpushd::webpush::base64url::decode(&key.public_key_b64url()).unwrap()
}

/// Inserts one row for `sub` with `payload` (JSON text) and the extra columns' SQL
/// values; returns its id.
async fn insert(client: &tokio_postgres::Client, sub: &Subscription, payload: &str) -> i64 {
    insert_with(client, sub, payload, "NULL", "NULL", "NULL").await
}

/// Inserts one row for `device_token` as it is (no browser need have made it), with the
/// payload `{}`; returns its id.
async fn insert_token(client: &tokio_postgres::Client, device_token: &str) -> i64 {
    client
        .query_one(
            "INSERT INTO pgpushd.outbox (app, device_token, payload)
             VALUES ('web', $1, '{}') RETURNING id",
            &[&device_token],
        )
        .await
        .unwrap()
        .get(0)
}

async fn insert_with(
    client: &tokio_postgres::Client,
    sub: &Subscription,
    payload: &str,
    priority: &str,
    collapse_id: &str,
    expires_at: &str,
) -> i64 {
    client
        .query_one(
            &format!(
                "INSERT INTO pgpushd.outbox (app, device_token, payload, priority, collapse_id,
                                             expires_at)
                 VALUES ('web', $1, $2::text::jsonb, {priority}, {collapse_id}, {expires_at})
                 RETURNING id"
            ),
            &[&sub.to_json(), &payload],
        )
        .await
        .unwrap()
        .get(0)
}

#[derive(Debug)]
struct Row {
    status: String,
    attempts: i32,
    last_error: Option<String>,
    location: Option<String>,
    payload: String,
}

async fn row(client: &tokio_postgres::Client, id: i64) -> Row {
    let r = client
        .query_one(
            "SELECT status, attempts, last_error, webpush_location, payload::text
               FROM pgpushd.outbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    Row {
        status: r.get(0),
        attempts: r.get(1),
        last_error: r.get(2),
        location: r.get(3),
        payload: r.get(4),
    }
}

async fn settled(client: &tokio_postgres::Client, id: i64) -> Row {
    wait_for(
        &format!("row {id} settled"),
        Duration::from_secs(20),
        || async {
            let r = row(client, id).await;
            (r.status != "pending" || r.attempts > 0).then_some(r)
        },
    )
    .await
}

fn quick_providers(cfg: &pgpushd::config::Config) -> Arc<Providers> {
    let options = pgpushd::providers::Options {
        timings: pgpushd::service::Timings {
            pause_backoff_base: Duration::from_millis(200),
            pause_backoff_max: Duration::from_millis(400),
            reconnect_base: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    };
    Arc::new(Providers::with_options(&cfg.apps, options).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_row_arrives_decrypted_byte_for_byte_and_keeps_its_location() {
    let db = TestDb::new().await;
    let web = WebpushSetup::new(|_| {}).await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), quick_providers(&cfg));
    let client = db.client().await;

    let subs: Vec<_> = (0..20).map(|_| web.subscribe()).collect();
    let mut ids = Vec::new();
    for (i, sub) in subs.iter().enumerate() {
        let payload = format!(r#"{{"title": "Hello", "body": "message {i} é ✓", "n": 1.50}}"#);
        ids.push(insert(&client, sub, &payload).await);
    }
    let timed = insert_with(
        &client,
        &subs[0],
        r#"{"body": "a code"}"#,
        "10",
        "'code-1'",
        "now() + interval '1 hour'",
    )
    .await;
    wait_for_status(&client, "sent", 21, Duration::from_secs(30)).await;
    daemon.stop().await;

    let records = web.emulator.records();
    for (id, sub) in ids.iter().zip(&subs) {
        let r = row(&client, *id).await;
        let record = records
            .iter()
            .find(|rec| rec.subscription.as_deref() == Some(&sub.id) && rec.status == 201)
            .unwrap();
        // What the service worker's push event gets is the row's payload::text.
        assert_eq!(record.text.as_deref(), Some(r.payload.as_str()));
        assert_eq!(r.location, record.location, "{r:?}");
        assert_eq!(r.attempts, 1);
        assert_eq!(record.ttl, Some(28 * 24 * 3600), "the app's default TTL");
        assert_eq!(record.urgency, None);
        assert_eq!(
            record.vapid_subject.as_deref(),
            Some("mailto:ops@example.com")
        );
    }
    let record = records
        .iter()
        .find(|rec| rec.text.as_deref() == Some(r#"{"body": "a code"}"#))
        .unwrap();
    assert!((3500..=3600).contains(&record.ttl.unwrap()), "{record:?}");
    assert_eq!(record.urgency.as_deref(), Some("high"));
    assert_eq!(record.topic.as_deref(), Some("code-1"));
    assert_eq!(row(&client, timed).await.status, "sent");
    // One VAPID token for the origin, not one per request.
    let first = records[0].vapid_key.clone();
    assert!(records.iter().all(|r| r.vapid_key == first));
}

/// A subscription naming a push service not in `push_services` (here the address cloud
/// hosts answer metadata on) fails before any request, saying why; the app's rows for
/// its allowed push services go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_a_push_service_not_listed_fails_unsent() {
    let db = TestDb::new().await;
    let web = WebpushSetup::new(|_| {}).await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), quick_providers(&cfg));
    let client = db.client().await;

    let listed = web.subscribe();
    let port = web.emulator.addr().port();
    let forged = listed.to_json().replace(
        &web.emulator.endpoint(),
        &format!("https://169.254.169.254:{port}"),
    );
    assert_ne!(forged, listed.to_json());
    let forged_id = insert_token(&client, &forged).await;
    let listed_id = insert(&client, &listed, r#"{"body": "hi"}"#).await;
    let r = settled(&client, forged_id).await;
    assert_eq!(r.status, "failed", "{r:?}");
    assert_eq!(
        r.last_error.as_deref(),
        Some(
            format!(
                "the subscription's push service https://169.254.169.254:{port} is not one \
                 of [apps.web.webpush] push_services"
            )
            .as_str()
        )
    );
    assert_eq!(settled(&client, listed_id).await.status, "sent");
    daemon.stop().await;
    assert_eq!(
        web.emulator.records().len(),
        1,
        "only the listed one was asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_ends_in_the_row_state_the_readme_names() {
    let db = TestDb::new().await;
    let web = WebpushSetup::new(|_| {}).await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), quick_providers(&cfg));
    let client = db.client().await;
    let payload = r#"{"body": "hi"}"#;

    // 410: the browser unsubscribed. The row fails, the subscription is recorded, and
    // a later row for it fails without a request.
    let gone = web.subscribe();
    web.emulator.unsubscribe(&gone.id);
    let r = settled(&client, insert(&client, &gone, payload).await).await;
    assert_eq!(r.status, "failed");
    assert!(r.last_error.unwrap().starts_with("HTTP 410"));
    let requests = web.emulator.records().len();
    let r = settled(&client, insert(&client, &gone, payload).await).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 0), "{r:?}");
    assert_eq!(
        web.emulator.records().len(),
        requests,
        "sent to a gone subscription"
    );

    // 404: a subscription the service does not know.
    let other = web.subscribe();
    let unknown = other.to_json().replace(&other.id, "00ff00ff00ff");
    let id = insert_token(&client, &unknown).await;
    let r = settled(&client, id).await;
    assert_eq!(r.status, "failed");
    assert!(r.last_error.unwrap().starts_with("HTTP 404"));

    // 403: the subscription was made with another application server key.
    let elsewhere = web
        .emulator
        .subscribe(Some(&write_key(&web.dir.path().join("k2.pem"))))
        .unwrap();
    let r = settled(&client, insert(&client, &elsewhere, payload).await).await;
    assert_eq!(r.status, "failed");
    assert!(
        r.last_error
            .as_deref()
            .unwrap()
            .contains("VAPID key does not match"),
        "{r:?}"
    );

    // 413 from the service, 400 from the service: failed, the service's words kept.
    for status in [413, 400] {
        let sub = web.subscribe();
        web.emulator.script(&sub.id, WebPushScript::status(status));
        let r = settled(&client, insert(&client, &sub, payload).await).await;
        assert_eq!(r.status, "failed");
        assert!(
            r.last_error
                .as_deref()
                .unwrap()
                .starts_with(&format!("HTTP {status}")),
            "{r:?}"
        );
    }

    // 429 with Retry-After: pending again, the attempt counted, not before the wait.
    let busy = web.subscribe();
    web.emulator.script_once(
        &busy.id,
        WebPushScript::status(429).retry_after(Duration::from_secs(30)),
    );
    let id = insert(&client, &busy, payload).await;
    let r = settled(&client, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("pending", 1), "{r:?}");
    let wait: f64 = client
        .query_one(
            "SELECT extract(epoch FROM send_after - now())::float8 FROM pgpushd.outbox
              WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(wait > 25.0, "Retry-After not honoured: due in {wait}s");

    // A subscription SQL lets through but no browser could have made: failed before any
    // request, with the reason.
    let requests = web.emulator.records().len();
    let bad = r#"{"endpoint":"https://push.example/x","keys":{"p256dh":"AAAA","auth":"AAAA"}}"#;
    let id = insert_token(&client, bad).await;
    let r = settled(&client, id).await;
    assert_eq!(r.status, "failed", "{r:?}");
    assert!(r.last_error.unwrap().contains("p256dh"));
    assert_eq!(web.emulator.records().len(), requests);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_push_service_holds_up_only_its_own_rows() {
    let db = TestDb::new().await;
    let fast = WebpushSetup::new(|_| {}).await;
    let latency = Duration::from_secs(3);
    let slow = WebPushEmulator::start(WebPushEmulatorConfig {
        latency,
        ..Default::default()
    })
    .await
    .unwrap();
    // One CA file trusting both emulators' CAs: the app's one ca_file.
    let ca = fast.dir.path().join("webpush-ca.pem");
    let mut both = fast.emulator.ca_pem().to_vec();
    both.extend_from_slice(slow.ca_pem());
    std::fs::write(&ca, both).unwrap();
    let cfg = config(
        &db.url,
        &fast
            .app_toml
            .replace("request_timeout = \"5s\"", "request_timeout = \"10s\""),
    );
    let daemon = start(cfg.clone(), quick_providers(&cfg));
    let client = db.client().await;
    let payload = r#"{"body": "hi"}"#;
    let slow_subs: Vec<_> = (0..5)
        .map(|_| slow.subscribe(Some(&fast.public_key)).unwrap())
        .collect();
    // In one statement, so that one batch takes them: this is about push services, not
    // about how many batches are in flight.
    let tokens: Vec<String> = slow_subs.iter().map(|s| s.to_json()).collect();
    client
        .execute(
            "INSERT INTO pgpushd.outbox (app, device_token, payload)
             SELECT 'web', t, $2::text::jsonb FROM unnest($1::text[]) AS t",
            &[&tokens, &payload],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::SystemTime::now();
    for _ in 0..5 {
        insert(&client, &fast.subscribe(), payload).await;
    }
    let fast_records = wait_for(
        "the fast service's pushes",
        Duration::from_secs(10),
        || async {
            let r = fast.emulator.records();
            (r.iter().filter(|r| r.status == 201).count() == 5).then_some(r)
        },
    )
    .await;
    let latest = fast_records.iter().map(|r| r.at).max().unwrap();
    wait_for_status(&client, "sent", 10, Duration::from_secs(20)).await;
    daemon.stop().await;
    // Every fast push arrived before the slow service answered its first: none waited
    // for it (whatever the machine's load did to the absolute times).
    let slow_first_answer = slow.records().iter().map(|r| r.at).min().unwrap() + latency;
    assert!(
        latest < slow_first_answer,
        "the fast push service waited for the slow one: its last push {:?} after the \
         slow one's first answer",
        latest.duration_since(slow_first_answer).unwrap_or_default()
    );
    assert!(latest > started, "the fast pushes came after their rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_signs_with_the_new_vapid_key() {
    let db = TestDb::new().await;
    let web = WebpushSetup::new(|_| {}).await;
    let cfg = config(&db.url, &web.app_toml);
    let providers = quick_providers(&cfg);
    let daemon = start(cfg.clone(), providers.clone());
    let client = db.client().await;
    let payload = r#"{"body": "hi"}"#;
    let sub = web.emulator.subscribe(None).unwrap();
    settled(&client, insert(&client, &sub, payload).await).await;

    let new_public = write_key(&web.key_file);
    assert_eq!(providers.reload(&cfg.apps).unwrap(), ["web"]);
    let r = settled(&client, insert(&client, &sub, payload).await).await;
    assert_eq!(r.status, "sent");
    daemon.stop().await;
    let keys: Vec<_> = web
        .emulator
        .records()
        .iter()
        .map(|r| r.vapid_key.clone().unwrap())
        .collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1]);
    assert_eq!(
        pgpushd::webpush::base64url::decode(&keys[1]).unwrap(),
        new_public
    );
}

#[test]
fn a_bad_vapid_key_or_subject_stops_start_up_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("vapid.pem");
    write_key(&key);
    let cases = [
        (
            "missing.pem",
            "mailto:ops@example.com",
            "apps.web.webpush.key_file",
        ),
        ("vapid.pem", "ops@example.com", "apps.web.webpush.subject"),
    ];
    for (file, subject, expected) in cases {
        let path = dir.path().join("pgpushd.toml");
        std::fs::write(
            &path,
            format!(
                "[database]\nurl = \"postgres://nobody@127.0.0.1:1/x\"\n\
                 [apps.web]\nprovider = \"webpush\"\n[apps.web.webpush]\n\
                 key_file = \"{}\"\nsubject = \"{subject}\"\n",
                dir.path().join(file).display()
            ),
        )
        .unwrap();
        let out = pgpushd_command()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(78), "{stdout}{stderr}");
        assert!(
            format!("{stdout}{stderr}").contains(expected),
            "{expected}: {stdout}{stderr}"
        );
    }
}

/// pgpushd's encryption, opened by Python's `http_ece` (Mozilla's reference
/// implementation of RFC 8188, with RFC 8291's key derivation), not by our emulator.
#[test]
fn python_http_ece_decrypts_what_pgpushd_encrypts() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import http_ece"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return skip_without("python3 with http_ece (pip install http_ece)");
    }
    // A browser's keys: a P-256 key pair and an auth secret.
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let ua = openssl::ec::EcKey::generate(&group).unwrap();
    let mut ctx = openssl::bn::BigNumContext::new().unwrap();
    let public = ua
        .public_key()
        .to_bytes(
            &group,
            openssl::ec::PointConversionForm::UNCOMPRESSED,
            &mut ctx,
        )
        .unwrap();
    let auth: [u8; 16] = rand::random();
    let b64 = pgpushd::webpush::base64url::encode;
    let sub = pgpushd::webpush::subscription::Subscription::parse(&format!(
        r#"{{"endpoint":"https://push.example/x","keys":{{"p256dh":"{}","auth":"{}"}}}}"#,
        b64(&public),
        b64(&auth)
    ))
    .unwrap();
    let plaintext = "{\"body\": \"déjà vu ✓\"}".repeat(100);
    let body = pgpushd::webpush::encrypt::encrypt(plaintext.as_bytes(), &sub).unwrap();
    let script = r#"
import sys, base64, http_ece
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization
d = lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
key = serialization.load_pem_private_key(sys.argv[1].encode(), password=None)
out = http_ece.decrypt(d(sys.argv[3]), private_key=key, auth_secret=d(sys.argv[2]),
                       version="aes128gcm")
sys.stdout.buffer.write(out)
"#;
    let pem = String::from_utf8(ua.private_key_to_pem().unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-c", script, &pem, &b64(&auth), &b64(&body)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), plaintext);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_service_speaking_only_http1_beside_one_speaking_http2() {
    let db = TestDb::new().await;
    let h2 = WebpushSetup::new(|_| {}).await;
    let h1 = WebPushEmulator::start(WebPushEmulatorConfig {
        http1_only: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ca = h2.dir.path().join("webpush-ca.pem");
    let mut both = h2.emulator.ca_pem().to_vec();
    both.extend_from_slice(h1.ca_pem());
    std::fs::write(&ca, both).unwrap();
    let cfg = config(&db.url, &h2.app_toml);
    let daemon = start(cfg.clone(), quick_providers(&cfg));
    let client = db.client().await;
    for i in 0..30 {
        let payload = format!(r#"{{"body": "n{i}"}}"#);
        insert(&client, &h2.subscribe(), &payload).await;
        let sub = h1.subscribe(Some(&h2.public_key)).unwrap();
        insert(&client, &sub, &payload).await;
    }
    wait_for_status(&client, "sent", 60, Duration::from_secs(30)).await;
    daemon.stop().await;

    let (r1, r2) = (h1.records(), h2.emulator.records());
    assert_eq!(r1.len(), 30);
    assert!(r1
        .iter()
        .all(|r| r.status == 201 && r.http_version == "1.1"));
    assert!(r2.iter().all(|r| r.status == 201 && r.http_version == "2"));
    // Kept alive: `connections = 1` per push service, one connection carried them all
    // (the first, the ALPN probe's, included).
    let conns: std::collections::HashSet<_> = r1.iter().map(|r| r.connection).collect();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let texts: std::collections::HashSet<_> = r1.iter().filter_map(|r| r.text.clone()).collect();
    assert_eq!(texts.len(), 30);
}

#[test]
fn the_demo_delivers_through_all_three_services() {
    let out = pgpushd_command()
        .args(["demo", "--rows", "300", "--provider", "all"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("(APNs, token auth"), "{stdout}");
    assert!(stdout.contains("(FCM, service account"), "{stdout}");
    assert!(stdout.contains("(Web Push, 100 browsers"), "{stdout}");
    assert!(
        stdout.contains("delivered 300 of 300") && stdout.contains("emulators accepted 300"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_pushes_once_to_a_browser_and_prints_the_answer() {
    let web = WebpushSetup::new(|_| {}).await;
    let path = web.dir.path().join("pgpushd.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"postgres://nobody@127.0.0.1:1/x\"\n{}",
            web.app_toml
        ),
    )
    .unwrap();
    let send = |token: String| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            pgpushd_command()
                .args(["send", "--app", "web", "--alert", "Hi there", "--token"])
                .arg(token)
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap()
        })
    };
    let sub = web.subscribe();
    let out = send(sub.to_json()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("HTTP 201 (location https://"),
        "{stdout}"
    );
    let record = web.emulator.records().pop().unwrap();
    assert_eq!(
        record.text.as_deref(),
        Some(r#"{"body":"Hi there","title":"pgpushd"}"#)
    );
    web.emulator.unsubscribe(&sub.id);
    let out = send(sub.to_json()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("HTTP 410 the subscription is gone"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_outbox_reaches_apns_fcm_and_browsers_each_row_keeping_its_id() {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let fcm = crate::fcm::FcmSetup::new(|_| {}).await;
    let web = WebpushSetup::new(|_| {}).await;
    let cfg = config(
        &db.url,
        &format!("{}{}{}", apns.app_toml, fcm.app_toml, web.app_toml),
    );
    let daemon = start(cfg.clone(), quick_providers(&cfg));
    let client = db.client().await;
    insert_rows(&client, 1, 50).await;
    crate::fcm::insert_fcm_rows(&client, 1, 50).await;
    for _ in 0..50 {
        insert(&client, &web.subscribe(), r#"{"body": "hi"}"#).await;
    }
    wait_for_status(&client, "sent", 150, Duration::from_secs(30)).await;
    daemon.stop().await;

    // Each row keeps its own service's id, and only that one.
    let ids = client
        .query(
            "SELECT app, count(apns_id), count(fcm_name), count(webpush_location), count(*)
               FROM pgpushd.outbox GROUP BY app ORDER BY app",
            &[],
        )
        .await
        .unwrap();
    let ids: Vec<(String, i64, i64, i64, i64)> = ids
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        ids,
        [
            ("android".to_owned(), 0, 50, 0, 50),
            ("default".to_owned(), 50, 0, 0, 50),
            ("web".to_owned(), 0, 0, 50, 50),
        ]
    );
    assert_eq!(apns.emulator.stats().count(200), 50);
    assert_eq!(web.emulator.records().len(), 50);
}

/// pgpushd's VAPID token, checked with Python's `cryptography` (OpenSSL underneath, but
/// none of our code): ES256 over the JWT, by the key in `k`, with the claims RFC 8292
/// asks for.
#[test]
fn python_verifies_pgpushds_vapid_token() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return skip_without("python3 with cryptography (pip install pywebpush)");
    }
    let vapid = pgpushd::webpush::vapid::Vapid::new(
        VapidKey::generate().unwrap(),
        "mailto:ops@example.com",
    )
    .unwrap();
    let exp = std::time::SystemTime::now() + Duration::from_secs(12 * 3600);
    let header = vapid
        .authorization("https://push.example:8443", exp)
        .unwrap();
    let script = r#"
import sys, json, base64, time
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives import hashes
d = lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
scheme, params = sys.argv[1].split(" ", 1)
assert scheme == "vapid", scheme
fields = dict(p.strip().split("=", 1) for p in params.split(","))
head, claims, sig = fields["t"].split(".")
key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), d(fields["k"]))
raw = d(sig)
assert len(raw) == 64, len(raw)
der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
key.verify(der, (head + "." + claims).encode(), ec.ECDSA(hashes.SHA256()))
h, c = json.loads(d(head)), json.loads(d(claims))
assert h == {"typ": "JWT", "alg": "ES256"}, h
assert c["aud"] == "https://push.example:8443", c
assert c["sub"] == "mailto:ops@example.com", c
assert time.time() < c["exp"] <= time.time() + 24 * 3600, c
print("ok")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &header])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
