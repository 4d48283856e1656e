//! Shared test support: a real PostgreSQL per test, a scripted transport, and waiting on
//! conditions with deadlines (never sleeping as synchronisation).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use pgpushd::config::Config;
use pgpushd::devdb::DevDb;
use pgpushd::secret::Secret;
use pgpushd::transport::{Delivery, MessageId, Notification, Transport};
use tokio_postgres::Client;

/// Points the tests at an existing server instead of a throwaway cluster per test.
pub const TEST_DATABASE_URL_ENV: &str = "PGPUSHD_TEST_DATABASE_URL";

/// A database of its own for one test: on a throwaway cluster, or on the server
/// `PGPUSHD_TEST_DATABASE_URL` names.
pub struct TestDb {
    pub url: String,
    /// The cluster, when the test owns one (so it may stop and restart it).
    pub cluster: Option<DevDb>,
}

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

impl TestDb {
    /// A fresh, migrated database.
    pub async fn new() -> TestDb {
        let db = TestDb::unmigrated().await;
        db.migrate().await;
        db
    }

    /// A fresh, empty database.
    pub async fn unmigrated() -> TestDb {
        match std::env::var(TEST_DATABASE_URL_ENV) {
            Ok(base) if !base.is_empty() => {
                let name = format!(
                    "pgpushd_test_{}_{}",
                    std::process::id(),
                    NEXT_DB.fetch_add(1, Ordering::Relaxed)
                );
                let admin = plain_client(&base).await;
                admin
                    .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                    .await
                    .unwrap();
                TestDb {
                    url: with_dbname(&base, &name),
                    cluster: None,
                }
            }
            _ => TestDb::own_cluster(),
        }
    }

    /// A database on a cluster of the test's own (for tests that stop PostgreSQL).
    pub async fn with_own_cluster() -> TestDb {
        let db = TestDb::own_cluster();
        db.migrate().await;
        db
    }

    fn own_cluster() -> TestDb {
        let cluster = DevDb::start().expect("a throwaway PostgreSQL cluster");
        let url = cluster.create_database("pgpushd").unwrap();
        TestDb {
            url,
            cluster: Some(cluster),
        }
    }

    async fn migrate(&self) {
        let mut client = self.client().await;
        pgpushd::outbox::migrate::migrate(&mut client)
            .await
            .unwrap();
    }

    pub async fn client(&self) -> Client {
        plain_client(&self.url).await
    }

    pub fn cluster(&mut self) -> &mut DevDb {
        self.cluster
            .as_mut()
            .expect("this test needs its own cluster")
    }
}

fn with_dbname(url: &str, name: &str) -> String {
    // postgres://user@host:port/db?params -> .../name?params
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

pub async fn plain_client(url: &str) -> Client {
    pgpushd::db::connect(
        &Secret::new(url.to_owned()),
        Duration::from_secs(10),
        "test",
    )
    .await
    .unwrap()
}

/// A config for `db` with short timings, apps configured by the caller if needed.
pub fn config(db_url: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[database]
url = "{db_url}"
poll_interval = "1h"
batch_size = 100
max_batches_in_flight = 4
keepalive_interval = "1s"
connect_timeout = "2s"

[retry]
max_attempts = 3
backoff_base = "50ms"
backoff_max = "200ms"
{extra}
"#
    );
    Config::from_file_str(Path::new("test.toml"), &text, None).unwrap()
}

/// What a [`ScriptedTransport`] answers for a token.
#[derive(Clone)]
pub enum Script {
    Answer(Delivery),
}

/// A transport that records every send and answers `Sent` unless scripted otherwise.
#[derive(Default)]
pub struct ScriptedTransport {
    pub scripts: Mutex<HashMap<String, Script>>,
    /// Row ids, in the order their requests started.
    pub sent: Mutex<Vec<i64>>,
    pub delay: Mutex<Duration>,
    /// Tokens whose requests go out (`transport::request_went_out`) before the delay.
    pub goes_out: Mutex<std::collections::HashSet<String>>,
}

impl ScriptedTransport {
    pub fn new() -> Arc<ScriptedTransport> {
        Arc::new(ScriptedTransport::default())
    }
    pub fn script(&self, token: &str, s: Script) {
        self.scripts.lock().unwrap().insert(token.to_owned(), s);
    }
    pub fn sent_ids(&self) -> Vec<i64> {
        self.sent.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }
}

impl Transport for ScriptedTransport {
    fn send<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            let script = self.scripts.lock().unwrap().get(&n.device_token).cloned();
            self.sent.lock().unwrap().push(n.id);
            if self.goes_out.lock().unwrap().contains(&n.device_token) {
                pgpushd::transport::request_went_out();
            }
            let delay = *self.delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match script {
                Some(Script::Answer(d)) => d,
                None => Delivery::Sent {
                    id: Some(MessageId::Apns(uuid::Uuid::new_v4())),
                },
            }
        })
    }
}

/// A tool a test needs is missing: the test says SKIPPED and returns, except under CI
/// (`CI=true`), which installs every tool (`.ci/run`) and where a skip would hide a
/// check that never ran: there it fails.
pub fn skip_without(tool: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{tool} is missing, and CI=true: every tool the tests use must be there");
    }
    eprintln!("SKIPPED: {tool} is missing");
}

/// Polls `check` until it returns `Some`, failing the test with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > give_up {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Row counts by status.
pub async fn counts(client: &Client) -> HashMap<String, i64> {
    client
        .query(
            "SELECT status, count(*) FROM pgpushd.outbox GROUP BY status",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub async fn count(client: &Client, status: &str) -> i64 {
    counts(client).await.get(status).copied().unwrap_or(0)
}

/// Waits until `n` rows have `status`.
pub async fn wait_for_status(client: &Client, status: &str, n: i64, deadline: Duration) {
    wait_for(&format!("{n} rows {status}"), deadline, || async {
        (count(client, status).await >= n).then_some(())
    })
    .await
}

/// A 64-digit hex token, distinct per `i`.
pub fn token(i: u64) -> String {
    format!("{i:064x}")
}

/// Inserts `n` rows (one statement) for tokens `token(first..first+n)`.
pub async fn insert_rows(client: &Client, first: u64, n: u64) {
    client
        .execute(
            "INSERT INTO pgpushd.outbox (device_token, payload)
             SELECT lpad(to_hex(g), 64, '0'), '{\"aps\":{\"alert\":\"hello\"}}'
               FROM generate_series($1::bigint, $2::bigint) g",
            &[&(first as i64), &((first + n - 1) as i64)],
        )
        .await
        .unwrap();
}

/// An emulator with token auth and the `[apps.default]` config that reaches it.
pub struct ApnsSetup {
    pub emulator: pgpushd_emulator::Emulator,
    pub dir: tempfile::TempDir,
    /// TOML for `[apps.default]` (token auth, topic `com.example.app`).
    pub app_toml: String,
}

pub const TOPIC: &str = "com.example.app";
pub const KEY_ID: &str = "ABC123DEFG";
pub const TEAM_ID: &str = "DEF123GHIJ";

/// TOML for `[apps.default]` with token auth (`KEY_ID`, `TEAM_ID`, topic `TOPIC`)
/// against `endpoint`, trusting `ca_file`.
pub fn token_app_toml(endpoint: &str, ca_file: &Path, key_file: &Path) -> String {
    format!(
        r#"
[apps.default]
topic = "{TOPIC}"
endpoint = "{endpoint}"
ca_file = "{ca}"
connections = 2
request_timeout = "5s"

[apps.default.token]
key_file = "{key}"
key_id = "{KEY_ID}"
team_id = "{TEAM_ID}"
"#,
        ca = ca_file.display(),
        key = key_file.display(),
    )
}

impl ApnsSetup {
    pub async fn new(tweak: impl FnOnce(&mut pgpushd_emulator::EmulatorConfig)) -> ApnsSetup {
        let dir = tempfile::tempdir().unwrap();
        let key = pgpushd_emulator::jwt::generate_signing_key().unwrap();
        let key_file = dir.path().join("AuthKey.p8");
        std::fs::write(&key_file, &key).unwrap();
        let mut cfg = pgpushd_emulator::EmulatorConfig {
            auth: pgpushd_emulator::EmulatorAuth::Token {
                public_key_pem: key,
                key_id: KEY_ID.into(),
                team_id: TEAM_ID.into(),
            },
            topic: Some(TOPIC.into()),
            ..Default::default()
        };
        tweak(&mut cfg);
        let emulator = pgpushd_emulator::Emulator::start(cfg).await.unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, emulator.ca_pem()).unwrap();
        let app_toml = token_app_toml(&emulator.endpoint(), &ca_file, &key_file);
        ApnsSetup {
            emulator,
            dir,
            app_toml,
        }
    }

    /// The daemon's transport for `config`.
    pub fn transport(config: &Config) -> Arc<dyn Transport> {
        Arc::new(pgpushd::providers::Providers::new(&config.apps).unwrap())
    }
}

/// A spawned daemon, killed if a failing test leaves it running.
pub struct Spawned(pub std::process::Child);

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A daemon running in this process, on this runtime.
pub struct Running {
    pub metrics: Arc<pgpushd::metrics::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts a daemon with `transport`.
pub fn start(config: Config, transport: Arc<dyn Transport>) -> Running {
    let daemon = pgpushd::daemon::Daemon::new(config, transport);
    let metrics = daemon.metrics().clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { daemon.run(cancel).await }
    });
    Running {
        metrics,
        cancel,
        task,
    }
}

impl Running {
    /// Stops it (the drain included) and checks it ended well.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }

    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    try_http_get(port, path).unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// [`http_get`] for a poll: `Err` when nothing (or nothing whole) answered in 5 s.
pub fn try_http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let read = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    };
    let text = read().map_err(|e| e.to_string())?;
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The proxy variables a spawned pgpushd must not inherit from whoever runs the tests:
/// with them, its connections to the emulators would go through that proxy.
pub const PROXY_VARIABLES: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"];

/// The `pgpushd` binary this test run built, without the runner's proxy variables.
pub fn pgpushd_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgpushd"));
    for v in PROXY_VARIABLES {
        cmd.env_remove(v);
    }
    cmd
}

/// Stops (SIGSTOP) PostgreSQL backends for as long as it lives, and lets them go on drop,
/// even when the test fails: a stopped backend would hold up the cluster's shutdown.
pub struct StoppedBackends(Vec<i32>);

impl StoppedBackends {
    /// Stops every backend of the sessions named `application_name` (at least one).
    pub async fn of(client: &Client, application_name: &str) -> StoppedBackends {
        let pids: Vec<i32> = client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&application_name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!pids.is_empty(), "no {application_name} session to stop");
        StoppedBackends::stop(pids)
    }

    pub fn stop(pids: Vec<i32>) -> StoppedBackends {
        for &pid in &pids {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .unwrap();
        }
        StoppedBackends(pids)
    }
}

impl Drop for StoppedBackends {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
}
