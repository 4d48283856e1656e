//! The binary protocol's side of the emulator: a gateway as APNs ran one on port 2195
//! until 2021, and its feedback service (port 2196).
//!
//! - TLS with a required client certificate signed by the configured CA, no ALPN;
//! - notifications of commands 0, 1 and 2 read as they stream in (`gateway`), checked
//!   as Apple documents, each recorded as a [`BinaryRecord`]; the bytes themselves
//!   (reading notifications, writing error responses and feedback tuples) are
//!   [`frame`]'s;
//! - the first refused notification gets the 6-byte error response, and the connection
//!   closes: whatever the client wrote after it is discarded, as at Apple; a fault,
//!   `error_delay`, holds the response back (reading and discarding meanwhile), as a
//!   gateway slow to report a refusal: a client's settle window may pass before it;
//! - status 10 (shutdown) naming the last notification taken, to every connection, on
//!   [`BinaryEmulator::shutdown_connections`] and when the emulator stops;
//! - the feedback service (`feedback`) hands out its tuples once, then forgets them.

mod feedback;
pub mod frame;
mod gateway;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use openssl::ssl::SslAcceptor;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::accept::accept_loop;
use crate::record::{json_or_text, rfc3339, Recorder};
use crate::tls;
use frame::{FeedbackTuple, Status};

/// How to run a binary emulator.
#[derive(Debug, Clone)]
pub struct BinaryEmulatorConfig {
    /// The gateway (Apple: 2195). Tests use `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// The feedback service (Apple: 2196); `None`: none.
    pub feedback_listen: Option<SocketAddr>,
    /// As for the HTTP/2 emulator: where `ca.pem` (to trust) and the server's certificate
    /// are written, and a CA found there reused.
    pub tls_dir: Option<PathBuf>,
    /// Client certificates must be signed by this CA (PEM). Required: the binary protocol
    /// knows no other authentication.
    pub client_ca_pem: Vec<u8>,
    /// A JSON-lines file getting one [`BinaryRecord`] per notification read.
    pub record: Option<PathBuf>,
    /// Tokens (hex) refused with status 8, invalid token.
    pub invalid_tokens: Vec<String>,
    /// Tokens (hex) the feedback service reports, stamped with the emulator's start.
    pub feedback_tokens: Vec<String>,
    /// How many of the latest records [`BinaryEmulator::records`] keeps.
    pub keep_records: usize,
    /// A fault: how long after refusing a notification the error response is written.
    /// Meanwhile what the client sends is read and discarded (its TCP stack acknowledges
    /// it), as by a gateway slow to report; zero (the default): at once.
    pub error_delay: Duration,
}

impl BinaryEmulatorConfig {
    /// Loopback addresses with free ports, requiring certificates signed by `client_ca_pem`.
    pub fn new(client_ca_pem: Vec<u8>) -> BinaryEmulatorConfig {
        BinaryEmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            feedback_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            tls_dir: None,
            client_ca_pem,
            record: None,
            invalid_tokens: Vec::new(),
            feedback_tokens: Vec::new(),
            keep_records: 10_000,
            error_delay: Duration::ZERO,
        }
    }
}

/// One notification read, and what the gateway made of it. One JSON line in the record
/// file: `at` in RFC 3339, `payload` as the JSON it is (a string if it is not JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BinaryRecord {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// The connection it came on (numbered from 1 in accept order).
    pub connection: u64,
    /// 0, 1 or 2.
    pub command: u8,
    /// `None` for command 0.
    pub identifier: Option<u32>,
    /// Lower-case hex; empty when the notification had none.
    pub device_token: String,
    pub expiration: Option<u32>,
    pub priority: Option<u8>,
    #[serde(serialize_with = "json_or_text")]
    pub payload: Bytes,
    /// 0: taken; otherwise the status of the error response it got.
    pub status: u8,
}

impl BinaryRecord {
    pub fn payload_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.payload).ok()
    }
}

/// A snapshot of the binary emulator's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BinaryStats {
    /// Notifications taken.
    pub accepted: u64,
    /// Error responses sent, by status (10 included).
    pub refused: BTreeMap<u8, u64>,
    pub connections_accepted: u64,
    pub connections_open: u64,
    /// TLS handshakes that failed (no client certificate, another CA's, ...).
    pub handshakes_failed: u64,
    /// Bytes of notifications written after a refused one (or a shutdown), thrown away
    /// unread as APNs does: the client must resend those notifications.
    pub discarded_bytes: u64,
    /// Feedback connections served, and the tuples they were sent.
    pub feedback_connections: u64,
    pub feedback_tuples: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: Mutex<BTreeMap<u8, u64>>,
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    handshakes_failed: AtomicU64,
    discarded_bytes: AtomicU64,
    feedback_connections: AtomicU64,
    feedback_tuples: AtomicU64,
}

/// What the gateway's and the feedback service's connections share.
struct Shared {
    acceptor: SslAcceptor,
    /// Statuses scripted per token (32 bytes).
    scripted: Mutex<HashMap<Vec<u8>, Status>>,
    feedback: Mutex<Vec<FeedbackTuple>>,
    recorder: Recorder<BinaryRecord>,
    counters: Counters,
    /// Bumped by `shutdown_connections`.
    shutdowns: watch::Sender<u64>,
    /// See [`BinaryEmulatorConfig::error_delay`].
    error_delay: Duration,
}

impl Shared {
    /// What the gateway answers for a notification that passed the format checks.
    fn verdict(&self, token: &[u8]) -> Status {
        let scripted = self.scripted.lock().unwrap();
        scripted.get(token).copied().unwrap_or(Status::NoErrors)
    }

    fn count(&self, status: Status) {
        match status {
            Status::NoErrors => {
                self.counters.accepted.fetch_add(1, Relaxed);
            }
            refused => {
                *self
                    .counters
                    .refused
                    .lock()
                    .unwrap()
                    .entry(refused.code())
                    .or_default() += 1;
            }
        }
    }
}

/// A running binary emulator. Dropping it stops it without waiting; prefer
/// [`BinaryEmulator::shutdown`].
pub struct BinaryEmulator {
    addr: SocketAddr,
    feedback_addr: Option<SocketAddr>,
    ca_pem: Vec<u8>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl BinaryEmulator {
    pub async fn start(config: BinaryEmulatorConfig) -> anyhow::Result<BinaryEmulator> {
        let tls = tls::server_tls_with_alpn(
            config.listen,
            config.tls_dir.as_deref(),
            Some(&config.client_ca_pem),
            None,
        )
        .context("emulator TLS")?;
        let token = |hex: &String| {
            hex::decode(hex).with_context(|| format!("token {hex:?} is not hexadecimal"))
        };
        let scripted = config
            .invalid_tokens
            .iter()
            .map(|t| Ok((token(t)?, Status::InvalidToken)))
            .collect::<anyhow::Result<_>>()?;
        let started = unix_seconds(SystemTime::now());
        let feedback = config
            .feedback_tokens
            .iter()
            .map(|t| {
                Ok(FeedbackTuple {
                    time: started,
                    token: token(t)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let recorder = Recorder::new(config.record.as_deref(), config.keep_records)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let feedback_listener = match config.feedback_listen {
            Some(at) => Some(
                TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot listen on {at}"))?,
            ),
            None => None,
        };
        let feedback_addr = feedback_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let shared = Arc::new(Shared {
            acceptor: tls.acceptor,
            scripted: Mutex::new(scripted),
            feedback: Mutex::new(feedback),
            recorder,
            counters: Counters::default(),
            shutdowns: watch::Sender::new(0),
            error_delay: config.error_delay,
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(listener, cancel.clone(), {
            let (shared, cancel, tracker) = (shared.clone(), cancel.clone(), tracker.clone());
            move |tcp, peer, id| {
                tracker.spawn(gateway::serve(
                    shared.clone(),
                    tcp,
                    peer,
                    id,
                    cancel.clone(),
                ));
            }
        }));
        if let Some(l) = feedback_listener {
            tracker.spawn(accept_loop(l, cancel.clone(), {
                let (shared, tracker) = (shared.clone(), tracker.clone());
                move |tcp, peer, _| {
                    tracker.spawn(feedback::serve(shared.clone(), tcp, peer));
                }
            }));
        }
        info!(%addr, feedback = ?feedback_addr, tls_dir = ?config.tls_dir,
              "APNs binary-protocol emulator listening");
        Ok(BinaryEmulator {
            addr,
            feedback_addr,
            ca_pem: tls.ca_pem,
            shared,
            cancel,
            tracker,
        })
    }

    /// The gateway's address; `host:port` is an app's `endpoint`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The feedback service's address, if it runs.
    pub fn feedback_addr(&self) -> Option<SocketAddr> {
        self.feedback_addr
    }

    /// The CA (PEM) clients must trust.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// Every record from now on (see the HTTP/2 emulator's `subscribe`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<BinaryRecord>> {
        self.shared.recorder.subscribe()
    }

    /// The latest records, oldest first.
    pub fn records(&self) -> Vec<Arc<BinaryRecord>> {
        self.shared.recorder.history()
    }

    pub fn stats(&self) -> BinaryStats {
        let c = &self.shared.counters;
        BinaryStats {
            accepted: c.accepted.load(Relaxed),
            refused: c.refused.lock().unwrap().clone(),
            connections_accepted: c.connections_accepted.load(Relaxed),
            connections_open: c.connections_open.load(Relaxed),
            handshakes_failed: c.handshakes_failed.load(Relaxed),
            discarded_bytes: c.discarded_bytes.load(Relaxed),
            feedback_connections: c.feedback_connections.load(Relaxed),
            feedback_tuples: c.feedback_tuples.load(Relaxed),
        }
    }

    /// From now on refuse well-formed notifications for `token` (hex) with `status`
    /// (`0` takes them again).
    pub fn script(&self, token: &str, status: u8) {
        let Ok(token) = hex::decode(token) else {
            warn!(token, "scripted token is not hexadecimal: ignored");
            return;
        };
        let mut scripted = self.shared.scripted.lock().unwrap();
        match Status::from_code(status) {
            Status::NoErrors => scripted.remove(&token),
            status => scripted.insert(token, status),
        };
    }

    /// Queues a tuple for the next feedback connection.
    pub fn add_feedback(&self, token: &[u8], at: SystemTime) {
        self.shared.feedback.lock().unwrap().push(FeedbackTuple {
            time: unix_seconds(at),
            token: token.to_vec(),
        });
    }

    /// Tuples not yet handed out.
    pub fn pending_feedback(&self) -> usize {
        self.shared.feedback.lock().unwrap().len()
    }

    /// Every open gateway connection gets status 10 (shutdown) naming the last
    /// notification it took, and closes: what APNs did before maintenance.
    pub fn shutdown_connections(&self) {
        self.shared.shutdowns.send_modify(|n| *n += 1);
    }

    /// Stops accepting, sends status 10 on every connection, waits for them to close and
    /// flushes the record file.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.recorder.finish()).await;
        info!(addr = %self.addr, "APNs binary-protocol emulator stopped");
    }
}

impl Drop for BinaryEmulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn unix_seconds(at: SystemTime) -> u32 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// A record of `n` and the status it got.
fn record_of(n: &frame::Notification, connection: u64, status: Status) -> BinaryRecord {
    BinaryRecord {
        at: SystemTime::now(),
        connection,
        command: n.command,
        identifier: n.identifier,
        device_token: n.token.as_deref().map(hex::encode).unwrap_or_default(),
        expiration: n.expiration,
        priority: n.priority,
        payload: Bytes::from(n.payload.clone().unwrap_or_default()),
        status: status.code(),
    }
}
