//! One long-lived HTTP/2 connection to APNs.
//!
//! TCP, then TLS with ALPN `h2` (system roots plus the app's CA file, verification always
//! on), then h2. The h2 `Connection` future runs in its own task; a second task PINGs when
//! the connection is idle and drops it when a PING goes unanswered (a half-open TCP
//! connection would otherwise swallow requests until each one timed out).
//!
//! Many requests share the connection, one stream each; h2 holds back streams beyond the
//! server's `SETTINGS_MAX_CONCURRENT_STREAMS`, so a slow request delays another only when
//! the server's limit says so. [`Connection::send`] tells a request the server never
//! processed (safe to send again elsewhere) from a real answer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::response::Answer;

/// Bodies are small JSON objects; anything larger is cut here.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// How to reach the server and how patient to be.
#[derive(Clone)]
pub struct ConnectOptions {
    pub host: String,
    pub port: u16,
    pub tls: native_tls::TlsConnector,
    /// Upper bound on TCP connect, TLS and HTTP/2 handshakes together.
    pub connect_timeout: Duration,
    /// Upper bound on one request, from handing it to h2 to the end of the answer.
    pub request_timeout: Duration,
    /// PING after this long without an answer on the connection.
    pub ping_interval: Duration,
    /// A PING unanswered for this long means the connection is dead.
    pub ping_timeout: Duration,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Tcp {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("TLS handshake with {addr} failed: {message}")]
    Tls { addr: String, message: String },
    #[error("{addr} does not speak HTTP/2 (ALPN: {chosen})")]
    NoH2 { addr: String, chosen: String },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    H2 { addr: String, source: h2::Error },
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The server did not process it: GOAWAY above its last stream, REFUSED_STREAM, or the
    /// connection was unusable or lost before an answer. Sending it again elsewhere is
    /// right (after a lost connection it may have been delivered: at least once).
    #[error("{0}")]
    NotProcessed(String),
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The stream failed otherwise (reset by the server, protocol error).
    #[error("{0}")]
    Stream(String),
}

/// State shared by the connection handle and its tasks.
struct Shared {
    in_flight: AtomicUsize,
    /// Answers received so far: the PING task pings only when this stands still.
    answers: AtomicU64,
    /// PINGs answered so far.
    pongs: AtomicU64,
    /// Cancelled once no new request should go out on this connection.
    retired: CancellationToken,
    /// Cancelled to drop the connection (dead PING, shutdown), and when it has ended.
    kill: CancellationToken,
}

pub struct Connection {
    id: u64,
    peer: String,
    send: SendRequest<Bytes>,
    request_timeout: Duration,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("usable", &self.usable())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Connects, and runs the connection until `shutdown`, death, or the last handle goes.
    pub async fn connect(
        opts: &ConnectOptions,
        shutdown: &CancellationToken,
    ) -> Result<Connection, ConnectError> {
        let addr = format!("{}:{}", opts.host, opts.port);
        tokio::time::timeout(
            opts.connect_timeout,
            Connection::handshake(opts, &addr, shutdown),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addr,
                after: opts.connect_timeout,
            })
        })
    }

    async fn handshake(
        opts: &ConnectOptions,
        addr: &str,
        shutdown: &CancellationToken,
    ) -> Result<Connection, ConnectError> {
        let tcp = TcpStream::connect((opts.host.as_str(), opts.port))
            .await
            .map_err(|source| ConnectError::Tcp {
                addr: addr.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_native_tls::TlsConnector::from(opts.tls.clone())
            .connect(&opts.host, tcp)
            .await
            .map_err(|e| ConnectError::Tls {
                addr: addr.to_owned(),
                message: e.to_string(),
            })?;
        match tls.get_ref().negotiated_alpn() {
            Ok(Some(p)) if p == b"h2" => {}
            other => {
                return Err(ConnectError::NoH2 {
                    addr: addr.to_owned(),
                    chosen: match other {
                        Ok(Some(p)) => String::from_utf8_lossy(&p).into_owned(),
                        _ => "none".to_owned(),
                    },
                })
            }
        }
        let (send, mut conn) = h2::client::Builder::new()
            // Until the server's SETTINGS say otherwise: APNs under token auth allows one
            // stream until the first success, and refuses streams beyond it.
            .initial_max_send_streams(1)
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .max_concurrent_reset_streams(1024)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| ConnectError::H2 {
                addr: addr.to_owned(),
                source,
            })?;
        let ping_pong = conn.ping_pong().expect("taken once, here");

        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            answers: AtomicU64::new(0),
            pongs: AtomicU64::new(0),
            retired: CancellationToken::new(),
            kill: shutdown.child_token(),
        });
        let peer = addr.to_owned();
        info!(conn = id, peer = %peer, "connected to APNs");

        let s = shared.clone();
        let p = peer.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut conn => match result {
                    Ok(()) => info!(conn = id, peer = %p, "APNs connection closed"),
                    Err(e) => warn!(conn = id, peer = %p, error = %e, "APNs connection failed"),
                },
                _ = s.kill.cancelled() => debug!(conn = id, peer = %p, "dropping the APNs connection"),
            }
            // Dropping `conn` fails every stream still open on it: their senders resend.
            drop(conn);
            s.retired.cancel();
            s.kill.cancel();
        });
        tokio::spawn(keep_alive(
            ping_pong,
            shared.clone(),
            opts.ping_interval,
            opts.ping_timeout,
            id,
            peer.clone(),
        ));

        Ok(Connection {
            id,
            peer,
            send,
            request_timeout: opts.request_timeout,
            shared,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether new requests may go out on this connection.
    pub fn usable(&self) -> bool {
        !self.shared.retired.is_cancelled()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// PINGs the server answered: proof of life while idle.
    pub fn pongs(&self) -> u64 {
        self.shared.pongs.load(Ordering::Relaxed)
    }

    /// Resolves once the connection takes no new requests (it may still be finishing
    /// some): time to open its successor.
    pub async fn retired(&self) {
        self.shared.retired.cancelled().await
    }

    /// Drops the connection now; requests still on it fail as not processed.
    pub fn close(&self) {
        self.shared.retired.cancel();
        self.shared.kill.cancel();
    }

    fn retire(&self, why: &str) {
        if !self.shared.retired.is_cancelled() {
            info!(conn = self.id, peer = %self.peer, reason = why, "APNs connection retired");
            self.shared.retired.cancel();
        }
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &self,
        request: http::Request<()>,
        body: Bytes,
    ) -> Result<Answer, RequestError> {
        if !self.usable() {
            return Err(RequestError::NotProcessed(
                "the connection was closing".to_owned(),
            ));
        }
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.shared);
        match tokio::time::timeout(self.request_timeout, self.exchange(request, body)).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Timeout(self.request_timeout)),
        }
    }

    async fn exchange(
        &self,
        request: http::Request<()>,
        body: Bytes,
    ) -> Result<Answer, RequestError> {
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| self.classify(e))?;
        let (response, mut stream) = send
            .send_request(request, body.is_empty())
            .map_err(|e| self.classify(e))?;
        if !body.is_empty() {
            stream.send_data(body, true).map_err(|e| self.classify(e))?;
        }
        let response = response.await.map_err(|e| self.classify(e))?;
        self.shared.answers.fetch_add(1, Ordering::Relaxed);

        let (parts, mut recv) = response.into_parts();
        let mut body = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            // The status is the answer; a body cut short only loses its reason.
            let Ok(chunk) = chunk else { break };
            let _ = recv.flow_control().release_capacity(chunk.len());
            let room = MAX_RESPONSE_BODY.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok(Answer {
            status: parts.status.as_u16(),
            apns_id: parts
                .headers
                .get(super::request::APNS_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: body.freeze(),
        })
    }

    fn classify(&self, e: h2::Error) -> RequestError {
        if e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            return RequestError::NotProcessed(
                "the server refused the stream (REFUSED_STREAM)".into(),
            );
        }
        if e.is_go_away() {
            self.retire("GOAWAY");
            return RequestError::NotProcessed(format!("GOAWAY before the answer: {e}"));
        }
        if e.is_io() || self.shared.kill.is_cancelled() {
            self.retire("connection lost");
            return RequestError::NotProcessed(format!("connection lost before the answer: {e}"));
        }
        RequestError::Stream(e.to_string())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}

struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// PINGs whenever an interval passes without an answer; drops the connection when a
/// PING stays unanswered for `timeout`.
async fn keep_alive(
    mut ping_pong: h2::PingPong,
    shared: Arc<Shared>,
    interval: Duration,
    timeout: Duration,
    id: u64,
    peer: String,
) {
    let mut seen = shared.answers.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = shared.kill.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = shared.answers.load(Ordering::Relaxed);
        if now != seen {
            seen = now; // answers are arriving: the connection is alive
            continue;
        }
        let ping = ping_pong.ping(h2::Ping::opaque());
        tokio::select! {
            _ = shared.kill.cancelled() => return,
            result = tokio::time::timeout(timeout, ping) => match result {
                Ok(Ok(_pong)) => {
                    shared.pongs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    debug!(conn = id, peer = %peer, error = %e, "PING failed");
                    shared.kill.cancel();
                    return;
                }
                Err(_) => {
                    warn!(conn = id, peer = %peer, ?timeout, "no answer to PING; dropping the connection");
                    shared.kill.cancel();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::http2::raw_peer::{RawFrame, RawPeer};
    use crate::apns::testutil::{eventually, TestEmulator};
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
        assert!(a.apns_id.is_some());
        let a = conn
            .send(request(server.port(), &token(0xbad)), body())
            .await
            .unwrap();
        assert_eq!(a.status, 400);
        assert_eq!(&a.body[..], br#"{"reason":"BadDeviceToken"}"#);
        let records = server.records();
        assert_eq!(records.len(), 2);
        assert_eq!(&records[0].payload[..], b"{}");
        assert_eq!(records[1].apns_id.as_str(), a.apns_id.as_deref().unwrap());
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
        assert!(
            matches!(after, Err(RequestError::NotProcessed(_))),
            "{after:?}"
        );
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
        opts.tls = crate::apns::tls::connector(None, None, &["h2"]).unwrap(); // system roots only
        let e = Connection::connect(&opts, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Tls { .. }), "{e}");

        // Another CA's file: the emulator's certificate does not chain to it.
        let other = TestEmulator::open().await;
        let mut opts = server.connect_options();
        opts.tls = crate::apns::tls::connector(Some(&other.ca_file), None, &["h2"]).unwrap();
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

        let Err(e) = crate::apns::tls::read_ca_file(std::path::Path::new("/nonexistent/ca.pem"))
        else {
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
}
