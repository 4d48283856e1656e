//! The app's VAPID identity (RFC 8292): the P-256 key its web pages subscribe with (the
//! "application server key" given to `pushManager.subscribe`), and the `Authorization`
//! each request carries, `vapid t=<JWT>, k=<public key>`.
//!
//! The key file holds either a PEM private key (SEC1 `BEGIN EC PRIVATE KEY` or PKCS#8
//! `BEGIN PRIVATE KEY`, unencrypted, on P-256), or the raw form web-push tools print
//! (`web-push generate-vapid-keys`): the 32-byte private scalar in base64url, padded or
//! not, the public key derived from it. Errors name the file, never the key.
//!
//! The token is an ES256 JWT: header `{"typ":"JWT","alg":"ES256"}`, claims
//! `{"aud":"<the endpoint's origin>","exp":<unix seconds>,"sub":"<subject>"}`, the
//! signature JOSE's raw `r || s` (32 bytes each). The subject is how the push service
//! reaches the sender: a `mailto:` address or an `https://` URL; Apple's service refuses
//! tokens without one, so it is required.
//!
//! [`VapidSigner`] keeps one token per origin: signed for [`LIFETIME`] (12 hours; RFC 8292
//! allows 24), used until less than [`RENEW_BEFORE`] (1 hour) is left, so a token sent
//! is at most 11 hours old and none is signed per request.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Uri;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroupRef, EcKey, EcPoint, PointConversionForm};
use openssl::error::ErrorStack;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};

use super::base64url;
use crate::openssl_reason::openssl_reason;

/// How long a token is signed for.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A token with less than this left is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// The origins whose tokens are kept; push services are few, so this is never reached
/// but by a flood of subscriptions to odd endpoints.
pub const MAX_TOKENS: usize = 1024;

/// The length of a raw P-256 private key.
const SCALAR_LEN: usize = 32;

/// A P-256 private key. `Debug` shows its public key only.
#[derive(Clone)]
pub struct VapidKey {
    key: EcKey<Private>,
    /// The uncompressed point, 65 bytes.
    public: Vec<u8>,
}

impl fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VapidKey")
            .field("public", &self.public_key_b64url())
            .finish_non_exhaustive()
    }
}

impl PartialEq for VapidKey {
    /// The same key: the public key follows from the private one.
    fn eq(&self, other: &VapidKey) -> bool {
        self.public == other.public
    }
}

fn p256() -> Result<&'static EcGroupRef, ErrorStack> {
    super::p256::group()
}

impl VapidKey {
    /// Reads and checks the key file at `path`.
    pub fn load(path: &Path) -> Result<VapidKey, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("{}: cannot read the VAPID key: {e}", path.display()))?;
        VapidKey::from_file_text(&text, path)
    }

    /// The key in a file's `text` (PEM or raw); `path` only names it in errors.
    pub fn from_file_text(text: &[u8], path: &Path) -> Result<VapidKey, String> {
        let name = path.display();
        let text = String::from_utf8_lossy(text);
        let text = text.trim();
        if text.contains("-----BEGIN ") {
            return VapidKey::from_pem(text).map_err(|e| format!("{name}: {e}"));
        }
        let Some(scalar) = base64url::decode(text) else {
            return Err(format!(
                "{name}: not a VAPID private key: expected a PEM private key (\"-----BEGIN \
                 EC PRIVATE KEY-----\" or \"-----BEGIN PRIVATE KEY-----\") or the 32-byte \
                 private key in base64url that web-push tools print"
            ));
        };
        VapidKey::from_scalar(&scalar).map_err(|e| format!("{name}: {e}"))
    }

    fn from_pem(pem: &str) -> Result<VapidKey, String> {
        if pem.contains("ENCRYPTED") {
            return Err("the VAPID key is encrypted; give it unencrypted".to_owned());
        }
        // The callback form: OpenSSL's default would prompt on the terminal.
        let key = PKey::private_key_from_pem_callback(pem.as_bytes(), |_| Ok(0))
            .map_err(|e| format!("cannot parse the VAPID key: {}", openssl_reason(&e)))?;
        if key.id() != Id::EC {
            let kind = match key.id() {
                Id::RSA => "an RSA",
                Id::ED25519 => "an Ed25519",
                Id::DSA => "a DSA",
                _ => "a non-EC",
            };
            return Err(format!(
                "this is {kind} key; a VAPID key is an EC key on P-256 (prime256v1)"
            ));
        }
        let key = key
            .ec_key()
            .map_err(|e| format!("cannot parse the VAPID key: {}", openssl_reason(&e)))?;
        let curve = key.group().curve_name();
        if curve != Some(Nid::X9_62_PRIME256V1) {
            let curve = curve
                .and_then(|n| n.short_name().ok())
                .unwrap_or("(unnamed)");
            return Err(format!(
                "this EC key is on curve {curve}; a VAPID key is on P-256 (prime256v1)"
            ));
        }
        VapidKey::new(key)
    }

    /// The key whose private scalar is `scalar` (32 bytes, big-endian).
    pub fn from_scalar(scalar: &[u8]) -> Result<VapidKey, String> {
        if scalar.len() != SCALAR_LEN {
            let hint = match scalar.len() {
                65 => " (65 bytes is a public key; the file needs the private one)",
                _ => "",
            };
            return Err(format!(
                "a raw VAPID private key is {SCALAR_LEN} bytes in base64url; this one is {} \
                 bytes{hint}",
                scalar.len()
            ));
        }
        let derive = || -> Result<Result<EcKey<Private>, String>, ErrorStack> {
            let group = p256()?;
            let d = BigNum::from_slice(scalar)?;
            let mut ctx = BigNumContext::new()?;
            let mut order = BigNum::new()?;
            group.order(&mut order, &mut ctx)?;
            if d.num_bits() == 0 || d >= order {
                return Ok(Err(
                    "not a P-256 private key (out of the curve's range)".into()
                ));
            }
            let mut public = EcPoint::new(group)?;
            public.mul_generator2(group, &d, &mut ctx)?;
            Ok(Ok(EcKey::from_private_components(group, &d, &public)?))
        };
        let key =
            derive().map_err(|e| format!("cannot use the VAPID key: {}", openssl_reason(&e)))??;
        VapidKey::new(key)
    }

    fn new(key: EcKey<Private>) -> Result<VapidKey, String> {
        let failed = |e: ErrorStack| format!("cannot use the VAPID key: {}", openssl_reason(&e));
        key.check_key().map_err(failed)?;
        let mut ctx = BigNumContext::new().map_err(failed)?;
        let public = key
            .public_key()
            .to_bytes(key.group(), PointConversionForm::UNCOMPRESSED, &mut ctx)
            .map_err(failed)?;
        Ok(VapidKey { key, public })
    }

    /// A new random key.
    pub fn generate() -> Result<VapidKey, String> {
        let key = p256()
            .and_then(EcKey::generate)
            .map_err(|e| format!("cannot generate a VAPID key: {}", openssl_reason(&e)))?;
        VapidKey::new(key)
    }

    /// The key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), for a key file.
    pub fn to_pem(&self) -> Result<String, String> {
        let pem = PKey::from_ec_key(self.key.clone())
            .and_then(|k| k.private_key_to_pem_pkcs8())
            .map_err(|e| format!("cannot write the VAPID key: {}", openssl_reason(&e)))?;
        String::from_utf8(pem).map_err(|_| "cannot write the VAPID key: not text".to_owned())
    }

    /// The public key, an uncompressed point (65 bytes), in base64url without padding:
    /// the application server key a page passes to `pushManager.subscribe`, and the
    /// `k=` of the authorization.
    pub fn public_key_b64url(&self) -> String {
        base64url::encode(&self.public)
    }

    /// The private scalar (32 bytes) in base64url without padding: the raw form.
    pub fn private_key_b64url(&self) -> String {
        let d = self.key.private_key().to_vec();
        let mut raw = vec![0; SCALAR_LEN.saturating_sub(d.len())];
        raw.extend(d);
        base64url::encode(&raw)
    }

    /// `base64url(header).base64url(claims).base64url(r || s)`.
    fn sign_jwt(&self, claims: &str) -> Result<String, String> {
        const HEADER: &str = r#"{"typ":"JWT","alg":"ES256"}"#;
        crate::es256::sign(&self.key, HEADER, claims)
            .map_err(|e| format!("cannot sign a VAPID token: {}", openssl_reason(&e)))
    }
}

/// The app's key and the contact push services see.
#[derive(Debug, Clone, PartialEq)]
pub struct Vapid {
    key: VapidKey,
    subject: String,
}

impl Vapid {
    /// `subject`: `mailto:` and an address, or an `https://` URL.
    pub fn new(key: VapidKey, subject: &str) -> Result<Vapid, String> {
        check_subject(subject)?;
        Ok(Vapid {
            key,
            subject: subject.to_owned(),
        })
    }

    pub fn key(&self) -> &VapidKey {
        &self.key
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The token for requests to `origin` (the endpoint's, as the subscription gives it),
    /// valid until `exp` (whole seconds, rounded down).
    pub fn jwt(&self, origin: &str, exp: SystemTime) -> Result<String, String> {
        let exp = exp.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let text = |s: &str| serde_json::Value::from(s).to_string();
        let claims = format!(
            r#"{{"aud":{},"exp":{exp},"sub":{}}}"#,
            text(origin),
            text(&self.subject)
        );
        self.key.sign_jwt(&claims)
    }

    /// The `Authorization` header's value: `vapid t=<jwt>, k=<public key>`.
    pub fn authorization(&self, origin: &str, exp: SystemTime) -> Result<String, String> {
        Ok(format!(
            "vapid t={}, k={}",
            self.jwt(origin, exp)?,
            self.key.public_key_b64url()
        ))
    }
}

fn check_subject(subject: &str) -> Result<(), String> {
    let valid = match subject.strip_prefix("mailto:") {
        Some(address) => !address.is_empty() && !address.contains(char::is_whitespace),
        None => {
            subject.starts_with("https://")
                && subject.parse::<Uri>().is_ok_and(|uri| {
                    uri.authority()
                        .is_some_and(|a| !a.host().is_empty() && !a.as_str().contains('@'))
                })
        }
    };
    match valid {
        true => Ok(()),
        false => Err(format!(
            "the VAPID subject {subject:?} is neither a mailto: address nor an https:// URL: \
             push services require one (Apple's refuses the token without it), to reach the \
             sender about its messages"
        )),
    }
}

/// Signs the app's tokens, one per origin, kept until [`RENEW_BEFORE`] their expiry.
pub struct VapidSigner {
    vapid: Vapid,
    /// Per origin: the `Authorization` value and its token's `exp`.
    cache: Mutex<HashMap<String, (String, SystemTime)>>,
}

/// Not the tokens it keeps: each is a bearer credential for 12 hours.
impl fmt::Debug for VapidSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VapidSigner")
            .field("vapid", &self.vapid)
            .field("cached", &self.cached())
            .finish()
    }
}

impl VapidSigner {
    pub fn new(vapid: Vapid) -> VapidSigner {
        VapidSigner {
            vapid,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn vapid(&self) -> &Vapid {
        &self.vapid
    }

    /// The `Authorization` for a request to `origin` sent at `now`: the one signed
    /// before, unless less than [`RENEW_BEFORE`] is left (or the clock went back so far
    /// that it would seem to last longer than [`LIFETIME`]); else a new one, good for
    /// [`LIFETIME`].
    pub fn authorization(&self, origin: &str, now: SystemTime) -> Result<String, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((header, exp)) = cache.get(origin) {
            if usable(*exp, now) {
                return Ok(header.clone());
            }
        }
        // The token says whole seconds: keep the same rounding here.
        let secs = (now + LIFETIME)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let exp = UNIX_EPOCH + Duration::from_secs(secs);
        let header = self.vapid.authorization(origin, exp)?;
        if cache.len() >= MAX_TOKENS && !cache.contains_key(origin) {
            cache.retain(|_, (_, exp)| usable(*exp, now));
            if cache.len() >= MAX_TOKENS {
                let soonest = cache
                    .iter()
                    .min_by_key(|(_, (_, exp))| *exp)
                    .map(|(origin, _)| origin.clone());
                if let Some(soonest) = soonest {
                    cache.remove(&soonest);
                }
            }
        }
        cache.insert(origin.to_owned(), (header.clone(), exp));
        Ok(header)
    }

    /// The origins whose tokens are kept now.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A token expiring at `exp` can still be sent at `now`.
fn usable(exp: SystemTime, now: SystemTime) -> bool {
    exp.duration_since(now)
        .is_ok_and(|left| left >= RENEW_BEFORE && left <= LIFETIME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ecdsa::EcdsaSig;
    use openssl::pkey::Public;
    use openssl::sha::sha256;
    use std::io::Write;

    const ORIGIN: &str = "https://push.example.net";
    const SUBJECT: &str = "mailto:ops@example.com";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn public_of(b64: &str) -> EcKey<Public> {
        let group = p256().unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        let point = EcPoint::from_bytes(group, &base64url::decode(b64).unwrap(), &mut ctx).unwrap();
        EcKey::from_public_key(group, &point).unwrap()
    }

    /// Checks the `Authorization` value the way a push service does: the token verifies
    /// against `k=`; returns its header and claims.
    fn verify(authorization: &str) -> (String, String) {
        let rest = authorization.strip_prefix("vapid t=").unwrap();
        let (jwt, k) = rest.split_once(", k=").unwrap();
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let raw = base64url::decode(sig).unwrap();
        assert_eq!(raw.len(), 64);
        let sig = EcdsaSig::from_private_components(
            BigNum::from_slice(&raw[..32]).unwrap(),
            BigNum::from_slice(&raw[32..]).unwrap(),
        )
        .unwrap();
        assert!(sig
            .verify(&sha256(input.as_bytes()), &public_of(k))
            .unwrap());
        let (header, claims) = input.split_once('.').unwrap();
        let text = |b64| String::from_utf8(base64url::decode(b64).unwrap()).unwrap();
        (text(header), text(claims))
    }

    fn file(text: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text).unwrap();
        f
    }

    #[test]
    fn a_signer_never_shows_the_tokens_it_keeps() {
        let vapid = Vapid::new(VapidKey::generate().unwrap(), "mailto:a@b.example").unwrap();
        let signer = VapidSigner::new(vapid);
        let header = signer
            .authorization("https://push.example", SystemTime::now())
            .unwrap();
        let token = header.split(['=', ',']).nth(1).unwrap();
        let shown = format!("{signer:?}");
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.contains("cached: 1"), "{shown}");
    }

    #[test]
    fn the_token_verifies_and_says_what_rfc_8292_asks() {
        let key = VapidKey::generate().unwrap();
        let vapid = Vapid::new(key.clone(), SUBJECT).unwrap();
        let authorization = vapid.authorization(ORIGIN, at(1_800_043_200)).unwrap();
        assert!(authorization.ends_with(&format!(", k={}", key.public_key_b64url())));
        let (header, claims) = verify(&authorization);
        assert_eq!(header, r#"{"typ":"JWT","alg":"ES256"}"#);
        assert_eq!(
            claims,
            r#"{"aud":"https://push.example.net","exp":1800043200,"sub":"mailto:ops@example.com"}"#
        );
        assert_eq!(
            base64url::decode(&key.public_key_b64url()).unwrap().len(),
            65
        );
        assert!(!format!("{key:?}").contains(&key.private_key_b64url()));
    }

    #[test]
    fn one_token_per_origin_for_11_hours() {
        let signer = VapidSigner::new(Vapid::new(VapidKey::generate().unwrap(), SUBJECT).unwrap());
        let start = at(1_800_000_000);
        let first = signer.authorization(ORIGIN, start).unwrap();
        let (_, claims) = verify(&first);
        assert!(claims.contains(r#""exp":1800043200"#), "{claims}");
        let eleven_hours = Duration::from_secs(11 * 3600);
        for later in [Duration::ZERO, Duration::from_secs(3600), eleven_hours] {
            assert_eq!(signer.authorization(ORIGIN, start + later).unwrap(), first);
        }
        let other = signer
            .authorization("https://fcm.googleapis.com", start)
            .unwrap();
        assert_ne!(other, first);
        assert!(verify(&other)
            .1
            .contains(r#""aud":"https://fcm.googleapis.com""#));

        let renewed = signer
            .authorization(ORIGIN, start + eleven_hours + Duration::from_secs(1))
            .unwrap();
        assert_ne!(renewed, first);
        assert!(verify(&renewed).1.contains(r#""exp":1800082801"#));

        // A clock set back by a day: the kept token would seem to last 36 hours.
        let back = signer
            .authorization(ORIGIN, start - Duration::from_secs(86_400))
            .unwrap();
        assert!(verify(&back).1.contains(r#""exp":1799956800"#));
    }

    #[test]
    fn the_cache_keeps_at_most_1024_origins() {
        let signer = VapidSigner::new(Vapid::new(VapidKey::generate().unwrap(), SUBJECT).unwrap());
        let start = at(1_800_000_000);
        for i in 0..MAX_TOKENS {
            signer
                .authorization(&format!("https://h{i}.example"), start)
                .unwrap();
        }
        assert_eq!(signer.cached(), MAX_TOKENS);
        // All still usable: the one expiring soonest goes.
        let later = start + Duration::from_secs(60);
        signer.authorization("https://new.example", later).unwrap();
        assert_eq!(signer.cached(), MAX_TOKENS);
        // Those no longer usable all go at once.
        let much_later = start + Duration::from_secs(11 * 3600 + 1);
        signer
            .authorization("https://newer.example", much_later)
            .unwrap();
        assert_eq!(signer.cached(), 2);
    }

    #[test]
    fn pem_and_raw_forms_are_the_same_key() {
        let key = VapidKey::generate().unwrap();
        let pkcs8 = key.to_pem().unwrap();
        assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"));
        let sec1 = String::from_utf8(key.key.private_key_to_pem().unwrap()).unwrap();
        assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
        let raw = key.private_key_b64url();
        assert_eq!(raw.len(), 43);
        for text in [pkcs8, sec1, format!("{raw}\n"), format!("  {raw}=\n\n")] {
            let loaded = VapidKey::load(file(text.as_bytes()).path()).unwrap();
            assert_eq!(loaded.public_key_b64url(), key.public_key_b64url());
            assert_eq!(loaded.private_key_b64url(), raw);
        }
    }

    #[test]
    fn a_known_raw_key_gives_its_public_key() {
        // RFC 8291, Appendix A's application server key pair.
        let key = VapidKey::from_scalar(
            &base64url::decode("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw").unwrap(),
        )
        .unwrap();
        assert_eq!(
            key.public_key_b64url(),
            "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
        );
    }

    fn load_err(text: &[u8]) -> String {
        VapidKey::from_file_text(text, Path::new("/etc/vapid.pem")).unwrap_err()
    }

    #[test]
    fn other_keys_are_refused_naming_the_file() {
        let p384 = EcKey::generate(&openssl::ec::EcGroup::from_curve_name(Nid::SECP384R1).unwrap())
            .unwrap();
        let e = load_err(&p384.private_key_to_pem().unwrap());
        assert_eq!(
            e,
            "/etc/vapid.pem: this EC key is on curve secp384r1; a VAPID key is on P-256 \
             (prime256v1)"
        );
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let e = load_err(&rsa.private_key_to_pem_pkcs8().unwrap());
        assert!(e.starts_with("/etc/vapid.pem: this is an RSA key"), "{e}");

        let key = VapidKey::generate().unwrap();
        let encrypted = PKey::from_ec_key(key.key.clone())
            .unwrap()
            .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_128_cbc(), b"pw")
            .unwrap();
        let e = load_err(&encrypted);
        assert!(
            e.starts_with("/etc/vapid.pem: the VAPID key is encrypted"),
            "{e}"
        );
        let e = load_err(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        assert!(
            e.starts_with("/etc/vapid.pem: cannot parse the VAPID key"),
            "{e}"
        );

        let public = key.public_key_b64url();
        let e = load_err(public.as_bytes());
        assert!(
            e.ends_with(
                "this one is 65 bytes (65 bytes is a public key; the file needs the private one)"
            ),
            "{e}"
        );
        assert!(!e.contains(&public));
        let e = load_err(b"hello, world");
        assert!(
            e.starts_with("/etc/vapid.pem: not a VAPID private key"),
            "{e}"
        );
        let zero = base64url::encode(&[0; 32]);
        assert!(load_err(zero.as_bytes()).contains("out of the curve's range"));
        let too_big = base64url::encode(&[0xff; 32]);
        assert!(load_err(too_big.as_bytes()).contains("out of the curve's range"));

        let e = VapidKey::load(Path::new("/nonexistent/vapid.pem")).unwrap_err();
        assert!(
            e.starts_with("/nonexistent/vapid.pem: cannot read the VAPID key"),
            "{e}"
        );
    }

    #[test]
    fn the_subject_is_a_mailto_or_an_https_url() {
        let key = VapidKey::generate().unwrap();
        for good in [
            "mailto:ops@example.com",
            "https://example.com",
            "https://example.com/contact",
        ] {
            assert_eq!(Vapid::new(key.clone(), good).unwrap().subject(), good);
        }
        for bad in [
            "",
            "mailto:",
            "ops@example.com",
            "http://example.com",
            "https://",
            "mailto:a b",
            "https://u@example.com/",
        ] {
            let e = Vapid::new(key.clone(), bad).unwrap_err();
            assert!(e.contains("push services require one"), "{bad}: {e}");
        }
    }
}
