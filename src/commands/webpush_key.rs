//! `pgpushd webpush-key`: makes a VAPID key for a Web Push app (a P-256 private key,
//! written as PEM to a new file only its owner may read), or reads an existing one; and
//! says the application server key a web page passes to `pushManager.subscribe`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

use crate::webpush::vapid::VapidKey;

/// What to tell the user about `key`, made or read at `path`.
fn describe(key: &VapidKey, path: &Path, made: bool) -> String {
    format!(
        "{} {}\n\
         application server key (the web page's pushManager.subscribe({{userVisibleOnly: \
         true, applicationServerKey}})):\n{}\n\
         config: [apps.NAME.webpush] key_file = {:?}",
        if made {
            "wrote a new VAPID key to"
        } else {
            "the VAPID key in"
        },
        path.display(),
        key.public_key_b64url(),
        path.display().to_string(),
    )
}

/// Makes a key and writes it to `path`, which must not exist (a key in use is never
/// replaced: browsers subscribed with it would stop receiving).
pub fn make(path: &Path) -> anyhow::Result<String> {
    let key = VapidKey::generate().map_err(anyhow::Error::msg)?;
    let pem = key.to_pem().map_err(anyhow::Error::msg)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "{}: cannot create the key file (an existing key is never replaced: \
                 browsers subscribed with it would stop receiving)",
                path.display()
            )
        })?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("{}: cannot write the key", path.display()))?;
    Ok(describe(&key, path, true))
}

/// Reads the key at `path` (PEM or raw base64url) and says its application server key.
pub fn show(path: &Path) -> anyhow::Result<String> {
    let key = VapidKey::load(path).map_err(anyhow::Error::msg)?;
    Ok(describe(&key, path, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_key_is_private_loads_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vapid.pem");
        let made = make(&path).unwrap();
        let shown = show(&path).unwrap();
        let public = |text: &str| text.lines().nth(2).unwrap().to_owned();
        assert_eq!(public(&made), public(&shown));
        assert_eq!(public(&made).len(), 87, "65 bytes in base64url: {made}");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let before = std::fs::read(&path).unwrap();
        let e = make(&path).unwrap_err().to_string();
        assert!(e.contains("never replaced"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
