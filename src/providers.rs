//! The push services side by side: [`Providers`] is the [`Transport`] the daemon, `main`
//! and the demo use. It holds the APNs transport and FCM's, routes each row by its app's
//! provider, and merges what both report (health, connections, unregistered tokens,
//! undelivered rows). A reload applies to both or to neither.

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use crate::apns::Apns;
use crate::config::{AppConfig, Config};
use crate::fcm::Fcm;
use crate::transport::Pause;
use crate::transport::{Delivery, Notification, Transport, Undelivered, Unregistered};

/// Loading an app failed; the message names the app and the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Apns(#[from] crate::apns::LoadError),
    #[error(transparent)]
    Fcm(#[from] crate::fcm::LoadError),
}

pub struct Providers {
    apns: Apns,
    fcm: Fcm,
}

impl Providers {
    /// Loads every app's credentials, each by its provider; the first problem fails
    /// start-up. Connects lazily.
    pub fn new(apps: &BTreeMap<String, AppConfig>) -> Result<Providers, LoadError> {
        Ok(Providers::from_parts(Apns::new(apps)?, Fcm::new(apps)?))
    }

    /// Two transports built with their own options (tests, the benchmark).
    pub fn from_parts(apns: Apns, fcm: Fcm) -> Providers {
        Providers { apns, fcm }
    }

    pub fn apns(&self) -> &Apns {
        &self.apns
    }

    pub fn fcm(&self) -> &Fcm {
        &self.fcm
    }
}

impl Transport for Providers {
    /// An app FCM does not have goes to APNs, which also answers for apps nobody has.
    fn send<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Delivery> {
        match self.fcm.has(&n.app) {
            true => Box::pin(self.fcm.deliver(n)),
            false => Box::pin(self.apns.deliver(n)),
        }
    }

    fn health(&self) -> Vec<(String, Result<(), String>)> {
        let mut all = self.apns.health();
        all.extend(Transport::health(&self.fcm));
        all
    }

    fn open_connections(&self) -> Vec<(String, usize)> {
        let mut all = Transport::open_connections(&self.apns);
        all.extend(Transport::open_connections(&self.fcm));
        all
    }

    fn paused(&self) -> Vec<Pause> {
        let mut all = Transport::paused(&self.apns);
        all.extend(Transport::paused(&self.fcm));
        all
    }

    /// FCM's apps are loaded first and put in use only once APNs's have loaded too.
    fn reload(&self, apps: &BTreeMap<String, AppConfig>) -> Result<Vec<String>, String> {
        let staged = self.fcm.stage(apps).map_err(|e| e.to_string())?;
        let mut changed = self.apns.reload(apps).map_err(|e| e.to_string())?;
        changed.extend(staged.apply());
        changed.sort();
        Ok(changed)
    }

    /// Only APNs reports tokens on its own (the binary protocol's feedback service).
    fn unregistered(&self) -> BoxFuture<'_, Vec<Unregistered>> {
        Box::pin(self.apns.unregistered())
    }

    /// Only APNs's binary protocol finds rows undelivered after it reported them sent.
    fn undelivered(&self) -> BoxFuture<'_, Vec<Undelivered>> {
        Box::pin(self.apns.undelivered())
    }
}

/// Loads every app's credentials, as `pgpushd check-config` does; one line per problem.
pub fn check(config: &Config) -> Vec<String> {
    let mut problems = crate::apns::check(config);
    problems.extend(crate::fcm::check(config));
    problems
}
