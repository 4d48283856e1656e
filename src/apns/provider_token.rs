//! Provider tokens for token auth: ES256 JWTs signed with the app's `.p8` key.
//!
//! APNs wants one token reused for up to an hour, refuses tokens older than that
//! (`ExpiredProviderToken`) and refuses tokens renewed too often
//! (`TooManyProviderTokenUpdates`). So: one token per app, renewed after 50 minutes, and
//! never more often than every 20 minutes, even when APNs says the token is stale (then
//! the clock is off or someone else signs with the key, and minting faster won't help).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl::ec::EcKey;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use tokio::time::Instant;

use crate::config::TokenAuth;

/// A token this old is replaced before the next request.
pub const REFRESH_AFTER: Duration = Duration::from_secs(50 * 60);
/// Tokens are never minted more often than this.
pub const MIN_INTERVAL: Duration = Duration::from_secs(20 * 60);

/// Why a `.p8` key cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: cannot read the token key: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: not a PEM private key (expected the .p8 file Apple hands out, which starts \
         with \"-----BEGIN PRIVATE KEY-----\")",
        path.display()
    )]
    NotPem { path: PathBuf },
    #[error(
        "{}: the key is encrypted; Apple's .p8 keys are not, use the file as downloaded",
        path.display()
    )]
    Encrypted { path: PathBuf },
    #[error("{}: cannot parse the private key: {message}", path.display())]
    Malformed { path: PathBuf, message: String },
    #[error(
        "{}: this is {kind} key; token auth needs an EC P-256 key (ES256), as in Apple's .p8 files",
        path.display()
    )]
    NotEc { path: PathBuf, kind: String },
    #[error(
        "{}: this EC key is on curve {curve}; token auth needs P-256 (prime256v1), as in Apple's .p8 files",
        path.display()
    )]
    WrongCurve { path: PathBuf, curve: String },
    #[error("{}: cannot sign a provider token: {message}", path.display())]
    Sign { path: PathBuf, message: String },
}

/// Signs and caches the provider token of one app.
pub struct JwtSigner {
    key: EcKey<Private>,
    path: PathBuf,
    key_id: String,
    team_id: String,
    current: Mutex<Option<Minted>>,
    refresh_after: Duration,
    min_interval: Duration,
}

struct Minted {
    token: Arc<str>,
    at: Instant,
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("path", &self.path)
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// Reads and checks the key of `auth`.
    pub fn load(auth: &TokenAuth) -> Result<JwtSigner, KeyError> {
        let pem = std::fs::read(&auth.key_file).map_err(|source| KeyError::Read {
            path: auth.key_file.clone(),
            source,
        })?;
        JwtSigner::from_pem(&pem, &auth.key_file, &auth.key_id, &auth.team_id)
    }

    /// `path` only names the key in errors.
    pub fn from_pem(
        pem: &[u8],
        path: &Path,
        key_id: &str,
        team_id: &str,
    ) -> Result<JwtSigner, KeyError> {
        let path = path.to_owned();
        let text = String::from_utf8_lossy(pem);
        if !text.contains("-----BEGIN ") || !text.contains("PRIVATE KEY-----") {
            return Err(KeyError::NotPem { path });
        }
        if text.contains("ENCRYPTED") {
            return Err(KeyError::Encrypted { path });
        }
        // The callback form: OpenSSL's default would prompt on the terminal.
        let key = PKey::private_key_from_pem_callback(pem, |_| Ok(0)).map_err(|e| {
            KeyError::Malformed {
                path: path.clone(),
                message: crate::openssl_reason::openssl_reason(&e),
            }
        })?;
        if key.id() != Id::EC {
            let kind = match key.id() {
                Id::RSA => "an RSA",
                Id::ED25519 => "an Ed25519",
                Id::DSA => "a DSA",
                _ => "a non-EC",
            };
            return Err(KeyError::NotEc {
                path,
                kind: kind.into(),
            });
        }
        let key = key.ec_key().map_err(|e| KeyError::Malformed {
            path: path.clone(),
            message: crate::openssl_reason::openssl_reason(&e),
        })?;
        let curve = key.group().curve_name();
        if curve != Some(Nid::X9_62_PRIME256V1) {
            let curve = curve
                .and_then(|n| n.short_name().ok())
                .unwrap_or("(unnamed)")
                .to_owned();
            return Err(KeyError::WrongCurve { path, curve });
        }
        Ok(JwtSigner {
            key,
            path,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            current: Mutex::new(None),
            refresh_after: REFRESH_AFTER,
            min_interval: MIN_INTERVAL,
        })
    }

    /// Other intervals than Apple's, for tests that cannot wait 20 minutes.
    pub fn with_intervals(mut self, refresh_after: Duration, min_interval: Duration) -> Self {
        self.refresh_after = refresh_after;
        self.min_interval = min_interval;
        self
    }

    /// The token to send now: the current one, or a new one when it is 50 minutes old.
    pub fn token(&self) -> Result<Arc<str>, KeyError> {
        let mut current = self.current.lock().unwrap();
        match &*current {
            Some(m) if m.at.elapsed() < self.refresh_after => Ok(m.token.clone()),
            _ => self.mint(&mut current),
        }
    }

    /// APNs called `stale` expired. Returns the token to resend with: a new one, or one
    /// another request minted meanwhile; `None` when the current token is `stale` and
    /// younger than the minimum interval (minting again would only earn
    /// `TooManyProviderTokenUpdates`).
    pub fn refresh(&self, stale: &str) -> Result<Option<Arc<str>>, KeyError> {
        let mut current = self.current.lock().unwrap();
        match &*current {
            Some(m) if &*m.token != stale => Ok(Some(m.token.clone())),
            Some(m) if m.at.elapsed() < self.min_interval => Ok(None),
            _ => self.mint(&mut current).map(Some),
        }
    }

    fn mint(&self, current: &mut Option<Minted>) -> Result<Arc<str>, KeyError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let token: Arc<str> = self.sign(iat)?.into();
        tracing::info!(key_id = %self.key_id, team_id = %self.team_id, iat, "minted a provider token");
        *current = Some(Minted {
            token: token.clone(),
            at: Instant::now(),
        });
        Ok(token)
    }

    /// `base64url(header).base64url(claims).base64url(r || s)`.
    fn sign(&self, iat: u64) -> Result<String, KeyError> {
        let header = serde_json::json!({"alg": "ES256", "kid": self.key_id});
        let claims = serde_json::json!({"iss": self.team_id, "iat": iat});
        crate::es256::sign(&self.key, &header.to_string(), &claims.to_string()).map_err(|e| {
            KeyError::Sign {
                path: self.path.clone(),
                message: crate::openssl_reason::openssl_reason(&e),
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use openssl::bn::BigNum;
    use openssl::ec::EcGroup;
    use openssl::ecdsa::EcdsaSig;
    use openssl::pkey::Public;
    use openssl::sha::sha256;

    /// A fresh P-256 key as an Apple `.p8` (PKCS#8 PEM), and its public half.
    pub(crate) fn p8() -> (Vec<u8>, EcKey<Public>) {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = EcKey::generate(&group).unwrap();
        let public = EcKey::from_public_key(&group, key.public_key()).unwrap();
        let pem = PKey::from_ec_key(key)
            .unwrap()
            .private_key_to_pem_pkcs8()
            .unwrap();
        (pem, public)
    }

    fn signer() -> (JwtSigner, EcKey<Public>) {
        let (pem, public) = p8();
        let s =
            JwtSigner::from_pem(&pem, Path::new("AuthKey.p8"), "ABC123DEFG", "DEF123GHIJ").unwrap();
        (s, public)
    }

    /// Checks `token` the way APNs does; returns its claims.
    pub(crate) fn verify(token: &str, public: &EcKey<Public>) -> serde_json::Value {
        let (input, sig) = token.rsplit_once('.').unwrap();
        let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        assert_eq!(raw.len(), 64);
        let sig = EcdsaSig::from_private_components(
            BigNum::from_slice(&raw[..32]).unwrap(),
            BigNum::from_slice(&raw[32..]).unwrap(),
        )
        .unwrap();
        assert!(sig.verify(&sha256(input.as_bytes()), public).unwrap());
        let (header, claims) = input.split_once('.').unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "ES256", "kid": "ABC123DEFG"})
        );
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap()
    }

    #[test]
    fn tokens_verify_against_the_public_key() {
        let (s, public) = signer();
        let claims = verify(&s.token().unwrap(), &public);
        assert_eq!(claims["iss"], "DEF123GHIJ");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let iat = claims["iat"].as_u64().unwrap();
        assert!(iat <= now && now - iat < 60, "{iat} vs {now}");
        assert!(!format!("{s:?}").contains("BEGIN"));
    }

    #[tokio::test(start_paused = true)]
    async fn one_token_is_reused() {
        let (s, _) = signer();
        let first = s.token().unwrap();
        for _ in 0..1000 {
            assert!(Arc::ptr_eq(&first, &s.token().unwrap()));
        }
        tokio::time::advance(Duration::from_secs(49 * 60 + 59)).await;
        assert!(Arc::ptr_eq(&first, &s.token().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn renewed_after_50_minutes() {
        let (s, public) = signer();
        let first = s.token().unwrap();
        tokio::time::advance(REFRESH_AFTER).await;
        let second = s.token().unwrap();
        assert_ne!(first, second);
        verify(&second, &public);
        assert!(Arc::ptr_eq(&second, &s.token().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn never_minted_twice_within_20_minutes() {
        let (s, _) = signer();
        let first = s.token().unwrap();
        // APNs says it is stale right away: keep it, minting now would not help.
        assert_eq!(s.refresh(&first).unwrap(), None);
        tokio::time::advance(MIN_INTERVAL - Duration::from_secs(1)).await;
        assert_eq!(s.refresh(&first).unwrap(), None);
        assert!(Arc::ptr_eq(&first, &s.token().unwrap()));

        tokio::time::advance(Duration::from_secs(1)).await;
        let second = s.refresh(&first).unwrap().unwrap();
        assert_ne!(first, second);
        // Other requests that failed with the first token pick up the second.
        assert_eq!(s.refresh(&first).unwrap(), Some(second.clone()));
        // And the second is not renewed for another 20 minutes.
        assert_eq!(s.refresh(&second).unwrap(), None);
        assert!(Arc::ptr_eq(&second, &s.token().unwrap()));
    }

    fn load_err(pem: &[u8]) -> String {
        JwtSigner::from_pem(pem, Path::new("/etc/k.p8"), "ABC123DEFG", "DEF123GHIJ")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn other_keys_are_refused_naming_the_file() {
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let e = load_err(&rsa.private_key_to_pem_pkcs8().unwrap());
        assert!(e.starts_with("/etc/k.p8: this is an RSA key"), "{e}");

        let group = EcGroup::from_curve_name(Nid::SECP384R1).unwrap();
        let p384 = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let e = load_err(&p384.private_key_to_pem_pkcs8().unwrap());
        assert!(
            e.starts_with("/etc/k.p8: this EC key is on curve secp384r1"),
            "{e}"
        );

        let e = load_err(b"hello");
        assert!(e.starts_with("/etc/k.p8: not a PEM private key"), "{e}");
        let e = load_err(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        assert!(
            e.starts_with("/etc/k.p8: cannot parse the private key"),
            "{e}"
        );

        let (pem, _) = p8();
        let key = PKey::private_key_from_pem(&pem).unwrap();
        let encrypted = key
            .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_128_cbc(), b"pw")
            .unwrap();
        let e = load_err(&encrypted);
        assert!(e.starts_with("/etc/k.p8: the key is encrypted"), "{e}");

        let e = JwtSigner::load(&TokenAuth {
            key_file: "/nonexistent/AuthKey.p8".into(),
            key_id: "ABC123DEFG".into(),
            team_id: "DEF123GHIJ".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/nonexistent/AuthKey.p8: cannot read the token key"),
            "{e}"
        );
    }
}
