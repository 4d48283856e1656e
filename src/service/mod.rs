//! The layer every push service shares (APNs, FCM, Web Push). A service is a folder of
//! pure rules (a row as a request, an answer as a verdict, its reasons as types) plus one
//! [`AppClient`] per app: what it takes to exchange one row with the service. Everything
//! else is here, said once:
//!
//! - [`registry`]: every app of the config by name, each with its [`AppGate`]; a row's
//!   attempt goes through its app's gate; a reload rebuilds only the apps whose config
//!   or files changed, and applies to all or none; a row of an app nobody has retries;
//! - [`app_gate`]: an app paused while its service refuses its credentials or throttles
//!   it as a whole, and the probe that reopens it;
//! - [`exchanged`]: what an exchange came to ([`Exchanged`]), which the gate turns into
//!   the row's `Delivery`, and what a request that got no answer means ([`unanswered`]);
//! - [`timings`]: the clients' timings that are not in the config, and the HTTP/2 pool
//!   they configure;
//! - [`load_error`]: what can go wrong loading an app;
//! - [`one_answer`]: `pgpushd send`'s answer.
//!
//! Adding a service is: a variant of `config::Provider` and its config section, a folder
//! with its rules and an `AppClient`, and one arm in `providers::load`.

pub mod app_gate;
pub mod exchanged;
pub mod load_error;
pub mod one_answer;
pub mod registry;
pub mod timings;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use app_gate::AppGate;
pub use exchanged::{unanswered, Exchanged, Scope};
pub use load_error::LoadError;
pub use one_answer::OneAnswer;
pub use registry::Registry;
pub use timings::Timings;

use crate::channels::{ChannelAnswer, ChannelError, ChannelOp};
use crate::transport::{Notification, Unregistered};

/// One app's client for its push service: its credentials and connections. The
/// registry puts its app's gate around every [`AppClient::exchange`].
pub trait AppClient: Send + Sync {
    /// One attempt for the row: build its request (or refuse the row), send it, and
    /// read the answer.
    fn exchange<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Exchanged>;

    /// One push without a database, the answer as the service gave it (`pgpushd send`).
    fn send_one<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, anyhow::Result<OneAnswer>>;

    /// `Err` while no connection (or no credential, such as an access token) can be had.
    fn health(&self) -> Result<(), String>;

    fn open_connections(&self) -> usize;

    /// What the service reports on its own, outside any answer (APNs's binary feedback
    /// service): a task that sends what it finds until stopped. Most services have none.
    fn reporter(&self) -> Option<Reporter> {
        None
    }

    /// The app's push services paused on their own (Web Push's origins), as the app's
    /// [`Pause`](crate::transport::Pause)s with their `origin`.
    fn paused_origins(&self) -> Vec<crate::transport::Pause> {
        Vec::new()
    }

    /// Whether it sends broadcast rows (rows naming a channel: APNs's HTTP/2 provider
    /// API). The registry fails them for the others.
    fn broadcasts(&self) -> bool {
        false
    }

    /// One request to the app's channel management API, for a client that
    /// [`broadcasts`](AppClient::broadcasts).
    fn manage_channel<'a>(&'a self, op: &'a ChannelOp) -> BoxFuture<'a, ChannelAnswer> {
        let _ = op;
        Box::pin(async { Err(ChannelError::Rejected(NO_CHANNELS.into())) })
    }
}

/// Why a row or a channel of an app that is not an APNs HTTP/2 app fails.
pub const NO_CHANNELS: &str = "FeatureNotEnabled: broadcast channels are APNs's, through its \
                               HTTP/2 provider API; this app is not an APNs app of that protocol";

/// A task reporting unregistered tokens on `sink` until `stop` is cancelled.
pub type Reporter = Box<
    dyn FnOnce(
            mpsc::UnboundedSender<Vec<Unregistered>>,
            CancellationToken,
        ) -> BoxFuture<'static, ()>
        + Send,
>;
