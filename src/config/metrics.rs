//! `[metrics]`: where the Prometheus endpoint listens, if anywhere.

use serde::Deserialize;

use super::validate::Validator;
use super::ConfigError;

#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsFile {
    listen: Option<String>,
}

impl Validator<'_> {
    pub(super) fn metrics(&self, m: MetricsFile) -> Result<MetricsConfig, ConfigError> {
        let listen = m
            .listen
            .map(|l| {
                l.parse().map_err(|_| {
                    self.invalid(
                        "metrics.listen",
                        format!("{l:?} is not an address like 127.0.0.1:9187"),
                    )
                })
            })
            .transpose()?;
        Ok(MetricsConfig { listen })
    }
}
