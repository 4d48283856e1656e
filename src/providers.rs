//! The push services side by side: [`Providers`] is the [`Transport`] the daemon, `main`
//! and the demo use. It keeps every app of the config in one `service::Registry`, each
//! app's client built by its provider ([`load`], the one place that names every
//! service), and takes what the services report on their own (APNs's binary feedback
//! service, rows it found undelivered). A reload applies to every app or to none.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::channels::{ChannelAnswer, ChannelOp};
use crate::config::{AppConfig, Config, Provider};
use crate::service::{AppClient, LoadError, OneAnswer, Registry, Timings};
use crate::transport::{Delivery, Notification, Pause, Transport, Undelivered, Unregistered};
use crate::{apns, fcm, webpush};

/// Every service's timings that are not in the config: sensible for the real services,
/// shortened by tests.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub timings: Timings,
    pub apns: apns::Options,
    pub fcm: fcm::Options,
}

pub struct Providers {
    pub(crate) registry: Registry,
    options: Options,
    unregistered: Reports<Unregistered>,
    /// Set by the first [`Transport::unregistered`] call: from then on every app's
    /// reporter runs (before, nobody would record what they found).
    reports_wanted: AtomicBool,
    /// Rows the binary apps reported sent and then found undelivered.
    undelivered: Reports<Undelivered>,
}

impl Providers {
    /// Loads every app's credentials, each by its provider; the first problem fails
    /// start-up. Connects lazily.
    pub fn new(apps: &BTreeMap<String, AppConfig>) -> Result<Providers, LoadError> {
        Providers::with_options(apps, Options::default())
    }

    pub fn with_options(
        apps: &BTreeMap<String, AppConfig>,
        options: Options,
    ) -> Result<Providers, LoadError> {
        let undelivered = Reports::new();
        let registry = Registry::new(apps, options.timings.clone(), &|config| {
            load(config, &options, &undelivered.sender)
        })?;
        Ok(Providers {
            registry,
            options,
            unregistered: Reports::new(),
            reports_wanted: AtomicBool::new(false),
            undelivered,
        })
    }

    /// Applies a reloaded config (see `Registry::reload`); returns the names of the apps
    /// rebuilt, added or removed.
    pub fn reload(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Vec<String>, LoadError> {
        let changed = self.registry.reload(apps, &|config| {
            load(config, &self.options, &self.undelivered.sender)
        })?;
        if self.reports_wanted.load(Ordering::SeqCst) {
            self.registry.start_reporters(&self.unregistered.sender);
        }
        Ok(changed)
    }
}

/// An app's client, by its provider.
pub fn load(
    config: &AppConfig,
    options: &Options,
    undelivered: &mpsc::UnboundedSender<Vec<Undelivered>>,
) -> Result<Box<dyn AppClient>, LoadError> {
    let timings = &options.timings;
    match config.provider() {
        Provider::Apns => apns::load(config, timings, &options.apns, undelivered),
        Provider::Fcm => fcm::load(config, timings, &options.fcm),
        Provider::Webpush => webpush::load(config, timings),
    }
}

impl Transport for Providers {
    fn send<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Delivery> {
        Box::pin(self.registry.deliver(n))
    }

    fn health(&self) -> Vec<(String, Result<(), String>)> {
        self.registry.health()
    }

    fn open_connections(&self) -> Vec<(String, usize)> {
        self.registry.open_connections()
    }

    fn paused(&self) -> Vec<Pause> {
        self.registry.paused()
    }

    fn reload(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Vec<String>, String> {
        Providers::reload(self, apps).map_err(|e| e.to_string())
    }

    /// What the apps' reporters found (only APNs's binary feedback service reports on
    /// its own); they start with the first call.
    fn unregistered(&self) -> BoxFuture<'_, Vec<Unregistered>> {
        if !self.reports_wanted.swap(true, Ordering::SeqCst) {
            self.registry.start_reporters(&self.unregistered.sender);
        }
        Box::pin(self.unregistered.next())
    }

    /// Only APNs's binary protocol finds rows undelivered after it reported them sent.
    fn undelivered(&self) -> BoxFuture<'_, Vec<Undelivered>> {
        Box::pin(self.undelivered.next())
    }

    fn manage_channel<'a>(
        &'a self,
        app: &'a str,
        op: &'a ChannelOp,
    ) -> BoxFuture<'a, ChannelAnswer> {
        Box::pin(self.registry.manage_channel(app, op))
    }
}

/// A channel whose receiving end is taken by one caller at a time.
struct Reports<T> {
    sender: mpsc::UnboundedSender<Vec<T>>,
    receiver: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<T>>>,
}

impl<T> Reports<T> {
    fn new() -> Reports<T> {
        let (sender, receiver) = mpsc::unbounded_channel();
        Reports {
            sender,
            receiver: tokio::sync::Mutex::new(receiver),
        }
    }

    async fn next(&self) -> Vec<T> {
        match self.receiver.lock().await.recv().await {
            Some(reports) => reports,
            // `self` holds a sender: the channel never closes while it lives.
            None => futures::future::pending().await,
        }
    }
}

/// Sends one push for `app` without a database and returns the service's answer as it
/// is (`pgpushd send`). Errors: the credentials, a row the service would refuse, no
/// connection.
pub async fn send_one(app: &AppConfig, n: &Notification) -> anyhow::Result<OneAnswer> {
    one_off(app)?.send_one(n).await
}

/// One request to `app`'s channel management API, without the daemon (`pgpushd channels`).
pub async fn manage_channel(app: &AppConfig, op: &ChannelOp) -> anyhow::Result<ChannelAnswer> {
    Ok(one_off(app)?.manage_channel(op).await)
}

/// `app`'s client for one request from a command: one connection, nothing reported.
fn one_off(app: &AppConfig) -> Result<Box<dyn AppClient>, LoadError> {
    let mut config = app.clone();
    config.connections = 1;
    let (undelivered, _) = mpsc::unbounded_channel();
    load(&config, &Options::default(), &undelivered)
}

/// Loads every app's credentials, as `pgpushd check-config` does; one line per problem,
/// none when all is well.
pub fn check(config: &Config) -> Vec<String> {
    let options = Options::default();
    let (undelivered, _) = mpsc::unbounded_channel();
    config
        .apps
        .values()
        .filter_map(|app| load(app, &options, &undelivered).err())
        .map(|e| e.to_string())
        .collect()
}
