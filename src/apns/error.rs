//! What can go wrong while loading an app: its signing key, its certificate, its CA.
//! Found at start-up (or on reload), never while sending; every message names the app
//! and the file, and none ever shows key material.

use super::{identity, provider_token};

/// A problem found while loading an app's credentials; always names the app and the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("apps.{app}: {source}")]
    Key {
        app: String,
        source: provider_token::KeyError,
    },
    #[error("apps.{app}: {source}")]
    Identity {
        app: String,
        source: identity::IdentityError,
    },
    #[error("apps.{app}: {message}")]
    Tls { app: String, message: String },
    /// An app of another provider was handed to APNs.
    #[error("apps.{app}: not an APNs app")]
    NotApns { app: String },
}
