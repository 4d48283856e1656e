//! What can go wrong while loading an FCM app: its service-account key, its project, its
//! CA. Found at start-up (or on reload), never while sending; every message names the app
//! and the file, and none ever shows key material.

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The service-account file is missing, unreadable or not a key (the message names
    /// the file).
    #[error("apps.{app}.fcm.service_account_file: {message}")]
    ServiceAccount { app: String, message: String },
    /// The key is of another project than `project_id`.
    #[error(
        "apps.{app}.fcm.project_id: {configured:?}, but {file} is a key of project \
         {key:?}; use that project's key, or drop project_id to send as the key's project"
    )]
    OtherProject {
        app: String,
        configured: String,
        key: String,
        file: String,
    },
    #[error("apps.{app}.fcm.service_account_file: token_uri {uri:?}: {message}")]
    TokenUri {
        app: String,
        uri: String,
        message: String,
    },
    #[error("apps.{app}: {message}")]
    Tls { app: String, message: String },
    /// An app of another provider was handed to FCM.
    #[error("apps.{app}: not an FCM app")]
    NotFcm { app: String },
}
