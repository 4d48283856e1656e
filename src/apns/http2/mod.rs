//! The HTTP/2 provider API: one app's client ([`Http2App`]) with its credentials, its
//! connection pool, and what it does when APNs refuses those credentials.
//!
//! A refused credential is the app's problem, not the row's: every row would get the
//! same answer. So the app backs off (capped exponential), answers every notification
//! with `Deferred` without making a request while it waits, then lets one request through
//! as a probe. A success clears it. The log says so once per transition.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{debug, error, info};
use uuid::Uuid;

use crate::apns::error::LoadError;
use crate::apns::identity;
use crate::apns::options::Options;
use crate::apns::provider_token::JwtSigner;
use crate::backoff::backoff;
use crate::config::{AppConfig, Auth};
use crate::http2::connection::ConnectOptions;
use crate::http2::pool::{Pool, PoolError, PoolOptions};
use crate::tls;
use crate::transport::{short_token, Delivery, Notification};

pub mod request;
pub mod response;
mod send_one;

pub use send_one::{send_one, OneAnswer};

use request::{host_port, ApnsRequest};
use response::{Answer, Verdict};

/// `Deferred` never asks to come back sooner than this (no busy loop on a dead app).
const MIN_DEFER: Duration = Duration::from_secs(1);

pub(crate) struct Http2App {
    pub(crate) config: AppConfig,
    pool: Pool,
    signer: Option<JwtSigner>,
    refused: Mutex<Refused>,
    options: Options,
}

/// The app's standing with APNs.
#[derive(Default)]
struct Refused {
    /// Why APNs refused the credentials, while it does.
    reason: Option<String>,
    /// Refusals in a row: the backoff grows with them.
    failures: u32,
    until: Option<Instant>,
    /// A request is out testing whether the credentials work again.
    probing: bool,
}

/// What the credential state allows for the next request.
enum Gate {
    Open,
    Probe,
    Closed { reason: String, after: Duration },
}

impl Http2App {
    /// Loads the credentials and sets up TLS; connects later, on the first request.
    pub(crate) fn new(config: &AppConfig, options: &Options) -> Result<Http2App, LoadError> {
        let app = config.name.clone();
        let (signer, identity) = match &config.auth {
            Auth::Token(t) => {
                let signer = JwtSigner::load(t)
                    .map_err(|source| LoadError::Key {
                        app: app.clone(),
                        source,
                    })?
                    .with_intervals(options.token_refresh_after, options.token_min_interval);
                (Some(signer), None)
            }
            Auth::Certificate(c) => {
                let identity =
                    identity::load_for_app(&app, c).map_err(|source| LoadError::Identity {
                        app: app.clone(),
                        source,
                    })?;
                (None, Some(identity))
            }
        };
        let tls =
            tls::connector(config.ca_file.as_deref(), identity, &["h2"]).map_err(|message| {
                LoadError::Tls {
                    app: app.clone(),
                    message,
                }
            })?;
        let (host, port) = host_port(&config.endpoint);
        let pool = Pool::new(
            &app,
            PoolOptions {
                connect: ConnectOptions {
                    service: "APNs",
                    host: host.to_owned(),
                    port,
                    proxy: config.proxy.for_target(host, port).cloned(),
                    tls,
                    connect_timeout: options.connect_timeout,
                    request_timeout: config.request_timeout,
                    ping_interval: options.ping_interval,
                    ping_timeout: options.ping_timeout,
                },
                connections: config.connections,
                reconnect_base: options.reconnect_base,
                reconnect_max: options.reconnect_max,
                max_resends: options.max_resends,
                stream_wait: options.stream_wait,
            },
        );
        Ok(Http2App {
            config: config.clone(),
            pool,
            signer,
            refused: Mutex::new(Refused::default()),
            options: options.clone(),
        })
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.pool.open_connections()
    }

    pub(crate) fn health(&self) -> Result<(), String> {
        if let Some(reason) = &self.refused.lock().unwrap().reason {
            return Err(format!("APNs refuses the credentials: {reason}"));
        }
        self.pool.health()
    }

    pub(crate) async fn deliver(&self, n: &Notification) -> Delivery {
        let probe = match self.gate() {
            Gate::Closed { reason, after } => return Delivery::Deferred { reason, after },
            Gate::Open => None,
            Gate::Probe => Some(ProbeGuard(self)),
        };
        let request = match request::build(n, &self.config, Uuid::new_v4()) {
            Ok(r) => r,
            Err(reason) => {
                debug!(app = %self.config.name, id = n.id, token = short_token(&n.device_token),
                       reason = %reason, "row refused before sending");
                return Delivery::Rejected { reason };
            }
        };
        let delivery = match self.exchange(&request).await {
            Ok(d) => d,
            Err(Refusal(reason)) => self.refused(reason),
        };
        match &delivery {
            Delivery::Sent { .. } | Delivery::Unregistered { .. } => self.accepted(),
            _ => {}
        }
        drop(probe);
        debug!(app = %self.config.name, id = n.id, token = short_token(&n.device_token),
               apns_id = %request.apns_id, outcome = ?delivery, "push attempt");
        delivery
    }

    /// Sends `request` until APNs answers for the row, refreshing a stale provider token
    /// once; `Err` when APNs refuses the app's credentials.
    async fn exchange(&self, request: &ApnsRequest) -> Result<Delivery, Refusal> {
        let mut bearer = match &self.signer {
            Some(signer) => match signer.token() {
                Ok(t) => Some(t),
                Err(e) => return Err(Refusal(format!("cannot sign a provider token: {e}"))),
            },
            None => None,
        };
        let mut refreshed = false;
        loop {
            let answer = match self.send(request, bearer.as_deref()).await {
                Ok(answer) => answer,
                Err(delivery) => return Ok(delivery),
            };
            match response::verdict(&answer, SystemTime::now()) {
                Verdict::Row(delivery) => return Ok(delivery),
                Verdict::Credentials(reason) => return Err(Refusal(reason.explain(answer.status))),
                Verdict::RefreshToken => {
                    let stale = match (&self.signer, &bearer) {
                        (Some(signer), Some(stale)) if !refreshed => signer.refresh(stale),
                        _ => {
                            return Err(Refusal(
                                "ExpiredProviderToken: APNs calls a freshly signed provider \
                                 token expired; is the system clock right?"
                                    .into(),
                            ))
                        }
                    };
                    match stale {
                        Ok(Some(fresh)) => {
                            bearer = Some(fresh);
                            refreshed = true;
                        }
                        Ok(None) => {
                            return Err(Refusal(
                                "ExpiredProviderToken: APNs calls the provider token expired \
                                 although it is younger than 20 minutes; is the system clock \
                                 right, or does another process sign with this key?"
                                    .into(),
                            ))
                        }
                        Err(e) => {
                            return Err(Refusal(format!("cannot sign a provider token: {e}")))
                        }
                    }
                }
            }
        }
    }

    /// One request through the pool; `Err` is the delivery when there was no answer.
    async fn send(&self, request: &ApnsRequest, bearer: Option<&str>) -> Result<Answer, Delivery> {
        let make = || request.to_http(bearer);
        match self.pool.send(make, request.body.clone()).await {
            Ok(answer) => Ok(answer.into()),
            Err(PoolError::Unavailable {
                reason,
                retry_after,
            }) => Err(Delivery::Deferred {
                reason: format!("APNs is unreachable: {reason}"),
                after: retry_after.max(MIN_DEFER),
            }),
            // It never left: no attempt, and the row comes back soon.
            Err(PoolError::Busy(wait)) => Err(Delivery::Deferred {
                reason: format!("APNs connections are busy: no HTTP/2 stream free within {wait:?}"),
                after: MIN_DEFER,
            }),
            Err(e) => Err(Delivery::retry(e.to_string())),
        }
    }

    fn gate(&self) -> Gate {
        let mut r = self.refused.lock().unwrap();
        let Some(reason) = &r.reason else {
            return Gate::Open;
        };
        let now = Instant::now();
        match r.until {
            Some(until) if until > now => Gate::Closed {
                reason: reason.clone(),
                after: (until - now).max(MIN_DEFER),
            },
            // While the probe is out, defer for as long as it may take to answer:
            // deferring by a second would rewrite the app's whole backlog every second.
            _ if r.probing => Gate::Closed {
                reason: reason.clone(),
                after: self.config.request_timeout.max(MIN_DEFER),
            },
            _ => {
                r.probing = true;
                Gate::Probe
            }
        }
    }

    fn refused(&self, reason: String) -> Delivery {
        let mut r = self.refused.lock().unwrap();
        let now = Instant::now();
        // Requests already in flight when the first refusal came do not grow the backoff.
        if let Some(until) = r.until.filter(|u| *u > now) {
            return Delivery::Deferred {
                reason,
                after: (until - now).max(MIN_DEFER),
            };
        }
        let wait = backoff(
            r.failures,
            self.options.credentials_backoff_base,
            self.options.credentials_backoff_max,
        );
        r.failures = r.failures.saturating_add(1);
        r.until = Some(now + wait);
        if r.reason.as_deref() != Some(reason.as_str()) {
            error!(app = %self.config.name, reason = %reason, retry_in = ?wait,
                   "APNs refuses this app's credentials; its rows stay pending");
        } else {
            info!(app = %self.config.name, reason = %reason, retry_in = ?wait,
                  "APNs still refuses this app's credentials");
        }
        r.reason = Some(reason.clone());
        Delivery::Deferred {
            reason,
            after: wait.max(MIN_DEFER),
        }
    }

    fn accepted(&self) {
        let mut r = self.refused.lock().unwrap();
        if r.reason.take().is_some() {
            info!(app = %self.config.name, "APNs accepts this app's credentials again");
        }
        *r = Refused::default();
    }

    /// One push, the raw answer: for `pgpushd send`.
    pub(crate) async fn send_one(&self, n: &Notification) -> anyhow::Result<(Uuid, Answer)> {
        let request = request::build(n, &self.config, Uuid::new_v4())
            .map_err(|reason| anyhow::anyhow!("this push would be refused: {reason}"))?;
        let bearer = match &self.signer {
            Some(signer) => Some(signer.token()?),
            None => None,
        };
        let answer = self
            .pool
            .send(|| request.to_http(bearer.as_deref()), request.body.clone())
            .await?;
        Ok((request.apns_id, answer.into()))
    }
}

/// Why APNs refuses the credentials, for `last_error` and the log.
struct Refusal(String);

/// Releases the probe slot however the probing request ends (even when dropped).
struct ProbeGuard<'a>(&'a Http2App);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.refused.lock().unwrap().probing = false;
    }
}
