//! What can go wrong while loading an app, whatever its service: its credentials (a
//! key, a certificate, a service account), its CA, its endpoint. Found at start-up (or
//! on reload), never while sending; every message names the app's config key and the
//! file, and none ever shows key material.

/// A problem found while loading an app.
#[derive(Debug, thiserror::Error)]
#[error("apps.{app}{at}: {message}")]
pub struct LoadError {
    pub app: String,
    /// Where in the app's section the problem is (`.fcm.project_id`), empty when the
    /// message says it.
    pub at: &'static str,
    pub message: String,
}

impl LoadError {
    /// A problem the message explains fully (it names the file).
    pub fn new(app: &str, message: impl std::fmt::Display) -> LoadError {
        LoadError {
            app: app.to_owned(),
            at: "",
            message: message.to_string(),
        }
    }

    /// A problem with the value at `at` (`.webpush.subject`) of the app's section.
    pub fn at(app: &str, at: &'static str, message: impl std::fmt::Display) -> LoadError {
        LoadError {
            app: app.to_owned(),
            at,
            message: message.to_string(),
        }
    }
}
