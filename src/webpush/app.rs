//! One Web Push app's client ([`WebpushApp`]): its VAPID key and the tokens signed with
//! it, and its connections, a pool of long-lived connections per push service (an
//! origin: Mozilla's, Google's, Apple's, Microsoft's...), made when a row first needs
//! it: HTTP/2 (`crate::http2`) when the service chooses it by ALPN, else HTTP/1.1
//! keep-alive (`crate::http1`). Each origin's pool is its own, so a slow or failing push
//! service holds up only its own rows. At most [`MAX_ORIGINS`] pools are kept; one
//! unused for [`ORIGIN_IDLE`] is closed, and so is the least recently used when a new
//! origin needs room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::time::Instant;
use tracing::debug;

use super::response::{Answer, Verdict};
use super::subscription::Subscription;
use super::vapid::{Vapid, VapidKey, VapidSigner};
use super::{encrypt, request};
use crate::config::{AppConfig, Auth};
use crate::http1::{self, Http1Pool, Negotiated};
use crate::http2::pool::{Pool, PoolError};
use crate::service::app_gate::MIN_DEFER;
use crate::service::{AppClient, Exchanged, LoadError, OneAnswer, Scope, Timings};
use crate::tls;
use crate::transport::{short_token, Delivery, MessageId, Notification};

/// Push services an app keeps connections to at once.
pub const MAX_ORIGINS: usize = 64;

/// A push service no row has needed for this long has its connections closed.
pub const ORIGIN_IDLE: Duration = Duration::from_secs(10 * 60);

pub(crate) struct WebpushApp {
    config: AppConfig,
    /// A row's `TTL` when it has no `expires_at`.
    ttl: Duration,
    signer: VapidSigner,
    /// TLS offering both protocols (the first connection to an origin), or one.
    tls_either: native_tls::TlsConnector,
    tls_h2: native_tls::TlsConnector,
    tls_http1: native_tls::TlsConnector,
    timings: Timings,
    origins: Mutex<HashMap<String, Origin>>,
}

struct Origin {
    /// Set by the first connection: which protocol the push service speaks.
    link: Arc<tokio::sync::OnceCell<Link>>,
    used: Instant,
}

/// An origin's connections, by the protocol it chose.
enum Link {
    Http2(Pool),
    Http1(Box<Http1Pool>),
}

impl Link {
    async fn send(
        &self,
        request: &request::WebPushRequest,
        authorization: &str,
        body: Bytes,
    ) -> Result<crate::http2::Answer, PoolError> {
        match self {
            Link::Http2(pool) => pool.send(|| request.to_http(authorization), body).await,
            Link::Http1(pool) => pool.send(request.to_http(authorization), body).await,
        }
    }

    fn open_connections(&self) -> usize {
        match self {
            Link::Http2(pool) => pool.open_connections(),
            Link::Http1(pool) => pool.open_connections(),
        }
    }
}

impl WebpushApp {
    /// Loads the VAPID key and sets up TLS; connects to a push service when a row first
    /// goes there.
    pub(crate) fn new(config: &AppConfig, timings: &Timings) -> Result<WebpushApp, LoadError> {
        let app = &config.name;
        let Auth::Webpush(auth) = &config.auth else {
            return Err(LoadError::new(app, "not a Web Push app"));
        };
        let key = VapidKey::load(&auth.key_file)
            .map_err(|e| LoadError::at(app, ".webpush.key_file", e))?;
        let vapid = Vapid::new(key, &auth.subject)
            .map_err(|e| LoadError::at(app, ".webpush.subject", e))?;
        let tls = |alpn: &[&str]| {
            tls::connector(config.ca_file.as_deref(), None, alpn)
                .map_err(|e| LoadError::new(app, e))
        };
        Ok(WebpushApp {
            config: config.clone(),
            ttl: auth.ttl,
            signer: VapidSigner::new(vapid),
            tls_either: tls(&["h2", "http/1.1"])?,
            tls_h2: tls(&["h2"])?,
            tls_http1: tls(&["http/1.1"])?,
            timings: timings.clone(),
            origins: Mutex::new(HashMap::new()),
        })
    }

    /// `sub`'s push service (room made for it if need be): its link once made.
    fn origin(&self, sub: &Subscription) -> Arc<tokio::sync::OnceCell<Link>> {
        let now = Instant::now();
        let mut origins = self.origins.lock().unwrap();
        if let Some(origin) = origins.get_mut(sub.origin()) {
            origin.used = now;
            return origin.link.clone();
        }
        // Dropping a link closes its connections once the requests on them finish.
        origins.retain(|_, o| now.duration_since(o.used) < ORIGIN_IDLE);
        if origins.len() >= MAX_ORIGINS {
            let oldest = origins
                .iter()
                .min_by_key(|(_, o)| o.used)
                .map(|(k, _)| k.clone());
            origins.remove(&oldest.unwrap_or_default());
        }
        let link = Arc::new(tokio::sync::OnceCell::new());
        origins.insert(
            sub.origin().to_owned(),
            Origin {
                link: link.clone(),
                used: now,
            },
        );
        link
    }

    /// The first connection to `sub`'s push service, offering both protocols: HTTP/2
    /// when it chooses it (that connection is dropped, the pool makes its own), else
    /// HTTP/1.1 keep-alive, starting with this connection.
    async fn link(&self, sub: &Subscription) -> Result<Link, PoolError> {
        let opts = |tls| {
            self.timings.connect(
                &self.config,
                "the push service",
                sub.host(),
                sub.port(),
                tls,
            )
        };
        let (stream, negotiated) =
            http1::connect_tls(&opts(&self.tls_either))
                .await
                .map_err(|e| PoolError::Unavailable {
                    reason: e.to_string(),
                    retry_after: self.timings.reconnect_base,
                })?;
        let name = format!("{} ({})", self.config.name, sub.origin());
        Ok(match negotiated {
            Negotiated::Http2 => {
                drop(stream);
                let pool = self
                    .timings
                    .pool(&name, self.config.connections, opts(&self.tls_h2));
                Link::Http2(pool)
            }
            Negotiated::Http1 => Link::Http1(Box::new(
                Http1Pool::new(
                    opts(&self.tls_http1),
                    self.config.connections,
                    self.timings.stream_wait,
                    self.timings.reconnect_base,
                    Some(stream),
                )
                .await,
            )),
        })
    }

    /// Sends the request to `sub`'s push service.
    async fn send(
        &self,
        sub: &Subscription,
        request: &request::WebPushRequest,
        authorization: &str,
        body: Bytes,
    ) -> Result<crate::http2::Answer, PoolError> {
        let origin = self.origin(sub);
        let link = origin.get_or_try_init(|| self.link(sub)).await?;
        link.send(request, authorization, body).await
    }

    /// Everything before sending: the subscription, the request, the encrypted body and
    /// the VAPID authorization; or what becomes of the row without a request.
    fn prepare(
        &self,
        n: &Notification,
    ) -> Result<(Subscription, request::WebPushRequest, Bytes, String), Exchanged> {
        let rejected = |reason: String| Exchanged::Row(Delivery::Rejected { reason });
        let now = SystemTime::now();
        let sub = Subscription::parse(&n.device_token).map_err(rejected)?;
        let request = request::build(n, &sub, self.ttl, now).map_err(rejected)?;
        let body = encrypt::encrypt(n.payload.as_bytes(), &sub).map_err(rejected)?;
        let authorization = self
            .signer
            .authorization(&request.origin, now)
            .map_err(|e| Exchanged::refused(format!("cannot sign a VAPID token: {e}")))?;
        Ok((sub, request, Bytes::from(body), authorization))
    }

    /// Builds the row's request and sends it: what the push service said.
    async fn exchange_row(&self, n: &Notification) -> Exchanged {
        let (sub, request, body, authorization) = match self.prepare(n) {
            Ok(prepared) => prepared,
            Err(exchanged) => {
                debug!(app = %self.config.name, id = n.id, token = short_token(&n.device_token),
                       outcome = ?exchanged, "row refused before sending");
                return exchanged;
            }
        };
        match self.send(&sub, &request, &authorization, body).await {
            Ok(answer) => exchanged(read(answer)),
            Err(e) => Exchanged::Row(unanswered(sub.origin(), e)),
        }
    }

    /// One push, the service's answer as it is: for `pgpushd send`.
    async fn send_raw(&self, n: &Notification) -> anyhow::Result<OneAnswer> {
        let (sub, request, body, authorization) = match self.prepare(n) {
            Ok(prepared) => prepared,
            Err(exchanged) => anyhow::bail!("this push would not be sent: {exchanged:?}"),
        };
        let answer = read(self.send(&sub, &request, &authorization, body).await?);
        // The verdict's reason names the status, which the answer's line shows first.
        let status = format!("HTTP {}: ", answer.status);
        let reason = answer
            .verdict()
            .reason()
            .map(|r| r.strip_prefix(&status).map(str::to_owned).unwrap_or(r));
        Ok(OneAnswer {
            status: answer.status,
            id: answer.location.clone().map(|l| ("location", l)),
            reason,
        })
    }
}

impl AppClient for WebpushApp {
    fn exchange<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Exchanged> {
        Box::pin(self.exchange_row(n))
    }

    fn send_one<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, anyhow::Result<OneAnswer>> {
        Box::pin(self.send_raw(n))
    }

    /// Always well: one push service down is its rows' trouble, not the app's (its
    /// rows retry, and fail after `max_attempts`).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    fn open_connections(&self) -> usize {
        let origins = self.origins.lock().unwrap();
        origins
            .values()
            .filter_map(|o| o.link.get())
            .map(Link::open_connections)
            .sum()
    }
}

/// The connection's answer as the pure rules read it.
fn read(answer: crate::http2::Answer) -> Answer {
    Answer::from_http(
        answer.status,
        &answer.headers,
        answer.body,
        SystemTime::now(),
    )
}

/// What the push service's verdict means: for the row, or (a refused VAPID token) maybe
/// for the app.
fn exchanged(answer: Answer) -> Exchanged {
    match answer.verdict() {
        Verdict::Sent { location } => Exchanged::Row(Delivery::Sent {
            id: location.map(MessageId::Webpush),
        }),
        Verdict::Unregistered(gone) => Exchanged::Row(Delivery::Unregistered {
            reason: gone.to_string(),
            at: SystemTime::now(),
        }),
        Verdict::Rejected(refusal) => Exchanged::Row(Delivery::Rejected {
            reason: refusal.to_string(),
        }),
        // The app's key or subject, or this push service's rules for them: the row's
        // while other push services accept the app's tokens, the app's once refusals
        // come in a row (`AppGate::refused_maybe_for_row`).
        Verdict::Unauthorized { reason } => Exchanged::Refused {
            row_reason: Some(format!(
                "{reason} (this push service refuses the app's VAPID token while others \
                 accept it)"
            )),
            reason,
        },
        // One push service's, for this subscription: the app pauses only when target
        // after target is throttled.
        Verdict::Throttled { reason, after } => Exchanged::Throttled {
            reason,
            after,
            scope: Scope::Target,
        },
        Verdict::Retry { reason, after } => Exchanged::Row(Delivery::Retry { reason, after }),
    }
}

/// What a request that got no answer means for its row. Unlike APNs's and FCM's one
/// endpoint, a push service is the row's (its subscription names it): one that cannot
/// be reached costs the row an attempt, so a subscription to a host gone for good fails
/// after `max_attempts` instead of waiting for ever. A request that never left for want
/// of a free stream is still no attempt.
fn unanswered(origin: &str, error: PoolError) -> Delivery {
    match error {
        PoolError::Unavailable {
            reason,
            retry_after,
        } => Delivery::Retry {
            reason: format!("the push service {origin} is unreachable: {reason}"),
            after: Some(retry_after.max(MIN_DEFER)),
        },
        e => crate::service::unanswered(&format!("the push service {origin}"), e),
    }
}
