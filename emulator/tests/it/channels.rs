//! Broadcast channels end to end: the channel management API on the emulator's
//! channels listener and broadcasts on its push listener, driven by an HTTP/2 client
//! written here from Apple's "Sending channel management requests to APNs" and "Sending
//! broadcast push notification requests to APNs" (native-tls trusting the emulator's CA,
//! ALPN `h2`), and once by curl.

use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use pgpushd_emulator::tls::CertificateAuthority;
use pgpushd_emulator::{jwt, validate, Emulator, EmulatorAuth, EmulatorConfig};

use crate::http2::{now_secs, sign};

const BUNDLE: &str = "com.example.app";
const CHANNELS: &str = "/1/apps/com.example.app/channels";
const ALL_CHANNELS: &str = "/1/apps/com.example.app/all-channels";
const BROADCAST: &str = "/4/broadcasts/apps/com.example.app";
const REQUEST_ID: &str = "123e4567-e89b-12d3-a456-4266554400a0";
const UPDATE: &str =
    r#"{"aps":{"timestamp":1700000000,"event":"update","content-state":{"score":"1-0"}}}"#;

fn config() -> EmulatorConfig {
    EmulatorConfig {
        topic: Some(BUNDLE.into()),
        channels_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..EmulatorConfig::default()
    }
}

/// One request, as Apple's pages show them.
#[derive(Clone)]
struct Call {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

fn call(method: Method, path: &str) -> Call {
    Call {
        method,
        path: path.into(),
        headers: Vec::new(),
        body: Bytes::new(),
    }
}

/// `POST .../channels` with Apple's example body.
fn create(policy: u8) -> Call {
    call(Method::POST, CHANNELS)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"message-storage-policy": {policy}, "push-type": "LiveActivity"}}"#
        ))
}

fn read(id: &str) -> Call {
    call(Method::GET, CHANNELS).header("apns-channel-id", id)
}

fn delete(id: &str) -> Call {
    call(Method::DELETE, CHANNELS).header("apns-channel-id", id)
}

/// A valid broadcast to channel `id`, to be sent on the push listener.
fn broadcast(id: &str) -> Call {
    call(Method::POST, BROADCAST)
        .header("apns-channel-id", id)
        .header("apns-push-type", "liveactivity")
        .header("apns-priority", "10")
        .header("apns-expiration", "0")
        .body(UPDATE)
}

impl Call {
    fn header(mut self, name: &str, value: impl Into<String>) -> Call {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.into(), value.into()));
        self
    }
    fn without(mut self, name: &str) -> Call {
        self.headers.retain(|(n, _)| n != name);
        self
    }
    fn body(mut self, body: impl Into<Bytes>) -> Call {
        self.body = body.into();
        self
    }
    fn path(mut self, path: &str) -> Call {
        self.path = path.into();
        self
    }
    fn method(mut self, method: Method) -> Call {
        self.method = method;
        self
    }
    fn bearer(self, jwt: &str) -> Call {
        self.header("authorization", format!("bearer {jwt}"))
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    /// `Null` when empty.
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
    fn outcome(&self) -> (u16, Option<&str>) {
        (self.status, self.body.get("reason").and_then(Value::as_str))
    }
    /// Every answer carries a UUID `apns-request-id`; every JSON body is labelled so.
    fn check_common(&self) {
        let id = self.header("apns-request-id").expect("apns-request-id");
        assert!(validate::is_canonical_uuid(id.as_bytes()), "{id}");
        if !self.body.is_null() {
            assert_eq!(self.header("content-type"), Some("application/json"));
        }
    }
}

struct Client {
    send: h2::client::SendRequest<Bytes>,
}

async fn connect(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<native_tls::Identity>,
) -> anyhow::Result<Client> {
    let mut builder = native_tls::TlsConnector::builder();
    builder.add_root_certificate(native_tls::Certificate::from_pem(ca_pem)?);
    builder.request_alpns(&["h2"]);
    if let Some(identity) = identity {
        builder.identity(identity);
    }
    let connector = tokio_native_tls::TlsConnector::from(builder.build()?);
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector.connect("127.0.0.1", tcp).await?;
    anyhow::ensure!(tls.get_ref().negotiated_alpn()?.as_deref() == Some(b"h2".as_slice()));
    let (send, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(conn);
    Ok(Client { send })
}

async fn management(emulator: &Emulator) -> Client {
    let addr = emulator.channels_addr().expect("a channels listener");
    connect(addr, emulator.ca_pem(), None).await.unwrap()
}

async fn pushes(emulator: &Emulator) -> Client {
    connect(emulator.addr(), emulator.ca_pem(), None)
        .await
        .unwrap()
}

impl Client {
    async fn send(&mut self, call: Call) -> anyhow::Result<Answer> {
        let answer = self.send_unchecked(call).await?;
        answer.check_common();
        Ok(answer)
    }

    /// Without [`Answer::check_common`]: for a device push's answer.
    async fn send_unchecked(&mut self, call: Call) -> anyhow::Result<Answer> {
        let mut request = Request::builder()
            .method(call.method)
            .uri(format!("https://127.0.0.1{}", call.path));
        let headers = request.headers_mut().unwrap();
        for (name, value) in &call.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        self.send = self.send.clone().ready().await?;
        let (response, mut body) = self
            .send
            .send_request(request.body(())?, call.body.is_empty())?;
        if !call.body.is_empty() {
            body.send_data(call.body, true)?;
        }
        let response = response.await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut stream = response.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.data().await {
            let chunk = chunk?;
            let _ = stream.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Creates a channel and returns its id.
    async fn create(&mut self, policy: u8) -> String {
        let answer = self.send(create(policy)).await.unwrap();
        assert_eq!(answer.status, 201, "{answer:?}");
        answer.header("apns-channel-id").unwrap().to_owned()
    }
}

#[tokio::test]
async fn create_read_list_and_delete() {
    let emulator = Emulator::start(config()).await.unwrap();
    assert_ne!(emulator.channels_addr(), Some(emulator.addr()));
    let mut client = management(&emulator).await;

    let made = client
        .send(create(1).header("apns-request-id", REQUEST_ID))
        .await
        .unwrap();
    assert_eq!((made.status, &made.body), (201, &Value::Null));
    assert_eq!(made.header("apns-request-id"), Some(REQUEST_ID));
    let first = made.header("apns-channel-id").unwrap().to_owned();
    // As seen live: 16 random bytes in standard base64.
    assert_eq!(first.len(), 24);
    assert_eq!(STANDARD.decode(&first).unwrap().len(), 16);
    let second = client.create(0).await;
    assert_ne!(first, second);

    let answer = client.send(read(&first)).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        json!({"message-storage-policy": 1, "push-type": "LiveActivity"})
    );
    assert_ne!(answer.header("apns-request-id"), Some(REQUEST_ID));
    let answer = client.send(read(&second)).await.unwrap();
    assert_eq!(answer.body["message-storage-policy"], 0);

    let all = client.send(call(Method::GET, ALL_CHANNELS)).await.unwrap();
    assert_eq!(all.status, 200);
    assert_eq!(all.body, json!({"channels": [first, second]}));
    assert_eq!(
        emulator.channels(BUNDLE),
        [(first.clone(), 1), (second.clone(), 0)]
    );

    let gone = client
        .send(delete(&first).header("apns-request-id", REQUEST_ID))
        .await
        .unwrap();
    assert_eq!((gone.status, &gone.body), (204, &Value::Null));
    assert_eq!(gone.header("apns-request-id"), Some(REQUEST_ID));
    assert_eq!(
        client.send(read(&first)).await.unwrap().outcome(),
        (400, Some("ChannelNotRegistered"))
    );
    // As seen live: deleting it again is 404 BadPath.
    assert_eq!(
        client.send(delete(&first)).await.unwrap().outcome(),
        (404, Some("BadPath"))
    );
    let all = client.send(call(Method::GET, ALL_CHANNELS)).await.unwrap();
    assert_eq!(all.body, json!({"channels": [second]}));
    assert_eq!(emulator.channels(BUNDLE), [(second, 0)]);

    let stats = emulator.stats();
    assert_eq!((stats.channels_created, stats.channels_deleted), (2, 1));
    assert_eq!(stats.channel_calls, 9);
    assert_eq!(
        (
            stats.channel_count(201),
            stats.channel_count(200),
            stats.channel_count(204),
            stats.channel_count(400),
            stats.channel_count(404)
        ),
        (2, 4, 1, 1, 1)
    );
    // Management calls are not pushes: not in `requests`, not recorded.
    assert_eq!(stats.requests, 0);
    assert!(emulator.records().is_empty());
    emulator.shutdown().await;
}

#[tokio::test]
async fn management_refusals() {
    let emulator = Emulator::start(config()).await.unwrap();
    let mut client = management(&emulator).await;
    let id = emulator.create_channel(BUNDLE, 1);
    let gone = emulator.create_channel(BUNDLE, 1);
    assert!(emulator.delete_channel(BUNDLE, &gone));
    let never = STANDARD.encode([9u8; 16]);
    let cases: Vec<(&str, Call, u16, &str)> = vec![
        (
            "path",
            create(1).path("/1/apps/com.example.app/chanels"),
            404,
            "BadPath",
        ),
        (
            "id in path",
            read(&id).path(&format!("{CHANNELS}/abc")),
            404,
            "BadPath",
        ),
        (
            "version",
            create(1).path("/2/apps/com.example.app/channels"),
            404,
            "BadPath",
        ),
        (
            "method",
            create(1).method(Method::PUT),
            405,
            "MethodNotAllowed",
        ),
        (
            "all-channels method",
            call(Method::DELETE, ALL_CHANNELS),
            405,
            "MethodNotAllowed",
        ),
        (
            "push type suffix",
            create(1).path("/1/apps/com.example.app.push-type.liveactivity/channels"),
            400,
            "TopicDisallowed",
        ),
        (
            "another app",
            create(1).path("/1/apps/com.other.app/channels"),
            403,
            "TopicMismatch",
        ),
        (
            "request id",
            create(1).header("apns-request-id", "not-a-uuid"),
            400,
            "BadMessageId",
        ),
        ("empty body", create(1).body(""), 400, "BadRequestPayload"),
        ("not JSON", create(1).body("{"), 400, "BadRequestPayload"),
        (
            "not an object",
            create(1).body("[1]"),
            400,
            "BadRequestPayload",
        ),
        (
            "unknown attribute",
            create(1).body(r#"{"message-storage-policy":1,"push-type":"LiveActivity","ttl":5}"#),
            400,
            "BadRequestParams",
        ),
        (
            "no push type",
            create(1).body(r#"{"message-storage-policy":1}"#),
            400,
            "MissingPushType",
        ),
        (
            "push type",
            create(1).body(r#"{"message-storage-policy":1,"push-type":"alert"}"#),
            400,
            "InvalidPushType",
        ),
        (
            "no policy",
            create(1).body(r#"{"push-type":"LiveActivity"}"#),
            400,
            "BadRequestParams",
        ),
        ("policy 2", create(2), 400, "BadRequestParams"),
        (
            "policy as a string",
            create(1).body(r#"{"message-storage-policy":"1","push-type":"LiveActivity"}"#),
            400,
            "BadRequestParams",
        ),
        (
            "read without id",
            read(&id).without("apns-channel-id"),
            400,
            "MissingChannelId",
        ),
        (
            "delete without id",
            delete(&id).without("apns-channel-id"),
            400,
            "MissingChannelId",
        ),
        ("id not base64", read("not base64!"), 400, "BadChannelId"),
        (
            "id too long",
            read(&STANDARD.encode([1u8; 60])),
            400,
            "BadChannelId",
        ),
        ("delete id not base64", delete("%%%"), 400, "BadChannelId"),
        ("read deleted", read(&gone), 400, "ChannelNotRegistered"),
        ("read never made", read(&never), 400, "ChannelNotRegistered"),
        ("delete deleted", delete(&gone), 404, "BadPath"),
        ("delete never made", delete(&never), 404, "BadPath"),
    ];
    let n = cases.len() as u64;
    for (what, call, status, reason) in cases {
        let answer = client.send(call).await.unwrap();
        assert_eq!(answer.outcome(), (status, Some(reason)), "{what}");
    }
    assert_eq!(emulator.channels(BUNDLE), [(id, 1)]);
    assert_eq!(emulator.stats().channel_calls, n);
    assert_eq!(emulator.stats().channels_created, 0);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_channel_limit() {
    let emulator = Emulator::start(EmulatorConfig {
        channel_limit: 2,
        topic: None,
        ..config()
    })
    .await
    .unwrap();
    let mut client = management(&emulator).await;
    let first = client.create(0).await;
    client.create(1).await;
    assert_eq!(
        client.send(create(1)).await.unwrap().outcome(),
        (400, Some("CannotCreateChannelConfig"))
    );
    // Per bundle id.
    let other = client
        .send(create(1).path("/1/apps/com.other.app/channels"))
        .await
        .unwrap();
    assert_eq!(other.status, 201);
    // A delete frees a slot.
    assert_eq!(client.send(delete(&first)).await.unwrap().status, 204);
    client.create(1).await;
    assert_eq!(
        client.send(create(0)).await.unwrap().outcome(),
        (400, Some("CannotCreateChannelConfig"))
    );
    assert_eq!(emulator.channels(BUNDLE).len(), 2);
    // Out of band, the limit does not apply.
    emulator.create_channel(BUNDLE, 0);
    assert_eq!(emulator.channels(BUNDLE).len(), 3);
    emulator.shutdown().await;
}

#[tokio::test]
async fn broadcasts_to_channels() {
    let emulator = Emulator::start(config()).await.unwrap();
    let mut manage = management(&emulator).await;
    let mut push = pushes(&emulator).await;
    let stored = manage.create(1).await;
    let unstored = manage.create(0).await;
    let deleted = manage.create(1).await;
    assert_eq!(manage.send(delete(&deleted)).await.unwrap().status, 204);
    let never = STANDARD.encode([7u8; 16]);
    let later = (now_secs() + 3600).to_string();

    let sent = push
        .send(
            broadcast(&stored)
                .header("apns-expiration", later.as_str())
                .header("apns-request-id", REQUEST_ID),
        )
        .await
        .unwrap();
    assert_eq!((sent.status, &sent.body), (200, &Value::Null));
    assert_eq!(sent.header("apns-request-id"), Some(REQUEST_ID));
    let unique = sent.header("apns-unique-id").unwrap();
    assert!(validate::is_canonical_uuid(unique.as_bytes()), "{unique}");

    // "No Message Stored": expiration 0 only.
    assert_eq!(push.send(broadcast(&unstored)).await.unwrap().status, 200);
    let big = |n: usize| {
        let head = r#"{"aps":{"event":"update"},"x":""#;
        format!("{head}{}\"}}", "x".repeat(n - head.len() - 2))
    };
    let end = r#"{"aps":{"event":"end","dismissal-date":1700003600}}"#;
    for (what, call) in [
        ("end", broadcast(&stored).body(end)),
        (
            "push type casing",
            broadcast(&stored).header("apns-push-type", "LiveActivity"),
        ),
        (
            "priority 5",
            broadcast(&stored).header("apns-priority", "5"),
        ),
        (
            "priority 1",
            broadcast(&stored).header("apns-priority", "1"),
        ),
        ("5120 bytes", broadcast(&stored).body(big(5120))),
        ("apns-id", broadcast(&stored).header("apns-id", REQUEST_ID)),
    ] {
        let answer = push.send(call).await.unwrap();
        assert_eq!(answer.status, 200, "{what}: {answer:?}");
    }

    let cases: Vec<(&str, Call, u16, &str)> = vec![
        (
            "policy 0, nonzero expiration",
            broadcast(&unstored).header("apns-expiration", later.as_str()),
            400,
            "BadExpirationDate",
        ),
        ("deleted", broadcast(&deleted), 400, "ChannelNotRegistered"),
        ("never made", broadcast(&never), 400, "BadChannelId"),
        (
            "start",
            broadcast(&stored).body(r#"{"aps":{"event":"start","content-state":{}}}"#),
            400,
            "BadRequestParams",
        ),
        (
            "no event",
            broadcast(&stored).body(r#"{"aps":{}}"#),
            400,
            "BadRequestParams",
        ),
        (
            "no channel",
            broadcast(&stored).without("apns-channel-id"),
            400,
            "MissingChannelId",
        ),
        ("bad channel", broadcast("?!"), 400, "BadChannelId"),
        (
            "no push type",
            broadcast(&stored).without("apns-push-type"),
            400,
            "MissingPushType",
        ),
        (
            "push type",
            broadcast(&stored).header("apns-push-type", "alert"),
            400,
            "InvalidPushType",
        ),
        (
            "no priority",
            broadcast(&stored).without("apns-priority"),
            400,
            "BadPriority",
        ),
        (
            "priority",
            broadcast(&stored).header("apns-priority", "7"),
            400,
            "BadPriority",
        ),
        (
            "no expiration",
            broadcast(&stored).without("apns-expiration"),
            400,
            "BadExpirationDate",
        ),
        (
            "expiration",
            broadcast(&stored).header("apns-expiration", "tomorrow"),
            400,
            "BadExpirationDate",
        ),
        (
            "request id",
            broadcast(&stored).header("apns-request-id", "42"),
            400,
            "BadMessageId",
        ),
        ("empty", broadcast(&stored).body(""), 400, "PayloadEmpty"),
        (
            "too large",
            broadcast(&stored).body(big(5121)),
            413,
            "PayloadTooLarge",
        ),
        (
            "not JSON",
            broadcast(&stored).body("{"),
            400,
            "BadRequestPayload",
        ),
        (
            "suffix",
            broadcast(&stored).path("/4/broadcasts/apps/com.example.app.push-type.liveactivity"),
            400,
            "TopicDisallowed",
        ),
        (
            "another app",
            broadcast(&stored).path("/4/broadcasts/apps/com.other.app"),
            403,
            "TopicMismatch",
        ),
        (
            "method",
            broadcast(&stored).method(Method::GET),
            405,
            "MethodNotAllowed",
        ),
    ];
    let refused = cases.len();
    for (what, call, status, reason) in cases {
        let answer = push.send(call).await.unwrap();
        assert_eq!(answer.outcome(), (status, Some(reason)), "{what}");
        assert!(answer.header("apns-unique-id").is_none(), "{what}");
    }
    // The management API is not on the push listener (a device push's answer), nor
    // broadcasts on the channels one.
    let elsewhere = push.send_unchecked(create(1)).await.unwrap();
    assert_eq!(elsewhere.outcome(), (404, Some("BadPath")));
    assert!(elsewhere.header("apns-id").is_some());
    assert_eq!(
        manage.send(broadcast(&stored)).await.unwrap().outcome(),
        (404, Some("BadPath"))
    );

    let records = emulator.records();
    let broadcasts: Vec<_> = records.iter().filter(|r| r.is_broadcast()).collect();
    // The management call on the push listener is no broadcast.
    assert_eq!(broadcasts.len(), 8 + refused);
    let first = broadcasts[0];
    assert_eq!(first.channel_id.as_deref(), Some(stored.as_str()));
    assert_eq!(first.topic.as_deref(), Some(BUNDLE));
    assert_eq!(first.apns_id, REQUEST_ID);
    assert_eq!((first.status, first.priority), (200, Some(10)));
    assert_eq!(first.expiration, Some(later.parse().unwrap()));
    assert_eq!(first.push_type.as_deref(), Some("liveactivity"));
    assert_eq!(first.payload_json().unwrap()["aps"]["event"], "update");
    assert!(first.device_token.is_empty());
    let deleted_one = broadcasts
        .iter()
        .find(|r| r.channel_id.as_deref() == Some(deleted.as_str()))
        .unwrap();
    assert_eq!(deleted_one.reason.as_deref(), Some("ChannelNotRegistered"));

    let stats = emulator.stats();
    assert_eq!(stats.broadcasts, (8 + refused) as u64);
    assert_eq!(stats.count(200), 8);
    assert_eq!(stats.requests, (8 + refused + 1) as u64);
    emulator.shutdown().await;
}

#[tokio::test]
async fn channels_deleted_or_made_behind_the_clients_back() {
    let emulator = Emulator::start(config()).await.unwrap();
    let mut manage = management(&emulator).await;
    let mut push = pushes(&emulator).await;
    let id = manage.create(0).await;
    assert!(emulator.delete_channel(BUNDLE, &id));
    assert!(!emulator.delete_channel(BUNDLE, &id));
    assert_eq!(
        push.send(broadcast(&id)).await.unwrap().outcome(),
        (400, Some("ChannelNotRegistered"))
    );
    let lost = emulator.create_channel(BUNDLE, 1);
    let all = manage.send(call(Method::GET, ALL_CHANNELS)).await.unwrap();
    assert_eq!(all.body, json!({"channels": [lost]}));
    assert_eq!(push.send(broadcast(&lost)).await.unwrap().status, 200);
    // Out of band calls are not the API's: not counted as its.
    let stats = emulator.stats();
    assert_eq!((stats.channels_created, stats.channels_deleted), (1, 0));
    emulator.shutdown().await;
}

#[tokio::test]
async fn token_auth_on_both_listeners() {
    let p8 = jwt::generate_signing_key().unwrap();
    let emulator = Emulator::start(EmulatorConfig {
        auth: EmulatorAuth::Token {
            public_key_pem: p8.clone(),
            key_id: "KEYID12345".into(),
            team_id: "TEAMID1234".into(),
        },
        ..config()
    })
    .await
    .unwrap();
    let jwt = sign(&p8, "KEYID12345", "TEAMID1234", now_secs());
    let mut manage = management(&emulator).await;
    assert_eq!(
        manage.send(create(1)).await.unwrap().outcome(),
        (403, Some("MissingProviderToken"))
    );
    let wrong_team = sign(&p8, "KEYID12345", "OTHERTEAM1", now_secs());
    assert_eq!(
        manage
            .send(create(1).bearer(&wrong_team))
            .await
            .unwrap()
            .outcome(),
        (403, Some("InvalidProviderToken"))
    );
    let old = sign(&p8, "KEYID12345", "TEAMID1234", now_secs() - 3700);
    assert_eq!(
        manage.send(create(1).bearer(&old)).await.unwrap().outcome(),
        (403, Some("ExpiredProviderToken"))
    );
    let made = manage.send(create(1).bearer(&jwt)).await.unwrap();
    assert_eq!(made.status, 201);
    let id = made.header("apns-channel-id").unwrap().to_owned();
    let listed = manage
        .send(call(Method::GET, ALL_CHANNELS).bearer(&jwt))
        .await
        .unwrap();
    assert_eq!(listed.body, json!({"channels": [id]}));
    assert_eq!(
        manage
            .send(
                create(1)
                    .bearer(&jwt)
                    .path("/1/apps/com.other.app/channels")
            )
            .await
            .unwrap()
            .outcome(),
        (403, Some("TopicMismatch"))
    );

    // The same token on the push listener's own connection.
    let mut push = pushes(&emulator).await;
    assert_eq!(
        push.send(broadcast(&id)).await.unwrap().outcome(),
        (403, Some("MissingProviderToken"))
    );
    assert_eq!(
        push.send(broadcast(&id).bearer(&jwt)).await.unwrap().status,
        200
    );
    assert_eq!(
        manage.send(delete(&id).bearer(&jwt)).await.unwrap().status,
        204
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn client_certificates_on_the_management_listener() {
    let ca = CertificateAuthority::generate("provider CA").unwrap();
    let emulator = Emulator::start(EmulatorConfig {
        auth: EmulatorAuth::ClientCertificate {
            ca_pem: ca.cert_pem(),
        },
        ..config()
    })
    .await
    .unwrap();
    let addr = emulator.channels_addr().unwrap();
    let issued = ca.issue_client("provider").unwrap();
    let identity = || native_tls::Identity::from_pkcs8(&issued.cert_pem, &issued.key_pem).unwrap();
    let mut manage = connect(addr, emulator.ca_pem(), Some(identity()))
        .await
        .unwrap();
    // No token needed: the certificate authenticates, and an authorization header is
    // ignored.
    let id = manage.create(0).await;
    let read_back = manage
        .send(read(&id).header("authorization", "bearer whatever"))
        .await
        .unwrap();
    assert_eq!(read_back.status, 200);
    // The bundle must be the certificate's topic.
    assert_eq!(
        manage
            .send(create(1).path("/1/apps/com.other.app/channels"))
            .await
            .unwrap()
            .outcome(),
        (403, Some("TopicMismatch"))
    );
    let mut push = connect(emulator.addr(), emulator.ca_pem(), Some(identity()))
        .await
        .unwrap();
    assert_eq!(push.send(broadcast(&id)).await.unwrap().status, 200);

    // Without a certificate, no management call gets through.
    let outcome = async {
        let mut client = connect(addr, emulator.ca_pem(), None).await?;
        client.send(create(1)).await
    };
    assert!(outcome.await.is_err(), "accepted without a certificate");
    assert_eq!(emulator.channels(BUNDLE).len(), 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn faults_on_the_management_listener() {
    let emulator = Emulator::start(config()).await.unwrap();
    let mut manage = management(&emulator).await;
    // Scripted by bundle id: the create is refused and makes nothing.
    emulator.script_once(BUNDLE, 503, "ServiceUnavailable");
    assert_eq!(
        manage.send(create(1)).await.unwrap().outcome(),
        (503, Some("ServiceUnavailable"))
    );
    assert!(emulator.channels(BUNDLE).is_empty());
    let id = manage.create(1).await;
    // Scripted by channel id: its delete is refused, and the channel stays.
    emulator.script_once(&id, 429, "TooManyRequests");
    assert_eq!(
        manage.send(delete(&id)).await.unwrap().outcome(),
        (429, Some("TooManyRequests"))
    );
    assert_eq!(emulator.channels(BUNDLE).len(), 1);
    // And its broadcasts.
    let mut push = pushes(&emulator).await;
    emulator.script_once(&id, 500, "InternalServerError");
    assert_eq!(
        push.send(broadcast(&id)).await.unwrap().outcome(),
        (500, Some("InternalServerError"))
    );
    assert_eq!(push.send(broadcast(&id)).await.unwrap().status, 200);
    // The error rate: every valid call fails; refusals are still refusals.
    emulator.set_error_rate(1.0);
    let answer = manage.send(create(1)).await.unwrap();
    assert!([429, 500, 503].contains(&answer.status), "{answer:?}");
    assert_eq!(
        manage.send(read("***")).await.unwrap().outcome(),
        (400, Some("BadChannelId"))
    );
    emulator.set_error_rate(0.0);
    assert_eq!(emulator.channels(BUNDLE).len(), 1);
    // Latency applies too.
    emulator.set_latency(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    assert_eq!(manage.send(read(&id)).await.unwrap().status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
    emulator.set_latency(Duration::ZERO);
    // Dropped connections: the management connection goes too.
    emulator.drop_connections();
    let mut dead = false;
    for _ in 0..100 {
        if manage.send(read(&id)).await.is_err() {
            dead = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dead, "the management connection survived drop_connections");
    let mut again = management(&emulator).await;
    assert_eq!(again.send(read(&id)).await.unwrap().status, 200);
    emulator.shutdown().await;
}

/// curl, an independent HTTP/2 client (nghttp2), creating, listing and deleting a
/// channel on the management listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_manages_a_channel() {
    let version = match std::process::Command::new("curl").arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            crate::skip_without("curl (the curl check of the channel management API needs it)");
            return;
        }
    };
    if !version
        .lines()
        .any(|l| l.starts_with("Features:") && l.contains("HTTP2"))
    {
        crate::skip_without("a curl with HTTP/2 (no HTTP2 in `curl --version`'s features)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let emulator = Emulator::start(EmulatorConfig {
        tls_dir: Some(tls_dir.clone()),
        ..config()
    })
    .await
    .unwrap();
    let endpoint = emulator.channels_endpoint().unwrap();
    let ca = tls_dir.join("ca.pem");
    let headers_file = dir.path().join("headers");
    // (status line's version and code, response headers, body)
    let curl = |args: Vec<String>| {
        let (ca, headers_file) = (ca.clone(), headers_file.clone());
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["--silent", "--show-error", "--http2", "--cacert"])
                .arg(&ca)
                .arg("--dump-header")
                .arg(&headers_file)
                .args(["--write-out", "\n%{http_version} %{http_code}"])
                .args(args)
                .output()
                .await
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(
                out.status.success(),
                "{text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (body, tail) = text.rsplit_once('\n').unwrap();
            let headers = std::fs::read_to_string(&headers_file).unwrap();
            (tail.to_owned(), headers, body.to_owned())
        }
    };
    let header = |headers: &str, name: &str| -> Option<String> {
        headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };

    let (how, headers, body) = curl(vec![
        "--header".into(),
        "content-type: application/json".into(),
        "--data".into(),
        r#"{"message-storage-policy": 1, "push-type": "LiveActivity"}"#.into(),
        format!("{endpoint}{CHANNELS}"),
    ])
    .await;
    assert_eq!(how, "2 201", "{headers}{body}");
    assert_eq!(body, "");
    let id = header(&headers, "apns-channel-id").expect("apns-channel-id");
    assert!(header(&headers, "apns-request-id").is_some());

    let (how, _, body) = curl(vec![format!("{endpoint}{ALL_CHANNELS}")]).await;
    assert_eq!(how, "2 200");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"channels": [id]})
    );

    let (how, _, _) = curl(vec![
        "--request".into(),
        "DELETE".into(),
        "--header".into(),
        format!("apns-channel-id: {id}"),
        format!("{endpoint}{CHANNELS}"),
    ])
    .await;
    assert_eq!(how, "2 204");
    assert!(emulator.channels(BUNDLE).is_empty());
    emulator.shutdown().await;
}
