//! The binary emulator through its public API and a plain TLS client writing the
//! protocol's bytes by hand (the helpers below, not the emulator's codec).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_native_tls::TlsStream;

use pgpushd_emulator::binary::{BinaryEmulator, BinaryEmulatorConfig};
use pgpushd_emulator::tls::{CertificateAuthority, Issued};

const DEADLINE: Duration = Duration::from_secs(10);

struct Setup {
    emulator: BinaryEmulator,
    client: Issued,
}

async fn setup(tweak: impl FnOnce(&mut BinaryEmulatorConfig)) -> Setup {
    let ca = CertificateAuthority::generate("provider CA").unwrap();
    let client = ca
        .issue_client("Apple Push Services: com.example.app")
        .unwrap();
    let mut config = BinaryEmulatorConfig::new(ca.cert_pem());
    tweak(&mut config);
    Setup {
        emulator: BinaryEmulator::start(config).await.unwrap(),
        client,
    }
}

impl Setup {
    async fn connect_to(
        &self,
        addr: SocketAddr,
        with_cert: bool,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut b = native_tls::TlsConnector::builder();
        b.add_root_certificate(native_tls::Certificate::from_pem(self.emulator.ca_pem()).unwrap());
        if with_cert {
            b.identity(
                native_tls::Identity::from_pkcs8(&self.client.cert_pem, &self.client.key_pem)
                    .unwrap(),
            );
        }
        let tls = tokio_native_tls::TlsConnector::from(b.build().unwrap());
        let tcp = TcpStream::connect(addr).await?;
        tls.connect("localhost", tcp)
            .await
            .map_err(std::io::Error::other)
    }

    async fn gateway(&self) -> TlsStream<TcpStream> {
        self.connect_to(self.emulator.addr(), true).await.unwrap()
    }
}

/// Everything the server sends until it closes.
async fn read_to_end(tls: &mut TlsStream<TcpStream>) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut out))
        .await
        .expect("the server closes");
    out
}

fn token(i: u8) -> [u8; 32] {
    [i; 32]
}

const PAYLOAD: &[u8] = br#"{"aps":{"alert":"hi"}}"#;

/// Appends `data` after its 2-byte big-endian length.
fn sized(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// Command 0: token and payload.
fn simple(token: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    sized(out, token);
    sized(out, payload);
}

/// Command 1: identifier, expiry, token and payload.
fn enhanced(token: &[u8], payload: &[u8], identifier: u32, expiry: u32, out: &mut Vec<u8>) {
    out.push(1);
    out.extend_from_slice(&identifier.to_be_bytes());
    out.extend_from_slice(&expiry.to_be_bytes());
    sized(out, token);
    sized(out, payload);
}

/// Command 2 with items token (1), payload (2), identifier (3), expiration 0 (4) and
/// priority 10 (5).
fn frame(token: &[u8], payload: &[u8], identifier: u32, out: &mut Vec<u8>) {
    let mut items = Vec::new();
    for (id, data) in [
        (1, token),
        (2, payload),
        (3, &identifier.to_be_bytes()[..]),
        (4, &[0, 0, 0, 0][..]),
        (5, &[10][..]),
    ] {
        items.push(id);
        sized(&mut items, data);
    }
    out.push(2);
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    out.extend_from_slice(&items);
}

/// The error response: command 8, status, identifier.
fn error_response(status: u8, identifier: u32) -> Vec<u8> {
    let mut out = vec![8, status];
    out.extend_from_slice(&identifier.to_be_bytes());
    out
}

/// Feedback tuples: time (4), token length (2), token.
fn feedback_tuples(mut bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut tuples = Vec::new();
    while !bytes.is_empty() {
        let time = u32::from_be_bytes(bytes[..4].try_into().unwrap());
        let len = usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
        tuples.push((time, bytes[6..6 + len].to_vec()));
        bytes = &bytes[6 + len..];
    }
    tuples
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while !ok() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn all_three_commands_are_taken_and_recorded() {
    let s = setup(|_| {}).await;
    let mut tls = s.gateway().await;
    let mut out = Vec::new();
    simple(&token(1), br#"{"aps":{"alert":"zero"}}"#, &mut out);
    enhanced(
        &token(2),
        br#"{"aps":{"alert":"one"}}"#,
        11,
        1_700_000_000,
        &mut out,
    );
    frame(&token(3), PAYLOAD, 12, &mut out);
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    wait_until("three records", || s.emulator.records().len() == 3).await;
    let r = s.emulator.records();
    assert_eq!(
        r.iter()
            .map(|r| (r.command, r.identifier, r.status))
            .collect::<Vec<_>>(),
        [(0, None, 0), (1, Some(11), 0), (2, Some(12), 0)]
    );
    assert_eq!(r[0].device_token, "01".repeat(32));
    assert_eq!(r[0].payload_json().unwrap()["aps"]["alert"], "zero");
    assert_eq!(r[1].expiration, Some(1_700_000_000));
    assert_eq!((r[2].expiration, r[2].priority), (Some(0), Some(10)));
    let stats = s.emulator.stats();
    assert_eq!((stats.accepted, stats.connections_open), (3, 1));
    drop(tls);
    wait_until("the connection to close", || {
        s.emulator.stats().connections_open == 0
    })
    .await;
}

#[tokio::test]
async fn the_first_refused_notification_gets_the_error_packet_and_the_rest_is_discarded() {
    let s = setup(|c| c.invalid_tokens = vec![hex::encode(token(2))]).await;
    let mut tls = s.gateway().await;
    let mut out = Vec::new();
    for (i, id) in [(1, 101), (2, 102), (3, 103)] {
        frame(&token(i), PAYLOAD, id, &mut out);
    }
    tls.write_all(&out).await.unwrap();
    let answer = read_to_end(&mut tls).await;
    assert_eq!(answer, error_response(8, 102), "invalid token");
    let r = s.emulator.records();
    assert_eq!(
        r.iter()
            .map(|r| (r.identifier, r.status))
            .collect::<Vec<_>>(),
        [(Some(101), 0), (Some(102), 8)],
        "nothing after the refused one is taken"
    );
    assert_eq!(s.emulator.stats().refused, [(8, 1)].into());
}

/// The `error_delay` fault: the error response comes that long after the refusal, and
/// what the client writes meanwhile is discarded all the same.
#[tokio::test]
async fn a_delayed_error_response_comes_late_and_still_discards_what_followed() {
    let delay = Duration::from_millis(400);
    let s = setup(|c| {
        c.invalid_tokens = vec![hex::encode(token(2))];
        c.error_delay = delay;
    })
    .await;
    let mut tls = s.gateway().await;
    let mut out = Vec::new();
    for (i, id) in [(1, 101), (2, 102), (3, 103)] {
        frame(&token(i), PAYLOAD, id, &mut out);
    }
    let started = std::time::Instant::now();
    tls.write_all(&out).await.unwrap();
    tokio::time::sleep(delay / 4).await;
    let mut later = Vec::new();
    frame(&token(4), PAYLOAD, 104, &mut later);
    tls.write_all(&later).await.unwrap();
    let answer = read_to_end(&mut tls).await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(answer, error_response(8, 102));
    let taken: Vec<_> = s
        .emulator
        .records()
        .iter()
        .map(|r| (r.identifier, r.status))
        .collect();
    assert_eq!(taken, [(Some(101), 0), (Some(102), 8)]);
    assert!(s.emulator.stats().discarded_bytes > 0);
}

#[tokio::test]
async fn format_errors_and_command_0_failures() {
    let s = setup(|_| {}).await;
    // (bytes, status, identifier): invalid token size (5), invalid payload size (7),
    // missing payload (4), unknown (255).
    let cases: Vec<(Vec<u8>, u8, u32)> = vec![
        {
            let mut out = Vec::new();
            enhanced(&[1; 31], b"{}", 5, 0, &mut out);
            (out, 5, 5)
        },
        {
            let mut out = Vec::new();
            simple(&token(1), &[b' '; 2049], &mut out);
            (out, 7, 0)
        },
        {
            let mut out = Vec::new();
            frame(&token(1), b"", 6, &mut out);
            (out, 4, 6)
        },
        (vec![7, 0, 0], 255, 0),
    ];
    for (bytes, status, identifier) in cases {
        let mut tls = s.gateway().await;
        tls.write_all(&bytes).await.unwrap();
        assert_eq!(
            read_to_end(&mut tls).await,
            error_response(status, identifier),
            "status {status}"
        );
    }
}

#[tokio::test]
async fn scripted_statuses_and_shutdown_naming_the_last_one_taken() {
    let s = setup(|_| {}).await;
    s.emulator.script(&hex::encode(token(9)), 1);
    let mut tls = s.gateway().await;
    let mut out = Vec::new();
    frame(&token(9), PAYLOAD, 1, &mut out);
    tls.write_all(&out).await.unwrap();
    assert_eq!(read_to_end(&mut tls).await, [8, 1, 0, 0, 0, 1]);
    s.emulator.script(&hex::encode(token(9)), 0);

    let mut tls = s.gateway().await;
    let mut out = Vec::new();
    frame(&token(9), PAYLOAD, 41, &mut out);
    frame(&token(8), PAYLOAD, 42, &mut out);
    tls.write_all(&out).await.unwrap();
    wait_until("two taken", || s.emulator.stats().accepted == 2).await;
    s.emulator.shutdown_connections();
    assert_eq!(read_to_end(&mut tls).await, [8, 10, 0, 0, 0, 42]);
}

#[tokio::test]
async fn clients_without_the_certificate_are_turned_away() {
    let s = setup(|_| {}).await;
    // TLS 1.3 may finish the client's side of the handshake before the server refuses:
    // either way, nothing is taken and the connection ends.
    if let Ok(mut tls) = s.connect_to(s.emulator.addr(), false).await {
        let mut out = Vec::new();
        frame(&token(1), PAYLOAD, 1, &mut out);
        let _ = tls.write_all(&out).await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut buf))
            .await
            .unwrap();
        assert!(read.is_err() || buf.is_empty(), "{read:?} {buf:?}");
    }
    wait_until("a failed handshake", || {
        s.emulator.stats().handshakes_failed == 1
    })
    .await;
    assert_eq!(s.emulator.stats().accepted, 0);
}

#[tokio::test]
async fn feedback_is_handed_out_once() {
    let s = setup(|c| c.feedback_tokens = vec![hex::encode(token(5))]).await;
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    s.emulator.add_feedback(&token(6), at);
    let addr = s.emulator.feedback_addr().unwrap();
    let mut tls = s.connect_to(addr, true).await.unwrap();
    let bytes = read_to_end(&mut tls).await;
    let tuples = feedback_tuples(&bytes);
    assert_eq!(tuples.len(), 2);
    assert_eq!(tuples[0].1, token(5));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now - u64::from(tuples[0].0) < 60);
    assert_eq!(tuples[1], (1_700_000_000, token(6).to_vec()));
    assert_eq!(s.emulator.pending_feedback(), 0);
    // Forgotten once the client, having read everything, closes.
    drop(tls);
    wait_until("the tuples are counted as handed out", || {
        s.emulator.stats().feedback_tuples == 2
    })
    .await;

    let mut again = s.connect_to(addr, true).await.unwrap();
    assert!(read_to_end(&mut again).await.is_empty());
    let stats = s.emulator.stats();
    assert_eq!((stats.feedback_connections, stats.feedback_tuples), (2, 2));
}

/// The raw TCP stream under a client's TLS.
fn tcp_of(tls: &TlsStream<TcpStream>) -> &TcpStream {
    tls.get_ref().get_ref().get_ref()
}

#[tokio::test]
async fn feedback_survives_a_client_that_disconnects_without_reading() {
    let tokens: Vec<String> = (1..=3).map(|i| hex::encode(token(i))).collect();
    let s = setup(|c| c.feedback_tokens = tokens).await;
    let addr = s.emulator.feedback_addr().unwrap();

    // The tuples (and the server's close_notify) reach this client's socket; it reads
    // none of them and goes away, which resets the connection.
    let tls = s.connect_to(addr, true).await.unwrap();
    let mut buf = [0u8; 4096];
    let arrived = async {
        while tcp_of(&tls).peek(&mut buf).await.unwrap() < 3 * 38 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(DEADLINE, arrived)
        .await
        .expect("the tuples are sent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(tls);

    wait_until("the tuples are back in the queue", || {
        s.emulator.pending_feedback() == 3
    })
    .await;
    let mut again = s.connect_to(addr, true).await.unwrap();
    let tuples = feedback_tuples(&read_to_end(&mut again).await);
    let got: Vec<Vec<u8>> = tuples.into_iter().map(|(_, t)| t).collect();
    assert_eq!(got, [token(1), token(2), token(3)].map(|t| t.to_vec()));
    drop(again);
    wait_until("the tuples are handed out", || {
        s.emulator.stats().feedback_tuples == 3
    })
    .await;
    assert_eq!(s.emulator.pending_feedback(), 0);
}

#[tokio::test]
async fn feedback_survives_a_client_that_stops_reading_until_the_timeout() {
    // More tuples than the sockets' buffers hold, so writing them blocks on a client
    // that does not read, until the service's 10 s timeout.
    let n = 60_000u32;
    let token_of = |i: u32| {
        let mut t = [0u8; 32];
        t[..4].copy_from_slice(&i.to_be_bytes());
        t
    };
    let tokens: Vec<String> = (0..n).map(|i| hex::encode(token_of(i))).collect();
    let s = setup(|c| c.feedback_tokens = tokens).await;
    let addr = s.emulator.feedback_addr().unwrap();

    let stalled = s.connect_to(addr, true).await.unwrap();
    let mut buf = [0u8; 16];
    tcp_of(&stalled).peek(&mut buf).await.unwrap();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while s.emulator.pending_feedback() != n as usize {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the tuples never came back: {} pending",
            s.emulator.pending_feedback()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stalled);

    let mut again = s.connect_to(addr, true).await.unwrap();
    let tuples = feedback_tuples(&read_to_end(&mut again).await);
    assert_eq!(tuples.len(), n as usize);
    let mut got: Vec<Vec<u8>> = tuples.into_iter().map(|(_, t)| t).collect();
    got.sort();
    let want: Vec<Vec<u8>> = (0..n).map(|i| token_of(i).to_vec()).collect();
    assert!(got == want, "tuples lost or duplicated");
}
