//! `pgpushd send`: one push for one app, without a database, and APNs's answer as it is.

use std::fmt;

use super::Http2App;
use crate::apns::options::Options;
use crate::config::{AppConfig, Protocol};
use crate::transport::Notification;

/// APNs's answer to one push sent by [`send_one`].
#[derive(Debug, Clone, PartialEq)]
pub struct OneAnswer {
    pub status: u16,
    /// APNs's `apns-id` (the one we sent, unless APNs chose another).
    pub apns_id: Option<String>,
    pub reason: Option<String>,
}

impl fmt::Display for OneAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(r) = &self.reason {
            write!(f, " {r}")?;
        }
        if let Some(id) = &self.apns_id {
            write!(f, " (apns-id {id})")?;
        }
        Ok(())
    }
}

/// Sends one push for `app`, without a database, and returns APNs's answer as is
/// (`pgpushd send`). Errors: the credentials, a row APNs would refuse, no connection.
pub async fn send_one(app: &AppConfig, n: &Notification) -> anyhow::Result<OneAnswer> {
    anyhow::ensure!(
        app.protocol == Protocol::Http2,
        "apps.{}: pgpushd send speaks HTTP/2 only; this app uses the binary protocol",
        app.name
    );
    let mut config = app.clone();
    config.connections = 1;
    let client = Http2App::new(&config, &Options::default())?;
    let (apns_id, answer) = client.send_one(n).await?;
    Ok(OneAnswer {
        status: answer.status,
        reason: answer.reason().map(|r| r.to_string()),
        apns_id: Some(answer.apns_id.unwrap_or_else(|| apns_id.to_string())),
    })
}
