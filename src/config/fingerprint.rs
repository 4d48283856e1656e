//! What an app was built from, to tell on reload whether anything changed: its config
//! and the bytes of every file it reads, so a rotated key, certificate or service-account
//! file under the same path counts as a change.

use std::path::Path;

use super::{AppConfig, Auth};

/// The config's `Debug` masks the proxy's credentials, so they are compared besides it
/// (held here, never shown).
#[derive(PartialEq)]
pub struct Fingerprint {
    config: String,
    proxy_credentials: Option<String>,
    files: Vec<Option<Vec<u8>>>,
}

impl Fingerprint {
    pub fn of(config: &AppConfig) -> Fingerprint {
        let mut paths: Vec<&Path> = config.ca_file.iter().map(|p| p.as_path()).collect();
        match &config.auth {
            Auth::Token(t) => paths.push(&t.key_file),
            Auth::Certificate(c) => {
                paths.push(&c.file);
                paths.extend(c.passphrase_file.as_deref());
            }
            Auth::Fcm(f) => paths.push(&f.service_account_file),
            Auth::Webpush(w) => paths.push(&w.key_file),
        }
        Fingerprint {
            config: format!("{config:?}"),
            proxy_credentials: config.proxy.credentials().map(str::to_owned),
            files: paths.iter().map(|p| std::fs::read(p).ok()).collect(),
        }
    }
}
