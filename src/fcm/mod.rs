//! Firebase Cloud Messaging (HTTP v1), for apps with `provider = "fcm"`: an app's
//! client ([`load`], an `AppClient` of the shared service layer, `crate::service`): its
//! pool of long-lived HTTP/2 connections to FCM and its access tokens. The pieces that
//! decide are pure and tested on their own:
//!
//! - [`service_account`]: the JSON key Google issues, loaded and checked;
//! - [`access_token`]: the signed assertion, the token endpoint's answer, when to renew;
//! - [`message`]: a row as a `messages:send` body, refused first where FCM would refuse;
//! - [`request`]: the whole request, the row's APNs-only columns refused;
//! - [`response`]: what FCM's answer means for the row.
//!
//! [`token_source`] gets and renews the access tokens (single flight, in the background);
//! [`options`] holds FCM's own timings that are not in the config.

use crate::config::AppConfig;
use crate::service::{AppClient, LoadError, Timings};

pub mod access_token;
mod app;
pub mod expiry;
pub mod message;
pub mod options;
pub mod request;
pub mod response;
pub mod service_account;
pub mod token_source;

pub use options::Options;

/// An FCM app's client: loads its service account and sets up TLS; connects on the
/// first row.
pub fn load(
    config: &AppConfig,
    timings: &Timings,
    options: &Options,
) -> Result<Box<dyn AppClient>, LoadError> {
    Ok(Box::new(app::FcmApp::new(config, timings, options)?))
}
