//! Every app of the config, whatever its service, by name: its client ([`AppClient`]),
//! its [`AppGate`], and what it was built from. A row's attempt goes through its app's
//! gate to its client. SIGHUP's reload rebuilds only the apps whose config or files
//! changed (the others keep their connections), and changes nothing unless every app
//! loads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

/// How long a channel of an app this daemon does not have waits (another daemon, with
/// another config, may have it).
const UNKNOWN_APP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

use super::{AppClient, AppGate, LoadError, Timings};
use crate::channels::{ChannelAnswer, ChannelError, ChannelOp};
use crate::config::{AppConfig, Fingerprint};
use crate::transport::{short_token, Delivery, Notification, Pause, Unregistered};

/// How an app's client is built from its section (`providers::load`).
pub type Load<'a> = &'a dyn Fn(&AppConfig) -> Result<Box<dyn AppClient>, LoadError>;

pub struct Registry {
    /// Behind a lock so SIGHUP can swap apps; requests clone the `Arc` and let go.
    apps: RwLock<BTreeMap<String, Arc<Loaded>>>,
    timings: Timings,
}

/// An app, its gate, and what it was built from, to tell on reload whether anything
/// changed.
pub struct Loaded {
    pub client: Box<dyn AppClient>,
    pub gate: AppGate,
    fingerprint: Fingerprint,
    /// The app's reporter once started; it stops when the app is dropped (removed, or
    /// rebuilt by a reload, which starts the new one's).
    reporter: Mutex<Option<DropGuard>>,
}

impl Registry {
    /// Loads every app; the first problem fails. Connects lazily.
    pub fn new(
        apps: &BTreeMap<String, AppConfig>,
        timings: Timings,
        load: Load<'_>,
    ) -> Result<Registry, LoadError> {
        let registry = Registry {
            apps: RwLock::default(),
            timings,
        };
        registry.reload(apps, load)?;
        Ok(registry)
    }

    /// Applies a reloaded config: apps whose config and files are unchanged keep their
    /// clients and connections; changed and new apps are built afresh (requests in
    /// flight on the old ones finish there); removed apps go. Nothing changes unless
    /// every app loads. Returns the names of the apps rebuilt, added or removed.
    pub fn reload(
        &self,
        apps: &BTreeMap<String, AppConfig>,
        load: Load<'_>,
    ) -> Result<Vec<String>, LoadError> {
        let current = self.apps.read().unwrap().clone();
        let mut next = BTreeMap::new();
        let mut changed = Vec::new();
        for (name, config) in apps {
            // Fingerprint first: a file replaced between the two reads is then seen as
            // changed at the next reload rather than missed.
            let fingerprint = Fingerprint::of(config);
            let app = match current.get(name) {
                Some(old) if old.fingerprint == fingerprint => old.clone(),
                _ => {
                    changed.push(name.clone());
                    Arc::new(Loaded {
                        client: load(config)?,
                        gate: self.gate(config),
                        fingerprint,
                        reporter: Mutex::new(None),
                    })
                }
            };
            next.insert(name.clone(), app);
        }
        changed.extend(current.keys().filter(|n| !next.contains_key(*n)).cloned());
        *self.apps.write().unwrap() = next;
        Ok(changed)
    }

    fn gate(&self, config: &AppConfig) -> AppGate {
        AppGate::new(
            &config.name,
            config.provider().service(),
            self.timings.pause_backoff_base,
            self.timings.pause_backoff_max,
            config.request_timeout,
        )
    }

    pub fn get(&self, app: &str) -> Option<Arc<Loaded>> {
        self.apps.read().unwrap().get(app).cloned()
    }

    /// One attempt for one row, through its app's gate. A row for an app this config
    /// lacks is a transient failure, not the row's: during a rolling upgrade another
    /// daemon (or this one, after a reload) may have the app, so the row backs off and
    /// fails only after `max_attempts`.
    pub async fn deliver(&self, n: &Notification) -> Delivery {
        let Some(loaded) = self.get(&n.app) else {
            return Delivery::retry(format!(
                "unknown app {:?}: no [apps.{}] section in this daemon's config",
                n.app, n.app
            ));
        };
        if n.broadcast.is_some() && !loaded.client.broadcasts() {
            return Delivery::rejected(super::NO_CHANNELS);
        }
        let delivery = loaded
            .gate
            .attempt(n.target(), loaded.client.exchange(n))
            .await;
        debug!(app = %n.app, id = n.id, token = short_token(n.target()),
               outcome = ?delivery, "push attempt");
        delivery
    }

    /// One request to `app`'s channel management API.
    pub async fn manage_channel(&self, app: &str, op: &ChannelOp) -> ChannelAnswer {
        let Some(loaded) = self.get(app) else {
            return Err(ChannelError::Deferred {
                reason: format!(
                    "unknown app {app:?}: no [apps.{app}] section in this daemon's config"
                ),
                after: UNKNOWN_APP_WAIT,
            });
        };
        loaded.client.manage_channel(op).await
    }

    /// Per app: `Err` while it is paused or no connection can be had.
    pub fn health(&self) -> Vec<(String, Result<(), String>)> {
        self.each(|l| l.gate.health().and_then(|()| l.client.health()))
    }

    pub fn open_connections(&self) -> Vec<(String, usize)> {
        self.each(|l| l.client.open_connections())
    }

    pub fn paused(&self) -> Vec<Pause> {
        let apps = self.apps.read().unwrap();
        apps.values()
            .flat_map(|l| l.gate.pause().into_iter().chain(l.client.paused_origins()))
            .collect()
    }

    /// Starts the reporter of every app that has one and whose reporter is not running.
    pub fn start_reporters(&self, sink: &mpsc::UnboundedSender<Vec<Unregistered>>) {
        for loaded in self.apps.read().unwrap().values() {
            let mut running = loaded.reporter.lock().unwrap();
            if running.is_some() {
                continue;
            }
            if let Some(reporter) = loaded.client.reporter() {
                let stop = CancellationToken::new();
                tokio::spawn(reporter(sink.clone(), stop.clone()));
                *running = Some(stop.drop_guard());
            }
        }
    }

    fn each<T>(&self, f: impl Fn(&Loaded) -> T) -> Vec<(String, T)> {
        let apps = self.apps.read().unwrap();
        apps.iter().map(|(name, l)| (name.clone(), f(l))).collect()
    }
}
