//! One FCM app's client ([`FcmApp`]): its service account and access tokens, and its
//! pool of long-lived HTTP/2 connections to FCM (`crate::http2`). What Google says
//! about the account goes to the app's gate (`crate::service`) as an [`Exchanged`].

use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use http::Uri;
use tracing::debug;

use super::access_token::TokenError;
use super::options::Options;
use super::request::{self, FcmRequest};
use super::response::{self, Verdict};
use super::service_account::ServiceAccount;
use super::token_source::{AccessTokens, NoToken};
use crate::config::{AppConfig, Auth, Endpoint};
use crate::http2::pool::Pool;
use crate::http2::Answer;
use crate::secret::Secret;
use crate::service::app_gate::MIN_DEFER;
use crate::service::{AppClient, Exchanged, LoadError, OneAnswer, Timings};
use crate::tls;
use crate::transport::{short_token, Delivery, MessageId, Notification};

pub(crate) struct FcmApp {
    pub(crate) config: AppConfig,
    /// The project it sends as.
    project: String,
    /// `host[:port]` of FCM's endpoint, for the request's URL.
    authority: String,
    pool: Pool,
    tokens: Arc<AccessTokens>,
}

impl FcmApp {
    /// Loads the service account and sets up TLS; connects later, on the first request.
    pub(crate) fn new(
        config: &AppConfig,
        timings: &Timings,
        options: &Options,
    ) -> Result<FcmApp, LoadError> {
        let app = &config.name;
        let (Auth::Fcm(auth), Endpoint::Custom { host, port }) = (&config.auth, &config.endpoint)
        else {
            return Err(LoadError::new(app, "not an FCM app"));
        };
        let account = ServiceAccount::load(&auth.service_account_file)
            .map_err(|message| LoadError::at(app, ".fcm.service_account_file", message))?;
        let project = match &auth.project_id {
            Some(p) if *p != account.project_id => {
                return Err(LoadError::at(
                    app,
                    ".fcm.project_id",
                    format!(
                        "{p:?}, but {} is a key of project {:?}; use that project's key, or \
                         drop project_id to send as the key's project",
                        auth.service_account_file.display(),
                        account.project_id
                    ),
                ))
            }
            Some(p) => p.clone(),
            None => account.project_id.clone(),
        };
        let tls = tls::connector(config.ca_file.as_deref(), None, &["h2"])
            .map_err(|e| LoadError::new(app, e))?;
        let token_uri = account.token_uri.clone();
        let bad_uri = |message: &str| {
            LoadError::at(
                app,
                ".fcm.service_account_file",
                format!("token_uri {token_uri:?}: {message}"),
            )
        };
        let uri: Uri = token_uri.parse().map_err(|_| bad_uri("not a URL"))?;
        let token_host = uri
            .host()
            .ok_or_else(|| bad_uri("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let token_port = uri.port_u16().unwrap_or(443);
        let tokens = AccessTokens::new(
            app,
            account,
            timings.connect(config, "the token endpoint", &token_host, token_port, &tls),
            uri,
            options.token_retry_base,
            options.token_retry_max,
        );
        let connect = timings.connect(config, "FCM", host, *port, &tls);
        let authority = match (host.contains(':'), *port) {
            (true, p) => format!("[{host}]:{p}"),
            (false, 443) => host.clone(),
            (false, p) => format!("{host}:{p}"),
        };
        Ok(FcmApp {
            config: config.clone(),
            project,
            authority,
            pool: timings.pool(app, config.connections, connect),
            tokens: Arc::new(tokens),
        })
    }

    /// Builds the row's request and sends it: what FCM (or its token endpoint) said.
    async fn exchange_row(&self, n: &Notification) -> Exchanged {
        match self.request(n) {
            Ok(request) => self.exchange(&request).await,
            Err(reason) => {
                debug!(app = %self.config.name, id = n.id, token = short_token(&n.device_token),
                       reason = %reason, "row refused before sending");
                Exchanged::Row(Delivery::Rejected { reason })
            }
        }
    }

    /// The row's request (pure): what FCM would refuse is refused here.
    pub(crate) fn request(&self, n: &Notification) -> Result<FcmRequest, String> {
        request::build(
            n,
            &self.project,
            &self.authority,
            std::time::SystemTime::now(),
        )
    }

    /// Sends `request` until FCM answers for the row, renewing a refused access token
    /// once; or what Google said about the app.
    async fn exchange(&self, request: &FcmRequest) -> Exchanged {
        let mut bearer = match self.tokens.bearer().await {
            Ok(token) => token,
            Err(no) => return no_token(no),
        };
        let mut renewed = false;
        loop {
            let answer = match self.send(request, &bearer).await {
                Ok(answer) => answer,
                Err(no_answer) => return no_answer,
            };
            let row = |delivery| Exchanged::Row(delivery);
            match verdict(&answer) {
                Verdict::Sent { name } => {
                    return row(Delivery::Sent {
                        id: name.map(MessageId::Fcm),
                    })
                }
                Verdict::Unregistered { reason } => {
                    return row(Delivery::Unregistered {
                        reason,
                        at: SystemTime::now(),
                    })
                }
                Verdict::Rejected { reason } => return row(Delivery::Rejected { reason }),
                Verdict::Retry { reason, after } => return row(Delivery::Retry { reason, after }),
                Verdict::Throttled {
                    reason,
                    after,
                    scope,
                } => {
                    return Exchanged::Throttled {
                        reason,
                        after,
                        scope,
                    }
                }
                Verdict::Credentials { reason } => return Exchanged::refused(reason),
                Verdict::RenewToken { reason } if renewed => {
                    return Exchanged::refused(format!(
                        "{reason} (a freshly issued access token too: is the system clock \
                         right?)"
                    ))
                }
                Verdict::RenewToken { .. } => {
                    renewed = true;
                    bearer = match self.tokens.renew(Some(&bearer)).await {
                        Ok(token) => token,
                        Err(no) => return no_token(no),
                    };
                }
            }
        }
    }

    /// One request through the pool; `Err` is what it came to when there was no answer.
    async fn send(
        &self,
        request: &FcmRequest,
        bearer: &Secret<String>,
    ) -> Result<Answer, Exchanged> {
        let make = || request.to_http(bearer.expose());
        self.pool
            .send(make, request.body.clone())
            .await
            .map_err(|e| Exchanged::unanswered("FCM", e))
    }

    /// One push, FCM's answer as it is: for `pgpushd send`.
    async fn send_raw(&self, n: &Notification) -> anyhow::Result<OneAnswer> {
        let request = self
            .request(n)
            .map_err(|reason| anyhow::anyhow!("this push would be refused: {reason}"))?;
        let bearer = self
            .tokens
            .bearer()
            .await
            .map_err(|no| anyhow::anyhow!("{}", no.error))?;
        let answer = self
            .pool
            .send(|| request.to_http(bearer.expose()), request.body.clone())
            .await?;
        let (name, reason) = match verdict(&answer) {
            Verdict::Sent { name } => (name, None),
            Verdict::Unregistered { reason }
            | Verdict::Rejected { reason }
            | Verdict::Retry { reason, .. }
            | Verdict::Throttled { reason, .. }
            | Verdict::RenewToken { reason }
            | Verdict::Credentials { reason } => (None, Some(reason)),
        };
        Ok(OneAnswer {
            status: answer.status,
            id: name.map(|name| ("name", name)),
            reason,
        })
    }
}

impl AppClient for FcmApp {
    fn exchange<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Exchanged> {
        Box::pin(self.exchange_row(n))
    }

    fn send_one<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, anyhow::Result<OneAnswer>> {
        Box::pin(self.send_raw(n))
    }

    /// `Err` while no access token can be had, or no connection.
    fn health(&self) -> Result<(), String> {
        self.tokens.health()?;
        self.pool.health()
    }

    fn open_connections(&self) -> usize {
        self.pool.open_connections()
    }
}

/// FCM's answer as the pure rules read it.
pub(crate) fn verdict(answer: &Answer) -> Verdict {
    response::Answer {
        status: answer.status,
        retry_after: answer
            .header(http::header::RETRY_AFTER.as_str())
            .and_then(|v| crate::http2::retry_after(v, std::time::SystemTime::now())),
        body: answer.body.clone(),
    }
    .verdict()
}

/// No access token: a refused account is the app's credentials; an endpoint that failed
/// otherwise defers the row until the next token request may be made. Either way no
/// request reached FCM, so no attempt counts.
fn no_token(no: NoToken) -> Exchanged {
    match no.error {
        TokenError::Refused(_) => Exchanged::refused(no.error.to_string()),
        TokenError::Failed(_) => Exchanged::Row(Delivery::Deferred {
            reason: format!("FCM: {}", no.error),
            after: no.retry_in.max(MIN_DEFER),
        }),
    }
}
