//! The `pgpushd` commands, spawned as the real binary: exit codes, `migrate`, `check-config`, `send`,
//! `demo`, and a daemon killed with SIGKILL mid-batch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::support::*;

fn pgpushd() -> Command {
    let mut cmd = pgpushd_command();
    cmd.env_remove("PGPUSHD_DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("pgpushd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_config_exits_78_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[database]\nurl = \"postgres://x@127.0.0.1:1/db\"\nbatch_size = -3\n",
    );
    let (code, _, stderr) = output(pgpushd().arg("run").arg("--config").arg(&path));
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&format!("{}: database.batch_size", path.display())),
        "{stderr}"
    );

    let (code, _, stderr) =
        output(pgpushd().args(["migrate", "--config", "/nonexistent/pgpushd.toml"]));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("/nonexistent/pgpushd.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn a_batch_shorter_than_four_requests_exits_78_naming_both_keys() {
    // Abandoned while a slow endpoint's requests waited, batches sent their rows again
    // in a loop, no attempt counted.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[database]\nurl = \"postgres://x@127.0.0.1:1/db\"\nmax_batch_duration = \"30s\"\n\
         [apps.slow]\ntopic = \"com.example\"\nrequest_timeout = \"60s\"\n\
         [apps.slow.token]\nkey_file = \"/k.p8\"\nkey_id = \"ABCDEFGHIJ\"\nteam_id = \"KLMNOPQRST\"\n",
    );
    for command in ["check-config", "run"] {
        let (code, _, stderr) = output(pgpushd().arg(command).arg("--config").arg(&path));
        assert_eq!(code, 78, "{command}: {stderr}");
        assert!(
            stderr.contains("database.max_batch_duration")
                && stderr.contains("apps.slow.request_timeout"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn a_duration_past_its_bound_exits_78_naming_file_and_key() {
    // Before the bounds, check-config said OK and `run` started with a poll interval of
    // 584 billion years, one `Instant + d` away from a panic.
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("poll_interval", "584000000000y"),
        ("connect_timeout", "99999999999999999999999y"),
    ] {
        let path = write_config(
            dir.path(),
            &format!("[database]\nurl = \"postgres://x@127.0.0.1:1/db\"\n{key} = \"{value}\"\n"),
        );
        for command in ["check-config", "run"] {
            let (code, _, stderr) = output(pgpushd().arg(command).arg("--config").arg(&path));
            assert_eq!(code, 78, "{command} {key}: {stderr}");
            assert!(
                stderr.contains(&format!("{}: ", path.display()))
                    && stderr.contains(&format!("database.{key}: ")),
                "{command} {key}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn bad_credentials_are_reported_by_file_and_problem_without_key_material() {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::symm::Cipher;

    let dir = tempfile::tempdir().unwrap();
    let p384 = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).unwrap()).unwrap(),
    )
    .unwrap();
    let p384_pem = p384.private_key_to_pem_pkcs8().unwrap();
    std::fs::write(dir.path().join("p384.p8"), &p384_pem).unwrap();
    // A certificate whose key is encrypted with another passphrase than the one given.
    let ca = pgpushd_emulator::tls::CertificateAuthority::generate("test CA").unwrap();
    let issued = ca.issue_client("push").unwrap();
    let key = PKey::private_key_from_pem(&issued.key_pem).unwrap();
    let encrypted = key
        .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), b"Xq7rightZk")
        .unwrap();
    std::fs::write(
        dir.path().join("ck.pem"),
        [issued.cert_pem.as_slice(), encrypted.as_slice()].concat(),
    )
    .unwrap();
    std::fs::write(dir.path().join("wrong.pass"), "Yp3wrongWm\n").unwrap();
    std::fs::write(dir.path().join("broken.p12"), b"\x30\x82\x01\x00garbage").unwrap();
    let app =
        |name: &str, auth: &str| format!("[apps.{name}]\ntopic = \"com.example.{name}\"\n{auth}\n");
    let token = |file: &str| {
        format!("[apps.X.token]\nkey_file = \"{file}\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"DEF123GHIJ\"")
    };
    let text = [
        "[database]\nurl = \"postgres://x@127.0.0.1:1/db\"\n".to_string(),
        app("missing", &token("missing.p8").replace("X", "missing")),
        app("p384", &token("p384.p8").replace("X", "p384")),
        app(
            "pem",
            "[apps.pem.certificate]\nfile = \"ck.pem\"\npassphrase_file = \"wrong.pass\"",
        ),
        app("p12", "[apps.p12.certificate]\nfile = \"broken.p12\""),
    ]
    .concat();
    let path = write_config(dir.path(), &text);

    let (code, stdout, stderr) = output(pgpushd().arg("check-config").arg("--config").arg(&path));
    assert_eq!(code, 78, "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    for (file, problem) in [
        ("missing.p8", "No such file"),
        ("p384.p8", "P-256"),
        ("ck.pem", "passphrase"),
        ("broken.p12", ""),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(file) && l.contains(problem)),
            "no line names {file} and {problem:?}:\n{stderr}"
        );
    }
    let p384_body: String = String::from_utf8_lossy(&p384_pem)
        .lines()
        .nth(1)
        .unwrap()
        .into();
    let enc_body: String = String::from_utf8_lossy(&encrypted)
        .lines()
        .nth(1)
        .unwrap()
        .into();
    for secret in [
        p384_body.as_str(),
        enc_body.as_str(),
        "Yp3wrongWm",
        "Xq7rightZk",
    ] {
        assert!(
            !stderr.contains(secret),
            "key material or passphrase printed: {stderr}"
        );
    }

    // `run` refuses to start the same way, before touching the database.
    let (code, _, stderr) = output(pgpushd().arg("run").arg("--config").arg(&path));
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("missing.p8"), "{stderr}");
    assert!(!stderr.contains("systemd credentials"), "{stderr}");

    // A key the unit hands over as a systemd credential cannot be read from a shell:
    // check-config says why.
    let credential = "/run/credentials/pgpushd.service/credentials_AuthKey_ABC123DEFG.p8";
    let text = [
        "[database]\nurl = \"postgres://x@127.0.0.1:1/db\"\n".to_string(),
        app("unit", &token(credential).replace("X", "unit")),
    ]
    .concat();
    let path = write_config(dir.path(), &text);
    let (code, _, stderr) = output(
        pgpushd()
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env_remove("CREDENTIALS_DIRECTORY"),
    );
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains(credential), "{stderr}");
    assert!(
        stderr.contains("exist only inside the running service"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_then_send_one_push() {
    let db = TestDb::unmigrated().await;
    let apns = ApnsSetup::new(|_| {}).await;
    let path = write_config(
        apns.dir.path(),
        &format!("[database]\nurl = \"{}\"\n{}", db.url, apns.app_toml),
    );
    let (code, stdout, stderr) = output(pgpushd().arg("migrate").arg("--config").arg(&path));
    assert_eq!(code, 0, "{stderr}");
    let every: Vec<i32> = (1..=pgpushd::outbox::migrate::latest_version()).collect();
    assert!(
        stdout.contains(&format!("applied migration(s) {every:?}")),
        "{stdout}"
    );
    let (code, stdout, _) = output(pgpushd().arg("migrate").arg("--config").arg(&path));
    assert_eq!(code, 0);
    assert!(stdout.contains("up to date"), "{stdout}");

    let (code, stdout, stderr) = output(pgpushd().arg("send").arg("--config").arg(&path).args([
        "--token",
        &token(7),
        "--alert",
        "hello",
    ]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("200"), "{stdout}");
    let records = apns.emulator.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].device_token, token(7));

    // A broadcast: to a channel instead of a token, a Live Activity push by default.
    let channel = apns.emulator.create_channel(TOPIC, 0);
    let update = r#"{"aps": {"event": "update", "timestamp": 1767700000, "content-state": {}}}"#;
    let (code, stdout, stderr) = output(pgpushd().arg("send").arg("--config").arg(&path).args([
        "--channel-id",
        &channel,
        "--payload",
        update,
    ]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("200") && stdout.contains("apns-unique-id"),
        "{stdout}"
    );
    let records = apns.emulator.records();
    assert_eq!(records[1].channel_id.as_deref(), Some(channel.as_str()));
    let start = r#"{"aps": {"event": "start", "timestamp": 1, "content-state": {},
                    "attributes-type": "A", "attributes": {}, "alert": "go"}}"#;
    let (code, _, stderr) = output(pgpushd().arg("send").arg("--config").arg(&path).args([
        "--channel-id",
        &channel,
        "--payload",
        start,
    ]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("a broadcast cannot start a Live Activity"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_batch_loses_nothing() {
    const ROWS: u64 = 3000;
    const BATCH: u64 = 100;
    const IN_FLIGHT: u64 = 4;
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|c| c.latency = Duration::from_millis(200)).await;
    let path = write_config(
        apns.dir.path(),
        &format!(
            "[database]\nurl = \"{}\"\nbatch_size = {BATCH}\nmax_batches_in_flight = {IN_FLIGHT}\n{}",
            db.url, apns.app_toml
        ),
    );
    let client = db.client().await;
    insert_rows(&client, 1, ROWS).await;

    let mut first = spawn_daemon(&path);
    wait_for(
        "the first daemon to deliver some rows",
        Duration::from_secs(20),
        || async { (count(&client, "sent").await >= 500).then_some(()) },
    )
    .await;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let sent_by_first = count(&client, "sent").await;
    assert!(
        sent_by_first < ROWS as i64,
        "the first daemon finished before it was killed"
    );

    let mut second = spawn_daemon(&path);
    wait_for_status(&client, "sent", ROWS as i64, Duration::from_secs(60)).await;
    stop(&mut second);

    let mut per_token: HashMap<String, u32> = HashMap::new();
    for r in apns.emulator.records().iter().filter(|r| r.status == 200) {
        *per_token.entry(r.device_token.clone()).or_default() += 1;
    }
    assert_eq!(per_token.len(), ROWS as usize, "a row was never delivered");
    let duplicates = per_token.values().filter(|&&n| n > 1).count() as u64;
    assert!(
        duplicates <= BATCH * IN_FLIGHT,
        "{duplicates} rows sent twice; at most the batches in flight ({}) may be",
        BATCH * IN_FLIGHT
    );
}

#[test]
fn the_demo_delivers_every_row() {
    let (code, stdout, stderr) = output(pgpushd().args(["demo", "--rows", "300"]));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("delivered 300 of 300"), "{stdout}");
    // Piped, progress is plain lines: no escape sequences in a log.
    assert!(stdout.contains(" of 300 sent  "), "{stdout}");
    assert!(
        !stdout.contains('\x1b') && !stdout.contains('\r'),
        "{stdout:?}"
    );
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), the progress line
/// updates in place and the summary follows it.
#[test]
fn the_demo_shows_progress_in_place_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        skip_without("util-linux's `script` (it gives the demo a terminal)");
        return;
    }
    let demo = format!("{} demo --rows 2000", env!("CARGO_BIN_EXE_pgpushd"));
    let mut script = Command::new("script");
    script
        .args(["-q", "-e", "-c", &demo, "/dev/null"])
        .env("TERM", "xterm")
        .env_remove("RUST_LOG");
    for v in PROXY_VARIABLES {
        script.env_remove(v);
    }
    let (code, stdout, stderr) = output(&mut script);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let updates = stdout.matches("\r  [").count();
    assert!(
        updates >= 1,
        "no progress line redrawn in place: {stdout:?}"
    );
    assert!(stdout.contains("\x1b[K"), "{stdout:?}");
    assert!(stdout.contains("2000 of 2000 sent"), "{stdout:?}");
    assert!(stdout.contains("delivered 2000 of 2000"), "{stdout:?}");
}

fn spawn_daemon(config: &Path) -> Spawned {
    Spawned(
        pgpushd()
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn stop(child: &mut Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
