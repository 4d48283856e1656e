//! The FCM emulator end to end through its public API, driven by a real HTTP/2 client
//! (h2 over native-tls trusting the emulator's CA, ALPN `h2`), and once by curl, an
//! independent client. Assertions are signed here with the service account's key, as a
//! client does from Google's description ("Using OAuth 2.0 for Server to Server
//! Applications").

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use pgpushd_emulator::fcm::{
    ErrorCode, FcmEmulator, FcmEmulatorConfig, FcmEndpoint, FcmScript, MadeAccount, OauthError,
    DEFAULT_PROJECT,
};

use crate::http2::now_secs;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const DEVICE: &str = "dQw4w9WgXcQ:APA91bH-device_token-1";

/// A service account's key file, as a client reads it.
#[derive(Clone)]
struct Key(Value);

impl Key {
    fn new(json: &[u8]) -> Key {
        Key(serde_json::from_slice(json).unwrap())
    }
    fn get(&self, name: &str) -> String {
        self.0[name].as_str().unwrap().to_owned()
    }
    fn header(&self) -> Value {
        json!({"alg": "RS256", "typ": "JWT", "kid": self.get("private_key_id")})
    }
    fn claims(&self) -> Value {
        let now = now_secs();
        json!({
            "iss": self.get("client_email"),
            "scope": SCOPE,
            "aud": self.get("token_uri"),
            "iat": now,
            "exp": now + 3600,
        })
    }
    /// The JWT, signed RS256 with the file's private key.
    fn sign(&self, header: &Value, claims: &Value) -> String {
        let key = PKey::private_key_from_pem(self.get("private_key").as_bytes()).unwrap();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signer = Signer::new(MessageDigest::sha256(), &key).unwrap();
        let signature = signer.sign_oneshot_to_vec(input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
    fn assertion(&self) -> String {
        self.sign(&self.header(), &self.claims())
    }
}

fn form(jwt: &str) -> String {
    format!("grant_type={}&assertion={jwt}", GRANT.replace(':', "%3A"))
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    /// `error.details[]`'s `FcmError` `errorCode`, if any.
    fn fcm_error(&self) -> Option<&str> {
        self.body["error"]["details"]
            .as_array()?
            .iter()
            .find(|d| d["@type"] == "type.googleapis.com/google.firebase.fcm.v1.FcmError")?
            ["errorCode"]
            .as_str()
    }
    fn error_status(&self) -> &str {
        self.body["error"]["status"].as_str().unwrap_or_default()
    }
    fn detail(&self, type_suffix: &str) -> Option<&Value> {
        self.body["error"]["details"].as_array()?.iter().find(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with(type_suffix))
        })
    }
}

struct Client {
    send: h2::client::SendRequest<Bytes>,
    driver: JoinHandle<Result<(), h2::Error>>,
}

async fn connect(emulator: &FcmEmulator) -> Client {
    let tcp = TcpStream::connect(emulator.addr()).await.unwrap();
    let mut tls = native_tls::TlsConnector::builder();
    tls.add_root_certificate(native_tls::Certificate::from_pem(emulator.ca_pem()).unwrap());
    tls.request_alpns(&["h2"]);
    let tls = tokio_native_tls::TlsConnector::from(tls.build().unwrap())
        .connect("127.0.0.1", tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().negotiated_alpn().unwrap().as_deref(),
        Some(&b"h2"[..])
    );
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    Client {
        send,
        driver: tokio::spawn(conn),
    }
}

impl Client {
    async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("https://127.0.0.1{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send = self.send.clone().ready().await?;
        let (response, mut stream) = self.send.send_request(request.body(())?, false)?;
        stream.send_data(body.into(), true)?;
        let response = response.await?;
        let (head, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        assert_eq!(
            head.headers["content-type"], "application/json; charset=UTF-8",
            "{path}"
        );
        Ok(Reply {
            status: head.status.as_u16(),
            headers: head.headers,
            body: serde_json::from_slice(&bytes)?,
        })
    }

    async fn token_request(&mut self, body: &str) -> Reply {
        self.post(
            "/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            body.to_owned(),
        )
        .await
        .unwrap()
    }

    /// An access token for `key`'s account.
    async fn access_token(&mut self, key: &Key) -> String {
        let reply = self.token_request(&form(&key.assertion())).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.body["access_token"].as_str().unwrap().to_owned()
    }

    async fn send_message(&mut self, project: &str, access_token: &str, body: Value) -> Reply {
        let bearer = format!("Bearer {access_token}");
        self.post(
            &format!("/v1/projects/{project}/messages:send"),
            &[
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
        .unwrap()
    }
}

fn message(token: &str) -> Value {
    json!({"message": {"token": token, "data": {"order": "42"},
                       "notification": {"title": "Shipped", "body": "On its way"}}})
}

async fn start(dir: &Path) -> (FcmEmulator, Key) {
    start_with(FcmEmulatorConfig {
        tls_dir: Some(dir.to_owned()),
        ..FcmEmulatorConfig::default()
    })
    .await
}

async fn start_with(config: FcmEmulatorConfig) -> (FcmEmulator, Key) {
    let emulator = FcmEmulator::start(config).await.unwrap();
    let key = Key::new(emulator.service_account_json().unwrap());
    (emulator, key)
}

#[tokio::test]
async fn a_token_exchange_then_a_send() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, _) = start(dir.path()).await;
    // What a client is given: the key file and the CA, both in the directory.
    let path = emulator.service_account_path().unwrap();
    assert_eq!(path, dir.path().join("service-account.json"));
    let key = Key::new(&std::fs::read(path).unwrap());
    assert_eq!(key.get("token_uri"), emulator.token_uri());
    assert_eq!(
        key.get("token_uri"),
        format!("https://{}/token", emulator.addr())
    );
    assert_eq!(key.get("project_id"), DEFAULT_PROJECT);
    assert_eq!(
        std::fs::read(emulator.ca_path().unwrap()).unwrap(),
        emulator.ca_pem()
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let mut client = connect(&emulator).await;
    let grant = client.token_request(&form(&key.assertion())).await;
    assert_eq!(grant.status, 200, "{grant:?}");
    assert_eq!(grant.body["token_type"], "Bearer");
    assert_eq!(grant.body["expires_in"], 3600);
    assert_eq!(grant.headers["cache-control"], "no-store");
    let token = grant.body["access_token"].as_str().unwrap();

    let sent = client
        .send_message(DEFAULT_PROJECT, token, message(DEVICE))
        .await;
    assert_eq!(sent.status, 200, "{sent:?}");
    let name = sent.body["name"].as_str().unwrap();
    let id = name
        .strip_prefix(&format!("projects/{DEFAULT_PROJECT}/messages/"))
        .unwrap();
    assert!(id.starts_with("0:"), "{name}");
    let dry = client
        .send_message(
            DEFAULT_PROJECT,
            token,
            json!({"validate_only": true, "message": {"topic": "news"}}),
        )
        .await;
    assert_eq!(
        dry.body["name"],
        format!("projects/{DEFAULT_PROJECT}/messages/fake_message_id")
    );

    let records = emulator.records();
    assert_eq!(records.len(), 3);
    let (grant, send) = (&records[0], &records[1]);
    assert_eq!((grant.endpoint, grant.status), (FcmEndpoint::Token, 200));
    assert_eq!(
        grant.client_email.as_deref(),
        Some(key.get("client_email").as_str())
    );
    assert_eq!((send.endpoint, send.status), (FcmEndpoint::Send, 200));
    assert_eq!(send.project.as_deref(), Some(DEFAULT_PROJECT));
    assert_eq!(send.token.as_deref(), Some(DEVICE));
    assert_eq!(send.message.as_ref().unwrap()["data"]["order"], "42");
    assert_eq!(send.name.as_deref(), Some(name));
    assert!(records[2].validate_only);
    assert_eq!(records[2].topic.as_deref(), Some("news"));
    let stats = emulator.stats();
    assert_eq!((stats.requests, stats.count(200)), (3, 3));
    emulator.shutdown().await;

    // A restart reuses the CA and the account: a client configured once keeps working.
    let (again, key_again) = start(dir.path()).await;
    assert_eq!(key_again.get("private_key_id"), key.get("private_key_id"));
    assert_eq!(key_again.get("token_uri"), again.token_uri());
    let mut client = connect(&again).await;
    let token = client.access_token(&key_again).await;
    let sent = client
        .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
        .await;
    assert_eq!(sent.status, 200);
    again.shutdown().await;
}

#[tokio::test]
async fn the_token_endpoint_refuses_what_google_refuses() {
    let (emulator, key) = start_with(FcmEmulatorConfig::default()).await;
    let mut client = connect(&emulator).await;
    let stranger = Key::new(
        &MadeAccount::generate("stranger", &key.get("token_uri"))
            .unwrap()
            .json,
    );
    let claims = |name: &str, value: Value| {
        let mut c = key.claims();
        c[name] = value;
        c
    };
    let now = now_secs();
    let mut wrong_kid = key.header();
    wrong_kid["kid"] = json!("0000000000000000000000000000000000000000");
    let mut no_scope = key.claims();
    no_scope.as_object_mut().unwrap().remove("scope");
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "another key's signature",
            // Claims naming the account, signed with someone else's key.
            {
                let mut forged = Key(stranger.0.clone());
                forged.0["private_key_id"] = json!(key.get("private_key_id"));
                forged.sign(&key.header(), &key.claims())
            },
            400,
            "invalid_grant",
            "Invalid JWT Signature.",
        ),
        (
            "wrong kid",
            key.sign(&wrong_kid, &key.claims()),
            400,
            "invalid_grant",
            "Invalid JWT Signature.",
        ),
        (
            "wrong aud",
            key.sign(
                &key.header(),
                &claims("aud", json!("https://oauth2.googleapis.com/token")),
            ),
            400,
            "invalid_grant",
            "Invalid JWT: Failed audience check.",
        ),
        (
            "no scope",
            key.sign(&key.header(), &no_scope),
            400,
            "invalid_scope",
            "Empty or missing scope not allowed.",
        ),
        (
            "another scope",
            key.sign(
                &key.header(),
                &claims(
                    "scope",
                    json!("https://www.googleapis.com/auth/cloud-platform.read-only"),
                ),
            ),
            400,
            "invalid_scope",
            "Invalid OAuth scope",
        ),
        (
            "expired",
            key.sign(&key.header(), &{
                let mut c = claims("iat", json!(now - 7200));
                c["exp"] = json!(now - 3600);
                c
            }),
            400,
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes)",
        ),
        (
            "longer than an hour",
            key.sign(&key.header(), &claims("exp", json!(now + 7200))),
            400,
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token",
        ),
        (
            "unknown account",
            stranger.assertion(),
            401,
            "invalid_client",
            "The OAuth client was not found.",
        ),
        (
            "not a JWT",
            "abc".into(),
            400,
            "invalid_grant",
            "Invalid JWT",
        ),
    ];
    for (what, jwt, status, error, description) in cases {
        let reply = client.token_request(&form(&jwt)).await;
        assert_eq!(
            (reply.status, reply.body["error"].as_str()),
            (status, Some(error)),
            "{what}: {reply:?}"
        );
        let said = reply.body["error_description"].as_str().unwrap();
        assert!(said.starts_with(description), "{what}: {said}");
        assert!(reply.body.get("access_token").is_none());
    }
    let reply = client
        .token_request(&format!(
            "grant_type=client_credentials&assertion={}",
            key.assertion()
        ))
        .await;
    assert_eq!(reply.body["error"], "unsupported_grant_type");
    let reply = client.token_request(&format!("grant_type={GRANT}")).await;
    assert_eq!(reply.body["error"], "invalid_request");

    // A refusal forced at run time, then the exchange works again.
    emulator.refuse_next_grant(OauthError::new(
        400,
        "invalid_grant",
        "Invalid JWT Signature.",
    ));
    let reply = client.token_request(&form(&key.assertion())).await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        client.token_request(&form(&key.assertion())).await.status,
        200
    );
    let refused = emulator
        .records()
        .iter()
        .filter(|r| r.status != 200)
        .count();
    assert_eq!(refused, 12);
    emulator.shutdown().await;
}

#[tokio::test]
async fn every_fcm_error_code_as_google_documents_it() {
    let (emulator, key) = start_with(FcmEmulatorConfig {
        retry_after: Duration::from_secs(7),
        ..FcmEmulatorConfig::default()
    })
    .await;
    let mut client = connect(&emulator).await;
    let token = client.access_token(&key).await;
    let expected = [
        (ErrorCode::UnspecifiedError, 500, "UNKNOWN"),
        (ErrorCode::InvalidArgument, 400, "INVALID_ARGUMENT"),
        (ErrorCode::Unregistered, 404, "NOT_FOUND"),
        (ErrorCode::SenderIdMismatch, 403, "PERMISSION_DENIED"),
        (ErrorCode::QuotaExceeded, 429, "RESOURCE_EXHAUSTED"),
        (ErrorCode::Unavailable, 503, "UNAVAILABLE"),
        (ErrorCode::Internal, 500, "INTERNAL"),
        (ErrorCode::ThirdPartyAuthError, 401, "UNAUTHENTICATED"),
    ];
    for (code, status, canonical) in expected {
        emulator.script_once(DEVICE, FcmScript::Error(code));
        let reply = client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await;
        assert_eq!(
            (reply.status, reply.error_status(), reply.fcm_error()),
            (status, canonical, Some(code.as_str())),
            "{reply:?}"
        );
        assert_eq!(reply.body["error"]["code"], status);
        assert!(reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        let retry_after = reply
            .headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap());
        assert_eq!(
            retry_after,
            (code == ErrorCode::QuotaExceeded).then_some("7"),
            "{code}"
        );
        let record = emulator.records().pop().unwrap();
        assert_eq!(record.fcm_error.as_deref(), Some(code.as_str()));
        assert_eq!(record.error.as_deref(), Some(canonical));
    }
    // Once each: the next send succeeds.
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await
            .status,
        200
    );

    // A standing script, scripts once before it, then cleared; tokens are case-sensitive.
    emulator.script(DEVICE, FcmScript::Error(ErrorCode::Unregistered));
    emulator.script_once(DEVICE, FcmScript::Success);
    let upper = DEVICE.to_uppercase();
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &token, message(&upper))
            .await
            .status,
        200
    );
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await
            .status,
        200
    );
    for _ in 0..2 {
        assert_eq!(
            client
                .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
                .await
                .status,
            404
        );
    }
    emulator.clear_scripts();
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await
            .status,
        200
    );

    // A refused access token, once: the same token then works.
    emulator.script_once(DEVICE, FcmScript::AccessTokenRefused);
    let refused = client
        .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
        .await;
    assert_eq!((refused.status, refused.fcm_error()), (401, None));
    assert!(refused.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await
            .status,
        200
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn unregistered_tokens_and_random_errors() {
    let gone = "gone:APA91b-unregistered";
    let (emulator, key) = start_with(FcmEmulatorConfig {
        unregistered: vec![gone.into()],
        ..FcmEmulatorConfig::default()
    })
    .await;
    let mut client = connect(&emulator).await;
    let token = client.access_token(&key).await;
    let reply = client
        .send_message(DEFAULT_PROJECT, &token, message(gone))
        .await;
    assert_eq!(
        (reply.status, reply.fcm_error()),
        (404, Some("UNREGISTERED"))
    );
    let reply = client
        .send_message(DEFAULT_PROJECT, &token, message(&gone.to_uppercase()))
        .await;
    assert_eq!(reply.status, 200, "tokens are case-sensitive");

    emulator.set_error_rate(1.0);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let reply = client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await;
        let code = reply.fcm_error().unwrap().to_owned();
        assert_eq!(
            reply.headers.contains_key("retry-after"),
            code == "QUOTA_EXCEEDED"
        );
        seen.insert((reply.status, code));
    }
    let expected: std::collections::BTreeSet<(u16, String)> = [
        (429, "QUOTA_EXCEEDED".to_owned()),
        (500, "INTERNAL".to_owned()),
        (503, "UNAVAILABLE".to_owned()),
    ]
    .into();
    assert_eq!(seen, expected);
    emulator.set_error_rate(0.0);
    // The token endpoint is not subject to the error rate.
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await
            .status,
        200
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn access_tokens_are_required_and_expire() {
    let (emulator, key) = start_with(FcmEmulatorConfig {
        token_lifetime: Duration::from_secs(1),
        ..FcmEmulatorConfig::default()
    })
    .await;
    let mut client = connect(&emulator).await;
    let path = format!("/v1/projects/{DEFAULT_PROJECT}/messages:send");
    let body = message(DEVICE).to_string();
    let missing = client.post(&path, &[], body.clone()).await.unwrap();
    assert_eq!(
        (missing.status, missing.error_status()),
        (401, "UNAUTHENTICATED")
    );
    assert_eq!(
        missing.detail("ErrorInfo").unwrap()["reason"],
        "CREDENTIALS_MISSING"
    );
    let unknown = client
        .send_message(DEFAULT_PROJECT, "ya29.made-up", message(DEVICE))
        .await;
    assert_eq!(unknown.status, 401);
    let basic = client
        .post(&path, &[("authorization", "Basic dXNlcjpwYXNz")], body)
        .await
        .unwrap();
    assert_eq!(basic.status, 401);

    let grant = client.token_request(&form(&key.assertion())).await;
    assert_eq!(grant.body["expires_in"], 1);
    let token = grant.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await
            .status,
        200
    );
    // Past `expires_in` the token is refused as expired.
    let deadline = Instant::now() + Duration::from_secs(10);
    let expired = loop {
        let reply = client
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await;
        if reply.status != 200 {
            break reply;
        }
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((expired.status, expired.fcm_error()), (401, None));
    assert_eq!(
        expired.detail("ErrorInfo").unwrap()["reason"],
        "ACCESS_TOKEN_EXPIRED"
    );
    assert_eq!(
        expired.headers["www-authenticate"],
        r#"Bearer realm="https://accounts.google.com/", error="invalid_token""#
    );
    // A new token works; revoked, it does not.
    let renewed = client.access_token(&key).await;
    assert_ne!(renewed, token);
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &renewed, message(DEVICE))
            .await
            .status,
        200
    );
    emulator.revoke_access_tokens();
    assert_eq!(
        client
            .send_message(DEFAULT_PROJECT, &renewed, message(DEVICE))
            .await
            .status,
        401
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_project_other_than_the_accounts_is_permission_denied() {
    // A second account, of another project, from a key file whose token_uri is Google's:
    // its assertions' aud must be that.
    let other =
        MadeAccount::generate("other-project", "https://oauth2.googleapis.com/token").unwrap();
    let (emulator, key) = start_with(FcmEmulatorConfig {
        service_accounts: vec![other.json.clone()],
        ..FcmEmulatorConfig::default()
    })
    .await;
    let other = Key::new(&other.json);
    let mut client = connect(&emulator).await;
    let mine = client.access_token(&key).await;
    let theirs = client.access_token(&other).await;
    for (token, project) in [(&mine, "other-project"), (&theirs, DEFAULT_PROJECT)] {
        let reply = client.send_message(project, token, message(DEVICE)).await;
        assert_eq!(
            (reply.status, reply.error_status()),
            (403, "PERMISSION_DENIED"),
            "{reply:?}"
        );
        let said = reply.body["error"]["message"].as_str().unwrap();
        assert!(said.contains(&format!("projects/{project}")), "{said}");
    }
    assert_eq!(
        client
            .send_message("other-project", &theirs, message(DEVICE))
            .await
            .status,
        200
    );
    let record = emulator.records().pop().unwrap();
    assert_eq!(
        record.client_email.as_deref(),
        Some(other.get("client_email").as_str())
    );
    // Unknown paths and methods.
    let reply = client
        .post("/v1/projects/x/messages:batchSend", &[], "{}")
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    emulator.shutdown().await;
}

#[tokio::test]
async fn malformed_messages_are_refused_as_google_does() {
    let (emulator, key) = start_with(FcmEmulatorConfig::default()).await;
    let mut client = connect(&emulator).await;
    let token = client.access_token(&key).await;
    let big = "x".repeat(4096);
    // (what, body, the field violated, whether an FcmError INVALID_ARGUMENT comes too)
    let cases: Vec<(&str, Value, Option<&str>, bool)> = vec![
        (
            "data value not a string",
            json!({"message": {"token": DEVICE, "data": {"n": 12}}}),
            Some("message.data[0].value"),
            false,
        ),
        (
            "unknown key",
            json!({"message": {"token": DEVICE, "priority": "high"}}),
            Some("message"),
            false,
        ),
        (
            "no target",
            json!({"message": {"data": {"a": "b"}}}),
            Some("message"),
            true,
        ),
        (
            "two targets",
            json!({"message": {"token": DEVICE, "topic": "news"}}),
            None,
            false,
        ),
        (
            "too large",
            json!({"message": {"token": DEVICE, "data": {"k": big}}}),
            Some("message"),
            true,
        ),
        (
            "reserved key",
            json!({"message": {"token": DEVICE, "data": {"google.sent_time": "1"}}}),
            Some("message.data"),
            true,
        ),
        (
            "bad token",
            json!({"message": {"token": "not a token"}}),
            Some("message.token"),
            true,
        ),
        (
            "bad ttl",
            json!({"message": {"token": DEVICE, "android": {"ttl": "1h"}}}),
            Some("message.android.ttl"),
            false,
        ),
    ];
    for (what, body, field, fcm) in cases {
        let reply = client.send_message(DEFAULT_PROJECT, &token, body).await;
        assert_eq!(
            (reply.status, reply.error_status()),
            (400, "INVALID_ARGUMENT"),
            "{what}: {reply:?}"
        );
        assert_eq!(
            reply.fcm_error(),
            fcm.then_some("INVALID_ARGUMENT"),
            "{what}"
        );
        let violation = &reply.detail("BadRequest").unwrap()["fieldViolations"][0];
        assert_eq!(violation["field"].as_str(), field, "{what}");
        assert_eq!(
            violation["description"], reply.body["error"]["message"],
            "{what}"
        );
    }
    let not_json = client
        .post(
            &format!("/v1/projects/{DEFAULT_PROJECT}/messages:send"),
            &[("authorization", &format!("Bearer {token}"))],
            "{\"message\":",
        )
        .await
        .unwrap();
    assert_eq!(not_json.status, 400);
    // Refused bodies are recorded without a target.
    let record = emulator.records().pop().unwrap();
    assert_eq!((record.status, record.token.as_deref()), (400, None));
    emulator.shutdown().await;
}

#[tokio::test]
async fn goaway_after_every_n_requests() {
    let (emulator, key) = start_with(FcmEmulatorConfig {
        goaway_every: Some(3),
        ..FcmEmulatorConfig::default()
    })
    .await;
    let mut client = connect(&emulator).await;
    let token = client.access_token(&key).await;
    for _ in 0..2 {
        assert_eq!(
            client
                .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
                .await
                .status,
            200
        );
    }
    // The server closes the connection once its streams are answered.
    (&mut client.driver).await.unwrap().unwrap();
    let path = format!("/v1/projects/{DEFAULT_PROJECT}/messages:send");
    assert!(client.post(&path, &[], "{}").await.is_err());
    let mut second = connect(&emulator).await;
    assert_eq!(
        second
            .send_message(DEFAULT_PROJECT, &token, message(DEVICE))
            .await
            .status,
        200
    );
    let connections: Vec<u64> = emulator.records().iter().map(|r| r.connection).collect();
    assert_eq!(connections, [1, 1, 1, 2]);
    assert_eq!(emulator.stats().goaways_sent, 1);

    emulator.goaway_all();
    (&mut second.driver).await.unwrap().unwrap();
    assert_eq!(emulator.stats().goaways_sent, 2);
    emulator.shutdown().await;
}

/// `pgpushd-emulator --protocol fcm`, spawned: it writes its key file and CA, a client
/// given those gets a token and sends, and every request goes to the record file.
#[tokio::test]
async fn the_command_writes_its_key_file_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("fcm");
    let record = dir.path().join("requests.jsonl");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
        .args([
            "--protocol",
            "fcm",
            "--listen",
            "127.0.0.1:0",
            "--project",
            "demo-app",
        ])
        .arg("--tls-dir")
        .arg(&tls)
        .arg("--record")
        .arg(&record)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let key_file = tls.join("service-account.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !key_file.exists() {
        assert!(Instant::now() < deadline, "no key file written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Written once the emulator has bound its port; read it until it parses.
    let key = loop {
        if let Ok(json) = std::fs::read(&key_file) {
            if let Ok(value) = serde_json::from_slice::<Value>(&json) {
                break Key(value);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(key.get("project_id"), "demo-app");
    let token_uri = key.get("token_uri");
    let addr: std::net::SocketAddr = token_uri
        .strip_prefix("https://")
        .and_then(|u| u.strip_suffix("/token"))
        .unwrap()
        .parse()
        .unwrap();
    let ca = std::fs::read(tls.join("ca.pem")).unwrap();

    let tcp = loop {
        match TcpStream::connect(addr).await {
            Ok(tcp) => break tcp,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        }
    };
    let mut tls_builder = native_tls::TlsConnector::builder();
    tls_builder.add_root_certificate(native_tls::Certificate::from_pem(&ca).unwrap());
    tls_builder.request_alpns(&["h2"]);
    let stream = tokio_native_tls::TlsConnector::from(tls_builder.build().unwrap())
        .connect("127.0.0.1", tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(stream).await.unwrap();
    let mut client = Client {
        send,
        driver: tokio::spawn(conn),
    };
    let token = client.access_token(&key).await;
    let reply = client
        .send_message("demo-app", &token, message(DEVICE))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    // SIGTERM: the emulator drains and flushes the record file before it exits.
    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the emulator did not stop on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut stdout = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout)
        .await
        .unwrap();
    assert!(
        stdout.contains(&format!("FCM emulator listening on https://{addr}")),
        "{stdout}"
    );
    assert!(stdout.contains(&key_file.display().to_string()), "{stdout}");
    let lines: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["endpoint"].as_str(), lines[1]["endpoint"].as_str()),
        (Some("token"), Some("send"))
    );
    assert_eq!(lines[1]["message"]["token"], DEVICE);
}

#[test]
fn the_command_refuses_what_fcm_cannot_use() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
            .args(["--protocol", "fcm", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&[]).contains("--protocol fcm needs --tls-dir DIR"));
    assert!(
        run(&["--tls-dir", "/nonexistent/x", "--topic", "com.example"])
            .contains("--topic applies to the APNs protocols only")
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("key.json");
    std::fs::write(&bad, r#"{"type": "authorized_user"}"#).unwrap();
    let said = run(&["--service-account", bad.to_str().unwrap()]);
    assert!(said.contains("not a service account key file"), "{said}");
    let apns = std::process::Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
        .args(["--listen", "127.0.0.1:0", "--token-lifetime", "1m"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&apns.stderr)
        .contains("--token-lifetime applies to --protocol fcm only"));
}

/// curl, an independent HTTP/2 client (nghttp2), against the token endpoint and a send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_a_token_and_sends() {
    let version = match std::process::Command::new("curl").arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            crate::skip_without("curl (the curl check of the FCM emulator needs it)");
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
    let (emulator, key) = start(dir.path()).await;
    let ca = emulator.ca_path().unwrap().to_owned();
    let curl = |args: Vec<String>| {
        let ca = ca.clone();
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["--silent", "--show-error", "--http2", "--cacert"])
                .arg(&ca)
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
            (
                serde_json::from_str::<Value>(body).unwrap(),
                tail.to_owned(),
            )
        }
    };
    let (grant, how) = curl(vec![
        "--data-urlencode".into(),
        format!("grant_type={GRANT}"),
        "--data-urlencode".into(),
        format!("assertion={}", key.assertion()),
        emulator.token_uri(),
    ])
    .await;
    assert_eq!(how, "2 200", "{grant}");
    let token = grant["access_token"].as_str().unwrap();
    let (sent, how) = curl(vec![
        "--header".into(),
        format!("Authorization: Bearer {token}"),
        "--header".into(),
        "Content-Type: application/json".into(),
        "--data".into(),
        message(DEVICE).to_string(),
        format!(
            "{}/v1/projects/{DEFAULT_PROJECT}/messages:send",
            emulator.endpoint()
        ),
    ])
    .await;
    assert_eq!(how, "2 200", "{sent}");
    assert!(sent["name"]
        .as_str()
        .unwrap()
        .starts_with("projects/pgpushd-emulator/messages/0:"));
    emulator.shutdown().await;
}
