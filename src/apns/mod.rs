//! APNs: the client for every app of the config, behind [`Transport`].
//!
//! [`Apns`] holds one client per `[apps.NAME]` section and routes each notification by
//! its `app` to that app's protocol: [`http2`] (the provider API) or [`binary`] (the
//! retired binary protocol). What both protocols use lives here: client certificates
//! ([`identity`]), the push types ([`push_type`]), Apple's reasons
//! ([`reason`]), the provider token ([`provider_token`], HTTP/2's token auth) and what can
//! go wrong loading them ([`error`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{AppConfig, Config, Fingerprint, Protocol, Provider};
use crate::transport::Pause;
use crate::transport::{Delivery, Notification, Transport, Undelivered, Unregistered};

pub mod binary;
pub mod error;
pub mod http2;
pub mod identity;
pub mod options;
pub mod provider_token;
pub mod push_type;
pub mod reason;

use binary::BinaryApp;
pub use error::LoadError;
use http2::Http2App;
pub use http2::{send_one, OneAnswer};
pub use options::Options;

/// The APNs transport for every app of the config, each over its own protocol.
pub struct Apns {
    /// Behind a lock so SIGHUP can swap apps; requests clone the `Arc` and let go.
    apps: RwLock<BTreeMap<String, Arc<Loaded>>>,
    options: Options,
    feedback: Feedback,
    /// Rows the binary apps reported sent and then found undelivered.
    undelivered: Reports<Undelivered>,
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

/// An app and what it was built from, to tell on reload whether anything changed.
struct Loaded {
    client: Client,
    fingerprint: Fingerprint,
    /// The app's feedback poller once started; it stops when the app is dropped (removed,
    /// or rebuilt by a reload, which starts the new one's).
    poller: Mutex<Option<DropGuard>>,
}

/// Tokens the apps' feedback services report, on their way to whoever records them.
struct Feedback {
    sender: mpsc::UnboundedSender<Vec<Unregistered>>,
    receiver: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<Unregistered>>>,
    /// Set by the first [`Transport::unregistered`] call: from then on every app's poller
    /// runs (before, nobody would record what they took from the service).
    wanted: AtomicBool,
}

impl Feedback {
    fn new() -> Feedback {
        let (sender, receiver) = mpsc::unbounded_channel();
        Feedback {
            sender,
            receiver: tokio::sync::Mutex::new(receiver),
            wanted: AtomicBool::new(false),
        }
    }
}

/// One app's client, by `protocol`.
enum Client {
    Http2(Box<Http2App>),
    Binary(Box<BinaryApp>),
}

impl Client {
    fn new(
        config: &AppConfig,
        options: &Options,
        undelivered: &mpsc::UnboundedSender<Vec<Undelivered>>,
    ) -> Result<Client, LoadError> {
        match config.protocol {
            Protocol::Http2 => {
                Http2App::new(config, options).map(|app| Client::Http2(Box::new(app)))
            }
            Protocol::Binary => BinaryApp::new(config, options, undelivered.clone())
                .map(|app| Client::Binary(Box::new(app))),
        }
    }

    fn health(&self) -> Result<(), String> {
        match self {
            Client::Http2(app) => app.health(),
            Client::Binary(app) => app.health(),
        }
    }

    fn open_connections(&self) -> usize {
        match self {
            Client::Http2(app) => app.open_connections(),
            Client::Binary(app) => app.open_connections(),
        }
    }

    /// The binary protocol has no credential gate: a refused certificate fails the TLS
    /// handshake, which is the connection's backoff.
    fn pause(&self) -> Option<Pause> {
        match self {
            Client::Http2(app) => app.gate.pause(),
            Client::Binary(_) => None,
        }
    }

    fn feedback_poller(&self) -> Option<binary::feedback::FeedbackPoller> {
        match self {
            Client::Http2(_) => None,
            Client::Binary(app) => app.feedback_poller(),
        }
    }

    async fn deliver(&self, n: &Notification) -> Delivery {
        match self {
            Client::Http2(app) => app.deliver(n).await,
            Client::Binary(app) => app.deliver(n).await,
        }
    }
}

impl Apns {
    /// Loads every APNs app's credentials (apps of other providers are not its own);
    /// the first problem fails start-up. Connects lazily.
    pub fn new(apps: &BTreeMap<String, AppConfig>) -> Result<Apns, LoadError> {
        Apns::with_options(apps, Options::default())
    }

    pub fn with_options(
        apps: &BTreeMap<String, AppConfig>,
        options: Options,
    ) -> Result<Apns, LoadError> {
        let undelivered = Reports::new();
        let apps = apns_apps(apps)
            .map(|(name, config)| {
                let loaded = load(config, &options, &undelivered.sender)?;
                Ok((name.clone(), Arc::new(loaded)))
            })
            .collect::<Result<_, LoadError>>()?;
        Ok(Apns {
            apps: RwLock::new(apps),
            options,
            feedback: Feedback::new(),
            undelivered,
        })
    }

    /// Applies a reloaded config: apps whose config and files are unchanged keep their
    /// connections; changed and new apps are built afresh (requests in flight on the old
    /// ones finish there); removed apps go. Nothing changes unless every app loads.
    /// Returns the names of the apps rebuilt, added or removed.
    pub fn reload(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Vec<String>, LoadError> {
        let current = self.apps.read().unwrap().clone();
        let mut next = BTreeMap::new();
        let mut changed = Vec::new();
        for (name, config) in apns_apps(apps) {
            let fingerprint = Fingerprint::of(config);
            let app = match current.get(name) {
                Some(old) if old.fingerprint == fingerprint => old.clone(),
                _ => {
                    changed.push(name.clone());
                    Arc::new(load(config, &self.options, &self.undelivered.sender)?)
                }
            };
            next.insert(name.clone(), app);
        }
        changed.extend(current.keys().filter(|n| !next.contains_key(*n)).cloned());
        *self.apps.write().unwrap() = next;
        if self.feedback.wanted.load(Ordering::SeqCst) {
            self.start_pollers();
        }
        Ok(changed)
    }

    /// Starts the feedback poller of every app that has one and is not polling yet.
    fn start_pollers(&self) {
        for loaded in self.apps.read().unwrap().values() {
            let mut running = loaded.poller.lock().unwrap();
            if running.is_some() {
                continue;
            }
            if let Some(poller) = loaded.client.feedback_poller() {
                let stop = CancellationToken::new();
                tokio::spawn(poller.run(self.feedback.sender.clone(), stop.clone()));
                *running = Some(stop.drop_guard());
            }
        }
    }

    /// Tokens the feedback services reported, once some are: see
    /// [`Transport::unregistered`].
    pub async fn unregistered(&self) -> Vec<Unregistered> {
        if !self.feedback.wanted.swap(true, Ordering::SeqCst) {
            self.start_pollers();
        }
        match self.feedback.receiver.lock().await.recv().await {
            Some(tokens) => tokens,
            // `self` holds a sender: the channel never closes while it lives.
            None => futures::future::pending().await,
        }
    }

    /// Rows reported sent that were not delivered after all: see
    /// [`Transport::undelivered`].
    pub async fn undelivered(&self) -> Vec<Undelivered> {
        self.undelivered.next().await
    }

    /// Per app: `Err` while APNs refuses its credentials or no connection can be had.
    pub fn health(&self) -> Vec<(String, Result<(), String>)> {
        self.apps
            .read()
            .unwrap()
            .iter()
            .map(|(name, loaded)| (name.clone(), loaded.client.health()))
            .collect()
    }

    /// One attempt for one row. A row for an app this config lacks is a transient
    /// failure, not the row's: during a rolling upgrade another daemon (or this one,
    /// after a reload) may have the app, so the row backs off and fails only after
    /// `max_attempts`.
    pub async fn deliver(&self, n: &Notification) -> Delivery {
        let loaded = self.apps.read().unwrap().get(&n.app).cloned();
        match loaded {
            Some(loaded) => loaded.client.deliver(n).await,
            None => Delivery::retry(format!(
                "unknown app {:?}: no [apps.{}] section in this daemon's config",
                n.app, n.app
            )),
        }
    }
}

impl Transport for Apns {
    fn send<'a>(&'a self, notification: &'a Notification) -> BoxFuture<'a, Delivery> {
        Box::pin(self.deliver(notification))
    }

    fn health(&self) -> Vec<(String, Result<(), String>)> {
        Apns::health(self)
    }

    fn open_connections(&self) -> Vec<(String, usize)> {
        self.apps
            .read()
            .unwrap()
            .iter()
            .map(|(name, loaded)| (name.clone(), loaded.client.open_connections()))
            .collect()
    }

    fn paused(&self) -> Vec<Pause> {
        let apps = self.apps.read().unwrap();
        apps.values().filter_map(|l| l.client.pause()).collect()
    }

    fn reload(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Vec<String>, String> {
        Apns::reload(self, apps).map_err(|e| e.to_string())
    }

    fn unregistered(&self) -> BoxFuture<'_, Vec<Unregistered>> {
        Box::pin(Apns::unregistered(self))
    }

    fn undelivered(&self) -> BoxFuture<'_, Vec<Undelivered>> {
        Box::pin(Apns::undelivered(self))
    }
}

/// Loads every key and certificate of every APNs app, as `pgpushd check-config` does; one line
/// per problem, none when all is well.
pub fn check(config: &Config) -> Vec<String> {
    let options = Options::default();
    let (undelivered, _) = mpsc::unbounded_channel();
    apns_apps(&config.apps)
        .filter_map(|(_, app)| {
            Client::new(app, &options, &undelivered)
                .err()
                .map(|e| e.to_string())
        })
        .collect()
}

fn apns_apps(apps: &BTreeMap<String, AppConfig>) -> impl Iterator<Item = (&String, &AppConfig)> {
    apps.iter().filter(|(_, a)| a.provider() == Provider::Apns)
}

fn load(
    config: &AppConfig,
    options: &Options,
    undelivered: &mpsc::UnboundedSender<Vec<Undelivered>>,
) -> Result<Loaded, LoadError> {
    // Fingerprint first: a file replaced between the two reads is then seen as changed
    // at the next reload rather than missed.
    let fingerprint = Fingerprint::of(config);
    Ok(Loaded {
        client: Client::new(config, options, undelivered)?,
        fingerprint,
        poller: Mutex::new(None),
    })
}

#[cfg(test)]
mod tests;
