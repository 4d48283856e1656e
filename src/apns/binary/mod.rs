//! The retired APNs binary protocol, as a second transport per app
//! (`protocol = "binary"`): a TLS connection to gateway(.sandbox).push.apple.com:2195
//! authenticated by the client certificate, one command-2 frame per notification.
//!
//! - [`frame`]: the bytes (pure);
//! - [`connection`]: one connection, its identifiers -> pending notifications, and the
//!   rule by which a notification counts as sent (the protocol never says so);
//! - `pool`: an app's connections, replaced as the gateway closes them;
//! - [`feedback`]: the feedback service's poller, which reports unregistered tokens;
//! - here, `BinaryApp`: one app's client, mapping what the gateway did onto a
//!   [`Delivery`], as the HTTP/2 client does with its answers.
//!
//! Apple retired the protocol on 2021-03-31; gateways and emulators that speak it remain.

mod acknowledged;
pub mod connection;
pub mod feedback;
pub mod frame;
pub(crate) mod pool;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::debug;

use crate::apns::identity;
use crate::config::{AppConfig, Auth, Endpoint, Environment};
use crate::service::{AppClient, Exchanged, LoadError, OneAnswer, Reporter, Timings};
use crate::tls;
use crate::transport::{short_token, Delivery, Notification, Undelivered};

use connection::{ConnectOptions, Outcome};
use feedback::FeedbackPoller;
use frame::{Push, Status};
use pool::{Pool, Unavailable};

/// `Deferred` never asks to come back sooner than this (no busy loop on a dead gateway).
const MIN_DEFER: Duration = Duration::from_secs(1);

/// The gateway for an app's endpoint.
pub fn gateway(endpoint: &Endpoint) -> (&str, u16) {
    match endpoint {
        Endpoint::Apple(Environment::Production) => ("gateway.push.apple.com", 2195),
        Endpoint::Apple(Environment::Sandbox) => ("gateway.sandbox.push.apple.com", 2195),
        Endpoint::Custom { host, port } => (host.as_str(), *port),
        Endpoint::PerRow => unreachable!("only a Web Push app has no endpoint (config::apps)"),
    }
}

/// The feedback service for a `[apps.NAME] feedback_endpoint` as the config resolved it.
pub fn feedback_service(endpoint: &Endpoint) -> (&str, u16) {
    match endpoint {
        Endpoint::Apple(Environment::Production) => ("feedback.push.apple.com", 2196),
        Endpoint::Apple(Environment::Sandbox) => ("feedback.sandbox.push.apple.com", 2196),
        Endpoint::Custom { host, port } => (host.as_str(), *port),
        Endpoint::PerRow => unreachable!("only a Web Push app has no endpoint (config::apps)"),
    }
}

/// The TLS settings of a binary-protocol app: its client certificate (the only auth the
/// protocol knows), the system's roots plus `ca_file`, TLS 1.2 or later, no ALPN.
pub fn tls_connector(config: &AppConfig) -> Result<native_tls::TlsConnector, LoadError> {
    let app = &config.name;
    let Auth::Certificate(auth) = &config.auth else {
        return Err(LoadError::new(
            app,
            "the binary protocol needs certificate auth ([certificate])",
        ));
    };
    let identity = identity::load_for_app(app, auth).map_err(|e| LoadError::new(app, e))?;
    tls::connector(config.ca_file.as_deref(), Some(identity), &[])
        .map_err(|e| LoadError::new(app, e))
}

/// One binary-protocol app: its certificate, its gateway connections.
pub(crate) struct BinaryApp {
    name: String,
    pool: Pool,
    /// Upper bound on one notification, from submitting it to its outcome.
    timeout: Duration,
    max_resends: u32,
    connections: u32,
    /// The app's feedback service, when `feedback_interval` is not zero.
    feedback: Option<FeedbackPoller>,
}

impl BinaryApp {
    /// Loads the certificate and sets up TLS; connects on the first notification. Rows
    /// reported sent and later found undelivered (a late error packet) go to `undelivered`.
    pub(crate) fn new(
        config: &AppConfig,
        timings: &Timings,
        undelivered: mpsc::UnboundedSender<Vec<Undelivered>>,
    ) -> Result<BinaryApp, LoadError> {
        let tls = tls_connector(config)?;
        let (host, port) = gateway(&config.endpoint);
        let settle = config.binary.settle;
        let feedback = config.binary.feedback.as_ref().map(|f| {
            let (host, port) = feedback_service(&f.endpoint);
            FeedbackPoller {
                app: config.name.clone(),
                host: host.to_owned(),
                port,
                proxy: config.proxy.for_target(host, port).cloned(),
                tls: tls.clone(),
                interval: f.interval,
                connect_timeout: timings.connect_timeout,
            }
        });
        let pool = Pool::new(
            &config.name,
            ConnectOptions {
                host: host.to_owned(),
                port,
                proxy: config.proxy.for_target(host, port).cloned(),
                tls,
                connect_timeout: timings.connect_timeout,
                settle,
                undelivered,
            },
            config.connections,
            timings.reconnect_base,
            timings.reconnect_max,
        );
        Ok(BinaryApp {
            name: config.name.clone(),
            pool,
            timeout: config.request_timeout + settle,
            max_resends: timings.max_resends,
            connections: config.connections as u32,
            feedback,
        })
    }

    /// One attempt for one row: sent again on another connection while the gateway has
    /// not taken it (a bounded number of times).
    pub(crate) async fn deliver(&self, n: &Notification) -> Delivery {
        let push = match build(n) {
            Ok(push) => push,
            Err(reason) => {
                debug!(app = %self.name, id = n.id, token = short_token(&n.device_token),
                       reason = %reason, "row refused before sending");
                return Delivery::Rejected { reason };
            }
        };
        let delivery = self.exchange(push, n.id).await;
        debug!(app = %self.name, id = n.id, token = short_token(&n.device_token),
               outcome = ?delivery, "push attempt (binary)");
        delivery
    }

    async fn exchange(&self, push: Push, row: i64) -> Delivery {
        let tries = self.max_resends + 1;
        let mut counted = 0;
        let mut last = String::new();
        // A connection that ended without the gateway handling anything (a refused
        // certificate) does not count: its slot backs off, and once every slot does,
        // the row is deferred without an attempt. `connections` bounds those extra turns.
        for _ in 0..tries + self.connections {
            if counted == tries {
                break;
            }
            let conn = match self.pool.acquire().await {
                Ok(conn) => conn,
                Err(Unavailable { reason, after }) => {
                    return Delivery::Deferred {
                        reason: format!("the APNs gateway is unreachable: {reason}"),
                        after: after.max(MIN_DEFER),
                    }
                }
            };
            let outcome = match conn.submit(push.clone(), row) {
                Ok(outcome) => {
                    // Handed to the connection's writer: on its way to the gateway.
                    crate::transport::request_went_out();
                    outcome
                }
                Err(_) => {
                    last = "the connection closed before it was written".into();
                    continue;
                }
            };
            let outcome = match tokio::time::timeout(self.timeout, outcome).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => Outcome::Resend("the connection's task ended".into()),
                Err(_) => {
                    let why = format!("no outcome within {:?}", self.timeout);
                    conn.kill(&why);
                    return Delivery::retry(why);
                }
            };
            match outcome {
                Outcome::Sent => return Delivery::Sent { id: None },
                Outcome::Refused(status) => return refused(status),
                Outcome::Resend(why) => {
                    debug!(app = %self.name, conn = conn.id(), reason = %why,
                           "notification not taken; sending it again");
                    if conn.productive() || conn.is_alive() {
                        counted += 1;
                    }
                    last = why;
                }
            }
        }
        Delivery::retry(format!("not taken after {counted} tries; last: {last}"))
    }
}

/// The binary protocol has no credential refusals or throttling of its own (a refused
/// certificate fails the TLS handshake, which is the connection's backoff): every
/// exchange is about its row, so its app's gate stays open.
impl AppClient for BinaryApp {
    fn exchange<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Exchanged> {
        Box::pin(async move { Exchanged::Row(self.deliver(n).await) })
    }

    fn send_one<'a>(&'a self, _: &'a Notification) -> BoxFuture<'a, anyhow::Result<OneAnswer>> {
        Box::pin(async move {
            anyhow::bail!(
                "apps.{}: pgpushd send speaks HTTP/2 only; this app uses the binary protocol",
                self.name
            )
        })
    }

    fn health(&self) -> Result<(), String> {
        self.pool.health()
    }

    fn open_connections(&self) -> usize {
        self.pool.open_connections()
    }

    /// The app's feedback service, when `feedback_interval` is not zero.
    fn reporter(&self) -> Option<Reporter> {
        let poller = self.feedback.clone()?;
        Some(Box::new(move |sink, stop| Box::pin(poller.run(sink, stop))))
    }
}

/// The frame for a row, or why the row must fail without one.
pub fn build(n: &Notification) -> Result<Push, String> {
    let token = frame::parse_token(&n.device_token).map_err(|e| format!("BadDeviceToken: {e}"))?;
    match crate::transport::payload_kind(&n.payload) {
        Ok(None) => {}
        Ok(Some(kind)) => {
            return Err(format!(
                "BadPayload: the payload must be a JSON object, not {kind}"
            ))
        }
        Err(e) => return Err(format!("BadPayload: the payload is not JSON: {e}")),
    }
    // The row's text as it is: never re-serialized, so no number is rounded, and the
    // limit counts the bytes sent.
    let payload = n.payload.as_bytes().to_vec();
    if payload.len() > frame::MAX_PAYLOAD {
        return Err(format!(
            "PayloadTooLarge: the payload is {} bytes; the binary protocol takes at most {}",
            payload.len(),
            frame::MAX_PAYLOAD
        ));
    }
    // The binary protocol has no push types, but the same rule: a background push (only
    // `content-available`) may not go at 10, which is what an absent priority means.
    let unset = n
        .push_type
        .parse::<crate::apns::push_type::PushType>()
        .ok()
        .and_then(|t| t.priority_when_unset());
    let priority = match n.priority.or(unset) {
        None => None,
        Some(p @ (5 | 10)) => Some(p as u8),
        Some(p) => {
            return Err(format!(
                "BadPriority: priority {p} does not exist in the binary protocol (10 or 5)"
            ))
        }
    };
    // Before 1970 is nonsense a CHECK would catch; 0 ("try once, do not store") is the
    // closest meaning. After 2106 does not fit: as late as the field goes.
    let expiration = n.expires_at.map(|at| {
        at.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
    });
    Ok(Push {
        token,
        payload,
        expiration,
        priority,
    })
}

/// What an error packet's status means for the row it names.
fn refused(status: Status) -> Delivery {
    let reason = format!("the gateway refused the notification: {status}");
    match status {
        Status::InvalidToken => Delivery::Unregistered {
            reason,
            at: SystemTime::now(),
        },
        Status::MissingToken
        | Status::MissingTopic
        | Status::MissingPayload
        | Status::InvalidTokenSize
        | Status::InvalidTopicSize
        | Status::InvalidPayloadSize => Delivery::Rejected { reason },
        // 1 processing error, 255 unknown, 128 and anything unlisted: try again later.
        _ => Delivery::retry(reason),
    }
}

#[cfg(test)]
mod tests;
