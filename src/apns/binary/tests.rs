//! The binary client against the binary emulator: what each gateway behaviour makes of a row.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use openssl::pkcs12::Pkcs12;
use openssl::pkey::PKey;
use openssl::x509::X509;
use pgpushd_emulator::binary::{BinaryEmulator, BinaryEmulatorConfig};
use pgpushd_emulator::tls::CertificateAuthority;

use super::*;
use crate::config::{BinaryConfig, CertificateAuth, Protocol};

/// Long enough that a busy machine does not make an error packet late.
const SETTLE: Duration = Duration::from_millis(500);

struct Setup {
    emulator: BinaryEmulator,
    ca: CertificateAuthority,
    dir: tempfile::TempDir,
}

async fn setup(tweak: impl FnOnce(&mut BinaryEmulatorConfig)) -> Setup {
    let ca = CertificateAuthority::generate("provider CA").unwrap();
    let mut config = BinaryEmulatorConfig::new(ca.cert_pem());
    config.feedback_listen = None;
    tweak(&mut config);
    let emulator = BinaryEmulator::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), emulator.ca_pem()).unwrap();
    Setup { emulator, ca, dir }
}

impl Setup {
    /// `ck.pem` as the old guides make it: certificate, then the key encrypted.
    fn encrypted_pem(&self, ca: &CertificateAuthority) -> Auth {
        let issued = ca
            .issue_client("Apple Push Services: com.example.app")
            .unwrap();
        let key = PKey::private_key_from_pem(&issued.key_pem).unwrap();
        let encrypted = key
            .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_256_cbc(), b"pushchat")
            .unwrap();
        let file = self.dir.path().join("ck.pem");
        std::fs::write(&file, [issued.cert_pem, encrypted].concat()).unwrap();
        let passphrase_file = self.dir.path().join("ck.pass");
        std::fs::write(&passphrase_file, "pushchat\n").unwrap();
        Auth::Certificate(CertificateAuth {
            file,
            passphrase_file: Some(passphrase_file),
        })
    }

    fn app(&self, auth: Auth) -> AppConfig {
        AppConfig {
            name: "legacy".into(),
            topic: None,
            endpoint: Endpoint::Custom {
                host: "localhost".into(),
                port: self.emulator.addr().port(),
            },
            ca_file: Some(self.dir.path().join("ca.pem")),
            protocol: Protocol::Binary,
            connections: 2,
            request_timeout: Duration::from_secs(5),
            auth,
            binary: BinaryConfig {
                settle: SETTLE,
                feedback: None,
            },
            channels: None,
            proxy: Default::default(),
        }
    }

    fn client(&self, auth: Auth) -> Arc<BinaryApp> {
        let options = crate::service::Timings {
            reconnect_base: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            ..Default::default()
        };
        let (undelivered, _) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(
            BinaryApp::new(&self.app(auth), &options, undelivered)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }
}

fn token(i: u64) -> String {
    format!("{i:064x}")
}

fn row(id: i64, token: &str) -> Notification {
    Notification {
        id,
        app: "legacy".into(),
        device_token: token.into(),
        payload: serde_json::json!({"aps": {"alert": "hello"}}).to_string(),
        push_type: "alert".into(),
        priority: Some(10),
        collapse_id: None,
        topic: None,
        expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
        attempts: 0,
        broadcast: None,
    }
}

/// Delivers rows for tokens `1..=n` at once; their deliveries in token order.
async fn deliver_all(client: &Arc<BinaryApp>, n: u64) -> Vec<Delivery> {
    let tasks: Vec<_> = (1..=n)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.deliver(&row(i as i64, &token(i))).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn an_encrypted_pem_delivers_command_2_frames() {
    let s = setup(|_| {}).await;
    let client = s.client(s.encrypted_pem(&s.ca));
    let d = client.deliver(&row(1, &token(1))).await;
    assert_eq!(d, Delivery::Sent { id: None });
    let r = &s.emulator.records()[0];
    assert_eq!((r.command, r.identifier, r.status), (2, Some(1), 0));
    assert_eq!(r.device_token, token(1));
    assert_eq!((r.priority, r.expiration), (Some(10), Some(1_900_000_000)));
    assert_eq!(r.payload_json().unwrap()["aps"]["alert"], "hello");
    assert_eq!(client.health(), Ok(()));
}

#[test]
fn the_payload_item_is_the_rows_text_byte_for_byte() {
    // PostgreSQL's text for a jsonb payload, as the claim reads it.
    let text = r#"{"pi": 3.14159265358979323846264338327950288, "aps": {"alert": "x"}, "big": 123456789012345678901234567890}"#;
    let mut n = row(1, &token(1));
    n.payload = text.into();
    assert_eq!(build(&n).unwrap().payload, text.as_bytes());
    // The limit counts those bytes, spaces included.
    let sized = |total: usize| format!(r#"{{"x": "{}", "aps": {{}}}}"#, "a".repeat(total - 20));
    n.payload = sized(frame::MAX_PAYLOAD);
    assert_eq!(build(&n).unwrap().payload.len(), frame::MAX_PAYLOAD);
    n.payload = sized(frame::MAX_PAYLOAD + 1);
    assert_eq!(
        build(&n).unwrap_err(),
        "PayloadTooLarge: the payload is 2049 bytes; the binary protocol takes at most 2048"
    );
}

#[test]
fn a_background_row_without_a_priority_goes_at_5() {
    // An absent priority item means 10, which a background push may not use.
    let mut n = row(1, &token(1));
    n.push_type = "background".into();
    n.priority = None;
    assert_eq!(build(&n).unwrap().priority, Some(5));
    n.push_type = "alert".into();
    assert_eq!(
        build(&n).unwrap().priority,
        None,
        "the gateway's default, 10"
    );
    n.priority = Some(10);
    assert_eq!(build(&n).unwrap().priority, Some(10));
}

#[tokio::test]
async fn the_gateway_gets_the_rows_text() {
    let s = setup(|_| {}).await;
    let client = s.client(s.encrypted_pem(&s.ca));
    let text = r#"{"aps": {"alert": "x"}, "big": 123456789012345678901234567890}"#;
    let mut n = row(1, &token(1));
    n.payload = text.into();
    assert_eq!(client.deliver(&n).await, Delivery::Sent { id: None });
    assert_eq!(&s.emulator.records()[0].payload[..], text.as_bytes());
}

#[tokio::test]
async fn a_p12_delivers_too() {
    let s = setup(|_| {}).await;
    let issued =
        s.ca.issue_client("Apple Push Services: com.example.app")
            .unwrap();
    let p12 = Pkcs12::builder()
        .name("push")
        .pkey(&PKey::private_key_from_pem(&issued.key_pem).unwrap())
        .cert(&X509::from_pem(&issued.cert_pem).unwrap())
        .build2("export")
        .unwrap();
    let file = s.dir.path().join("Push.p12");
    std::fs::write(&file, p12.to_der().unwrap()).unwrap();
    let passphrase_file = s.dir.path().join("p12.pass");
    std::fs::write(&passphrase_file, "export").unwrap();
    let client = s.client(Auth::Certificate(CertificateAuth {
        file,
        passphrase_file: Some(passphrase_file),
    }));
    assert_eq!(
        client.deliver(&row(1, &token(1))).await,
        Delivery::Sent { id: None }
    );
}

#[tokio::test]
async fn an_invalid_token_among_many_fails_alone_and_nothing_is_taken_twice() {
    let s = setup(|c| c.invalid_tokens = vec![token(50)]).await;
    let client = s.client(s.encrypted_pem(&s.ca));
    let deliveries = deliver_all(&client, 120).await;
    for (i, d) in deliveries.iter().enumerate() {
        if i + 1 == 50 {
            match d {
                Delivery::Unregistered { reason, .. } => {
                    assert!(reason.contains("invalid token (status 8)"), "{reason}")
                }
                other => panic!("{other:?}"),
            }
        } else {
            assert_eq!(*d, Delivery::Sent { id: None }, "row {}", i + 1);
        }
    }
    let taken: Vec<String> = s
        .emulator
        .records()
        .iter()
        .filter(|r| r.status == 0)
        .map(|r| r.device_token.clone())
        .collect();
    assert_eq!(taken.len(), 119, "each other row taken exactly once");
    let distinct: std::collections::HashSet<_> = taken.iter().collect();
    assert_eq!(distinct.len(), 119);
}

#[tokio::test]
async fn statuses_map_onto_deliveries() {
    let s = setup(|_| {}).await;
    let client = s.client(s.encrypted_pem(&s.ca));
    for (status, want) in [
        (1, "retry"),
        (255, "retry"),
        (7, "rejected"),
        (5, "rejected"),
        (2, "rejected"),
        (8, "unregistered"),
    ] {
        s.emulator.script(&token(status), status as u8);
        let d = client.deliver(&row(1, &token(status))).await;
        let got = match &d {
            Delivery::Retry { .. } => "retry",
            Delivery::Rejected { .. } => "rejected",
            Delivery::Unregistered { .. } => "unregistered",
            _ => "other",
        };
        assert_eq!(got, want, "status {status}: {d:?}");
    }
}

#[tokio::test]
async fn rows_the_protocol_cannot_carry_fail_before_sending() {
    let s = setup(|_| {}).await;
    let client = s.client(s.encrypted_pem(&s.ca));
    let mut bad = vec![row(1, "abcd"), row(2, &"zz".repeat(32))];
    let mut big = row(3, &token(3));
    big.payload = serde_json::json!({"aps": {"alert": "x".repeat(2100)}}).to_string();
    bad.push(big);
    let mut low = row(4, &token(4));
    low.priority = Some(1);
    bad.push(low);
    let mut not_object = row(5, &token(5));
    not_object.payload = "[1]".into();
    bad.push(not_object);
    let want = [
        "BadDeviceToken",
        "BadDeviceToken",
        "PayloadTooLarge",
        "BadPriority",
        "BadPayload",
    ];
    for (n, want) in bad.iter().zip(want) {
        match client.deliver(n).await {
            Delivery::Rejected { reason } => assert!(reason.starts_with(want), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(s.emulator.records().is_empty());
}

#[tokio::test]
async fn shutdown_mid_flight_loses_nothing() {
    let s = setup(|_| {}).await;
    let client = s.client(s.encrypted_pem(&s.ca));
    let all = tokio::spawn({
        let client = client.clone();
        async move { deliver_all(&client, 200).await }
    });
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.emulator.stats().accepted < 20 {
        assert!(tokio::time::Instant::now() < give_up);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.emulator.shutdown_connections();
    let deliveries = all.await.unwrap();
    assert!(deliveries.iter().all(|d| *d == Delivery::Sent { id: None }));
    let taken = s
        .emulator
        .records()
        .iter()
        .filter(|r| r.status == 0)
        .count();
    assert_eq!(taken, 200, "each taken exactly once");
}

#[tokio::test]
async fn a_certificate_the_gateway_refuses_defers_the_app() {
    let s = setup(|_| {}).await;
    let stranger = CertificateAuthority::generate("someone else").unwrap();
    let client = s.client(s.encrypted_pem(&stranger));
    // Under TLS 1.3 the handshake may look fine to the client and the refusal arrive with
    // the first read: the notification comes back, uncounted, and the app is deferred.
    let (reason, after) = match client.deliver(&row(1, &token(1))).await {
        Delivery::Deferred { reason, after } => (reason, after),
        other => panic!("{other:?}"),
    };
    assert!(
        reason.starts_with("the APNs gateway is unreachable: "),
        "{reason}"
    );
    assert!(after >= MIN_DEFER);
    assert!(client.health().is_err());
    assert!(s.emulator.records().is_empty());
}

/// An app whose feedback service is `feedback`'s, polled every 50 ms.
fn with_feedback(mut app: AppConfig, feedback: &BinaryEmulator) -> AppConfig {
    app.binary.feedback = Some(crate::config::FeedbackConfig {
        endpoint: Endpoint::Custom {
            host: "localhost".into(),
            port: feedback.feedback_addr().unwrap().port(),
        },
        interval: Duration::from_millis(50),
    });
    app
}

#[tokio::test]
async fn feedback_comes_back_through_the_seam_and_a_reload_moves_the_poller() {
    use crate::providers::Providers;
    use crate::transport::{Transport, Unregistered};
    use std::collections::BTreeMap;

    let first = setup(|c| c.feedback_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let auth = first.encrypted_pem(&first.ca);
    let apps = |app: AppConfig| BTreeMap::from([(app.name.clone(), app)]);
    let apns: Arc<dyn Transport> = Arc::new(
        Providers::new(&apps(with_feedback(
            first.app(auth.clone()),
            &first.emulator,
        )))
        .unwrap(),
    );
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    first
        .emulator
        .add_feedback(&hex::decode(token(7)).unwrap(), at);
    let reported = tokio::time::timeout(Duration::from_secs(10), apns.unregistered())
        .await
        .expect("the feedback reported");
    assert_eq!(
        reported,
        [Unregistered {
            app: "legacy".into(),
            device_token: token(7),
            at,
        }]
    );

    // A reload pointing the app at another feedback service (a rotated certificate
    // would be the same: a changed app is rebuilt) stops the old poller and starts one
    // for the new service, without waiting for a restart.
    let second = setup(|c| {
        c.feedback_listen = Some("127.0.0.1:0".parse().unwrap());
        c.client_ca_pem = first.ca.cert_pem();
    })
    .await;
    std::fs::copy(
        second.dir.path().join("ca.pem"),
        first.dir.path().join("ca2.pem"),
    )
    .unwrap();
    let mut moved = with_feedback(first.app(auth), &second.emulator);
    moved.ca_file = Some(first.dir.path().join("ca2.pem"));
    assert_eq!(apns.reload(&apps(moved)).unwrap(), ["legacy"]);
    let before = first.emulator.stats().feedback_connections;
    second
        .emulator
        .add_feedback(&hex::decode(token(8)).unwrap(), at);
    let reported = tokio::time::timeout(Duration::from_secs(10), apns.unregistered())
        .await
        .expect("the new service's feedback reported");
    assert_eq!(reported[0].device_token, token(8));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        first.emulator.stats().feedback_connections <= before + 1,
        "the old poller still polls the old service"
    );
}
