//! Browser rows against push services that misbehave, played by an independent server
//! (`tests/fixtures/webpush_unkind.py`: Python's ssl, asyncio and h2, not our emulator):
//! an HTTP/1.1 service that closes without answering, answers `Connection: close`,
//! cuts its answer short, answers too slowly; an HTTP/2 service sending GOAWAY with
//! streams in flight; a host that accepts TCP and never speaks TLS; a service that
//! refuses or throttles everything. Each row must end as README's table says: never lost,
//! never `sent` without a 201, and other push services' rows unaffected. The emulator
//! plays the well-behaved push service beside them.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpushd::providers::Providers;
use pgpushd::transport::Transport;

use crate::python_server::{localhost_certificate, python_h2, PythonServer};
use crate::support::*;
use crate::webpush::WebpushSetup;
const PAYLOAD: &str = r#"{"body": "hi"}"#;

/// The Python server (`webpush_unkind.py`) in one `--mode`, its event lines read as
/// they come.
struct Unkind(PythonServer);

impl std::ops::Deref for Unkind {
    type Target = PythonServer;
    fn deref(&self) -> &PythonServer {
        &self.0
    }
}

impl Unkind {
    fn start(dir: &std::path::Path, mode: &str, args: &[&str]) -> Unkind {
        let args: Vec<&str> = ["--mode", mode].iter().chain(args).copied().collect();
        Unkind(PythonServer::start(
            "webpush_unkind.py",
            dir,
            "unkind",
            &args,
        ))
    }

    /// A browser's subscription whose endpoint is on this server.
    fn subscription(&self, name: &str) -> String {
        subscription_json(&format!("https://localhost:{}/push/{name}", self.port))
    }

    /// Requests read whole for `/push/{name}`.
    fn requests(&self, name: &str) -> usize {
        let wanted = format!("/push/{name}");
        self.lines()
            .iter()
            .filter(|e| e.starts_with("REQ ") && e.split(' ').nth(2) == Some(&wanted))
            .count()
    }
}

/// A subscription as a browser makes it: a P-256 public key and an auth secret.
fn subscription_json(endpoint: &str) -> String {
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let key = openssl::ec::EcKey::generate(&group).unwrap();
    let mut ctx = openssl::bn::BigNumContext::new().unwrap();
    let public = key
        .public_key()
        .to_bytes(
            &group,
            openssl::ec::PointConversionForm::UNCOMPRESSED,
            &mut ctx,
        )
        .unwrap();
    let auth: [u8; 16] = rand::random();
    let b64 = pgpushd::webpush::base64url::encode;
    format!(
        r#"{{"endpoint":"{endpoint}","expirationTime":null,"keys":{{"p256dh":"{}","auth":"{}"}}}}"#,
        b64(&public),
        b64(&auth)
    )
}

/// The emulator (the well-behaved push service) and `[apps.web]`, whose one `ca_file`
/// trusts both the emulator and the unkind server (its certificate written to the setup's
/// directory).
async fn setup() -> WebpushSetup {
    let web = WebpushSetup::new(|_| {}).await;
    let dir = web.dir.path();
    let ca = localhost_certificate(dir, "unkind", "unkind test CA");
    let mut both = web.emulator.ca_pem().to_vec();
    both.extend_from_slice(ca.cert_pem().as_ref());
    std::fs::write(dir.join("webpush-ca.pem"), both).unwrap();
    web
}

/// A row to the emulator (the well-behaved push service) is sent: the app's key works.
async fn the_key_is_accepted(client: &tokio_postgres::Client, web: &WebpushSetup) {
    let first = insert(client, &[web.subscribe().to_json()]).await[0];
    assert_eq!(
        finished(client, first, Duration::from_secs(10))
            .await
            .status,
        "sent"
    );
}

/// Short timings, as `webpush.rs`'s tests use, connecting within a second; `pause`, the
/// app's pause backoff (the gate's), as long as a test needs it to be seen.
fn providers(cfg: &pgpushd::config::Config, pause: Duration) -> Arc<Providers> {
    let options = pgpushd::providers::Options {
        timings: pgpushd::service::Timings {
            connect_timeout: Duration::from_secs(1),
            pause_backoff_base: pause,
            pause_backoff_max: pause * 2,
            reconnect_base: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    };
    Arc::new(Providers::with_options(&cfg.apps, options).unwrap())
}

/// Inserts rows for `tokens` in one statement (so one batch may claim them all); their
/// ids in order.
async fn insert(client: &tokio_postgres::Client, tokens: &[String]) -> Vec<i64> {
    client
        .query(
            "INSERT INTO pgpushd.outbox (app, device_token, payload)
             SELECT 'web', t, $2::text::jsonb FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n)
             ORDER BY n RETURNING id",
            &[&tokens, &PAYLOAD],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[derive(Debug)]
struct Row {
    status: String,
    attempts: i32,
    last_error: Option<String>,
    location: Option<String>,
}

async fn row(client: &tokio_postgres::Client, id: i64) -> Row {
    let r = client
        .query_one(
            "SELECT status, attempts, last_error, webpush_location FROM pgpushd.outbox
              WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    Row {
        status: r.get(0),
        attempts: r.get(1),
        last_error: r.get(2),
        location: r.get(3),
    }
}

/// Waits until row `id` is no longer pending (sent or failed), within `deadline`.
async fn finished(client: &tokio_postgres::Client, id: i64, deadline: Duration) -> Row {
    wait_for(&format!("row {id} finished"), deadline, || async {
        let r = row(client, id).await;
        (r.status != "pending").then_some(r)
    })
    .await
}

/// A row that failed after `max_attempts` (3 in `support::config`) of unanswered
/// requests: never sent, every attempt counted.
fn failed_unanswered(r: &Row) {
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 3), "{r:?}");
    assert_eq!(r.location, None, "{r:?}");
}

/// The web app's open connections now.
fn open(providers: &Providers) -> usize {
    Transport::open_connections(providers)
        .into_iter()
        .find(|(app, _)| app == "web")
        .map_or(0, |(_, n)| n)
}

/// (a) An HTTP/1.1 service that reads every request and closes without answering: its
/// rows are retried with their attempts counted and fail after `max_attempts`, never
/// sent; a row for the emulator beside them is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_closing_without_an_answer_fails_the_row_after_its_attempts() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let server = Unkind::start(web.dir.path(), "silent-close", &[]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), providers(&cfg, Duration::from_millis(200)));
    let client = db.client().await;

    let good = web.subscribe();
    let ids = insert(
        &client,
        &[
            server.subscription("a"),
            server.subscription("b"),
            good.to_json(),
        ],
    )
    .await;
    for id in &ids[..2] {
        let r = finished(&client, *id, Duration::from_secs(20)).await;
        failed_unanswered(&r);
        assert!(
            r.last_error.as_deref().unwrap().contains("localhost"),
            "{r:?}"
        );
    }
    let r = finished(&client, ids[2], Duration::from_secs(5)).await;
    assert_eq!((r.status.as_str(), r.attempts), ("sent", 1), "{r:?}");
    daemon.stop().await;
}

/// A request the server read whole on a connection just made (the ALPN probe's, the
/// pool's first) is not sent again within the same attempt: the server may have acted
/// on it. Only a kept-alive connection's idle-close race justifies resending. So each
/// attempt of a row is one request to a server that closes without answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_does_not_resend_a_request_read_on_a_fresh_connection() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let server = Unkind::start(web.dir.path(), "silent-close", &[]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), providers(&cfg, Duration::from_millis(200)));
    let client = db.client().await;

    let id = insert(&client, &[server.subscription("once")]).await[0];
    let r = finished(&client, id, Duration::from_secs(20)).await;
    daemon.stop().await;
    failed_unanswered(&r);
    assert_eq!(
        server.requests("once"),
        r.attempts as usize,
        "requests the push service read whole, for {} attempts: {:?}",
        r.attempts,
        *server.lines()
    );
}

/// A service that completes the TLS handshake and closes at once, every time: each
/// attempt is a bounded number of connections (no reconnecting loop within one send),
/// and the row fails after its attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_a_service_closing_after_the_handshake_costs_bounded_connections() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let server = Unkind::start(web.dir.path(), "accept-close", &[]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), providers(&cfg, Duration::from_millis(200)));
    let client = db.client().await;

    let id = insert(&client, &[server.subscription("x")]).await[0];
    let r = finished(&client, id, Duration::from_secs(20)).await;
    daemon.stop().await;
    failed_unanswered(&r);
    let opened = server.count("OPEN ");
    assert!(
        opened <= 2 * r.attempts as usize,
        "{opened} connections for {} attempts",
        r.attempts
    );
}

/// (b) `Connection: close` after every answer: every row sent once, a connection for
/// each, and none left counted open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connection_close_sends_every_row_once_on_a_connection_each() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let server = Unkind::start(web.dir.path(), "conn-close", &[]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let providers = providers(&cfg, Duration::from_millis(200));
    let daemon = start(cfg.clone(), providers.clone());
    let client = db.client().await;

    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let tokens: Vec<String> = names.iter().map(|n| server.subscription(n)).collect();
    let ids = insert(&client, &tokens).await;
    for id in &ids {
        let r = finished(&client, *id, Duration::from_secs(10)).await;
        assert_eq!((r.status.as_str(), r.attempts), ("sent", 1), "{r:?}");
        assert!(r.location.unwrap().starts_with("https://push.example/m/"));
    }
    for name in &names {
        assert_eq!(server.requests(name), 1, "{name}");
    }
    assert_eq!(server.count("OPEN "), 6, "one connection per answer");
    wait_for(
        "no connection counted open",
        Duration::from_secs(5),
        || async { (open(&providers) == 0).then_some(()) },
    )
    .await;
    daemon.stop().await;
}

/// (c) An answer cut short. Cut in its head: no answer, so the row is retried (attempts
/// counted) and fails, never sent. Cut in its body after a whole 201 head: the status is
/// the answer (as the HTTP/2 client reads a cut body), so the row is sent, with its
/// Location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_an_answer_cut_in_its_head_retries_cut_in_its_body_keeps_the_status() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let heads = Unkind::start(web.dir.path(), "cut-headers", &[]);
    let bodies = Unkind::start(web.dir.path(), "cut-body", &[]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), providers(&cfg, Duration::from_millis(200)));
    let client = db.client().await;

    let ids = insert(
        &client,
        &[heads.subscription("head"), bodies.subscription("body")],
    )
    .await;
    let r = finished(&client, ids[0], Duration::from_secs(20)).await;
    failed_unanswered(&r);
    let r = finished(&client, ids[1], Duration::from_secs(10)).await;
    assert_eq!((r.status.as_str(), r.attempts), ("sent", 1), "{r:?}");
    assert_eq!(r.location.as_deref(), Some("https://push.example/m/1"));
    daemon.stop().await;
}

/// (d) A service answering after `request_timeout` (the whole answer late, or its head on
/// time and its body late: the timeout covers the whole exchange): its rows are retried
/// with their attempts counted and fail, never sent; the emulator's rows beside them go
/// out at once; the app never has more connections open than `connections` per service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_answers_past_the_request_timeout_are_retries_and_hold_up_no_other_service() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let slow = Unkind::start(web.dir.path(), "slow", &["--latency", "6"]);
    let slow_body = Unkind::start(web.dir.path(), "slow-body", &["--latency", "6"]);
    let db = TestDb::new().await;
    let toml = web
        .app_toml
        .replace("request_timeout = \"5s\"", "request_timeout = \"3s\"");
    let cfg = config(&db.url, &toml);
    let providers = providers(&cfg, Duration::from_millis(200));
    let daemon = start(cfg.clone(), providers.clone());
    let client = db.client().await;

    let slow_ids = insert(
        &client,
        &[
            slow.subscription("s1"),
            slow.subscription("s2"),
            slow_body.subscription("b1"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::SystemTime::now();
    let good: Vec<String> = (0..5).map(|_| web.subscribe().to_json()).collect();
    insert(&client, &good).await;
    let records = wait_for("the emulator's pushes", Duration::from_secs(10), || async {
        let r = web.emulator.records();
        (r.iter().filter(|r| r.status == 201).count() == 5).then_some(r)
    })
    .await;
    let took = records
        .iter()
        .map(|r| r.at)
        .max()
        .unwrap()
        .duration_since(started)
        .unwrap();
    assert!(
        took < Duration::from_millis(2500),
        "the emulator's rows took {took:?}: they waited for the slow service (request_timeout 3s)"
    );
    // Sampled while the slow services' rows come and go: one connection per service at
    // most (the emulator's HTTP/2 one, one to each slow service).
    let mut most = 0;
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut rows = Vec::new();
    while Instant::now() < give_up {
        most = most.max(open(&providers));
        rows.clear();
        for id in &slow_ids {
            rows.push(row(&client, *id).await);
        }
        if rows.iter().all(|r| r.status != "pending") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in &rows {
        failed_unanswered(r);
        assert!(
            r.last_error
                .as_deref()
                .unwrap()
                .contains("no answer within"),
            "{r:?}"
        );
    }
    assert!(most <= 3, "{most} connections open at once");
    daemon.stop().await;
}

/// (e) An HTTP/2 service (Python's h2) that sends a graceful GOAWAY after every third
/// request on a connection, with more streams in flight: the streams up to its
/// last-stream-id are answered, the others were never processed and go out again on a
/// new connection. Every row is sent, and the service processed each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_goaway_with_streams_in_flight_sends_every_row_exactly_once() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let server = Unkind::start(web.dir.path(), "h2-goaway", &["--goaway-after", "3"]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), providers(&cfg, Duration::from_millis(200)));
    let client = db.client().await;

    let names: Vec<String> = (0..12).map(|i| format!("g{i}")).collect();
    let tokens: Vec<String> = names.iter().map(|n| server.subscription(n)).collect();
    let ids = insert(&client, &tokens).await;
    for id in &ids {
        let r = finished(&client, *id, Duration::from_secs(20)).await;
        assert_eq!(r.status, "sent", "{r:?}");
        assert!(r.location.is_some(), "{r:?}");
    }
    daemon.stop().await;
    for name in &names {
        assert_eq!(server.requests(name), 1, "{name} processed more than once");
    }
    assert!(
        server.count("OPEN ") >= 4,
        "GOAWAY after 3 requests: 12 rows need 4 connections"
    );
}

/// A host that accepts TCP and never speaks TLS (a black hole behind a load balancer):
/// its rows' connection attempts each wait `connect_timeout`, but not one after another:
/// every row of the batch has its attempt counted within about one `connect_timeout`,
/// and the emulator's row in the same batch is recorded sent as soon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_for_a_black_hole_do_not_wait_for_each_others_connection_attempts() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let hole = Unkind::start(web.dir.path(), "tarpit", &[]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let daemon = start(cfg.clone(), providers(&cfg, Duration::from_millis(200)));
    let client = db.client().await;

    let mut tokens: Vec<String> = (0..6)
        .map(|i| hole.subscription(&format!("h{i}")))
        .collect();
    tokens.push(web.subscribe().to_json());
    let started = Instant::now();
    let ids = insert(&client, &tokens).await;
    // connect_timeout is 1 s: each row's first attempt is over by about then.
    let waited = wait_for(
        "an attempt counted for every black-holed row",
        Duration::from_secs(15),
        || async {
            for id in &ids[..6] {
                if row(&client, *id).await.attempts == 0 {
                    return None;
                }
            }
            Some(started.elapsed())
        },
    )
    .await;
    let good = row(&client, ids[6]).await;
    daemon.stop().await;
    assert!(
        waited < Duration::from_millis(2500),
        "6 rows to one unreachable push service took {waited:?} to get their first \
         attempt (connect_timeout 1s): their connection attempts ran one after another"
    );
    assert_eq!(good.status, "sent", "{good:?}");
}

/// A push service that refuses the app's VAPID token (401) for every row, as one run by
/// anyone who can store a subscription could: it is that service's rows' trouble, not
/// the app's; another push service's rows go out meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_service_refusing_the_vapid_token_does_not_pause_the_others() {
    one_push_service_refusing_does_not_pause_the_others(&["--status", "401"], 3).await;
}

/// The same for a push service throttling (429) subscription after subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_service_throttling_every_row_does_not_pause_the_others() {
    one_push_service_refusing_does_not_pause_the_others(
        &["--status", "429", "--retry-after", "30"],
        pgpushd::service::app_gate::THROTTLED_TARGETS,
    )
    .await;
}

async fn one_push_service_refusing_does_not_pause_the_others(args: &[&str], rows: usize) {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let refusing = Unkind::start(web.dir.path(), "status", args);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    // A pause long enough to be seen (the default is 10 s).
    let providers = providers(&cfg, Duration::from_secs(10));
    let daemon = start(cfg.clone(), providers.clone());
    let client = db.client().await;

    // The emulator proves the app's key first.
    the_key_is_accepted(&client, &web).await;

    let tokens: Vec<String> = (0..rows)
        .map(|i| refusing.subscription(&format!("r{i}")))
        .collect();
    insert(&client, &tokens).await;
    wait_for(
        "the refusing service's answers",
        Duration::from_secs(10),
        || async { (refusing.count("ANSWERED ") >= rows.min(3)).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused: Vec<String> = Transport::paused(&*providers)
        .iter()
        .map(|p| format!("{p:?}"))
        .collect();
    eprintln!("paused after the refusing service's answers: {paused:?}");

    let id = insert(&client, &[web.subscribe().to_json()]).await[0];
    let started = Instant::now();
    let mut r = row(&client, id).await;
    while r.status == "pending" && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = row(&client, id).await;
    }
    daemon.stop().await;
    assert_eq!(
        r.status,
        "sent",
        "a row for a well-behaved push service still {r:?} after {:?}: the app was paused \
         for another push service's answers ({paused:?})",
        started.elapsed()
    );
}

/// A push service refusing the app's VAPID token for every row is paused on its own, and
/// its backlog is set aside as a paused app's is (README, "A paused app"): parked, one
/// row at a time probing it, while the app's rows for other push services, due now or
/// later, are neither held up nor moved. Once it accepts again, its rows are due at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_push_services_backlog_is_set_aside_and_comes_back_once_it_accepts() {
    if !python_h2() {
        return;
    }
    let web = setup().await;
    let mut refusing = Unkind::start(web.dir.path(), "status", &["--status", "401"]);
    let db = TestDb::new().await;
    let cfg = config(&db.url, &web.app_toml);
    let providers = providers(&cfg, Duration::from_secs(1));
    let daemon = start(cfg.clone(), providers.clone());
    let client = db.client().await;
    // Every write of the refusing service's rows, counted by a trigger of the test's.
    client
        .batch_execute(&format!(
            "CREATE TABLE refused_writes (id bigint NOT NULL);
             CREATE FUNCTION count_refused_write() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO refused_writes VALUES (NEW.id); RETURN NEW; END $$;
             CREATE TRIGGER count_refused_writes AFTER UPDATE ON pgpushd.outbox
                FOR EACH ROW WHEN (strpos(NEW.device_token, 'localhost:{}/') > 0)
                EXECUTE FUNCTION count_refused_write();",
            refusing.port
        ))
        .await
        .unwrap();

    // The emulator proves the app's key first.
    the_key_is_accepted(&client, &web).await;
    // The emulator's rows due in two minutes: another push service's, never moved.
    let later: Vec<i64> = client
        .query(
            "INSERT INTO pgpushd.outbox (app, device_token, payload, send_after)
             SELECT 'web', t, '{}', now() + interval '2 minutes' FROM unnest($1::text[]) AS t
             RETURNING id",
            &[&(0..20)
                .map(|_| web.subscribe().to_json())
                .collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    const ROWS: i64 = 200;
    let tokens: Vec<String> = (0..ROWS)
        .map(|i| refusing.subscription(&format!("r{i}")))
        .collect();
    let ids = insert(&client, &tokens).await;
    // How many of `ids` are as `condition` says.
    let count_of = |ids: Vec<i64>, condition: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    &format!(
                        "SELECT count(*) FROM pgpushd.outbox WHERE id = ANY ($1) AND ({condition})"
                    ),
                    &[&ids],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let parked = || {
        count_of(
            ids.clone(),
            "status = 'pending' AND attempts = 0 AND send_after > now() + interval '30 minutes'",
        )
    };
    // All but the probe's, and a few a batch held at a pause's parking (the next pause
    // parks those).
    wait_for(
        "the refusing service's rows parked",
        Duration::from_secs(20),
        || async { (parked().await >= ROWS - 5).then_some(()) },
    )
    .await;
    // Meanwhile the other push service's rows go on: due now, sent; due later, unmoved.
    let now = insert(&client, &[web.subscribe().to_json()]).await[0];
    assert_eq!(
        finished(&client, now, Duration::from_secs(5)).await.status,
        "sent"
    );
    let moved = count_of(
        later,
        "status <> 'pending' OR send_after > now() + interval '3 minutes'",
    )
    .await;
    assert_eq!(moved, 0, "the other push service's later rows were moved");

    // It accepts again: its probe is accepted, and its backlog comes back.
    writeln!(refusing.0.stdin, "status 201").unwrap();
    refusing.0.stdin.flush().unwrap();
    let sent = || count_of(ids.clone(), "status = 'sent'");
    wait_for(
        "the refusing service's rows sent once it accepts",
        Duration::from_secs(20),
        || async { (sent().await == ROWS).then_some(()) },
    )
    .await;
    let metrics = daemon.metrics.clone();
    daemon.stop().await;
    let pauses = metrics
        .app_pauses
        .get_or_create(&pgpushd::metrics::AppLabels { app: "web".into() })
        .get() as i64;
    let (most, over): (i64, i64) = {
        let r = client
            .query_one(
                "SELECT coalesce(max(n), 0), count(*) FILTER (WHERE n > 4)
                   FROM (SELECT count(*) AS n FROM refused_writes GROUP BY id) w",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    eprintln!(
        "{pauses} pauses; a refused row written at most {most} times, {over} rows more than 4"
    );
    assert!(pauses >= 1, "no pause set aside");
    // A row: deferred by the gate (its first batch), parked, released, sent. At most
    // twice more per pause: a probe row is made due and deferred; a row a batch held at a
    // pause's parking is deferred to that pause's end, and parked at the next.
    assert!(
        most <= 2 * pauses + 4,
        "a row written {most} times in {pauses} pauses"
    );
}
