//! Provider tokens as APNs checks them: an ES256 JWT with header `{"alg":"ES256","kid"}`
//! and claims `{"iss": team id, "iat": seconds}`, sent as `authorization: bearer <jwt>`.
//!
//! Verifying ECDSA costs tens of microseconds, far too much for every request at 30k
//! requests/s, and clients reuse one token for thousands of requests: each connection
//! keeps the few tokens it has seen with their verdicts (`ConnectionTokens`), and only
//! the age and refresh rules are re-evaluated per request.
//!
//! The refresh rule ("no more than once every 20 minutes") is tracked per connection, as
//! APNs ties a connection to its first token's key (`UnrelatedKeyIdInToken`); tracking it
//! per key across connections would make every restarted client fail for 20 minutes.

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public};
use serde::Deserialize;

use super::reason;

/// A token older than this (by `iat`) is `ExpiredProviderToken`.
pub const MAX_TOKEN_AGE_SECS: u64 = 60 * 60;
/// A newer token sooner than this after the previous one is `TooManyProviderTokenUpdates`.
pub const MIN_REFRESH_SECS: u64 = 20 * 60;
/// How far in the future `iat` may be (clock skew) before the token is invalid.
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// Tokens remembered per connection (a client refreshing keeps two in use for a while).
const CACHED_TOKENS: usize = 4;

/// The key provider tokens must be signed with, and the ids they must name.
pub struct TokenKey {
    key: EcKey<Public>,
    key_id: String,
    team_id: String,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: String,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    iat: u64,
}

impl TokenKey {
    /// `pem`: the P-256 public key (`BEGIN PUBLIC KEY`), or the `.p8` private key itself
    /// (its public half is used).
    pub fn from_pem(pem: &[u8], key_id: &str, team_id: &str) -> anyhow::Result<TokenKey> {
        let key = match PKey::public_key_from_pem(pem) {
            Ok(public) => public.ec_key().context("the token key is not an EC key")?,
            Err(_) => {
                let private = PKey::private_key_from_pem(pem)
                    .context("the token key is neither a PEM public key nor a .p8 private key")?;
                let private = private.ec_key().context("the token key is not an EC key")?;
                EcKey::from_public_key(private.group(), private.public_key())?
            }
        };
        if key.group().curve_name() != Some(Nid::X9_62_PRIME256V1) {
            bail!("the token key is not a P-256 key (ES256 needs one)");
        }
        if key_id.is_empty() || team_id.is_empty() {
            bail!("token auth needs a key id and a team id");
        }
        Ok(TokenKey {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
        })
    }

    /// Checks the signature and claims (not the age): `iat`, or the reason to refuse.
    pub fn verify(&self, jwt: &[u8], now: u64) -> Result<u64, &'static str> {
        const INVALID: &str = reason::INVALID_PROVIDER_TOKEN;
        let mut parts = jwt.split(|b| *b == b'.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(INVALID);
        };
        let decode = |part: &[u8]| URL_SAFE_NO_PAD.decode(part).map_err(|_| INVALID);
        let head: Header = serde_json::from_slice(&decode(header)?).map_err(|_| INVALID)?;
        if head.alg != "ES256" || head.kid != self.key_id {
            return Err(INVALID);
        }
        let body: Claims = serde_json::from_slice(&decode(claims)?).map_err(|_| INVALID)?;
        if body.iss != self.team_id || body.iat > now + MAX_CLOCK_SKEW_SECS {
            return Err(INVALID);
        }
        let signature = decode(signature)?;
        if signature.len() != 64 {
            return Err(INVALID);
        }
        let signed = &jwt[..header.len() + 1 + claims.len()];
        let valid = (|| {
            let r = BigNum::from_slice(&signature[..32])?;
            let s = BigNum::from_slice(&signature[32..])?;
            EcdsaSig::from_private_components(r, s)?
                .verify(&openssl::sha::sha256(signed), &self.key)
        })();
        match valid {
            Ok(true) => Ok(body.iat),
            _ => Err(INVALID),
        }
    }
}

/// A token's `iat` if its signature and claims are good, else the reason to refuse it.
type Verdict = Result<u64, &'static str>;

/// One connection's provider tokens: verdicts of the tokens seen, and the newest `iat`.
#[derive(Default)]
pub(crate) struct ConnectionTokens {
    cache: Vec<(Box<[u8]>, Verdict)>,
    next_slot: usize,
    newest_iat: Option<u64>,
}

impl ConnectionTokens {
    /// Checks an `authorization` header value at `now` (seconds since the epoch).
    pub fn check(
        &mut self,
        key: &TokenKey,
        authorization: &[u8],
        now: u64,
    ) -> Result<(), &'static str> {
        let verdict = match self.cache.iter().find(|(t, _)| **t == *authorization) {
            Some((_, verdict)) => *verdict,
            None => {
                let verdict = match strip_bearer(authorization) {
                    Some(jwt) => key.verify(jwt, now),
                    None => Err(reason::INVALID_PROVIDER_TOKEN),
                };
                self.remember(authorization, verdict);
                verdict
            }
        };
        let iat = verdict?;
        if now.saturating_sub(iat) > MAX_TOKEN_AGE_SECS {
            return Err(reason::EXPIRED_PROVIDER_TOKEN);
        }
        match self.newest_iat {
            Some(newest) if iat > newest && iat - newest < MIN_REFRESH_SECS => {
                Err(reason::TOO_MANY_PROVIDER_TOKEN_UPDATES)
            }
            Some(newest) if iat <= newest => Ok(()),
            _ => {
                self.newest_iat = Some(iat);
                Ok(())
            }
        }
    }

    fn remember(&mut self, token: &[u8], verdict: Verdict) {
        let entry = (Box::from(token), verdict);
        if self.cache.len() < CACHED_TOKENS {
            self.cache.push(entry);
        } else {
            self.cache[self.next_slot] = entry;
            self.next_slot = (self.next_slot + 1) % CACHED_TOKENS;
        }
    }
}

fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// A new P-256 signing key as a `.p8` file holds it (PKCS#8 PEM): for tests and demos
/// that need token auth without Apple.
pub fn generate_signing_key() -> anyhow::Result<Vec<u8>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    Ok(key.private_key_to_pem_pkcs8()?)
}

/// Signs a provider token, for this module's tests (providers sign their own; the
/// integration tests in `tests/it/http2.rs` do too).
#[cfg(test)]
pub(crate) fn sign(p8: &[u8], key_id: &str, team_id: &str, iat: u64) -> String {
    let key = PKey::private_key_from_pem(p8).unwrap().ec_key().unwrap();
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{key_id}"}}"#));
    let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"{team_id}","iat":{iat}}}"#));
    let input = format!("{header}.{claims}");
    let sig = EcdsaSig::sign(&openssl::sha::sha256(input.as_bytes()), &key).unwrap();
    let mut raw = sig.r().to_vec_padded(32).unwrap();
    raw.extend(sig.s().to_vec_padded(32).unwrap());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn setup() -> (Vec<u8>, TokenKey) {
        let p8 = generate_signing_key().unwrap();
        let key = TokenKey::from_pem(&p8, "KEY123", "TEAM456").unwrap();
        (p8, key)
    }

    fn bearer(jwt: &str) -> Vec<u8> {
        format!("bearer {jwt}").into_bytes()
    }

    #[test]
    fn keys_load_from_p8_or_public_pem() {
        let p8 = generate_signing_key().unwrap();
        let public = PKey::private_key_from_pem(&p8)
            .unwrap()
            .public_key_to_pem()
            .unwrap();
        let from_public = TokenKey::from_pem(&public, "K", "T").unwrap();
        assert_eq!(
            from_public.verify(sign(&p8, "K", "T", NOW).as_bytes(), NOW),
            Ok(NOW)
        );
        assert!(TokenKey::from_pem(b"nope", "K", "T").is_err());
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let err = TokenKey::from_pem(&rsa.private_key_to_pem_pkcs8().unwrap(), "K", "T");
        assert!(err.is_err());
        let p384 = EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).unwrap()).unwrap();
        let p384 = PKey::from_ec_key(p384)
            .unwrap()
            .private_key_to_pem_pkcs8()
            .unwrap();
        assert!(TokenKey::from_pem(&p384, "K", "T").is_err());
        assert!(TokenKey::from_pem(&p8, "", "T").is_err());
    }

    #[test]
    fn verification() {
        let (p8, key) = setup();
        let good = sign(&p8, "KEY123", "TEAM456", NOW - 10);
        assert_eq!(key.verify(good.as_bytes(), NOW), Ok(NOW - 10));

        let invalid = Err(reason::INVALID_PROVIDER_TOKEN);
        let (other, _) = setup();
        let forged = sign(&other, "KEY123", "TEAM456", NOW);
        assert_eq!(key.verify(forged.as_bytes(), NOW), invalid, "another key");
        let wrong_kid = sign(&p8, "OTHER", "TEAM456", NOW);
        assert_eq!(key.verify(wrong_kid.as_bytes(), NOW), invalid, "kid");
        let wrong_iss = sign(&p8, "KEY123", "OTHER", NOW);
        assert_eq!(key.verify(wrong_iss.as_bytes(), NOW), invalid, "iss");
        let future = sign(&p8, "KEY123", "TEAM456", NOW + 3600);
        assert_eq!(key.verify(future.as_bytes(), NOW), invalid, "future iat");

        // Tampering with any part breaks the signature.
        let (head, rest) = good.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"TEAM456","iat":{NOW}}}"#));
        let tampered = format!("{head}.{claims}.{sig}");
        assert_eq!(key.verify(tampered.as_bytes(), NOW), invalid, "tampered");

        let hs256 = format!(
            "{}.{claims}.{sig}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"KEY123"}"#)
        );
        assert_eq!(key.verify(hs256.as_bytes(), NOW), invalid, "alg");
        for garbage in [
            "",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "..",
            &format!("{head}.{claims}."),
        ] {
            assert_eq!(key.verify(garbage.as_bytes(), NOW), invalid, "{garbage:?}");
        }
    }

    #[test]
    fn connection_rules() {
        let (p8, key) = setup();
        let mut conn = ConnectionTokens::default();
        let first = bearer(&sign(&p8, "KEY123", "TEAM456", NOW - 1500));
        assert_eq!(conn.check(&key, &first, NOW), Ok(()));
        assert_eq!(conn.check(&key, &first, NOW + 1), Ok(()), "cached");
        assert_eq!(
            conn.check(&key, b"Bearer x.y.z", NOW),
            Err(reason::INVALID_PROVIDER_TOKEN)
        );
        assert_eq!(
            conn.check(&key, b"basic abc", NOW),
            Err(reason::INVALID_PROVIDER_TOKEN)
        );
        assert_eq!(
            conn.check(&key, b"", NOW),
            Err(reason::INVALID_PROVIDER_TOKEN)
        );

        // Refreshing 10 minutes after the previous token: too soon.
        let soon = bearer(&sign(&p8, "KEY123", "TEAM456", NOW - 900));
        assert_eq!(
            conn.check(&key, &soon, NOW),
            Err(reason::TOO_MANY_PROVIDER_TOKEN_UPDATES)
        );
        // 25 minutes after: fine, and the previous token stays usable while young enough.
        let later = bearer(&sign(&p8, "KEY123", "TEAM456", NOW));
        assert_eq!(conn.check(&key, &later, NOW), Ok(()));
        assert_eq!(conn.check(&key, &first, NOW), Ok(()));
        // A token older than the newest is no update: usable while young enough.
        assert_eq!(conn.check(&key, &soon, NOW), Ok(()));

        // An hour after `iat` the token has expired, cached or not.
        assert_eq!(
            conn.check(&key, &first, NOW - 1500 + 3601),
            Err(reason::EXPIRED_PROVIDER_TOKEN)
        );
        let old = bearer(&sign(&p8, "KEY123", "TEAM456", NOW - 3601));
        let mut fresh = ConnectionTokens::default();
        assert_eq!(
            fresh.check(&key, &old, NOW),
            Err(reason::EXPIRED_PROVIDER_TOKEN)
        );
    }

    #[test]
    fn the_cache_stays_small() {
        let (p8, key) = setup();
        let mut conn = ConnectionTokens::default();
        for i in 0..10 {
            let token = bearer(&sign(&p8, "KEY123", "TEAM456", NOW - 3000 + i * 1200));
            let _ = conn.check(&key, &token, NOW);
        }
        assert_eq!(conn.cache.len(), CACHED_TOKENS);
    }
}
