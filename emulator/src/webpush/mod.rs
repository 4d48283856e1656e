//! A local stand-in for a browser vendor's Web Push service (as Mozilla's autopush or
//! FCM's web push endpoint), written from the RFCs independently of pgpushd's client:
//! the push protocol (RFC 8030), message encryption (RFC 8291 over RFC 8188's
//! `aes128gcm`) and VAPID (RFC 8292).
//!
//! It also plays the browser: [`WebPushEmulator::subscribe`] makes a subscription (a
//! P-256 key pair, an auth secret, a push resource) and keeps its private key, so every
//! push it accepts is decrypted and its plaintext recorded. One HTTPS server (the
//! emulator's own CA; ALPN `h2` and `http/1.1`, or only one of them) serves:
//!
//! - `POST /push/<id>`: a push message, checked and answered 201 Created with a
//!   `Location`, or the status of its first problem ([`request`]'s order: the
//!   subscription, [`vapid`], [`headers`], the body's size, [`ece`]);
//! - `POST /subscribe`: a new subscription for people using the command line, answered
//!   with its `PushSubscription.toJSON()` ([`subscription`]).
//!
//! Faults (gone subscriptions, an error rate, latency, GOAWAY or connection close,
//! dropped connections, scripted answers standing or once, per subscription or for all)
//! can be set in the config and changed at run time; every answer is recorded
//! ([`WebPushRecord`]) and counted ([`Stats`]).

pub mod ece;
pub mod headers;
pub mod record;
pub mod subscription;
pub mod vapid;

mod connection;
mod request;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use openssl::ssl::SslAcceptor;
use rand::rngs::ThreadRng;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use record::WebPushRecord;
pub use request::MAX_BODY;
pub use subscription::Subscription;

use crate::faults::{FaultAnswer, Faults};
use crate::record::Recorder;
use crate::stats::{Counters, Stats};
use crate::{accept, tls, Control};
use subscription::Subscriptions;

/// The file `--subscriptions N` writes in the TLS directory: one subscription's
/// `toJSON()` per line.
pub const SUBSCRIPTIONS_FILE_NAME: &str = "subscriptions.jsonl";

/// The key scripts for every subscription are kept under (ids are hex, so it is no id).
pub(crate) const ALL: &str = "*";

/// ALPN lists (wire format), the server's preference first.
const ALPN_BOTH: &[u8] = b"\x02h2\x08http/1.1";
const ALPN_HTTP1: &[u8] = b"\x08http/1.1";
const ALPN_H2: &[u8] = b"\x02h2";

/// How to run a Web Push emulator. `Default`: on `127.0.0.1:0`, HTTP/2 and HTTP/1.1.
#[derive(Debug, Clone)]
pub struct WebPushEmulatorConfig {
    pub listen: SocketAddr,
    /// Where to write `ca.pem` (and the server's certificate and keys, as the other modes
    /// do) and, with `subscriptions`, `subscriptions.jsonl`. A CA already there is reused.
    pub tls_dir: Option<PathBuf>,
    /// Offer only ALPN `http/1.1`: an origin that speaks HTTP/1.1 only.
    pub http1_only: bool,
    /// Offer only ALPN `h2`, and refuse clients that do not offer it.
    pub http2_only: bool,
    /// Make this many subscriptions at start (not bound to an application server key);
    /// written to `TLS_DIR/subscriptions.jsonl` when there is a `tls_dir`.
    pub subscriptions: usize,
    /// Subscription ids answered 410 Gone (unsubscribed, expired).
    pub gone: Vec<String>,
    /// A JSON-lines file getting one [`WebPushRecord`] per request (created, or
    /// truncated).
    pub record: Option<PathBuf>,
    /// `0.0..=1.0`: the fraction of valid pushes answered 429, 500 or 503 at random (no
    /// `Retry-After`).
    pub error_rate: f64,
    /// Delay before each answer (other requests are not held up).
    pub latency: Duration,
    /// Go away after this many requests on a connection (HTTP/2: GOAWAY; HTTP/1.1: close
    /// after answering).
    pub goaway_every: Option<u64>,
    /// HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_streams: u32,
    /// How many of the latest records [`WebPushEmulator::records`] keeps.
    pub keep_records: usize,
}

impl Default for WebPushEmulatorConfig {
    fn default() -> Self {
        WebPushEmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_dir: None,
            http1_only: false,
            http2_only: false,
            subscriptions: 0,
            gone: Vec::new(),
            record: None,
            error_rate: 0.0,
            latency: Duration::ZERO,
            goaway_every: None,
            max_streams: 1000,
            keep_records: 10_000,
        }
    }
}

/// What a valid push is answered instead of 201, set with [`WebPushEmulator::script`]
/// and friends: any status (201 itself means accept as usual), with a `Retry-After` if
/// given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WebPushScript {
    pub status: u16,
    pub retry_after: Option<Duration>,
}

impl WebPushScript {
    pub fn status(status: u16) -> WebPushScript {
        WebPushScript {
            status,
            retry_after: None,
        }
    }

    /// With `Retry-After` (whole seconds).
    pub fn retry_after(self, after: Duration) -> WebPushScript {
        WebPushScript {
            retry_after: Some(after),
            ..self
        }
    }
}

impl FaultAnswer for WebPushScript {
    fn random_server_error(rng: &mut ThreadRng) -> WebPushScript {
        WebPushScript::status([429, 500, 503][rng.gen_range(0..3)])
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    /// `https://host:port`: VAPID's `aud`, and the base of endpoints and locations.
    origin: String,
    subscriptions: Subscriptions,
    acceptor: SslAcceptor,
    http2_only: bool,
    max_streams: u32,
    goaway_every: Option<u64>,
    faults: Faults<WebPushScript>,
    recorder: Recorder<WebPushRecord>,
    counters: Counters,
    control: watch::Sender<Control>,
}

impl Shared {
    fn subscribe(
        &self,
        application_server_key: Option<&[u8]>,
    ) -> anyhow::Result<Arc<Subscription>> {
        let subscription = Subscription::generate(&self.origin, application_server_key)?;
        Ok(self.subscriptions.add(subscription))
    }
}

/// A running Web Push emulator. Dropping it stops it too, without waiting; prefer
/// [`WebPushEmulator::shutdown`].
pub struct WebPushEmulator {
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    ca_path: Option<PathBuf>,
    made: Vec<Arc<Subscription>>,
    subscriptions_path: Option<PathBuf>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl WebPushEmulator {
    /// Binds `config.listen`, makes the certificates (and the subscriptions asked for)
    /// and starts serving.
    pub async fn start(config: WebPushEmulatorConfig) -> anyhow::Result<WebPushEmulator> {
        ensure!(
            (0.0..=1.0).contains(&config.error_rate),
            "error rate must be between 0 and 1, not {}",
            config.error_rate
        );
        ensure!(config.max_streams >= 1, "max streams must be at least 1");
        ensure!(
            config.goaway_every != Some(0),
            "goaway-every must be at least 1"
        );
        ensure!(
            !(config.http1_only && config.http2_only),
            "http1_only and http2_only exclude each other"
        );
        let alpn = match (config.http1_only, config.http2_only) {
            (true, _) => ALPN_HTTP1,
            (_, true) => ALPN_H2,
            _ => ALPN_BOTH,
        };
        let tls =
            tls::server_tls_with_alpn(config.listen, config.tls_dir.as_deref(), None, Some(alpn))
                .context("emulator TLS")?;
        let recorder = Recorder::new(config.record.as_deref(), config.keep_records)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            origin: origin(addr),
            subscriptions: Subscriptions::new(&config.gone),
            acceptor: tls.acceptor,
            http2_only: config.http2_only,
            max_streams: config.max_streams,
            goaway_every: config.goaway_every,
            faults: Faults::with_listed(
                config.error_rate,
                config.latency,
                Default::default(),
                false,
            ),
            recorder,
            counters: Counters::default(),
            control: watch::Sender::new(Control::default()),
        });
        let made = (0..config.subscriptions)
            .map(|_| shared.subscribe(None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let subscriptions_path = match &config.tls_dir {
            Some(dir) if !made.is_empty() => {
                let path = dir.join(SUBSCRIPTIONS_FILE_NAME);
                let lines: String = made.iter().map(|s| s.to_json() + "\n").collect();
                // The keys in it are public; the file is the application's to read.
                tls::write_file(&path, lines.as_bytes(), 0o644)?;
                Some(path)
            }
            _ => None,
        };
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept::accept_loop(listener, cancel.clone(), {
            let (shared, cancel, tracker) = (shared.clone(), cancel.clone(), tracker.clone());
            move |tcp, peer, id| {
                tracker.spawn(connection::serve(
                    shared.clone(),
                    tcp,
                    peer,
                    id,
                    cancel.clone(),
                ));
            }
        }));
        info!(
            %addr,
            alpn = ?String::from_utf8_lossy(alpn),
            subscriptions = made.len(),
            tls_dir = ?config.tls_dir,
            "Web Push emulator listening"
        );
        Ok(WebPushEmulator {
            addr,
            ca_pem: tls.ca_pem,
            ca_path: config.tls_dir.as_ref().map(|d| d.join("ca.pem")),
            made,
            subscriptions_path,
            shared,
            cancel,
            tracker,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`: the origin of every push resource, which VAPID tokens
    /// must name as `aud`.
    pub fn endpoint(&self) -> String {
        self.shared.origin.clone()
    }

    /// The CA (PEM) clients must trust to connect.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// `TLS_DIR/ca.pem`, when the config had a `tls_dir`.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca_path.as_deref()
    }

    /// A new subscription, as `pushManager.subscribe()` makes one; bound to
    /// `application_server_key` (65 bytes, an uncompressed P-256 public key) if given, so
    /// pushes signed with another VAPID key are answered 403. Errors on a key that is not
    /// one.
    pub fn subscribe(
        &self,
        application_server_key: Option<&[u8]>,
    ) -> anyhow::Result<Arc<Subscription>> {
        self.shared.subscribe(application_server_key)
    }

    /// The subscriptions made at start (`subscriptions` in the config).
    pub fn initial_subscriptions(&self) -> &[Arc<Subscription>] {
        &self.made
    }

    /// Where the initial subscriptions were written (`TLS_DIR/subscriptions.jsonl`).
    pub fn subscriptions_path(&self) -> Option<&Path> {
        self.subscriptions_path.as_deref()
    }

    /// The active subscription `id`.
    pub fn subscription(&self, id: &str) -> Option<Arc<Subscription>> {
        self.shared.subscriptions.get(id)
    }

    /// From now on pushes to `id` are answered 410 Gone (as after the browser
    /// unsubscribed, or the subscription expired); whether it was an active subscription.
    pub fn unsubscribe(&self, id: &str) -> bool {
        self.shared.subscriptions.unsubscribe(id)
    }

    /// Every record from now on (see [`crate::Emulator::subscribe`]).
    pub fn subscribe_records(&self) -> broadcast::Receiver<Arc<WebPushRecord>> {
        self.shared.recorder.subscribe()
    }

    /// The latest records (up to `keep_records`), oldest first.
    pub fn records(&self) -> Vec<Arc<WebPushRecord>> {
        self.shared.recorder.history()
    }

    /// Requests by status, connections, GOAWAYs (and HTTP/1.1 closes).
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// From now on answer valid pushes to subscription `id` with `answer`.
    pub fn script(&self, id: &str, answer: WebPushScript) {
        self.shared.faults.script(id, answer);
    }

    /// Answer only the next valid push to `id` with `answer`, then as before; called
    /// again before that push, the answers queue up. They come before a standing script.
    pub fn script_once(&self, id: &str, answer: WebPushScript) {
        self.shared.faults.script_once(id, answer);
    }

    /// From now on answer valid pushes to every subscription with `answer`, unless one
    /// has a script of its own.
    pub fn script_all(&self, answer: WebPushScript) {
        self.shared.faults.script(ALL, answer);
    }

    /// Answer the next valid push to any subscription without a script of its own with
    /// `answer` (queued, as [`WebPushEmulator::script_once`]).
    pub fn script_all_once(&self, answer: WebPushScript) {
        self.shared.faults.script_once(ALL, answer);
    }

    /// Forgets every scripted answer (standing or once, per subscription or for all).
    pub fn clear_scripts(&self) {
        self.shared.faults.clear_scripts();
    }

    /// `0.0..=1.0` (clamped): the fraction of valid pushes answered 429/500/503.
    pub fn set_error_rate(&self, rate: f64) {
        self.shared.faults.set_error_rate(rate);
    }

    /// Applies to requests arriving from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.set_latency(latency);
    }

    /// Closes every open connection at once, without GOAWAY.
    pub fn drop_connections(&self) {
        self.shared.control.send_modify(|c| c.drops += 1);
    }

    /// Every open connection goes away: GOAWAY on HTTP/2 (streams already opened are
    /// still answered), a close after the request in flight on HTTP/1.1.
    pub fn goaway_all(&self) {
        self.shared.control.send_modify(|c| c.goaways += 1);
    }

    /// `true`: stop serving established connections (no answers, no reads); `false`:
    /// resume.
    pub fn stall(&self, on: bool) {
        self.shared.control.send_modify(|c| c.stalled = on);
    }

    /// Stops accepting, goes away on every connection, waits (up to 5 s per connection)
    /// for the requests in flight, and flushes the record file.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.recorder.finish()).await;
        info!(addr = %self.addr, "Web Push emulator stopped");
    }
}

impl Drop for WebPushEmulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `https://HOST:PORT`: the listening address itself, or `localhost` when it is a
/// wildcard (both are in the server certificate).
fn origin(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_owned(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!("https://{host}:{}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_name_the_listening_address() {
        let o = |a: &str| origin(a.parse().unwrap());
        assert_eq!(o("127.0.0.1:8443"), "https://127.0.0.1:8443");
        assert_eq!(o("0.0.0.0:1"), "https://localhost:1");
        assert_eq!(o("[::1]:3"), "https://[::1]:3");
    }

    #[test]
    fn random_errors_are_transient_ones() {
        let mut rng = rand::thread_rng();
        let seen: std::collections::HashSet<u16> = (0..300)
            .map(|_| WebPushScript::random_server_error(&mut rng).status)
            .collect();
        assert_eq!(seen, [429, 500, 503].into());
    }

    #[test]
    fn scripts_carry_retry_after() {
        let s = WebPushScript::status(429).retry_after(Duration::from_secs(30));
        assert_eq!(s.status, 429);
        assert_eq!(s.retry_after, Some(Duration::from_secs(30)));
    }
}
