//! The binary protocol's feedback service, polled: every `feedback_interval`, connect to
//! feedback(.sandbox).push.apple.com:2196 with the app's certificate, read the
//! (timestamp, token) tuples it sends until it closes, and record those tokens in
//! `pgpushd.unregistered_tokens`, so later rows for them fail without being sent.
//!
//! The service forgets what it handed out, so tuples the database did not take are kept
//! and written again on the next round (sooner than the interval when that is long).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::frame::{self, TOKEN_LEN};
use crate::apns::short_token;
use crate::config::{Config, Protocol};
use crate::secret::Secret;
use crate::{db, outbox};

/// Upper bound on one visit to the feedback service (connect, handshake, read).
const VISIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The feedback service sends a few tuples, or a few thousand: never megabytes.
const MAX_FEEDBACK: usize = 16 << 20;
/// How soon to retry writing tuples the database refused.
const SAVE_RETRY: Duration = Duration::from_secs(30);

/// One app's poller, ready to run.
pub struct FeedbackPoller {
    app: String,
    host: String,
    port: u16,
    tls: native_tls::TlsConnector,
    interval: Duration,
    connect_timeout: Duration,
    db_url: Secret<String>,
}

/// A poller for every binary-protocol app whose feedback service is on. An app whose
/// certificate cannot be loaded is logged and skipped (the transport has refused to
/// start over it already).
pub fn pollers(config: &Config) -> Vec<FeedbackPoller> {
    config
        .apps
        .values()
        .filter(|app| app.protocol == Protocol::Binary)
        .filter_map(|app| {
            let feedback = app.binary.feedback.as_ref()?;
            let tls = match super::tls_connector(app) {
                Ok(tls) => tls,
                Err(e) => {
                    error!(error = %e, "feedback service not polled");
                    return None;
                }
            };
            let (host, port) = super::feedback_service(&feedback.endpoint);
            Some(FeedbackPoller {
                app: app.name.clone(),
                host: host.to_owned(),
                port,
                tls,
                interval: feedback.interval,
                connect_timeout: config.database.connect_timeout,
                db_url: config.database.url.clone(),
            })
        })
        .collect()
}

impl FeedbackPoller {
    /// Polls at once, then every interval, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        info!(app = %self.app, service = %format!("{}:{}", self.host, self.port),
              interval = ?self.interval, "polling the APNs feedback service");
        let mut unsaved: Vec<(String, SystemTime)> = Vec::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.round(&mut unsaved) => {}
            }
            let wait = match unsaved.is_empty() {
                true => self.interval,
                false => self.interval.min(SAVE_RETRY),
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if !unsaved.is_empty() {
            warn!(app = %self.app, tokens = unsaved.len(),
                  "stopping with feedback tokens not recorded");
        }
    }

    /// One visit, then one write of everything not yet recorded.
    async fn round(&self, unsaved: &mut Vec<(String, SystemTime)>) {
        match self.fetch().await {
            Ok(tokens) => unsaved.extend(tokens),
            Err(e) => warn!(app = %self.app, error = format!("{e:#}"),
                            "cannot read the APNs feedback service"),
        }
        if unsaved.is_empty() {
            return;
        }
        match self.save(unsaved).await {
            Ok(()) => {
                info!(app = %self.app, tokens = unsaved.len(),
                      "recorded tokens the feedback service reported unregistered");
                unsaved.clear();
            }
            Err(e) => warn!(app = %self.app, error = format!("{e:#}"), tokens = unsaved.len(),
                            "cannot record feedback tokens; keeping them for the next round"),
        }
    }

    /// The tuples the service sends, as (lower-case hex token, since when).
    pub async fn fetch(&self) -> anyhow::Result<Vec<(String, SystemTime)>> {
        let addr = format!("{}:{}", self.host, self.port);
        let bytes = tokio::time::timeout(VISIT_TIMEOUT, async {
            let tcp = tokio::time::timeout(
                self.connect_timeout,
                TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("connecting timed out"))?
            .context("cannot connect")?;
            let mut tls = tokio_native_tls::TlsConnector::from(self.tls.clone())
                .connect(&self.host, tcp)
                .await
                .context("TLS handshake failed")?;
            let mut bytes = Vec::new();
            (&mut tls)
                .take(MAX_FEEDBACK as u64)
                .read_to_end(&mut bytes)
                .await
                .context("reading failed")?;
            anyhow::Ok(bytes)
        })
        .await
        .map_err(|_| anyhow::anyhow!("no end within {VISIT_TIMEOUT:?}"))?
        .with_context(|| format!("feedback service {addr}"))?;
        Ok(decode(&self.app, &bytes))
    }

    async fn save(&self, tokens: &[(String, SystemTime)]) -> anyhow::Result<()> {
        let client = db::connect(&self.db_url, self.connect_timeout, "feedback").await?;
        outbox::record_unregistered(&client, &self.app, tokens).await?;
        Ok(())
    }
}

/// Every whole tuple with a 32-byte token; the rest is logged and skipped.
fn decode(app: &str, mut bytes: &[u8]) -> Vec<(String, SystemTime)> {
    let mut tokens = Vec::new();
    while let Some((t, used)) = frame::decode_feedback(bytes) {
        bytes = &bytes[used..];
        if t.token.len() != TOKEN_LEN {
            warn!(
                app,
                length = t.token.len(),
                "feedback tuple with a token of odd size: skipped"
            );
            continue;
        }
        let token = hex::encode(&t.token);
        debug!(
            app,
            token = short_token(&token),
            timestamp = t.timestamp,
            "feedback tuple"
        );
        tokens.push((token, UNIX_EPOCH + Duration::from_secs(t.timestamp.into())));
    }
    if !bytes.is_empty() {
        warn!(
            app,
            bytes = bytes.len(),
            "the feedback service ended mid-tuple: rest skipped"
        );
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use frame::FeedbackTuple;

    #[test]
    fn tuples_become_lower_case_tokens_with_their_time() {
        let mut bytes = Vec::new();
        for t in [
            FeedbackTuple {
                timestamp: 1_700_000_000,
                token: vec![0xab; 32],
            },
            FeedbackTuple {
                timestamp: 1,
                token: vec![1; 8],
            },
            FeedbackTuple {
                timestamp: 2,
                token: vec![0x0c; 32],
            },
        ] {
            frame::encode_feedback(&t, &mut bytes);
        }
        bytes.extend_from_slice(&[0, 0]); // cut short
        assert_eq!(
            decode("default", &bytes),
            [
                (
                    "ab".repeat(32),
                    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
                ),
                ("0c".repeat(32), UNIX_EPOCH + Duration::from_secs(2)),
            ]
        );
    }
}
