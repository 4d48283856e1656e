//! The Web Push emulator end to end through its public API. The pushes are encrypted and
//! VAPID-signed by an independent sender, Python's pywebpush (with http_ece and
//! py_vapid; `pip install pywebpush`), and sent by it over HTTP/1.1 (requests), or by an
//! h2 client here over HTTP/2. Without pywebpush those tests say SKIPPED (and fail under
//! CI=true). TLS is verified against the emulator's CA throughout.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request};
use openssl::ec::{EcGroup, EcKey, PointConversionForm};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use pgpushd_emulator::webpush::{
    Subscription, WebPushEmulator, WebPushEmulatorConfig, WebPushScript,
};

use crate::http2::now_secs;

/// The sender: pywebpush encrypts (aes128gcm), py_vapid signs, requests sends.
/// Reads a JSON job on standard input; prints the answer (or, with mode "prepare", the
/// request it would send) as JSON, header names in lower case. Exits 3 when a module is
/// missing.
const SENDER: &str = r#"
import base64, json, sys
try:
    import requests
    from pywebpush import WebPusher, webpush, WebPushException
    from py_vapid import Vapid02
except ImportError as e:
    print(json.dumps({"missing": str(e)}))
    sys.exit(3)
job = json.load(sys.stdin)
sub = json.loads(job["subscription"])
data = base64.b64decode(job["data_b64"])
vapid = Vapid02.from_pem(job["vapid_pem"].encode())
session = requests.Session()
session.verify = job["ca"]
if job["mode"] == "webpush":
    try:
        r = webpush(sub, data=data, vapid_private_key=vapid,
                    vapid_claims=dict(job["claims"]), ttl=job.get("ttl", 0),
                    requests_session=session)
    except WebPushException as e:
        r = e.response
else:
    body = WebPusher(sub).encode(data, "aes128gcm")["body"]
    headers = {"Content-Encoding": "aes128gcm", "TTL": str(job.get("ttl", 60))}
    headers.update(vapid.sign(dict(job["claims"])))
    headers.update(job.get("headers", {}))
    for name in job.get("drop", []):
        headers.pop(name, None)
    if job["mode"] == "prepare":
        print(json.dumps({"headers": headers, "body": base64.b64encode(body).decode()}))
        sys.exit(0)
    r = session.post(sub["endpoint"], data=body, headers=headers, timeout=10)
headers = {k.lower(): v for k, v in r.headers.items()}
print(json.dumps({"status": r.status_code, "headers": headers, "body": r.text}))
"#;

/// Whether python3 can import pywebpush; if not, the test is skipped (failed under CI).
async fn have_pywebpush() -> bool {
    let found = tokio::process::Command::new("python3")
        .args(["-c", "import pywebpush, py_vapid, http_ece, requests"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !found {
        crate::skip_without("python3 with pywebpush (pip install pywebpush)");
    }
    found
}

/// An application server's VAPID key pair.
struct AppServer {
    key: PKey<Private>,
}

impl AppServer {
    fn new() -> AppServer {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        AppServer {
            key: PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap(),
        }
    }
    /// The 65-byte public key, as `applicationServerKey`.
    fn public(&self) -> Vec<u8> {
        let ec = self.key.ec_key().unwrap();
        let mut ctx = openssl::bn::BigNumContext::new().unwrap();
        ec.public_key()
            .to_bytes(ec.group(), PointConversionForm::UNCOMPRESSED, &mut ctx)
            .unwrap()
    }
    fn pem(&self) -> String {
        String::from_utf8(self.key.private_key_to_pem_pkcs8().unwrap()).unwrap()
    }
}

/// A push for pywebpush to make (and send, or hand back).
struct Job<'a> {
    mode: &'a str,
    subscription: String,
    data: Vec<u8>,
    claims: Value,
    ttl: u64,
    headers: Value,
    drop: Vec<&'a str>,
}

impl<'a> Job<'a> {
    fn new(mode: &'a str, subscription: &Subscription, data: &[u8]) -> Job<'a> {
        Job {
            mode,
            subscription: subscription.to_json(),
            data: data.to_vec(),
            claims: json!({"sub": "mailto:ops@example.com", "aud": origin(subscription)}),
            ttl: 60,
            headers: json!({}),
            drop: Vec::new(),
        }
    }

    /// Runs the sender; its JSON output.
    async fn run(&self, app: &AppServer, ca: &Path) -> Value {
        let job = json!({
            "mode": self.mode,
            "subscription": self.subscription,
            "data_b64": STANDARD.encode(&self.data),
            "vapid_pem": app.pem(),
            "claims": self.claims,
            "ttl": self.ttl,
            "headers": self.headers,
            "drop": self.drop,
            "ca": ca,
        });
        // requests lets REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE) in the environment override
        // a session's `verify`: both name the emulator's CA too.
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", SENDER])
            .env("REQUESTS_CA_BUNDLE", ca)
            .env("CURL_CA_BUNDLE", ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(job.to_string().as_bytes()).await.unwrap();
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the sender ran over a minute")
            .unwrap();
        assert!(
            out.status.success(),
            "the sender failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The origin of a subscription's endpoint: VAPID's `aud`.
fn origin(subscription: &Subscription) -> String {
    let (origin, _) = subscription.endpoint.split_once("/push/").unwrap();
    origin.to_owned()
}

/// An emulator writing its CA to a temporary directory (pywebpush's requests reads it
/// from a file).
async fn start(config: WebPushEmulatorConfig) -> (WebPushEmulator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let emulator = WebPushEmulator::start(WebPushEmulatorConfig {
        tls_dir: Some(dir.path().join("tls")),
        ..config
    })
    .await
    .unwrap();
    (emulator, dir)
}

fn ca(emulator: &WebPushEmulator) -> &Path {
    emulator.ca_path().unwrap()
}

/// A TLS connection to the emulator offering `alpn`.
async fn tls(
    emulator: &WebPushEmulator,
    alpn: &[&str],
) -> anyhow::Result<tokio_native_tls::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(emulator.addr()).await?;
    let mut tls = native_tls::TlsConnector::builder();
    tls.add_root_certificate(native_tls::Certificate::from_pem(emulator.ca_pem())?);
    tls.request_alpns(alpn);
    Ok(tokio_native_tls::TlsConnector::from(tls.build()?)
        .connect("127.0.0.1", tcp)
        .await?)
}

/// Sends one request over HTTP/2; status, headers, body.
async fn h2_post(
    emulator: &WebPushEmulator,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let tls = tls(emulator, &["h2"]).await.unwrap();
    assert_eq!(
        tls.get_ref().negotiated_alpn().unwrap().as_deref(),
        Some(&b"h2"[..])
    );
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", emulator.endpoint()));
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let (response, mut stream) = send.send_request(request.body(()).unwrap(), false).unwrap();
    stream.send_data(Bytes::from(body), true).unwrap();
    let (head, mut body) = response.await.unwrap().into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    driver.abort();
    (head.status.as_u16(), head.headers, bytes)
}

/// `POST path` over HTTP/1.1 offering `alpn` (none: no ALPN at all); the raw response.
async fn http1_post(emulator: &WebPushEmulator, alpn: &[&str], path: &str, body: &str) -> String {
    let mut tls = tls(emulator, alpn).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        emulator.addr(),
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn a_pywebpush_push_over_http1_is_decrypted_byte_for_byte() {
    if !have_pywebpush().await {
        return;
    }
    let (emulator, _dir) = start(WebPushEmulatorConfig {
        http1_only: true,
        ..Default::default()
    })
    .await;
    let app = AppServer::new();
    let subscription = emulator.subscribe(Some(&app.public())).unwrap();
    let text = r#"{"title":"Grüße","body":"When I grow up, I want to be a watermelon 🍉"}"#;
    let mut job = Job::new("webpush", &subscription, text.as_bytes());
    job.ttl = 3600;
    let answer = job.run(&app, ca(&emulator)).await;
    assert_eq!(answer["status"], 201, "{answer}");
    let location = answer["headers"]["location"].as_str().unwrap();
    let prefix = format!("{}/message/", emulator.endpoint());
    assert!(location.starts_with(&prefix), "{location}");
    assert!(uuid::Uuid::parse_str(&location[prefix.len()..]).is_ok());
    let records = emulator.records();
    let record = records.last().unwrap();
    assert_eq!(record.status, 201);
    assert_eq!(record.http_version, "1.1");
    assert_eq!(record.plaintext.as_deref(), Some(text.as_bytes()));
    assert_eq!(record.text.as_deref(), Some(text));
    assert_eq!(record.plaintext_json().unwrap()["title"], "Grüße");
    assert_eq!(
        record.subscription.as_deref(),
        Some(subscription.id.as_str())
    );
    assert_eq!(record.ttl, Some(3600));
    assert_eq!(
        record.vapid_subject.as_deref(),
        Some("mailto:ops@example.com")
    );
    assert_eq!(
        record.vapid_key.as_deref(),
        Some(URL_SAFE_NO_PAD.encode(app.public()).as_str())
    );
    assert_eq!(record.location.as_deref(), Some(location));

    // Bytes that are not UTF-8 come through too.
    let binary: Vec<u8> = (0..=255).collect();
    let answer = Job::new("webpush", &subscription, &binary)
        .run(&app, ca(&emulator))
        .await;
    assert_eq!(answer["status"], 201, "{answer}");
    let record = emulator.records().last().unwrap().clone();
    assert_eq!(record.plaintext.as_deref(), Some(binary.as_slice()));
    assert_eq!(record.text, None);
    assert_eq!(emulator.stats().count(201), 2);
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_pywebpush_push_over_http2_is_accepted() {
    if !have_pywebpush().await {
        return;
    }
    let (emulator, _dir) = start(WebPushEmulatorConfig::default()).await;
    let app = AppServer::new();
    let subscription = emulator.subscribe(None).unwrap();
    let mut job = Job::new("prepare", &subscription, b"over h2");
    job.headers = json!({"Urgency": "high", "Topic": "news-1"});
    let prepared = job.run(&app, ca(&emulator)).await;
    let headers: Vec<(String, String)> = prepared["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap().to_owned()))
        .collect();
    let body = STANDARD.decode(prepared["body"].as_str().unwrap()).unwrap();
    let path = format!("/push/{}", subscription.id);
    let (status, answer, text) = h2_post(&emulator, &path, &headers, body).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&text));
    assert_eq!(answer["ttl"], "60");
    assert!(answer["location"].to_str().unwrap().contains("/message/"));
    let record = emulator.records().last().unwrap().clone();
    assert_eq!(record.http_version, "2");
    assert_eq!(record.plaintext.as_deref(), Some(&b"over h2"[..]));
    assert_eq!(record.urgency.as_deref(), Some("high"));
    assert_eq!(record.topic.as_deref(), Some("news-1"));
    // The same push offered over HTTP/1.1 to the same emulator is accepted as well.
    let answer = Job::new("webpush", &subscription, b"over 1.1")
        .run(&app, ca(&emulator))
        .await;
    assert_eq!(answer["status"], 201, "{answer}");
    assert_eq!(emulator.records().last().unwrap().http_version, "1.1");
    emulator.shutdown().await;
}

#[tokio::test]
async fn refusals_name_their_problem() {
    if !have_pywebpush().await {
        return;
    }
    let (emulator, _dir) = start(WebPushEmulatorConfig {
        gone: vec!["expired-one".to_owned()],
        ..Default::default()
    })
    .await;
    let app = AppServer::new();
    let subscription = emulator.subscribe(Some(&app.public())).unwrap();
    let ca = ca(&emulator).to_owned();
    let send = |job: Job<'static>| {
        let (app, ca) = (&app, ca.clone());
        async move { job.run(app, &ca).await }
    };
    let message = |answer: &Value| -> String {
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        body["message"].as_str().unwrap().to_owned()
    };

    // Unknown and gone subscriptions.
    let mut job = Job::new("manual", &subscription, b"hi");
    job.subscription = job
        .subscription
        .replace(&subscription.id, "0123456789abcdef0123456789abcdef");
    let answer = send(job).await;
    assert_eq!(answer["status"], 404, "{answer}");
    let mut job = Job::new("manual", &subscription, b"hi");
    job.subscription = job.subscription.replace(&subscription.id, "expired-one");
    assert_eq!(send(job).await["status"], 410);

    // Another application server's key: 403.
    let other = AppServer::new();
    let answer = Job::new("manual", &subscription, b"hi")
        .run(&other, &ca)
        .await;
    assert_eq!(answer["status"], 403, "{answer}");

    // A wrong audience and an expired token: 401.
    let mut job = Job::new("manual", &subscription, b"hi");
    // py_vapid refuses to sign an aud with a path, so another origin (the same server
    // by name) stands for a wrong one.
    let by_name = format!("https://localhost:{}", emulator.addr().port());
    job.claims = json!({"sub": "mailto:ops@example.com", "aud": by_name});
    let answer = send(job).await;
    assert_eq!(answer["status"], 401, "{answer}");
    assert!(message(&answer).contains("aud"), "{answer}");
    assert_eq!(answer["headers"]["www-authenticate"], "vapid");
    let mut job = Job::new("manual", &subscription, b"hi");
    job.claims = json!({
        "sub": "mailto:ops@example.com",
        "aud": emulator.endpoint(),
        "exp": now_secs() - 60,
    });
    let answer = send(job).await;
    assert_eq!(answer["status"], 401, "{answer}");
    assert!(message(&answer).contains("expired"), "{answer}");

    // No TTL: 400.
    let mut job = Job::new("manual", &subscription, b"hi");
    job.drop = vec!["TTL"];
    let answer = send(job).await;
    assert_eq!(answer["status"], 400, "{answer}");
    assert!(message(&answer).contains("TTL"), "{answer}");

    // A bad Urgency: 400; another content coding: 415.
    let mut job = Job::new("manual", &subscription, b"hi");
    job.headers = json!({"Urgency": "urgent"});
    assert_eq!(send(job).await["status"], 400);
    let mut job = Job::new("manual", &subscription, b"hi");
    job.headers = json!({"Content-Encoding": "aesgcm"});
    assert_eq!(send(job).await["status"], 415);

    // Too large a body: 413.
    let answer = send(Job::new("manual", &subscription, &[b'x'; 4100])).await;
    assert_eq!(answer["status"], 413, "{answer}");

    let records = emulator.records();
    let statuses: Vec<u16> = records.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [404, 410, 403, 401, 401, 400, 400, 415, 413]);
    assert!(records.iter().all(|r| r.plaintext.is_none()));
    let stats = emulator.stats();
    assert_eq!((stats.count(401), stats.count(201)), (2, 0));
    emulator.shutdown().await;
}

#[tokio::test]
async fn scripted_answers_and_unsubscribing() {
    if !have_pywebpush().await {
        return;
    }
    let (emulator, _dir) = start(WebPushEmulatorConfig::default()).await;
    let app = AppServer::new();
    let subscription = emulator.subscribe(None).unwrap();
    let push = || Job::new("webpush", &subscription, b"hello");

    emulator.script_once(
        &subscription.id,
        WebPushScript::status(429).retry_after(Duration::from_secs(30)),
    );
    let answer = push().run(&app, ca(&emulator)).await;
    assert_eq!(answer["status"], 429, "{answer}");
    assert_eq!(answer["headers"]["retry-after"], "30");
    let record = emulator.records().last().unwrap().clone();
    assert_eq!((record.status, record.retry_after), (429, Some(30)));
    // The message was still opened: the record shows what was refused.
    assert_eq!(record.plaintext.as_deref(), Some(&b"hello"[..]));
    // Once only.
    assert_eq!(push().run(&app, ca(&emulator)).await["status"], 201);

    emulator.script_all(WebPushScript::status(503));
    assert_eq!(push().run(&app, ca(&emulator)).await["status"], 503);
    emulator.script(&subscription.id, WebPushScript::status(201));
    assert_eq!(push().run(&app, ca(&emulator)).await["status"], 201);
    emulator.clear_scripts();

    assert!(emulator.unsubscribe(&subscription.id));
    assert_eq!(push().run(&app, ca(&emulator)).await["status"], 410);
    emulator.shutdown().await;
}

#[tokio::test]
async fn subscriptions_over_http_and_at_start() {
    let (emulator, dir) = start(WebPushEmulatorConfig {
        subscriptions: 3,
        ..Default::default()
    })
    .await;
    let file = dir.path().join("tls").join("subscriptions.jsonl");
    assert_eq!(emulator.subscriptions_path(), Some(file.as_path()));
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, made) in lines.iter().zip(emulator.initial_subscriptions()) {
        assert_eq!(line["endpoint"], made.endpoint);
        assert!(line["expirationTime"].is_null());
        let id = made.endpoint.rsplit('/').next().unwrap();
        assert!(emulator.subscription(id).is_some());
    }

    // POST /subscribe over HTTP/1.1 (no ALPN at all), bound to a key.
    let app = AppServer::new();
    let body = json!({"applicationServerKey": URL_SAFE_NO_PAD.encode(app.public())});
    let response = http1_post(&emulator, &[], "/subscribe", &body.to_string()).await;
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let json: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let endpoint = json["endpoint"].as_str().unwrap();
    let made = emulator
        .subscription(endpoint.rsplit('/').next().unwrap())
        .unwrap();
    assert_eq!(
        made.application_server_key.as_deref(),
        Some(app.public().as_slice())
    );
    assert_eq!(
        json["keys"]["auth"],
        URL_SAFE_NO_PAD.encode(made.auth_secret)
    );

    // And over HTTP/2, unbound; a bad key is refused.
    let (status, _, body) = h2_post(&emulator, "/subscribe", &[], Vec::new()).await;
    assert_eq!(status, 201);
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert!(json["endpoint"]
        .as_str()
        .unwrap()
        .starts_with(&emulator.endpoint()));
    let bad = json!({"applicationServerKey": "AQID"}).to_string();
    let response = http1_post(&emulator, &["http/1.1"], "/subscribe", &bad).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    // A push to nowhere, without credentials: 404 before anything else.
    let response = http1_post(&emulator, &["http/1.1"], "/push/nope", "").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    // With no credentials: 401.
    let id = &emulator.initial_subscriptions()[0].id;
    let response = http1_post(&emulator, &["http/1.1"], &format!("/push/{id}"), "").await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    emulator.shutdown().await;
}

#[tokio::test]
async fn alpn_chooses_the_protocol() {
    let (http1, _dir1) = start(WebPushEmulatorConfig {
        http1_only: true,
        ..Default::default()
    })
    .await;
    // A client offering only h2 cannot connect to an HTTP/1.1-only origin.
    assert!(tls(&http1, &["h2"]).await.is_err());
    let both = tls(&http1, &["h2", "http/1.1"]).await.unwrap();
    assert_eq!(
        both.get_ref().negotiated_alpn().unwrap().as_deref(),
        Some(&b"http/1.1"[..])
    );
    let (http2, _dir2) = start(WebPushEmulatorConfig {
        http2_only: true,
        ..Default::default()
    })
    .await;
    assert!(tls(&http2, &["http/1.1"]).await.is_err());
    let (status, _, _) = h2_post(&http2, "/subscribe", &[], Vec::new()).await;
    assert_eq!(status, 201);
    http1.shutdown().await;
    http2.shutdown().await;
}

#[tokio::test]
async fn http1_connections_are_kept_alive_until_told_to_go() {
    let (emulator, _dir) = start(WebPushEmulatorConfig {
        goaway_every: Some(2),
        ..Default::default()
    })
    .await;
    let mut tls = tls(&emulator, &["http/1.1"]).await.unwrap();
    let request = format!(
        "POST /subscribe HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
        emulator.addr()
    );
    // Two requests on one connection, then the emulator closes it.
    let mut all = String::new();
    for _ in 0..2 {
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0; 4096];
        let n = tls.read(&mut buf).await.unwrap();
        all.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(all.matches("HTTP/1.1 201").count(), 2, "{all}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stayed open");
    let stats = emulator.stats();
    assert_eq!((stats.connections_accepted, stats.goaways_sent), (1, 1));
    emulator.shutdown().await;
}
