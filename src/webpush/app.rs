//! One Web Push app's client ([`WebpushApp`]): its VAPID key and the tokens signed with
//! it, and the push services it sends to ([`super::origins`]: each its own connections
//! and its own gate). A row's exchange is prepared here (the subscription, the request,
//! the encrypted body, the token) and goes through its push service's gate, so that
//! what one service says about the app's tokens (a 401) or its rate (429s) pauses that
//! service, never the app: the app's own gate sees only what became of the row.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use tracing::debug;

use super::origins::{Origins, Tls};
use super::response::{Answer, Verdict};
use super::subscription::Subscription;
use super::vapid::{Vapid, VapidKey, VapidSigner};
use super::{encrypt, request};
use crate::config::{AppConfig, Auth};
use crate::host_list::HostList;
use crate::http2::pool::PoolError;
use crate::service::app_gate::MIN_DEFER;
use crate::service::{AppClient, Exchanged, LoadError, OneAnswer, Scope, Timings};
use crate::tls;
use crate::transport::{short_token, Delivery, MessageId, Notification};

pub(crate) struct WebpushApp {
    config: AppConfig,
    /// A row's `TTL` when it has no `expires_at`.
    ttl: Duration,
    /// The push services its subscriptions may name.
    push_services: HostList,
    signer: VapidSigner,
    origins: Origins,
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
        let tls = Tls {
            either: tls(&["h2", "http/1.1"])?,
            h2: tls(&["h2"])?,
            http1: tls(&["http/1.1"])?,
        };
        Ok(WebpushApp {
            config: config.clone(),
            ttl: auth.ttl,
            push_services: auth.push_services.clone(),
            signer: VapidSigner::new(vapid),
            origins: Origins::new(config, timings, tls),
        })
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
        if !self.push_services.matches(sub.host(), sub.port()) {
            return Err(rejected(format!(
                "the subscription's push service {} is not one of [apps.{}.webpush] \
                 push_services",
                sub.origin(),
                self.config.name
            )));
        }
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
        let origin = self.origins.get(&sub);
        let exchange = async {
            let sent = self
                .origins
                .send(&origin, &sub, &request, &authorization, body)
                .await;
            match sent {
                Ok(answer) => exchanged(read(answer)),
                Err(e) => Exchanged::Row(unanswered(&origin.name, e)),
            }
        };
        Exchanged::Row(origin.gate.attempt(&n.device_token, exchange).await)
    }

    /// One push, the service's answer as it is: for `pgpushd send`.
    async fn send_raw(&self, n: &Notification) -> anyhow::Result<OneAnswer> {
        let (sub, request, body, authorization) = match self.prepare(n) {
            Ok(prepared) => prepared,
            Err(exchanged) => anyhow::bail!("this push would not be sent: {exchanged:?}"),
        };
        let origin = self.origins.get(&sub);
        let answer = read(
            self.origins
                .send(&origin, &sub, &request, &authorization, body)
                .await?,
        );
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
        self.origins.open_connections()
    }

    fn paused_origins(&self) -> Vec<crate::transport::Pause> {
        self.origins.paused()
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

/// What the push service's verdict means: for the row, or (a refused VAPID token, its
/// throttling) for that push service's gate.
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
        // while the service accepts the app's other requests, the service's once
        // refusals come in a row (`AppGate::refused_maybe_for_row`).
        Verdict::Unauthorized { reason } => Exchanged::Refused {
            row_reason: Some(format!(
                "{reason} (the push service refuses this row's VAPID token while it \
                 accepts the app's others)"
            )),
            reason,
        },
        // For this subscription: the push service pauses only when target after
        // target is throttled.
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
