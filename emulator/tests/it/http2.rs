//! The HTTP/2 emulator end to end through its public API, driven by a real HTTP/2
//! client over native-tls that trusts the emulator's CA (verification on, ALPN `h2`), as
//! a provider connects. Provider tokens are signed here, by the test, as a client would.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use openssl::ecdsa::EcdsaSig;
use openssl::pkey::PKey;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use pgpushd_emulator::tls::{CertificateAuthority, Issued};
use pgpushd_emulator::{jwt, reason, validate, Emulator, EmulatorAuth, EmulatorConfig};

const TOPIC: &str = "com.example.app";
const ID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

fn token(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A provider token (ES256 JWT) signed with the `.p8` key `p8`, as a provider makes one.
pub(crate) fn sign(p8: &[u8], key_id: &str, team_id: &str, iat: u64) -> String {
    let key = PKey::private_key_from_pem(p8).unwrap().ec_key().unwrap();
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{key_id}"}}"#));
    let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"{team_id}","iat":{iat}}}"#));
    let input = format!("{header}.{claims}");
    let sig = EcdsaSig::sign(&openssl::sha::sha256(input.as_bytes()), &key).unwrap();
    let mut raw = sig.r().to_vec_padded(32).unwrap();
    raw.extend(sig.s().to_vec_padded(32).unwrap());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw))
}

fn open_config() -> EmulatorConfig {
    EmulatorConfig {
        topic: Some(TOPIC.into()),
        ..EmulatorConfig::default()
    }
}

/// Waits for `check` to give a value, polling, for at most ten seconds.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request, valid for an open emulator serving [`TOPIC`] unless changed.
#[derive(Clone)]
struct Req {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

fn req(device: &str) -> Req {
    Req {
        method: Method::POST,
        path: format!("/3/device/{device}"),
        headers: vec![("apns-topic".into(), TOPIC.into())],
        body: Bytes::from_static(br#"{"aps":{"alert":"hello"}}"#),
    }
}

impl Req {
    /// Sets `name` (replacing it), or adds a second one with `also`.
    fn header(mut self, name: &str, value: impl Into<String>) -> Req {
        self.headers.retain(|(n, _)| n != name);
        self.also(name, value)
    }
    fn also(mut self, name: &str, value: impl Into<String>) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }
    fn without(mut self, name: &str) -> Req {
        self.headers.retain(|(n, _)| n != name);
        self
    }
    fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = body.into();
        self
    }
    fn method(mut self, method: Method) -> Req {
        self.method = method;
        self
    }
    fn path(mut self, path: &str) -> Req {
        self.path = path.into();
        self
    }
    fn bearer(self, jwt: &str) -> Req {
        self.header("authorization", format!("bearer {jwt}"))
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    apns_id: Option<String>,
    /// `Null` when empty.
    body: serde_json::Value,
}

impl Reply {
    fn reason(&self) -> Option<&str> {
        self.body.get("reason").and_then(|r| r.as_str())
    }
    fn outcome(&self) -> (u16, Option<&str>) {
        (self.status, self.reason())
    }
}

struct Client {
    send: h2::client::SendRequest<Bytes>,
    /// The stream limit the server advertised, as the client sees it.
    limit: watch::Receiver<usize>,
    ping: h2::PingPong,
    driver: JoinHandle<Result<(), h2::Error>>,
}

fn tls_connector(
    ca_pem: &[u8],
    identity: Option<native_tls::Identity>,
    alpn: bool,
) -> tokio_native_tls::TlsConnector {
    let mut builder = native_tls::TlsConnector::builder();
    builder.add_root_certificate(native_tls::Certificate::from_pem(ca_pem).unwrap());
    if alpn {
        builder.request_alpns(&["h2"]);
    }
    if let Some(identity) = identity {
        builder.identity(identity);
    }
    builder.build().unwrap().into()
}

async fn connect(emulator: &Emulator) -> anyhow::Result<Client> {
    connect_with(emulator, None, "127.0.0.1").await
}

async fn connect_with(
    emulator: &Emulator,
    identity: Option<native_tls::Identity>,
    server_name: &str,
) -> anyhow::Result<Client> {
    connect_to(emulator.addr(), emulator.ca_pem(), identity, server_name).await
}

async fn connect_to(
    addr: std::net::SocketAddr,
    ca_pem: &[u8],
    identity: Option<native_tls::Identity>,
    server_name: &str,
) -> anyhow::Result<Client> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tls_connector(ca_pem, identity, true)
        .connect(server_name, tcp)
        .await?;
    anyhow::ensure!(tls.get_ref().negotiated_alpn()?.as_deref() == Some(b"h2".as_slice()));
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake(tls)
        .await?;
    let ping = conn.ping_pong().unwrap();
    let (limit_tx, limit) = watch::channel(0);
    let driver = tokio::spawn(async move {
        let mut conn = pin!(conn);
        poll_fn(|cx| {
            let polled = conn.as_mut().poll(cx);
            limit_tx.send_replace(conn.max_concurrent_send_streams());
            polled
        })
        .await
    });
    Ok(Client {
        send,
        limit,
        ping,
        driver,
    })
}

impl Client {
    /// Sends `req` now; the answer is awaited through the returned future.
    async fn start(
        &mut self,
        req: Req,
    ) -> anyhow::Result<impl Future<Output = anyhow::Result<Reply>>> {
        let mut request = Request::builder()
            .method(req.method)
            .uri(format!("https://127.0.0.1{}", req.path));
        let headers = request.headers_mut().unwrap();
        for (name, value) in &req.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let request = request.body(())?;
        self.send = self.send.clone().ready().await?;
        let (response, mut body) = self.send.send_request(request, req.body.is_empty())?;
        if !req.body.is_empty() {
            body.send_data(req.body, true)?;
        }
        Ok(async move {
            let response = response.await?;
            let status = response.status().as_u16();
            let apns_id = response
                .headers()
                .get("apns-id")
                .map(|v| v.to_str().unwrap().to_owned());
            let mut stream = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.data().await {
                let chunk = chunk?;
                let _ = stream.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            let body = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes)?
            };
            Ok(Reply {
                status,
                apns_id,
                body,
            })
        })
    }

    async fn post(&mut self, req: Req) -> anyhow::Result<Reply> {
        self.start(req).await?.await
    }
}

#[tokio::test]
async fn a_valid_request_is_accepted_and_its_apns_id_echoed() {
    let emulator = Emulator::start(open_config()).await.unwrap();
    let mut client = connect(&emulator).await.unwrap();

    let reply = client
        .post(req(&token(1)).header("apns-id", ID))
        .await
        .unwrap();
    assert_eq!((reply.status, reply.apns_id.as_deref()), (200, Some(ID)));
    assert_eq!(reply.body, serde_json::Value::Null);

    let reply = client.post(req(&token(2))).await.unwrap();
    assert_eq!(reply.status, 200);
    let made_up = reply.apns_id.unwrap();
    assert!(validate::is_canonical_uuid(made_up.as_bytes()), "{made_up}");

    let records = emulator.records();
    assert_eq!(records.len(), 2);
    let first = &records[0];
    assert_eq!((first.status, first.apns_id.as_str()), (200, ID));
    assert_eq!(first.device_token, token(1));
    assert_eq!(first.topic.as_deref(), Some(TOPIC));
    assert_eq!(first.payload_json().unwrap()["aps"]["alert"], "hello");
    assert_eq!(records[1].apns_id, made_up);
    let stats = emulator.stats();
    assert_eq!((stats.requests, stats.count(200)), (2, 2));
    assert_eq!((stats.connections_accepted, stats.connections_open), (1, 1));
    emulator.shutdown().await;
}

#[tokio::test]
async fn every_validation_rule_answers_apples_status_and_reason() {
    let emulator = Emulator::start(open_config()).await.unwrap();
    let mut client = connect(&emulator).await.unwrap();
    let t = token(7);
    let big = |n: usize| format!(r#"{{"a":"{}"}}"#, "x".repeat(n - 8));
    let cases: Vec<(&str, Req, u16, &str)> = vec![
        ("path", req(&t).path("/3/devices/ab"), 404, "BadPath"),
        (
            "method",
            req(&t).method(Method::PUT),
            405,
            "MethodNotAllowed",
        ),
        ("no token", req(""), 400, "MissingDeviceToken"),
        ("short token", req("abcd"), 400, "BadDeviceToken"),
        ("odd token", req(&t[1..]), 400, "BadDeviceToken"),
        (
            "push type",
            req(&t).header("apns-push-type", "loud"),
            400,
            "InvalidPushType",
        ),
        (
            "voip topic",
            req(&t).header("apns-push-type", "voip"),
            400,
            "InvalidPushType",
        ),
        (
            "topic",
            req(&t).header("apns-topic", "com.other"),
            400,
            "DeviceTokenNotForTopic",
        ),
        (
            "bad topic",
            req(&t).header("apns-topic", "a b"),
            400,
            "BadTopic",
        ),
        (
            "priority",
            req(&t).header("apns-priority", "7"),
            400,
            "BadPriority",
        ),
        (
            "background 10",
            req(&t)
                .header("apns-push-type", "background")
                .header("apns-priority", "10"),
            400,
            "BadPriority",
        ),
        (
            "expiration",
            req(&t).header("apns-expiration", "tomorrow"),
            400,
            "BadExpirationDate",
        ),
        (
            "collapse",
            req(&t).header("apns-collapse-id", "c".repeat(65)),
            400,
            "BadCollapseId",
        ),
        (
            "apns-id",
            req(&t).header("apns-id", "42"),
            400,
            "BadMessageId",
        ),
        (
            "repeated",
            req(&t).also("apns-topic", TOPIC),
            400,
            "DuplicateHeaders",
        ),
        ("empty", req(&t).body(""), 400, "PayloadEmpty"),
        ("array", req(&t).body("[1,2]"), 400, "PayloadEmpty"),
        ("large", req(&t).body(big(4097)), 413, "PayloadTooLarge"),
        (
            "large voip",
            req(&t)
                .header("apns-push-type", "voip")
                .header("apns-topic", format!("{TOPIC}.voip"))
                .body(big(5121)),
            413,
            "PayloadTooLarge",
        ),
    ];
    for (what, request, status, reason) in cases {
        let reply = client.post(request).await.unwrap();
        assert_eq!(reply.outcome(), (status, Some(reason)), "{what}");
        let id = reply.apns_id.unwrap_or_default();
        assert!(
            validate::is_canonical_uuid(id.as_bytes()),
            "{what}: apns-id {id:?}"
        );
    }
    let voip = req(&t)
        .header("apns-push-type", "voip")
        .header("apns-topic", format!("{TOPIC}.voip"))
        .body(big(5120));
    assert_eq!(client.post(voip).await.unwrap().status, 200);
    assert_eq!(emulator.stats().count(400), 15);
    emulator.shutdown().await;
}

struct TokenSetup {
    p8: Vec<u8>,
    emulator: Emulator,
}

async fn token_emulator(max_streams: u32) -> TokenSetup {
    let p8 = jwt::generate_signing_key().unwrap();
    let emulator = Emulator::start(EmulatorConfig {
        auth: EmulatorAuth::Token {
            public_key_pem: p8.clone(),
            key_id: "KEYID12345".into(),
            team_id: "TEAMID1234".into(),
        },
        max_streams,
        ..open_config()
    })
    .await
    .unwrap();
    TokenSetup { p8, emulator }
}

#[tokio::test]
async fn provider_tokens_are_verified() {
    let TokenSetup { p8, emulator } = token_emulator(1000).await;
    let now = now_secs();
    let good = sign(&p8, "KEYID12345", "TEAMID1234", now - 1500);
    let other_key = jwt::generate_signing_key().unwrap();
    let t = token(3);
    let mut client = connect(&emulator).await.unwrap();

    let refused: Vec<(&str, Req, u16, &str)> = vec![
        ("missing", req(&t), 403, "MissingProviderToken"),
        (
            "not bearer",
            req(&t).header("authorization", good.clone()),
            403,
            "InvalidProviderToken",
        ),
        (
            "garbage",
            req(&t).bearer("a.b.c"),
            403,
            "InvalidProviderToken",
        ),
        (
            "another key",
            req(&t).bearer(&sign(&other_key, "KEYID12345", "TEAMID1234", now)),
            403,
            "InvalidProviderToken",
        ),
        (
            "kid",
            req(&t).bearer(&sign(&p8, "OTHERKEY12", "TEAMID1234", now)),
            403,
            "InvalidProviderToken",
        ),
        (
            "iss",
            req(&t).bearer(&sign(&p8, "KEYID12345", "OTHERTEAM1", now)),
            403,
            "InvalidProviderToken",
        ),
        (
            "an hour old",
            req(&t).bearer(&sign(&p8, "KEYID12345", "TEAMID1234", now - 3700)),
            403,
            "ExpiredProviderToken",
        ),
        (
            "no topic",
            req(&t).bearer(&good).without("apns-topic"),
            400,
            "MissingTopic",
        ),
    ];
    for (what, request, status, reason) in refused {
        let reply = client.post(request).await.unwrap();
        assert_eq!(reply.outcome(), (status, Some(reason)), "{what}");
    }
    assert_eq!(
        client.post(req(&t).bearer(&good)).await.unwrap().status,
        200
    );
    // A new token 10 minutes after the previous one: too soon.
    let soon = sign(&p8, "KEYID12345", "TEAMID1234", now - 900);
    let reply = client.post(req(&t).bearer(&soon)).await.unwrap();
    assert_eq!(reply.outcome(), (429, Some("TooManyProviderTokenUpdates")));
    // 25 minutes after: accepted.
    let later = sign(&p8, "KEYID12345", "TEAMID1234", now);
    assert_eq!(
        client.post(req(&t).bearer(&later)).await.unwrap().status,
        200
    );
    // The rule is per connection: a restarted client may start with a new token.
    let mut second = connect(&emulator).await.unwrap();
    let fresh = sign(&p8, "KEYID12345", "TEAMID1234", now - 300);
    assert_eq!(
        second.post(req(&t).bearer(&fresh)).await.unwrap().status,
        200
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn token_auth_starts_at_one_stream_and_raises_the_limit_after_a_success() {
    let TokenSetup { p8, emulator } = token_emulator(500).await;
    let jwt = sign(&p8, "KEYID12345", "TEAMID1234", now_secs());
    let mut client = connect(&emulator).await.unwrap();
    client.limit.wait_for(|l| *l == 1).await.unwrap();

    // A failure does not raise it.
    let reply = client.post(req(&token(1))).await.unwrap();
    assert_eq!(reply.outcome(), (403, Some("MissingProviderToken")));
    assert_eq!(*client.limit.borrow(), 1);

    assert_eq!(
        client
            .post(req(&token(1)).bearer(&jwt))
            .await
            .unwrap()
            .status,
        200
    );
    client.limit.wait_for(|l| *l == 500).await.unwrap();
    let mut answers = Vec::new();
    for i in 0..300 {
        answers.push(
            client
                .start(req(&token(i as u8)).bearer(&jwt))
                .await
                .unwrap(),
        );
    }
    for answer in answers {
        assert_eq!(answer.await.unwrap().status, 200);
    }
    assert!(!client.driver.is_finished(), "the connection failed");
    let stats = emulator.stats();
    assert_eq!((stats.count(200), stats.streams_refused), (301, 0));

    // Without token auth the full limit applies from the start.
    let open = Emulator::start(EmulatorConfig {
        max_streams: 7,
        ..open_config()
    })
    .await
    .unwrap();
    let mut client = connect(&open).await.unwrap();
    client.limit.wait_for(|l| *l == 7).await.unwrap();
    assert_eq!(client.post(req(&token(1))).await.unwrap().status, 200);
    open.shutdown().await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn streams_beyond_the_initial_limit_are_refused_not_failed() {
    let TokenSetup { p8, emulator } = token_emulator(100).await;
    let jwt = sign(&p8, "KEYID12345", "TEAMID1234", now_secs());
    let mut client = connect(&emulator).await.unwrap();
    // Keeps the first stream open while the others arrive.
    emulator.set_latency(Duration::from_millis(200));
    // Sent without yielding to the connection task (this runtime has one thread), so
    // before the client has read the server's SETTINGS and while it assumes no limit:
    // the server refuses what exceeds its limit of 1, unprocessed.
    let mut answers = Vec::new();
    for i in 0..5 {
        answers.push(client.start(req(&token(i)).bearer(&jwt)).await.unwrap());
    }
    let mut refused = 0;
    for answer in answers {
        match answer.await {
            Ok(reply) => assert_eq!(reply.status, 200),
            Err(error) => {
                let reason = error
                    .downcast_ref::<h2::Error>()
                    .and_then(h2::Error::reason);
                assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM), "{error:#}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 4);
    let stats = emulator.stats();
    assert_eq!(
        (stats.streams_refused, stats.count(200)),
        (refused, 5 - refused)
    );
    assert_eq!(
        client
            .post(req(&token(9)).bearer(&jwt))
            .await
            .unwrap()
            .status,
        200
    );
    assert!(!client.driver.is_finished());
    emulator.shutdown().await;
}

#[tokio::test]
async fn client_certificates_from_the_configured_ca_only() {
    let ca = CertificateAuthority::generate("provider CA").unwrap();
    let emulator = Emulator::start(EmulatorConfig {
        auth: EmulatorAuth::ClientCertificate {
            ca_pem: ca.cert_pem(),
        },
        ..open_config()
    })
    .await
    .unwrap();
    let identity = |issued: Issued| {
        native_tls::Identity::from_pkcs8(&issued.cert_pem, &issued.key_pem).unwrap()
    };

    let good = identity(ca.issue_client("provider").unwrap());
    let mut client = connect_with(&emulator, Some(good), "127.0.0.1")
        .await
        .unwrap();
    // No topic needed: the certificate's applies.
    assert_eq!(
        client
            .post(req(&token(1)).without("apns-topic"))
            .await
            .unwrap()
            .status,
        200
    );
    let reply = client
        .post(req(&token(1)).header("apns-topic", "com.other"))
        .await
        .unwrap();
    assert_eq!(reply.outcome(), (400, Some("TopicDisallowed")));

    let stranger = CertificateAuthority::generate("someone else").unwrap();
    let strangers = identity(stranger.issue_client("provider").unwrap());
    for (what, identity) in [("no certificate", None), ("another CA", Some(strangers))] {
        // With TLS 1.3 the client may finish its handshake before the server refuses the
        // certificate: the failure then shows on the first request.
        let outcome = async {
            let mut client = connect_with(&emulator, identity, "127.0.0.1").await?;
            client.post(req(&token(1))).await
        };
        assert!(outcome.await.is_err(), "{what}: accepted");
    }
    eventually("both handshakes refused", || {
        (emulator.stats().handshakes_failed == 2).then_some(())
    })
    .await;
    assert_eq!(emulator.stats().count(200), 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn scripted_answers_and_token_lists() {
    let emulator = Emulator::start(EmulatorConfig {
        unregistered: vec![token(1).to_uppercase()],
        bad_tokens: vec![token(2)],
        ..open_config()
    })
    .await
    .unwrap();
    let started_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut client = connect(&emulator).await.unwrap();

    let gone = client.post(req(&token(1))).await.unwrap();
    assert_eq!(gone.outcome(), (410, Some("Unregistered")));
    let at = gone.body["timestamp"]
        .as_u64()
        .expect("a numeric timestamp");
    assert!(
        at.abs_diff(started_ms) < 60_000,
        "timestamp {at} is ms since the epoch"
    );
    let bad = client.post(req(&token(2))).await.unwrap();
    assert_eq!(bad.outcome(), (400, Some("BadDeviceToken")));

    let t = token(3);
    for (status, reason) in reason::ALL.iter().copied().chain([(400, "SomethingNew")]) {
        emulator.script(&t, status, reason);
        let reply = client.post(req(&t)).await.unwrap();
        assert_eq!(reply.outcome(), (status, Some(reason)));
        assert_eq!(
            reply.body.get("timestamp").is_some(),
            status == 410,
            "{reason}"
        );
    }
    // Validation still comes first.
    let reply = client
        .post(req(&t).header("apns-priority", "3"))
        .await
        .unwrap();
    assert_eq!(reply.outcome(), (400, Some("BadPriority")));
    emulator.script(&t, 200, "");
    assert_eq!(client.post(req(&t)).await.unwrap().status, 200);
    emulator.script(&t, 503, "Shutdown");
    emulator.clear_scripts();
    assert_eq!(client.post(req(&t)).await.unwrap().status, 200);
    emulator.shutdown().await;
}

#[tokio::test]
async fn answers_scripted_once_answer_one_request_each() {
    let emulator = Emulator::start(open_config()).await.unwrap();
    let mut client = connect(&emulator).await.unwrap();
    let t = token(4);
    emulator.script(&t, 500, "InternalServerError");
    emulator.script_once(&t, 403, "ExpiredProviderToken");
    emulator.script_once(&t, 410, "Unregistered");
    let first = client.post(req(&t)).await.unwrap();
    assert_eq!(first.outcome(), (403, Some("ExpiredProviderToken")));
    let second = client.post(req(&t)).await.unwrap();
    assert_eq!(second.outcome(), (410, Some("Unregistered")));
    assert!(second.body["timestamp"].is_u64());
    // Then the standing script again, and other tokens are not affected.
    let third = client.post(req(&t)).await.unwrap();
    assert_eq!(third.outcome(), (500, Some("InternalServerError")));
    assert_eq!(client.post(req(&token(5))).await.unwrap().status, 200);
    // Validation still comes first, and does not use up the answer.
    emulator.clear_scripts();
    emulator.script_once(&t, 503, "ServiceUnavailable");
    let invalid = client
        .post(req(&t).header("apns-priority", "3"))
        .await
        .unwrap();
    assert_eq!(invalid.outcome(), (400, Some("BadPriority")));
    let scripted = client.post(req(&t)).await.unwrap();
    assert_eq!(scripted.outcome(), (503, Some("ServiceUnavailable")));
    assert_eq!(client.post(req(&t)).await.unwrap().status, 200);
    emulator.shutdown().await;
}

#[tokio::test]
async fn error_rate_answers_random_server_errors() {
    let emulator = Emulator::start(EmulatorConfig {
        error_rate: 1.0,
        ..open_config()
    })
    .await
    .unwrap();
    let mut client = connect(&emulator).await.unwrap();
    for _ in 0..30 {
        let reply = client.post(req(&token(1))).await.unwrap();
        let expected = match reply.status {
            429 => "TooManyRequests",
            500 => "InternalServerError",
            503 => "ServiceUnavailable",
            other => panic!("status {other}"),
        };
        assert_eq!(reply.reason(), Some(expected));
    }
    // Invalid requests still get their own answer.
    let reply = client.post(req("zz")).await.unwrap();
    assert_eq!(reply.outcome(), (400, Some("BadDeviceToken")));
    emulator.set_error_rate(0.0);
    assert_eq!(client.post(req(&token(1))).await.unwrap().status, 200);
    assert!(Emulator::start(EmulatorConfig {
        error_rate: 1.5,
        ..open_config()
    })
    .await
    .is_err());
    emulator.shutdown().await;
}

#[tokio::test]
async fn latency_holds_one_stream_not_the_others_and_dropping_ends_it() {
    let emulator = Emulator::start(open_config()).await.unwrap();
    let mut client = connect(&emulator).await.unwrap();
    emulator.set_latency(Duration::from_secs(3600));
    let slow = client.start(req(&token(1))).await.unwrap();
    eventually("the slow request in flight", || {
        (emulator.stats().requests_in_flight == 1).then_some(())
    })
    .await;
    emulator.set_latency(Duration::ZERO);
    assert_eq!(client.post(req(&token(2))).await.unwrap().status, 200);
    assert_eq!(emulator.stats().requests_in_flight, 1);

    emulator.drop_connections();
    assert!(
        slow.await.is_err(),
        "answered despite the dropped connection"
    );
    assert!(client.driver.await.unwrap().is_err() || client.send.clone().ready().await.is_err());
    eventually("the connection closed", || {
        (emulator.stats().connections_open == 0).then_some(())
    })
    .await;
    let stats = emulator.stats();
    assert_eq!((stats.requests_in_flight, stats.streams_abandoned), (0, 1));
    // New connections are not affected.
    let mut again = connect(&emulator).await.unwrap();
    assert_eq!(again.post(req(&token(3))).await.unwrap().status, 200);
    emulator.shutdown().await;
}

#[tokio::test]
async fn goaway_after_every_n_requests() {
    let emulator = Emulator::start(EmulatorConfig {
        goaway_every: Some(3),
        ..open_config()
    })
    .await
    .unwrap();
    let mut client = connect(&emulator).await.unwrap();
    for i in 0..3 {
        assert_eq!(client.post(req(&token(i))).await.unwrap().status, 200);
    }
    // The server closes the connection once its streams are answered.
    (&mut client.driver).await.unwrap().unwrap();
    assert!(client.post(req(&token(4))).await.is_err());
    let mut second = connect(&emulator).await.unwrap();
    assert_eq!(second.post(req(&token(5))).await.unwrap().status, 200);
    let connections: Vec<u64> = emulator.records().iter().map(|r| r.connection).collect();
    assert_eq!(connections, [1, 1, 1, 2]);
    assert_eq!(emulator.stats().goaways_sent, 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn goaway_all_still_answers_streams_already_sent() {
    let emulator = Emulator::start(open_config()).await.unwrap();
    let mut client = connect(&emulator).await.unwrap();
    assert_eq!(client.post(req(&token(1))).await.unwrap().status, 200);
    emulator.stall(true);
    let sent_before = client.start(req(&token(2))).await.unwrap();
    emulator.goaway_all();
    emulator.stall(false);
    let reply = sent_before.await.unwrap();
    assert_eq!(reply.status, 200);
    (&mut client.driver).await.unwrap().unwrap();
    assert!(client.post(req(&token(3))).await.is_err());
    assert_eq!(emulator.stats().goaways_sent, 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn stall_stops_ping_replies_and_answers() {
    let emulator = Emulator::start(open_config()).await.unwrap();
    let mut client = connect(&emulator).await.unwrap();
    client.ping.ping(h2::Ping::opaque()).await.unwrap();

    emulator.stall(true);
    let stalled_request = client.start(req(&token(1))).await.unwrap();
    let mut pong = pin!(client.ping.ping(h2::Ping::opaque()));
    // Proving an absence needs some wait; this one bounds nothing that should happen.
    let waited = tokio::time::timeout(Duration::from_millis(300), &mut pong).await;
    assert!(waited.is_err(), "PING answered while stalled");

    emulator.stall(false);
    pong.await.unwrap();
    assert_eq!(stalled_request.await.unwrap().status, 200);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_record_file_gets_a_json_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("requests.jsonl");
    let emulator = Emulator::start(EmulatorConfig {
        record: Some(path.clone()),
        unregistered: vec![token(9)],
        keep_records: 0,
        ..open_config()
    })
    .await
    .unwrap();
    let mut client = connect(&emulator).await.unwrap();
    let first = req(&token(1))
        .header("apns-id", ID)
        .header("apns-push-type", "background")
        .header("apns-priority", "5")
        .header("apns-expiration", "1700000000")
        .header("apns-collapse-id", "group")
        .body(r#"{"aps":{"content-available":1}}"#);
    assert_eq!(client.post(first).await.unwrap().status, 200);
    assert_eq!(client.post(req("nothex")).await.unwrap().status, 400);
    assert_eq!(client.post(req(&token(9))).await.unwrap().status, 410);
    emulator.shutdown().await;

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let first = &lines[0];
    assert_eq!(first["apns_id"], ID);
    assert_eq!(first["device_token"], token(1));
    assert_eq!(first["topic"], TOPIC);
    assert_eq!(first["push_type"], "background");
    assert_eq!(
        (first["priority"].as_u64(), first["expiration"].as_u64()),
        (Some(5), Some(1_700_000_000))
    );
    assert_eq!(first["collapse_id"], "group");
    assert_eq!(
        first["payload"],
        serde_json::json!({"aps": {"content-available": 1}})
    );
    assert_eq!(
        (first["status"].as_u64(), &first["reason"]),
        (Some(200), &serde_json::Value::Null)
    );
    assert!(first["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        (lines[1]["status"].as_u64(), lines[1]["reason"].as_str()),
        (Some(400), Some("BadDeviceToken"))
    );
    assert_eq!(lines[2]["reason"], "Unregistered");
}

#[tokio::test]
async fn subscribers_see_every_answer() {
    let emulator = Emulator::start(EmulatorConfig {
        keep_records: 0,
        ..open_config()
    })
    .await
    .unwrap();
    let mut records = emulator.subscribe();
    let mut client = connect(&emulator).await.unwrap();
    let mut answers = Vec::new();
    for i in 0..200 {
        answers.push(client.start(req(&token(i as u8))).await.unwrap());
    }
    for answer in answers {
        assert_eq!(answer.await.unwrap().status, 200);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        seen.insert(records.recv().await.unwrap().device_token.clone());
    }
    assert_eq!(seen.len(), 200);
    assert!(emulator.records().is_empty());
    emulator.shutdown().await;
}

#[tokio::test]
async fn certificates_cover_localhost_and_tls_dir_holds_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = Emulator::start(EmulatorConfig {
        tls_dir: Some(dir.path().to_owned()),
        ..open_config()
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).unwrap(),
        emulator.ca_pem()
    );
    assert_eq!(
        emulator.endpoint(),
        format!("https://127.0.0.1:{}", emulator.addr().port())
    );
    let mut by_name = connect_with(&emulator, None, "localhost").await.unwrap();
    assert_eq!(by_name.post(req(&token(1))).await.unwrap().status, 200);

    // A name the certificate does not carry fails verification.
    let tcp = TcpStream::connect(emulator.addr()).await.unwrap();
    let wrong_name = tls_connector(emulator.ca_pem(), None, true)
        .connect("example.com", tcp)
        .await;
    assert!(wrong_name.is_err());
    // So does a client that does not offer HTTP/2.
    let tcp = TcpStream::connect(emulator.addr()).await.unwrap();
    let no_alpn = async {
        let tls = tls_connector(emulator.ca_pem(), None, false)
            .connect("127.0.0.1", tcp)
            .await?;
        let (send, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut send = send.ready().await?;
        let request = Request::post("https://127.0.0.1/3/device/00").body(())?;
        send.send_request(request, true)?.0.await?;
        anyhow::Ok(())
    };
    assert!(no_alpn.await.is_err());
    emulator.shutdown().await;
}

/// Requests per second one emulator core answers; run in release:
/// `cargo test --release -p pgpushd-emulator --test it http2::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn throughput() {
    const CONNECTIONS: usize = 4;
    const IN_FLIGHT: usize = 1000;
    const REQUESTS: usize = 400_000;
    let stop = tokio_util::sync::CancellationToken::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let emulator = Emulator::start(EmulatorConfig {
                    keep_records: 0,
                    ..open_config()
                })
                .await
                .unwrap();
                ready_tx
                    .send((emulator.addr(), emulator.ca_pem().to_vec()))
                    .unwrap();
                stop.cancelled().await;
                let stats = emulator.stats();
                emulator.shutdown().await;
                stats
            })
        })
    };
    let (addr, ca_pem) = ready_rx.recv().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let elapsed = runtime.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            clients.push(connect_to(addr, &ca_pem, None, "127.0.0.1").await.unwrap());
        }
        let started = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                tokio::spawn(async move {
                    let mut answers = futures::stream::FuturesUnordered::new();
                    let mut sent = 0;
                    let per_connection = REQUESTS / CONNECTIONS;
                    while sent < per_connection || !answers.is_empty() {
                        while sent < per_connection && answers.len() < IN_FLIGHT {
                            answers.push(client.start(req(&token(sent as u8))).await.unwrap());
                            sent += 1;
                        }
                        let reply = futures::StreamExt::next(&mut answers).await.unwrap();
                        assert_eq!(reply.unwrap().status, 200);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        started.elapsed()
    });
    stop.cancel();
    let stats = server.join().unwrap();
    assert_eq!(stats.count(200), REQUESTS as u64);
    println!(
        "{REQUESTS} requests over {CONNECTIONS} connections in {elapsed:?}: {:.0} requests/s",
        REQUESTS as f64 / elapsed.as_secs_f64()
    );
}
