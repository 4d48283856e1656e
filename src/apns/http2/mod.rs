//! The HTTP/2 provider API: one app's client ([`Http2App`]) with its credentials, its
//! connection pool (`crate::http2`), and its [`AppGate`] for while APNs refuses those
//! credentials or throttles the app (the app pauses and probes; its rows wait).

use std::time::SystemTime;

use tracing::debug;
use uuid::Uuid;

use crate::apns::error::LoadError;
use crate::apns::identity;
use crate::apns::options::Options;
use crate::apns::provider_token::JwtSigner;
use crate::app_gate::{AppGate, Gate, MIN_DEFER};
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

pub(crate) struct Http2App {
    pub(crate) config: AppConfig,
    pool: Pool,
    signer: Option<JwtSigner>,
    pub(crate) gate: AppGate,
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
            Auth::Fcm(_) => return Err(LoadError::NotApns { app }),
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
            gate: AppGate::new(
                &app,
                "APNs",
                options.credentials_backoff_base,
                options.credentials_backoff_max,
                config.request_timeout,
            ),
        })
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.pool.open_connections()
    }

    pub(crate) fn health(&self) -> Result<(), String> {
        self.gate.health()?;
        self.pool.health()
    }

    pub(crate) async fn deliver(&self, n: &Notification) -> Delivery {
        let probe = match self.gate.gate() {
            Gate::Closed(deferred) => return deferred,
            Gate::Open => None,
            Gate::Probe(guard) => Some(guard),
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
            Exchanged::Row(d) => d,
            Exchanged::Refused { reason, by_apns } if by_apns && self.has_own_topic(n) => {
                let row_reason = format!(
                    "{reason}, for the row's own topic {:?} while APNs accepts this app's \
                     other requests: does the topic belong to the team of the key or \
                     certificate?",
                    n.topic.as_deref().unwrap_or_default()
                );
                self.gate.refused_maybe_for_row(reason, row_reason)
            }
            Exchanged::Refused { reason, .. } => self.gate.refused(reason),
            Exchanged::Throttled { reason, app: true } => self.gate.throttled(reason, None),
            Exchanged::Throttled { reason, app: false } => {
                self.gate.throttled_target(&n.device_token, reason, None)
            }
        };
        if matches!(
            delivery,
            Delivery::Sent { .. } | Delivery::Unregistered { .. }
        ) {
            self.gate.accepted(probe);
        }
        debug!(app = %self.config.name, id = n.id, token = short_token(&n.device_token),
               apns_id = %request.apns_id, outcome = ?delivery, "push attempt");
        delivery
    }

    /// A 403 is about the app's credentials, unless the row names a topic other than
    /// the app's: then it may be that topic (another team's bundle id), and while APNs
    /// takes the app's other requests the row is retried, counting its attempts, rather
    /// than pausing the whole app for it (see [`AppGate::refused_maybe_for_row`]).
    fn has_own_topic(&self, n: &Notification) -> bool {
        self.config.topic.is_some() && n.topic.is_some() && n.topic != self.config.topic
    }

    /// Sends `request` until APNs answers for the row, refreshing a stale provider token
    /// once; or what APNs said about the app.
    async fn exchange(&self, request: &ApnsRequest) -> Exchanged {
        let mut bearer = match &self.signer {
            Some(signer) => match signer.token() {
                Ok(t) => Some(t),
                Err(e) => {
                    return Exchanged::refused_here(format!("cannot sign a provider token: {e}"))
                }
            },
            None => None,
        };
        let mut refreshed = false;
        loop {
            let answer = match self.send(request, bearer.as_deref()).await {
                Ok(answer) => answer,
                Err(delivery) => return Exchanged::Row(delivery),
            };
            match response::verdict(&answer, SystemTime::now()) {
                Verdict::Row(delivery) => return Exchanged::Row(delivery),
                Verdict::Credentials(reason) => {
                    return Exchanged::Refused {
                        reason: reason.explain(answer.status),
                        by_apns: true,
                    }
                }
                Verdict::Throttled { reason, app } => return Exchanged::Throttled { reason, app },
                Verdict::RefreshToken => {
                    let stale = match (&self.signer, &bearer) {
                        (Some(signer), Some(stale)) if !refreshed => signer.refresh(stale),
                        _ => {
                            return Exchanged::refused_here(
                                "ExpiredProviderToken: APNs calls a freshly signed provider \
                                 token expired; is the system clock right?",
                            )
                        }
                    };
                    match stale {
                        Ok(Some(fresh)) => {
                            bearer = Some(fresh);
                            refreshed = true;
                        }
                        Ok(None) => {
                            return Exchanged::refused_here(
                                "ExpiredProviderToken: APNs calls the provider token expired \
                                 although it is younger than 20 minutes; is the system clock \
                                 right, or does another process sign with this key?",
                            )
                        }
                        Err(e) => {
                            return Exchanged::refused_here(format!(
                                "cannot sign a provider token: {e}"
                            ))
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

/// How an exchange ended: an answer for the row, or one about the app.
enum Exchanged {
    Row(Delivery),
    /// The credentials are refused, why (for `last_error` and the log), and whether APNs
    /// said so (rather than this side, unable to sign a token).
    Refused {
        reason: String,
        by_apns: bool,
    },
    /// APNs throttles the device token, or (`app`) the app.
    Throttled {
        reason: String,
        app: bool,
    },
}

impl Exchanged {
    /// Credentials refused on this side (no provider token could be signed, or APNs
    /// calls a fresh one expired): never about the row.
    fn refused_here(reason: impl Into<String>) -> Exchanged {
        Exchanged::Refused {
            reason: reason.into(),
            by_apns: false,
        }
    }
}
