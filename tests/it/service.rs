//! The daemon as a service, spawned as the real binary: systemd notifications, SIGTERM
//! drain, SIGHUP reload, metrics and health.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

pub(crate) fn spawn(config: &Path, env: &[(&str, &str)]) -> Spawned {
    let mut cmd = pgpushd_command();
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Spawned(cmd.spawn().unwrap())
}

pub(crate) fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

pub(crate) fn wait_exit(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let give_up = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < give_up,
            "the daemon did not exit within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A datagram socket standing in for systemd's `$NOTIFY_SOCKET`.
struct NotifySocket {
    path: PathBuf,
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            path,
            socket,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram containing `line`, keeping everything seen.
    fn wait_for(&mut self, line: &str, deadline: Duration) -> usize {
        let give_up = Instant::now() + deadline;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(i) = self.seen.iter().position(|m| m.lines().any(|l| l == line)) {
                return i;
            }
            assert!(
                Instant::now() < give_up,
                "no {line} within {deadline:?}; saw {:?}",
                self.seen
            );
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// Forgets what was seen so far.
    fn clear(&mut self) {
        self.seen.clear();
    }

    /// Keeps everything that arrives for `how_long`.
    fn drain(&mut self, how_long: Duration) {
        let until = Instant::now() + how_long;
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

pub(crate) fn write_config(dir: &Path, db_url: &str, database_extra: &str, rest: &str) -> PathBuf {
    let path = dir.join("pgpushd.toml");
    std::fs::write(
        &path,
        format!("[database]\nurl = \"{db_url}\"\n{database_extra}\n{rest}"),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_reloading_and_stopping() {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let path = write_config(apns.dir.path(), &db.url, "", &apns.app_toml);
    let mut notify = NotifySocket::bind(apns.dir.path());
    let socket = notify.path.to_str().unwrap().to_owned();
    let mut daemon = spawn(
        &path,
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "1000000")],
    );

    notify.wait_for("READY=1", Duration::from_secs(20));
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    // An idle daemon pings every half period (here 0.5 s), not only when its loop
    // happened to turn lately.
    notify.clear();
    notify.drain(Duration::from_secs(3));
    let pings = notify
        .seen
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 5,
        "{pings} watchdog pings in 3 s at WATCHDOG_USEC=1s"
    );
    let status = notify.wait_for_prefix("STATUS=", Duration::from_secs(10));
    assert!(status.contains("pending"), "{status}");

    notify.clear();
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1", Duration::from_secs(5));
    assert!(notify.seen[reloading].contains("MONOTONIC_USEC="));
    let ready = notify.wait_for("READY=1", Duration::from_secs(5));
    assert!(ready > reloading);

    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(wait_exit(&mut daemon, Duration::from_secs(25)).success());
}

impl NotifySocket {
    fn wait_for_prefix(&mut self, prefix: &str, deadline: Duration) -> String {
        let give_up = Instant::now() + deadline;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self
                .seen
                .iter()
                .flat_map(|m| m.lines())
                .find(|l| l.starts_with(prefix))
            {
                return m.to_owned();
            }
            assert!(
                Instant::now() < give_up,
                "no {prefix} within {deadline:?}; saw {:?}",
                self.seen
            );
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_drain_stops_cleanly_and_a_restart_finishes() {
    const ROWS: i64 = 20_000;
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|c| {
        c.latency = Duration::from_millis(20);
        c.keep_records = 0;
    })
    .await;
    let path = write_config(
        apns.dir.path(),
        &db.url,
        "batch_size = 200",
        &format!("[daemon]\nshutdown_timeout = \"3s\"\n{}", apns.app_toml),
    );
    let client = db.client().await;
    insert_rows(&client, 1, ROWS as u64).await;

    let mut daemon = spawn(&path, &[]);
    wait_for(
        "the drain to be under way",
        Duration::from_secs(30),
        || async { (count(&client, "sent").await >= 1000).then_some(()) },
    )
    .await;
    let asked = Instant::now();
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(
        asked.elapsed() < Duration::from_secs(3 + 5 + 2),
        "took {:?}",
        asked.elapsed()
    );

    let counts = counts(&client).await;
    let (sent, pending) = (
        counts.get("sent").copied().unwrap_or(0),
        counts.get("pending").copied().unwrap_or(0),
    );
    assert_eq!(sent + pending, ROWS, "{counts:?}");
    assert!(
        pending > 0,
        "the drain finished before the signal; nothing was tested"
    );
    let locked: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(locked, 0, "rows are still held");

    let mut again = spawn(&path, &[]);
    wait_for_status(&client, "sent", ROWS, Duration::from_secs(60)).await;
    signal(&again, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut again, Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_poll_interval_and_survives_an_invalid_file() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("DROP TRIGGER outbox_notify ON pgpushd.outbox")
        .await
        .unwrap();
    let apns = ApnsSetup::new(|_| {}).await;
    let dir = apns.dir.path();
    let path = write_config(dir, &db.url, "poll_interval = \"1h\"", &apns.app_toml);
    let mut notify = NotifySocket::bind(dir);
    let socket = notify.path.to_str().unwrap().to_owned();
    let mut daemon = spawn(&path, &[("NOTIFY_SOCKET", &socket)]);
    notify.wait_for("READY=1", Duration::from_secs(20));

    // Without the trigger and with an hour's poll, this row waits ...
    insert_rows(&client, 1, 1).await;
    // ... until a reload brings the poll interval down.
    write_config(dir, &db.url, "poll_interval = \"200ms\"", &apns.app_toml);
    notify.clear();
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    notify.wait_for("READY=1", Duration::from_secs(5));
    wait_for_status(&client, "sent", 1, Duration::from_secs(5)).await;

    // An invalid file: reported, the old config kept, the daemon still delivering.
    std::fs::write(&path, "[database\nthis is not toml").unwrap();
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    insert_rows(&client, 2, 1).await;
    wait_for_status(&client, "sent", 2, Duration::from_secs(5)).await;
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon exited on a bad reload"
    );

    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(25)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_table_and_healthz_reports_refused_credentials() {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let port = free_port();
    let path = write_config(
        apns.dir.path(),
        &db.url,
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
            apns.app_toml
        ),
    );
    for i in 1..=3 {
        apns.emulator.script(&token(i), 400, "BadDeviceToken");
    }
    let client = db.client().await;
    insert_rows(&client, 1, 100).await;
    let mut daemon = spawn(&path, &[]);
    wait_for("every row settled", Duration::from_secs(20), || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;

    // Rows are counted just after their batch commits: wait for the last batch's.
    let value = |body: &str, needle: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let body = wait_for("every row counted", Duration::from_secs(20), || async {
        let (status, body) = http_get(port, "/metrics");
        let counted = value(
            &body,
            r#"pgpushd_rows_total{app="default",outcome="sent",reason="none"}"#,
        ) + value(
            &body,
            r#"pgpushd_rows_total{app="default",outcome="failed",reason="BadDeviceToken"}"#,
        );
        (status == 200 && counted as i64 == 100).then_some(body)
    })
    .await;
    let metric = |needle: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in\n{body}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        metric(r#"pgpushd_rows_total{app="default",outcome="sent",reason="none"}"#) as i64,
        count(&client, "sent").await
    );
    assert_eq!(
        metric(r#"pgpushd_rows_total{app="default",outcome="failed",reason="BadDeviceToken"}"#)
            as i64,
        count(&client, "failed").await
    );
    assert_eq!(
        metric("pgpushd_push_request_duration_seconds_count") as i64,
        100
    );
    assert_eq!(metric(r#"pgpushd_app_healthy{app="default"}"#), 1.0);
    assert_eq!(metric("pgpushd_database_up"), 1.0);
    assert_eq!(http_get(port, "/healthz").0, 200);
    // `pgpushd health` (a container's health check) says the same, by its exit code.
    let health = || {
        pgpushd_command()
            .args(["health", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = health();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 200"));

    // The emulator refuses the credentials: the app turns unhealthy.
    apns.emulator
        .script(&token(500), 403, "InvalidProviderToken");
    insert_rows(&client, 500, 1).await;
    let body = wait_for("healthz to turn 503", Duration::from_secs(10), || async {
        let (status, body) = http_get(port, "/healthz");
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("InvalidProviderToken"), "{body}");
    let out = health();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unhealthy: HTTP/1.1 503") && stderr.contains("InvalidProviderToken"),
        "{stderr}"
    );

    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(25)).success());
    let out = health();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the daemon running?"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_deadline_counts_the_requests_out_and_releases_the_rest_untouched() {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let path = write_config(
        apns.dir.path(),
        &db.url,
        "",
        &format!("[daemon]\nshutdown_timeout = \"500ms\"\n{}", apns.app_toml),
    );
    let client = db.client().await;
    // One quick success first: under token auth APNs raises a connection's stream limit
    // only then.
    let mut daemon = spawn(&path, &[]);
    insert_rows(&client, 1, 1).await;
    wait_for_status(&client, "sent", 1, Duration::from_secs(20)).await;
    client
        .batch_execute("TRUNCATE pgpushd.outbox")
        .await
        .unwrap();
    apns.emulator.set_latency(Duration::from_secs(30));
    insert_rows(&client, 1, 500).await;
    wait_for("requests in flight", Duration::from_secs(20), || async {
        (apns.emulator.stats().requests_in_flight >= 100).then_some(())
    })
    .await;
    let asked = Instant::now();
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(10)).success());
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "took {:?}",
        asked.elapsed()
    );

    // A request that went out may have been delivered: its attempt counts (issue 20,
    // item 8). The rows whose requests never left are released untouched.
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE attempts = 0 AND last_error IS NULL),
                    count(*) FILTER (WHERE attempts = 1
                                       AND last_error LIKE 'no answer before the batch gave up%'),
                    count(*) FILTER (WHERE status = 'pending')
               FROM pgpushd.outbox",
            &[],
        )
        .await
        .unwrap();
    let (untouched, attempted) = (row.get::<_, i64>(0), row.get::<_, i64>(1));
    assert_eq!(row.get::<_, i64>(2), 500, "every row pending");
    assert_eq!(untouched + attempted, 500, "rows were touched otherwise");
    assert!(attempted > 0, "requests were in flight");
    // An attempt for each request that reached APNs (its stream cut when the daemon
    // exited), none for the others.
    wait_for(
        "the emulator to count the streams cut",
        Duration::from_secs(5),
        || async { (apns.emulator.stats().streams_abandoned == attempted as u64).then_some(()) },
    )
    .await;

    apns.emulator.set_latency(Duration::ZERO);
    let mut again = spawn(&path, &[]);
    wait_for_status(&client, "sent", 500, Duration::from_secs(30)).await;
    signal(&again, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut again, Duration::from_secs(15)).success());
}

/// A batch whose database backend stops answering (SIGSTOP: the kernel still keeps its
/// socket alive, so only the daemon's own bounds can notice) is stuck: `/healthz` says so
/// and the watchdog ping is withheld, so systemd would restart the daemon. Once the
/// backend answers again the batch is abandoned, the pings resume, and its row is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_batch_withholds_the_watchdog_until_it_ends() {
    let db = TestDb::with_own_cluster().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let port = free_port();
    let path = write_config(
        apns.dir.path(),
        &db.url,
        "connect_timeout = \"1s\"\nmax_batch_duration = \"2s\"\nmax_batches_in_flight = 1",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
            // A batch must outlive four times its requests' bound.
            apns.app_toml
                .replace("request_timeout = \"5s\"", "request_timeout = \"500ms\"")
        ),
    );
    let mut notify = NotifySocket::bind(apns.dir.path());
    let socket = notify.path.to_str().unwrap().to_owned();
    let mut daemon = spawn(
        &path,
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "1000000")],
    );
    // Its connect_timeout of 1s can fail a start on a loaded machine: it retries.
    notify.wait_for("READY=1", Duration::from_secs(60));
    let client = db.client().await;
    insert_rows(&client, 1, 10).await;
    wait_for_status(&client, "sent", 10, Duration::from_secs(20)).await;
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    assert_eq!(http_get(port, "/healthz").0, 200);

    let stopped = StoppedBackends::of(&client, "pgpushd-batch").await;
    insert_rows(&client, 11, 1).await;

    let body = wait_for(
        "healthz to report the stuck batch",
        Duration::from_secs(20),
        || async {
            let (status, body) = http_get(port, "/healthz");
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(body.contains("past max_batch_duration"), "{body}");
    // Pings already on their way before the batch counted as stuck, then none at all.
    notify.drain(Duration::from_millis(700));
    notify.clear();
    notify.drain(Duration::from_millis(2500));
    assert!(
        !notify
            .seen
            .iter()
            .any(|m| m.lines().any(|l| l == "WATCHDOG=1")),
        "the watchdog was pinged while a batch was stuck: {:?}",
        notify.seen
    );

    drop(stopped);
    notify.wait_for("WATCHDOG=1", Duration::from_secs(15));
    wait_for_status(&client, "sent", 11, Duration::from_secs(20)).await;
    assert_eq!(http_get(port, "/healthz").0, 200);

    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(25)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_the_database_is_out_of_reach_at_start_up() {
    let apns = ApnsSetup::new(|_| {}).await;
    let port = free_port();
    // Nothing listens on the database's port.
    let path = write_config(
        apns.dir.path(),
        &format!("postgres://postgres@127.0.0.1:{}/pgpushd", free_port()),
        "connect_timeout = \"1s\"",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
            apns.app_toml
        ),
    );
    let mut daemon = spawn(&path, &[]);
    // An answer, not a probe left waiting: 503 with the reason.
    let body = wait_for("/healthz to answer", Duration::from_secs(20), || async {
        let (status, body) = try_http_get(port, "/healthz").ok()?;
        assert_eq!(status, 503, "{body}");
        body.contains("unreachable at start-up").then_some(body)
    })
    .await;
    assert!(body.contains("Connection refused"), "{body}");
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut daemon, Duration::from_secs(10)).success());
}
