//! APNs's channel management API (broadcast channels, iOS 18): one app's client,
//! [`ChannelsClient`], on its own host and port (api-manage-broadcast(.sandbox)
//! .push.apple.com, 2196 in production and 2195 in the sandbox, or the config's
//! `channels_endpoint`), with the app's credentials: the same provider tokens as its
//! pushes, or its client certificate.
//!
//! `request.rs` builds a request from a [`ChannelOp`]; `response.rs` reads the answer.
//! Both are pure. What the daemon does with channels is `crate::channels`'s.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{debug, info};
use uuid::Uuid;

use crate::apns::provider_token::JwtSigner;
use crate::channels::{ChannelAnswer, ChannelError, ChannelOp};
use crate::config::AppConfig;
use crate::http2::pool::Pool;
use crate::service::{self, Timings};
use crate::transport::Delivery;

pub mod request;
pub mod response;

use response::Step;

/// How long a channel waits while its app has nowhere to manage channels.
const UNCONFIGURED_WAIT: Duration = Duration::from_secs(5 * 60);

/// One app's client of the channel management API. It connects on its first request.
pub(crate) struct ChannelsClient {
    app: String,
    bundle: Option<String>,
    /// `None`: the config says nowhere (an `endpoint` without `channels_endpoint`).
    link: Option<(crate::config::Endpoint, Pool)>,
    signer: Option<Arc<JwtSigner>>,
}

impl ChannelsClient {
    pub(crate) fn new(
        config: &AppConfig,
        timings: &Timings,
        tls: &native_tls::TlsConnector,
        signer: Option<Arc<JwtSigner>>,
    ) -> ChannelsClient {
        let link = config.channels.as_ref().map(|endpoint| {
            let (host, port) = request::host_port(endpoint);
            let connect = timings.connect(config, "APNs channel management", host, port, tls);
            (endpoint.clone(), timings.pool(&config.name, 1, connect))
        });
        ChannelsClient {
            app: config.name.clone(),
            bundle: config.topic.clone(),
            link,
            signer,
        }
    }

    /// One call, asked again once with a fresh provider token if APNs calls the one it
    /// got stale. Never fails: what went wrong says what to do (see [`ChannelError`]).
    pub(crate) async fn call(&self, op: &ChannelOp) -> ChannelAnswer {
        let Some((endpoint, pool)) = &self.link else {
            return Err(ChannelError::Deferred {
                reason: format!(
                    "[apps.{}] sets endpoint (another host) but not channels_endpoint: where is \
                     its channel management API?",
                    self.app
                ),
                after: UNCONFIGURED_WAIT,
            });
        };
        let Some(bundle) = &self.bundle else {
            return Err(ChannelError::Rejected(format!(
                "MissingTopic: [apps.{}] sets no topic: channels belong to a bundle id",
                self.app
            )));
        };
        let request =
            request::build(op, bundle, endpoint, Uuid::new_v4()).map_err(ChannelError::Rejected)?;
        let mut bearer = match &self.signer {
            Some(signer) => match signer.token() {
                Ok(t) => Some(t),
                Err(e) => return Err(unsigned(e)),
            },
            None => None,
        };
        let mut refreshed = false;
        loop {
            let make = || request.to_http(bearer.as_deref());
            // A create is not idempotent: one that went out and got no answer is not sent
            // again on another connection (its row becomes uncertain, and is looked for).
            let sent = match op {
                ChannelOp::Create(_) => pool.send_once(make, request.body.clone()).await,
                _ => pool.send(make, request.body.clone()).await,
            };
            let answer = match sent {
                Ok(answer) => answer,
                Err(e) => return Err(unanswered(e)),
            };
            let apns_request_id = answer.header("apns-request-id").unwrap_or("none");
            let step = response::read(op, &answer, SystemTime::now());
            let logged = match &step {
                Step::Done(Ok(reply)) => format!("{reply:?}"),
                Step::Done(Err(e)) => e.to_string(),
                Step::RefreshToken => "provider token stale".into(),
            };
            match op {
                ChannelOp::Create(_) | ChannelOp::Delete(_) => {
                    info!(app = %self.app, ?op, request_id = %request.request_id,
                          apns_request_id, status = answer.status, outcome = %logged,
                          "channel management")
                }
                _ => debug!(app = %self.app, ?op, request_id = %request.request_id,
                            apns_request_id, status = answer.status, "channel management"),
            }
            match step {
                Step::Done(answer) => return answer,
                Step::RefreshToken => {
                    let fresh = match (&self.signer, &bearer) {
                        (Some(signer), Some(stale)) if !refreshed => signer.refresh(stale),
                        _ => {
                            return Err(ChannelError::Deferred {
                                reason: "ExpiredProviderToken: APNs calls a freshly signed \
                                         provider token expired; is the system clock right?"
                                    .into(),
                                after: response::CREDENTIALS_WAIT,
                            })
                        }
                    };
                    match fresh {
                        Ok(Some(token)) => {
                            bearer = Some(token);
                            refreshed = true;
                        }
                        Ok(None) => {
                            return Err(ChannelError::Deferred {
                                reason: "ExpiredProviderToken: APNs calls the provider token \
                                         expired although it is younger than 20 minutes"
                                    .into(),
                                after: response::CREDENTIALS_WAIT,
                            })
                        }
                        Err(e) => return Err(unsigned(e)),
                    }
                }
            }
        }
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.link
            .as_ref()
            .map_or(0, |(_, pool)| pool.open_connections())
    }
}

fn unsigned(e: impl std::fmt::Display) -> ChannelError {
    ChannelError::Deferred {
        reason: format!("cannot sign a provider token: {e}"),
        after: response::CREDENTIALS_WAIT,
    }
}

/// A request the pool got no answer for, as it is for a row: deferred when it never left,
/// else done or not, nobody knows.
fn unanswered(e: crate::http2::pool::PoolError) -> ChannelError {
    match service::unanswered("APNs's channel management API", e) {
        Delivery::Deferred { reason, after } => ChannelError::Deferred { reason, after },
        Delivery::Retry { reason, .. } => ChannelError::NoAnswer(reason),
        other => ChannelError::NoAnswer(format!("{other:?}")),
    }
}
