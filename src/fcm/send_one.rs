//! `pgpushd send` for an FCM app: one push, without a database, and FCM's answer as it is.

use std::fmt;

use super::app::{verdict, FcmApp};
use super::options::Options;
use super::response::Verdict;
use crate::config::AppConfig;
use crate::transport::Notification;

/// FCM's answer to one push sent by [`send_one`].
#[derive(Debug, Clone, PartialEq)]
pub struct FcmAnswer {
    pub status: u16,
    /// FCM's name for the message, when it took it.
    pub name: Option<String>,
    /// Why not, when it did not: FCM's error code and message.
    pub reason: Option<String>,
}

impl fmt::Display for FcmAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(r) = &self.reason {
            write!(f, " {r}")?;
        }
        if let Some(name) = &self.name {
            write!(f, " (name {name})")?;
        }
        Ok(())
    }
}

/// Sends one push for the FCM app `app` and returns FCM's answer (`pgpushd send`).
/// Errors: the service account, a row FCM would refuse, no access token, no connection.
pub async fn send_one(app: &AppConfig, n: &Notification) -> anyhow::Result<FcmAnswer> {
    let mut config = app.clone();
    config.connections = 1;
    let client = FcmApp::new(&config, &Options::default())?;
    let answer = client.send_one(n).await?;
    let (name, reason) = match verdict(&answer) {
        Verdict::Sent { name } => (name, None),
        Verdict::Unregistered { reason }
        | Verdict::Rejected { reason }
        | Verdict::Retry { reason, .. }
        | Verdict::Throttled { reason, .. }
        | Verdict::RenewToken { reason }
        | Verdict::Credentials { reason } => (None, Some(reason)),
    };
    Ok(FcmAnswer {
        status: answer.status,
        name,
        reason,
    })
}
