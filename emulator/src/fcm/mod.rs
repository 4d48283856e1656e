//! A local stand-in for Firebase Cloud Messaging's HTTP v1 API and the OAuth 2.0 token
//! endpoint its clients get access tokens from, written from Google's documentation
//! independently of pgpushd's client, as the APNs mode is.
//!
//! One HTTPS server (HTTP/2, ALPN `h2`, the emulator's own CA) serves both:
//!
//! - `POST /token`: a service account's signed assertion for an access token
//!   ([`oauth`]);
//! - `POST /v1/projects/{project_id}/messages:send`: a message ([`message`]), answered
//!   `{"name": ...}` or one of FCM's errors ([`error`]).
//!
//! [`FcmEmulator::start`] binds, makes its certificates and, when asked, a service
//! account whose `token_uri` is the emulator itself ([`service_account`]); it serves
//! until [`FcmEmulator::shutdown`]. Faults (unregistered tokens, an error rate, latency,
//! GOAWAY, scripted answers standing or once, refused grants, revoked access tokens) can
//! be set in the config and changed at run time; every answer is recorded
//! ([`FcmRecord`]) and counted ([`Stats`]).

pub mod error;
pub mod message;
pub mod oauth;
pub mod record;
pub mod service_account;

mod connection;
mod request;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

pub use error::{ErrorCode, OauthError};
pub use record::{FcmEndpoint, FcmRecord};
pub use service_account::{MadeAccount, ServiceAccount, MADE_FILE_NAME};

use crate::faults::{FaultAnswer, Faults};
use crate::record::Recorder;
use crate::stats::{Counters, Stats};
use crate::{accept, tls, Control};
use oauth::AccessTokens;

/// How to run an FCM emulator. `Default`: on `127.0.0.1:0`, making a service account of
/// project `pgpushd-emulator`, tokens valid for an hour.
#[derive(Debug, Clone)]
pub struct FcmEmulatorConfig {
    pub listen: SocketAddr,
    /// Where to write `ca.pem` (and the server's certificate and keys, as the APNs mode
    /// does) and the made service account's `service-account.json`. A CA and an account
    /// of the same project already there are reused, the account's `token_uri` updated.
    pub tls_dir: Option<PathBuf>,
    /// Service accounts the emulator accepts, as JSON key files' contents.
    pub service_accounts: Vec<Vec<u8>>,
    /// Make a service account of this project, whose `token_uri` is the emulator.
    pub make_service_account: Option<String>,
    /// A JSON-lines file getting one [`FcmRecord`] per request (created, or truncated).
    pub record: Option<PathBuf>,
    /// Registration tokens answered 404 `UNREGISTERED`.
    pub unregistered: Vec<String>,
    /// `0.0..=1.0`: the fraction of valid sends answered 503 `UNAVAILABLE`, 500
    /// `INTERNAL` or 429 `QUOTA_EXCEEDED` at random.
    pub error_rate: f64,
    /// Delay before each answer (other streams are not held up).
    pub latency: Duration,
    /// Send GOAWAY on a connection after this many requests.
    pub goaway_every: Option<u64>,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_streams: u32,
    /// How long an access token is valid (`expires_in`); at least a second.
    pub token_lifetime: Duration,
    /// `Retry-After` of a 429 `QUOTA_EXCEEDED`, in whole seconds. FCM asks for at least a
    /// minute before retrying after one.
    pub retry_after: Duration,
    /// How many of the latest records [`FcmEmulator::records`] keeps.
    pub keep_records: usize,
}

impl Default for FcmEmulatorConfig {
    fn default() -> Self {
        FcmEmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_dir: None,
            service_accounts: Vec::new(),
            make_service_account: Some(DEFAULT_PROJECT.to_owned()),
            record: None,
            unregistered: Vec::new(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            goaway_every: None,
            max_streams: 1000,
            token_lifetime: Duration::from_secs(3600),
            retry_after: Duration::from_secs(60),
            keep_records: 10_000,
        }
    }
}

/// The project of the service account the emulator makes unless told otherwise.
pub const DEFAULT_PROJECT: &str = "pgpushd-emulator";

/// What a send to a token (or topic, or condition) is answered, once it passes
/// validation: set with [`FcmEmulator::script`] and [`FcmEmulator::script_once`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FcmScript {
    /// 200, `{"name": ...}`.
    Success,
    /// One of FCM's errors, with its status (and `Retry-After` for `QUOTA_EXCEEDED`).
    Error(ErrorCode),
    /// 401 `UNAUTHENTICATED` as for an expired access token, though it is valid: a
    /// client should get a new one and send again.
    AccessTokenRefused,
}

impl FaultAnswer for FcmScript {
    fn random_server_error(rng: &mut ThreadRng) -> FcmScript {
        FcmScript::Error(match rng.gen_range(0..3) {
            0 => ErrorCode::Unavailable,
            1 => ErrorCode::Internal,
            _ => ErrorCode::QuotaExceeded,
        })
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    accounts: Vec<ServiceAccount>,
    tokens: AccessTokens,
    /// Answers forced on the next token requests, one each.
    grant_refusals: Mutex<VecDeque<OauthError>>,
    acceptor: SslAcceptor,
    max_streams: u32,
    goaway_every: Option<u64>,
    retry_after: Duration,
    faults: Faults<FcmScript>,
    recorder: Recorder<FcmRecord>,
    counters: Counters,
    control: watch::Sender<Control>,
}

/// The account the emulator made, and where it wrote its key file.
struct Made {
    json: Vec<u8>,
    path: Option<PathBuf>,
    project_id: String,
}

/// A running FCM emulator. Dropping it stops it too, without waiting; prefer
/// [`FcmEmulator::shutdown`].
pub struct FcmEmulator {
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    ca_path: Option<PathBuf>,
    made: Option<Made>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl FcmEmulator {
    /// Binds `config.listen`, makes the certificates (and the service account, if asked)
    /// and starts serving.
    pub async fn start(config: FcmEmulatorConfig) -> anyhow::Result<FcmEmulator> {
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
            config.token_lifetime >= Duration::from_secs(1),
            "the token lifetime must be at least a second"
        );
        let mut accounts = config
            .service_accounts
            .iter()
            .enumerate()
            .map(|(i, json)| {
                ServiceAccount::from_json(json)
                    .with_context(|| format!("service account {}", i + 1))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        ensure!(
            !accounts.is_empty() || config.make_service_account.is_some(),
            "the FCM emulator needs a service account: give one, or have it make one"
        );
        let tls = tls::server_tls(config.listen, config.tls_dir.as_deref(), None)
            .context("emulator TLS")?;
        let recorder = Recorder::new(config.record.as_deref(), config.keep_records)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let made = match &config.make_service_account {
            None => None,
            Some(project) => {
                let (made, path) =
                    make_account(project, &token_uri(addr), config.tls_dir.as_deref())?;
                accounts.push(made.account);
                Some(Made {
                    json: made.json,
                    path,
                    project_id: project.clone(),
                })
            }
        };
        let emails: Vec<&str> = accounts.iter().map(|a| a.client_email.as_str()).collect();
        if let Some(twice) = emails
            .iter()
            .enumerate()
            .find_map(|(i, e)| emails[..i].contains(e).then_some(e))
        {
            anyhow::bail!("two service accounts have the client_email {twice}: give each once");
        }
        let unregistered: HashMap<String, FcmScript> = config
            .unregistered
            .iter()
            .map(|t| (t.clone(), FcmScript::Error(ErrorCode::Unregistered)))
            .collect();
        info!(
            %addr,
            accounts = ?emails,
            tls_dir = ?config.tls_dir,
            "FCM emulator listening"
        );
        let shared = Arc::new(Shared {
            tokens: AccessTokens::new(config.token_lifetime),
            accounts,
            grant_refusals: Mutex::new(VecDeque::new()),
            acceptor: tls.acceptor,
            max_streams: config.max_streams,
            goaway_every: config.goaway_every,
            retry_after: config.retry_after,
            faults: Faults::with_listed(config.error_rate, config.latency, unregistered, false),
            recorder,
            counters: Counters::default(),
            control: watch::Sender::new(Control::default()),
        });
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
        Ok(FcmEmulator {
            addr,
            ca_pem: tls.ca_pem,
            ca_path: config.tls_dir.as_ref().map(|d| d.join("ca.pem")),
            made,
            shared,
            cancel,
            tracker,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`: the base of `/v1/projects/{p}/messages:send`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The token endpoint, as the made account's `token_uri` names it.
    pub fn token_uri(&self) -> String {
        token_uri(self.addr)
    }

    /// The CA (PEM) clients must trust to connect.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// `TLS_DIR/ca.pem`, when the config had a `tls_dir`.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca_path.as_deref()
    }

    /// The made service account's key file (private key included), as a client reads it.
    pub fn service_account_json(&self) -> Option<&[u8]> {
        self.made.as_ref().map(|m| m.json.as_slice())
    }

    /// Where the made service account's key file was written (`TLS_DIR/service-account.json`).
    pub fn service_account_path(&self) -> Option<&Path> {
        self.made.as_ref().and_then(|m| m.path.as_deref())
    }

    /// The made service account's project.
    pub fn project_id(&self) -> Option<&str> {
        self.made.as_ref().map(|m| m.project_id.as_str())
    }

    /// Every record from now on (see [`crate::Emulator::subscribe`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FcmRecord>> {
        self.shared.recorder.subscribe()
    }

    /// The latest records (up to `keep_records`), oldest first.
    pub fn records(&self) -> Vec<Arc<FcmRecord>> {
        self.shared.recorder.history()
    }

    /// Requests by status (both endpoints), connections, GOAWAYs.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// From now on answer valid sends to `target` (a registration token, topic or
    /// condition, exactly as sent) with `answer`.
    pub fn script(&self, target: &str, answer: FcmScript) {
        self.shared.faults.script(target, answer);
    }

    /// Answer only the next valid send to `target` with `answer`, then as before; called
    /// again before that send, the answers queue up. They come before a standing script.
    pub fn script_once(&self, target: &str, answer: FcmScript) {
        self.shared.faults.script_once(target, answer);
    }

    /// Forgets every scripted answer (standing or once) and forced token refusal.
    pub fn clear_scripts(&self) {
        self.shared.faults.clear_scripts();
        self.shared
            .grant_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Answer the next token request with `refusal` whatever it holds (a revoked key, an
    /// outage of the token endpoint: any status, error and description); queued.
    pub fn refuse_next_grant(&self, refusal: OauthError) {
        self.shared
            .grant_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(refusal);
    }

    /// Every access token issued so far is refused (401) from now on.
    pub fn revoke_access_tokens(&self) {
        self.shared.tokens.revoke_all();
    }

    /// How long the access tokens issued are valid.
    pub fn token_lifetime(&self) -> Duration {
        self.shared.tokens.lifetime()
    }

    /// `0.0..=1.0` (clamped): the fraction of valid sends answered 503/500/429.
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

    /// Sends GOAWAY on every open connection; streams already opened are still answered.
    pub fn goaway_all(&self) {
        self.shared.control.send_modify(|c| c.goaways += 1);
    }

    /// `true`: stop serving established connections (no answers, no reads); `false`:
    /// resume.
    pub fn stall(&self, on: bool) {
        self.shared.control.send_modify(|c| c.stalled = on);
    }

    /// Stops accepting, sends GOAWAY, waits (up to 5 s per connection) for the streams in
    /// flight, and flushes the record file.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.recorder.finish()).await;
        info!(addr = %self.addr, "FCM emulator stopped");
    }
}

impl Drop for FcmEmulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `https://HOST:PORT/token`; the listening address itself, or `localhost` when it is a
/// wildcard (both are in the server certificate).
fn token_uri(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_owned(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!("https://{host}:{}/token", addr.port())
}

/// The account of `project`: the one in `tls_dir` if it is that project's (its
/// `token_uri` updated), else a new one; written to `tls_dir` (mode 0600) when given.
fn make_account(
    project: &str,
    token_uri: &str,
    tls_dir: Option<&Path>,
) -> anyhow::Result<(MadeAccount, Option<PathBuf>)> {
    let path = tls_dir.map(|dir| dir.join(MADE_FILE_NAME));
    let earlier = match &path {
        Some(path) if path.exists() => {
            let json =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            MadeAccount::reuse(&json, project, token_uri)
                .with_context(|| format!("cannot reuse {}", path.display()))?
        }
        _ => None,
    };
    let made = match earlier {
        Some(made) => made,
        None => MadeAccount::generate(project, token_uri)?,
    };
    if let Some(path) = &path {
        tls::write_file(path, &made.json, 0o600)?;
    }
    Ok((made, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_uris_name_the_listening_address() {
        let uri = |a: &str| token_uri(a.parse().unwrap());
        assert_eq!(uri("127.0.0.1:2198"), "https://127.0.0.1:2198/token");
        assert_eq!(uri("0.0.0.0:1"), "https://localhost:1/token");
        assert_eq!(uri("[::1]:3"), "https://[::1]:3/token");
    }

    #[test]
    fn random_errors_are_fcms_transient_ones() {
        let mut rng = rand::thread_rng();
        let seen: std::collections::HashSet<_> = (0..300)
            .map(|_| FcmScript::random_server_error(&mut rng))
            .collect();
        assert_eq!(
            seen,
            [
                ErrorCode::Unavailable,
                ErrorCode::Internal,
                ErrorCode::QuotaExceeded
            ]
            .map(FcmScript::Error)
            .into()
        );
    }
}
