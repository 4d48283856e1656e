//! One gateway connection over an in-memory pipe or a real socket: settling, error
//! packets, resends, acknowledgements, history.

use super::*;
use tokio::io::DuplexStream;

const SETTLE: Duration = Duration::from_millis(200);

fn push(i: u8) -> Push {
    Push {
        token: [i; 32],
        payload: b"{}".to_vec(),
        expiration: None,
        priority: Some(10),
    }
}

/// A connection over an in-memory pipe; the other end plays the gateway.
fn pipe() -> (Connection, DuplexStream) {
    let (conn, server, _) = pipe_reporting();
    (conn, server)
}

/// [`pipe`], and where the connection reports rows undelivered after all.
fn pipe_reporting() -> (
    Connection,
    DuplexStream,
    mpsc::UnboundedReceiver<Vec<Undelivered>>,
) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let (undelivered, reports) = mpsc::unbounded_channel();
    let conn = Connection::start(
        client,
        Link {
            id: 1,
            settle: SETTLE,
            kill: CancellationToken::new(),
            probe: None,
            undelivered: Some(undelivered),
        },
    );
    (conn, server, reports)
}

fn frame_len(buf: &[u8]) -> usize {
    assert_eq!(buf[0], 2, "the client writes command-2 frames only");
    u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize
}

/// Reads `n` command-2 frames from the gateway's end; returns their identifiers.
async fn read_frames(server: &mut DuplexStream, n: usize) -> Vec<u32> {
    let mut buf = Vec::new();
    let mut ids = Vec::new();
    while ids.len() < n {
        let mut chunk = [0; 4096];
        let got = server.read(&mut chunk).await.unwrap();
        assert!(got > 0, "the client closed early");
        buf.extend_from_slice(&chunk[..got]);
        // A command-2 frame: 2 | length (4) | items; the identifier is item 3.
        while buf.len() >= 5 && buf.len() >= 5 + frame_len(&buf) {
            let end = 5 + frame_len(&buf);
            let mut at = 5;
            while at < end {
                let (id, len) = (
                    buf[at],
                    usize::from(u16::from_be_bytes([buf[at + 1], buf[at + 2]])),
                );
                if id == 3 {
                    ids.push(u32::from_be_bytes(buf[at + 3..at + 7].try_into().unwrap()));
                }
                at += 3 + len;
            }
            buf.drain(..end);
        }
    }
    ids
}

#[tokio::test(start_paused = true)]
async fn a_notification_is_sent_once_its_settle_window_passes() {
    let (conn, mut server) = pipe();
    let started = Instant::now();
    let outcome = conn.submit(push(1), 1).unwrap();
    assert_eq!(read_frames(&mut server, 1).await, [1]);
    assert_eq!(outcome.await.unwrap(), Outcome::Sent);
    assert!(started.elapsed() >= SETTLE);
    assert!(conn.productive() && conn.is_alive());
}

#[tokio::test(start_paused = true)]
async fn an_error_packet_settles_before_refuses_it_and_resends_after() {
    let (conn, mut server) = pipe();
    let outcomes: Vec<_> = (1..=5)
        .map(|i| conn.submit(push(i), i64::from(i)).unwrap())
        .collect();
    assert_eq!(read_frames(&mut server, 5).await, [1, 2, 3, 4, 5]);
    let packet = ErrorPacket {
        status: Status::InvalidToken,
        identifier: 3,
    };
    server.write_all(&packet.encode()).await.unwrap();
    let mut got = Vec::new();
    for o in outcomes {
        got.push(o.await.unwrap());
    }
    let resend = Outcome::Resend("written after a notification the gateway refused".into());
    assert_eq!(
        got,
        [
            Outcome::Sent,
            Outcome::Sent,
            Outcome::Refused(Status::InvalidToken),
            resend.clone(),
            resend
        ]
    );
    assert!(!conn.is_alive());
    assert!(
        conn.submit(push(9), 9).is_err(),
        "a dead connection takes nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_names_the_last_one_taken() {
    let (conn, mut server) = pipe();
    let outcomes: Vec<_> = (1..=3)
        .map(|i| conn.submit(push(i), i64::from(i)).unwrap())
        .collect();
    read_frames(&mut server, 3).await;
    let packet = ErrorPacket {
        status: Status::Shutdown,
        identifier: 2,
    };
    server.write_all(&packet.encode()).await.unwrap();
    let mut got = Vec::new();
    for o in outcomes {
        got.push(o.await.unwrap());
    }
    assert_eq!(got[..2], [Outcome::Sent, Outcome::Sent]);
    assert!(matches!(&got[2], Outcome::Resend(why) if why.contains("shut")));
}

#[tokio::test(start_paused = true)]
async fn a_lost_connection_resends_what_had_not_settled() {
    let (conn, mut server) = pipe();
    let early = conn.submit(push(1), 1).unwrap();
    read_frames(&mut server, 1).await;
    assert_eq!(early.await.unwrap(), Outcome::Sent);
    let late = conn.submit(push(2), 2).unwrap();
    read_frames(&mut server, 1).await;
    drop(server);
    match late.await.unwrap() {
        Outcome::Resend(why) => assert!(why.contains("closed"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(conn.end_reason().unwrap().contains("closed"));
}

#[tokio::test(start_paused = true)]
async fn a_late_error_packet_still_resends_what_followed() {
    let (conn, mut server) = pipe();
    let first = conn.submit(push(1), 1).unwrap();
    read_frames(&mut server, 1).await;
    assert_eq!(first.await.unwrap(), Outcome::Sent);
    let second = conn.submit(push(2), 2).unwrap();
    read_frames(&mut server, 1).await;
    let packet = ErrorPacket {
        status: Status::InvalidToken,
        identifier: 1,
    };
    server.write_all(&packet.encode()).await.unwrap();
    assert!(matches!(second.await.unwrap(), Outcome::Resend(_)));
}

#[tokio::test(start_paused = true)]
async fn many_notifications_share_writes_and_settle_together() {
    let (conn, mut server) = pipe();
    let started = Instant::now();
    let outcomes: Vec<_> = (0..200)
        .map(|i| conn.submit(push(i), i64::from(i)).unwrap())
        .collect();
    let ids = read_frames(&mut server, 200).await;
    assert_eq!(ids, (1..=200).collect::<Vec<_>>());
    for o in outcomes {
        assert_eq!(o.await.unwrap(), Outcome::Sent);
    }
    // Pipelined: the whole lot took about one settle window, not 200.
    assert!(started.elapsed() < SETTLE * 3, "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn killing_a_connection_hands_everything_back() {
    let (conn, mut server) = pipe();
    let outcome = conn.submit(push(1), 1).unwrap();
    read_frames(&mut server, 1).await;
    conn.kill("stalled");
    assert_eq!(outcome.await.unwrap(), Outcome::Resend("stalled".into()));
    assert!(!conn.productive());
}

/// Issue 9: the gateway dropped what followed the refused notification, including
/// what had already been reported sent: those rows are reported undelivered (before,
/// nothing was: they stayed `sent`, never delivered).
#[tokio::test(start_paused = true)]
async fn a_late_error_packet_revives_what_followed_it_and_was_reported_sent() {
    let (conn, mut server, mut reports) = pipe_reporting();
    let outcomes: Vec<_> = (1..=4)
        .map(|i| conn.submit(push(i), 100 + i64::from(i)).unwrap())
        .collect();
    assert_eq!(read_frames(&mut server, 4).await, [1, 2, 3, 4]);
    for o in outcomes {
        assert_eq!(o.await.unwrap(), Outcome::Sent);
    }
    let pending = conn.submit(push(5), 105).unwrap();
    read_frames(&mut server, 1).await;
    let packet = ErrorPacket {
        status: Status::Processing,
        identifier: 2,
    };
    server.write_all(&packet.encode()).await.unwrap();
    assert!(matches!(pending.await.unwrap(), Outcome::Resend(_)));
    let revived = reports.recv().await.expect("a report");
    assert_eq!(revived.iter().map(|u| u.id).collect::<Vec<_>>(), [103, 104]);
    assert!(
        revived[0].reason.contains("processing error"),
        "{}",
        revived[0].reason
    );
    assert!(reports.try_recv().is_err(), "one report");
}

/// A shutdown naming a notification reported sent: those after it were not taken.
/// One older than the history (here 0, "none") revives all of it.
#[tokio::test(start_paused = true)]
async fn a_late_shutdown_revives_what_it_did_not_take() {
    for (named, want) in [(1, vec![102, 103]), (0, vec![101, 102, 103]), (3, vec![])] {
        let (conn, mut server, mut reports) = pipe_reporting();
        let outcomes: Vec<_> = (1..=3)
            .map(|i| conn.submit(push(i), 100 + i64::from(i)).unwrap())
            .collect();
        read_frames(&mut server, 3).await;
        for o in outcomes {
            assert_eq!(o.await.unwrap(), Outcome::Sent);
        }
        let packet = ErrorPacket {
            status: Status::Shutdown,
            identifier: named,
        };
        server.write_all(&packet.encode()).await.unwrap();
        while conn.is_alive() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let got: Vec<i64> = reports
            .try_recv()
            .unwrap_or_default()
            .iter()
            .map(|u| u.id)
            .collect();
        assert_eq!(got, want, "shutdown naming {named}");
    }
}

/// The history forgets what is older than a minute.
#[tokio::test(start_paused = true)]
async fn the_history_is_bounded_by_age() {
    let (conn, mut server, mut reports) = pipe_reporting();
    let old = conn.submit(push(1), 101).unwrap();
    read_frames(&mut server, 1).await;
    assert_eq!(old.await.unwrap(), Outcome::Sent);
    tokio::time::sleep(HISTORY_AGE).await;
    let recent = conn.submit(push(2), 102).unwrap();
    read_frames(&mut server, 1).await;
    assert_eq!(recent.await.unwrap(), Outcome::Sent);
    assert_eq!(conn.state.inflight.lock().unwrap().history.len(), 1);
    let packet = ErrorPacket {
        status: Status::InvalidToken,
        identifier: 1,
    };
    server.write_all(&packet.encode()).await.unwrap();
    // 1 is forgotten, so older than the history: everything remembered is revived.
    let got: Vec<i64> = reports.recv().await.unwrap().iter().map(|u| u.id).collect();
    assert_eq!(got, [102]);
}

/// A TLS gateway on loopback with a tiny receive buffer that, after the handshake,
/// reads nothing until `resume` fires, then everything: its kernel acknowledges a few
/// kilobytes, and the rest sits unacknowledged in the client's send buffer.
async fn stalled_gateway() -> (ConnectOptions, oneshot::Sender<()>) {
    use pgpushd_emulator::tls::CertificateAuthority;
    let ca = CertificateAuthority::generate("test CA").unwrap();
    let issued = ca
        .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let identity = native_tls::Identity::from_pkcs8(&issued.cert_pem, &issued.key_pem).unwrap();
    let acceptor =
        tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).unwrap());
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(1).unwrap();
    socket.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (resume, resumed) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let _ = resumed.await;
        let mut sink = vec![0; 64 * 1024];
        while let Ok(1..) = tls.read(&mut sink).await {}
    });
    let (undelivered, _) = mpsc::unbounded_channel();
    let tls = native_tls::TlsConnector::builder()
        .add_root_certificate(native_tls::Certificate::from_pem(&ca.cert_pem()).unwrap())
        .build()
        .unwrap();
    let opts = ConnectOptions {
        host: "localhost".into(),
        port,
        proxy: None,
        tls,
        connect_timeout: Duration::from_secs(10),
        settle: SETTLE,
        undelivered,
    };
    (opts, resume)
}

fn big_push(i: u8) -> Push {
    Push {
        payload: format!(r#"{{"aps":{{"alert":"{}"}}}}"#, "x".repeat(2000)).into_bytes(),
        ..push(i)
    }
}

/// Issue 9: bytes the gateway's TCP stack has not acknowledged have not reached it.
/// Before, the window started once they were in the local kernel's buffer, and all 60
/// notifications (120 KB, far more than the stalled peer's window) counted as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_the_gateway_has_not_acknowledged_do_not_settle() {
    let (opts, resume) = stalled_gateway().await;
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    let mut outcomes: Vec<_> = (0..60)
        .map(|i| conn.submit(big_push(i), i64::from(i)).unwrap())
        .collect();
    tokio::time::sleep(SETTLE * 5).await;
    let mut sent = 0;
    for o in &mut outcomes {
        match o.try_recv() {
            Ok(Outcome::Sent) => sent += 1,
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
    assert!(
        sent < 20,
        "{sent} of 60 counted sent while the gateway read nothing"
    );
    assert!(conn.is_alive());
    // Once the gateway reads, its stack acknowledges the rest, and they settle.
    resume.send(()).unwrap();
    for o in outcomes.into_iter().skip(sent) {
        let o = tokio::time::timeout(Duration::from_secs(10), o)
            .await
            .unwrap();
        assert_eq!(o.unwrap(), Outcome::Sent);
    }
}

/// Issue 9: gateway and feedback connections have TCP keepalive on, probing well
/// before a NAT forgets the flow.
#[tokio::test]
async fn connections_have_tcp_keepalive() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tcp = connect_tcp("127.0.0.1", port, None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_keepalive(&tcp);
    assert!(KEEPALIVE_IDLE < Duration::from_secs(120));
    assert!(super::super::pool::MAX_IDLE <= Duration::from_secs(90));
}

fn assert_keepalive(tcp: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
    assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
    assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
}

/// Through a proxy, keepalive is on the socket to the proxy (the stream handed back).
#[tokio::test]
async fn a_tunnel_keeps_tcp_keepalive_on_the_socket_to_the_proxy() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(socket.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"CONNECT gateway.push.apple.com:2195 "));
        socket
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
        let mut sink = Vec::new();
        let _ = socket.read_to_end(&mut sink).await;
    });
    let proxy = crate::proxy::Proxy::parse(&format!("http://127.0.0.1:{proxy_port}")).unwrap();
    let tcp = connect_tcp(
        "gateway.push.apple.com",
        2195,
        Some(&proxy),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(tcp.peer_addr().unwrap().port(), proxy_port);
    assert_keepalive(&tcp);
}
