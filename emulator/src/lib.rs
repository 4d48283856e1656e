//! A local stand-in for the Apple Push Notification service (APNs), written from Apple's
//! documentation independently of pgpushd's client, so the two check each other: the
//! client's tests run against this emulator, and a rule either side got wrong shows up
//! as a disagreement instead of being wrong on both sides at once. It imports nothing
//! from pgpushd.
//!
//! An HTTP/2 server that validates requests as Apple documents them and answers with
//! Apple's statuses, reasons and headers. Users develop against it without Apple
//! credentials; pgpushd's tests, `pgpushd demo` and the benchmarks run against it.
//!
//! - [`Emulator::start`] binds, makes its TLS certificates and serves until
//!   [`Emulator::shutdown`] (or [`serve_until`] with a cancellation token);
//! - what it checks and answers: [`validate`] (pure), [`push_type`] (each push type's
//!   topic, payload limit and priorities), [`reason`] (Apple's reasons) and [`jwt`]
//!   (provider tokens);
//! - TLS, ALPN `h2`, client certificates: [`tls`];
//! - token auth starts connections at one stream and raises the limit after the first
//!   success, as APNs does: `stream_limit`;
//! - faults (error rate, latency, scripted answers standing or once, GOAWAY, dropped connections, stalls)
//!   can be set in the config and changed at run time;
//! - every answer can be observed: [`Emulator::subscribe`], [`Emulator::records`], a
//!   JSON-lines file, and [`Emulator::stats`];
//! - the command line (`pgpushd-emulator`, also `pgpushd emulator`): [`cli`];
//! - broadcast channels (iOS 18 Live Activities): with
//!   [`EmulatorConfig::channels_listen`] a second listener serves Apple's channel
//!   management API (create, read, delete, read all), as Apple has it on its own host
//!   and port, with the same TLS, authentication and faults; broadcasts to the channels
//!   (`POST /4/broadcasts/apps/<bundle>`) come to the push listener, and are recorded
//!   and counted as pushes are. Tests make and delete channels behind a client's back
//!   with [`Emulator::create_channel`] and [`Emulator::delete_channel`]: [`channels`].
//!
//! The retired binary protocol (gateway and feedback service, and its byte format) is
//! [`binary`]'s. Firebase Cloud Messaging's HTTP v1 API, with the OAuth token endpoint its
//! clients get access tokens from, is [`fcm`]'s; a Web Push service (RFC 8030 push, RFC
//! 8291 encryption, RFC 8292 VAPID, over HTTP/2 or HTTP/1.1) that also plays the browser,
//! making the subscriptions and decrypting what they are sent, is [`webpush`]'s. Both
//! share the TLS, faults, records and counters above.
//!
//! The library prints nothing; it logs with `tracing`.

mod accept;
mod answer;
pub mod binary;
pub mod channels;
pub mod cli;
mod connection;
mod faults;
pub mod fcm;
pub mod jwt;
pub mod push_type;
pub mod reason;
mod record;
mod request;
mod stats;
mod stream_limit;
pub mod tls;
pub mod validate;
pub mod webpush;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use openssl::ssl::SslAcceptor;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use record::Record;
pub use stats::Stats;

use answer::Answer;
use channels::ChannelStore;
use connection::Listener;
use faults::Faults;
use jwt::TokenKey;
use record::Recorder;
use stats::Counters;
use validate::{AuthMode, Policy};

/// How to run an emulator. `Default` is an open emulator on `127.0.0.1:0` (a free port).
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Tests use `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// Where to write `ca.pem` (the CA clients must trust), `ca.key`, `server.pem` and
    /// `server.key`. A CA already there (`ca.pem` + `ca.key`) is reused, so clients
    /// configured with it keep working across restarts.
    pub tls_dir: Option<PathBuf>,
    pub auth: EmulatorAuth,
    /// The bundle id served (push types add their suffixes); `None` accepts any topic.
    pub topic: Option<String>,
    /// A JSON-lines file getting one [`Record`] per request (created, or truncated).
    pub record: Option<PathBuf>,
    /// Tokens answered `410 Unregistered` (timestamp: the emulator's start).
    pub unregistered: Vec<String>,
    /// Tokens answered `400 BadDeviceToken`.
    pub bad_tokens: Vec<String>,
    /// `0.0..=1.0`: the fraction of valid requests answered 429, 500 or 503 at random.
    pub error_rate: f64,
    /// Delay before each answer (other streams are not held up).
    pub latency: Duration,
    /// Send GOAWAY on a connection after this many requests (streams already opened are
    /// still answered, then the connection closes).
    pub goaway_every: Option<u64>,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` (APNs: 1000). Under token auth a connection
    /// starts at 1 and gets this after its first success.
    pub max_streams: u32,
    /// How many of the latest records [`Emulator::records`] keeps (0: none; benchmarks
    /// set 0 so no record is built unless someone subscribes or a file is written).
    pub keep_records: usize,
    /// Also serve the broadcast channel management API here (Apple: 2195 sandbox, 2196
    /// production, on a host of its own), with the push listener's TLS, auth and faults.
    /// `None`: no channels listener (broadcasts are still served on `listen`, to
    /// channels made with [`Emulator::create_channel`]).
    pub channels_listen: Option<SocketAddr>,
    /// How many channels a bundle id may have at once; a create beyond it is answered
    /// 400 `CannotCreateChannelConfig`. Apple's: 10,000.
    pub channel_limit: usize,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_dir: None,
            auth: EmulatorAuth::None,
            topic: None,
            record: None,
            unregistered: Vec::new(),
            bad_tokens: Vec::new(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            goaway_every: None,
            max_streams: 1000,
            keep_records: 10_000,
            channels_listen: None,
            channel_limit: channels::DEFAULT_CHANNEL_LIMIT,
        }
    }
}

/// How clients must authenticate.
#[derive(Clone)]
pub enum EmulatorAuth {
    /// Anything goes (logged at start).
    None,
    /// Provider tokens signed with this key. `public_key_pem`: the P-256 public key, or
    /// the `.p8` private key itself (its public half is used).
    Token {
        public_key_pem: Vec<u8>,
        key_id: String,
        team_id: String,
    },
    /// A client certificate signed by this CA (PEM, one or more certificates), checked in
    /// the TLS handshake: a client without one, or with another CA's, cannot connect.
    ClientCertificate { ca_pem: Vec<u8> },
}

impl fmt::Debug for EmulatorAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmulatorAuth::None => f.write_str("None"),
            // The "public" key may be a .p8 private key: never print it.
            EmulatorAuth::Token {
                key_id, team_id, ..
            } => f
                .debug_struct("Token")
                .field("key_id", key_id)
                .field("team_id", team_id)
                .finish_non_exhaustive(),
            EmulatorAuth::ClientCertificate { .. } => f.write_str("ClientCertificate"),
        }
    }
}

/// Run-time switches every connection watches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Control {
    /// Bumped by `drop_connections`: connections older than the bump close abruptly.
    drops: u64,
    /// Bumped by `goaway_all`.
    goaways: u64,
    stalled: bool,
}

/// What every connection shares.
pub(crate) struct Shared {
    policy: Policy,
    token_key: Option<TokenKey>,
    acceptor: SslAcceptor,
    max_streams: u32,
    goaway_every: Option<u64>,
    faults: Faults,
    recorder: Recorder,
    counters: Counters,
    control: watch::Sender<Control>,
    channels: ChannelStore,
    channel_limit: usize,
}

/// A running emulator. Dropping it stops it too, without waiting; prefer
/// [`Emulator::shutdown`].
pub struct Emulator {
    addr: SocketAddr,
    channels_addr: Option<SocketAddr>,
    ca_pem: Vec<u8>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Emulator {
    /// Binds `config.listen` (and `config.channels_listen`), makes the certificates and
    /// starts serving.
    pub async fn start(config: EmulatorConfig) -> anyhow::Result<Emulator> {
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
        let (auth, token_key, client_ca) = match &config.auth {
            EmulatorAuth::None => (AuthMode::None, None, None),
            EmulatorAuth::Token {
                public_key_pem,
                key_id,
                team_id,
            } => {
                let key = TokenKey::from_pem(public_key_pem, key_id, team_id)?;
                (AuthMode::Token, Some(key), None)
            }
            EmulatorAuth::ClientCertificate { ca_pem } => {
                (AuthMode::Certificate, None, Some(ca_pem.as_slice()))
            }
        };
        let listens: Vec<SocketAddr> = std::iter::once(config.listen)
            .chain(config.channels_listen)
            .collect();
        let tls = tls::server_tls_on(&listens, config.tls_dir.as_deref(), client_ca)
            .context("emulator TLS")?;
        let recorder = Recorder::new(config.record.as_deref(), config.keep_records)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let channels_listener = match config.channels_listen {
            Some(at) => Some(
                TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot listen on {at} (channels)"))?,
            ),
            None => None,
        };
        let channels_addr = channels_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let shared = Arc::new(Shared {
            policy: Policy {
                bundle: config.topic.clone(),
                auth,
            },
            token_key,
            acceptor: tls.acceptor,
            max_streams: config.max_streams,
            goaway_every: config.goaway_every,
            faults: Faults::new(
                config.error_rate,
                config.latency,
                &config.unregistered,
                &config.bad_tokens,
                now_ms,
            ),
            recorder,
            counters: Counters::default(),
            control: watch::Sender::new(Control::default()),
            channels: ChannelStore::default(),
            channel_limit: config.channel_limit,
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let listeners = std::iter::once((listener, Listener::Push))
            .chain(channels_listener.map(|l| (l, Listener::Channels)));
        for (tcp_listener, kind) in listeners {
            tracker.spawn(accept::accept_loop(tcp_listener, cancel.clone(), {
                let (shared, cancel, tracker) = (shared.clone(), cancel.clone(), tracker.clone());
                move |tcp, peer, id| {
                    tracker.spawn(connection::serve(
                        shared.clone(),
                        tcp,
                        peer,
                        id,
                        kind,
                        cancel.clone(),
                    ));
                }
            }));
        }
        if let Some(channels_addr) = channels_addr {
            info!(%channels_addr, limit = config.channel_limit, "APNs channel management listening");
        }
        info!(
            %addr,
            auth = ?config.auth,
            topic = config.topic.as_deref().unwrap_or("(any)"),
            tls_dir = ?config.tls_dir,
            "APNs emulator listening"
        );
        if auth == AuthMode::None {
            warn!("APNs emulator accepts requests without authentication (no token key or client CA configured)");
        }
        Ok(Emulator {
            addr,
            channels_addr,
            ca_pem: tls.ca_pem,
            shared,
            cancel,
            tracker,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`, for an app's `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Where the channel management API listens, if it does
    /// ([`EmulatorConfig::channels_listen`]).
    pub fn channels_addr(&self) -> Option<SocketAddr> {
        self.channels_addr
    }

    /// `https://127.0.0.1:PORT` of the channel management API, if it listens.
    pub fn channels_endpoint(&self) -> Option<String> {
        self.channels_addr.map(|addr| format!("https://{addr}"))
    }

    /// The existing channels of `bundle` (id, `message-storage-policy`), oldest first.
    pub fn channels(&self, bundle: &str) -> Vec<(String, u8)> {
        self.shared.channels.list(bundle)
    }

    /// Makes a channel of `bundle` out of band (as if another client had, or one whose
    /// creation a client lost) and returns its id. Not held to the channel limit.
    ///
    /// # Panics
    /// If `policy` is not 0 ("No Message Stored") or 1 ("Most Recent Message Stored").
    pub fn create_channel(&self, bundle: &str, policy: u8) -> String {
        assert!(
            policy <= channels::POLICY_MOST_RECENT_MESSAGE_STORED,
            "message-storage-policy is 0 or 1, not {policy}"
        );
        self.shared
            .channels
            .create(bundle, policy, None)
            .expect("no limit out of band")
    }

    /// Deletes a channel of `bundle` out of band (behind a client's back): broadcasts to
    /// it are then answered `ChannelNotRegistered`. `false` if there was no such channel.
    pub fn delete_channel(&self, bundle: &str, id: &str) -> bool {
        self.shared.channels.delete(bundle, id)
    }

    /// The CA (PEM) clients must trust to connect.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// Every record from now on. Records are built only while someone listens; a
    /// subscriber that falls more than 65536 records behind loses the oldest
    /// (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.shared.recorder.subscribe()
    }

    /// The latest records (up to `keep_records`), oldest first.
    pub fn records(&self) -> Vec<Arc<Record>> {
        self.shared.recorder.history()
    }

    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// From now on answer valid requests for `token` with `status` and `reason` (any
    /// reason, Apple's or not; 410 gets a timestamp of now; 200 answers success).
    ///
    /// `token` is a device token; for a broadcast, its channel id; for a channel
    /// management call, its channel id (read, delete) or its bundle id (any call, after
    /// its channel id's script). A scripted management answer changes nothing: a create
    /// answered 503 makes no channel.
    pub fn script(&self, token: &str, status: u16, reason: &str) {
        if !(200..=599).contains(&status) {
            warn!(status, "scripted status out of range: ignored");
            return;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.shared
            .faults
            .script(token, Answer::custom(status, reason, now_ms));
    }

    /// Answer only the next valid request for `token` with `status` and `reason` (as
    /// [`Emulator::script`]), then as before: a transient error, a provider token called
    /// expired once. Called again before that request, the answers queue up, one request
    /// each. They come before an answer set with [`Emulator::script`].
    pub fn script_once(&self, token: &str, status: u16, reason: &str) {
        if !(200..=599).contains(&status) {
            warn!(status, "scripted status out of range: ignored");
            return;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.shared
            .faults
            .script_once(token, Answer::custom(status, reason, now_ms));
    }

    /// Forgets every scripted answer (standing or once).
    pub fn clear_scripts(&self) {
        self.shared.faults.clear_scripts();
    }

    /// `0.0..=1.0` (clamped): the fraction of valid requests answered 429/500/503.
    pub fn set_error_rate(&self, rate: f64) {
        self.shared.faults.set_error_rate(rate);
    }

    /// Applies to requests arriving from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.set_latency(latency);
    }

    /// Closes every open connection at once, without GOAWAY, whatever is in flight.
    pub fn drop_connections(&self) {
        self.shared.control.send_modify(|c| c.drops += 1);
    }

    /// Sends GOAWAY on every open connection; streams already opened are still answered.
    pub fn goaway_all(&self) {
        self.shared.control.send_modify(|c| c.goaways += 1);
    }

    /// `true`: stop serving established connections entirely (no answers, no PING
    /// replies, no reads), as a hung server would; `false`: resume.
    pub fn stall(&self, on: bool) {
        self.shared.control.send_modify(|c| c.stalled = on);
    }

    /// Stops accepting, sends GOAWAY, waits (up to 5 s per connection) for the streams in
    /// flight to be answered, and flushes the record file.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.recorder.finish()).await;
        info!(addr = %self.addr, "APNs emulator stopped");
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Runs an emulator until `cancel` fires, then shuts it down. The endpoint and CA are
/// logged at start.
pub async fn serve_until(config: EmulatorConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    let emulator = Emulator::start(config).await?;
    cancel.cancelled().await;
    emulator.shutdown().await;
    Ok(())
}
