//! The seam between the outbox and the push services (APNs, FCM): a claimed row as a [`Notification`], what became
//! of it as a [`Delivery`], and the [`Transport`] that turns one into the other.
//!
//! The daemon only knows this trait. The APNs transports (`apns`) and FCM's (`fcm`)
//! implement it, and `providers` routes between them; tests may implement it too. A `Delivery` says what the *row* should become, so every transport
//! maps its protocol's answers onto the same few cases and the dispatcher stays
//! protocol-agnostic. What a push service reports on its own, outside any answer (the
//! binary protocol's feedback service), comes back through the seam as well, as
//! [`Unregistered`] tokens that the daemon records in the outbox, and so do rows reported
//! sent that turned out not to be ([`Undelivered`]: a late binary error packet), which
//! the daemon sets back to `pending`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::time::Instant;
use uuid::Uuid;

use crate::channels::{ChannelAnswer, ChannelError, ChannelOp, MessageStorage};
use crate::config::AppConfig;

/// One outbox row, as claimed, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub id: i64,
    pub app: String,
    /// APNs: hex, as the device reported it (not necessarily 64 digits); FCM: the
    /// registration token, exactly; Web Push: the subscription. Empty for a broadcast.
    pub device_token: String,
    /// The complete APNs payload, or FCM's message without its token, a JSON object, as
    /// its text: for a claimed row,
    /// PostgreSQL's (`payload::text`). It is sent byte for byte, never re-serialized, so
    /// no number is rounded on the way (see [`payload_kind`]).
    pub payload: String,
    pub push_type: String,
    pub priority: Option<i16>,
    pub collapse_id: Option<String>,
    /// Overrides the app's topic when set.
    pub topic: Option<String>,
    pub expires_at: Option<SystemTime>,
    /// Requests made for this row before this one.
    pub attempts: i32,
    /// A broadcast row's channel (its `channel_id`, instead of a device token).
    pub broadcast: Option<Broadcast>,
}

impl Notification {
    /// Whom the row goes to: its device token, or its channel.
    pub fn target(&self) -> &str {
        match &self.broadcast {
            Some(b) => &b.channel_id,
            None => &self.device_token,
        }
    }
}

/// The channel a broadcast row is for: APNs's channel id, and its message storage when
/// `pgpushd.channels` knows the channel (`None` for a channel made elsewhere).
#[derive(Debug, Clone, PartialEq)]
pub struct Broadcast {
    pub channel_id: String,
    pub storage: Option<MessageStorage>,
}

/// What should become of a row after one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// The service accepted it; `id` is what the service called the message, kept in
    /// the row (`apns_id`, `fcm_name`, `webpush_location`).
    Sent { id: Option<MessageId> },
    /// Permanently refused (bad token, payload too large, bad row, ...): `failed`.
    Rejected { reason: String },
    /// The token is no longer valid (410 / binary status 8): `failed`, and the token is
    /// recorded in `unregistered_tokens` so later rows for it are not sent.
    Unregistered { reason: String, at: SystemTime },
    /// A transient failure (429, 5xx, timeout, connection lost): `pending` again after a
    /// backoff, counting the attempt; `failed` once `max_attempts` is reached. `after`
    /// is the least wait the service asked for (`Retry-After`), when it did.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The app cannot send at all right now (credentials refused, endpoint unreachable
    /// for a configuration reason): `pending` again after `after`, the attempt *not*
    /// counted, so a fixed configuration delivers every row.
    Deferred { reason: String, after: Duration },
}

impl Delivery {
    pub fn rejected(reason: impl Into<String>) -> Delivery {
        Delivery::Rejected {
            reason: reason.into(),
        }
    }
    pub fn retry(reason: impl Into<String>) -> Delivery {
        Delivery::Retry {
            reason: reason.into(),
            after: None,
        }
    }
}

/// What a push service called a message it accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageId {
    /// APNs's `apns-id`.
    Apns(Uuid),
    /// FCM's `name` (`projects/P/messages/ID`).
    Fcm(String),
    /// A Web Push service's `Location`: the push message's URL.
    Webpush(String),
}

/// A device token the push service reported unregistered on its own, not in answer to a
/// send: later rows for it fail without being sent. Its `Debug` shows the token
/// shortened ([`short_token`]), as every log does: a report still unwritten at shutdown is
/// logged with it.
#[derive(Clone, PartialEq)]
pub struct Unregistered {
    pub app: String,
    /// Lower-case hex (APNs), or exactly as issued (FCM).
    pub device_token: String,
    /// Since when the service considers it unregistered.
    pub at: SystemTime,
}

impl std::fmt::Debug for Unregistered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unregistered")
            .field("app", &self.app)
            .field(
                "device_token",
                &format_args!("{}…", short_token(&self.device_token)),
            )
            .field("at", &humantime::format_rfc3339_seconds(self.at))
            .finish()
    }
}

/// Why an app is paused (see `app_gate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// The service refuses the app's credentials.
    Credentials,
    /// The service throttles the app (quota, overload).
    Throttled,
    /// No connection to the service can be had (refused, timed out, a proxy that refuses
    /// the tunnel, a failed TLS handshake).
    Unreachable,
}

/// An app paused (see `app_gate`), or one push service of a Web Push app, as the
/// transport reports it: the daemon parks the backlog meanwhile (`paused_apps`); a whole
/// app's it also leaves out of the claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    pub app: String,
    /// The Web Push service (`https://host[:port]`, a subscription's origin) paused, when
    /// the pause is that push service's alone, not the app's.
    pub origin: Option<String>,
    /// Which pause: unique in the process (a reloaded app's new gate counts on).
    pub number: u64,
    /// When the probe may go out (past, once the app waits for its probe).
    pub until: Instant,
    /// How long after `until` the rows the gate deferred come back: the probe's time to
    /// answer.
    pub probe_wait: Duration,
    /// A probe is out.
    pub probing: bool,
    pub cause: PauseCause,
    pub reason: String,
}

impl Pause {
    /// When the rows deferred by this pause are due again.
    pub fn backlog_at(&self) -> Instant {
        self.until + self.probe_wait
    }
}

/// A row the transport reported `Sent` that, it learned later, was not delivered after
/// all: the binary protocol's gateway refused an earlier notification on the connection
/// after the later ones' settle windows had passed, and discarded them. The daemon sets
/// the row back to `pending` (once its batch has committed it as `sent`), and it is sent
/// again.
#[derive(Debug, Clone, PartialEq)]
pub struct Undelivered {
    /// The row's id.
    pub id: i64,
    /// Why, for its `last_error`.
    pub reason: String,
}

/// Sends notifications. One call is one attempt for one row; the dispatcher runs many
/// calls at once, so implementations multiplex them (HTTP/2 streams, pipelined frames).
pub trait Transport: Send + Sync + 'static {
    /// Never fails: every problem becomes a [`Delivery`] saying what to do with the row.
    fn send<'a>(&'a self, notification: &'a Notification) -> BoxFuture<'a, Delivery>;

    /// Per app: `Err(reason)` while it cannot deliver (credentials refused, no
    /// connection); for `/healthz`.
    fn health(&self) -> Vec<(String, Result<(), String>)> {
        Vec::new()
    }

    /// The apps paused now, while their service refuses their credentials, throttles
    /// them or cannot be reached (see `app_gate`), and the Web Push services paused for
    /// an app: the daemon sets each one's backlog aside until the pause ends.
    fn paused(&self) -> Vec<Pause> {
        Vec::new()
    }

    /// Per app: connections open now; for metrics.
    fn open_connections(&self) -> Vec<(String, usize)> {
        Vec::new()
    }

    /// Applies a reloaded config's apps: nothing changes unless every app loads.
    /// Returns the names of the apps rebuilt, added or removed.
    fn reload(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Vec<String>, String> {
        let _ = apps;
        Ok(Vec::new())
    }

    /// Waits for the next tokens the service reports unregistered on its own (see
    /// [`Unregistered`]); never completes for a transport that has no such reports. The
    /// first call starts whatever polls for them: a report is only taken from the
    /// service once someone will record it.
    fn unregistered(&self) -> BoxFuture<'_, Vec<Unregistered>> {
        Box::pin(futures::future::pending())
    }

    /// Waits for the next rows the transport reported `Sent` and now knows were not
    /// delivered (see [`Undelivered`]); never completes for a transport whose answers
    /// are final (HTTP/2's are).
    fn undelivered(&self) -> BoxFuture<'_, Vec<Undelivered>> {
        Box::pin(futures::future::pending())
    }

    /// One request to `app`'s channel management API (APNs's broadcast channels). Never
    /// fails: an app not loaded here, or one without channels, answers why.
    fn manage_channel<'a>(
        &'a self,
        app: &'a str,
        op: &'a ChannelOp,
    ) -> BoxFuture<'a, ChannelAnswer> {
        let _ = op;
        Box::pin(async move {
            Err(ChannelError::Deferred {
                reason: format!("app {app:?} has no broadcast channels in this daemon"),
                after: Duration::from_secs(60),
            })
        })
    }
}

tokio::task_local! {
    /// Set by the transport once the request of the row being sent has gone out.
    static WENT_OUT: Arc<AtomicBool>;
}

/// Says that the request of the row being sent went out (its body handed to the
/// connection): from then on the service may act on it, so the attempt counts even if
/// no answer ever comes (see [`watch_request`]). Called by the transports; does nothing
/// outside a watched send.
pub fn request_went_out() {
    let _ = WENT_OUT.try_with(|flag| flag.store(true, Ordering::Relaxed));
}

/// Runs one row's `send`, setting `went_out` when its request goes out: a batch given up
/// before the answer came counts an attempt for that row, and only for that row.
pub async fn watch_request<F: std::future::Future>(
    went_out: Arc<AtomicBool>,
    send: F,
) -> F::Output {
    WENT_OUT.scope(went_out, send).await
}

/// What kind of JSON value a payload's text holds, reading it without converting its
/// numbers (so none is rounded or out of range): `Ok(None)` for an object, as APNs wants,
/// `Ok(Some(kind))` for anything else ("an array", ...), `Err` when it is not JSON.
pub fn payload_kind(text: &str) -> Result<Option<&'static str>, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| e.to_string())?;
    // Valid JSON: only JSON's whitespace can come before the value's first byte.
    Ok(match text.trim_start().as_bytes().first() {
        Some(b'{') => None,
        Some(b'[') => Some("an array"),
        Some(b'"') => Some("a string"),
        Some(b't' | b'f') => Some("a boolean"),
        Some(b'n') => Some("null"),
        _ => Some("a number"),
    })
}

/// Enough of a device token to find it, too little to use it: the first 8 characters
/// of an APNs or FCM token; of a Web Push subscription, its endpoint up to the first 8
/// characters of the endpoint's last path segment (the push service, and which of its
/// subscriptions), never its keys.
pub fn short_token(token: &str) -> &str {
    let first_8 = |text: &str| match text.char_indices().nth(8) {
        Some((i, _)) => i,
        None => text.len(),
    };
    match subscription_endpoint(token) {
        Some((start, endpoint)) => {
            let id = endpoint.rfind('/').map_or(0, |i| i + 1);
            &token[start..start + id + first_8(&endpoint[id..])]
        }
        None => &token[..first_8(token)],
    }
}

/// A Web Push subscription's endpoint (where it starts in `token`, and its text), found
/// without parsing the JSON (a log line's helper must not fail).
fn subscription_endpoint(token: &str) -> Option<(usize, &str)> {
    if !token.trim_start().starts_with('{') {
        return None;
    }
    let key = token.find("\"endpoint\"")? + "\"endpoint\"".len();
    let rest = &token[key..];
    let open = key + rest.find('"')? + 1;
    let len = token[open..].find('"')?;
    Some((open, &token[open..open + len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_shortened_to_what_finds_it() {
        assert_eq!(short_token(&"ab".repeat(32)), "abababab");
        assert_eq!(short_token("dXf1:APA91b-x_y"), "dXf1:APA");
        assert_eq!(short_token("abc"), "abc");
        let sub = r#"{"endpoint":"https://fcm.googleapis.com/fcm/send/dX3Abc123456789","expirationTime":null,"keys":{"p256dh":"BN","auth":"tB"}}"#;
        assert_eq!(
            short_token(sub),
            "https://fcm.googleapis.com/fcm/send/dX3Abc12"
        );
        assert_eq!(
            short_token(r#"{"endpoint": "https://x.example/p/s"}"#),
            "https://x.example/p/s"
        );
        // Not a subscription after all: the first 8 characters, as for any token.
        assert_eq!(short_token(r#"{"keys": {"auth": "x"}}"#), r#"{"keys":"#);
    }

    #[test]
    fn an_unregistered_token_is_logged_shortened() {
        let token = "a".repeat(64);
        let u = Unregistered {
            app: "default".into(),
            device_token: token.clone(),
            at: SystemTime::UNIX_EPOCH,
        };
        let logged = format!("{:?}", vec![u]);
        assert!(!logged.contains(&token), "{logged}");
        assert!(logged.contains("aaaaaaaa…"), "{logged}");
    }
}
