//! The `pgpushd-emulator` command, spawned: what it refuses before it listens.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `pgpushd-emulator --tls-dir DIR` on a free port; it must exit by itself within
/// a few seconds (a refused directory), else it is killed and the test fails.
fn run_with_tls_dir(dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
        .args(["--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > give_up {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the emulator started with --tls-dir {}:\n{}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chmod(dir: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_tls_dir_others_may_write_is_refused() {
    for mode in [0o777, 0o775, 0o757] {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), mode);
        let (code, stderr) = run_with_tls_dir(dir.path());
        assert!(code.is_some_and(|c| c != 0), "{code:?} {stderr}");
        assert!(
            stderr.contains(&format!(
                "refusing the TLS directory {}: its group or others may write to it (mode {mode:04o})",
                dir.path().display()
            )),
            "{stderr}"
        );
        assert!(!dir.path().join("ca.key").exists());
    }
}

#[test]
fn a_tls_dir_of_another_user_is_refused() {
    use std::os::unix::fs::MetadataExt;

    let dir = tempfile::tempdir().unwrap();
    // As root, give the directory away; otherwise "/" belongs to another user (root).
    let theirs = if std::fs::metadata(dir.path()).unwrap().uid() == 0 {
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        dir.path().to_owned()
    } else {
        Path::new("/").to_owned()
    };
    let owner = std::fs::metadata(&theirs).unwrap().uid();
    let (code, stderr) = run_with_tls_dir(&theirs);
    assert!(code.is_some_and(|c| c != 0), "{code:?} {stderr}");
    assert!(
        stderr.contains(&format!(
            "refusing the TLS directory {}: it belongs to uid {owner}, not to this user",
            theirs.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_missing_tls_dir_is_created_for_this_user_alone() {
    use std::os::unix::fs::PermissionsExt;

    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("apns");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
        .args(["--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    while !dir.join("server.key").exists() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(dir.join("ca.pem").exists() && dir.join("server.key").exists());
}

/// Runs `pgpushd-emulator ARGS` and waits for it to exit by itself (within 10 s).
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > give_up {
            child.kill().unwrap();
            panic!("the emulator started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn webpush_flags_belong_to_webpush_and_it_needs_a_tls_dir() {
    let (code, stderr) = run_to_exit(&["--listen", "127.0.0.1:0", "--http1-only"]);
    assert!(code.is_some_and(|c| c != 0), "{stderr}");
    assert!(
        stderr.contains("--http1-only applies to --protocol webpush only"),
        "{stderr}"
    );
    let (code, stderr) = run_to_exit(&["--protocol", "webpush", "--listen", "127.0.0.1:0"]);
    assert!(code.is_some_and(|c| c != 0), "{stderr}");
    assert!(
        stderr.contains("--protocol webpush needs --tls-dir"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_to_exit(&[
        "--protocol",
        "webpush",
        "--listen",
        "127.0.0.1:0",
        "--tls-dir",
        dir.path().to_str().unwrap(),
        "--token-key",
        "k.p8",
        "--key-id",
        "K",
        "--team-id",
        "T",
    ]);
    assert!(code.is_some_and(|c| c != 0), "{stderr}");
    assert!(
        stderr.contains("--token-key does not apply to --protocol webpush"),
        "{stderr}"
    );
}

#[test]
fn webpush_writes_its_subscriptions_and_says_where() {
    use std::io::{BufRead, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("webpush");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
        .args(["--protocol", "webpush", "--listen", "127.0.0.1:0"])
        .args(["--subscriptions", "2", "--http1-only", "--tls-dir"])
        .arg(&tls)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        printed.push(line);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        printed[0].starts_with("Web Push emulator listening on https://127.0.0.1:"),
        "{printed:?}"
    );
    let file = tls.join("subscriptions.jsonl");
    assert!(
        printed[1].contains(&file.display().to_string()),
        "{printed:?}"
    );
    assert!(
        printed[2].contains(&tls.join("ca.pem").display().to_string()),
        "{printed:?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in lines {
        assert!(line["endpoint"].as_str().unwrap().contains("/push/"));
        assert_eq!(line["keys"]["auth"].as_str().unwrap().len(), 22);
        assert_eq!(line["keys"]["p256dh"].as_str().unwrap().len(), 87);
    }
}

#[test]
fn channels_listen_prints_its_address_and_is_http2_only() {
    use std::io::{BufRead, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpushd-emulator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--channels-listen",
            "127.0.0.1:0",
        ])
        .args(["--channel-limit", "5", "--tls-dir"])
        .arg(&tls)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        printed.push(line);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        printed[0].starts_with("APNs emulator listening on https://127.0.0.1:"),
        "{printed:?}"
    );
    assert!(
        printed[1].starts_with("APNs channel management listening on https://127.0.0.1:"),
        "{printed:?}"
    );
    assert_ne!(printed[0].rsplit(':').next(), printed[1].rsplit(':').next());
    assert!(
        printed[2].contains(&tls.join("ca.pem").display().to_string()),
        "{printed:?}"
    );

    for (protocol, flag, value) in [
        ("fcm", "--channels-listen", "127.0.0.1:0"),
        ("webpush", "--channel-limit", "5"),
        ("binary", "--channels-listen", "127.0.0.1:0"),
    ] {
        let (code, stderr) = run_to_exit(&[
            "--protocol",
            protocol,
            "--listen",
            "127.0.0.1:0",
            flag,
            value,
        ]);
        assert!(code.is_some_and(|c| c != 0), "{protocol}: {stderr}");
        assert!(
            stderr.contains(&format!("{flag} applies to --protocol http2 only")),
            "{protocol}: {stderr}"
        );
    }
}
