//! `pgpushd status` against a real PostgreSQL: rows in every state, and the numbers the
//! status shows for them; the command's exit codes.

use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use pgpushd::outbox::status::{AppCounts, ErrorCount, StatusReport};
use tokio_postgres::Client;

/// Inserts `n` rows of `app` in `status`; times are SQL intervals relative to now.
#[allow(clippy::too_many_arguments)]
async fn rows(
    client: &Client,
    n: i64,
    app: &str,
    status: &str,
    send_after: &str,
    settled: Option<&str>,
    attempts: i32,
    last_error: Option<&str>,
) {
    client
        .execute(
            "INSERT INTO pgpushd.outbox
                    (app, device_token, payload, status, send_after, settled_at, attempts, last_error)
             SELECT $2, 'abcd', '{}', $3, now() + $4::text::interval,
                    now() + $5::text::interval, $6, $7
               FROM generate_series(1, $1::bigint)",
            &[&n, &app, &status, &send_after, &settled, &attempts, &last_error],
        )
        .await
        .unwrap();
}

async fn fill(client: &Client) {
    // default: 3 sent, 2 failed just now, 1 failed two days ago (outside the error
    // window), 1 expired, 2 due (one for ten minutes), 1 retrying later, 1 scheduled.
    rows(
        client,
        3,
        "default",
        "sent",
        "-1 hour",
        Some("-1 hour"),
        1,
        None,
    )
    .await;
    let bad = Some("BadDeviceToken");
    rows(
        client,
        2,
        "default",
        "failed",
        "-1 hour",
        Some("-1 hour"),
        1,
        bad,
    )
    .await;
    rows(
        client,
        1,
        "default",
        "failed",
        "-2 days",
        Some("-2 days"),
        1,
        Some("Old"),
    )
    .await;
    let expired = Some("expired before it could be sent");
    rows(
        client,
        1,
        "default",
        "expired",
        "-3 hours",
        Some("-2 hours"),
        0,
        expired,
    )
    .await;
    rows(
        client,
        1,
        "default",
        "pending",
        "-10 minutes",
        None,
        0,
        None,
    )
    .await;
    rows(client, 1, "default", "pending", "-1 second", None, 0, None).await;
    let unavailable = Some("ServiceUnavailable");
    rows(
        client,
        1,
        "default",
        "pending",
        "1 hour",
        None,
        2,
        unavailable,
    )
    .await;
    rows(client, 1, "default", "pending", "5 minutes", None, 0, None).await;
    // other: 1 sent, 1 due for a minute, 2 failed.
    rows(
        client,
        1,
        "other",
        "sent",
        "-1 hour",
        Some("-1 hour"),
        1,
        None,
    )
    .await;
    rows(client, 1, "other", "pending", "-1 minute", None, 0, None).await;
    rows(
        client,
        2,
        "other",
        "failed",
        "-1 hour",
        Some("-1 hour"),
        1,
        bad,
    )
    .await;
    client
        .batch_execute(
            "INSERT INTO pgpushd.unregistered_tokens (app, device_token, unregistered_at) VALUES
                 ('default', 'aa01', now() - interval '1 hour'),
                 ('default', 'aa02', now() - interval '3 hours'),
                 ('other', 'bb01', now() - interval '1 day')",
        )
        .await
        .unwrap();
}

fn about(d: Duration, secs: u64) -> bool {
    d >= Duration::from_secs(secs) && d < Duration::from_secs(secs + 60)
}

#[tokio::test]
async fn the_status_counts_rows_in_every_state() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let empty = StatusReport::read(&mut client).await.unwrap();
    assert!(empty.apps.is_empty() && empty.oldest_due.is_none() && empty.errors.is_empty());
    assert!(empty.to_string().contains("(the outbox is empty)"));

    fill(&client).await;
    let s = StatusReport::read(&mut client).await.unwrap();
    assert_eq!(
        s.apps,
        [
            AppCounts {
                app: "default".into(),
                pending: 4,
                due: 2,
                retrying: 1,
                sent: 3,
                failed: 3,
                expired: 1,
            },
            AppCounts {
                app: "other".into(),
                pending: 1,
                due: 1,
                retrying: 0,
                sent: 1,
                failed: 2,
                expired: 0,
            },
        ]
    );
    let oldest = s.oldest_due.as_ref().unwrap();
    assert_eq!(oldest.app, "default");
    assert!(about(oldest.overdue, 600), "{oldest:?}");
    assert!(s.next_scheduled.unwrap() <= Duration::from_secs(300));
    assert!(s.next_scheduled.unwrap() > Duration::from_secs(240));

    let error = |count, status: &str, app: &str, error: &str| ErrorCount {
        status: status.into(),
        app: app.into(),
        error: error.into(),
        count,
    };
    assert_eq!(
        s.errors,
        [
            error(2, "failed", "default", "BadDeviceToken"),
            error(2, "failed", "other", "BadDeviceToken"),
            error(1, "expired", "default", "expired before it could be sent"),
            error(1, "pending", "default", "ServiceUnavailable"),
        ]
    );

    let unregistered: Vec<(&str, i64)> = s
        .unregistered
        .iter()
        .map(|u| (u.app.as_str(), u.tokens))
        .collect();
    assert_eq!(unregistered, [("default", 2), ("other", 1)]);
    assert!(about(s.unregistered[0].newest, 3600));
    let newest: Vec<&str> = s
        .newest_unregistered
        .iter()
        .map(|t| t.device_token.as_str())
        .collect();
    assert_eq!(newest, ["aa01", "aa02", "bb01"]);

    let text = s.to_string();
    for line in [
        "  APP      PENDING  DUE  RETRYING  SENT  FAILED  EXPIRED",
        "  default        4    2         1     3       3        1",
        "  other          1    1         0     1       2        0",
        "  (all)          5    3         1     4       5        1",
        "      2  failed   default  BadDeviceToken",
        "  default       2  1h ago",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in\n{text}"
        );
    }
    assert!(
        text.contains("Oldest due row:  id ") && text.contains("due for 10m"),
        "{text}"
    );
}

fn pgpushd(config: &std::path::Path, flags: &[&str]) -> (i32, String, String) {
    let out = pgpushd_command()
        .arg("status")
        .args(flags)
        .arg("--config")
        .arg(config)
        .env_remove("PGPUSHD_DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_command_prints_it_and_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpushd.toml");

    let db = TestDb::unmigrated().await;
    std::fs::write(&config, format!("[database]\nurl = \"{}\"\n", db.url)).unwrap();
    let (code, _, stderr) = pgpushd(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("run `pgpushd migrate"), "{stderr}");

    let mut client = db.client().await;
    pgpushd::outbox::migrate::migrate(&mut client)
        .await
        .unwrap();
    fill(&client).await;
    let (code, stdout, stderr) = pgpushd(&config, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("  (all)          5    3         1     4       5        1"),
        "{stdout}"
    );

    let token = "feedface".repeat(8);
    client
        .execute(
            "INSERT INTO pgpushd.unregistered_tokens (app, device_token) VALUES ('other', $1)",
            &[&token],
        )
        .await
        .unwrap();
    let (code, short, stderr) = pgpushd(&config, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(short.contains("  other    feedface  "), "{short}");
    assert!(!short.contains("feedfacefeed"), "{short}");
    let (code, full, stderr) = pgpushd(&config, &["--full-tokens"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(full.contains(&format!("  other    {token}  ")), "{full}");

    std::fs::write(
        &config,
        "[database]\nurl = \"postgres://pgpushd:hunter2@127.0.0.1:1/app\"\nconnect_timeout = \"2s\"\n",
    )
    .unwrap();
    let (code, _, stderr) = pgpushd(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot reach the database"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    std::fs::write(
        &config,
        "[database]\nurl = \"postgres://x@y/z\"\nbatch_size = 0\n",
    )
    .unwrap();
    let (code, _, stderr) = pgpushd(&config, &[]);
    assert_eq!(code, 78, "{stderr}");
}

/// Removes the CHECK migration 3 added (`isfinite(send_after)`, `NOT VALID`), in this
/// test's own throwaway database, so rows can be inserted the way a database older than
/// version 3 may still hold them. A CHECK cannot be bypassed otherwise
/// (`session_replication_role` only silences triggers). Found by its definition rather
/// than its name, so a renamed constraint does not break the test.
async fn allow_infinite_send_after(client: &Client) {
    client
        .batch_execute(
            "DO $$
             DECLARE c name;
             BEGIN
                 FOR c IN SELECT conname FROM pg_constraint
                           WHERE conrelid = 'pgpushd.outbox'::regclass AND contype = 'c'
                             AND pg_get_constraintdef(oid) LIKE '%isfinite%'
                 LOOP
                     EXECUTE format('ALTER TABLE pgpushd.outbox DROP CONSTRAINT %I', c);
                 END LOOP;
             END $$",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_status_copes_with_infinite_timestamps() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    allow_infinite_send_after(&client).await;
    client
        .batch_execute(
            "INSERT INTO pgpushd.outbox (app, device_token, payload, send_after, expires_at, created_at)
             VALUES ('legacy', 'abcd', '{}', '-infinity', 'infinity', '-infinity'),
                    ('legacy', 'abcd', '{}', 'infinity', '-infinity', 'infinity'),
                    ('legacy', 'abcd', '{}', now() + interval '1 hour', 'infinity', 'infinity');
             INSERT INTO pgpushd.outbox
                    (app, device_token, payload, status, send_after, settled_at, last_error)
             VALUES ('legacy', 'abcd', '{}', 'failed', '-infinity', 'infinity', 'BadDeviceToken');
             INSERT INTO pgpushd.unregistered_tokens (app, device_token, unregistered_at)
             VALUES ('legacy', 'cc01', '-infinity')",
        )
        .await
        .unwrap();

    let s = StatusReport::read(&mut client)
        .await
        .expect("status reads legacy rows with infinite timestamps");
    assert_eq!(
        s.apps,
        [AppCounts {
            app: "legacy".into(),
            pending: 3,
            due: 1,
            retrying: 0,
            sent: 0,
            failed: 1,
            expired: 0,
        }]
    );
    assert_eq!(s.oldest_due.as_ref().unwrap().overdue, Duration::MAX);
    // The row due at infinity never falls due: the next one is the finite one.
    let next = s.next_scheduled.unwrap();
    assert!(next > Duration::from_secs(3500) && next <= Duration::from_secs(3600));
    assert_eq!(s.never_due, 1);
    let text = s.to_string();
    assert!(text.contains("due since -infinity"), "{text}");
    assert!(text.contains("Next scheduled:  due in "), "{text}");
    assert!(text.contains("cc01           at -infinity"), "{text}");
    assert!(
        text.contains("1 pending row(s) with send_after = infinity"),
        "{text}"
    );
}

#[tokio::test]
async fn the_status_shortens_device_tokens_unless_asked() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let token = "abcdef0123456789".repeat(4);
    client
        .execute(
            "INSERT INTO pgpushd.unregistered_tokens (app, device_token) VALUES ('default', $1)",
            &[&token],
        )
        .await
        .unwrap();
    let s = StatusReport::read(&mut client).await.unwrap();
    let short = s.to_string();
    assert!(short.contains("  default  abcdef01       "), "{short}");
    assert!(!short.contains("abcdef0123"), "{short}");
    let full = s.display(true).to_string();
    assert!(full.contains(&format!("  default  {token}  ")), "{full}");
    assert_eq!(s.display(false).to_string(), short);
}

#[tokio::test]
async fn the_status_shows_batch_transactions_open_too_long() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    // A batch's session (as the daemon names it) with a transaction open, and one idle.
    let url = pgpushd::secret::Secret::new(db.url.clone());
    let batch = || pgpushd::db::connect(&url, Duration::from_secs(10), "batch");
    let open = batch().await.unwrap();
    let idle = batch().await.unwrap();
    idle.batch_execute("SELECT 1").await.unwrap();
    let s = StatusReport::read(&mut client).await.unwrap();
    assert_eq!(s.long_batches, 0);
    assert!(
        s.to_string()
            .contains("Long batches:    none open longer than 60s"),
        "{s}"
    );
    open.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let s = StatusReport::read_with(&mut client, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(s.long_batches, 1);
    assert!(s.longest_batch.unwrap() >= Duration::from_secs(1));
    let text = s.to_string();
    assert!(
        text.contains("Long batches:    1 batch transaction(s) (pgpushd-batch) open longer than 1s, the oldest for"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_as_json_agrees_with_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpushd.toml");
    let db = TestDb::new().await;
    std::fs::write(&config, format!("[database]\nurl = \"{}\"\n", db.url)).unwrap();
    let client = db.client().await;
    fill(&client).await;

    let (code, stdout, stderr) = pgpushd(&config, &["--json"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one object, one line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v["totals"],
        serde_json::json!({"pending": 5, "due": 3, "retrying": 1, "sent": 4, "failed": 5, "expired": 1})
    );
    assert_eq!(v["apps"][0]["app"], "default");
    assert_eq!(v["apps"][1]["pending"], 1);
    let overdue = v["oldest_due"]["overdue_seconds"].as_f64().unwrap();
    assert!((600.0..660.0).contains(&overdue), "{v}");
    assert_eq!(v["errors"][0]["error"], "BadDeviceToken");
    assert_eq!(v["errors"][0]["count"], 2);
    assert_eq!(v["awake"], false);
    assert_eq!(v["unregistered"][0]["tokens"], 2);
    assert!(v["read_at"].as_str().unwrap().ends_with('Z'), "{v}");

    let (code, _, stderr) = pgpushd(&config, &["--watch", "10ms"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("at least 100ms"), "{stderr}");
}

/// `--watch` refreshes until interrupted: each refresh sees rows inserted meanwhile, a
/// database that goes away is an error in place (and the watch goes on), and SIGINT ends
/// it with success. Piped, the JSON is one object per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_watch_refreshes_until_interrupted() {
    use std::io::{BufRead, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpushd.toml");
    let mut db = TestDb::with_own_cluster().await;
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\nconnect_timeout = \"2s\"\n",
            db.url
        ),
    )
    .unwrap();
    let client = db.client().await;
    let mut watch = Spawned(
        pgpushd_command()
            .args(["status", "--json", "--watch", "200ms", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let next = |what: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let line = lines
                .recv_timeout(give_up.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or_else(|_| panic!("no refresh showing {what}"));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if check(&v) {
                return v;
            }
        }
    };
    next("an empty outbox", &|v| v["totals"]["pending"] == 0);
    insert_rows(&client, 1, 3).await;
    next("three pending rows", &|v| v["totals"]["pending"] == 3);

    drop(client);
    db.cluster().stop();
    // The open connection breaks, then reconnecting fails, refresh after refresh.
    next("the database's absence", &|v| {
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot reach the database"))
    });
    db.cluster().start_server().unwrap();
    next("the outbox again", &|v| v["totals"]["pending"] == 3);

    // A database that stops answering (its backend stopped: the socket stays up) is an
    // error within connect_timeout, and the next refresh reconnects.
    let client = db.client().await;
    let _stopped = StoppedBackends::of(&client, "pgpushd-status").await;
    next("a read that got no answer", &|v| {
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer within 2s"))
    });
    next("the outbox after reconnecting", &|v| {
        v["totals"]["pending"] == 3
    });
    // Interrupted in the middle of a read that hangs, it still stops at once.
    let _stopped_too = StoppedBackends::of(&client, "pgpushd-status").await;
    std::thread::sleep(Duration::from_millis(500));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let give_up = std::time::Instant::now() + Duration::from_secs(1);
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "the watch did not stop within a second"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// The sessions `pgpushd status` opened (`application_name` = `pgpushd-status`): pid,
/// whether it waits for a lock, and whether it holds a snapshot (`backend_xmin`, which
/// holds back vacuum).
async fn status_sessions(client: &Client) -> Vec<(i32, bool, bool)> {
    client
        .query(
            "SELECT pid, wait_event_type IS NOT DISTINCT FROM 'Lock', backend_xmin IS NOT NULL
               FROM pg_stat_activity WHERE application_name = 'pgpushd-status'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Waits for the status read stuck mid-statement (waiting for the outbox's lock, its
/// snapshot taken) and stops its backend (SIGSTOP): from then on only what the server was
/// told before can end it.
async fn stop_the_waiting_read(client: &Client) -> (i32, StoppedBackends) {
    let pid = wait_for("a status read waiting for the lock", QUICKLY, || async {
        let sessions = status_sessions(client).await;
        sessions.iter().find(|s| s.1).map(|s| {
            assert!(
                s.2,
                "a read waiting for the lock holds its snapshot: {sessions:?}"
            );
            s.0
        })
    })
    .await;
    (pid, StoppedBackends::stop(vec![pid]))
}

async fn wait_gone(client: &Client, pid: i32) {
    wait_for(
        "the abandoned read to end on the server",
        Duration::from_secs(10),
        || async {
            let left = status_sessions(client).await;
            (!left.iter().any(|s| s.0 == pid)).then_some(())
        },
    )
    .await;
}

const QUICKLY: Duration = Duration::from_secs(20);

/// Issue 20, item 9: a status read that gets no answer in time leaves nothing running on
/// the server. A session holds the outbox exclusively, so the read waits in its first
/// statement, its snapshot taken; its backend is stopped there, the client gives up, and
/// once the backend runs again the statement ends (the lock still held, it would wait on
/// for ever): for `status` once, and for a `--watch`, whose refreshes would otherwise pile
/// up such reads, each holding back vacuum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_read_that_gets_no_answer_leaves_nothing_running_on_the_server() {
    use std::io::{BufRead, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgpushd.toml");
    let db = TestDb::new().await;
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\nconnect_timeout = \"2s\"\n",
            db.url
        ),
    )
    .unwrap();
    let client = db.client().await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE pgpushd.outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    // Once: it fails within its bound, and its read ends on the server.
    let mut once = Spawned(
        pgpushd_command()
            .args(["status", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (pid, stopped) = stop_the_waiting_read(&client).await;
    let give_up = std::time::Instant::now() + QUICKLY;
    let exited = loop {
        if let Some(exited) = once.try_wait().unwrap() {
            break exited;
        }
        assert!(std::time::Instant::now() < give_up, "status never gave up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(once.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(exited.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no answer within 2s"), "{stderr}");
    drop(stopped);
    wait_gone(&client, pid).await;

    // Watched: each refresh that gets no answer ends on the server too.
    let mut watch = Spawned(
        pgpushd_command()
            .args(["status", "--json", "--watch", "100ms", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let failed = |why: &[&str]| {
        let line = lines.recv_timeout(QUICKLY).expect("a refresh that failed");
        assert!(why.iter().any(|w| line.contains(w)), "{line}");
    };
    let (pid, stopped) = stop_the_waiting_read(&client).await;
    failed(&["no answer within 2s"]);
    drop(stopped);
    wait_gone(&client, pid).await;
    // More refreshes wait for the lock, one after the other: the server ends them, or
    // the client cancels them; none is left behind.
    for _ in 0..2 {
        failed(&[
            "no answer within 2s",
            "canceling statement due to statement timeout",
        ]);
    }
    let sessions = status_sessions(&client).await;
    assert!(sessions.len() <= 1, "reads piled up: {sessions:?}");
    drop(watch);
    lock.rollback().await.unwrap();
}
