//! The APNs client end to end against a scripted HTTP/2 server: routing by app, reloads,
//! token and certificate auth, answers becoming outcomes, refused credentials, lost
//! connections.

use super::*;
use crate::apns::http2::scripted_server::{Action, TestServer, DEADLINE};
use crate::apns::testutil;
use crate::config::{Auth, CertificateAuth, Endpoint, Protocol, TokenAuth};
use openssl::ec::EcKey;
use openssl::pkey::Public;
use std::time::{Duration, UNIX_EPOCH};

const TOKEN: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";

fn options() -> Options {
    Options {
        reconnect_base: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        credentials_backoff_base: Duration::from_millis(300),
        credentials_backoff_max: Duration::from_millis(600),
        ..Options::default()
    }
}

fn app_config(server: &TestServer, name: &str, auth: Auth) -> AppConfig {
    AppConfig {
        name: name.into(),
        topic: Some("com.example.app".into()),
        endpoint: Endpoint::Custom {
            host: "localhost".into(),
            port: server.addr.port(),
        },
        ca_file: Some(server.ca_file.clone()),
        protocol: Protocol::Http2,
        connections: 2,
        request_timeout: Duration::from_secs(10),
        auth,
        binary: Default::default(),
    }
}

/// A token-auth app with a fresh `.p8` key; returns the key's public half too.
fn token_app(server: &TestServer, name: &str) -> (AppConfig, EcKey<Public>) {
    let (pem, public) = provider_token::tests::p8();
    let key_file = server.dir.path().join(format!("AuthKey_{name}.p8"));
    std::fs::write(&key_file, pem).unwrap();
    let auth = Auth::Token(TokenAuth {
        key_file,
        key_id: "ABC123DEFG".into(),
        team_id: "DEF123GHIJ".into(),
    });
    (app_config(server, name, auth), public)
}

fn client(apps: &[AppConfig], options: Options) -> Apns {
    let apps = apps.iter().map(|a| (a.name.clone(), a.clone())).collect();
    Apns::with_options(&apps, options).unwrap_or_else(|e| panic!("{e}"))
}

fn row(app: &str, token: &str) -> Notification {
    Notification {
        id: 7,
        app: app.into(),
        device_token: token.into(),
        payload: serde_json::json!({"aps": {"alert": "hello"}}),
        push_type: "alert".into(),
        priority: Some(10),
        collapse_id: None,
        topic: None,
        expires_at: None,
        attempts: 0,
    }
}

#[tokio::test]
async fn reload_rebuilds_only_apps_whose_config_or_files_changed() {
    let server = TestServer::start(|_| Action::ok()).await;
    let (a, _) = token_app(&server, "a");
    let (b, _) = token_app(&server, "b");
    let apps: BTreeMap<_, _> = [a.clone(), b.clone()]
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let apns = Apns::with_options(&apps, options()).unwrap();
    let before = apns.apps.read().unwrap().clone();

    // Nothing changed: nothing rebuilt.
    assert!(apns.reload(&apps).unwrap().is_empty());
    // A rotated key under the same path, and an app removed and one added.
    let Auth::Token(t) = &b.auth else {
        unreachable!()
    };
    std::fs::write(&t.key_file, provider_token::tests::p8().0).unwrap();
    let (c, _) = token_app(&server, "c");
    let next: BTreeMap<_, _> = [a, b, c].into_iter().map(|c| (c.name.clone(), c)).collect();
    let mut changed = apns.reload(&next).unwrap();
    changed.sort();
    assert_eq!(changed, ["b", "c"]);
    let after = apns.apps.read().unwrap().clone();
    assert!(
        Arc::ptr_eq(&before["a"], &after["a"]),
        "an unchanged app lost its connections"
    );
    assert!(!Arc::ptr_eq(&before["b"], &after["b"]));

    // A bad credential: the reload is refused whole, the running apps stay.
    let mut broken = next.clone();
    if let Some(Auth::Token(t)) = broken.get_mut("a").map(|a| &mut a.auth) {
        t.key_file = server.dir.path().join("missing.p8");
    }
    let err = apns.reload(&broken).unwrap_err().to_string();
    assert!(err.contains("missing.p8"), "{err}");
    assert!(Arc::ptr_eq(&after["a"], &apns.apps.read().unwrap()["a"]));
    assert!(apns.apps.read().unwrap().contains_key("c"));
}

#[tokio::test]
async fn token_auth_pushes_are_sent_with_one_reused_token() {
    let server = TestServer::start(|_| Action::ok()).await;
    let (config, public) = token_app(&server, "default");
    let apns = client(&[config], options());
    for _ in 0..3 {
        let d = apns.send(&row("default", TOKEN)).await;
        assert!(matches!(d, Delivery::Sent { apns_id: Some(_) }), "{d:?}");
    }
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    let s = &seen[0];
    assert_eq!(s.path, format!("/3/device/{TOKEN}"));
    assert_eq!(s.header("apns-topic"), Some("com.example.app"));
    assert_eq!(s.header("apns-push-type"), Some("alert"));
    assert_eq!(s.header("apns-priority"), Some("10"));
    assert!(s.header("apns-id").is_some());
    assert_eq!(&s.body[..], br#"{"aps":{"alert":"hello"}}"#);
    let claims = provider_token::tests::verify(s.bearer().unwrap(), &public);
    assert_eq!(claims["iss"], "DEF123GHIJ");
    assert!(seen.iter().all(|x| x.bearer() == s.bearer()));
    assert_eq!(apns.health(), vec![("default".into(), Ok(()))]);
}

#[tokio::test]
async fn answers_become_outcomes_and_bad_rows_cost_no_request() {
    let server = TestServer::start(|seen| match &seen.path[10..] {
        "aa01" => Action::respond(
            410,
            r#"{"reason":"Unregistered","timestamp":1700000000000}"#,
        ),
        "aa02" => Action::reason(400, "BadDeviceToken"),
        "aa03" => Action::reason(429, "TooManyRequests"),
        "aa04" => Action::reason(503, "ServiceUnavailable"),
        _ => Action::ok(),
    })
    .await;
    let (config, _) = token_app(&server, "default");
    let apns = client(&[config], options());
    assert_eq!(
        apns.send(&row("default", "aa01")).await,
        Delivery::Unregistered {
            reason: "Unregistered: the device token is inactive for the topic (HTTP 410)".into(),
            at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    );
    assert!(matches!(apns.send(&row("default", "aa02")).await,
                     Delivery::Rejected { reason } if reason.starts_with("BadDeviceToken: ")));
    assert!(matches!(apns.send(&row("default", "aa03")).await,
                     Delivery::Retry { reason } if reason.starts_with("TooManyRequests: ")));
    assert!(matches!(apns.send(&row("default", "aa04")).await,
                     Delivery::Retry { reason } if reason.starts_with("ServiceUnavailable: ")));
    assert_eq!(server.seen().len(), 4);

    let mut bad = row("default", "abc");
    assert!(matches!(apns.send(&bad).await,
                     Delivery::Rejected { reason } if reason.starts_with("BadDeviceToken: ")));
    bad = row("default", TOKEN);
    bad.push_type = "background".into();
    assert!(matches!(apns.send(&bad).await,
                     Delivery::Rejected { reason } if reason.starts_with("BadPriority: ")));
    assert_eq!(
        apns.send(&row("other", TOKEN)).await,
        Delivery::rejected("unknown app \"other\": no [apps.other] section in the config")
    );
    assert_eq!(server.seen().len(), 4, "bad rows cost no request");
}

#[tokio::test]
async fn refused_credentials_defer_the_app_until_a_probe_succeeds() {
    let server = TestServer::start(|_| Action::reason(403, "InvalidProviderToken")).await;
    let (config, _) = token_app(&server, "default");
    let (other, _) = token_app(&server, "other");
    let apns = client(&[config, other], options());

    let first = apns.send(&row("default", TOKEN)).await;
    let Delivery::Deferred { reason, after } = first else {
        panic!("{first:?}")
    };
    assert!(reason.starts_with("InvalidProviderToken: "), "{reason}");
    assert!(after <= Duration::from_secs(1), "{after:?}");
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
    assert_eq!(server.seen().len(), 1);

    // Apple accepts the key again: the next probe after the backoff clears it.
    server.set_behavior(|_| Action::ok());
    let started = tokio::time::Instant::now();
    loop {
        match apns.send(&row("default", TOKEN)).await {
            Delivery::Sent { .. } => break,
            Delivery::Deferred { after, .. } => tokio::time::sleep(after).await,
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < DEADLINE);
    }
    assert_eq!(server.seen().len(), 2, "exactly one probe");
    assert_eq!(apns.health()[0], ("default".into(), Ok(())));
}

#[tokio::test]
async fn a_stale_provider_token_is_replaced_and_the_push_resent() {
    let server = TestServer::start(|seen| match seen.index {
        0 => Action::reason(403, "ExpiredProviderToken"),
        _ => Action::ok(),
    })
    .await;
    let (config, public) = token_app(&server, "default");
    let apns = client(
        &[config],
        Options {
            token_min_interval: Duration::ZERO,
            ..options()
        },
    );
    let d = apns.send(&row("default", TOKEN)).await;
    assert!(matches!(d, Delivery::Sent { .. }), "{d:?}");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0].bearer(), seen[1].bearer());
    provider_token::tests::verify(seen[1].bearer().unwrap(), &public);
    assert_eq!(seen[0].header("apns-id"), seen[1].header("apns-id"));
}

#[tokio::test]
async fn a_young_token_called_stale_defers_instead_of_minting() {
    let server = TestServer::start(|_| Action::reason(403, "ExpiredProviderToken")).await;
    let (config, _) = token_app(&server, "default");
    let apns = client(&[config], options());
    match apns.send(&row("default", TOKEN)).await {
        Delivery::Deferred { reason, .. } => {
            assert!(reason.contains("younger than 20 minutes"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn certificate_auth_presents_the_client_certificate() {
    let server = TestServer::builder()
        .client_certificates()
        .start(|_| Action::ok())
        .await;
    let key = testutil::rsa_key();
    let cert = server
        .ca
        .client(&key, "Apple Push Services: com.example.app");
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
    let seen = server.seen();
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some("Apple Push Services: com.example.app")
    );
    assert_eq!(seen[0].header("authorization"), None);
}

#[tokio::test]
async fn goaway_and_drops_mid_flight_lose_nothing() {
    let server = TestServer::start(|seen| match (seen.conn, seen.index % 7) {
        (0, 6) => Action::GoAway,
        (1, 6) => Action::Drop,
        (0 | 1, _) => Action::Hang,
        _ => Action::ok(),
    })
    .await;
    let (config, _) = token_app(&server, "default");
    let apns = client(&[config], options());
    let rows: Vec<_> = (0..100)
        .map(|i| row("default", &format!("{i:064x}")))
        .collect();
    let all = futures::future::join_all(rows.iter().map(|r| apns.send(r))).await;
    for d in all {
        assert!(matches!(d, Delivery::Sent { .. }), "{d:?}");
    }
    assert!(server.connections() >= 3);
}

#[tokio::test]
async fn an_unreachable_endpoint_defers_rows() {
    let server = TestServer::start(|_| Action::ok()).await;
    let (mut config, _) = token_app(&server, "default");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.endpoint = Endpoint::Custom {
        host: "127.0.0.1".into(),
        port: listener.local_addr().unwrap().port(),
    };
    drop(listener);
    let apns = client(
        &[config],
        Options {
            reconnect_base: Duration::from_secs(60),
            reconnect_max: Duration::from_secs(60),
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
    let server = TestServer::start(|seen| match seen.index {
        0 => Action::reason(400, "BadDeviceToken"),
        _ => Action::ok(),
    })
    .await;
    let (config, _) = token_app(&server, "default");
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
    };
    let build = |apps: &[AppConfig]| {
        let apps = apps.iter().map(|a| (a.name.clone(), a.clone())).collect();
        Apns::new(&apps).err().map(|e| e.to_string())
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

    let mut config = crate::config::Config::from_file_str(
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
