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
use crate::app_gate::AppGate;
use crate::config::{AppConfig, Auth};
use crate::http2::connection::ConnectOptions;
use crate::http2::pool::{Pool, PoolOptions};
use crate::service::{self, Exchanged};
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
        let apns_id = Uuid::new_v4();
        let delivery = self
            .gate
            .attempt(&n.device_token, self.exchange_row(n, apns_id))
            .await;
        debug!(app = %self.config.name, id = n.id, token = short_token(&n.device_token),
               apns_id = %apns_id, outcome = ?delivery, "push attempt");
        delivery
    }

    /// Builds the row's request and sends it: what APNs said.
    async fn exchange_row(&self, n: &Notification, apns_id: Uuid) -> Exchanged {
        let request = match request::build(n, &self.config, apns_id) {
            Ok(r) => r,
            Err(reason) => {
                debug!(app = %self.config.name, id = n.id, token = short_token(&n.device_token),
                       reason = %reason, "row refused before sending");
                return Exchanged::Row(Delivery::Rejected { reason });
            }
        };
        self.exchange(&request, self.own_topic(n)).await
    }

    /// A 403 is about the app's credentials, unless the row names a topic other than
    /// the app's: then it may be that topic (another team's bundle id), and while APNs
    /// takes the app's other requests the row is retried, counting its attempts, rather
    /// than pausing the whole app for it (see [`AppGate::refused_maybe_for_row`]).
    fn own_topic<'n>(&self, n: &'n Notification) -> Option<&'n str> {
        let own = self.config.topic.is_some() && n.topic != self.config.topic;
        n.topic.as_deref().filter(|_| own)
    }

    /// Sends `request` until APNs answers for the row, refreshing a stale provider token
    /// once; or what APNs said about the app. A refusal may be about the row's
    /// `own_topic`, when it has one.
    async fn exchange(&self, request: &ApnsRequest, own_topic: Option<&str>) -> Exchanged {
        let mut bearer = match &self.signer {
            Some(signer) => match signer.token() {
                Ok(t) => Some(t),
                Err(e) => return Exchanged::refused(format!("cannot sign a provider token: {e}")),
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
                    let reason = reason.explain(answer.status);
                    return Exchanged::Refused {
                        row_reason: own_topic.map(|topic| {
                            format!(
                                "{reason}, for the row's own topic {topic:?} while APNs \
                                 accepts this app's other requests: does the topic belong \
                                 to the team of the key or certificate?"
                            )
                        }),
                        reason,
                    };
                }
                Verdict::Throttled { reason, scope } => {
                    return Exchanged::Throttled {
                        reason,
                        after: None,
                        scope,
                    }
                }
                Verdict::RefreshToken => {
                    let stale = match (&self.signer, &bearer) {
                        (Some(signer), Some(stale)) if !refreshed => signer.refresh(stale),
                        _ => {
                            return Exchanged::refused(
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
                            return Exchanged::refused(
                                "ExpiredProviderToken: APNs calls the provider token expired \
                                 although it is younger than 20 minutes; is the system clock \
                                 right, or does another process sign with this key?",
                            )
                        }
                        Err(e) => {
                            return Exchanged::refused(format!("cannot sign a provider token: {e}"))
                        }
                    }
                }
            }
        }
    }

    /// One request through the pool; `Err` is the delivery when there was no answer.
    async fn send(&self, request: &ApnsRequest, bearer: Option<&str>) -> Result<Answer, Delivery> {
        let make = || request.to_http(bearer);
        self.pool
            .send(make, request.body.clone())
            .await
            .map(Answer::from)
            .map_err(|e| service::unanswered("APNs", e))
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
