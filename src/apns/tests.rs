//! The APNs client end to end against the APNs emulator (`pgpushd-emulator`, written
//! from Apple's documentation, not from this client): routing by app, reloads, token and
//! certificate auth, answers becoming outcomes, refused credentials, lost connections.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::config::{AppConfig, Auth, CertificateAuth, Config, Endpoint, Protocol, TokenAuth};
use crate::providers::{check, send_one, Options, Providers};
use crate::service::Timings;
use crate::testutil::{self, eventually, TestEmulator, DEADLINE};
use crate::transport::{Delivery, Notification, Transport};
use openssl::ec::EcKey;
use openssl::pkey::Public;
use pgpushd_emulator::{EmulatorAuth, EmulatorConfig};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TOKEN: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";
const TOPIC: &str = "com.example.app";
const KEY_ID: &str = "ABC123DEFG";
const TEAM_ID: &str = "DEF123GHIJ";

fn options() -> Options {
    Options {
        timings: Timings {
            reconnect_base: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            pause_backoff_base: Duration::from_millis(300),
            pause_backoff_max: Duration::from_millis(600),
            ..Timings::default()
        },
        ..Options::default()
    }
}

fn app_config(server: &TestEmulator, name: &str, auth: Auth) -> AppConfig {
    AppConfig {
        name: name.into(),
        topic: Some(TOPIC.into()),
        endpoint: Endpoint::Custom {
            host: "localhost".into(),
            port: server.port(),
        },
        ca_file: Some(server.ca_file.clone()),
        protocol: Protocol::Http2,
        connections: 2,
        request_timeout: Duration::from_secs(10),
        auth,
        binary: Default::default(),
        channels: None,
        proxy: Default::default(),
    }
}

/// A token-auth app signing with the `.p8` key `pem`, written to the server's directory.
fn token_app_with(server: &TestEmulator, name: &str, pem: &[u8]) -> AppConfig {
    let key_file = server.dir.path().join(format!("AuthKey_{name}.p8"));
    std::fs::write(&key_file, pem).unwrap();
    let auth = Auth::Token(TokenAuth {
        key_file,
        key_id: KEY_ID.into(),
        team_id: TEAM_ID.into(),
    });
    app_config(server, name, auth)
}

/// A token-auth app with a fresh `.p8` key.
fn token_app(server: &TestEmulator, name: &str) -> AppConfig {
    token_app_with(server, name, &provider_token::tests::p8().0)
}

/// An emulator under token auth serving [`TOPIC`], and the app `default` whose key it
/// checks provider tokens against.
async fn token_emulator(config: EmulatorConfig) -> (TestEmulator, AppConfig, EcKey<Public>) {
    let (pem, public) = provider_token::tests::p8();
    let server = TestEmulator::start(EmulatorConfig {
        auth: EmulatorAuth::Token {
            public_key_pem: pem.clone(),
            key_id: KEY_ID.into(),
            team_id: TEAM_ID.into(),
        },
        topic: Some(TOPIC.into()),
        ..config
    })
    .await;
    let app = token_app_with(&server, "default", &pem);
    (server, app, public)
}

fn client(apps: &[AppConfig], options: Options) -> Providers {
    let apps = apps.iter().map(|a| (a.name.clone(), a.clone())).collect();
    Providers::with_options(&apps, options).unwrap_or_else(|e| panic!("{e}"))
}

fn row(app: &str, token: &str) -> Notification {
    Notification {
        id: 7,
        app: app.into(),
        device_token: token.into(),
        payload: serde_json::json!({"aps": {"alert": "hello"}}).to_string(),
        push_type: "alert".into(),
        priority: Some(10),
        collapse_id: None,
        topic: None,
        expires_at: None,
        attempts: 0,
        broadcast: None,
    }
}

#[tokio::test]
async fn reload_rebuilds_only_apps_whose_config_or_files_changed() {
    let server = TestEmulator::open().await;
    let a = token_app(&server, "a");
    let b = token_app(&server, "b");
    let apps: BTreeMap<_, _> = [a.clone(), b.clone()]
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let apns = Providers::with_options(&apps, options()).unwrap();
    let loaded = |name| apns.registry.get(name).unwrap();
    let before = [loaded("a"), loaded("b")];

    // Nothing changed: nothing rebuilt.
    assert!(apns.reload(&apps).unwrap().is_empty());
    // A rotated key under the same path, and an app removed and one added.
    let Auth::Token(t) = &b.auth else {
        unreachable!()
    };
    std::fs::write(&t.key_file, provider_token::tests::p8().0).unwrap();
    let c = token_app(&server, "c");
    let next: BTreeMap<_, _> = [a, b, c].into_iter().map(|c| (c.name.clone(), c)).collect();
    let mut changed = apns.reload(&next).unwrap();
    changed.sort();
    assert_eq!(changed, ["b", "c"]);
    let after = [loaded("a"), loaded("b")];
    assert!(
        Arc::ptr_eq(&before[0], &after[0]),
        "an unchanged app lost its connections"
    );
    assert!(!Arc::ptr_eq(&before[1], &after[1]));

    // A bad credential: the reload is refused whole, the running apps stay.
    let mut broken = next.clone();
    if let Some(Auth::Token(t)) = broken.get_mut("a").map(|a| &mut a.auth) {
        t.key_file = server.dir.path().join("missing.p8");
    }
    let err = apns.reload(&broken).unwrap_err().to_string();
    assert!(err.contains("missing.p8"), "{err}");
    assert!(Arc::ptr_eq(&after[0], &loaded("a")));
    assert!(apns.registry.get("c").is_some());
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn token_auth_pushes_are_sent_with_one_reused_token() {
    // The emulator verifies each provider token (ES256 signature by the app's key, `kid`,
    // `iss`) and, like APNs, refuses a newer token on a connection less than 20 minutes
    // after the previous one (TooManyProviderTokenUpdates). One connection, and pushes
    // a second apart: a token minted per push would be refused.
    let (server, mut config, _) = token_emulator(EmulatorConfig::default()).await;
    config.connections = 1;
    let apns = client(&[config], options());
    let mut ids = Vec::new();
    for _ in 0..3 {
        let d = apns.send(&row("default", TOKEN)).await;
        let Delivery::Sent {
            id: Some(crate::transport::MessageId::Apns(id)),
        } = d
        else {
            panic!("{d:?}")
        };
        ids.push(id);
        let sent = unix_secs();
        eventually(|| unix_secs() > sent).await;
    }
    let records = server.records();
    assert_eq!(records.len(), 3);
    for (r, id) in records.iter().zip(&ids) {
        assert_eq!((r.status, r.reason.as_deref()), (200, None));
        assert_eq!(r.apns_id, id.to_string());
        assert_eq!(r.device_token, TOKEN);
        assert_eq!(r.topic.as_deref(), Some(TOPIC));
        assert_eq!(r.push_type.as_deref(), Some("alert"));
        assert_eq!(r.priority, Some(10));
        assert_eq!(&r.payload[..], br#"{"aps":{"alert":"hello"}}"#);
        assert_eq!(r.connection, 1);
    }
    assert_eq!(apns.health(), vec![("default".into(), Ok(()))]);
}

#[tokio::test]
async fn answers_become_outcomes_and_bad_rows_cost_no_request() {
    let token = |n: u32| format!("{n:064x}");
    let before = SystemTime::now();
    let (server, config, _) = token_emulator(EmulatorConfig {
        unregistered: vec![token(0xaa01)],
        ..EmulatorConfig::default()
    })
    .await;
    server.script(&token(0xaa02), 400, "BadDeviceToken");
    server.script(&token(0xaa03), 429, "TooManyRequests");
    server.script(&token(0xaa04), 503, "ServiceUnavailable");
    let apns = client(&[config], options());
    match apns.send(&row("default", &token(0xaa01))).await {
        Delivery::Unregistered { reason, at } => {
            assert_eq!(
                reason,
                "Unregistered: the device token is inactive for the topic (HTTP 410)"
            );
            // The emulator says its unregistered tokens stopped being valid when it started.
            assert!(
                at + Duration::from_secs(1) >= before && at <= SystemTime::now(),
                "{at:?}"
            );
            assert_eq!(
                at.duration_since(UNIX_EPOCH).unwrap().subsec_nanos() % 1_000_000,
                0,
                "APNs timestamps are milliseconds"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(apns.send(&row("default", &token(0xaa02))).await,
                     Delivery::Rejected { reason } if reason.starts_with("BadDeviceToken: ")));
    assert!(matches!(apns.send(&row("default", &token(0xaa03))).await,
                     Delivery::Retry { reason, .. } if reason.starts_with("TooManyRequests: ")));
    assert!(matches!(apns.send(&row("default", &token(0xaa04))).await,
                     Delivery::Retry { reason, .. } if reason.starts_with("ServiceUnavailable: ")));
    assert_eq!(server.stats().requests, 4);

    let mut bad = row("default", "abc");
    assert!(matches!(apns.send(&bad).await,
                     Delivery::Rejected { reason } if reason.starts_with("BadDeviceToken: ")));
    bad = row("default", TOKEN);
    bad.push_type = "background".into();
    assert!(matches!(apns.send(&bad).await,
                     Delivery::Rejected { reason } if reason.starts_with("BadPriority: ")));
    assert_eq!(
        apns.send(&row("other", TOKEN)).await,
        Delivery::retry("unknown app \"other\": no [apps.other] section in this daemon's config")
    );
    assert_eq!(server.stats().requests, 4, "bad rows cost no request");
}

#[tokio::test]
async fn refused_credentials_defer_the_app_until_a_probe_succeeds() {
    let (server, config, _) = token_emulator(EmulatorConfig::default()).await;
    server.script(TOKEN, 403, "InvalidProviderToken");
    let other = token_app(&server, "other");
    let apns = client(&[config, other], options());

    let first = apns.send(&row("default", TOKEN)).await;
    let Delivery::Deferred { reason, after } = first else {
        panic!("{first:?}")
    };
    assert!(reason.starts_with("InvalidProviderToken: "), "{reason}");
    // Back after the backoff (at most 0.6 s, a second at least) and the probe's time
    // (request_timeout, 10 s).
    assert!(after <= Duration::from_secs(11), "{after:?}");
    let health = apns.health();
    assert!(health[0]
        .1
        .as_ref()
        .unwrap_err()
        .contains("InvalidProviderToken"));
    assert_eq!(
        health[1],
        ("other".into(), Ok(())),
        "other apps are not affected"
    );

    // While the backoff runs, rows are deferred without a request.
    for _ in 0..20 {
        let d = apns.send(&row("default", TOKEN)).await;
        assert!(matches!(d, Delivery::Deferred { .. }), "{d:?}");
    }
    assert_eq!(server.stats().requests, 1);

    // Apple accepts the key again: the next probe after the backoff clears it.
    server.clear_scripts();
    let started = tokio::time::Instant::now();
    loop {
        match apns.send(&row("default", TOKEN)).await {
            Delivery::Sent { .. } => break,
            // Sooner than the row would come back: the probe is due after the backoff.
            Delivery::Deferred { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < DEADLINE);
    }
    assert_eq!(server.stats().requests, 2, "exactly one probe");
    assert_eq!(apns.health()[0], ("default".into(), Ok(())));
}

#[tokio::test]
async fn a_stale_provider_token_is_replaced_and_the_push_resent() {
    // Each connection serves one request: the emulator, like APNs, refuses a newer token
    // on a connection within 20 minutes of the previous one, and the token called
    // expired here is seconds old. The fresh one goes out on a new connection.
    let (server, config, _) = token_emulator(EmulatorConfig {
        goaway_every: Some(1),
        ..EmulatorConfig::default()
    })
    .await;
    server.script_once(TOKEN, 403, "ExpiredProviderToken");
    let apns = client(
        &[config],
        Options {
            apns: super::Options {
                token_min_interval: Duration::ZERO,
                ..super::Options::default()
            },
            ..options()
        },
    );
    let d = apns.send(&row("default", TOKEN)).await;
    assert!(matches!(d, Delivery::Sent { .. }), "{d:?}");
    let records = server.records();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (records[0].status, records[0].reason.as_deref()),
        (403, Some("ExpiredProviderToken"))
    );
    // The fresh token passed the emulator's checks (signature, kid, iss, age).
    assert_eq!(records[1].status, 200);
    assert_ne!(records[0].connection, records[1].connection);
    // The same push: the client's apns-id both times (else the emulator makes one up).
    assert_eq!(records[0].apns_id, records[1].apns_id);
}

#[tokio::test]
async fn a_young_token_called_stale_defers_instead_of_minting() {
    let (server, config, _) = token_emulator(EmulatorConfig::default()).await;
    server.script(TOKEN, 403, "ExpiredProviderToken");
    let apns = client(&[config], options());
    match apns.send(&row("default", TOKEN)).await {
        Delivery::Deferred { reason, .. } => {
            assert!(reason.contains("younger than 20 minutes"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.stats().requests, 1);
}

#[tokio::test]
async fn certificate_auth_presents_the_client_certificate() {
    // The provider's certificate comes from its own CA; the emulator requires a client
    // certificate signed by it in the TLS handshake.
    let ca = testutil::Ca::new();
    let server = TestEmulator::start(EmulatorConfig {
        auth: EmulatorAuth::ClientCertificate {
            ca_pem: ca.cert.to_pem().unwrap(),
        },
        topic: Some(TOPIC.into()),
        ..EmulatorConfig::default()
    })
    .await;
    let key = testutil::rsa_key();
    let cert = ca.client(&key, "Apple Push Services: com.example.app");
    let encrypted = key
        .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_256_cbc(), b"pw")
        .unwrap();
    let file = server.dir.path().join("ck.pem");
    std::fs::write(&file, [cert.to_pem().unwrap(), encrypted].concat()).unwrap();
    let passphrase_file = server.dir.path().join("ck.pass");
    std::fs::write(&passphrase_file, "pw\n").unwrap();
    let auth = Auth::Certificate(CertificateAuth {
        file,
        passphrase_file: Some(passphrase_file),
    });
    let apns = client(&[app_config(&server, "cert", auth)], options());
    let d = apns.send(&row("cert", TOKEN)).await;
    assert!(matches!(d, Delivery::Sent { .. }), "{d:?}");
    let stats = server.stats();
    assert_eq!((stats.count(200), stats.handshakes_failed), (1, 0));
    assert_eq!(server.records()[0].topic.as_deref(), Some(TOPIC));
}

/// Every push in flight, unanswered; then GOAWAY, then the connections drop.
#[tokio::test]
async fn goaway_and_drops_mid_flight_lose_nothing() {
    // Without token auth, so a connection's stream limit is not 1 until a first success
    // (the client's token is then not checked).
    let server = TestEmulator::start(EmulatorConfig {
        topic: Some(TOPIC.into()),
        latency: Duration::from_secs(3600),
        ..EmulatorConfig::default()
    })
    .await;
    let apns = client(&[token_app(&server, "default")], options());
    let rows: Vec<_> = (0..100)
        .map(|i| row("default", &format!("{i:064x}")))
        .collect();
    let sends = futures::future::join_all(rows.iter().map(|r| apns.send(r)));
    let faults = async {
        eventually(|| server.stats().requests_in_flight == 100).await;
        server.set_latency(Duration::ZERO);
        server.goaway_all();
        eventually(|| server.stats().goaways_sent >= 1).await;
        server.drop_connections();
    };
    let (all, ()) = tokio::join!(sends, faults);
    for d in all {
        assert!(matches!(d, Delivery::Sent { .. }), "{d:?}");
    }
    let stats = server.stats();
    assert!(stats.connections_accepted >= 3, "{stats:?}");
    assert_eq!((stats.count(200), stats.streams_abandoned), (100, 100));
}

#[tokio::test]
async fn an_unreachable_endpoint_defers_rows() {
    let server = TestEmulator::open().await;
    let mut config = token_app(&server, "default");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.endpoint = Endpoint::Custom {
        host: "127.0.0.1".into(),
        port: listener.local_addr().unwrap().port(),
    };
    drop(listener);
    let apns = client(
        &[config],
        Options {
            timings: Timings {
                reconnect_base: Duration::from_secs(60),
                reconnect_max: Duration::from_secs(60),
                ..options().timings
            },
            ..options()
        },
    );
    match apns.send(&row("default", TOKEN)).await {
        Delivery::Deferred { reason, after } => {
            assert!(
                reason.starts_with("APNs is unreachable: cannot connect to 127.0.0.1:"),
                "{reason}"
            );
            assert!(after >= Duration::from_secs(20), "{after:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(apns.health()[0].1.is_err());
}

#[tokio::test]
async fn send_one_reports_the_answer() {
    let (server, config, _) = token_emulator(EmulatorConfig::default()).await;
    server.script_once(TOKEN, 400, "BadDeviceToken");
    let a = send_one(&config, &row("default", TOKEN)).await.unwrap();
    assert_eq!(a.status, 400);
    assert_eq!(a.reason.as_deref(), Some("BadDeviceToken"));
    assert!(
        a.to_string()
            .starts_with("HTTP 400 BadDeviceToken (apns-id "),
        "{a}"
    );
    let a = send_one(&config, &row("default", TOKEN)).await.unwrap();
    assert_eq!((a.status, a.reason), (200, None));
    let e = send_one(&config, &row("default", "xyz")).await.unwrap_err();
    assert!(
        e.to_string()
            .starts_with("this push would be refused: BadDeviceToken"),
        "{e}"
    );
    assert_eq!(server.stats().requests, 2);
}

#[test]
fn start_up_refuses_what_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let base = AppConfig {
        name: "default".into(),
        topic: Some("com.example.app".into()),
        endpoint: Endpoint::Apple(crate::config::Environment::Sandbox),
        ca_file: None,
        protocol: Protocol::Http2,
        connections: 1,
        request_timeout: Duration::from_secs(10),
        auth: Auth::Token(TokenAuth {
            key_file: dir.path().join("AuthKey_missing.p8"),
            key_id: "ABC123DEFG".into(),
            team_id: "DEF123GHIJ".into(),
        }),
        binary: Default::default(),
        channels: None,
        proxy: Default::default(),
    };
    let build = |apps: &[AppConfig]| {
        let apps = apps.iter().map(|a| (a.name.clone(), a.clone())).collect();
        Providers::new(&apps).err().map(|e| e.to_string())
    };
    let e = build(std::slice::from_ref(&base)).unwrap();
    assert!(
        e.starts_with("apps.default: ")
            && e.contains("AuthKey_missing.p8: cannot read the token key"),
        "{e}"
    );

    let mut binary = base.clone();
    binary.name = "legacy".into();
    binary.protocol = Protocol::Binary;
    binary.auth = Auth::Certificate(CertificateAuth {
        file: dir.path().join("ck.pem"),
        passphrase_file: None,
    });
    let e = build(std::slice::from_ref(&binary)).unwrap();
    assert!(
        e.starts_with("apps.legacy: ") && e.contains("ck.pem: cannot read the certificate file"),
        "{e}"
    );

    let mut cert = base.clone();
    cert.name = "cert".into();
    cert.auth = Auth::Certificate(CertificateAuth {
        file: dir.path().join("ck.pem"),
        passphrase_file: None,
    });
    let mut ca = base.clone();
    ca.name = "ca".into();
    let (pem, _) = provider_token::tests::p8();
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(&key_file, pem).unwrap();
    ca.auth = Auth::Token(TokenAuth {
        key_file,
        key_id: "ABC123DEFG".into(),
        team_id: "DEF123GHIJ".into(),
    });
    ca.ca_file = Some(dir.path().join("ca.pem"));
    let mut good = ca.clone();
    good.name = "good".into();
    good.ca_file = None;

    let mut config = Config::from_file_str(
        std::path::Path::new("x.toml"),
        "[database]\nurl = \"postgres://x@y/z\"\n",
        None,
    )
    .unwrap();
    config.apps = [base, binary, cert, ca, good.clone()]
        .into_iter()
        .map(|a| (a.name.clone(), a))
        .collect();
    let problems = check(&config);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("apps.ca: ") && p.contains("ca.pem: cannot read the CA file")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("apps.cert: ")
            && p.contains("ck.pem: cannot read the certificate file")),
        "{problems:#?}"
    );
    assert!(check(&Config {
        apps: [("good".to_owned(), good)].into(),
        ..config
    })
    .is_empty());
}
