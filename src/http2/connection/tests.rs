//! One connection against the emulator and, for what it cannot do, the raw peer.

use super::*;
use crate::http2::raw_peer::{RawFrame, RawPeer};
use crate::http2::TrustingEmulator;
use crate::testutil::{eventually, TestEmulator};
use pgpushd_emulator::EmulatorConfig;

/// A device token the emulator accepts (64 hex digits).
fn token(n: u32) -> String {
    format!("{n:064x}")
}

/// A valid push to `token` on `port` (the emulator answers an empty body 400).
fn request(port: u16, token: &str) -> http::Request<()> {
    let mut r = http::Request::new(());
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = format!("https://localhost:{port}/3/device/{token}")
        .parse()
        .unwrap();
    r
}

fn body() -> Bytes {
    Bytes::from_static(b"{}")
}

#[tokio::test]
async fn answers_come_back_with_status_id_and_body() {
    let server = TestEmulator::open().await;
    server.script(&token(0xbad), 400, "BadDeviceToken");
    let conn = Connection::connect(&server.connect_options(), &CancellationToken::new())
        .await
        .unwrap();
    let a = conn
        .send(request(server.port(), &token(1)), body())
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert!(a.header("apns-id").is_some());
    let a = conn
        .send(request(server.port(), &token(0xbad)), body())
        .await
        .unwrap();
    assert_eq!(a.status, 400);
    assert_eq!(&a.body[..], br#"{"reason":"BadDeviceToken"}"#);
    let records = server.records();
    assert_eq!(records.len(), 2);
    assert_eq!(&records[0].payload[..], b"{}");
    assert_eq!(records[1].apns_id.as_str(), a.header("apns-id").unwrap());
    assert!(conn.usable());
    assert_eq!(conn.in_flight(), 0);
}

#[tokio::test]
async fn many_requests_share_one_connection() {
    let server = TestEmulator::open().await;
    let mut opts = server.connect_options();
    opts.request_timeout = Duration::from_millis(1500);
    let conn = Arc::new(
        Connection::connect(&opts, &CancellationToken::new())
            .await
            .unwrap(),
    );
    // One slow request must not hold up the others.
    server.set_latency(Duration::from_secs(3600));
    let slow = {
        let conn = conn.clone();
        let r = request(server.port(), &token(0));
        tokio::spawn(async move { conn.send(r, body()).await })
    };
    eventually(|| server.stats().requests_in_flight == 1).await;
    server.set_latency(Duration::ZERO);
    let started = tokio::time::Instant::now();
    let all = futures::future::join_all(
        (0..500).map(|i| conn.send(request(server.port(), &token(i + 1)), body())),
    )
    .await;
    assert!(all.iter().all(|a| a.as_ref().unwrap().status == 200));
    assert!(started.elapsed() < opts.request_timeout);
    assert_eq!(server.stats().connections_accepted, 1);
    assert_eq!(
        slow.await.unwrap(),
        Err(RequestError::Timeout(opts.request_timeout))
    );
}

#[tokio::test]
async fn the_servers_stream_limit_is_respected() {
    let server = TestEmulator::start(EmulatorConfig {
        max_streams: 3,
        latency: Duration::from_millis(20),
        ..EmulatorConfig::default()
    })
    .await;
    let conn = Connection::connect(&server.connect_options(), &CancellationToken::new())
        .await
        .unwrap();
    let most = AtomicUsize::new(0);
    let done = CancellationToken::new();
    let watch = async {
        while !done.is_cancelled() {
            let now = server.stats().requests_in_flight as usize;
            most.fetch_max(now, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let sends = async {
        let all = futures::future::join_all(
            (0..50).map(|i| conn.send(request(server.port(), &token(i)), body())),
        )
        .await;
        done.cancel();
        all
    };
    let (all, ()) = tokio::join!(sends, watch);
    // A stream beyond the limit would have been refused (REFUSED_STREAM): not a 200.
    assert!(all.iter().all(|a| a.as_ref().unwrap().status == 200));
    let most = most.load(Ordering::Relaxed);
    assert!((1..=3).contains(&most), "{most} in flight at once");
    assert_eq!(server.stats().streams_refused, 0);
}

/// GOAWAY, then the connection closes with the requests unanswered.
#[tokio::test]
async fn goaway_fails_unanswered_requests_as_not_processed() {
    let server = TestEmulator::open().await;
    let conn = Arc::new(
        Connection::connect(&server.connect_options(), &CancellationToken::new())
            .await
            .unwrap(),
    );
    server.set_latency(Duration::from_secs(3600));
    let sends = futures::future::join_all(
        (0..5).map(|i| conn.send(request(server.port(), &token(i)), body())),
    );
    let goaway = async {
        eventually(|| server.stats().requests_in_flight == 5).await;
        server.goaway_all();
        eventually(|| server.stats().goaways_sent == 1).await;
        server.drop_connections();
    };
    let (results, ()) = tokio::join!(sends, goaway);
    for r in results {
        assert!(matches!(r, Err(RequestError::NotProcessed(_))), "{r:?}");
    }
    assert!(!conn.usable());
    let after = conn.send(request(server.port(), &token(9)), body()).await;
    assert!(matches!(after, Err(RequestError::NotSent(_))), "{after:?}");
}

/// Streams above GOAWAY's last-stream-id were never processed; the one below was and
/// gets no such pass. (A raw peer: a server sends such a GOAWAY only when it stops
/// at once, and neither h2's server nor the emulator does.)
#[tokio::test]
async fn goaway_below_a_stream_fails_it_as_not_processed() {
    let server = RawPeer::start(|_, count| match count {
        3 => vec![RawFrame::GoAway {
            last_stream_id: 1,
            code: 0,
        }],
        _ => vec![],
    })
    .await;
    let mut opts = server.connect_options();
    opts.request_timeout = Duration::from_millis(500);
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    let first = conn.send(request(opts.port, "aa"), Bytes::new());
    let others = async {
        server.wait_for_requests(1).await;
        tokio::join!(
            conn.send(request(opts.port, "bb"), Bytes::new()),
            conn.send(request(opts.port, "cc"), Bytes::new()),
        )
    };
    let (first, (b, c)) = tokio::join!(first, others);
    for r in [b, c] {
        match r {
            Err(RequestError::NotProcessed(why)) => assert!(why.starts_with("GOAWAY"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(first, Err(RequestError::Timeout(opts.request_timeout)));
    assert!(!conn.usable());
}

/// (A raw peer: the emulator refuses a stream only from a client that opens more
/// than the limit, which this one never does.)
#[tokio::test]
async fn refused_streams_are_not_processed() {
    let server = RawPeer::start(|stream_id, _| {
        vec![RawFrame::RstStream {
            stream_id,
            code: 7, // REFUSED_STREAM
        }]
    })
    .await;
    let opts = server.connect_options();
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    let r = conn.send(request(opts.port, "aa"), Bytes::new()).await;
    assert_eq!(
        r,
        Err(RequestError::NotProcessed(
            "the server refused the stream (REFUSED_STREAM)".into()
        ))
    );
    assert!(
        conn.usable(),
        "a refused stream leaves the connection usable"
    );
}

#[tokio::test]
async fn a_dropped_connection_fails_requests_as_not_processed() {
    let server = TestEmulator::open().await;
    let conn = Connection::connect(&server.connect_options(), &CancellationToken::new())
        .await
        .unwrap();
    server.set_latency(Duration::from_secs(3600));
    let sends = async {
        tokio::join!(
            conn.send(request(server.port(), &token(1)), body()),
            conn.send(request(server.port(), &token(2)), body()),
        )
    };
    let drop = async {
        eventually(|| server.stats().requests_in_flight == 2).await;
        server.drop_connections();
    };
    let ((a, b), ()) = tokio::join!(sends, drop);
    assert!(matches!(a, Err(RequestError::NotProcessed(_))), "{a:?}");
    assert!(matches!(b, Err(RequestError::NotProcessed(_))), "{b:?}");
    tokio::time::timeout(Duration::from_secs(5), conn.retired())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unanswered_ping_kills_the_connection() {
    let server = TestEmulator::open().await;
    let mut opts = server.connect_options();
    opts.ping_interval = Duration::from_millis(100);
    opts.ping_timeout = Duration::from_millis(200);
    opts.request_timeout = Duration::from_secs(30);
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    // Served once, so the server is past its handshake (a stall set during the
    // handshake does not take), then it hangs: no answers, no PING acks, the socket
    // stays open.
    let r = conn.send(request(server.port(), &token(0)), body()).await;
    assert_eq!(r.unwrap().status, 200);
    server.stall(true);
    let started = tokio::time::Instant::now();
    let r = conn.send(request(server.port(), &token(1)), body()).await;
    assert!(matches!(r, Err(RequestError::NotProcessed(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!conn.usable());
}

#[tokio::test]
async fn an_idle_connection_answering_pings_stays() {
    let server = TestEmulator::open().await;
    let mut opts = server.connect_options();
    opts.ping_interval = Duration::from_millis(20);
    opts.ping_timeout = Duration::from_millis(500);
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    eventually(|| conn.pongs() >= 5).await;
    assert!(conn.usable());
    let r = conn.send(request(server.port(), &token(1)), body()).await;
    assert_eq!(r.unwrap().status, 200);
}

#[tokio::test]
async fn tls_is_verified_against_the_ca_file() {
    let server = TestEmulator::open().await;
    let mut opts = server.connect_options();
    opts.tls = crate::tls::connector(None, None, &["h2"]).unwrap(); // system roots only
    let e = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");

    // Another CA's file: the emulator's certificate does not chain to it.
    let other = TestEmulator::open().await;
    let mut opts = server.connect_options();
    opts.tls = crate::tls::connector(Some(&other.ca_file), None, &["h2"]).unwrap();
    let e = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");

    // A name the certificate does not carry ("127.1" reaches 127.0.0.1; the
    // certificate names localhost, 127.0.0.1 and ::1).
    let mut opts = server.connect_options();
    opts.host = "127.1".into();
    let e = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");

    let conn = Connection::connect(&server.connect_options(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(conn.usable());
}

#[tokio::test]
async fn connect_errors_are_clear() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let server = TestEmulator::open().await;
    let mut opts = server.connect_options();
    opts.port = port;
    let e = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("cannot connect to localhost:{port}: ")),
        "{e}"
    );

    let Err(e) = crate::tls::read_ca_file(std::path::Path::new("/nonexistent/ca.pem")) else {
        panic!("a missing CA file must fail")
    };
    assert!(
        e.starts_with("/nonexistent/ca.pem: cannot read the CA file"),
        "{e}"
    );
}

#[tokio::test]
async fn shutdown_drops_the_connection() {
    let server = TestEmulator::open().await;
    server.set_latency(Duration::from_secs(3600));
    let shutdown = CancellationToken::new();
    let conn = Connection::connect(&server.connect_options(), &shutdown)
        .await
        .unwrap();
    let send = conn.send(request(server.port(), &token(1)), body());
    let stop = async {
        eventually(|| server.stats().requests_in_flight == 1).await;
        shutdown.cancel();
    };
    let (r, ()) = tokio::join!(send, stop);
    assert!(matches!(r, Err(RequestError::NotProcessed(_))), "{r:?}");
}

/// A GOAWAY with an error code: the stream at or below its last-stream-id may have
/// been processed, so its failure is an attempt; the ones above it were not.
#[tokio::test]
async fn goaway_with_an_error_fails_streams_below_it_as_attempts() {
    let server = RawPeer::start(|_, count| match count {
        3 => vec![
            RawFrame::GoAway {
                last_stream_id: 1,
                code: 2, // INTERNAL_ERROR
            },
            RawFrame::Close,
        ],
        _ => vec![],
    })
    .await;
    let opts = server.connect_options();
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    let first = conn.send(request(opts.port, "aa"), body());
    let others = async {
        server.wait_for_requests(1).await;
        tokio::join!(
            conn.send(request(opts.port, "bb"), body()),
            conn.send(request(opts.port, "cc"), body()),
        )
    };
    let (first, (b, c)) = tokio::join!(first, others);
    for r in [b, c] {
        assert!(matches!(r, Err(RequestError::NotProcessed(_))), "{r:?}");
    }
    match first {
        Err(RequestError::Stream(why)) => {
            assert!(why.contains("may have been processed"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!conn.usable());
}

/// The request timeout runs from when a request has its stream: requests queued
/// behind the server's stream limit do not time out while they wait.
#[tokio::test]
async fn waiting_for_a_stream_is_not_part_of_the_request_timeout() {
    let server = TestEmulator::start(EmulatorConfig {
        max_streams: 2,
        latency: Duration::from_millis(300),
        ..EmulatorConfig::default()
    })
    .await;
    let mut opts = server.connect_options();
    opts.request_timeout = Duration::from_millis(700);
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    // 8 requests, 2 at a time, 300 ms each: the last one waits ~900 ms for a stream.
    let wait = Duration::from_secs(5);
    let all = futures::future::join_all(
        (0..8).map(|i| conn.send_within(request(server.port(), &token(i)), body(), wait)),
    )
    .await;
    for a in &all {
        assert_eq!(a.as_ref().map(|a| a.status), Ok(200));
    }
}

/// A request that waited too long for a stream never left: the server never saw it.
#[tokio::test]
async fn a_request_without_a_stream_in_time_never_left() {
    let server = TestEmulator::start(EmulatorConfig {
        max_streams: 2,
        ..EmulatorConfig::default()
    })
    .await;
    let conn = Connection::connect(&server.connect_options(), &CancellationToken::new())
        .await
        .unwrap();
    // Served once, so the server's stream limit (2) applies.
    let r = conn.send(request(server.port(), &token(0)), body()).await;
    assert_eq!(r.unwrap().status, 200);
    server.set_latency(Duration::from_secs(3600));
    let wait = Duration::from_millis(200);
    let all = futures::future::join_all(
        (1..=5).map(|i| conn.send_within(request(server.port(), &token(i)), body(), wait)),
    )
    .await;
    let no_stream = all
        .iter()
        .filter(|r| **r == Err(RequestError::NoStream(wait)))
        .count();
    assert_eq!(no_stream, 3, "{all:?}");
    assert_eq!(server.stats().requests_in_flight, 2);
    assert_eq!(server.stats().requests, 1);
}

/// Answers that come after their requests timed out (the stream reset, then
/// forgotten by h2) count toward h2's limit of locally reset streams, which kills
/// the connection with everything on it: the connection retires gracefully, still
/// running, after it gave up on [`RESET_BUDGET`] streams. (With h2's defaults and no
/// budget, this test's connection dies after about 1,200 requests with "detected excessive
/// load generating behavior (too_many_internal_resets)", taking every stream with it.)
#[tokio::test]
async fn late_answers_to_timed_out_requests_do_not_kill_the_connection() {
    const WAVE: u32 = 100;
    // Each request's answer comes when the request a wave later arrives.
    let server = RawPeer::start(|stream_id, _| match stream_id.checked_sub(2 * WAVE) {
        Some(late) if late > 0 => vec![RawFrame::Ok200 { stream_id: late }],
        _ => vec![],
    })
    .await;
    let mut opts = server.connect_options();
    opts.request_timeout = Duration::from_millis(100);
    let conn = Connection::connect(&opts, &CancellationToken::new())
        .await
        .unwrap();
    let mut sent = 0;
    while conn.usable() && sent < 3000 {
        let wave = futures::future::join_all(
            (0..WAVE).map(|i| conn.send(request(opts.port, &format!("{:x}", sent + i)), body())),
        )
        .await;
        sent += WAVE;
        for r in wave {
            assert_eq!(
                r,
                Err(RequestError::Timeout(opts.request_timeout)),
                "after {sent}"
            );
        }
    }
    assert!(!conn.usable(), "retired after {sent} requests");
    assert!(
        !conn.shared.kill.is_cancelled(),
        "the connection still runs"
    );
}
