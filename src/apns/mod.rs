//! APNs: the HTTP/2 provider API client, behind [`Transport`].
//!
//! [`Apns`] holds one client per `[apps.NAME]` section and routes each notification by
//! its `app`. Per app: credentials loaded up front ([`jwt`], [`identity`]), a pool of
//! long-lived connections ([`pool`], [`connection`]), requests built by a pure function
//! ([`request`]) and answers mapped onto what the row becomes ([`response`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::{AppConfig, Config};
use crate::transport::{Delivery, Notification, Transport};

mod app;
pub mod connection;
pub mod identity;
pub mod jwt;
pub mod pool;
pub mod push_type;
pub mod request;
pub mod response;
#[cfg(test)]
mod testserver;
#[cfg(test)]
mod testutil;

use app::App;

/// A problem found while loading an app's credentials; always names the app and the file.
#[derive(Debug, thiserror::Error)]
pub enum ApnsError {
    #[error(
        "apps.{app}: protocol = \"binary\" is not implemented yet; use protocol = \"http2\" \
         (the default)"
    )]
    BinaryProtocol { app: String },
    #[error("apps.{app}: {source}")]
    Key { app: String, source: jwt::KeyError },
    #[error("apps.{app}: {source}")]
    Identity {
        app: String,
        source: identity::IdentityError,
    },
    #[error("apps.{app}: {}: the certificate expired on {not_after}; download a new one from Apple", path.display())]
    CertificateExpired {
        app: String,
        path: PathBuf,
        not_after: String,
    },
    #[error("apps.{app}: {message}")]
    Tls { app: String, message: String },
}

/// Timings that are not in the config file: sensible for Apple, shortened by tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// PING a connection that has had no answer for this long.
    pub ping_interval: Duration,
    /// A PING unanswered this long means the connection is dead.
    pub ping_timeout: Duration,
    pub connect_timeout: Duration,
    /// Backoff between failed connection attempts.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// Sends of a request the server never processed, beyond the first.
    pub max_resends: u32,
    /// Backoff of an app whose credentials APNs refuses.
    pub credentials_backoff_base: Duration,
    pub credentials_backoff_max: Duration,
    pub token_refresh_after: Duration,
    pub token_min_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect_base: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            max_resends: 3,
            credentials_backoff_base: Duration::from_secs(10),
            credentials_backoff_max: Duration::from_secs(5 * 60),
            token_refresh_after: jwt::REFRESH_AFTER,
            token_min_interval: jwt::MIN_INTERVAL,
        }
    }
}

/// The HTTP/2 transport for every app of the config.
pub struct Apns {
    apps: BTreeMap<String, App>,
}

impl Apns {
    /// Loads every app's credentials; the first problem fails start-up. Connects lazily.
    pub fn new(apps: &BTreeMap<String, AppConfig>) -> Result<Apns, ApnsError> {
        Apns::with_options(apps, Options::default())
    }

    pub fn with_options(
        apps: &BTreeMap<String, AppConfig>,
        options: Options,
    ) -> Result<Apns, ApnsError> {
        let apps = apps
            .iter()
            .map(|(name, config)| Ok((name.clone(), App::new(config, &options)?)))
            .collect::<Result<_, ApnsError>>()?;
        Ok(Apns { apps })
    }

    /// Per app: `Err` while APNs refuses its credentials or no connection can be had.
    pub fn health(&self) -> Vec<(String, Result<(), String>)> {
        self.apps
            .iter()
            .map(|(name, app)| (name.clone(), app.health()))
            .collect()
    }

    /// One attempt for one row.
    pub async fn deliver(&self, n: &Notification) -> Delivery {
        match self.apps.get(&n.app) {
            Some(app) => app.deliver(n).await,
            None => Delivery::rejected(format!(
                "unknown app {:?}: no [apps.{}] section in the config",
                n.app, n.app
            )),
        }
    }
}

impl Transport for Apns {
    fn send<'a>(&'a self, notification: &'a Notification) -> BoxFuture<'a, Delivery> {
        Box::pin(self.deliver(notification))
    }
}

/// Loads every key and certificate of every app, as `pgpushd check-config` does; one line
/// per problem, none when all is well.
pub fn check(config: &Config) -> Vec<String> {
    let options = Options::default();
    config
        .apps
        .values()
        .filter_map(|app| App::new(app, &options).err().map(|e| e.to_string()))
        .collect()
}

/// APNs's answer to one push sent by [`send_one`].
#[derive(Debug, Clone, PartialEq)]
pub struct OneAnswer {
    pub status: u16,
    /// APNs's `apns-id` (the one we sent, unless APNs chose another).
    pub apns_id: Option<String>,
    pub reason: Option<String>,
}

impl fmt::Display for OneAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(r) = &self.reason {
            write!(f, " {r}")?;
        }
        if let Some(id) = &self.apns_id {
            write!(f, " (apns-id {id})")?;
        }
        Ok(())
    }
}

/// Sends one push for `app`, without a database, and returns APNs's answer as is
/// (`pgpushd send`). Errors: the credentials, a row APNs would refuse, no connection.
pub async fn send_one(app: &AppConfig, n: &Notification) -> anyhow::Result<OneAnswer> {
    let mut config = app.clone();
    config.connections = 1;
    let client = App::new(&config, &Options::default())?;
    let (apns_id, answer) = client.send_one(n).await?;
    Ok(OneAnswer {
        status: answer.status,
        reason: answer.reason().map(|r| r.to_string()),
        apns_id: Some(answer.apns_id.unwrap_or_else(|| apns_id.to_string())),
    })
}

/// The first 8 hex digits of a device token: enough to find it, too little to use it.
pub fn short_token(token: &str) -> &str {
    match token.char_indices().nth(8) {
        Some((i, _)) => &token[..i],
        None => token,
    }
}

/// OpenSSL's reasons ("bad decrypt", "unsupported"), without file names and line numbers
/// of OpenSSL's own source, and never any data.
pub(crate) fn openssl_reason(e: &openssl::error::ErrorStack) -> String {
    let reasons: Vec<&str> = e.errors().iter().filter_map(|e| e.reason()).collect();
    match reasons.is_empty() {
        true => "unknown OpenSSL error".to_owned(),
        false => reasons.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::testserver::{Action, TestServer, DEADLINE};
    use crate::apns::testutil;
    use crate::config::{Auth, CertificateAuth, Endpoint, Protocol, TokenAuth};
    use openssl::ec::EcKey;
    use openssl::pkey::Public;
    use std::time::UNIX_EPOCH;

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
        }
    }

    /// A token-auth app with a fresh `.p8` key; returns the key's public half too.
    fn token_app(server: &TestServer, name: &str) -> (AppConfig, EcKey<Public>) {
        let (pem, public) = jwt::tests::p8();
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
        let claims = jwt::tests::verify(s.bearer().unwrap(), &public);
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
                reason: "Unregistered: the device token is inactive for the topic (HTTP 410)"
                    .into(),
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
        jwt::tests::verify(seen[1].bearer().unwrap(), &public);
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
        assert_eq!(
            build(std::slice::from_ref(&binary)).unwrap(),
            "apps.legacy: protocol = \"binary\" is not implemented yet; use protocol = \"http2\" (the default)"
        );

        let mut cert = base.clone();
        cert.name = "cert".into();
        cert.auth = Auth::Certificate(CertificateAuth {
            file: dir.path().join("ck.pem"),
            passphrase_file: None,
        });
        let mut ca = base.clone();
        ca.name = "ca".into();
        let (pem, _) = jwt::tests::p8();
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

        let config = Config {
            database: crate::config::Config::from_file_str(
                std::path::Path::new("x.toml"),
                "[database]\nurl = \"postgres://x@y/z\"\n",
                None,
            )
            .unwrap()
            .database,
            retry: crate::config::RetryConfig {
                max_attempts: 1,
                backoff_base: Duration::from_secs(1),
                backoff_max: Duration::from_secs(1),
            },
            apps: [base, binary, cert, ca, good.clone()]
                .into_iter()
                .map(|a| (a.name.clone(), a))
                .collect(),
            metrics: Default::default(),
            retention: Default::default(),
        };
        let problems = check(&config);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(
            problems.iter().any(
                |p| p.starts_with("apps.ca: ") && p.contains("ca.pem: cannot read the CA file")
            ),
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
}
