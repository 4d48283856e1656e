//! Subscriptions, made as a browser makes them (`pushManager.subscribe()`): a P-256 key
//! pair whose private half the emulator keeps to open what it is sent, a 16-byte auth
//! secret, an id naming the push resource `/push/<id>`, and optionally the application
//! server key it is bound to. [`Subscription::to_json`] is what `PushSubscription.toJSON()`
//! gives an application. [`Subscriptions`] is the emulator's table of them, with the
//! ids that are gone (unsubscribed or expired).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use serde::Serialize;

use super::ece::{self, AUTH_SECRET_LEN, PUBLIC_KEY_LEN};

/// One subscription: what the browser holds (its private key included).
#[derive(Clone)]
pub struct Subscription {
    /// The last path segment of the endpoint.
    pub id: String,
    /// `https://127.0.0.1:PORT/push/<id>`.
    pub endpoint: String,
    /// `p256dh`: the uncompressed public key (65 bytes).
    pub public_key: Vec<u8>,
    pub auth_secret: [u8; AUTH_SECRET_LEN],
    /// The application server key (65 bytes) it was made with, if any: pushes signed
    /// with another VAPID key are refused 403.
    pub application_server_key: Option<Vec<u8>>,
    private_key: PKey<Private>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint)
            .field("bound", &self.application_server_key.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Json<'a> {
    endpoint: &'a str,
    #[serde(rename = "expirationTime")]
    expiration_time: Option<u64>,
    keys: Keys,
}

#[derive(Serialize)]
struct Keys {
    p256dh: String,
    auth: String,
}

impl Subscription {
    /// A new subscription to `origin`'s push resource (`origin` as
    /// `https://host:port`). `application_server_key`: 65 bytes, an uncompressed P-256
    /// point, or an error.
    pub fn generate(
        origin: &str,
        application_server_key: Option<&[u8]>,
    ) -> anyhow::Result<Subscription> {
        if let Some(key) = application_server_key {
            anyhow::ensure!(
                key.len() == PUBLIC_KEY_LEN && ece::public_key(key).is_ok(),
                "the application server key must be an uncompressed P-256 public key \
                 (65 bytes), not {} bytes that are not one",
                key.len()
            );
        }
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
        let private_key = PKey::from_ec_key(EcKey::generate(&group)?)?;
        let public_key = ece::public_bytes(&private_key)?;
        let mut auth_secret = [0u8; AUTH_SECRET_LEN];
        openssl::rand::rand_bytes(&mut auth_secret)?;
        let mut id = [0u8; 16];
        openssl::rand::rand_bytes(&mut id)?;
        let id = hex::encode(id);
        Ok(Subscription {
            endpoint: format!("{origin}/push/{id}"),
            id,
            public_key,
            auth_secret,
            application_server_key: application_server_key.map(<[u8]>::to_vec),
            private_key,
        })
    }

    /// Exactly what `PushSubscription.toJSON()` gives, serialized:
    /// `{"endpoint":...,"expirationTime":null,"keys":{"p256dh":...,"auth":...}}`, the keys
    /// base64url without padding.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Json {
            endpoint: &self.endpoint,
            expiration_time: None,
            keys: Keys {
                p256dh: URL_SAFE_NO_PAD.encode(&self.public_key),
                auth: URL_SAFE_NO_PAD.encode(self.auth_secret),
            },
        })
        .expect("a subscription serializes")
    }

    /// The subscription's private key, PKCS#8 PEM (to open its messages elsewhere).
    pub fn private_key_pem(&self) -> Vec<u8> {
        self.private_key
            .private_key_to_pem_pkcs8()
            .expect("a key encodes to PEM")
    }

    /// Opens a push message sent to this subscription (RFC 8291).
    pub fn decrypt(&self, body: &[u8]) -> Result<ece::Opened, ece::EceError> {
        ece::decrypt(body, &self.private_key, &self.public_key, &self.auth_secret)
    }
}

/// What the table knows of an id.
#[derive(Debug, Clone)]
pub enum Lookup {
    Active(Arc<Subscription>),
    /// Unsubscribed or expired: 410.
    Gone,
    /// Never made here: 404.
    Unknown,
}

/// The emulator's subscriptions, and the ids answered 410.
#[derive(Default)]
pub struct Subscriptions {
    inner: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    active: HashMap<String, Arc<Subscription>>,
    gone: HashSet<String>,
}

impl Subscriptions {
    /// `gone`: ids answered 410 from the start.
    pub fn new(gone: &[String]) -> Subscriptions {
        Subscriptions {
            inner: RwLock::new(Table {
                active: HashMap::new(),
                gone: gone.iter().cloned().collect(),
            }),
        }
    }

    pub fn add(&self, subscription: Subscription) -> Arc<Subscription> {
        let subscription = Arc::new(subscription);
        let mut table = self.inner.write().unwrap_or_else(|e| e.into_inner());
        table.gone.remove(&subscription.id);
        table
            .active
            .insert(subscription.id.clone(), subscription.clone());
        subscription
    }

    pub fn lookup(&self, id: &str) -> Lookup {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if table.gone.contains(id) {
            Lookup::Gone
        } else if let Some(subscription) = table.active.get(id) {
            Lookup::Active(subscription.clone())
        } else {
            Lookup::Unknown
        }
    }

    /// From now on `id` is answered 410; whether it was an active subscription.
    pub fn unsubscribe(&self, id: &str) -> bool {
        let mut table = self.inner.write().unwrap_or_else(|e| e.into_inner());
        table.gone.insert(id.to_owned());
        table.active.remove(id).is_some()
    }

    /// The active subscription `id`, if it is one.
    pub fn get(&self, id: &str) -> Option<Arc<Subscription>> {
        match self.lookup(id) {
            Lookup::Active(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const ORIGIN: &str = "https://127.0.0.1:8443";

    #[test]
    fn json_is_what_browsers_give() {
        let s = Subscription::generate(ORIGIN, None).unwrap();
        let text = s.to_json();
        // Browser order: endpoint, expirationTime, keys (p256dh, auth).
        let endpoint_at = text.find("\"endpoint\"").unwrap();
        let expiration_at = text.find("\"expirationTime\":null").unwrap();
        let p256dh_at = text.find("\"p256dh\"").unwrap();
        let auth_at = text.find("\"auth\"").unwrap();
        assert!(endpoint_at < expiration_at && expiration_at < p256dh_at && p256dh_at < auth_at);
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["endpoint"], format!("{ORIGIN}/push/{}", s.id));
        let p256dh = json["keys"]["p256dh"].as_str().unwrap();
        let auth = json["keys"]["auth"].as_str().unwrap();
        assert!(!p256dh.contains('=') && !auth.contains('='));
        assert_eq!(URL_SAFE_NO_PAD.decode(p256dh).unwrap(), s.public_key);
        assert_eq!(s.public_key.len(), 65);
        assert_eq!(s.public_key[0], 4);
        assert_eq!(URL_SAFE_NO_PAD.decode(auth).unwrap().len(), 16);
        let other = Subscription::generate(ORIGIN, None).unwrap();
        assert_ne!(s.id, other.id);
        assert_ne!(s.auth_secret, other.auth_secret);
    }

    #[test]
    fn application_server_keys_must_be_points() {
        let bound = Subscription::generate(ORIGIN, Some(&[4; 65]));
        assert!(bound.is_err());
        let key = Subscription::generate(ORIGIN, None).unwrap().public_key;
        let bound = Subscription::generate(ORIGIN, Some(&key)).unwrap();
        assert_eq!(
            bound.application_server_key.as_deref(),
            Some(key.as_slice())
        );
        assert!(Subscription::generate(ORIGIN, Some(&key[..64])).is_err());
    }

    #[test]
    fn the_table_says_active_gone_or_unknown() {
        let table = Subscriptions::new(&["old".to_owned()]);
        let s = table.add(Subscription::generate(ORIGIN, None).unwrap());
        assert!(matches!(table.lookup(&s.id), Lookup::Active(_)));
        assert!(matches!(table.lookup("old"), Lookup::Gone));
        assert!(matches!(table.lookup("nope"), Lookup::Unknown));
        assert!(table.unsubscribe(&s.id));
        assert!(matches!(table.lookup(&s.id), Lookup::Gone));
        assert!(!table.unsubscribe("never"));
        assert!(matches!(table.lookup("never"), Lookup::Gone));
        assert!(table.get(&s.id).is_none());
    }
}
