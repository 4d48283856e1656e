//! The binary protocol end to end: rows through the daemon's binary transport to the
//! binary emulator (certificate auth from an encrypted-key PEM and from a .p12), an
//! invalid token among many, the bytes the seed's PHP script writes, the feedback
//! service filling `unregistered_tokens`, and `pgpushd emulator --protocol binary`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use openssl::pkcs12::Pkcs12;
use openssl::pkey::PKey;
use openssl::symm::Cipher;
use openssl::x509::X509;
use pgpushd::config::Config;
use pgpushd::transport::Transport;
use pgpushd_emulator::binary::{BinaryEmulator, BinaryEmulatorConfig};
use pgpushd_emulator::tls::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);
/// The token of the seed's PHP script, its spaces taken out as it says to.
const SEED_TOKEN: &str = "740f4707bebcf74f9b7c25d48e3358945f6aa01da5ddb387462c7eaf61bb78ad";

/// How the client certificate is handed to pgpushd.
#[derive(Clone, Copy)]
pub(crate) enum Identity {
    /// `ck.pem`: certificate, then the key encrypted (as `openssl pkcs12 -nocerts` writes it).
    EncryptedPem,
    /// The `.p12` export itself.
    P12,
}

/// A binary emulator requiring certificates of a provider CA, and the files pgpushd needs.
pub(crate) struct Setup {
    pub(crate) emulator: BinaryEmulator,
    pub(crate) dir: tempfile::TempDir,
    /// `ck.pem` and its passphrase file.
    ck_pem: std::path::PathBuf,
    passphrase_file: std::path::PathBuf,
    p12: std::path::PathBuf,
    p12_passphrase_file: std::path::PathBuf,
}

impl Setup {
    pub(crate) async fn new(tweak: impl FnOnce(&mut BinaryEmulatorConfig)) -> Setup {
        let ca = CertificateAuthority::generate("provider CA").unwrap();
        let mut config = BinaryEmulatorConfig::new(ca.cert_pem());
        tweak(&mut config);
        let emulator = BinaryEmulator::start(config).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), emulator.ca_pem()).unwrap();

        let issued = ca
            .issue_client("Apple Push Services: com.example.app")
            .unwrap();
        let key = PKey::private_key_from_pem(&issued.key_pem).unwrap();
        let encrypted = key
            .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), b"pushchat")
            .unwrap();
        let ck_pem = dir.path().join("ck.pem");
        std::fs::write(&ck_pem, [issued.cert_pem.clone(), encrypted].concat()).unwrap();
        let passphrase_file = dir.path().join("ck.pass");
        std::fs::write(&passphrase_file, "pushchat\n").unwrap();

        let p12 = Pkcs12::builder()
            .name("Apple Push Services: com.example.app")
            .pkey(&key)
            .cert(&X509::from_pem(&issued.cert_pem).unwrap())
            .build2("export")
            .unwrap();
        let p12_path = dir.path().join("Push.p12");
        std::fs::write(&p12_path, p12.to_der().unwrap()).unwrap();
        let p12_passphrase_file = dir.path().join("p12.pass");
        std::fs::write(&p12_passphrase_file, "export").unwrap();
        Setup {
            emulator,
            dir,
            ck_pem,
            passphrase_file,
            p12: p12_path,
            p12_passphrase_file,
        }
    }

    /// `[apps.default]` over the binary protocol to the emulator.
    pub(crate) fn app_toml(&self, identity: Identity) -> String {
        let (file, pass) = match identity {
            Identity::EncryptedPem => (&self.ck_pem, &self.passphrase_file),
            Identity::P12 => (&self.p12, &self.p12_passphrase_file),
        };
        let feedback = match self.emulator.feedback_addr() {
            Some(addr) => format!(
                "feedback_endpoint = \"localhost:{}\"\nfeedback_interval = \"200ms\"",
                addr.port()
            ),
            None => "feedback_interval = \"0s\"".into(),
        };
        format!(
            r#"
[apps.default]
protocol = "binary"
endpoint = "localhost:{port}"
ca_file = "{ca}"
connections = 2
request_timeout = "5s"
binary_settle = "500ms"
{feedback}

[apps.default.certificate]
file = "{file}"
passphrase_file = "{pass}"
"#,
            port = self.emulator.addr().port(),
            ca = self.dir.path().join("ca.pem").display(),
            file = file.display(),
            pass = pass.display(),
        )
    }
}

pub(crate) fn start_binary(config: Config) -> Running {
    let transport: Arc<dyn Transport> = Arc::new(
        pgpushd::providers::Providers::new(&config.apps).unwrap_or_else(|e| panic!("{e}")),
    );
    start(config, transport)
}

/// Tokens the emulator took, and how often each.
pub(crate) fn taken(emulator: &BinaryEmulator) -> HashMap<String, usize> {
    let mut taken = HashMap::new();
    for r in emulator.records().iter().filter(|r| r.status == 0) {
        *taken.entry(r.device_token.clone()).or_default() += 1;
    }
    taken
}

async fn delivered_with(identity: Identity) {
    let db = TestDb::new().await;
    let setup = Setup::new(|c| c.feedback_listen = None).await;
    let daemon = start_binary(config(&db.url, &setup.app_toml(identity)));
    let client = db.client().await;
    insert_rows(&client, 1, 100).await;
    wait_for_status(&client, "sent", 100, DEADLINE).await;
    daemon.stop().await;

    let taken = taken(&setup.emulator);
    assert_eq!(taken.len(), 100);
    assert!(taken.values().all(|n| *n == 1), "each row taken once");
    let r = &setup.emulator.records()[0];
    assert_eq!(r.command, 2);
    assert_eq!(r.payload_json().unwrap()["aps"]["alert"], "hello");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE apns_id IS NULL AND sent_at IS NOT NULL AND attempts = 1)
               FROM pgpushd.outbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_delivered_with_an_encrypted_key_pem() {
    delivered_with(Identity::EncryptedPem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_delivered_with_a_p12() {
    delivered_with(Identity::P12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_token_in_the_middle_of_300_rows_fails_alone() {
    let db = TestDb::new().await;
    let bad = token(150);
    let setup = Setup::new(|c| {
        c.feedback_listen = None;
        c.invalid_tokens = vec![bad.clone()];
    })
    .await;
    let daemon = start_binary(config(&db.url, &setup.app_toml(Identity::EncryptedPem)));
    let client = db.client().await;
    insert_rows(&client, 1, 300).await;
    wait_for("every row settled", DEADLINE, || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;
    daemon.stop().await;

    assert_eq!(count(&client, "sent").await, 299);
    let row = client
        .query_one(
            "SELECT status, last_error, attempts,
                    EXISTS (SELECT 1 FROM pgpushd.unregistered_tokens u
                             WHERE u.app = o.app AND u.device_token = o.device_token)
               FROM pgpushd.outbox o WHERE device_token = $1",
            &[&bad],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    let last_error: String = row.get(1);
    assert!(
        last_error.contains("invalid token (status 8)"),
        "{last_error}"
    );
    assert_eq!(row.get::<_, i32>(2), 1);
    assert!(row.get::<_, bool>(3), "the token is recorded unregistered");

    // Every other row was taken exactly once: those written before the invalid one were
    // not resent, those after it (discarded by the gateway) were, on a new connection.
    let taken = taken(&setup.emulator);
    assert_eq!(taken.len(), 299);
    assert!(!taken.contains_key(&bad));
    let twice: Vec<_> = taken.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "taken more than once: {twice:?}");
    let stats = setup.emulator.stats();
    assert_eq!(stats.refused, [(8, 1)].into());
    assert!(
        stats.discarded_bytes > 0,
        "notifications were written after the invalid one: {stats:?}"
    );
    assert!(stats.connections_accepted >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_shutdowns_mid_flight_lose_nothing() {
    let db = TestDb::new().await;
    let setup = Setup::new(|c| c.feedback_listen = None).await;
    let daemon = start_binary(config(&db.url, &setup.app_toml(Identity::EncryptedPem)));
    let client = db.client().await;
    insert_rows(&client, 1, 1000).await;
    for round in 1..=3u64 {
        wait_for("notifications taken", DEADLINE, || async {
            (setup.emulator.stats().accepted >= round * 150).then_some(())
        })
        .await;
        setup.emulator.shutdown_connections();
    }
    wait_for_status(&client, "sent", 1000, DEADLINE).await;
    daemon.stop().await;
    assert_eq!(count(&client, "failed").await, 0);
    let taken = taken(&setup.emulator);
    assert_eq!(taken.len(), 1000);
    assert!(taken.values().all(|n| *n == 1), "none taken twice");
}

/// Issue 9: the gateway refuses row 10 but says so only after every row's settle window
/// (the emulator's `error_delay`), so all 20 rows were reported and committed `sent`. It
/// discarded rows 11..=20: the late error packet must bring those rows back to `pending`
/// and get them delivered. Before, they stayed `sent` and never reached the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_late_error_packet_reveals_undelivered_are_sent_again() {
    let db = TestDb::new().await;
    let bad = token(10);
    let setup = Setup::new(|c| {
        c.feedback_listen = None;
        c.invalid_tokens = vec![bad.clone()];
        c.error_delay = Duration::from_millis(1500); // binary_settle is 500ms
    })
    .await;
    let toml = setup
        .app_toml(Identity::EncryptedPem)
        .replace("connections = 2", "connections = 1");
    let daemon = start_binary(config(&db.url, &toml));
    let client = db.client().await;
    insert_rows(&client, 1, 20).await;
    wait_for("every row but the refused one taken", DEADLINE, || async {
        (taken(&setup.emulator).len() == 19).then_some(())
    })
    .await;
    wait_for_status(&client, "sent", 20, DEADLINE).await;
    daemon.stop().await;

    let taken = taken(&setup.emulator);
    assert!(!taken.contains_key(&bad));
    assert!(
        taken.values().all(|n| *n == 1),
        "each taken once: {taken:?}"
    );
    // The revived rows were sent twice (the first time discarded); the refused one's
    // refusal came too late to record: it stays sent, as documented.
    let rows = client
        .query(
            "SELECT device_token, attempts FROM pgpushd.outbox WHERE status = 'sent' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    for r in rows {
        let (t, attempts): (String, i32) = (r.get(0), r.get(1));
        let revived = t > bad;
        assert_eq!(attempts, if revived { 2 } else { 1 }, "{t}");
    }
}

/// The seed's push.php, byte for byte: a TLS connection presenting `ck.pem` with its
/// passphrase, then
/// `chr(0) . pack('n', 32) . pack('H*', $deviceToken) . pack('n', strlen($payload)) . $payload`.
#[tokio::test]
async fn the_php_scripts_bytes_are_accepted() {
    let setup = Setup::new(|c| c.invalid_tokens = vec!["ff".repeat(32)]).await;

    // $body['aps'] = array('alert' => $message, 'sound' => 'default'); json_encode($body)
    let payload = br#"{"aps":{"alert":"My first push test!","sound":"default"}}"#;
    let php_message = |device_token: &str| {
        let mut msg = vec![0u8]; // chr(0)
        msg.extend_from_slice(&32u16.to_be_bytes()); // pack('n', 32)
        msg.extend_from_slice(&hex::decode(device_token).unwrap()); // pack('H*', $deviceToken)
        msg.extend_from_slice(&(payload.len() as u16).to_be_bytes()); // pack('n', strlen($payload))
        msg.extend_from_slice(payload); // . $payload
        msg
    };
    let msg = php_message(SEED_TOKEN);
    assert_eq!(msg.len(), 1 + 2 + 32 + 2 + payload.len());
    assert_eq!(&msg[..5], &[0, 0, 32, 0x74, 0x0f]);

    // stream_context_set_option($ctx, 'ssl', 'local_cert', 'ck.pem'); ... 'passphrase'
    let connect = || async {
        let auth = pgpushd::config::CertificateAuth {
            file: setup.ck_pem.clone(),
            passphrase_file: Some(setup.passphrase_file.clone()),
        };
        let identity = pgpushd::apns::identity::load(&auth).unwrap().identity;
        let ca = native_tls::Certificate::from_pem(setup.emulator.ca_pem()).unwrap();
        let tls = native_tls::TlsConnector::builder()
            .identity(identity)
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(setup.emulator.addr())
            .await
            .unwrap();
        tokio_native_tls::TlsConnector::from(tls)
            .connect("localhost", tcp)
            .await
            .unwrap()
    };
    let mut fp = connect().await;
    fp.write_all(&msg).await.unwrap(); // fwrite($fp, $msg, strlen($msg))
    fp.flush().await.unwrap();
    wait_for("the notification recorded", DEADLINE, || async {
        (!setup.emulator.records().is_empty()).then_some(())
    })
    .await;
    drop(fp); // fclose($fp)
    let r = &setup.emulator.records()[0];
    assert_eq!((r.command, r.identifier, r.status), (0, None, 0));
    assert_eq!(r.device_token, SEED_TOKEN);
    assert_eq!(&r.payload[..], payload);
    assert_eq!(
        r.payload_json().unwrap(),
        serde_json::json!({"aps": {"alert": "My first push test!", "sound": "default"}})
    );

    // The same message for a token the gateway refuses: status 8, identifier 0 (command 0
    // has none), and the connection closes.
    let mut fp = connect().await;
    fp.write_all(&php_message(&"ff".repeat(32))).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, fp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, [8, 8, 0, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_tuples_end_up_in_unregistered_tokens() {
    let db = TestDb::new().await;
    let setup = Setup::new(|_| {}).await;
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    setup
        .emulator
        .add_feedback(&hex::decode(token(7)).unwrap(), at);
    setup.emulator.add_feedback(
        &hex::decode(token(8)).unwrap(),
        at + Duration::from_secs(60),
    );
    let daemon = start_binary(config(&db.url, &setup.app_toml(Identity::EncryptedPem)));
    let client = db.client().await;
    let recorded: Vec<(String, SystemTime)> =
        wait_for("the feedback recorded", DEADLINE, || async {
            let rows = client
                .query(
                    "SELECT device_token, unregistered_at FROM pgpushd.unregistered_tokens
                      WHERE app = 'default' ORDER BY device_token",
                    &[],
                )
                .await
                .unwrap();
            (rows.len() == 2).then(|| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await;
    assert_eq!(
        recorded,
        [(token(7), at), (token(8), at + Duration::from_secs(60))]
    );
    assert_eq!(setup.emulator.pending_feedback(), 0);

    // Rows for those tokens now fail without being sent; others are delivered.
    insert_rows(&client, 7, 3).await; // tokens 7, 8, 9
    wait_for("every row settled", DEADLINE, || async {
        (count(&client, "pending").await == 0).then_some(())
    })
    .await;
    daemon.stop().await;
    assert_eq!(count(&client, "failed").await, 2);
    assert_eq!(count(&client, "sent").await, 1);
    assert_eq!(
        taken(&setup.emulator).keys().collect::<Vec<_>>(),
        [&token(9)]
    );
}

#[test]
fn the_emulator_command_speaks_binary() {
    let dir = tempfile::tempdir().unwrap();
    let pgpushd = || {
        let mut cmd = pgpushd_command();
        cmd.env_remove("RUST_LOG").stdin(Stdio::null());
        cmd.args([
            "emulator",
            "--protocol",
            "binary",
            "--listen",
            "127.0.0.1:0",
            "--feedback-listen",
            "127.0.0.1:0",
        ]);
        cmd
    };
    let out = pgpushd().output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--protocol binary needs --client-ca"),
        "{stderr}"
    );

    let ca = CertificateAuthority::generate("provider CA").unwrap();
    std::fs::write(dir.path().join("client-ca.pem"), ca.cert_pem()).unwrap();
    let mut child = pgpushd()
        .arg("--client-ca")
        .arg(dir.path().join("client-ca.pem"))
        .arg("--tls-dir")
        .arg(dir.path().join("tls"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.starts_with("APNs binary-protocol emulator: gateway on 127.0.0.1:")
            && first.contains(", feedback service on 127.0.0.1:"),
        "{first}"
    );
    assert!(dir.path().join("tls/ca.pem").exists());
}
