//! Firebase Cloud Messaging (HTTP v1), for apps with `provider = "fcm"`, behind
//! [`Transport`].
//!
//! [`Fcm`] holds one client per FCM app ([`app::FcmApp`]: its pool of long-lived HTTP/2
//! connections to FCM, its access tokens, its credential gate) and routes each row by its
//! app. The pieces that decide are pure and tested on their own:
//!
//! - [`service_account`]: the JSON key Google issues, loaded and checked;
//! - [`access_token`]: the signed assertion, the token endpoint's answer, when to renew;
//! - [`message`]: a row as a `messages:send` body, refused first where FCM would refuse;
//! - [`request`]: the whole request, the row's APNs-only columns refused;
//! - [`response`]: what FCM's answer means for the row.
//!
//! [`token_source`] gets and renews the access tokens (single flight, in the background);
//! [`options`] holds the timings not in the config; [`error`] what can go wrong loading.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;

use crate::config::{AppConfig, Config, Fingerprint, Provider};
use crate::transport::Pause;
use crate::transport::{Delivery, Notification, Transport};

pub mod access_token;
mod app;
pub mod error;
pub mod expiry;
pub mod message;
pub mod options;
pub mod request;
pub mod response;
mod send_one;
pub mod service_account;
pub mod token_source;

use app::FcmApp;
pub use error::LoadError;
pub use options::Options;
pub use send_one::{send_one, FcmAnswer};

/// The FCM transport for every FCM app of the config.
pub struct Fcm {
    /// Behind a lock so SIGHUP can swap apps; requests clone the `Arc` and let go.
    apps: RwLock<BTreeMap<String, Arc<Loaded>>>,
    options: Options,
}

/// An app and what it was built from, to tell on reload whether anything changed.
struct Loaded {
    client: FcmApp,
    fingerprint: Fingerprint,
}

/// A reload's apps, all loaded, not yet in use: [`Staged::apply`] swaps them in.
pub struct Staged<'a> {
    fcm: &'a Fcm,
    apps: BTreeMap<String, Arc<Loaded>>,
    changed: Vec<String>,
}

impl Staged<'_> {
    /// Puts the reloaded apps in use; returns the names of those rebuilt, added or removed.
    pub fn apply(self) -> Vec<String> {
        *self.fcm.apps.write().unwrap() = self.apps;
        self.changed
    }
}

impl Fcm {
    /// Loads every FCM app of `apps` (others are ignored); the first problem fails.
    /// Connects lazily.
    pub fn new(apps: &BTreeMap<String, AppConfig>) -> Result<Fcm, LoadError> {
        Fcm::with_options(apps, Options::default())
    }

    pub fn with_options(
        apps: &BTreeMap<String, AppConfig>,
        options: Options,
    ) -> Result<Fcm, LoadError> {
        let loaded = fcm_apps(apps)
            .map(|(name, config)| Ok((name.clone(), Arc::new(load(config, &options)?))))
            .collect::<Result<_, LoadError>>()?;
        Ok(Fcm {
            apps: RwLock::new(loaded),
            options,
        })
    }

    /// Loads a reloaded config's FCM apps without using them yet: unchanged apps (config
    /// and files) keep their clients and connections, changed and new ones are built.
    pub fn stage(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Staged<'_>, LoadError> {
        let current = self.apps.read().unwrap().clone();
        let mut next = BTreeMap::new();
        let mut changed = Vec::new();
        for (name, config) in fcm_apps(apps) {
            let fingerprint = Fingerprint::of(config);
            let app = match current.get(name) {
                Some(old) if old.fingerprint == fingerprint => old.clone(),
                _ => {
                    changed.push(name.clone());
                    Arc::new(load(config, &self.options)?)
                }
            };
            next.insert(name.clone(), app);
        }
        changed.extend(current.keys().filter(|n| !next.contains_key(*n)).cloned());
        Ok(Staged {
            fcm: self,
            apps: next,
            changed,
        })
    }

    /// Whether `app` is one of this transport's.
    pub fn has(&self, app: &str) -> bool {
        self.apps.read().unwrap().contains_key(app)
    }

    /// One attempt for one row. A row of an app this transport lacks is a transient
    /// failure, as for APNs (another daemon may have the app).
    pub async fn deliver(&self, n: &Notification) -> Delivery {
        let loaded = self.apps.read().unwrap().get(&n.app).cloned();
        match loaded {
            Some(loaded) => loaded.client.deliver(n).await,
            None => Delivery::retry(format!(
                "unknown app {:?}: no FCM [apps.{}] section in this daemon's config",
                n.app, n.app
            )),
        }
    }
}

impl Transport for Fcm {
    fn send<'a>(&'a self, notification: &'a Notification) -> BoxFuture<'a, Delivery> {
        Box::pin(self.deliver(notification))
    }

    fn health(&self) -> Vec<(String, Result<(), String>)> {
        self.apps
            .read()
            .unwrap()
            .iter()
            .map(|(name, loaded)| (name.clone(), loaded.client.health()))
            .collect()
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
        apps.values()
            .filter_map(|l| l.client.gate.pause())
            .collect()
    }

    fn reload(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Vec<String>, String> {
        Ok(self.stage(apps).map_err(|e| e.to_string())?.apply())
    }
}

/// Loads every FCM app's service account, as `pgpushd check-config` does; one line per
/// problem, none when all is well.
pub fn check(config: &Config) -> Vec<String> {
    let options = Options::default();
    fcm_apps(&config.apps)
        .filter_map(|(_, app)| FcmApp::new(app, &options).err().map(|e| e.to_string()))
        .collect()
}

fn fcm_apps(apps: &BTreeMap<String, AppConfig>) -> impl Iterator<Item = (&String, &AppConfig)> {
    apps.iter().filter(|(_, a)| a.provider() == Provider::Fcm)
}

fn load(config: &AppConfig, options: &Options) -> Result<Loaded, LoadError> {
    // Fingerprint first: a file replaced between the two reads is then seen as changed
    // at the next reload rather than missed.
    let fingerprint = Fingerprint::of(config);
    Ok(Loaded {
        client: FcmApp::new(config, options)?,
        fingerprint,
    })
}
