//! An FCM app's access tokens: obtained at the service account's `token_uri`, reused
//! until [`AccessToken::renew_at`], then renewed in the background while sends go on with
//! the current one. One request at a time (single flight): rows that find no valid token
//! wait for that one request rather than each making their own.
//!
//! Each token request goes over its own short-lived HTTPS connection (h2, through the
//! app's proxy policy like every connection), closed once answered: one an hour does not
//! warrant keeping a connection open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Uri, Version};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::access_token::{read_answer, request_body, AccessToken, TokenError};
use super::service_account::ServiceAccount;
use crate::backoff::backoff;
use crate::http2::connection::{ConnectOptions, Connection};
use crate::secret::Secret;

/// Why there is no token now, and how long until the next request may be made.
#[derive(Debug, Clone)]
pub struct NoToken {
    pub error: TokenError,
    pub retry_in: Duration,
}

pub struct AccessTokens {
    app: String,
    account: ServiceAccount,
    /// The token endpoint's host and how to reach it.
    connect: ConnectOptions,
    uri: Uri,
    retry_base: Duration,
    retry_max: Duration,
    state: Mutex<State>,
    /// Held by the one token request in flight.
    flight: tokio::sync::Mutex<()>,
    /// A background renewal is under way (so a busy app spawns one, not one per row).
    renewing: AtomicBool,
}

#[derive(Default)]
struct State {
    current: Option<AccessToken>,
    /// The last request's failure, while no other may be made.
    failure: Option<(TokenError, Instant)>,
    failures: u32,
}

impl AccessTokens {
    pub fn new(
        app: &str,
        account: ServiceAccount,
        connect: ConnectOptions,
        uri: Uri,
        retry_base: Duration,
        retry_max: Duration,
    ) -> AccessTokens {
        AccessTokens {
            app: app.to_owned(),
            account,
            connect,
            uri,
            retry_base,
            retry_max,
            state: Mutex::new(State::default()),
            flight: tokio::sync::Mutex::new(()),
            renewing: AtomicBool::new(false),
        }
    }

    /// `Err` while the last token request failed and no valid token is left.
    pub fn health(&self) -> Result<(), String> {
        let s = self.state.lock().unwrap();
        let valid = s
            .current
            .as_ref()
            .is_some_and(|t| t.valid_at(Instant::now()));
        match &s.failure {
            Some((e, _)) if !valid => Err(e.to_string()),
            _ => Ok(()),
        }
    }

    /// A valid token: the current one (renewing it in the background once due), else a
    /// new one.
    pub async fn bearer(self: &Arc<Self>) -> Result<Secret<String>, NoToken> {
        {
            let s = self.state.lock().unwrap();
            let now = Instant::now();
            if let Some(t) = s.current.as_ref().filter(|t| t.valid_at(now)) {
                // Not while a failed request's backoff runs: it would only be refused.
                if now >= t.renew_at() && Self::waiting(&s, now).is_none() {
                    self.renew_in_background(t.token.clone());
                }
                return Ok(t.token.clone());
            }
            if let Some(no) = Self::waiting(&s, now) {
                return Err(no);
            }
        }
        self.renew(None).await
    }

    /// A token other than `stale` (the one just refused, or due for renewal; `None`:
    /// there was none): one made by a request in flight meanwhile, else a new one.
    pub async fn renew(&self, stale: Option<&Secret<String>>) -> Result<Secret<String>, NoToken> {
        let _flight = self.flight.lock().await;
        {
            let s = self.state.lock().unwrap();
            let now = Instant::now();
            if let Some(t) = s.current.as_ref().filter(|t| t.valid_at(now)) {
                let newer = match stale {
                    Some(stale) => t.token.expose() != stale.expose(),
                    None => now < t.renew_at(),
                };
                if newer {
                    return Ok(t.token.clone());
                }
            }
            if let Some(no) = Self::waiting(&s, now) {
                return Err(no);
            }
        }
        let result = self.request().await;
        let mut s = self.state.lock().unwrap();
        match result {
            Ok(token) => {
                debug!(app = %self.app, expires_in = ?token.expires.saturating_duration_since(token.obtained),
                       "new FCM access token");
                if s.failure.take().is_some() {
                    info!(app = %self.app, "the token endpoint issues access tokens again");
                }
                s.failures = 0;
                let bearer = token.token.clone();
                s.current = Some(token);
                Ok(bearer)
            }
            Err(error) => {
                let retry_in = backoff(s.failures, self.retry_base, self.retry_max);
                s.failures = s.failures.saturating_add(1);
                warn!(app = %self.app, error = %error, ?retry_in, "no FCM access token");
                s.failure = Some((error.clone(), Instant::now() + retry_in));
                Err(NoToken { error, retry_in })
            }
        }
    }

    /// The failure that still forbids a request at `now`.
    fn waiting(s: &State, now: Instant) -> Option<NoToken> {
        match &s.failure {
            Some((error, until)) if *until > now => Some(NoToken {
                error: error.clone(),
                retry_in: *until - now,
            }),
            _ => None,
        }
    }

    fn renew_in_background(self: &Arc<Self>, stale: Secret<String>) {
        if self.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let tokens = self.clone();
        tokio::spawn(async move {
            let _ = tokens.renew(Some(&stale)).await;
            tokens.renewing.store(false, Ordering::Release);
        });
    }

    /// One token request, on a connection of its own.
    async fn request(&self) -> Result<AccessToken, TokenError> {
        let body = request_body(&self.account, SystemTime::now()).map_err(TokenError::Failed)?;
        let sent = Instant::now();
        let conn = Connection::connect(&self.connect, &CancellationToken::new())
            .await
            .map_err(|e| TokenError::Failed(format!("cannot reach the token endpoint: {e}")))?;
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = Version::HTTP_2;
        request.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        // Not the row's request: whichever row waits for this token, its own has not
        // gone out (a batch given up meanwhile counts no attempt for it).
        let answer = crate::transport::watch_request(
            Default::default(),
            conn.send(request, Bytes::from(body)),
        )
        .await;
        conn.close();
        let answer = answer
            .map_err(|e| TokenError::Failed(format!("the token endpoint did not answer: {e}")))?;
        read_answer(answer.status, &answer.body, sent)
    }
}
