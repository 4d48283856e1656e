//! `pgpushd send`: one push, without the database, through the app's provider; prints
//! the service's answer.

use crate::config::{Config, Provider};
use crate::transport::{payload_kind, Broadcast, Notification};

/// What to send, as the command line gives it.
pub struct Push {
    pub app: String,
    /// Empty for a broadcast.
    pub token: String,
    /// A broadcast channel's id, instead of a token.
    pub channel_id: Option<String>,
    /// Text for a plain alert (APNs `aps.alert`, FCM `notification.body`, Web Push
    /// `body`)...
    pub alert: Option<String>,
    /// ... or the whole payload, sent as given (FCM: the message without its token).
    pub payload: Option<String>,
    pub push_type: String,
    pub priority: Option<i16>,
    pub topic: Option<String>,
    pub collapse_id: Option<String>,
}

/// Sends `push` and returns the service's answer as a line.
pub async fn run(config: &Config, push: Push) -> anyhow::Result<String> {
    let app = config
        .apps
        .get(&push.app)
        .ok_or_else(|| anyhow::anyhow!("no [apps.{}] section in the config", push.app))?;
    let payload = match (push.alert, push.payload) {
        (Some(text), _) => match app.provider() {
            Provider::Apns => serde_json::json!({"aps": {"alert": text}}),
            Provider::Fcm => serde_json::json!({"notification": {"body": text}}),
            // What the README's service worker shows.
            Provider::Webpush => serde_json::json!({"title": "pgpushd", "body": text}),
        }
        .to_string(),
        // Sent as given, as a row's text is.
        (None, Some(json)) => {
            payload_kind(&json).map_err(|e| anyhow::anyhow!("--payload is not JSON: {e}"))?;
            json
        }
        (None, None) => anyhow::bail!("give an alert text or a payload"),
    };
    let n = Notification {
        id: 0,
        app: push.app,
        device_token: push.token,
        broadcast: push.channel_id.map(|channel_id| Broadcast {
            channel_id,
            // APNs judges: the channel may not be in pgpushd.channels at all.
            storage: None,
        }),
        payload,
        push_type: push.push_type,
        priority: push.priority,
        collapse_id: push.collapse_id,
        topic: push.topic,
        expires_at: None,
        attempts: 0,
    };
    Ok(crate::providers::send_one(app, &n).await?.to_string())
}
