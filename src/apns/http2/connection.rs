//! One long-lived HTTP/2 connection to APNs.
//!
//! TCP, then TLS with ALPN `h2` (system roots plus the app's CA file, verification always
//! on), then h2. The h2 `Connection` future runs in its own task; a second task PINGs when
//! the connection is idle and drops it when a PING goes unanswered (a half-open TCP
//! connection would otherwise swallow requests until each one timed out).
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
//! ([`FrameWatch`]): the connection retires at once (its successor opens while its streams
//! drain), and its last-stream-id says which streams the server may have processed.
//!
//! A timed-out stream is reset (RST_STREAM CANCEL). h2 remembers a bounded number of
//! reset streams, and counts an answer arriving for a forgotten one against its limit of
//! locally reset streams (`max_local_error_reset_streams`, 1024 over the connection's
//! life), past which it kills the connection with every stream on it. So a connection
//! retires gracefully after [`RESET_BUDGET`] streams it gave up on, well before that.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::response::Answer;

/// Bodies are small JSON objects; anything larger is cut here.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

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
    pub host: String,
    pub port: u16,
    pub tls: native_tls::TlsConnector,
    /// Upper bound on TCP connect, TLS and HTTP/2 handshakes together.
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
}

/// What the server's GOAWAY said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoAway {
    pub last_stream_id: u32,
    pub code: u32,
}

impl Shared {
    fn retire(&self, why: &str) {
        if !self.retired.is_cancelled() {
            info!(conn = self.id, peer = %self.peer, reason = why, "APNs connection retired");
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
        info!(conn = self.id, peer = %self.peer, last_stream_id, code = ?h2::Reason::from(frame.code),
              "GOAWAY from APNs");
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
            apns_id: parts
                .headers
                .get(super::request::APNS_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
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

/// The connection's bytes, watched as they pass (h2 keeps these to itself): the server's
/// GOAWAY and its last-stream-id as it is read, and our SETTINGS ACK as it is written, by
/// which time h2 has applied the server's SETTINGS (a new stream limit). Only frame
/// headers are parsed: 9 bytes each, and the first 8 bytes of a GOAWAY's payload.
struct FrameWatch<S> {
    io: S,
    shared: Arc<Shared>,
    read: Frames,
    written: Frames,
}

const SETTINGS_FRAME: u8 = 0x4;
const GOAWAY_FRAME: u8 = 0x7;

/// Frame boundaries in one direction of the connection.
struct Frames {
    /// Bytes to pass over before the first frame (the client's preface).
    skip: usize,
    head: [u8; 9],
    /// Bytes of `head` read so far.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame is a GOAWAY: the start of its payload.
    goaway: Option<Vec<u8>>,
}

enum Seen {
    GoAway(GoAway),
    SettingsAck,
}

impl Frames {
    fn new(skip: usize) -> Frames {
        Frames {
            skip,
            head: [0; 9],
            have: 0,
            left: 0,
            goaway: None,
        }
    }

    fn pass(&mut self, mut data: &[u8], mut seen: impl FnMut(Seen)) {
        let skip = self.skip.min(data.len());
        self.skip -= skip;
        data = &data[skip..];
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                if let Some(start) = &mut self.goaway {
                    let want = (8 - start.len()).min(n);
                    start.extend_from_slice(&data[..want]);
                    if start.len() == 8 {
                        let last = u32::from_be_bytes([start[0], start[1], start[2], start[3]]);
                        let code = u32::from_be_bytes([start[4], start[5], start[6], start[7]]);
                        self.goaway = None;
                        seen(Seen::GoAway(GoAway {
                            last_stream_id: last & 0x7fff_ffff,
                            code,
                        }));
                    }
                }
                self.left -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                self.have = 0;
                let [l0, l1, l2, kind, flags, ..] = self.head;
                self.left = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                self.goaway = (kind == GOAWAY_FRAME && self.left >= 8).then(Vec::new);
                if kind == SETTINGS_FRAME && flags & 1 == 1 {
                    seen(Seen::SettingsAck);
                }
            }
        }
    }
}

impl<S> FrameWatch<S> {
    fn new(io: S, shared: Arc<Shared>) -> FrameWatch<S> {
        FrameWatch {
            io,
            shared,
            read: Frames::new(0),
            // The client's connection preface.
            written: Frames::new(24),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            let shared = &this.shared;
            this.read.pass(&buf.filled()[before..], |seen| {
                if let Seen::GoAway(g) = seen {
                    shared.went_away(g)
                }
            });
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            let this = &mut *self;
            let shared = &this.shared;
            this.written.pass(&buf[..n], |seen| {
                if let Seen::SettingsAck = seen {
                    shared.freed.notify_waiters()
                }
            });
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
    /// running, after it gave up on [`RESET_BUDGET`] streams.
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
                (0..WAVE)
                    .map(|i| conn.send(request(opts.port, &format!("{:x}", sent + i)), body())),
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
}
