//! One TLS connection to a binary-protocol gateway.
//!
//! A writer task frames notifications as they are submitted and writes whatever has
//! queued up in one go (many notifications in flight, never one per round trip); a reader
//! task waits for the one thing the gateway ever sends, the 6-byte error packet. Between
//! them, the connection's identifiers -> pending notifications, in write order.
//!
//! The protocol never says "accepted", so a notification's `Outcome` is decided thus:
//! - **sent** once the settle window (`binary_settle`) has passed since it was written
//!   and flushed with no error packet on the connection; or as soon as an error packet names a
//!   notification written after it (the gateway handles them in order); or when status 10
//!   (shutdown) names it or a later one as the last it took;
//! - **refused** with the status of the error packet that names it;
//! - **resend** when it was written after the refused one (the gateway discards those),
//!   or the connection ended before its settle window passed (it may or may not have
//!   been delivered: sending it again makes delivery at least once, as everywhere else).
//!
//! An error packet that arrives after the settle window of the notification it names
//! comes too late: that notification was already counted as sent. This is logged, and
//! everything written after it is still resent. A longer settle window makes that less
//! likely and every notification slower to count as sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::frame::{self, ErrorPacket, Push, Status, ERROR_PACKET_LEN};

/// Bytes framed before they are written; more queued notifications go in the next write.
const MAX_WRITE: usize = 256 * 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How to reach the gateway.
#[derive(Clone)]
pub(crate) struct ConnectOptions {
    pub host: String,
    pub port: u16,
    pub tls: native_tls::TlsConnector,
    /// Upper bound on TCP connect and the TLS handshake together.
    pub connect_timeout: Duration,
    /// How long after it was written a notification without an error packet counts as sent.
    pub settle: Duration,
}

/// What became of one submitted notification on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Sent,
    /// The error packet named it with this status.
    Refused(Status),
    /// Not known to be taken: send it again on another connection.
    Resend(String),
}

/// A live connection's handle. Its tasks end when the connection does, or at `shutdown`.
pub(crate) struct Connection {
    id: u64,
    submit: mpsc::UnboundedSender<Submission>,
    state: Arc<State>,
}

struct Submission {
    push: Push,
    reply: oneshot::Sender<Outcome>,
}

struct State {
    id: u64,
    settle: Duration,
    inflight: Mutex<Inflight>,
    /// Fired when the connection takes no more notifications.
    dead: CancellationToken,
    /// The writer could not write; the reader gives an error packet a moment to arrive.
    write_failed: CancellationToken,
    write_error: Mutex<Option<String>>,
    /// Woken when notifications were flushed (the reader's next settle deadline moves).
    flushed: Notify,
    /// The gateway handled a notification (settled, or named by an error packet): proof
    /// that it reads frames, as opposed to turning the certificate away.
    productive: AtomicBool,
    end_reason: Mutex<Option<String>>,
    /// When a notification was last submitted.
    last_used: Mutex<Instant>,
}

/// The pending notifications, oldest first.
struct Inflight {
    next_identifier: u32,
    entries: VecDeque<Entry>,
    closed: bool,
}

struct Entry {
    identifier: u32,
    /// When the write carrying it was flushed; `None` while it is being written.
    flushed_at: Option<Instant>,
    reply: oneshot::Sender<Outcome>,
}

impl Inflight {
    /// Identifiers count from 1 per connection (0 is what command-0 errors carry).
    fn identifier(&mut self) -> u32 {
        let id = self.next_identifier;
        self.next_identifier = self.next_identifier.checked_add(1).unwrap_or(1);
        id
    }
}

/// How the reader saw the connection end.
enum Ending {
    Packet(ErrorPacket),
    Closed(String),
}

impl Connection {
    /// TCP, then TLS (no ALPN: the gateway predates it), then the two tasks.
    pub(crate) async fn connect(
        opts: &ConnectOptions,
        shutdown: &CancellationToken,
    ) -> Result<Connection, String> {
        let addr = format!("{}:{}", opts.host, opts.port);
        let connect = async {
            let tcp = TcpStream::connect((opts.host.as_str(), opts.port))
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            tokio_native_tls::TlsConnector::from(opts.tls.clone())
                .connect(&opts.host, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))
        };
        let tls = tokio::time::timeout(opts.connect_timeout, connect)
            .await
            .map_err(|_| {
                format!(
                    "connecting to {addr} timed out after {:?}",
                    opts.connect_timeout
                )
            })??;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        info!(conn = id, peer = %addr, "connected to the APNs gateway (binary protocol)");
        Ok(Connection::start(
            tls,
            id,
            opts.settle,
            shutdown.child_token(),
        ))
    }

    /// Runs the protocol over any stream (tests use in-memory ones).
    fn start<S>(stream: S, id: u64, settle: Duration, kill: CancellationToken) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let (submit, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            id,
            settle,
            inflight: Mutex::new(Inflight {
                next_identifier: 1,
                entries: VecDeque::new(),
                closed: false,
            }),
            dead: kill,
            write_failed: CancellationToken::new(),
            write_error: Mutex::new(None),
            flushed: Notify::new(),
            productive: AtomicBool::new(false),
            end_reason: Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
        });
        tokio::spawn(write_loop(writer, rx, state.clone()));
        tokio::spawn(read_loop(reader, state.clone()));
        Connection { id, submit, state }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Whether it still takes notifications.
    pub(crate) fn is_alive(&self) -> bool {
        !self.state.dead.is_cancelled()
    }

    /// Whether the gateway ever handled a notification on it.
    pub(crate) fn productive(&self) -> bool {
        self.state.productive.load(Ordering::Relaxed)
    }

    /// Why it ended, once it has.
    pub(crate) fn end_reason(&self) -> Option<String> {
        self.state.end_reason.lock().unwrap().clone()
    }

    /// How long since a notification was last submitted.
    pub(crate) fn idle_for(&self) -> Duration {
        self.state.last_used.lock().unwrap().elapsed()
    }

    /// Queues `push`; the receiver gets its outcome. `Err` gives it back when the
    /// connection no longer takes notifications.
    pub(crate) fn submit(&self, push: Push) -> Result<oneshot::Receiver<Outcome>, Push> {
        if !self.is_alive() {
            return Err(push);
        }
        *self.state.last_used.lock().unwrap() = Instant::now();
        let (reply, outcome) = oneshot::channel();
        self.submit
            .send(Submission { push, reply })
            .map_err(|e| e.0.push)?;
        Ok(outcome)
    }

    /// Ends the connection now; what is pending on it is resent elsewhere.
    pub(crate) fn kill(&self, why: &str) {
        if self.is_alive() {
            info!(
                conn = self.id,
                reason = why,
                "dropping the APNs gateway connection"
            );
            *self.state.end_reason.lock().unwrap() = Some(why.to_owned());
            self.state.dead.cancel();
        }
    }
}

async fn write_loop<S: AsyncWrite>(
    mut writer: WriteHalf<S>,
    mut rx: mpsc::UnboundedReceiver<Submission>,
    state: Arc<State>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let first = tokio::select! {
            s = rx.recv() => s,
            _ = state.dead.cancelled() => None,
        };
        let Some(first) = first else { break };
        buf.clear();
        {
            let mut inflight = state.inflight.lock().unwrap();
            if inflight.closed {
                let _ = first.reply.send(resend_closed());
                break;
            }
            let mut next = Some(first);
            while let Some(s) = next {
                let identifier = inflight.identifier();
                frame::encode_frame(&s.push, identifier, &mut buf);
                inflight.entries.push_back(Entry {
                    identifier,
                    flushed_at: None,
                    reply: s.reply,
                });
                next = if buf.len() < MAX_WRITE {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
        }
        let written = tokio::select! {
            w = async {
                writer.write_all(&buf).await?;
                writer.flush().await
            } => w,
            _ = state.dead.cancelled() => break,
        };
        match written {
            Ok(()) => {
                let now = Instant::now();
                let mut inflight = state.inflight.lock().unwrap();
                for e in inflight.entries.iter_mut().rev() {
                    if e.flushed_at.is_some() {
                        break;
                    }
                    e.flushed_at = Some(now);
                }
                drop(inflight);
                state.flushed.notify_one();
            }
            Err(e) => {
                debug!(conn = state.id, error = %e, "write failed");
                *state.write_error.lock().unwrap() = Some(e.to_string());
                state.write_failed.cancel();
                break;
            }
        }
    }
    // Nothing queued here is lost: what raced the end is handed back to be resent.
    rx.close();
    while let Ok(s) = rx.try_recv() {
        let _ = s.reply.send(resend_closed());
    }
}

fn resend_closed() -> Outcome {
    Outcome::Resend("the connection closed before it was written".into())
}

async fn read_loop<S: AsyncRead>(mut reader: ReadHalf<S>, state: Arc<State>) {
    let mut packet = [0u8; ERROR_PACKET_LEN];
    let mut have = 0;
    let mut write_grace: Option<Instant> = None;
    let ending = loop {
        let next_settle = state.next_settle();
        let flushed = state.flushed.notified();
        tokio::select! {
            biased;
            read = reader.read(&mut packet[have..]) => match read {
                Ok(0) => break Ending::Closed("the gateway closed the connection".into()),
                Ok(n) => {
                    have += n;
                    if have == ERROR_PACKET_LEN {
                        break match ErrorPacket::decode(&packet) {
                            Ok(p) => Ending::Packet(p),
                            Err(e) => Ending::Closed(format!("the gateway sent garbage: {e}")),
                        };
                    }
                }
                Err(e) => break Ending::Closed(format!("reading from the gateway failed: {e}")),
            },
            _ = state.dead.cancelled() => {
                let why = state.end_reason.lock().unwrap().clone();
                break Ending::Closed(why.unwrap_or_else(|| "shutting down".into()));
            }
            _ = sleep_until(next_settle), if next_settle.is_some() => state.settle(Instant::now()),
            _ = flushed => {}
            _ = state.write_failed.cancelled(), if write_grace.is_none() => {
                // The gateway may have refused something and closed: its error packet
                // may still be on its way.
                write_grace = Some(Instant::now() + state.settle);
            }
            _ = sleep_until(write_grace), if write_grace.is_some() => {
                let error = state.write_error.lock().unwrap().clone().unwrap_or_default();
                break Ending::Closed(format!("writing to the gateway failed: {error}"));
            }
        }
    };
    state.end(ending);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl State {
    /// When the oldest pending notification's settle window ends.
    fn next_settle(&self) -> Option<Instant> {
        let inflight = self.inflight.lock().unwrap();
        inflight
            .entries
            .front()
            .and_then(|e| e.flushed_at)
            .map(|at| at + self.settle)
    }

    /// Every notification whose settle window has passed is sent.
    fn settle(&self, now: Instant) {
        let mut inflight = self.inflight.lock().unwrap();
        while let Some(e) = inflight.entries.front() {
            match e.flushed_at {
                Some(at) if at + self.settle <= now => {
                    let e = inflight.entries.pop_front().expect("front exists");
                    let _ = e.reply.send(Outcome::Sent);
                    self.productive.store(true, Ordering::Relaxed);
                }
                _ => break,
            }
        }
    }

    /// Decides every pending notification and closes: see the module's rule.
    fn end(&self, ending: Ending) {
        let now = Instant::now();
        let mut inflight = self.inflight.lock().unwrap();
        inflight.closed = true;
        let entries = std::mem::take(&mut inflight.entries);
        drop(inflight);
        let reason = match &ending {
            Ending::Packet(p) => format!(
                "error packet: {} for notification {}",
                p.status, p.identifier
            ),
            Ending::Closed(why) => why.clone(),
        };
        self.end_reason
            .lock()
            .unwrap()
            .get_or_insert(reason.clone());
        self.dead.cancel();
        let pending = entries.len();
        match ending {
            Ending::Packet(p) => {
                self.productive.store(true, Ordering::Relaxed);
                let named = entries.iter().position(|e| e.identifier == p.identifier);
                if named.is_none() && p.status != Status::Shutdown {
                    warn!(conn = self.id, status = %p.status, identifier = p.identifier,
                          settle = ?self.settle,
                          "an error packet names a notification already counted as sent \
                           (it came after the settle window; consider a longer binary_settle)");
                }
                let why_resend = match p.status {
                    Status::Shutdown => "the gateway shut the connection down before taking it",
                    _ => "written after a notification the gateway refused",
                };
                for (i, e) in entries.into_iter().enumerate() {
                    let outcome = match named {
                        Some(n) if i < n => Outcome::Sent,
                        Some(n) if i == n && p.status == Status::Shutdown => Outcome::Sent,
                        Some(n) if i == n => Outcome::Refused(p.status),
                        _ => Outcome::Resend(why_resend.into()),
                    };
                    let _ = e.reply.send(outcome);
                }
                info!(conn = self.id, status = %p.status, identifier = p.identifier, pending,
                      "the APNs gateway sent an error packet and closes the connection");
            }
            Ending::Closed(why) => {
                for e in entries {
                    let settled = e.flushed_at.is_some_and(|at| at + self.settle <= now);
                    let outcome = match settled {
                        true => Outcome::Sent,
                        false => Outcome::Resend(why.clone()),
                    };
                    let _ = e.reply.send(outcome);
                }
                info!(conn = self.id, reason = %why, pending, "APNs gateway connection closed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
        let (client, server) = tokio::io::duplex(1 << 20);
        let conn = Connection::start(client, 1, SETTLE, CancellationToken::new());
        (conn, server)
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
        let outcome = conn.submit(push(1)).unwrap();
        assert_eq!(read_frames(&mut server, 1).await, [1]);
        assert_eq!(outcome.await.unwrap(), Outcome::Sent);
        assert!(started.elapsed() >= SETTLE);
        assert!(conn.productive() && conn.is_alive());
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_packet_settles_before_refuses_it_and_resends_after() {
        let (conn, mut server) = pipe();
        let outcomes: Vec<_> = (1..=5).map(|i| conn.submit(push(i)).unwrap()).collect();
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
            conn.submit(push(9)).is_err(),
            "a dead connection takes nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_names_the_last_one_taken() {
        let (conn, mut server) = pipe();
        let outcomes: Vec<_> = (1..=3).map(|i| conn.submit(push(i)).unwrap()).collect();
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
        let early = conn.submit(push(1)).unwrap();
        read_frames(&mut server, 1).await;
        assert_eq!(early.await.unwrap(), Outcome::Sent);
        let late = conn.submit(push(2)).unwrap();
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
        let first = conn.submit(push(1)).unwrap();
        read_frames(&mut server, 1).await;
        assert_eq!(first.await.unwrap(), Outcome::Sent);
        let second = conn.submit(push(2)).unwrap();
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
        let outcomes: Vec<_> = (0..200).map(|i| conn.submit(push(i)).unwrap()).collect();
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
        let outcome = conn.submit(push(1)).unwrap();
        read_frames(&mut server, 1).await;
        conn.kill("stalled");
        assert_eq!(outcome.await.unwrap(), Outcome::Resend("stalled".into()));
        assert!(!conn.productive());
    }
}
