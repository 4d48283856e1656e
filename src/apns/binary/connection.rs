//! One TLS connection to a binary-protocol gateway.
//!
//! A writer task frames notifications as they are submitted and writes whatever has
//! queued up in one go (many notifications in flight, never one per round trip); a reader
//! task waits for the one thing the gateway ever sends, the 6-byte error packet. Between
//! them, the connection's identifiers -> pending notifications, in write order.
//!
//! The protocol never says "accepted", so a notification's `Outcome` is decided thus:
//! - **sent** once the settle window (`binary_settle`) has passed since the gateway's TCP
//!   stack acknowledged its bytes, with no error packet on the connection; or as soon as
//!   an error packet names a notification written after it (the gateway handles them in
//!   order); or when status 10 (shutdown) names it or a later one as the last it took;
//! - **refused** with the status of the error packet that names it;
//! - **resend** when it was written after the refused one (the gateway discards those),
//!   or the connection ended before its settle window passed (it may or may not have
//!   been delivered: sending it again makes delivery at least once, as everywhere else).
//!
//! **Acknowledged.** The settle clock starts when the peer has acknowledged the bytes,
//! not when they entered the kernel's send buffer: bytes stuck there (a gateway that
//! stopped reading, a path that went dead) never reached the gateway, and a window that
//! ran out over them would call undelivered notifications sent. On Linux
//! `ioctl(TIOCOUTQ)` (`SIOCOUTQ`) says how many bytes written to the socket the peer has
//! not acknowledged. The TLS layer makes plaintext offsets useless there (record headers,
//! tags, handshake and post-handshake messages), so the offsets are counted below TLS: a
//! wrapper around the `TcpStream` counts every byte the socket took, and a notification
//! ends, at the latest, at the count read once the write carrying it was flushed through
//! TLS. It is acknowledged once `written - unacknowledged` reaches that offset (polled
//! every [`ACK_POLL`] while notifications wait; the count is read before the ioctl, so a
//! race only ever under-counts). Elsewhere, and on in-memory test streams, the window
//! starts at the flush, as before.
//!
//! **Late error packets.** An error packet may name a notification whose window already
//! passed: it and everything written after it were reported sent, but the gateway dropped
//! what followed the refused one. So the connection keeps the notifications it reported
//! sent for a while ([`HISTORY_AGE`], at most [`HISTORY_MAX`]): those written after the
//! named one are reported [`Undelivered`] (their rows go back to `pending` and are sent
//! again); the named one keeps `sent`, its refusal too late to record, and the log says
//! so. A packet naming something older than the history revives the whole history.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acknowledged::{AckProbe, Counted};
use super::frame::{self, ErrorPacket, Push, Status, ERROR_PACKET_LEN};
use crate::proxy::{self, Proxy};
use crate::transport::Undelivered;

/// Bytes framed before they are written; more queued notifications go in the next write.
const MAX_WRITE: usize = 256 * 1024;

/// While notifications wait for the peer's acknowledgement, how often to ask the kernel.
pub(crate) const ACK_POLL: Duration = Duration::from_millis(5);

/// How long notifications reported sent are remembered, for a late error packet ...
pub(crate) const HISTORY_AGE: Duration = Duration::from_secs(60);
/// ... and at most how many (16 bytes each).
pub(crate) const HISTORY_MAX: usize = 65_536;

/// TCP keepalive on gateway and feedback connections: the first probe after this much
/// silence (well under the 2-5 minutes after which NATs and firewalls forget a flow, so
/// an idle connection's mapping stays alive) ...
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ... then every this often ...
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ... and the connection is dead after this many unanswered: a vanished peer is noticed
/// within about a minute instead of never.
pub(crate) const KEEPALIVE_RETRIES: u32 = 3;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// TCP to `host:port` with keepalive on, through `via`'s CONNECT tunnel when there is a
/// proxy (keepalive is then on the socket to the proxy, the one this host can watch):
/// what both the gateway and the feedback service connect over. `timeout` bounds the
/// proxy's part.
pub(crate) async fn connect_tcp(
    host: &str,
    port: u16,
    via: Option<&Proxy>,
    timeout: Duration,
) -> Result<TcpStream, proxy::ConnectError> {
    proxy::connect(host, port, via, timeout, |tcp| {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES);
        socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive)?;
        let _ = tcp.set_nodelay(true);
        Ok(())
    })
    .await
}

/// How to reach the gateway.
#[derive(Clone)]
pub(crate) struct ConnectOptions {
    pub host: String,
    pub port: u16,
    /// The proxy whose tunnel the connection goes through, if any.
    pub proxy: Option<Proxy>,
    pub tls: native_tls::TlsConnector,
    /// Upper bound on TCP connect (and the proxy's CONNECT) and the TLS handshake
    /// together.
    pub connect_timeout: Duration,
    /// How long after its bytes were acknowledged a notification without an error packet
    /// counts as sent.
    pub settle: Duration,
    /// Where rows reported sent and then found undelivered (a late error packet) go.
    pub undelivered: mpsc::UnboundedSender<Vec<Undelivered>>,
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
    row: i64,
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
    /// Bytes the socket took (below TLS); `None` on streams that are not TCP sockets.
    written: Option<Arc<AtomicU64>>,
    undelivered: Option<mpsc::UnboundedSender<Vec<Undelivered>>>,
}

/// The pending notifications, oldest first, and those lately reported sent.
struct Inflight {
    next_identifier: u32,
    entries: VecDeque<Entry>,
    /// Reported sent, oldest first: what a late error packet may reveal undelivered.
    history: VecDeque<Settled>,
    closed: bool,
}

struct Entry {
    identifier: u32,
    row: i64,
    /// Where its bytes end in the TCP stream, at the latest (the socket's count once the
    /// write carrying it was flushed); `None` while it is being written.
    ends_at: Option<u64>,
    /// When the peer had acknowledged its bytes (without a socket: when they were
    /// flushed): its settle window starts.
    acked_at: Option<Instant>,
    reply: oneshot::Sender<Outcome>,
}

/// A notification reported sent.
struct Settled {
    identifier: u32,
    row: i64,
    at: Instant,
}

impl Inflight {
    /// Identifiers count from 1 per connection (0 is what command-0 errors carry).
    fn identifier(&mut self) -> u32 {
        let id = self.next_identifier;
        self.next_identifier = self.next_identifier.checked_add(1).unwrap_or(1);
        id
    }

    fn remember(&mut self, identifier: u32, row: i64, now: Instant) {
        self.history.push_back(Settled {
            identifier,
            row,
            at: now,
        });
        while self.history.len() > HISTORY_MAX
            || self
                .history
                .front()
                .is_some_and(|h| h.at + HISTORY_AGE < now)
        {
            self.history.pop_front();
        }
    }
}

/// How the reader saw the connection end.
enum Ending {
    Packet(ErrorPacket),
    Closed(String),
}

impl Connection {
    /// TCP (keepalive on; through the proxy's tunnel when there is one), then TLS (no
    /// ALPN: the gateway predates it), then the two tasks.
    pub(crate) async fn connect(
        opts: &ConnectOptions,
        shutdown: &CancellationToken,
    ) -> Result<Connection, String> {
        let addr = proxy::describe(&opts.host, opts.port, opts.proxy.as_ref());
        let written = Arc::new(AtomicU64::new(0));
        let connect = async {
            let tcp = connect_tcp(
                &opts.host,
                opts.port,
                opts.proxy.as_ref(),
                opts.connect_timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
            let fd = tcp.as_raw_fd();
            let counted = Counted {
                tcp,
                written: written.clone(),
            };
            tokio_native_tls::TlsConnector::from(opts.tls.clone())
                .connect(&opts.host, counted)
                .await
                .map(|tls| (tls, fd))
                .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))
        };
        let (tls, fd) = tokio::time::timeout(opts.connect_timeout, connect)
            .await
            .map_err(|_| {
                format!(
                    "connecting to {addr} timed out after {:?}",
                    opts.connect_timeout
                )
            })??;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        info!(conn = id, peer = %addr, "connected to the APNs gateway (binary protocol)");
        let probe = AckProbe {
            fd,
            written: written.clone(),
        };
        Ok(Connection::start(
            tls,
            Link {
                id,
                settle: opts.settle,
                kill: shutdown.child_token(),
                probe: Some(probe),
                undelivered: Some(opts.undelivered.clone()),
            },
        ))
    }

    /// Runs the protocol over any stream (tests use in-memory ones, without a probe).
    fn start<S>(stream: S, link: Link) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Link {
            id,
            settle,
            kill,
            probe,
            undelivered,
        } = link;
        let (reader, writer) = tokio::io::split(stream);
        let (submit, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            id,
            settle,
            inflight: Mutex::new(Inflight {
                next_identifier: 1,
                entries: VecDeque::new(),
                history: VecDeque::new(),
                closed: false,
            }),
            dead: kill,
            write_failed: CancellationToken::new(),
            write_error: Mutex::new(None),
            flushed: Notify::new(),
            productive: AtomicBool::new(false),
            end_reason: Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
            written: probe.as_ref().map(|p| p.written.clone()),
            undelivered,
        });
        tokio::spawn(write_loop(writer, rx, state.clone()));
        tokio::spawn(read_loop(reader, state.clone(), probe));
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

    /// Queues `push`, the frame of outbox row `row`; the receiver gets its outcome. `Err`
    /// gives it back when the connection no longer takes notifications.
    pub(crate) fn submit(&self, push: Push, row: i64) -> Result<oneshot::Receiver<Outcome>, Push> {
        if !self.is_alive() {
            return Err(push);
        }
        *self.state.last_used.lock().unwrap() = Instant::now();
        let (reply, outcome) = oneshot::channel();
        self.submit
            .send(Submission { push, row, reply })
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

/// What a connection's tasks are started with, besides the stream.
struct Link {
    id: u64,
    settle: Duration,
    kill: CancellationToken,
    probe: Option<AckProbe>,
    undelivered: Option<mpsc::UnboundedSender<Vec<Undelivered>>>,
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
                    row: s.row,
                    ends_at: None,
                    acked_at: None,
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
                // Every byte of this write is in the socket now: it ends at or before
                // the socket's count. Without a socket, the flush starts the window.
                let ends_at = state.written.as_ref().map(|w| w.load(Ordering::SeqCst));
                let now = Instant::now();
                let mut inflight = state.inflight.lock().unwrap();
                for e in inflight.entries.iter_mut().rev() {
                    if e.ends_at.is_some() {
                        break;
                    }
                    e.ends_at = Some(ends_at.unwrap_or(0));
                    if ends_at.is_none() {
                        e.acked_at = Some(now);
                    }
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

async fn read_loop<S: AsyncRead>(
    mut reader: ReadHalf<S>,
    state: Arc<State>,
    probe: Option<AckProbe>,
) {
    let mut packet = [0u8; ERROR_PACKET_LEN];
    let mut have = 0;
    let mut write_grace: Option<Instant> = None;
    let ending = loop {
        let next_settle = state.next_settle();
        let awaiting_ack = probe.is_some() && state.awaiting_ack();
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
            _ = tokio::time::sleep(ACK_POLL), if awaiting_ack => {
                let acked = probe.as_ref().and_then(AckProbe::acked);
                state.acknowledged(acked, Instant::now());
            }
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
            .and_then(|e| e.acked_at)
            .map(|at| at + self.settle)
    }

    /// Whether a written notification waits for the peer's acknowledgement.
    fn awaiting_ack(&self) -> bool {
        let inflight = self.inflight.lock().unwrap();
        inflight
            .entries
            .iter()
            .any(|e| e.ends_at.is_some() && e.acked_at.is_none())
    }

    /// The peer acknowledged the stream up to `acked` (`None`: the kernel cannot say,
    /// so everything written counts as acknowledged): those notifications' windows start.
    fn acknowledged(&self, acked: Option<u64>, now: Instant) {
        let mut inflight = self.inflight.lock().unwrap();
        for e in inflight.entries.iter_mut() {
            if e.acked_at.is_some() {
                continue;
            }
            match e.ends_at {
                Some(end) if acked.is_none_or(|a| end <= a) => e.acked_at = Some(now),
                _ => break,
            }
        }
    }

    /// Every notification whose settle window has passed is sent.
    fn settle(&self, now: Instant) {
        let mut inflight = self.inflight.lock().unwrap();
        while let Some(e) = inflight.entries.front() {
            match e.acked_at {
                Some(at) if at + self.settle <= now => {
                    let e = inflight.entries.pop_front().expect("front exists");
                    let _ = e.reply.send(Outcome::Sent);
                    inflight.remember(e.identifier, e.row, now);
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
        let history = std::mem::take(&mut inflight.history);
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
                if named.is_none() {
                    self.revive(&history, p);
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
                    let settled = e.acked_at.is_some_and(|at| at + self.settle <= now);
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

    /// An error packet names a notification already reported sent (or one older than
    /// the history): what was reported sent after it was discarded, not delivered.
    fn revive(&self, history: &VecDeque<Settled>, p: ErrorPacket) {
        let named = history.iter().position(|h| h.identifier == p.identifier);
        let from = match named {
            Some(k) => k + 1,
            // Older than what is remembered (or 0, "none"): all of it came after.
            None if history.front().is_some_and(|h| p.identifier < h.identifier) => 0,
            // Never issued on this connection (nothing to map it to), or nothing reported
            // sent at all.
            None => history.len(),
        };
        if p.status != Status::Shutdown {
            let row = named.map(|k| history[k].row);
            warn!(conn = self.id, status = %p.status, identifier = p.identifier, row,
                  settle = ?self.settle,
                  "an error packet names a notification already counted as sent (it came \
                   after the settle window; consider a longer binary_settle): its row stays \
                   sent, those written after it are sent again");
        }
        let revived: Vec<Undelivered> = history
            .iter()
            .skip(from)
            .map(|h| Undelivered {
                id: h.row,
                reason: format!(
                    "reported sent, then the gateway's error packet ({}) for an earlier \
                     notification showed it was discarded; sending it again",
                    p.status
                ),
            })
            .collect();
        if revived.is_empty() {
            return;
        }
        warn!(
            conn = self.id,
            rows = revived.len(),
            "notifications reported sent were discarded by the gateway: reviving their rows"
        );
        match &self.undelivered {
            Some(reports) if reports.send(revived.clone()).is_ok() => {}
            _ => {
                let rows: Vec<i64> = revived.iter().map(|u| u.id).collect();
                warn!(
                    conn = self.id,
                    ?rows,
                    "nobody takes undelivered rows: they stay sent"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
