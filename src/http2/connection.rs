//! One long-lived HTTP/2 connection to a push service (APNs, FCM).
//!
//! TCP (through the app's proxy's CONNECT tunnel when it has one: `crate::proxy`), then
//! TLS with ALPN `h2` (system roots plus the app's CA file, verification always on,
//! against the service host's name either way), then h2. The h2 `Connection` future runs in
//! its own task; a second task PINGs when the connection is idle and drops it when a PING
//! goes unanswered (a half-open TCP connection would otherwise swallow requests until
//! each one timed out).
//!
//! Many requests share the connection, one stream each; h2 holds back streams beyond the
//! server's `SETTINGS_MAX_CONCURRENT_STREAMS`, so a slow request delays another only when
//! the server's limit says so. A request leaves in two steps: its HEADERS (without
//! END_STREAM) once h2 gives it a stream, then its body, which completes it. Until the body
//! is out the server cannot have acted on it, so a request that waited too long for a
//! stream is dropped as never processed, and the request timeout runs only from the body.
//!
//! [`Connection::send`] tells a request the server never processed (safe to send again
//! elsewhere) from a real answer. The server's GOAWAY is read off the wire as it arrives
//! (`frame_watch`): the connection retires at once (its successor opens while its streams
//! drain), and its last-stream-id says which streams the server may have processed.
//!
//! A timed-out stream is reset (RST_STREAM CANCEL). h2 remembers a bounded number of
//! reset streams, and counts an answer arriving for a forgotten one against its limit of
//! locally reset streams (`max_local_error_reset_streams`, 1024 over the connection's
//! life), past which it kills the connection with every stream on it. So a connection
//! retires gracefully after [`RESET_BUDGET`] streams it gave up on, well before that.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use super::frame_watch::GoAway;
use super::frame_watch::{FrameWatch, Watcher};
use super::Answer;
use crate::proxy::{self, Proxy};

/// Bodies are small JSON objects; anything larger is cut here.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Streams a connection may give up on (timed out, or dropped while waiting for a stream)
/// before it retires. Each can bring at most one late answer that h2 counts against its
/// limit of locally reset streams (set here to [`MAX_LOCAL_RESETS`]), twice when h2 has
/// forgotten it; this keeps the count well below it.
pub const RESET_BUDGET: usize = 400;

/// h2's limit of streams it resets itself over a connection's life (its default).
const MAX_LOCAL_RESETS: usize = 1024;

/// Reset streams h2 remembers (for 30 s), so a late answer to one is ignored quietly.
const REMEMBERED_RESETS: usize = 2 * RESET_BUDGET;

/// How to reach the server and how patient to be.
#[derive(Clone)]
pub struct ConnectOptions {
    /// The service's name in the log ("APNs", "FCM").
    pub service: &'static str,
    pub host: String,
    pub port: u16,
    /// The proxy whose tunnel the connection goes through, if any.
    pub proxy: Option<Proxy>,
    pub tls: native_tls::TlsConnector,
    /// Upper bound on TCP connect (and the proxy's CONNECT), TLS and HTTP/2 handshakes
    /// together.
    pub connect_timeout: Duration,
    /// Upper bound on one request, from the moment it has a stream and its body goes
    /// out to the end of the answer. (Waiting for a stream is bounded separately.)
    pub request_timeout: Duration,
    /// PING after this long without an answer on the connection.
    pub ping_interval: Duration,
    /// A PING unanswered for this long means the connection is dead.
    pub ping_timeout: Duration,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("service", &self.service)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No TCP connection, or no tunnel through the proxy (which the error names).
    #[error(transparent)]
    Tcp(#[from] proxy::ConnectError),
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
    /// No stream was free within the wait: the request never left (not processed).
    #[error("no HTTP/2 stream free within {0:?}")]
    NoStream(Duration),
    /// The request never left: the connection closed or went away before its body went
    /// out. Sending it elsewhere costs nothing.
    #[error("{0}")]
    NotSent(String),
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
    /// The server's GOAWAY, once one arrived.
    goaway: Mutex<Option<GoAway>>,
    /// Streams given up on (timed out, or no stream in time): see [`RESET_BUDGET`].
    abandoned: AtomicUsize,
    /// Streams our requests hold: kept within the server's limit, so h2 never queues one.
    streams: AtomicUsize,
    /// A stream was freed, or the server's SETTINGS (its stream limit) were applied.
    freed: tokio::sync::Notify,
    id: u64,
    peer: String,
    service: &'static str,
}

impl Watcher for Shared {
    fn went_away(&self, frame: GoAway) {
        Shared::went_away(self, frame)
    }

    fn settings_applied(&self) {
        self.freed.notify_waiters()
    }
}

impl Shared {
    fn retire(&self, why: &str) {
        if !self.retired.is_cancelled() {
            info!(service = self.service, conn = self.id, peer = %self.peer, reason = why,
                  "connection retired");
            self.retired.cancel();
        }
    }

    fn went_away(&self, frame: GoAway) {
        let mut goaway = self.goaway.lock().unwrap();
        // A later GOAWAY never raises the last stream id (RFC 9113, 6.8).
        let last_stream_id = goaway.map_or(frame.last_stream_id, |g| {
            g.last_stream_id.min(frame.last_stream_id)
        });
        *goaway = Some(GoAway {
            last_stream_id,
            code: frame.code,
        });
        drop(goaway);
        info!(service = self.service, conn = self.id, peer = %self.peer, last_stream_id,
              code = ?h2::Reason::from(frame.code), "GOAWAY from the server");
        self.retire("GOAWAY");
    }
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
        let addr = proxy::describe(&opts.host, opts.port, opts.proxy.as_ref());
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
        let tcp: TcpStream = proxy::connect(
            &opts.host,
            opts.port,
            opts.proxy.as_ref(),
            opts.connect_timeout,
            |tcp| {
                let _ = tcp.set_nodelay(true);
                Ok(())
            },
        )
        .await?;
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
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let peer = addr.to_owned();
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            answers: AtomicU64::new(0),
            pongs: AtomicU64::new(0),
            retired: CancellationToken::new(),
            kill: shutdown.child_token(),
            goaway: Mutex::new(None),
            abandoned: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            id,
            peer: peer.clone(),
            service: opts.service,
        });
        let (send, mut conn) = h2::client::Builder::new()
            // Until the server's SETTINGS say otherwise: APNs under token auth allows one
            // stream until the first success, and refuses streams beyond it.
            .initial_max_send_streams(1)
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .max_concurrent_reset_streams(REMEMBERED_RESETS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
            .enable_push(false)
            .handshake::<_, Bytes>(FrameWatch::new(tls, shared.clone()))
            .await
            .map_err(|source| ConnectError::H2 {
                addr: addr.to_owned(),
                source,
            })?;
        let ping_pong = conn.ping_pong().expect("taken once, here");

        let service = opts.service;
        info!(service, conn = id, peer = %peer, "connected");

        let s = shared.clone();
        let p = peer.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut conn => match result {
                    Ok(()) => info!(service, conn = id, peer = %p, "connection closed"),
                    Err(e) => warn!(service, conn = id, peer = %p, error = %e, "connection failed"),
                },
                _ = s.kill.cancelled() => debug!(service, conn = id, peer = %p, "dropping the connection"),
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

    /// Answers received so far: a connection that answered anything worked.
    pub fn answers(&self) -> u64 {
        self.shared.answers.load(Ordering::Relaxed)
    }

    /// PINGs the server answered: proof of life while idle.
    pub fn pongs(&self) -> u64 {
        self.shared.pongs.load(Ordering::Relaxed)
    }

    /// The server's GOAWAY, if one came.
    pub fn goaway(&self) -> Option<GoAway> {
        *self.shared.goaway.lock().unwrap()
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
        self.shared.retire(why)
    }

    /// A stream given up on: past [`RESET_BUDGET`] of them, the connection retires.
    fn abandon(&self) {
        let n = self.shared.abandoned.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= RESET_BUDGET {
            self.retire("too many requests given up on");
        }
    }

    /// Sends one request and reads the whole answer; it waits for a stream for up to the
    /// request timeout.
    pub async fn send(
        &self,
        request: http::Request<()>,
        body: Bytes,
    ) -> Result<Answer, RequestError> {
        self.send_within(request, body, self.request_timeout).await
    }

    /// Sends one request and reads the whole answer. It waits for a stream for up to
    /// `stream_wait` (then it never left: `NoStream`); the request timeout runs from
    /// when its body goes out.
    pub async fn send_within(
        &self,
        request: http::Request<()>,
        body: Bytes,
        stream_wait: Duration,
    ) -> Result<Answer, RequestError> {
        if !self.usable() {
            return Err(RequestError::NotSent(
                "the connection was closing".to_owned(),
            ));
        }
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.shared);
        let opened = match tokio::time::timeout(stream_wait, self.open(request)).await {
            Ok(opened) => opened,
            Err(_) => {
                // Dropping the queued stream sends its HEADERS (if ever) and a reset; with
                // no END_STREAM and no body, the server cannot have acted on it.
                self.abandon();
                return Err(RequestError::NoStream(stream_wait));
            }
        };
        let (response, mut stream, _slot) = opened?;
        let id = u32::from(response.stream_id());
        stream.send_data(body, true).map_err(|e| self.not_sent(e))?;
        crate::transport::request_went_out();
        let answer = tokio::time::timeout(self.request_timeout, self.answer(response, id)).await;
        drop(stream);
        match answer {
            Ok(result) => result,
            Err(_) => {
                self.abandon();
                Err(RequestError::Timeout(self.request_timeout))
            }
        }
    }

    /// A stream with the request's HEADERS on it (no END_STREAM yet). Waits, without
    /// handing the request to h2, while the server's stream limit is reached: h2 would
    /// queue it with its body, and a queued request dropped later still goes out whole.
    async fn open(
        &self,
        request: http::Request<()>,
    ) -> Result<
        (
            h2::client::ResponseFuture,
            h2::SendStream<Bytes>,
            StreamSlot<'_>,
        ),
        RequestError,
    > {
        let shared = &self.shared;
        loop {
            let freed = shared.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.usable() {
                return Err(RequestError::NotSent(
                    "the connection was closing".to_owned(),
                ));
            }
            let max = self.send.current_max_send_streams();
            let open = shared.streams.load(Ordering::Acquire);
            if open < max
                && shared
                    .streams
                    .compare_exchange(open, open + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                break;
            }
            tokio::select! {
                _ = freed => {}
                _ = shared.retired.cancelled() => {}
            }
        }
        let slot = StreamSlot(shared);
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| self.not_sent(e))?;
        let (response, stream) = send
            .send_request(request, false)
            .map_err(|e| self.not_sent(e))?;
        Ok((response, stream, slot))
    }

    async fn answer(
        &self,
        response: h2::client::ResponseFuture,
        id: u32,
    ) -> Result<Answer, RequestError> {
        let response = response.await.map_err(|e| self.classify(e, id))?;
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
            headers: parts.headers,
            body: body.freeze(),
        })
    }

    /// A failure before the request's body went out: the server has at most its HEADERS
    /// without END_STREAM, which is no request it can act on.
    fn not_sent(&self, e: h2::Error) -> RequestError {
        if e.is_go_away() || e.is_io() || self.shared.kill.is_cancelled() {
            self.retire("connection lost");
        }
        RequestError::NotSent(format!("failed before the request was sent: {e}"))
    }

    /// A failure of stream `id` after the whole request went out.
    fn classify(&self, e: h2::Error, id: u32) -> RequestError {
        if e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            return RequestError::NotProcessed(
                "the server refused the stream (REFUSED_STREAM)".into(),
            );
        }
        if let Some(g) = self.goaway() {
            if id > g.last_stream_id {
                return RequestError::NotProcessed(format!(
                    "GOAWAY before the answer (stream {id} above the last processed, {}): {e}",
                    g.last_stream_id
                ));
            }
            if g.code != 0 {
                // At or below the last-stream-id: the server may have acted on it.
                return RequestError::Stream(format!(
                    "the server went away ({:?}) after the request was sent; it may have \
                     been processed: {e}",
                    h2::Reason::from(g.code)
                ));
            }
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

/// A stream held by a request; freed when the request is done with it.
struct StreamSlot<'a>(&'a Shared);

impl Drop for StreamSlot<'_> {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
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
mod tests;
