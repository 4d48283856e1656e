//! Firebase Cloud Messaging (HTTP v1), for apps with `provider = "fcm"`: the pieces that
//! decide, each pure or nearly so and tested on its own. The transport that uses them
//! over long-lived HTTP/2 connections is being built (issue 13); nothing here is wired
//! into the daemon yet.
//!
//! - [`service_account`]: the JSON key Google issues, loaded and checked;
//! - [`access_token`]: the signed assertion, the token endpoint's answer, when to renew;
//! - [`message`]: a row as a `messages:send` body, refused first where FCM would refuse;
//! - [`response`]: what FCM's answer means for the row.

pub mod access_token;
pub mod message;
pub mod response;
pub mod service_account;
