//! A real client of another language against the emulator: `@parse/node-apn` 8 (Node.js's
//! HTTP/2 over nghttp2), token auth, one connection, everything sent at once, as its users
//! do. `.ci/run` installs it into `tests/node/` (`npm install --prefix tests/node`).
//!
//! 20,000 notifications at once fail with `NGHTTP2_ENHANCE_YOUR_CALM` on node's default
//! settings, against Apple as against this emulator (parse-community/node-apn#142): it is
//! node's own per-session memory limit (`maxSessionMemory`, 10 MB) that resets the
//! streams, not a limit of the server — the emulator sends no RST_STREAM and no GOAWAY.
//! With that limit raised, all 20,000 arrive, 1,000 streams at a time.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgpushd_emulator::{Emulator, EmulatorAuth, EmulatorConfig};

const KEY_ID: &str = "ABC123DEFG";
const TEAM_ID: &str = "DEF123GHIJ";
const TOPIC: &str = "com.example.app";

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// Whether node and node-apn are installed here (a note when not).
fn node_apn_installed() -> bool {
    let installed = node_dir().join("node_modules/@parse/node-apn").is_dir()
        && Command::new("node").arg("--version").output().is_ok();
    if !installed {
        crate::skip_without(&format!(
            "node-apn (npm install --prefix {}; .ci/run installs it)",
            node_dir().display()
        ));
    }
    installed
}

/// Sends `n` notifications through node-apn; its JSON report.
async fn send(n: usize, session_memory_mb: Option<u32>) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let p8 = pgpushd_emulator::jwt::generate_signing_key().unwrap();
    let emulator = Emulator::start(EmulatorConfig {
        auth: EmulatorAuth::Token {
            public_key_pem: p8.clone(),
            key_id: KEY_ID.into(),
            team_id: TEAM_ID.into(),
        },
        topic: Some(TOPIC.into()),
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let (ca, key) = (dir.path().join("ca.pem"), dir.path().join("AuthKey.p8"));
    std::fs::write(&ca, emulator.ca_pem()).unwrap();
    std::fs::write(&key, &p8).unwrap();
    let mut node = tokio::process::Command::new("node");
    node.current_dir(node_dir())
        .arg("send.js")
        .arg(emulator.addr().port().to_string())
        .arg(n.to_string())
        .arg(&ca)
        .arg(&key)
        .args([KEY_ID, TEAM_ID, TOPIC]);
    if let Some(mb) = session_memory_mb {
        node.arg(mb.to_string());
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), node.output())
        .await
        .expect("node-apn finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let accepted = emulator.stats().count(200);
    emulator.shutdown().await;
    assert_eq!(
        report["sent"], accepted,
        "node-apn's count of sent is the emulator's"
    );
    report
}

// One test, the two sends in turn: each keeps the machine busy.
#[tokio::test]
async fn node_apn_sends_5000_and_within_its_own_memory_limit_20000_at_once() {
    if !node_apn_installed() {
        return;
    }
    let report = send(5_000, None).await;
    assert_eq!(report["sent"], 5_000, "{report}");
    let report = send(20_000, Some(200)).await;
    assert_eq!(report["sent"], 20_000, "{report}");
}
