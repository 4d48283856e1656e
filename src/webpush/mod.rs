//! Web Push, for browsers: a row's payload delivered to the service worker of the page
//! that subscribed, through the browser's push service (Mozilla's autopush, Google's
//! FCM, Apple's, Microsoft's), over the Web Push protocol (RFC 8030): the payload
//! encrypted for the browser (RFC 8291, `aes128gcm`, RFC 8188) and the request signed
//! with the app's VAPID key (RFC 8292).
//!
//! The rules, pure and tested on their own:
//!
//! - [`subscription`]: a row's `device_token`, the browser's `PushSubscription` JSON;
//! - [`encrypt`]: the payload encrypted for the browser (`aes128gcm`), and how large it
//!   may be;
//! - [`request`]: a row as the request, its columns as `TTL`, `Urgency` and `Topic`;
//! - [`response`]: what the push service's answer means for the row;
//! - [`vapid`]: the app's key, its tokens (one per push service, 12 hours each);
//! - [`base64url`]: how Web Push writes bytes.
//!
//! One row, put together: [`subscription::Subscription::parse`] its `device_token`,
//! [`request::build`] the request, [`encrypt::encrypt`] its payload for the body (103
//! bytes longer), [`vapid::VapidSigner::authorization`] for the request's origin, then
//! [`request::WebPushRequest::to_http`]; the answer read as [`response::Answer`] gives
//! its [`response::Verdict`]. `app.rs` is the app's client (`AppClient`) that does the
//! sending, with its VAPID tokens; `origins.rs` the push services it sends to, each with
//! its own connections and its own gate.

mod app;
pub mod base64url;
pub mod encrypt;
mod origins;
mod p256;
pub mod request;
pub mod response;
pub mod subscription;
pub mod vapid;

use crate::config::AppConfig;
use crate::service::{AppClient, LoadError, Timings};

pub use origins::{MAX_ORIGINS, ORIGIN_IDLE};

/// A Web Push app's client: loads its VAPID key and sets up TLS; connects to a push
/// service when a row first goes there.
pub fn load(config: &AppConfig, timings: &Timings) -> Result<Box<dyn AppClient>, LoadError> {
    Ok(Box::new(app::WebpushApp::new(config, timings)?))
}
