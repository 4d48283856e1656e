//! What can go wrong while loading an app: its signing key, its certificate, its CA.
//! Found at start-up (or on reload), never while sending; every message names the app
//! and the file, and none ever shows key material.

use std::path::PathBuf;

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
    #[error("apps.{app}: {}: the certificate expired on {not_after}; download a new one from Apple", path.display())]
    CertificateExpired {
        app: String,
        path: PathBuf,
        not_after: String,
    },
    #[error("apps.{app}: {message}")]
    Tls { app: String, message: String },
}

/// OpenSSL's reasons ("bad decrypt", "unsupported"), without file names and line numbers
/// of OpenSSL's own source, and never any data.
pub(crate) fn openssl_reason(e: &openssl::error::ErrorStack) -> String {
    let reasons: Vec<&str> = e.errors().iter().filter_map(|e| e.reason()).collect();
    match reasons.is_empty() {
        true => "unknown OpenSSL error".to_owned(),
        false => reasons.join(", "),
    }
}
