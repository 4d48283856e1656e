//! Android rows end to end: real PostgreSQL, the daemon with `Providers`, and the FCM
//! emulator (its CA trusted, its service account's key the app's) standing in for
//! Google. A mixed outbox reaches both services; every answer FCM can give ends in the
//! row state the README names; access tokens are renewed mid-run and refused ones make
//! the app wait, not the rows; a GOAWAY loses nothing; a bad key never starts.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pgpushd::providers::Providers;
use pgpushd::transport::Transport;
use pgpushd_emulator::fcm::error::{ErrorCode, OauthError};
use pgpushd_emulator::fcm::{FcmEmulator, FcmEmulatorConfig, FcmEndpoint, FcmScript};

use crate::support::*;

/// The FCM emulator, its CA and service-account key in files, and the `[apps.android]`
/// that reaches it.
pub struct FcmSetup {
    pub emulator: FcmEmulator,
    pub dir: tempfile::TempDir,
    /// TOML for `[apps.android]`.
    pub app_toml: String,
}

impl FcmSetup {
    pub async fn new(tweak: impl FnOnce(&mut FcmEmulatorConfig)) -> FcmSetup {
        let mut cfg = FcmEmulatorConfig::default();
        tweak(&mut cfg);
        let emulator = FcmEmulator::start(cfg).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("fcm-ca.pem");
        std::fs::write(&ca, emulator.ca_pem()).unwrap();
        let key = dir.path().join("service-account.json");
        std::fs::write(&key, emulator.service_account_json().unwrap()).unwrap();
        let app_toml = format!(
            r#"
[apps.android]
provider = "fcm"
endpoint = "{endpoint}"
ca_file = "{ca}"
connections = 2
request_timeout = "5s"

[apps.android.fcm]
service_account_file = "{key}"
"#,
            endpoint = emulator.endpoint(),
            ca = ca.display(),
            key = key.display(),
        );
        FcmSetup {
            emulator,
            dir,
            app_toml,
        }
    }
}

/// The apps' clients, with short pauses and token retries.
fn transport(config: &pgpushd::config::Config) -> Arc<Providers> {
    let options = pgpushd::providers::Options {
        timings: pgpushd::service::Timings {
            pause_backoff_base: Duration::from_millis(200),
            pause_backoff_max: Duration::from_millis(400),
            ..Default::default()
        },
        fcm: pgpushd::fcm::Options {
            token_retry_base: Duration::from_millis(100),
            token_retry_max: Duration::from_millis(200),
        },
        ..Default::default()
    };
    Arc::new(Providers::with_options(&config.apps, options).unwrap())
}

/// A registration token, distinct per `i`, in both cases (FCM's tokens are
/// case-sensitive), with the ':' every current token has.
pub fn fcm_token(i: u64) -> String {
    format!("dKx{i}Qa:APA91bH-Zz_{i:06}")
}

/// Inserts rows for `app` with FCM tokens `fcm_token(first..first+n)`.
pub async fn insert_fcm_rows(client: &tokio_postgres::Client, first: u64, n: u64) {
    for i in first..first + n {
        client
            .execute(
                "INSERT INTO pgpushd.outbox (app, device_token, payload)
                 VALUES ('android', $1, $2::text::jsonb)",
                &[
                    &fcm_token(i),
                    &format!(r#"{{"notification": {{"title": "n{i}"}}, "data": {{"i": "{i}"}}}}"#),
                ],
            )
            .await
            .unwrap();
    }
}

struct Row {
    status: String,
    attempts: i32,
    last_error: Option<String>,
    fcm_name: Option<String>,
}

async fn row(client: &tokio_postgres::Client, token: &str) -> Row {
    let r = client
        .query_one(
            "SELECT status, attempts, last_error, fcm_name FROM pgpushd.outbox
              WHERE device_token = $1 ORDER BY id LIMIT 1",
            &[&token],
        )
        .await
        .unwrap();
    Row {
        status: r.get(0),
        attempts: r.get(1),
        last_error: r.get(2),
        fcm_name: r.get(3),
    }
}

/// What a test of the daemon gets.
type Setup = (
    TestDb,
    FcmSetup,
    Arc<Providers>,
    Running,
    tokio_postgres::Client,
);

async fn setup(tweak: impl FnOnce(&mut FcmEmulatorConfig)) -> Setup {
    setup_with("", tweak).await
}

/// As [`setup`], with more config (`[metrics]`).
async fn setup_with(extra: &str, tweak: impl FnOnce(&mut FcmEmulatorConfig)) -> Setup {
    let db = TestDb::new().await;
    let fcm = FcmSetup::new(tweak).await;
    let cfg = config(&db.url, &format!("{extra}{}", fcm.app_toml));
    let providers = transport(&cfg);
    let daemon = start(cfg, providers.clone());
    let client = db.client().await;
    (db, fcm, providers, daemon, client)
}

/// Sends to `token` the emulator answered with `status`.
fn sends(fcm: &FcmSetup, token: &str) -> Vec<u16> {
    fcm.emulator
        .records()
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Send && r.token.as_deref() == Some(token))
        .map(|r| r.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rows_expires_at_reaches_fcm_as_each_platforms_time_to_live() {
    // Without it FCM keeps an undelivered message four weeks: a one-time code arriving
    // hours late.
    let (_db, fcm, _providers, daemon, client) = setup(|_| {}).await;
    client
        .execute(
            "INSERT INTO pgpushd.outbox (app, device_token, payload, expires_at) VALUES
               ('android', $1, '{\"data\": {\"code\": \"123456\"}}', now() + interval '1 hour'),
               ('android', $2, '{\"android\": {\"ttl\": \"60s\"}}', now() + interval '1 hour'),
               ('android', $3, '{\"data\": {\"code\": \"654321\"}}', NULL)",
            &[&fcm_token(1), &fcm_token(2), &fcm_token(3)],
        )
        .await
        .unwrap();
    wait_for_status(&client, "sent", 3, Duration::from_secs(20)).await;
    daemon.stop().await;
    let message = |i: u64| {
        let token = fcm_token(i);
        fcm.emulator
            .records()
            .iter()
            .find(|r| r.token.as_deref() == Some(&token))
            .and_then(|r| r.message.clone())
            .unwrap()
    };
    let one = message(1);
    let ttl = one["android"]["ttl"].as_str().unwrap();
    let secs: u64 = ttl.strip_suffix('s').unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&secs), "{one}");
    assert_eq!(one["webpush"]["headers"]["TTL"], secs.to_string().as_str());
    let at: u64 = one["apns"]["headers"]["apns-expiration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let in_an_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    assert!(at <= in_an_hour && at + 120 > in_an_hour, "{one}");
    assert_eq!(one["data"]["code"], "123456");
    assert_eq!(
        message(2)["android"]["ttl"],
        "60s",
        "the payload's own, earlier"
    );
    let three = message(3);
    assert!(
        three.get("android").is_none(),
        "no expires_at, no ttl: {three}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_outbox_reaches_each_service_and_keeps_its_names() {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let fcm = FcmSetup::new(|_| {}).await;
    let cfg = config(&db.url, &format!("{}{}", apns.app_toml, fcm.app_toml));
    let daemon = start(cfg.clone(), transport(&cfg));
    let client = db.client().await;
    insert_rows(&client, 1, 150).await;
    insert_fcm_rows(&client, 1, 150).await;
    wait_for_status(&client, "sent", 300, Duration::from_secs(30)).await;
    daemon.stop().await;

    // Each service got its own rows, and nothing else.
    let apns_ids: HashMap<String, String> = apns
        .emulator
        .records()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| (r.device_token.clone(), r.apns_id.to_lowercase()))
        .collect();
    assert_eq!(apns_ids.len(), 150);
    let names: HashMap<String, String> = fcm
        .emulator
        .records()
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Send && r.status == 200)
        .map(|r| (r.token.clone().unwrap(), r.name.clone().unwrap()))
        .collect();
    assert_eq!(names.len(), 150);
    let project = fcm.emulator.project_id().unwrap();
    for r in client
        .query(
            "SELECT app, device_token, apns_id::text, fcm_name, attempts FROM pgpushd.outbox",
            &[],
        )
        .await
        .unwrap()
    {
        let (app, token): (String, String) = (r.get(0), r.get(1));
        let (apns_id, fcm_name): (Option<String>, Option<String>) = (r.get(2), r.get(3));
        assert_eq!(r.get::<_, i32>(4), 1, "{token}");
        match app.as_str() {
            "default" => {
                assert_eq!(apns_id.as_ref(), Some(&apns_ids[&token]), "{token}");
                assert_eq!(fcm_name, None);
            }
            "android" => {
                assert_eq!(fcm_name.as_ref(), Some(&names[&token]), "{token}");
                assert!(fcm_name
                    .unwrap()
                    .starts_with(&format!("projects/{project}/messages/")));
                assert_eq!(apns_id, None);
            }
            other => panic!("{other}"),
        }
    }
    // Each message went out as the row said, the token added.
    let message = fcm
        .emulator
        .records()
        .iter()
        .find(|r| r.token.as_deref() == Some(fcm_token(7).as_str()))
        .and_then(|r| r.message.clone())
        .unwrap();
    assert_eq!(message["data"]["i"], "7");
    assert_eq!(message["notification"]["title"], "n7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_are_renewed_mid_run_and_nothing_is_lost() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let (_db, fcm, _providers, daemon, client) = setup(|c| c.token_lifetime = LIFETIME).await;
    // Waves every half second over about three token lifetimes.
    for wave in 0..16 {
        insert_fcm_rows(&client, wave * 10 + 1, 10).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for_status(&client, "sent", 160, Duration::from_secs(30)).await;
    daemon.stop().await;
    let records = fcm.emulator.records();
    let grants: Vec<std::time::SystemTime> = records
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Token && r.status == 200)
        .map(|r| r.at)
        .collect();
    assert!(
        grants.len() >= 3,
        "{} access tokens over 8 s of 3 s tokens",
        grants.len()
    );
    // Each renewed while the previous one was still valid (in the background, from its
    // renew_at), not once it had run out and sends had to wait.
    for pair in grants.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(gap < LIFETIME, "a token renewed {gap:?} after the last");
    }
    // FCM never saw an expired one, and every row went out at its first attempt.
    let expired = records
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Send && r.status == 401)
        .count();
    assert_eq!(expired, 0);
    let retried: i64 = client
        .query_one(
            "SELECT count(*) FROM pgpushd.outbox WHERE attempts <> 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retried, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fcm_answer_ends_in_the_row_state_the_readme_gives() {
    let (_db, fcm, _providers, daemon, client) = setup(|_| {}).await;
    let e = &fcm.emulator;
    let [unregistered, invalid, mismatch, unavailable, internal, unspecified] =
        [1, 2, 3, 4, 5, 6].map(fcm_token);
    e.script(&unregistered, FcmScript::Error(ErrorCode::Unregistered));
    e.script(&invalid, FcmScript::Error(ErrorCode::InvalidArgument));
    e.script(&mismatch, FcmScript::Error(ErrorCode::SenderIdMismatch));
    e.script_once(&unavailable, FcmScript::Error(ErrorCode::Unavailable));
    e.script_once(&internal, FcmScript::Error(ErrorCode::Internal));
    // FCM's "no more information": retried, kept verbatim, failed after max_attempts (3).
    e.script(&unspecified, FcmScript::Error(ErrorCode::UnspecifiedError));
    insert_fcm_rows(&client, 1, 6).await;
    wait_for_status(&client, "sent", 2, Duration::from_secs(20)).await;
    wait_for_status(&client, "failed", 4, Duration::from_secs(20)).await;

    let r = row(&client, &unregistered).await;
    assert_eq!(r.status, "failed");
    assert!(r.last_error.unwrap().starts_with("UNREGISTERED: "));
    let r = row(&client, &invalid).await;
    assert_eq!(r.status, "failed");
    assert!(r.last_error.unwrap().starts_with("INVALID_ARGUMENT: "));
    let r = row(&client, &mismatch).await;
    assert_eq!(r.status, "failed");
    assert!(r.last_error.unwrap().starts_with("SENDER_ID_MISMATCH: "));
    // One 503 UNAVAILABLE without Retry-After, like a 500 INTERNAL, is the row's retry
    // (with Retry-After, or device after device, the app would pause).
    for (token, attempts) in [(&unavailable, 2), (&internal, 2)] {
        let r = row(&client, token).await;
        assert_eq!(
            (r.status.as_str(), r.attempts),
            ("sent", attempts),
            "{token}"
        );
        assert!(r.fcm_name.is_some());
    }
    let r = row(&client, &unspecified).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 3));
    let error = r.last_error.unwrap();
    assert!(
        error.starts_with("gave up after 3 attempts: UNSPECIFIED_ERROR: "),
        "{error}"
    );

    // The unregistered token is recorded exactly, its case kept; a later row for it
    // fails without a request, and one for the same token in another case is sent.
    let recorded: Vec<String> = client
        .query(
            "SELECT device_token FROM pgpushd.unregistered_tokens WHERE app = 'android'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(recorded, vec![unregistered.clone()]);
    let before = sends(&fcm, &unregistered).len();
    let other_case = unregistered.to_lowercase();
    for token in [&unregistered, &other_case] {
        client
            .execute(
                "INSERT INTO pgpushd.outbox (app, device_token, payload)
                 VALUES ('android', $1, '{\"data\": {\"again\": \"1\"}}')",
                &[token],
            )
            .await
            .unwrap();
    }
    wait_for_status(&client, "failed", 5, Duration::from_secs(20)).await;
    wait_for_status(&client, "sent", 3, Duration::from_secs(20)).await;
    daemon.stop().await;
    assert_eq!(sends(&fcm, &unregistered).len(), before);
    let again = client
        .query_one(
            "SELECT last_error FROM pgpushd.outbox WHERE device_token = $1 ORDER BY id DESC LIMIT 1",
            &[&unregistered],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert!(again.starts_with("Unregistered: "), "{again}");
}

/// One FCM row answered `QUOTA_EXCEEDED` once, with this `Retry-After`: how far ahead
/// its `send_after` is once it is pending again with its attempt counted, its
/// `last_error`, and the statuses FCM answered it.
async fn quota_exceeded_once(retry_after: Duration) -> (f64, Option<String>, Vec<u16>) {
    let (_db, fcm, _providers, daemon, client) = setup(|c| c.retry_after = retry_after).await;
    let token = fcm_token(1);
    fcm.emulator
        .script_once(&token, FcmScript::Error(ErrorCode::QuotaExceeded));
    insert_fcm_rows(&client, 1, 1).await;
    let wait: f64 = wait_for(
        "the row back to pending",
        Duration::from_secs(20),
        || async {
            let r = client
                .query_one(
                    "SELECT status, attempts,
                        extract(epoch FROM send_after - clock_timestamp())::float8
                   FROM pgpushd.outbox",
                    &[],
                )
                .await
                .unwrap();
            (r.get::<_, i32>(1) == 1).then(|| {
                assert_eq!(r.get::<_, String>(0), "pending");
                r.get::<_, f64>(2)
            })
        },
    )
    .await;
    daemon.stop().await;
    let r = row(&client, &token).await;
    (wait, r.last_error, sends(&fcm, &token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_waits_at_least_retry_after() {
    // Retry-After 30 s, far past the test config's backoff_max of 200 ms.
    let (wait, last_error, sends) = quota_exceeded_once(Duration::from_secs(30)).await;
    assert!(wait > 25.0 && wait <= 30.5, "send_after is {wait} s away");
    assert!(last_error.unwrap().starts_with("QUOTA_EXCEEDED: "));
    assert_eq!(sends, vec![429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_centuries_puts_the_row_off_an_hour_and_is_recorded() {
    // Such a Retry-After parked the row for millennia (and one past what PostgreSQL's
    // intervals hold made the outcome's UPDATE fail, so the row was sent again for ever).
    let (wait, _, sends) = quota_exceeded_once(Duration::from_secs(100_000_000_000)).await;
    let cap = pgpushd::outcome::MAX_RETRY_AFTER.as_secs_f64();
    assert!(
        wait > cap - 60.0 && wait <= cap + 0.5,
        "send_after is {wait} s away"
    );
    assert_eq!(sends, vec![429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_on_the_whole_app_pauses_it_and_its_backlog_keeps_its_attempts() {
    // Issue 20, item 2: QUOTA_EXCEEDED for one device after another is the project's
    // quota. Before, every request in flight burned an attempt on it, and a quota
    // longer than the retries failed the backlog.
    let (_db, fcm, providers, daemon, client) =
        setup(|c| c.retry_after = Duration::from_secs(1)).await;
    let rows = 60;
    for i in 1..=rows {
        fcm.emulator
            .script(&fcm_token(i), FcmScript::Error(ErrorCode::QuotaExceeded));
    }
    insert_fcm_rows(&client, 1, rows).await;
    wait_for("the app paused", Duration::from_secs(20), || async {
        let health = providers.health();
        let (_, h) = health.iter().find(|(app, _)| app == "android").unwrap();
        h.as_ref()
            .err()
            .filter(|e| e.contains("FCM throttles this app: QUOTA_EXCEEDED"))
            .cloned()
    })
    .await;
    // Several pauses, each of Retry-After (1 s) and the probe's time, each probe throttled.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during: i64 = client
        .query_one(
            "SELECT sum(attempts) FROM pgpushd.outbox WHERE status = 'pending'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    fcm.emulator.clear_scripts();
    wait_for_status(&client, "sent", rows as i64, Duration::from_secs(40)).await;
    daemon.stop().await;
    let limit = pgpushd::service::app_gate::THROTTLED_TARGETS as i64 - 1;
    assert!(
        during <= limit,
        "{during} attempts burned by the quota (at most {limit}: the answers before the pause)"
    );
    let throttled = fcm
        .emulator
        .records()
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Send && r.status == 429)
        .count() as u64;
    // Every row once (all were in flight together at worst), then one probe per pause.
    assert!(throttled <= rows + 10, "{throttled} requests throttled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_access_token_is_renewed_and_the_row_sent_again_once() {
    let (_db, fcm, _providers, daemon, client) = setup(|_| {}).await;
    let token = fcm_token(1);
    fcm.emulator
        .script_once(&token, FcmScript::AccessTokenRefused);
    insert_fcm_rows(&client, 1, 1).await;
    wait_for_status(&client, "sent", 1, Duration::from_secs(20)).await;
    daemon.stop().await;
    assert_eq!(sends(&fcm, &token), vec![401, 200]);
    // Within the one attempt: the refusal was the token's, not the row's.
    assert_eq!(row(&client, &token).await.attempts, 1);
    let grants = fcm
        .emulator
        .records()
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Token && r.status == 200)
        .count();
    assert_eq!(grants, 2);
}

/// Rows wait while Google refuses the app (no attempt counted), `/healthz` and
/// `pgpushd_app_healthy` say why, and they are delivered once it no longer does.
async fn rows_wait_out_a_refusal(
    metrics_port: u16,
    providers: &Providers,
    client: &tokio_postgres::Client,
    fixed: impl FnOnce(),
    why: &str,
) {
    let get =
        |path: &'static str| tokio::task::spawn_blocking(move || http_get(metrics_port, path));
    insert_fcm_rows(client, 1, 20).await;
    let healthz = wait_for(
        "/healthz to name the app",
        Duration::from_secs(20),
        || async {
            let (status, body) = get("/healthz").await.unwrap();
            (status == 503 && body.contains("app android")).then_some(body)
        },
    )
    .await;
    assert!(
        healthz.contains("app android: FCM refuses the credentials: ") && healthz.contains(why),
        "{healthz}"
    );
    let metrics = get("/metrics").await.unwrap().1;
    assert!(
        metrics.contains("pgpushd_app_healthy{app=\"android\"} 0"),
        "{metrics}"
    );
    wait_for("rows deferred", Duration::from_secs(20), || async {
        let r = client
            .query_one(
                "SELECT count(*) FILTER (WHERE last_error LIKE '%' || $1 || '%'),
                        max(attempts), count(*) FILTER (WHERE status <> 'pending')
                   FROM pgpushd.outbox",
                &[&why],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, i32>(1), 0, "an attempt was counted");
        assert_eq!(r.get::<_, i64>(2), 0, "a row settled");
        (r.get::<_, i64>(0) == 20).then_some(())
    })
    .await;
    fixed();
    wait_for_status(client, "sent", 20, Duration::from_secs(30)).await;
    let attempts: i32 = client
        .query_one("SELECT max(attempts) FROM pgpushd.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1);
    assert!(providers.health().iter().all(|(_, h)| h.is_ok()));
    let (status, healthz) = get("/healthz").await.unwrap();
    assert!(!healthz.contains("app android"), "{status} {healthz}");
}

fn metrics_toml(port: u16) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_auth_error_fails_its_row_and_the_app_goes_on() {
    // The project's APNs key (or web push credentials) is missing at Firebase: rows for
    // iOS targets get THIRD_PARTY_AUTH_ERROR, the app's Android rows are fine. Once it
    // closed the app's gate: its iOS rows were resent every few seconds for ever, with no
    // attempt counted, and its Android rows waited with them.
    let port = free_port();
    let (_db, fcm, providers, daemon, client) = setup_with(&metrics_toml(port), |_| {}).await;
    for i in 1..=5 {
        fcm.emulator.script(
            &fcm_token(i),
            FcmScript::Error(ErrorCode::ThirdPartyAuthError),
        );
    }
    insert_fcm_rows(&client, 1, 20).await;
    wait_for("every row settled", Duration::from_secs(20), || async {
        let r = client
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'pending') FROM pgpushd.outbox",
                &[],
            )
            .await
            .unwrap();
        (r.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    for i in 1..=20 {
        let token = fcm_token(i);
        let r = row(&client, &token).await;
        if i <= 5 {
            assert_eq!((r.status.as_str(), r.attempts), ("failed", 1), "{token}");
            let why = r.last_error.unwrap();
            assert!(
                why.starts_with("THIRD_PARTY_AUTH_ERROR")
                    && why.contains("APNs authentication key"),
                "{why}"
            );
            assert_eq!(sends(&fcm, &token), vec![401], "sent once");
        } else {
            assert_eq!(r.status, "sent", "{token}");
        }
    }
    let health = pgpushd::transport::Transport::health(&*providers);
    assert!(health.iter().all(|(_, h)| h.is_ok()), "{health:?}");
    let (_, body) = tokio::task::spawn_blocking(move || http_get(port, "/healthz"))
        .await
        .unwrap();
    assert!(!body.contains("refuses the credentials"), "{body}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_refusing_the_account_makes_the_app_wait_not_the_rows() {
    let port = free_port();
    let (_db, fcm, providers, daemon, client) = setup_with(&metrics_toml(port), |_| {}).await;
    // The next few token requests are refused, as for a deleted key; the app probes
    // (each probe one token request) until one is granted again.
    const REFUSALS: usize = 5;
    for _ in 0..REFUSALS {
        fcm.emulator.refuse_next_grant(OauthError::new(
            400,
            "invalid_grant",
            "Invalid JWT Signature.",
        ));
    }
    rows_wait_out_a_refusal(port, &providers, &client, || {}, "invalid_grant").await;
    daemon.stop().await;
    let token_requests: Vec<u16> = fcm
        .emulator
        .records()
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Token)
        .map(|r| r.status)
        .collect();
    // One request per probe, never one per row: the refusals, then one grant.
    let mut expected = vec![400; REFUSALS];
    expected.push(200);
    assert_eq!(token_requests, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_mid_run_loses_nothing() {
    let (_db, fcm, _providers, daemon, client) = setup(|c| c.goaway_every = Some(40)).await;
    insert_fcm_rows(&client, 1, 400).await;
    wait_for_status(&client, "sent", 400, Duration::from_secs(40)).await;
    daemon.stop().await;
    assert!(
        fcm.emulator.stats().goaways_sent >= 5,
        "{:?}",
        fcm.emulator.stats()
    );
    assert_eq!(count(&client, "failed").await, 0);
}

// ---- configuration -----------------------------------------------------------------

fn pgpushd(args: &[&str]) -> (i32, String) {
    let out = pgpushd_command()
        .args(args)
        .env_remove("PGPUSHD_DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_malformed_or_foreign_key_is_a_config_error() {
    let fcm = FcmSetup::new(|_| {}).await;
    let dir = fcm.dir.path();
    let key_text =
        String::from_utf8(fcm.emulator.service_account_json().unwrap().to_vec()).unwrap();
    let key = dir.join("service-account.json");
    let broken = dir.join("broken.json");
    // Cut inside the private key: the error must name the file, never show the key.
    std::fs::write(&broken, &key_text[..key_text.len() / 2]).unwrap();
    let missing = dir.join("missing.json");
    let project = fcm.emulator.project_id().unwrap();
    let app = |file: &std::path::Path, project_id: Option<&str>| {
        let mut toml = fcm
            .app_toml
            .replace(&key.display().to_string(), &file.display().to_string());
        if let Some(p) = project_id {
            toml.push_str(&format!("project_id = \"{p}\"\n"));
        }
        toml
    };
    let cases = [
        (
            app(&missing, None),
            vec!["missing.json", "cannot read the service-account file"],
        ),
        (
            app(&broken, None),
            vec!["broken.json", "not a service-account key file"],
        ),
        (
            app(&key, Some("another-project")),
            vec!["apps.android.fcm.project_id", "another-project", project],
        ),
    ];
    for (toml, expected) in cases {
        let path = dir.join("pgpushd.toml");
        std::fs::write(
            &path,
            format!("[database]\nurl = \"postgres://nobody@127.0.0.1:1/x\"\n{toml}"),
        )
        .unwrap();
        let path = path.to_str().unwrap();
        for command in ["check-config", "run"] {
            let (code, stderr) = pgpushd(&[command, "--config", path]);
            assert_eq!(code, 78, "{command}: {stderr}");
            for e in &expected {
                assert!(stderr.contains(e), "{command}: {e:?} not in {stderr}");
            }
            assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
            assert!(!stderr.contains("MII"), "{stderr}");
        }
    }
    // The key as it is, with its own project named: fine.
    let path = dir.join("pgpushd.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"postgres://nobody@127.0.0.1:1/x\"\n{}",
            app(&key, Some(project))
        ),
    )
    .unwrap();
    let (code, stderr) = pgpushd(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
}

// ---- the commands --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_pushes_once_to_an_fcm_app() {
    let fcm = FcmSetup::new(|_| {}).await;
    let path = fcm.dir.path().join("pgpushd.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"postgres://nobody@127.0.0.1:1/x\"\n{}",
            fcm.app_toml
        ),
    )
    .unwrap();
    let path = path.to_str().unwrap().to_owned();
    let token = fcm_token(7);
    let out = tokio::task::spawn_blocking({
        let (path, token) = (path.clone(), token.clone());
        move || {
            pgpushd_command()
                .args(["send", "--config", &path, "--app", "android", "--token"])
                .args([&token, "--alert", "hello"])
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let project = fcm.emulator.project_id().unwrap();
    assert!(stdout.starts_with("HTTP 200 (name projects/"), "{stdout}");
    assert!(stdout.contains(project), "{stdout}");
    let sent: Vec<_> = fcm
        .emulator
        .records()
        .iter()
        .filter(|r| r.endpoint == FcmEndpoint::Send)
        .map(|r| (r.token.clone().unwrap(), r.message.clone().unwrap()))
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, token);
    assert_eq!(sent[0].1["notification"]["body"], "hello");

    // FCM's refusal is shown as FCM gave it.
    fcm.emulator
        .script(&token, FcmScript::Error(ErrorCode::SenderIdMismatch));
    let out = tokio::task::spawn_blocking(move || {
        pgpushd_command()
            .args(["send", "--config", &path, "--app", "android", "--token"])
            .args([&token, "--payload", r#"{"data": {"k": "v"}}"#])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("HTTP 403 SENDER_ID_MISMATCH: "),
        "{stdout}"
    );
}

#[test]
fn the_demo_delivers_through_both_providers() {
    let out = pgpushd_command()
        .args(["demo", "--rows", "300", "--provider", "both"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
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
    assert!(
        stdout.contains("delivered 300 of 300") && stdout.contains("emulators accepted 300"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_to_both_providers_or_to_neither() {
    let apns = ApnsSetup::new(|_| {}).await;
    let fcm = FcmSetup::new(|_| {}).await;
    let url = "postgres://nobody@127.0.0.1:1/x";
    let cfg = |apns_toml: &str, fcm_toml: &str| config(url, &format!("{apns_toml}{fcm_toml}"));
    let start_cfg = cfg(&apns.app_toml, &fcm.app_toml);
    let providers = transport(&start_cfg);
    let more_connections = fcm.app_toml.replace("connections = 2", "connections = 3");
    let broken_apns = apns.app_toml.replace("AuthKey.p8", "missing.p8");
    let broken_fcm = fcm.app_toml.replace("service-account.json", "missing.json");

    // FCM's change loads, APNs's app does not: neither is applied.
    let e = providers
        .reload(&cfg(&broken_apns, &more_connections).apps)
        .unwrap_err();
    assert!(e.to_string().contains("apps.default"), "{e}");
    assert_eq!(
        providers.reload(&start_cfg.apps).unwrap(),
        Vec::<String>::new()
    );
    // And the other way round.
    let e = providers
        .reload(
            &cfg(
                &apns.app_toml.replace("connections = 2", "connections = 3"),
                &broken_fcm,
            )
            .apps,
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("apps.android.fcm.service_account_file"),
        "{e}"
    );
    assert_eq!(
        providers.reload(&start_cfg.apps).unwrap(),
        Vec::<String>::new()
    );
    // A good change rebuilds only the app it touches.
    assert_eq!(
        providers
            .reload(&cfg(&apns.app_toml, &more_connections).apps)
            .unwrap(),
        vec!["android".to_owned()]
    );
    // A rotated key under the same path counts as a change.
    let key = fcm.dir.path().join("service-account.json");
    let text = std::fs::read_to_string(&key).unwrap();
    std::fs::write(&key, text.replace("\"type\"", " \"type\"")).unwrap();
    assert_eq!(
        providers
            .reload(&cfg(&apns.app_toml, &more_connections).apps)
            .unwrap(),
        vec!["android".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_fcm_would_refuse_or_with_apns_columns_fail_unsent() {
    let (_db, fcm, _providers, daemon, client) = setup(|_| {}).await;
    // (token, extra columns, payload, last_error must contain)
    let cases = [
        (
            fcm_token(1),
            "priority = 10",
            r#"{"data": {"a": "1"}}"#,
            "android.priority",
        ),
        (
            fcm_token(2),
            "collapse_id = 'c'",
            r#"{"data": {"a": "1"}}"#,
            "android.collapse_key",
        ),
        (
            fcm_token(3),
            "topic = 'com.example'",
            r#"{"data": {"a": "1"}}"#,
            "leave topic NULL",
        ),
        (
            fcm_token(4),
            "push_type = 'voip'",
            r#"{"data": {"a": "1"}}"#,
            "leave it 'alert'",
        ),
        (
            fcm_token(5),
            "send_after = now()",
            r#"{"data": {"a": 1}}"#,
            "data.a must be a string",
        ),
        (
            fcm_token(6),
            "send_after = now()",
            r#"{"notifications": {}}"#,
            "unknown key \"notifications\"",
        ),
    ];
    for (token, column, payload, _) in &cases {
        let (name, value) = column.split_once(" = ").unwrap();
        client
            .execute(
                &format!(
                    "INSERT INTO pgpushd.outbox (app, device_token, payload, {name})
                     VALUES ('android', $1, $2::text::jsonb, {value})"
                ),
                &[token, payload],
            )
            .await
            .unwrap();
    }
    // And one good row, so the app is known to work.
    insert_fcm_rows(&client, 7, 1).await;
    wait_for_status(&client, "failed", 6, Duration::from_secs(20)).await;
    wait_for_status(&client, "sent", 1, Duration::from_secs(20)).await;
    daemon.stop().await;
    for (token, _, _, expected) in &cases {
        let r = row(&client, token).await;
        let error = r.last_error.unwrap();
        assert!(error.contains(expected), "{token}: {error}");
        assert!(sends(&fcm, token).is_empty(), "{token} was sent");
    }
}
