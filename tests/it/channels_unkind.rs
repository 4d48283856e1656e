//! APNs's channel management API served by an independent server that misbehaves
//! (`tests/fixtures/channels_unkind.py`: Python's ssl, asyncio and h2, written from
//! Apple's documentation, not our emulator): a create whose answer never comes (too
//! late, a GOAWAY, a reset stream, a connection cut in the middle of a frame) is made
//! once, the row uncertain until the channel the server did make is listed and adopted;
//! a delete reset is asked again and closes the row. The daemon is the real binary, and
//! its log must show no panic.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use tokio_postgres::Client;

use crate::python_server::{python_h2, server_certificate, PythonServer};
use crate::service::{signal, wait_exit, write_config};
use crate::support::*;

/// The Python server (`channels_unkind.py`), its lines read as it says them.
struct Unkind(PythonServer);

impl Unkind {
    fn start(dir: &std::path::Path) -> Unkind {
        Unkind(PythonServer::start(
            "channels_unkind.py",
            dir,
            "server",
            &["--bundle", TOPIC, "--late", "3.5"],
        ))
    }

    /// Arms one `kind` of fault for the server's next `op`.
    async fn arm(&mut self, op: &str, kind: &str) {
        writeln!(self.stdin, "fault {op} {kind}").unwrap();
        self.stdin.flush().unwrap();
        let armed = format!("ARMED {op} {kind}");
        wait_for(&armed, Duration::from_secs(10), || async {
            self.said(|l| l == armed).then_some(())
        })
        .await;
    }

    /// The channels it made, in order.
    fn created(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("CREATED "))
            .map(|rest| rest.split(' ').next().unwrap().to_owned())
            .collect()
    }
}

impl std::ops::Deref for Unkind {
    type Target = PythonServer;
    fn deref(&self) -> &PythonServer {
        &self.0
    }
}

impl std::ops::DerefMut for Unkind {
    fn deref_mut(&mut self) -> &mut PythonServer {
        &mut self.0
    }
}

/// The server, a database, and the daemon binary (its log in `dir`) whose app's channel
/// management API is the server, with a request timeout of 2 s.
struct Setup {
    server: Unkind,
    daemon: Spawned,
    client: Client,
    log: std::path::PathBuf,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

async fn setup() -> Option<Setup> {
    if !python_h2() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_file = server_certificate(dir.path(), "channels test CA");
    let server = Unkind::start(dir.path());
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(
        &key_file,
        pgpushd_emulator::jwt::generate_signing_key().unwrap(),
    )
    .unwrap();
    let endpoint = format!("https://localhost:{}", server.port);
    let app_toml = token_app_toml(&endpoint, &ca_file, &key_file)
        .replace(
            "connections = 2\n",
            &format!("connections = 2\nchannels_endpoint = \"{endpoint}\"\n"),
        )
        .replace("request_timeout = \"5s\"", "request_timeout = \"2s\"");
    let db = TestDb::new().await;
    let retry = "[retry]\nmax_attempts = 5\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n";
    let path = write_config(dir.path(), &db.url, "", &format!("{retry}{app_toml}"));
    let log = dir.path().join("pgpushd.log");
    let daemon = Spawned(
        pgpushd_command()
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "pgpushd=debug,info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let client = db.client().await;
    Some(Setup {
        server,
        daemon,
        client,
        log,
        _db: db,
        _dir: dir,
    })
}

impl Setup {
    async fn new_channel(&self, storage: &str) -> i64 {
        self.client
            .query_one(
                "INSERT INTO pgpushd.channels (message_storage) VALUES ($1) RETURNING id",
                &[&storage],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Row `id`'s status, channel id and attempts once its status is `want`.
    async fn channel_when(&self, id: i64, want: &str) -> (Option<String>, i32) {
        let client = &self.client;
        wait_for(
            &format!("channel {id} {want}"),
            Duration::from_secs(30),
            || async move {
                let row = client
                    .query_one(
                        "SELECT status, channel_id, attempts FROM pgpushd.channels WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap();
                (row.get::<_, String>(0) == want).then(|| (row.get(1), row.get(2)))
            },
        )
        .await
    }

    /// Stops the daemon (SIGTERM, a clean exit) and checks its log shows no panic.
    fn stop(mut self) -> String {
        signal(&self.daemon, nix::sys::signal::Signal::SIGTERM);
        let status = wait_exit(&mut self.daemon, Duration::from_secs(30));
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert!(status.success(), "{status:?}\n{log}");
        assert!(!log.contains("panicked"), "{log}");
        log
    }
}

/// A create whose answer never comes (`kind`) is made once: the row is uncertain, and
/// the next claim lists the app's channels and adopts the one the server made.
async fn a_create_is_made_once_when(kind: &str) {
    let Some(mut s) = setup().await else { return };
    s.server.arm("create", kind).await;
    let id = s.new_channel("most-recent").await;
    let (channel, attempts) = s.channel_when(id, "active").await;
    let created = s.server.created();
    assert_eq!(created.len(), 1, "made once ({kind}): {created:?}");
    assert_eq!(
        channel.as_ref(),
        created.first(),
        "the server's channel adopted"
    );
    assert_eq!(attempts, 1);
    assert!(s.server.said(|l| l == format!("FAULT create {kind}")));
    assert!(
        s.server
            .count("REQ GET /1/apps/com.example.app/all-channels")
            >= 1,
        "found by a list"
    );
    // A second channel, with the server behaving: made at once, and made once.
    let other = s.new_channel("none").await;
    let (second, _) = s.channel_when(other, "active").await;
    assert_eq!(s.server.created().len(), 2);
    assert_ne!(second, channel);
    let log = s.stop();
    assert!(
        log.contains("found the channel an earlier create made; adopting it"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_after_the_request_timeout_is_made_once() {
    a_create_is_made_once_when("late").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cut_off_by_goaway_is_made_once() {
    a_create_is_made_once_when("goaway").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_stream_is_reset_is_made_once() {
    a_create_is_made_once_when("reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_connection_closes_mid_frame_is_made_once() {
    a_create_is_made_once_when("cut").await;
}

/// A create reset, and then the list that looks for its channel reset too: the row stays
/// uncertain until a list answers, and is still made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_whose_list_is_reset_is_still_made_once() {
    let Some(mut s) = setup().await else { return };
    s.server.arm("create", "reset").await;
    s.server.arm("list", "reset").await;
    let id = s.new_channel("none").await;
    let (channel, _) = s.channel_when(id, "active").await;
    assert!(s.server.said(|l| l == "FAULT list reset"));
    assert_eq!(s.server.created(), vec![channel.unwrap()], "made once");
    s.stop();
}

/// A delete whose stream is reset (the server deleted the channel first) is asked again:
/// APNs's 404 BadPath for a channel it no longer has closes the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_reset_is_asked_again_and_closes_the_row() {
    let Some(mut s) = setup().await else { return };
    let id = s.new_channel("none").await;
    let (channel, _) = s.channel_when(id, "active").await;
    let channel = channel.unwrap();
    s.server.arm("delete", "reset").await;
    s.client
        .execute(
            "UPDATE pgpushd.channels SET status = 'closing' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    s.channel_when(id, "closed").await;
    assert!(s.server.said(|l| l == format!("DELETED {channel}")));
    assert!(s.server.said(|l| l == "FAULT delete reset"));
    assert_eq!(
        s.server
            .count("REQ DELETE /1/apps/com.example.app/channels"),
        2,
        "asked again once"
    );
    s.stop();
}

/// A delete whose connection is cut in the middle of a frame: asked again, and the row
/// closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cut_mid_frame_closes_the_row() {
    let Some(mut s) = setup().await else { return };
    let id = s.new_channel("most-recent").await;
    s.channel_when(id, "active").await;
    s.server.arm("delete", "cut").await;
    s.client
        .execute(
            "UPDATE pgpushd.channels SET status = 'closing' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    s.channel_when(id, "closed").await;
    assert_eq!(s.server.count("DELETED "), 1);
    s.stop();
}
