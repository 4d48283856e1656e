//! The binary protocol's feedback service, polled: every `feedback_interval`, connect to
//! feedback(.sandbox).push.apple.com:2196 with the app's certificate, read the
//! (timestamp, token) tuples it sends until it closes, and report those tokens through
//! the transport seam ([`crate::transport::Transport::unregistered`]); the daemon records
//! them in `pgpushd.unregistered_tokens`, so later rows for them fail without being sent.
//!
//! The service forgets what it handed out, so a poller only runs once someone takes its
//! reports (see `Apns::unregistered`), and the reports wait in memory until they are
//! recorded.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::frame::{self, TOKEN_LEN};
use crate::proxy::{self, Proxy};
use crate::transport::{short_token, Unregistered};

/// Upper bound on one visit to the feedback service (connect, handshake, read).
const VISIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The feedback service sends a few tuples, or a few thousand: never megabytes.
const MAX_FEEDBACK: usize = 16 << 20;

/// One app's poller, ready to run.
#[derive(Clone)]
pub struct FeedbackPoller {
    pub(super) app: String,
    pub(super) host: String,
    pub(super) port: u16,
    /// The proxy whose tunnel the visits go through, if any.
    pub(super) proxy: Option<Proxy>,
    pub(super) tls: native_tls::TlsConnector,
    pub(super) interval: Duration,
    pub(super) connect_timeout: Duration,
}

impl FeedbackPoller {
    /// Polls at once, then every interval, until `cancel`; sends what each visit found.
    pub async fn run(self, reports: UnboundedSender<Vec<Unregistered>>, cancel: CancellationToken) {
        info!(app = %self.app, service = %proxy::describe(&self.host, self.port, self.proxy.as_ref()),
              interval = ?self.interval, "polling the APNs feedback service");
        loop {
            let visit = tokio::select! {
                _ = cancel.cancelled() => return,
                visit = self.fetch() => visit,
            };
            match visit {
                Ok(tokens) if tokens.is_empty() => {}
                Ok(tokens) => {
                    let reported = tokens
                        .into_iter()
                        .map(|(device_token, at)| Unregistered {
                            app: self.app.clone(),
                            device_token,
                            at,
                        })
                        .collect();
                    if reports.send(reported).is_err() {
                        return;
                    }
                }
                Err(e) => warn!(app = %self.app, error = format!("{e:#}"),
                                "cannot read the APNs feedback service"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// The tuples the service sends, as (lower-case hex token, since when).
    pub async fn fetch(&self) -> anyhow::Result<Vec<(String, SystemTime)>> {
        let addr = proxy::describe(&self.host, self.port, self.proxy.as_ref());
        let bytes = tokio::time::timeout(VISIT_TIMEOUT, async {
            let tcp = tokio::time::timeout(
                self.connect_timeout,
                super::connection::connect_tcp(
                    &self.host,
                    self.port,
                    self.proxy.as_ref(),
                    self.connect_timeout,
                ),
            )
            .await
            .map_err(|_| anyhow::anyhow!("connecting timed out"))??;
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
