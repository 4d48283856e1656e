//! APNs broadcast channels (iOS 18 Live Activities), as Apple's "Sending channel
//! management requests to APNs" and "Sending broadcast push notification requests to
//! APNs" describe them:
//!
//! - the channels themselves, per bundle id (one emulator is one environment): this
//!   module's `ChannelStore`, shared by both listeners and by the out-of-band methods
//!   on [`Emulator`](crate::Emulator);
//! - the channel management API, on its own listener as Apple has it on its own host and
//!   port (`api-manage-broadcast[.sandbox].push.apple.com`, 2195 sandbox / 2196
//!   production): [`management`];
//! - broadcast publishing, `POST /4/broadcasts/apps/<bundle>` on the push listener:
//!   [`broadcast`];
//! - what both answer (`apns-request-id`, JSON errors): `reply`.
//!
//! Where the live service was seen to differ from Apple's pages, the emulator does as the
//! live service does, and says so where it does it.

pub mod broadcast;
pub mod management;
pub(crate) mod reply;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

use crate::push_type::PushType;
use crate::reason;
use crate::validate::{AuthMode, Policy, Rejection};

/// "You can maintain up to 10,000 channels for your app in the development and
/// production environment, respectively."
pub const DEFAULT_CHANNEL_LIMIT: usize = 10_000;

/// The longest `apns-channel-id` accepted, in characters; longer is `BadChannelId` ("it's
/// greater than the allowed length"). Apple names no length and asks clients not to
/// assume one; live ids are 24 characters (16 bytes in base64), so 64 leaves room.
pub const MAX_CHANNEL_ID_LEN: usize = 64;

/// Random bytes in a new channel id: live ids are 24 characters of standard base64.
const CHANNEL_ID_BYTES: usize = 16;

/// `message-storage-policy` 0: "No Message Stored".
pub const POLICY_NO_MESSAGE_STORED: u8 = 0;
/// `message-storage-policy` 1: "Most Recent Message Stored".
pub const POLICY_MOST_RECENT_MESSAGE_STORED: u8 = 1;

/// What the store knows of a channel id, for one bundle id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// It exists, with this storage policy.
    Active(u8),
    /// It existed and was deleted (ids are never reused).
    Deleted,
    /// It was never made for this bundle id.
    Unknown,
}

/// A create refused because the bundle has `limit` channels already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitReached;

#[derive(Default)]
struct Bundle {
    /// id -> (creation order, policy).
    live: HashMap<String, (u64, u8)>,
    deleted: HashSet<String>,
}

#[derive(Default)]
struct Store {
    bundles: HashMap<String, Bundle>,
    /// Every id ever made, for any bundle: none is made twice.
    issued: HashSet<String>,
    next_order: u64,
}

/// The channels of every bundle id, behind one lock held only for map operations.
#[derive(Default)]
pub(crate) struct ChannelStore {
    store: Mutex<Store>,
}

impl ChannelStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a channel with a fresh random id, unless `limit` (if any) channels of
    /// `bundle` exist already.
    pub fn create(
        &self,
        bundle: &str,
        policy: u8,
        limit: Option<usize>,
    ) -> Result<String, LimitReached> {
        let mut store = self.lock();
        let store = &mut *store;
        let count = store.bundles.get(bundle).map_or(0, |b| b.live.len());
        if limit.is_some_and(|limit| count >= limit) {
            return Err(LimitReached);
        }
        let id = loop {
            let id = new_channel_id();
            if store.issued.insert(id.clone()) {
                break id;
            }
        };
        store.next_order += 1;
        let order = store.next_order;
        store
            .bundles
            .entry(bundle.to_owned())
            .or_default()
            .live
            .insert(id.clone(), (order, policy));
        Ok(id)
    }

    /// How many channels of `bundle` exist.
    pub fn count(&self, bundle: &str) -> usize {
        self.lock().bundles.get(bundle).map_or(0, |b| b.live.len())
    }

    pub fn lookup(&self, bundle: &str, id: &str) -> Lookup {
        let store = self.lock();
        match store.bundles.get(bundle) {
            Some(b) => match b.live.get(id) {
                Some((_, policy)) => Lookup::Active(*policy),
                None if b.deleted.contains(id) => Lookup::Deleted,
                None => Lookup::Unknown,
            },
            None => Lookup::Unknown,
        }
    }

    /// Deletes an existing channel; `false` if `bundle` has none with this id.
    pub fn delete(&self, bundle: &str, id: &str) -> bool {
        let mut store = self.lock();
        let Some(b) = store.bundles.get_mut(bundle) else {
            return false;
        };
        if b.live.remove(id).is_none() {
            return false;
        }
        b.deleted.insert(id.to_owned());
        true
    }

    /// The existing channels of `bundle` (id, policy), oldest first.
    pub fn list(&self, bundle: &str) -> Vec<(String, u8)> {
        let store = self.lock();
        let Some(b) = store.bundles.get(bundle) else {
            return Vec::new();
        };
        let mut channels: Vec<_> = b.live.iter().collect();
        channels.sort_by_key(|(_, (order, _))| *order);
        channels
            .into_iter()
            .map(|(id, (_, policy))| (id.clone(), *policy))
            .collect()
    }
}

/// 16 random bytes in standard base64 (24 characters, `+`, `/` and `=` included), as
/// live channel ids are.
fn new_channel_id() -> String {
    STANDARD.encode(rand::random::<[u8; CHANNEL_ID_BYTES]>())
}

/// Whether `id` could be a channel id: standard base64 (padded) of at least a byte, no
/// longer than [`MAX_CHANNEL_ID_LEN`]. Else the answer is `BadChannelId`.
pub fn is_channel_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CHANNEL_ID_LEN
        && STANDARD.decode(id).is_ok_and(|bytes| !bytes.is_empty())
}

/// The bundle id in a management or broadcast path, checked against what the emulator
/// serves. Apple's table (A3): `TopicDisallowed` (400) "Ensure that no push type suffix
/// is added to the bundle ID"; `TopicMismatch` (403) "The bundle IDs parsed from your
/// token or certificate don't include the topic present in the path".
///
/// A served bundle id (`EmulatorConfig::topic`) other than the path's is `TopicMismatch`
/// under every auth mode: under certificate auth it is the certificate's topic; under
/// token auth it stands for the team's only app (pushes answer `DeviceTokenNotForTopic`
/// there because a device is involved; channels have none).
pub(crate) fn check_bundle(bundle: &str, policy: &Policy) -> Result<(), Rejection> {
    let suffixed = PushType::all()
        .filter_map(PushType::topic_suffix)
        .any(|suffix| bundle.ends_with(suffix))
        || bundle.contains(".push-type.");
    if suffixed {
        return Err(reject(400, reason::TOPIC_DISALLOWED));
    }
    if let Some(served) = &policy.bundle {
        if served != bundle {
            return Err(reject(403, reason::TOPIC_MISMATCH));
        }
    }
    // Nothing more per auth mode: a provider token was checked before this, a client
    // certificate in the TLS handshake.
    Ok(())
}

pub(crate) const fn reject(status: u16, reason: &'static str) -> Rejection {
    Rejection { status, reason }
}

/// What both listeners check of a request's caller, in this order, once its path and
/// method are known: its provider token under token auth (`provider_token` is called with
/// the `authorization` header), the path's bundle id, its `apns-request-id`.
pub(crate) fn check_caller(
    headers: &HeaderMap,
    bundle: &str,
    policy: &Policy,
    provider_token: impl FnOnce(&HeaderValue) -> Result<(), Rejection>,
) -> Result<(), Rejection> {
    if policy.auth == AuthMode::Token {
        match headers.get(AUTHORIZATION) {
            Some(value) => provider_token(value)?,
            None => return Err(reject(403, reason::MISSING_PROVIDER_TOKEN)),
        }
    }
    check_bundle(bundle, policy)?;
    reply::check_request_id(headers)
}

/// The request's `apns-channel-id`: missing, malformed, or the id.
pub(crate) fn channel_id_header(headers: &HeaderMap) -> Result<String, Rejection> {
    let id = headers
        .get(reply::APNS_CHANNEL_ID)
        .ok_or(reject(400, reason::MISSING_CHANNEL_ID))?;
    if !is_channel_id(id.as_bytes()) {
        return Err(reject(400, reason::BAD_CHANNEL_ID));
    }
    Ok(id.to_str().expect("base64 is ASCII").to_owned())
}

/// A bundle id as it may appear in a path segment: not empty, no `/`, no blanks.
fn is_bundle_segment(bundle: &str) -> bool {
    !bundle.is_empty()
        && !bundle
            .bytes()
            .any(|b| b == b'/' || b.is_ascii_whitespace() || b.is_ascii_control())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::AuthMode;

    #[test]
    fn ids_look_like_live_ones_and_are_never_reused() {
        let store = ChannelStore::default();
        let a = store.create("com.x", 1, None).unwrap();
        assert_eq!(a.len(), 24);
        assert!(is_channel_id(a.as_bytes()));
        assert_eq!(STANDARD.decode(&a).unwrap().len(), 16);
        let b = store.create("com.x", 0, None).unwrap();
        assert_ne!(a, b);
        assert_eq!(store.lookup("com.x", &a), Lookup::Active(1));
        assert_eq!(store.lookup("com.y", &a), Lookup::Unknown);
        assert_eq!(store.list("com.x"), [(a.clone(), 1), (b.clone(), 0)]);
        assert!(store.delete("com.x", &a));
        assert!(!store.delete("com.x", &a));
        assert!(!store.delete("com.y", &b));
        assert_eq!(store.lookup("com.x", &a), Lookup::Deleted);
        assert_eq!(store.list("com.x"), [(b, 0)]);
    }

    #[test]
    fn the_limit_counts_existing_channels_of_the_bundle() {
        let store = ChannelStore::default();
        let a = store.create("com.x", 0, Some(2)).unwrap();
        store.create("com.x", 0, Some(2)).unwrap();
        assert_eq!(store.create("com.x", 0, Some(2)), Err(LimitReached));
        assert!(store.create("com.y", 0, Some(2)).is_ok());
        assert!(
            store.create("com.x", 0, None).is_ok(),
            "out of band: no limit"
        );
        store.delete("com.x", &a);
        assert_eq!(store.create("com.x", 0, Some(2)), Err(LimitReached));
        assert_eq!(store.list("com.x").len(), 2);
    }

    #[test]
    fn channel_id_format() {
        for good in ["AAAAAAAAAAAAAAAAAAAAAA==", "dGVzdA==", "+/+/"] {
            assert!(is_channel_id(good.as_bytes()), "{good}");
        }
        let long = STANDARD.encode([7u8; 60]);
        for bad in ["", "not base64!", "dGVzdA", "-_-_", "====", long.as_str()] {
            assert!(!is_channel_id(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn bundles() {
        let open = Policy {
            bundle: None,
            auth: AuthMode::Token,
        };
        assert!(check_bundle("com.x", &open).is_ok());
        for bad in [
            "com.x.push-type.liveactivity",
            "com.x.voip",
            "com.x.push-type.y",
        ] {
            assert_eq!(
                check_bundle(bad, &open).unwrap_err().reason,
                "TopicDisallowed"
            );
        }
        let served = Policy {
            bundle: Some("com.x".into()),
            auth: AuthMode::Certificate,
        };
        assert!(check_bundle("com.x", &served).is_ok());
        let other = check_bundle("com.y", &served).unwrap_err();
        assert_eq!((other.status, other.reason), (403, "TopicMismatch"));
        assert!(is_bundle_segment("com.x"));
        assert!(!is_bundle_segment("com x") && !is_bundle_segment(""));
    }
}
