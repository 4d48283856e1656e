//! The HTTP/2 provider API: one app's client ([`Http2App`]) with its credentials, its
//! connection pool (`crate::http2`), and its [`AppGate`] for while APNs refuses those
//! credentials or throttles the app (the app pauses and probes; its rows wait).

use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use tracing::debug;
use uuid::Uuid;

use crate::apns::channels::ChannelsClient;
use crate::apns::identity;
use crate::apns::options::Options;
use crate::apns::provider_token::JwtSigner;
use crate::channels::{ChannelAnswer, ChannelOp};
use crate::config::{AppConfig, Auth};
use crate::http2::pool::Pool;
use crate::service::{AppClient, Exchanged, LoadError, OneAnswer, Timings};
use crate::tls;
use crate::transport::{short_token, Delivery, Notification};

pub mod broadcast;
pub mod request;
pub mod response;

use request::{host_port, ApnsRequest};
use response::{Answer, Verdict};

/// The request for row `n`: a push to its device, or a broadcast to its channel.
fn build(n: &Notification, config: &AppConfig, id: Uuid) -> Result<ApnsRequest, String> {
    match &n.broadcast {
        Some(b) => broadcast::build(n, b, config, id),
        None => request::build(n, config, id),
    }
}

pub(crate) struct Http2App {
    pub(crate) config: AppConfig,
    pool: Pool,
    /// Shared with `channels`: one provider token for both hosts.
    signer: Option<Arc<JwtSigner>>,
    channels: ChannelsClient,
}

impl Http2App {
    /// Loads the credentials and sets up TLS; connects later, on the first request.
    pub(crate) fn new(
        config: &AppConfig,
        timings: &Timings,
        options: &Options,
    ) -> Result<Http2App, LoadError> {
        let app = &config.name;
        let (signer, identity) = match &config.auth {
            Auth::Token(t) => {
                let signer = JwtSigner::load(t)
                    .map_err(|e| LoadError::new(app, e))?
                    .with_intervals(options.token_refresh_after, options.token_min_interval);
                (Some(Arc::new(signer)), None)
            }
            Auth::Certificate(c) => {
                let identity =
                    identity::load_for_app(app, c).map_err(|e| LoadError::new(app, e))?;
                (None, Some(identity))
            }
            _ => return Err(LoadError::new(app, "not an APNs app")),
        };
        let tls = tls::connector(config.ca_file.as_deref(), identity, &["h2"])
            .map_err(|e| LoadError::new(app, e))?;
        let (host, port) = host_port(&config.endpoint);
        let connect = timings.connect(config, "APNs", host, port, &tls);
        Ok(Http2App {
            config: config.clone(),
            pool: timings.pool(app, config.connections, connect),
            channels: ChannelsClient::new(config, timings, &tls, signer.clone()),
            signer,
        })
    }

    /// Builds the row's request and sends it: what APNs said.
    async fn exchange_row(&self, n: &Notification) -> Exchanged {
        let apns_id = Uuid::new_v4();
        debug!(app = %self.config.name, id = n.id, apns_id = %apns_id, "apns-id");
        let request = match build(n, &self.config, apns_id) {
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
                Err(no_answer) => return no_answer,
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

    /// One request through the pool; `Err` is what it came to when there was no answer.
    async fn send(&self, request: &ApnsRequest, bearer: Option<&str>) -> Result<Answer, Exchanged> {
        let make = || request.to_http(bearer);
        self.pool
            .send(make, request.body.clone())
            .await
            .map(Answer::from)
            .map_err(|e| Exchanged::unanswered("APNs", e))
    }

    /// One push, APNs's answer as it is: for `pgpushd send`.
    async fn send_raw(&self, n: &Notification) -> anyhow::Result<OneAnswer> {
        let request = build(n, &self.config, Uuid::new_v4())
            .map_err(|reason| anyhow::anyhow!("this push would be refused: {reason}"))?;
        let bearer = match &self.signer {
            Some(signer) => Some(signer.token()?),
            None => None,
        };
        let answer: Answer = self
            .pool
            .send(|| request.to_http(bearer.as_deref()), request.body.clone())
            .await?
            .into();
        let apns_id = answer.apns_id.clone();
        Ok(OneAnswer {
            status: answer.status,
            reason: answer.reason().map(|r| r.to_string()),
            // The one we sent, unless APNs chose another.
            id: Some((
                if n.broadcast.is_some() {
                    "apns-unique-id"
                } else {
                    "apns-id"
                },
                apns_id.unwrap_or_else(|| request.apns_id.to_string()),
            )),
        })
    }
}

impl AppClient for Http2App {
    fn exchange<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Exchanged> {
        Box::pin(self.exchange_row(n))
    }

    fn send_one<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, anyhow::Result<OneAnswer>> {
        Box::pin(self.send_raw(n))
    }

    fn health(&self) -> Result<(), String> {
        self.pool.health()
    }

    fn open_connections(&self) -> usize {
        self.pool.open_connections() + self.channels.open_connections()
    }

    fn broadcasts(&self) -> bool {
        true
    }

    fn manage_channel<'a>(&'a self, op: &'a ChannelOp) -> BoxFuture<'a, ChannelAnswer> {
        Box::pin(self.channels.call(op))
    }
}
