//! APNs: an app's client ([`load`]) over its `protocol`: [`http2`] (the provider API) or
//! [`binary`] (the retired binary protocol), each an `AppClient` of the shared service
//! layer (`crate::service`). What both protocols use lives here: client certificates
//! ([`identity`]), the push types ([`push_type`]) and Live Activity pushes' rules
//! ([`live_activity`]), Apple's reasons ([`reason`]), the
//! provider token ([`provider_token`], HTTP/2's token auth) and its timings
//! ([`options`]).

use tokio::sync::mpsc;

use crate::config::{AppConfig, Protocol};
use crate::service::{AppClient, LoadError, Timings};
use crate::transport::Undelivered;

pub mod binary;
pub mod channels;
pub mod http2;
pub mod identity;
pub mod live_activity;
pub mod options;
pub mod provider_token;
pub mod push_type;
pub mod reason;

pub use options::Options;

/// An APNs app's client, by its `protocol`: loads its key or certificate and sets up
/// TLS; connects on the first row. A binary app's rows found undelivered after it
/// reported them sent go to `undelivered`.
pub fn load(
    config: &AppConfig,
    timings: &Timings,
    options: &Options,
    undelivered: &mpsc::UnboundedSender<Vec<Undelivered>>,
) -> Result<Box<dyn AppClient>, LoadError> {
    Ok(match config.protocol {
        Protocol::Http2 => Box::new(http2::Http2App::new(config, timings, options)?),
        Protocol::Binary => Box::new(binary::BinaryApp::new(
            config,
            timings,
            undelivered.clone(),
        )?),
    })
}

#[cfg(test)]
mod tests;
